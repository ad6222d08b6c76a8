"""The oracle itself is proven here, against facts that do not use its posterior formula."""

import math

import numpy as np
import pytest
import torch
from conftest import COVARIANCES_2D, MEANS_2D, WEIGHTS_2D, make_oracle, seeded
from diffusers import (
    DDIMPipeline,
    DDIMScheduler,
    DDPMPipeline,
    DDPMScheduler,
    EDMEulerScheduler,
    FlowMatchEulerDiscreteScheduler,
)

from diffusers_ext.testing import (
    GaussianMixture,
    GaussianMixtureDenoiser,
    GaussianMixtureSamplingPipeline,
    SlicedWasserstein2,
    distance_to_reference,
    mixture_weight_error,
    probability_flow_ode_solution,
    sliced_wasserstein2_noise_floor,
)


def test_x0_prediction_equals_monte_carlo_posterior_mean(law_2d):
    """E[x0 | x] by self-normalised importance sampling from the prior: weights N(x; alpha x0_i, sigma^2 I)."""
    alpha, sigma = 0.8, 0.6
    prior = law_2d.sample(400_000, seeded(0))
    queries = torch.tensor([[0.0, 0.0], [-1.0, 0.5], [0.9, -0.8], [1.2, 1.1]], dtype=torch.float64)
    exact = law_2d.posterior_mean(queries, alpha, sigma)
    for query, expected in zip(queries, exact, strict=True):
        log_w = -((query - alpha * prior) ** 2).sum(1) / (2 * sigma**2)
        w = torch.softmax(log_w, 0)
        estimate = (w[:, None] * prior).sum(0)
        standard_error = ((w[:, None] ** 2) * (prior - estimate) ** 2).sum(0).sqrt()
        assert standard_error.max() < 0.01  # the check has power
        assert ((estimate - expected).abs() < 5 * standard_error + 1e-4).all(), (estimate, expected)


def test_epsilon_prediction_is_the_scaled_score_of_the_noisy_marginal():
    """eps_hat(x_t) = -sigma_t * grad log p_t(x_t) (Tweedie), with grad by autograd on the marginal density."""
    oracle = make_oracle(DDPMScheduler().config)
    x = torch.tensor([[0.3, -0.2], [1.5, 1.0], [-2.0, 0.7]], dtype=torch.float64, requires_grad=True)
    for t in (50, 400, 900):
        alpha, sigma = oracle.alpha_sigma(torch.tensor(t))
        (grad,) = torch.autograd.grad(oracle.law.log_prob(x, alpha, sigma).sum(), x)
        eps = oracle(x.detach().reshape(3, 2, 1, 1), t).sample.reshape(3, 2)
        torch.testing.assert_close(eps, -sigma * grad, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("prediction_type", ["sample", "v_prediction"])
def test_prediction_types_describe_the_same_denoiser(prediction_type):
    config = DDPMScheduler().config
    eps_oracle, other = make_oracle(config), make_oracle(config, prediction_type=prediction_type)
    x = torch.randn(5, 2, 1, 1, generator=seeded(3), dtype=torch.float64)
    t = torch.tensor([3, 100, 500, 800, 999])
    alpha, sigma = (v.reshape(5, 1, 1, 1) for v in eps_oracle.alpha_sigma(t))
    eps = eps_oracle(x, t).sample
    x0 = (x - sigma * eps) / alpha
    expected = x0 if prediction_type == "sample" else alpha * eps - sigma * x0
    torch.testing.assert_close(other(x, t).sample, expected)


def test_prediction_type_defaults_to_the_scheduler_config():
    assert make_oracle(DDPMScheduler(prediction_type="v_prediction").config).config.prediction_type == "v_prediction"
    assert make_oracle(FlowMatchEulerDiscreteScheduler().config).config.prediction_type == "flow_prediction"


@pytest.mark.parametrize("path", ["vp", "flow"])
def test_reference_ode_matches_the_closed_form_for_one_gaussian(path):
    """For one 1-D Gaussian N(mu, lam) the PF-ODE keeps xi = (x/alpha - mu) / sqrt(lam + (sigma/alpha)^2) fixed."""
    mu, lam = 1.5, 0.05
    scheduler = DDIMScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    config = scheduler.config if path == "vp" else FlowMatchEulerDiscreteScheduler().config
    oracle = GaussianMixtureDenoiser([[mu]], [lam], scheduler_config=config)
    noise = torch.randn(64, 1, generator=seeded(1), dtype=torch.float64)
    if path == "vp":
        alpha, sigma = (float(v) for v in oracle.alpha_sigma(torch.tensor(999)))
        xi = (noise / alpha - mu) / math.sqrt(lam + (sigma / alpha) ** 2)
    else:
        xi = noise  # at s = 1 the sample is the noise itself
    exact = mu + math.sqrt(lam) * xi
    torch.testing.assert_close(probability_flow_ode_solution(oracle, noise), exact, atol=1e-7, rtol=0)


def _sample(pipe, noise, steps):
    return pipe(batch_size=noise.shape[0], num_inference_steps=steps, latents=noise.clone()).samples


def test_ddim_with_1000_steps_reaches_the_noise_floor_and_the_reference(law_2d):
    """On the DDPM linear schedule (terminal alpha_bar 4e-5, so x_T ~ N(0, I) is right) DDIM with every training
    step samples the law; a 3-step DDIM on the same noise is far off, so the check can fail."""
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    num_samples = 2000
    noise = torch.randn(num_samples, 2, 1, 1, generator=seeded(5))
    distance = SlicedWasserstein2(law_2d.sample(16 * num_samples, seeded(6)), num_samples)
    floor = sliced_wasserstein2_noise_floor(law_2d, distance, repeats=16, seed=7)

    fine = _sample(pipe, noise, 1000)
    assert distance(fine) < floor.mean + 3 * floor.std, (distance(fine), floor)
    assert mixture_weight_error(fine, law_2d) < 0.03
    reference = probability_flow_ode_solution(pipe.unet, noise)
    assert distance_to_reference(fine, reference) < 5e-3
    assert distance(reference) < floor.mean + 3 * floor.std

    coarse = _sample(pipe, noise, 3)
    assert distance(coarse) > floor.mean + 6 * floor.std


@pytest.mark.parametrize("scheduler_class", [DDIMScheduler, FlowMatchEulerDiscreteScheduler])
def test_first_order_samplers_converge_at_order_one_to_the_reference(scheduler_class):
    """Slope of log(distance to the exact ODE endpoint) against log(steps): -1 for DDIM and flow-match Euler.
    Step counts divide 1000 so that DDIM's trailing timesteps and its prev_timestep agree."""
    scheduler = (
        DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
        if scheduler_class is DDIMScheduler
        else FlowMatchEulerDiscreteScheduler(shift=1.0)
    )
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    noise = torch.randn(256, 2, 1, 1, generator=seeded(8), dtype=torch.float64)
    reference = probability_flow_ode_solution(pipe.unet, noise)
    steps = np.array([25, 50, 100, 200])
    errors = np.array([distance_to_reference(_sample(pipe, noise, int(n)), reference) for n in steps])
    slope = np.polyfit(np.log(steps), np.log(errors), 1)[0]
    assert -1.25 < slope < -0.8, (slope, errors)


def test_runs_as_the_unet_of_stock_ddpm_and_ddim_pipelines(ddim_pipeline):
    oracle, scheduler = ddim_pipeline.unet, ddim_pipeline.scheduler
    ddim = DDIMPipeline(unet=oracle, scheduler=scheduler)
    ddim.set_progress_bar_config(disable=True)
    images = ddim(batch_size=4, num_inference_steps=10, generator=seeded(2), output_type="np").images
    assert images.shape == (4, 1, 1, 2)
    again = ddim(batch_size=4, num_inference_steps=10, generator=seeded(2), output_type="np").images
    np.testing.assert_array_equal(images, again)
    # DDIMPipeline maps x to (x / 2 + 0.5).clamp(0, 1); the same loop without it is our sampling pipeline.
    raw = ddim_pipeline(batch_size=4, num_inference_steps=10, generator=seeded(2)).samples
    np.testing.assert_allclose(images.reshape(4, 2), (raw / 2 + 0.5).clamp(0, 1).numpy(), atol=1e-6)

    ddpm = DDPMPipeline(unet=oracle, scheduler=DDPMScheduler(clip_sample=False))
    ddpm.set_progress_bar_config(disable=True)
    first = ddpm(batch_size=3, num_inference_steps=20, generator=seeded(4), output_type="np").images
    second = ddpm(batch_size=3, num_inference_steps=20, generator=seeded(4), output_type="np").images
    assert first.shape == (3, 1, 1, 2) and np.isfinite(first).all()
    np.testing.assert_array_equal(first, second)


def test_save_pretrained_round_trip(tmp_path):
    oracle = make_oracle(FlowMatchEulerDiscreteScheduler(shift=3.0).config, sample_size=1)
    oracle.save_pretrained(tmp_path)
    assert (tmp_path / "diffusion_pytorch_model.safetensors").is_file()
    loaded = GaussianMixtureDenoiser.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(oracle.config)
    x = torch.randn(6, 2, 1, 1, generator=seeded(0))
    torch.testing.assert_close(loaded(x, 700.0).sample, oracle(x, 700.0).sample, rtol=0, atol=0)


def test_pipeline_round_trip_same_seed_same_output(tmp_path, ddim_pipeline):
    expected = ddim_pipeline(batch_size=8, num_inference_steps=6, generator=seeded(1)).samples
    ddim_pipeline.save_pretrained(tmp_path)
    loaded = GaussianMixtureSamplingPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.unet) is GaussianMixtureDenoiser
    torch.testing.assert_close(loaded(batch_size=8, num_inference_steps=6, generator=seeded(1)).samples, expected)


def test_law_samples_have_the_right_moments(law_2d):
    samples, components = law_2d.sample(200_000, seeded(0), return_components=True)
    fractions = torch.bincount(components, minlength=3).double() / 200_000
    torch.testing.assert_close(fractions, torch.tensor(WEIGHTS_2D, dtype=torch.float64), atol=5e-3, rtol=0)
    for k in range(3):
        chosen = samples[components == k]
        torch.testing.assert_close(chosen.mean(0), torch.tensor(MEANS_2D[k], dtype=torch.float64), atol=0.01, rtol=0)
        torch.testing.assert_close(chosen.T.cov(), torch.tensor(COVARIANCES_2D[k], dtype=torch.float64), atol=0.01, rtol=0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"covariances": [0.1, 0.2]}, "covariances must have shape"),
        ({"weights": [0.5, 0.5]}, r"weights must have shape \(3,\)"),
        ({"weights": [0.5, 0.4, 0.3]}, "sum to 1"),
        ({"covariances": [[[1.0, 2.0], [2.0, 1.0]]] * 3}, "positive definite"),
        ({"means": [[0.0, 1.0, 2.0]] * 3}, "covariances must have shape"),
        ({"sample_size": 2}, "does not match the mixture's dimension"),
        ({"scheduler_config": EDMEulerScheduler().config}, "cannot read a noise schedule"),
        ({"prediction_type": "flow_prediction"}, "needs a flow-matching"),
        ({"prediction_type": "score"}, "prediction_type must be one of"),
    ],
)
def test_bad_configs_raise_clear_errors(kwargs, message):
    arguments = {"means": MEANS_2D, "covariances": COVARIANCES_2D, "weights": WEIGHTS_2D} | kwargs
    with pytest.raises(ValueError, match=message):
        GaussianMixtureDenoiser(**arguments)


def test_wrong_sample_shape_raises():
    with pytest.raises(ValueError, match="this oracle models 2"):
        make_oracle()(torch.zeros(1, 3, 1, 1), 10)
    with pytest.raises(ValueError, match="dimensions"):
        GaussianMixture(MEANS_2D, COVARIANCES_2D).posterior_mean(torch.zeros(4, 3), 1.0, 0.5)
