"""T-Stitch on exact oracles (a small model that is exact for a coarser law, a large one exact for the true law) and on
stock pipelines, including a UNet stitched into a DiT pipeline."""

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler, UNet2DConditionModel
from tiny_pipelines import TEXT_DIM, sd3_inputs, tiny_sd3

from diffusers_ext.hooks import TStitch, coarsened_mixture
from diffusers_ext.testing import GaussianMixture, GaussianMixtureSamplingPipeline
from diffusers_ext.testing.sampler_accuracy import (
    SD3_SCHEDULER_CONFIG,
    SD_SCHEDULER_CONFIG,
    benchmark_mixture,
    law_yardstick,
    oracle_for,
)


def oracle_pipeline(law: GaussianMixture) -> GaussianMixtureSamplingPipeline:
    scheduler = DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)
    pipe = GaussianMixtureSamplingPipeline(unet=oracle_for(law, scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def mixture_mean_and_covariance(law: GaussianMixture) -> tuple[torch.Tensor, torch.Tensor]:
    mean = (law.weights[:, None] * law.means).sum(0)
    centred = law.means - mean
    covariance = (law.weights[:, None, None] * (law.covariances + centred[:, :, None] * centred[:, None, :])).sum(0)
    return mean, covariance


def test_coarsened_mixture_keeps_the_laws_mean_and_covariance():
    law = benchmark_mixture(2)
    for k in (1, 3, 8):
        coarse = coarsened_mixture(law, k)
        assert coarse.num_components == k
        for coarse_moment, moment in zip(mixture_mean_and_covariance(coarse), mixture_mean_and_covariance(law),
                                         strict=True):
            torch.testing.assert_close(coarse_moment, moment)
    with pytest.raises(ValueError, match="at most the law's 8"):
        coarsened_mixture(law, 9)


def test_fraction_zero_is_the_large_model_and_one_the_small_model_bit_for_bit():
    law = benchmark_mixture(2)
    pipe = oracle_pipeline(law)
    small_pipe = oracle_pipeline(coarsened_mixture(law, 2))
    noise = torch.randn(64, 2, 1, 1, generator=torch.Generator().manual_seed(0))
    run = lambda p: p(batch_size=64, num_inference_steps=10, latents=noise.clone()).samples  # noqa: E731
    large_only, small_only = run(pipe), run(small_pipe)
    for fraction, expected, calls in ((0.0, large_only, {"small": 0, "large": 10}),
                                      (1.0, small_only, {"small": 10, "large": 0})):
        stitch = TStitch(small=small_pipe.unet, fraction=fraction)
        with stitch.attached(pipe):
            torch.testing.assert_close(run(pipe), expected, rtol=0, atol=0)
        assert stitch.calls == calls
    stitch = TStitch(small=small_pipe.unet, fraction=0.4)
    with stitch.attached(pipe):
        run(pipe)
    assert stitch.calls == {"small": 4, "large": 6}


@pytest.mark.effect
def test_stitching_the_first_40_percent_to_a_coarse_model_costs_little():
    """2-D ring of 8 narrow components; the small model is exact for the single Gaussian with the ring's mean and
    covariance. Sliced W2 excess over the noise floor, 2048 samples, three noise seeds, 20 DDIM steps. The paper's
    claim: the first ~40 % of the steps can go to the small model with little loss. Measured: the excess grows by
    0.001-0.011 at 40 % against 0.36-0.39 when the small model does everything."""
    law = benchmark_mixture(2)
    pipe = oracle_pipeline(law)
    small = oracle_for(coarsened_mixture(law, 1), pipe.scheduler.config)
    excess = {fraction: [] for fraction in (0.0, 0.4, 1.0)}
    for seed in range(3):
        yardstick = law_yardstick(law, (2, 1, 1), 2048, seed)
        for fraction in excess:
            with TStitch(small=small, fraction=fraction).attached(pipe):
                samples = pipe(batch_size=2048, num_inference_steps=20, latents=yardstick.noise.clone()).samples
            excess[fraction].append(yardstick.distance_to_law(samples) - yardstick.floor)
    mean = {fraction: sum(values) / len(values) for fraction, values in excess.items()}
    print(f"\nT-Stitch on the 2-D ring (SW2 excess): large only {mean[0.0]:.4f}, 40 % small {mean[0.4]:.4f}, "
          f"small only {mean[1.0]:.4f}")
    assert mean[1.0] - mean[0.0] > 0.2  # the small model alone is clearly wrong ...
    assert mean[0.4] - mean[0.0] < 0.1 * (mean[1.0] - mean[0.0])  # ... but its first 40 % of the steps cost little


def test_a_unet_stitched_into_an_sd3_pipeline_through_an_argument_map():
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=4, norm_num_groups=4,
    ).eval()
    seen = []
    unet.register_forward_pre_hook(lambda module, args, kwargs: seen.append(sorted(kwargs)), with_kwargs=True)

    def unet_inputs(hidden_states, timestep, encoder_hidden_states, **_):
        return dict(sample=hidden_states, timestep=timestep, encoder_hidden_states=encoder_hidden_states)

    stock = pipe(**sd3_inputs()).images
    with pytest.raises(ValueError, match="small_inputs"):
        TStitch(small=unet).attach(pipe)
    stitch = TStitch(small=unet, fraction=0.5, small_inputs=unet_inputs)
    with stitch.attached(pipe):
        stitched = pipe(**sd3_inputs()).images
    assert stitch.calls == {"small": 2, "large": 2}
    assert seen == [["encoder_hidden_states", "sample", "timestep"]] * 2
    assert stitched.shape == stock.shape and (stitched != stock).any() and torch.isfinite(torch.from_numpy(stitched)).all()
