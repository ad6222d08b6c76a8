"""Faster Diffusion's prior noise injection, and the scheduler proxies it shares with the steering methods: the
injection equals a pipeline callback that adds ``alpha * z_T`` by hand, on VP and sigma-scaled schedulers; proxies
stack and detach in any order; bad settings and schedulers without a VP schedule raise."""

import pytest
import torch
from diffusers import DPMSolverMultistepScheduler, EulerDiscreteScheduler
from tiny_pipelines import sd_pipeline, stable_diffusion_inputs

from diffusers_ext import load_shipped_pipeline
from diffusers_ext.guidance import FKSteering
from diffusers_ext.guidance.rewards import jpeg_compressibility
from diffusers_ext.hooks import FasterDiffusion
from diffusers_ext.hooks.faster_diffusion import PriorNoiseInjection
from diffusers_ext.scheduler_proxy import plain_scheduler, proxies_of

EVERY_STEP = dict(key_steps=list(range(10)), reference_steps=10)  # no reuse: the injection alone changes the output


def starting_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 4, 1, 1, generator=torch.Generator().manual_seed(seed)).expand(1, 4, 8, 8).contiguous()


def injected_by_hand(pipe, alpha: float) -> torch.Tensor:
    """The paper's loop written as a stock ``callback_on_step_end``: after step i, when the next timestep is below
    500, the latents get ``alpha * z_T`` (on sigma-scaled samples, in VP units: ``x = z sqrt(1 + sigma^2)``)."""
    x_T = starting_latents()
    scheduler = pipe.scheduler
    sigma_scaled = float(scheduler.init_noise_sigma) != 1.0

    def vp_scale(index: int) -> float:
        return float((1 + scheduler.sigmas[index] ** 2) ** 0.5) if sigma_scaled else 1.0

    def inject(pipeline, i, t, callback_kwargs):
        latents = callback_kwargs["latents"]
        if i + 1 < len(scheduler.timesteps) and scheduler.timesteps[i + 1] < 500:
            # The pipeline scales the latents it is given by init_noise_sigma.
            z_T = x_T * float(scheduler.init_noise_sigma) / vp_scale(0)
            latents = latents + alpha * vp_scale(i + 1) * z_T
        return {"latents": latents}

    return pipe(**stable_diffusion_inputs(num_inference_steps=10, output_type="latent"), latents=x_T,
                callback_on_step_end=inject).images


@pytest.mark.parametrize("scheduler_class", [None, DPMSolverMultistepScheduler, EulerDiscreteScheduler],
                         ids=["ddim", "dpm-solver++", "euler-sigma-scaled"])
def test_injection_equals_the_paper_loop_written_by_hand(scheduler_class):
    pipe = sd_pipeline()
    if scheduler_class is not None:
        pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config)
    stock = pipe(**stable_diffusion_inputs(num_inference_steps=10, output_type="latent"), latents=starting_latents()).images
    reference = injected_by_hand(pipe, alpha=0.003)
    with FasterDiffusion(**EVERY_STEP).attached(pipe) as faster:
        injected = pipe(**stable_diffusion_inputs(num_inference_steps=10, output_type="latent"),
                        latents=starting_latents()).images
        assert isinstance(pipe.scheduler, PriorNoiseInjection)
    # 10 steps from t ~ 900: the steps at t < 500 follow 5 (DDIM, DPM-Solver) or 4-5 (Euler's spacing) others.
    assert faster.prior_noise.injections in (4, 5)
    torch.testing.assert_close(injected, reference, rtol=1e-5, atol=1e-6)
    assert (injected - stock).abs().max() > 1e-4  # not vacuous: the injection moves the output


def test_a_run_injects_its_own_starting_latents():
    pipe = sd_pipeline()
    with FasterDiffusion(**EVERY_STEP).attached(pipe):
        pipe(**stable_diffusion_inputs(num_inference_steps=10, output_type="latent"), latents=starting_latents(1))
        second = pipe(**stable_diffusion_inputs(num_inference_steps=10, output_type="latent"),
                      latents=starting_latents()).images
    torch.testing.assert_close(second, injected_by_hand(pipe, alpha=0.003), rtol=1e-5, atol=1e-6)


def test_default_injects_only_on_vp_schedules_and_a_number_elsewhere_raises():
    assert FasterDiffusion().config.prior_noise_injection is None
    pipe = load_shipped_pipeline("tiny-resshift-sr4")  # a UNet2DModel on ResShift's residual-shifting schedule
    with FasterDiffusion().attached(pipe) as faster:
        assert faster.prior_noise is None and not proxies_of(pipe.scheduler)
    with pytest.raises(ValueError, match="prior_noise_injection needs a scheduler with a DDPM-family"):
        FasterDiffusion(prior_noise_injection=0.003).attach(pipe)
    assert not proxies_of(pipe.scheduler) and not hasattr(pipe.unet, "_diffusers_hook")
    with FasterDiffusion(prior_noise_injection=0).attached(sd_pipeline()) as faster:
        assert faster.prior_noise is None


@pytest.mark.parametrize("settings", [
    dict(prior_noise_injection=-0.1), dict(prior_noise_injection=True), dict(prior_noise_injection="0.003"),
    dict(prior_noise_injection=float("inf")), dict(prior_noise_below=1.5), dict(prior_noise_below=None),
])
def test_bad_prior_noise_settings_raise(settings):
    with pytest.raises(ValueError, match=next(iter(settings))):
        FasterDiffusion(**settings)


@pytest.mark.parametrize("detach_steering_first", [True, False])
def test_scheduler_proxies_stack_and_detach_in_any_order(detach_steering_first):
    pipe = sd_pipeline()
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="sde-dpmsolver++")
    original, model_index = pipe.scheduler, dict(pipe.config)
    faster = FasterDiffusion(key_steps=[0, 5], reference_steps=10).attach(pipe)
    steering = FKSteering(reward=jpeg_compressibility, num_particles=2, resample_every=3).attach(pipe)
    assert [type(p).__name__ for p in proxies_of(pipe.scheduler)] == ["SteeredScheduler", "PriorNoiseInjection"]
    assert plain_scheduler(pipe.scheduler) is original
    with pytest.raises(ValueError, match="already steered"):
        FKSteering(reward=jpeg_compressibility, num_particles=2).attach(pipe)
    images = pipe(**stable_diffusion_inputs(num_inference_steps=10, num_images_per_prompt=2)).images
    assert images.shape == (2, 8, 8, 3) and faster.prior_noise.injections > 0
    first, second = (steering, faster) if detach_steering_first else (faster, steering)
    first.detach()
    assert len(proxies_of(pipe.scheduler)) == 1 and plain_scheduler(pipe.scheduler) is original
    second.detach()
    assert pipe.scheduler is original and dict(pipe.config) == model_index
