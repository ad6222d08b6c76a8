"""Region-adaptive sampling on SD3 and Flux: exact when nothing is reused, exact when what is reused is current, the
token selection of the paper, and a cheaper run that stays close to the stock one."""

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from tiny_pipelines import TEXT_DIM, flux_inputs, sd3_inputs, tiny_flux, tiny_sd3

from diffusers_ext.hooks import RegionAdaptiveSampling
from diffusers_ext.hooks.region_adaptive_sampling import kept_tokens, token_metric
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG


def sd3_pipeline():
    return tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))


# (pipeline, inputs, image size giving 16 x 16 latents, image tokens: SD3's tiny patch size is 1, Flux packs 2 x 2)
FAMILIES = {"sd3": (sd3_pipeline, sd3_inputs, 16, 256), "flux": (tiny_flux, flux_inputs, 32, 64)}


@pytest.mark.parametrize("family", FAMILIES)
def test_sample_ratio_one_is_the_stock_pipeline_bit_for_bit(family):
    make_pipe, inputs, size, _ = FAMILIES[family]
    pipe = make_pipe()
    stock = pipe(**inputs(height=size, width=size, num_inference_steps=6)).images
    ras = RegionAdaptiveSampling(sample_ratio=1.0, start_step=1, reference_steps=6, error_reset_steps=[])
    with ras.attached(pipe):
        np.testing.assert_array_equal(pipe(**inputs(height=size, width=size, num_inference_steps=6)).images, stock)
    assert ras.calls == {"full": 6, "partial": 0}


def transformer_call(pipe, family: str, seed: int = 0) -> dict:
    """One direct transformer call's arguments, as the pipeline would make it (16 x 16 latents for SD3, 64 packed
    tokens for Flux)."""
    generator = torch.Generator().manual_seed(seed)
    embeds = torch.randn(1, 4, TEXT_DIM, generator=generator)
    pooled = torch.randn(1, TEXT_DIM, generator=generator)
    if family == "sd3":
        return dict(hidden_states=torch.randn(1, 4, 16, 16, generator=generator), timestep=torch.tensor([500.0]),
                    encoder_hidden_states=embeds, pooled_projections=pooled, return_dict=False)
    image_ids = pipe._prepare_latent_image_ids(1, 8, 8, "cpu", torch.float32)
    return dict(hidden_states=torch.randn(1, 64, 16, generator=generator), timestep=torch.tensor([0.5]),
                encoder_hidden_states=embeds, pooled_projections=pooled, txt_ids=torch.zeros(4, 3),
                img_ids=image_ids, return_dict=False)


@pytest.mark.parametrize("family", FAMILIES)
def test_a_partial_step_whose_cached_tokens_are_current_gives_the_full_output(family):
    """Two calls on the same input: the second computes only half the tokens, attending to the first call's keys
    and values for the rest and returning its outputs for them, which are the current ones; so it must equal a full
    call (up to the rounding of matrix products over fewer rows)."""
    pipe = FAMILIES[family][0]()
    arguments = transformer_call(pipe, family)
    full = pipe.transformer(**arguments)[0]
    # Outside a pipeline run the clock counts calls against the scheduler's current timesteps.
    ras = RegionAdaptiveSampling(sample_ratio=0.5, start_step=1, error_reset_steps=[],
                                 reference_steps=len(pipe.scheduler.timesteps))
    with ras.attached(pipe):
        first = pipe.transformer(**arguments)[0]
        second = pipe.transformer(**arguments)[0]
    assert ras.calls == {"full": 1, "partial": 1}
    tokens = FAMILIES[family][3]
    assert ras.computed_tokens == tokens + tokens // 2
    torch.testing.assert_close(first, full, rtol=0, atol=0)
    torch.testing.assert_close(second, full, rtol=1e-5, atol=1e-5)
    # The check is not vacuous: a partial step on a new input differs from the stale output and from the full one.
    with ras.attached(pipe):
        pipe.transformer(**arguments)
        moved = pipe.transformer(**transformer_call(pipe, family, seed=1))[0]
    new_full = pipe.transformer(**transformer_call(pipe, family, seed=1))[0]
    assert (moved - new_full).abs().max() > 1e-3 and (moved - full).abs().max() > 1e-3


def test_token_metric_is_the_channel_std_averaged_over_each_tokens_pixels():
    # SD3 layout: token features (p, p, C); Flux packed layout: (C, 2, 2).
    output = torch.randn(2, 3, 2 * 2 * 5, generator=torch.Generator().manual_seed(0))
    expected = output.reshape(2, 3, 4, 5).std(dim=-1).mean(dim=(0, 2))
    torch.testing.assert_close(token_metric(output, channels_last=True, channels=5), expected)
    expected_packed = output.reshape(2, 3, 5, 4).std(dim=-2).mean(dim=(0, 2))
    torch.testing.assert_close(token_metric(output, channels_last=False, channels=5), expected_packed)


def test_kept_tokens_leave_out_both_ends_of_the_score_order_and_starving_tokens_come_back():
    metric = torch.arange(1, 11, dtype=torch.float32)  # token i scores i + 1
    kept, dropped = kept_tokens(metric, torch.zeros(10), sample_ratio=0.6, starvation_scale=1.0, high_ratio=0.25)
    # 4 left out: 3 lowest (0, 1, 2) and 1 highest (9).
    assert kept.tolist() == [3, 4, 5, 6, 7, 8] and sorted(dropped.tolist()) == [0, 1, 2, 9]
    # A token left out often gets a larger score and is computed again.
    drop_count = torch.zeros(10)
    drop_count[0] = 5.0
    kept, _ = kept_tokens(metric, drop_count, sample_ratio=0.6, starvation_scale=1.0, high_ratio=0.0)
    assert kept.tolist() == [0, 5, 6, 7, 8, 9]


@pytest.mark.parametrize("family", FAMILIES)
def test_ras_computes_fewer_tokens_and_stays_close_to_the_stock_run(family):
    make_pipe, inputs, size, tokens = FAMILIES[family]
    pipe = make_pipe()
    stock = pipe(**inputs(height=size, width=size, num_inference_steps=8, output_type="latent")).images
    ras = RegionAdaptiveSampling(sample_ratio=0.5, start_step=2, error_reset_steps=[5], reference_steps=8)
    with ras.attached(pipe):
        accelerated = pipe(**inputs(height=size, width=size, num_inference_steps=8, output_type="latent")).images
    assert ras.calls == {"full": 3, "partial": 5}
    assert ras.computed_tokens == 3 * tokens + 5 * tokens // 2
    relative = (accelerated - stock).norm() / stock.norm()
    assert 0 < relative < 0.2, relative


def test_flux_true_cfg_keeps_a_cache_per_conditional_and_unconditional_call():
    pipe = tiny_flux()
    inputs = flux_inputs(height=32, width=32, num_inference_steps=4, true_cfg_scale=2.0,
                         negative_prompt_embeds=torch.zeros(1, 4, TEXT_DIM),
                         negative_pooled_prompt_embeds=torch.zeros(1, TEXT_DIM))
    ras = RegionAdaptiveSampling(sample_ratio=0.5, start_step=1, error_reset_steps=[], reference_steps=4)
    streams = []

    def record_streams(pipe, step, timestep, tensors):
        streams.append(sorted(context for context, _ in ras.streams))
        return tensors

    with ras.attached(pipe):
        pipe(**inputs, callback_on_step_end=record_streams)
    assert streams[-1] == ["cond", "uncond"]
    assert not ras.streams  # the caches are dropped at the end of the run (maybe_free_model_hooks)
    # Each stream counts its own steps: one full call, then partial ones.
    assert ras.calls == {"full": 2, "partial": 6}
