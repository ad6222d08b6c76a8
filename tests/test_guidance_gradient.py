"""Gradient guidance: FlowChef, loss guidance (DPS) and self-guided minority guidance.

Against exact oracles: a 2-D Gaussian-mixture prior observed through one noisy coordinate, whose exact posterior is a
mixture again (``GaussianMixture.posterior_given_linear_measurement``), and a [0.9, 0.1] mixture for minority
guidance. The update equations of each docstring are replayed by hand on the oracle. On stock SD / SD3 pipelines: an
image-space inpainting loss goes down, runs are reproducible, configs round-trip, and detaching restores the pipeline
exactly. Bad losses and settings raise clear errors.
"""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler
from tiny_pipelines import sd3_inputs, stable_diffusion_inputs, tiny_sd3, tiny_stable_diffusion

from diffusers_ext.guidance.flowchef import FlowChef
from diffusers_ext.guidance.loss_guidance import LossGuidance
from diffusers_ext.guidance.minority_guidance import MinorityGuidance, euclidean_distance
from diffusers_ext.guidance.rewards import MeasurementConsistency, inpainting_operator, matrix_operator
from diffusers_ext.guidance.steering import SteeredScheduler, run_generator
from diffusers_ext.testing import (
    GaussianMixture,
    GaussianMixtureDenoiser,
    GaussianMixtureSamplingPipeline,
    SlicedWasserstein2,
    sliced_wasserstein2_noise_floor,
)

# The prior: conftest's 2-D mixture. The measurement: its first coordinate, y = x_1 + n, n ~ N(0, 0.1^2), at a value
# two components explain, so the exact posterior is bimodal in x_2 (weights 0.55 / 0.45).
MEANS = [[-1.5, 0.5], [1.0, 1.0], [0.5, -1.5]]
COVARIANCES = [[[0.20, 0.08], [0.08, 0.10]], [[0.05, -0.02], [-0.02, 0.15]], [[0.12, 0.0], [0.0, 0.04]]]
WEIGHTS = [0.5, 0.3, 0.2]
OBSERVE_FIRST = torch.tensor([[1.0, 0.0]], dtype=torch.float64)
MEASUREMENT = torch.tensor([0.7], dtype=torch.float64)
NOISE_STD = 0.1
NUM_SAMPLES = 1000
SD3_CONFIG = FlowMatchEulerDiscreteScheduler(shift=3.0).config


@pytest.fixture(autouse=True)
def one_thread():
    """The oracle's tensors are tiny: intra-op threads only contend (10-100x slower on a loaded 2-core machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def measurement_loss() -> MeasurementConsistency:
    return MeasurementConsistency(matrix_operator(OBSERVE_FIRST), MEASUREMENT[None], NOISE_STD)


def oracle_pipeline(scheduler, means=MEANS, covariances=COVARIANCES, weights=WEIGHTS):
    oracle = GaussianMixtureDenoiser(means, covariances, weights, scheduler.config).double()
    pipe = GaussianMixtureSamplingPipeline(unet=oracle, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def sample(pipe, method, steps, batch=NUM_SAMPLES, seed=0):
    latents = torch.randn(batch, *pipe.unet.sample_shape, generator=torch.Generator().manual_seed(seed),
                          dtype=torch.float64)
    kwargs = dict(batch_size=batch, num_inference_steps=steps, latents=latents,
                  generator=torch.Generator().manual_seed(seed + 1))
    if method is None:
        return pipe(**kwargs).samples
    with method.attached(pipe):
        return pipe(**kwargs).samples


@pytest.fixture(scope="module")
def posterior_benchmark():
    """The exact posterior, a large sample of it, the sliced-W2 distance to it, its noise floor and the naive
    baseline: exact prior samples, which ignore the measurement."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # module fixtures are set up before the per-test thread setting
    prior = GaussianMixture(MEANS, COVARIANCES, WEIGHTS)
    posterior = prior.posterior_given_linear_measurement(OBSERVE_FIRST, MEASUREMENT, NOISE_STD)
    distance = SlicedWasserstein2(posterior.sample(50_000, torch.Generator().manual_seed(1)), NUM_SAMPLES)
    floor = sliced_wasserstein2_noise_floor(posterior, distance)
    baseline = distance(prior.sample(NUM_SAMPLES, torch.Generator().manual_seed(2)))
    torch.set_num_threads(threads)
    print(f"\nexact posterior: means {posterior.means.tolist()}, weights {[round(w, 3) for w in posterior.weights.tolist()]}")
    print(f"sliced W2 to it ({NUM_SAMPLES} samples): noise floor {floor.mean:.3f} +- {floor.std:.3f}, "
          f"prior samples (baseline) {baseline:.3f}")
    return posterior, distance, floor, baseline


def describe(samples: torch.Tensor) -> str:
    """How the measured coordinate and the two posterior modes came out."""
    x = samples.reshape(samples.shape[0], -1)
    return f"x1 {x[:, 0].mean():.3f} +- {x[:, 0].std():.3f}, P(x2 > 0) {(x[:, 1] > 0).double().mean():.3f}"


# The exact posterior of a linear Gaussian measurement ----------------------------------------------------------------


@pytest.mark.parametrize(
    "matrix, measurement, noise_std",
    [([[1.0, 0.5]], [0.4], 0.3), ([[1.0, 0.0], [0.0, 1.0]], [0.6, -0.2], 0.5)],
)
def test_posterior_given_linear_measurement_matches_importance_sampling(law_2d, matrix, measurement, noise_std):
    posterior = law_2d.posterior_given_linear_measurement(matrix, measurement, noise_std)
    draws, components = law_2d.sample(400_000, torch.Generator().manual_seed(0), return_components=True)
    residual = draws @ torch.tensor(matrix, dtype=torch.float64).T - torch.tensor(measurement, dtype=torch.float64)
    weights = torch.softmax(-0.5 * (residual**2).sum(-1) / noise_std**2, 0)
    assert 1 / (weights**2).sum() > 20_000  # effective sample size of the check
    mean = weights @ draws
    covariance = (weights[:, None] * (draws - mean)).T @ (draws - mean)
    component_weights = torch.zeros(3, dtype=torch.float64).index_add_(0, components, weights)
    exact = posterior.sample(400_000, torch.Generator().manual_seed(1))
    torch.testing.assert_close(exact.mean(0), mean, atol=0.015, rtol=0)
    torch.testing.assert_close(torch.cov(exact.T), covariance, atol=0.015, rtol=0)
    torch.testing.assert_close(posterior.weights, component_weights, atol=0.01, rtol=0)
    assert not torch.allclose(posterior.weights, law_2d.weights, atol=0.05)  # the measurement did reweight


def test_posterior_given_linear_measurement_rejects_bad_inputs(law_2d):
    with pytest.raises(ValueError, match="M x 2 matrix"):
        law_2d.posterior_given_linear_measurement([[1.0, 0.0, 0.0]], [0.0], 0.1)
    with pytest.raises(ValueError, match="one vector of 1 values"):
        law_2d.posterior_given_linear_measurement([[1.0, 0.0]], [[0.0], [1.0]], 0.1)
    with pytest.raises(ValueError, match="noise_std must be positive"):
        law_2d.posterior_given_linear_measurement([[1.0, 0.0]], [0.0], 0.0)


# Exact oracles --------------------------------------------------------------------------------------------------------


def test_flowchef_moves_flow_samples_toward_the_exact_posterior(posterior_benchmark):
    """The authors' pixel-space runs (100 Euler steps, ``gradient_scale`` 500 on a per-element mean-squared loss over
    3 x 64 x 64 values, every step but the last) remove ``2 * 500 / 12288 = 8%`` of the measurement residual per
    step; with our loss ``||A x - y||^2 / (2 noise_std^2)`` that is ``step_size = 0.081 noise_std^2``."""
    posterior, distance, floor, baseline = posterior_benchmark
    fraction = 2 * 500 / (3 * 64 * 64)
    steering = FlowChef(loss=measurement_loss().loss, step_size=fraction * NOISE_STD**2, guidance_end=0.99,
                        reward_space="sample")
    pipe = oracle_pipeline(FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG))
    steered = sample(pipe, steering, 100)
    unsteered = sample(pipe, None, 100)
    result = distance(steered)
    print(f"\nFlowChef, 100 Euler steps, step_size {fraction:.3f} noise_std^2: sliced W2 {result:.3f} "
          f"(baseline {baseline:.3f}, unsteered sampler {distance(unsteered):.3f}, floor {floor.mean:.3f})")
    print(f"  steered   {describe(steered)}\n  posterior {describe(posterior.sample(100_000, torch.Generator().manual_seed(3)))}")
    assert result < 0.7 * baseline
    measured = measurement_loss().loss
    assert measured(steered).mean() < 0.1 * measured(unsteered).mean()


def test_flowchef_step_is_the_documented_update_and_calls_the_model_no_more_often():
    """``x_t <- x_t - s grad L(x_t - sigma_t v)`` N times with ``v`` fixed, then the Euler step with the same ``v``."""
    loss = measurement_loss().loss
    pipe = oracle_pipeline(FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    steering = FlowChef(loss=loss, step_size=0.004, num_iterations=2, guidance_start=0.2, guidance_end=0.8,
                        reward_space="sample")
    steered = sample(pipe, steering, 5, batch=16)
    assert len(calls) == 5

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    scheduler.set_timesteps(5)
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, (sigma, sigma_next) in enumerate(zip(scheduler.sigmas[:-1], scheduler.sigmas[1:], strict=True)):
        sigma, sigma_next = sigma.double(), sigma_next.double()
        velocity = pipe.unet(x, sigma * 1000).sample
        if 0.2 <= i / 5 < 0.8:
            for _ in range(2):
                residual = (x - sigma * velocity).reshape(16, 2) @ OBSERVE_FIRST.T - MEASUREMENT
                x = x - 0.004 * (residual @ OBSERVE_FIRST / NOISE_STD**2).reshape(x.shape)  # A^T r / noise_std^2
        x = x + (sigma_next - sigma) * velocity
    torch.testing.assert_close(steered, x.reshape(16, 2), rtol=1e-5, atol=1e-6)


def test_dps_loss_guidance_at_its_default_scale_moves_samples_toward_the_exact_posterior(posterior_benchmark):
    """DPS with no setting but the loss, on VP (ancestral DDPM, deterministic DDIM) and flow samplers at different
    step counts. The old default (a per-step ``zeta / sqrt(L)`` with zeta 1, i.e. zeta_DPS 14 here) moved samples away
    from the posterior; ``scale`` is now the guidance over the run and the step DPS's fixed length in x0 space."""
    _, distance, floor, baseline = posterior_benchmark
    loss = measurement_loss().loss
    for name, scheduler, steps in [("DDPM", DDPMScheduler(clip_sample=False), 100),
                                   ("DDIM", DDIMScheduler(clip_sample=False), 50),
                                   ("flow Euler", FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG), 100)]:
        pipe = oracle_pipeline(scheduler)
        steered = distance(sample(pipe, LossGuidance(loss=loss, reward_space="sample"), steps))
        unsteered = distance(sample(pipe, None, steps))
        print(f"\nDPS at its default scale, {name} {steps} steps: sliced W2 {unsteered:.3f} -> {steered:.3f} (prior "
              f"baseline {baseline:.3f}, floor {floor.mean:.3f})")
        assert steered < 0.5 * unsteered


def test_every_panel_of_the_steering_demo_moves_samples_toward_its_target():
    """``make demo`` showed DPS moving samples away from the exact posterior (sliced W2 1.05 -> 1.46)."""
    from diffusers_ext.guidance.demo import fk_panel, inverse_problem_panels

    for panel in [fk_panel(400, num_particles=8), *inverse_problem_panels(400)]:
        print(f"\n{panel.title}: sliced W2 to the target {panel.distance_unsteered:.3f} -> {panel.distance_steered:.3f}")
        assert panel.distance_steered < 0.6 * panel.distance_unsteered


def test_dps_step_is_the_dps_codes_step_whatever_the_losss_constants():
    """For ``L = ||A x - y||^2 / (2 s^2)`` with orthonormal rows, ``(zeta / N) grad_{x_t} L / ||grad_{x0_hat} L||`` is
    DPS's ``zeta_DPS grad_{x_t} ||y - A x0_hat||`` with ``zeta_DPS = zeta / N``, for any ``s`` and any added
    constant: the samples agree to float64 rounding."""
    pipe = oracle_pipeline(DDPMScheduler(clip_sample=False))
    guided = [sample(pipe, LossGuidance(loss=loss, scale=3.0, reward_space="sample"), 20, batch=64)
              for loss in (measurement_loss().loss,
                           lambda x: 7 * MeasurementConsistency(matrix_operator(OBSERVE_FIRST), MEASUREMENT[None],
                                                                0.3).loss(x) - 5)]
    torch.testing.assert_close(guided[0], guided[1], rtol=0, atol=1e-9)

    def dps_residual_norm(x):
        return (x.reshape(x.shape[0], -1) @ OBSERVE_FIRST.T - MEASUREMENT).norm(dim=1)

    class DPSCode(LossGuidance):
        """The DPS code's update, written out: ``x_{t-1} = x_{t-1}' - zeta_DPS grad_{x_t} ||y - A x0_hat||``."""

        def after_step(self, step, prev_sample):
            with torch.enable_grad():
                current = step.sample.detach().requires_grad_(True)
                x0 = step.x0_and_eps(self.denoise(current, step.timestep, step), current)[0]
                gradient = torch.autograd.grad(dps_residual_norm(x0).sum(), current)[0]
            return prev_sample - 3.0 / 20 * gradient

    torch.testing.assert_close(guided[0], sample(pipe, DPSCode(loss=dps_residual_norm, reward_space="sample"), 20,
                                                 batch=64), rtol=0, atol=1e-9)


def test_loss_guidance_step_is_the_documented_update():
    """``x_{t-1} = step(x_t) - (zeta / N) grad_{x_t} L(x0_hat(x_t)) / ||grad_{x0_hat} L||``, the gradient through the
    oracle; for this loss ``grad_{x0} L = A^T r / s^2``."""
    loss = measurement_loss().loss
    pipe = oracle_pipeline(FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(1))
    guided = sample(pipe, LossGuidance(loss=loss, scale=0.05, guidance_end=0.6, reward_space="sample"), 5, batch=16)
    assert len(calls) == 5 + 3  # one extra model call per guided step

    scheduler = FlowMatchEulerDiscreteScheduler.from_config(SD3_CONFIG)
    scheduler.set_timesteps(5)
    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    for i, (sigma, sigma_next) in enumerate(zip(scheduler.sigmas[:-1], scheduler.sigmas[1:], strict=True)):
        sigma, sigma_next = sigma.double(), sigma_next.double()
        with torch.enable_grad():
            current = x.detach().requires_grad_(True)
            velocity = pipe.unet(current, sigma * 1000).sample
            x0 = current - sigma * velocity
            gradient = torch.autograd.grad(loss(x0).sum(), current)[0]
            residual = (x0.detach().reshape(16, 2) @ OBSERVE_FIRST.T - MEASUREMENT)[:, 0]
        x = (x + (sigma_next - sigma) * velocity).detach()
        if i / 5 < 0.6:
            x = x - (0.05 / 5 / (residual.abs() / NOISE_STD**2)).reshape(-1, 1, 1, 1) * gradient
    torch.testing.assert_close(guided, x.reshape(16, 2), rtol=1e-5, atol=1e-6)  # losses are checked in float32


MINORITY_MEANS, MINORITY_VARIANCES, MINORITY_WEIGHTS = [[-1.0, 0.0], [1.0, 0.0]], [0.25, 0.25], [0.9, 0.1]


def test_minority_guidance_raises_the_share_of_the_minority_component():
    """The paper's sampler: 250 ancestral steps of a cosine schedule, guidance every 5th step, perturbation to
    0.8 T, one Monte-Carlo draw, variance-scaled normalised gradient; scales 0.4 (the README's CelebA value) and 1.0
    (the code's default). The minority component holds 10% of the law."""
    law = GaussianMixture(MINORITY_MEANS, MINORITY_VARIANCES, MINORITY_WEIGHTS)
    pipe = oracle_pipeline(DDPMScheduler(beta_schedule="squaredcos_cap_v2", clip_sample=False),
                           MINORITY_MEANS, MINORITY_VARIANCES, MINORITY_WEIGHTS)
    exact = law.sample(400_000, torch.Generator().manual_seed(0))
    exact_share = float((law.responsibilities(exact).argmax(1) == 1).double().mean())  # 0.0975: the clusters overlap
    shares, log_densities = {}, {}
    for scale in (0.0, 0.4, 1.0):
        samples = sample(pipe, MinorityGuidance(scale=scale) if scale else None, 250, batch=4000)
        shares[scale] = float((law.responsibilities(samples).argmax(1) == 1).double().mean())
        log_densities[scale] = float(law.log_prob(samples).mean())
    print(f"\nminority guidance, share of the 10% component (exact law {exact_share:.4f}) / mean log-density:",
          {scale: (round(shares[scale], 4), round(log_densities[scale], 3)) for scale in shares})
    assert abs(shares[0.0] - exact_share) < 0.015  # the unguided sampler reproduces the law
    assert shares[0.4] > shares[0.0] and shares[1.0] > shares[0.0] + 0.025
    assert log_densities[1.0] < log_densities[0.4] < log_densities[0.0]  # toward lower density


def test_minority_guidance_step_is_the_documented_update():
    """DDIM (deterministic) plus ``w c_t g / max|g|`` with ``g = grad ||x0_hat(x_t) - sg[x0_hat(x_s)]||``,
    ``x_s = alpha_s x0_hat + sigma_s eps`` (eps from the method's seeded generator), ``c_t`` the ancestral variance."""
    scheduler = DDIMScheduler(clip_sample=False, timestep_spacing="trailing")
    pipe = oracle_pipeline(scheduler, MINORITY_MEANS, MINORITY_VARIANCES, MINORITY_WEIGHTS)
    guided = sample(pipe, MinorityGuidance(scale=0.5, interval=2, seed=3), 6, batch=16)

    oracle, reference = pipe.unet, DDIMScheduler.from_config(scheduler.config)
    reference.set_timesteps(6)
    timesteps = reference.timesteps

    def x0_of(x, t):
        alpha, sigma = oracle.alpha_sigma(torch.as_tensor(t))
        return (x - sigma * oracle(x, t).sample) / alpha, alpha, sigma

    x = torch.randn(16, 2, 1, 1, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    generator = run_generator(3, x)
    for i, t in enumerate(timesteps):
        with torch.enable_grad():
            current = x.detach().requires_grad_(True)
            x0, alpha, sigma = x0_of(current, t)
            alpha_s, sigma_s = oracle.alpha_sigma(torch.tensor(800.0))
            noise = torch.randn(x.shape, generator=generator, dtype=torch.float32).double() if i % 2 == 0 else None
            if noise is not None:
                reconstruction = x0_of(alpha_s * x0.detach() + sigma_s * noise, 800.0)[0].detach()
                gradient = torch.autograd.grad(euclidean_distance(x0, reconstruction).sum(), current)[0]
        x_next = reference.step(oracle(x, t).sample, t, x).prev_sample
        if noise is not None:
            alpha_next, sigma_next = (oracle.alpha_sigma(timesteps[i + 1]) if i + 1 < len(timesteps)
                                      else (torch.tensor(1.0), torch.tensor(0.0)))
            variance = sigma_next**2 * (1 - ((sigma_next * alpha) / (alpha_next * sigma)) ** 2)
            peak = gradient.reshape(16, -1).abs().amax(1).reshape(-1, 1, 1, 1)
            x_next = x_next + 0.5 * variance * gradient / peak
        x = x_next
    torch.testing.assert_close(guided, x.reshape(16, 2), rtol=1e-6, atol=1e-8)
    assert not torch.allclose(guided, sample(pipe, None, 6, batch=16), atol=1e-3)


# Stock pipelines ------------------------------------------------------------------------------------------------------

MASK = torch.zeros(1, 1, 8, 8)
MASK[..., :4] = 1.0
TARGET = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(7))
INPAINTING = MeasurementConsistency(inpainting_operator(MASK), TARGET * MASK, noise_std=0.1)


def image_loss(images: np.ndarray) -> torch.Tensor:
    return INPAINTING.loss(torch.from_numpy(images).permute(0, 3, 1, 2))


def stock_pipeline(kind: str):
    if kind == "sd":
        pipe = tiny_stable_diffusion(DDIMScheduler(clip_sample=False, set_alpha_to_one=False, steps_offset=1))
        return pipe, lambda **kw: stable_diffusion_inputs(num_images_per_prompt=2, **kw)
    return tiny_sd3(FlowMatchEulerDiscreteScheduler(shift=3.0)), lambda **kw: sd3_inputs(batch_size=2, **kw)


def check_steering_contract(method, kind: str, tmp_path, lowers_loss: bool):
    """Steered output differs (and, for a loss, has a lower one per image); same seed, same output; config round trip;
    detaching gives the unsteered output again and the pipeline's config is untouched."""
    pipe, inputs = stock_pipeline(kind)
    config, scheduler = dict(pipe.config), pipe.scheduler
    unsteered = pipe(**inputs()).images
    with method.attached(pipe):
        assert isinstance(pipe.scheduler, SteeredScheduler)
        steered = pipe(**inputs()).images
        again = pipe(**inputs()).images
    assert np.isfinite(steered).all() and np.abs(steered - unsteered).max() > 1e-3
    np.testing.assert_array_equal(steered, again)
    if lowers_loss:
        before, after = image_loss(unsteered), image_loss(steered)
        print(f"\n{type(method).__name__} on {kind}: inpainting loss {before.tolist()} -> {after.tolist()}")
        assert (after < 0.9 * before).all()
    assert pipe.scheduler is scheduler and dict(pipe.config) == config
    np.testing.assert_array_equal(pipe(**inputs()).images, unsteered)

    method.save_pretrained(tmp_path)
    callables = {name: getattr(method, name) for name in type(method).ignore_for_config}
    loaded = type(method).from_pretrained(tmp_path, **callables)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(method.config)
    with loaded.attached(pipe):
        np.testing.assert_array_equal(pipe(**inputs()).images, steered)


@pytest.mark.parametrize("optimizer, step_size", [("gradient_descent", 0.01), ("adam", 0.05)])
def test_flowchef_on_sd3_inpaints_through_the_vae(tmp_path, optimizer, step_size):
    steering = FlowChef(loss=INPAINTING.loss, step_size=step_size, num_iterations=2, optimizer=optimizer)
    check_steering_contract(steering, "sd3", tmp_path, lowers_loss=True)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_loss_guidance_on_stock_pipelines(tmp_path, kind):
    check_steering_contract(LossGuidance(loss=INPAINTING.loss, scale=10.0), kind, tmp_path, lowers_loss=True)


@pytest.mark.parametrize("kind", ["sd", "sd3"])
def test_minority_guidance_on_stock_pipelines(tmp_path, kind):
    guidance = MinorityGuidance(scale=10.0, interval=2, num_mc_samples=2, seed=5)
    check_steering_contract(guidance, kind, tmp_path, lowers_loss=False)
    assert guidance.last_scores.shape == (2,) and torch.isfinite(guidance.last_scores).all()


def test_minority_guidance_with_an_image_distance():
    pipe, inputs = stock_pipeline("sd")
    unsteered = pipe(**inputs()).images
    calls = []

    def image_distance(x0, reconstruction):
        calls.append((x0.shape, float(x0.detach().min()), float(x0.detach().max())))
        return (x0 - reconstruction).pow(2).mean(dim=(1, 2, 3))

    with MinorityGuidance(distance=image_distance, scale=10.0, interval=1, reward_space="image").attached(pipe):
        steered = pipe(**inputs()).images
    assert calls and all(shape == (2, 3, 8, 8) and 0 <= low <= high <= 1 for shape, low, high in calls)
    assert np.abs(steered - unsteered).max() > 1e-3


# Bad inputs -----------------------------------------------------------------------------------------------------------

BAD_LOSSES = [
    (lambda x: torch.zeros(x.shape[0] + 1), "one value per sample"),
    (lambda x: torch.full((x.shape[0],), float("nan")), "non-finite"),
    (lambda x: [0.0] * x.shape[0], "torch.Tensor"),
    (lambda x: x.detach().reshape(x.shape[0], -1).sum(1), "not differentiable"),
]


@pytest.mark.parametrize("loss, message", BAD_LOSSES)
@pytest.mark.parametrize("method", ["FlowChef", "LossGuidance", "MinorityGuidance"])
def test_bad_losses_give_clear_errors(method, loss, message):
    if method == "FlowChef":
        steering, scheduler = FlowChef(loss=loss, reward_space="sample"), FlowMatchEulerDiscreteScheduler(shift=3.0)
    elif method == "LossGuidance":
        steering, scheduler = LossGuidance(loss=loss, reward_space="sample"), DDIMScheduler(clip_sample=False)
    else:
        steering = MinorityGuidance(distance=lambda x0, reconstruction: loss(x0), interval=1)
        scheduler = DDIMScheduler(clip_sample=False)
    pipe = oracle_pipeline(scheduler)
    with steering.attached(pipe), pytest.raises(ValueError, match=message):
        pipe(batch_size=4, num_inference_steps=3)
    assert not isinstance(pipe.scheduler, SteeredScheduler)


@pytest.mark.parametrize(
    "cls, kwargs, message",
    [
        (FlowChef, dict(step_size=-0.1), "step_size must be a non-negative"),
        (FlowChef, dict(num_iterations=0), "num_iterations"),
        (FlowChef, dict(optimizer="sgd"), "optimizer"),
        (FlowChef, dict(guidance_start=0.5, guidance_end=0.5), "guidance_start < guidance_end"),
        (FlowChef, dict(loss=None), "needs a loss"),
        (FlowChef, dict(reward_space="latent"), "reward_space"),
        (LossGuidance, dict(scale=-1.0), "scale must be a non-negative"),
        (LossGuidance, dict(normalize="yes"), "normalize"),
        (LossGuidance, dict(guidance_end=1.5), "guidance_end"),
        (LossGuidance, dict(loss="mse"), "needs a loss"),
        (MinorityGuidance, dict(scale=-0.4), "scale must be a non-negative"),
        (MinorityGuidance, dict(perturbation_strength=0.0), "perturbation_strength"),
        (MinorityGuidance, dict(num_mc_samples=0), "num_mc_samples"),
        (MinorityGuidance, dict(interval=0), "interval"),
        (MinorityGuidance, dict(scale_type="constant"), "scale_type"),
        (MinorityGuidance, dict(distance="lpips"), "distance must be a callable"),
    ],
)
def test_bad_settings_give_clear_errors(cls, kwargs, message):
    defaults = {} if cls is MinorityGuidance else {"loss": measurement_loss().loss}
    with pytest.raises(ValueError, match=message):
        cls(**(defaults | kwargs))


def test_flowchef_refuses_vp_pipelines():
    pipe = oracle_pipeline(DDIMScheduler(clip_sample=False))
    with pytest.raises(ValueError, match=r"supports \('flow',\) pipelines.*'vp' pipeline"):
        FlowChef(loss=measurement_loss().loss).attach(pipe)
    assert not isinstance(pipe.scheduler, SteeredScheduler)
