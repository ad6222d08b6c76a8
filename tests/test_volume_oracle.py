"""The volume oracle (``diffusers_ext.testing.volume_oracle``) and DiffusionMBIR against it.

A volume whose slices are i.i.d. draws of a Gaussian mixture over 2 x 2 pixels, measured slice by slice by a mask that
sees two of the four pixels, has an exact posterior per slice. Every slice gets the same measurement, so the 1000
slices of one reconstruction are 1000 draws from one exact posterior. With ``lambda_tv = 0`` DiffusionMBIR is the
2D prior with a data-consistency step after every diffusion step; its known bias: it treats the measurement as exact
(``A v = y`` after every step, while the posterior keeps noise of ``noise_std`` in the measured pixels) and it forces
the measured pixels of the *noisy* state to their clean values, which the denoiser reads as a noisy observation.
"""

import pytest
import torch
from diffusers import DDPMScheduler

from diffusers_ext.pipelines.three_d.pipeline_diffusion_mbir import DiffusionMBIRPipeline
from diffusers_ext.pipelines.three_d.volume_operators import (
    ParallelBeamProjection,
    ThroughPlaneDownsampling,
    VolumeMask,
)
from diffusers_ext.testing import SlicedWasserstein2, mixture_weight_error, sliced_wasserstein2_noise_floor
from diffusers_ext.testing.volume_oracle import SliceMixtureVolumeLaw, slice_operator_matrix

# Two components over the pixels (0,0), (0,1), (1,0), (1,1) of a slice, in data units, each correlated across pixels.
MEANS = [[0.3, 0.3, 0.4, 0.4], [0.6, 0.5, 0.7, 0.6]]
COVARIANCE = [[0.010, 0.006, 0.005, 0.003], [0.006, 0.010, 0.003, 0.005],
              [0.005, 0.003, 0.010, 0.006], [0.003, 0.005, 0.006, 0.010]]
WEIGHTS = [0.6, 0.4]
SLICE_SHAPE = (2, 2)
MEASURED_PIXELS = torch.tensor([[1.0, 1.0], [0.0, 0.0]])  # the first row of each slice
SLICE_MEASUREMENT = torch.tensor([[0.45, 0.42], [0.0, 0.0]], dtype=torch.float64)  # between the two components
NOISE_STD = 0.02
DEPTH = 1000


@pytest.fixture
def law() -> SliceMixtureVolumeLaw:
    return SliceMixtureVolumeLaw(MEANS, [COVARIANCE, COVARIANCE], WEIGHTS, SLICE_SHAPE)


def test_slice_operator_matrix_reads_the_operator_slice_by_slice():
    mask = VolumeMask(MEASURED_PIXELS.expand(3, 2, 2))
    torch.testing.assert_close(slice_operator_matrix(mask, (3, 2, 2), 1), torch.diag(MEASURED_PIXELS.reshape(-1)).double())
    projection = ParallelBeamProjection([0.0, 1.0], size=4)
    matrix = slice_operator_matrix(projection, (2, 4, 4))
    slice_ = torch.rand(4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    volume = torch.stack([slice_, torch.zeros_like(slice_)])
    torch.testing.assert_close(matrix @ slice_.reshape(-1), projection.forward(volume)[0].reshape(-1))
    with pytest.raises(ValueError, match="does not act slice by slice"):
        slice_operator_matrix(ThroughPlaneDownsampling(2), (4, 2, 2), 1)


def test_the_denoiser_is_the_exact_posterior_mean_in_model_space(law):
    """``x = 2 v - 1``: ``x_t = alpha x + sigma e`` is ``(x_t + alpha) / 2 = alpha v + (sigma / 2) e``, so
    ``E[x | x_t] = 2 E[v | alpha v + (sigma / 2) e = (x_t + alpha) / 2] - 1``."""
    scheduler = DDPMScheduler()
    denoiser = law.denoiser(scheduler.config, prediction_type="sample").double()
    noisy = torch.randn(64, 1, 2, 2, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for timestep in (50, 400, 900):
        alpha = scheduler.alphas_cumprod[timestep].double().sqrt()
        sigma = (1 - scheduler.alphas_cumprod[timestep].double()).sqrt()
        expected = 2 * law.slice_law.posterior_mean((noisy.reshape(64, 4) + alpha) / 2, alpha, sigma / 2) - 1
        torch.testing.assert_close(denoiser(noisy, timestep).sample.reshape(64, 4), expected, rtol=1e-9, atol=1e-9)


@pytest.mark.effect
def test_slice_wise_diffusion_mbir_samples_the_exact_posterior_up_to_its_bias(law):
    """``lambda_tv = 0``, ancestral DDPM, 100 steps, one CG iteration per step (an exact projection for a mask)."""
    scheduler = DDPMScheduler(clip_sample=False)
    pipe = DiffusionMBIRPipeline(unet=law.denoiser(scheduler.config).double(), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    volume_shape = (DEPTH, *SLICE_SHAPE)
    operator = VolumeMask(MEASURED_PIXELS.expand(volume_shape))
    measurement = SLICE_MEASUREMENT.expand(volume_shape).clone()
    posterior = law.slice_posterior(slice_operator_matrix(operator, volume_shape), SLICE_MEASUREMENT, NOISE_STD)

    volume = pipe(measurement, operator, volume_shape, num_inference_steps=100, lambda_tv=0.0,
                  slice_batch_size=DEPTH, generator=torch.Generator().manual_seed(0), output_type="pt").volume
    samples = volume.reshape(DEPTH, 4)
    exact = posterior.sample(20_000, torch.Generator().manual_seed(1))
    distance = SlicedWasserstein2(exact, DEPTH, num_projections=64)
    floor = sliced_wasserstein2_noise_floor(posterior, distance)
    prior_baseline = distance(law.slice_law.sample(DEPTH, torch.Generator().manual_seed(2)))
    result = distance(samples)
    print(f"\nexact posterior weights {[round(w, 3) for w in posterior.weights.tolist()]}; sliced W2 to it: "
          f"DiffusionMBIR (lambda_tv 0) {result:.4f}, noise floor {floor.mean:.4f} +- {floor.std:.4f}, "
          f"prior samples {prior_baseline:.4f}; component weights off by {mixture_weight_error(samples, posterior):.3f} "
          "(total variation)")
    print(f"unmeasured pixels: mean {samples[:, 2:].mean(0).tolist()} (exact {exact[:, 2:].mean(0).tolist()}), "
          f"std {samples[:, 2:].std(0).tolist()} (exact {exact[:, 2:].std(0).tolist()})")
    # Measured pixels: the method sets them to y exactly; the posterior spreads them by about noise_std.
    torch.testing.assert_close(samples[:, :2], SLICE_MEASUREMENT[0].expand(DEPTH, 2), atol=1e-6, rtol=0)
    assert result < 0.35 * prior_baseline
    torch.testing.assert_close(samples[:, 2:].mean(0), exact[:, 2:].mean(0), atol=0.02, rtol=0)
