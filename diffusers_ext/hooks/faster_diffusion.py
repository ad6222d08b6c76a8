"""Faster Diffusion: UNet encoder propagation."""

from __future__ import annotations

import dataclasses
from typing import Any

import torch
from diffusers import UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config

from ..diffusion_math import noise_path_from_scheduler_config
from ..guidance.steering import check_positive_int
from ..scheduler_proxy import (
    SchedulerProxy,
    install_scheduler_proxy,
    plain_scheduler,
    remove_scheduler_proxy,
    with_prev_sample,
)
from .base import (
    CallbackHook,
    ClockReading,
    DenoisingClock,
    SpeedHook,
    check_denoiser_type,
    check_fraction,
    check_step_indices,
    pipeline_denoiser,
    scaled_step_indices,
)
from .module_reuse import ModuleReuse, denoiser_sample, stored_copy, stream_key

# The paper's key steps for 50-step DDIM on Stable Diffusion (the official code's default "50ls" schedule).
PAPER_KEY_STEPS = (0, 1, 2, 3, 5, 10, 15, 25, 35)
# The paper's prior noise injection: alpha = 0.003, at timesteps below half the training schedule (t / 1000 < 0.5).
PAPER_PRIOR_NOISE = 0.003


def unet_encoder_modules(unet: torch.nn.Module) -> list[str]:
    """The UNet's encoder: ``conv_in``, every down block and the mid block."""
    names = ["conv_in", *(f"down_blocks.{i}" for i in range(len(unet.down_blocks)))]
    return [*names, "mid_block"] if getattr(unet, "mid_block", None) is not None else names


class FasterDiffusion(SpeedHook):
    r"""Faster Diffusion's encoder propagation for UNet pipelines (SD 1.x / 2.x, SDXL, their img2img, inpainting and
    ControlNet pipelines; also ``UNet2DModel`` pipelines).

    Paper: *Faster Diffusion: Rethinking the Role of the Encoder for Diffusion Model Inference*, Li et al.,
    arXiv 2312.09608.

    The UNet's encoder features change little between adjacent steps. At *key* steps the whole UNet runs and the
    encoder's outputs (``conv_in``, every down block with its skip features, the mid block) are stored; at the other
    steps only the decoder runs, on the stored encoder features and the current time embedding:

        key step t_k:      E_k = encoder(x_{t_k}, t_k, c),  eps = decoder(E_k, t_k, c)
        non-key step t:    eps = decoder(E_k, t, c)          (E_k of the latest key step)

    ControlNet residuals are added to the stored features as the UNet adds them, so they follow the current
    ControlNet call; with ``reuse_controlnet`` the ControlNet itself runs only at key steps too and its outputs are
    reused like the encoder's (the paper propagates ControlNet features the same way), as long as the
    conditioning scale it is called with stays the same.

    Key steps are step indices of a run of ``reference_steps`` denoiser calls; runs of another length use the same
    fractions of the run, ``round(k * num_steps / reference_steps)``. The default is the paper's schedule for 50 DDIM
    steps, dense at the start where features change fastest.

    Prior noise injection (the paper's remedy for the texture detail encoder propagation loses): the run's starting
    latents ``z_T`` are added back, scaled by ``alpha``, before every step whose timestep is below
    ``tau = prior_noise_below * num_train_timesteps``:

        z_t <- z_t + alpha * z_T      if t < tau          (alpha = 0.003, tau = 500 of 1000 in the paper)

    It is applied by wrapping the pipeline's scheduler (``diffusers_ext.scheduler_proxy``): after a step, to the
    sample the next step starts from. Schedulers on sigma-scaled samples (Euler, Heun, ...; ``x = z sqrt(1 +
    sigma^2)``) get the same VP-space addition, ``x_t <- x_t + alpha sqrt(1 + sigma_t^2) / sqrt(1 + sigma_T^2) x_T``.
    It needs a DDPM-family (VP) schedule; ``prior_noise_injection=None`` (the default) injects the paper's ``alpha``
    where the scheduler has one and nothing elsewhere (ResShift, flow matching). A run that starts below ``tau``
    (img2img at low ``strength``) injects from its second step on.

    Parallel decoding (``parallel_decoding=True``, off by default as in the official code, where it is a separate
    pipeline): a non-key step's output depends on its timestep only (the sample enters the UNet through the encoder
    alone), so right after a key step the decoders of all the non-key steps up to the next key step run as one
    batch, with the scheduler's timesteps for those steps; each of those steps then returns its precomputed output.
    It trades memory (a batch as many times larger as there are non-key steps in a row) for fewer, larger calls: a
    GPU-throughput device that saves no FLOPs. A step called with another timestep or other conditioning than the
    batch was computed for (a steering method calling the UNet again, a callback changing the prompt) runs its own
    decoder instead.

    With every step a key step and ``prior_noise_injection=0`` the output is the stock output, bit for bit.

    Args:
        key_steps: call indices at which the encoder runs (the first call of a run always does).
        reference_steps: the run length ``key_steps`` are written for.
        reuse_controlnet: also run a pipeline's ``controlnet`` only at key steps.
        prior_noise_injection: ``alpha``; ``None`` for the paper's 0.003 on VP schedules (off elsewhere), ``0`` off.
            A number on a pipeline whose scheduler has no VP schedule raises at ``attach``.
        prior_noise_below: ``tau`` as a fraction of the scheduler's ``num_train_timesteps``.
        parallel_decoding: batch the decoders of the non-key steps that follow each key step (needs
            ``reuse_controlnet`` on ControlNet pipelines: the ControlNet's residuals must be the key step's).
    """

    supported_denoisers = (UNet2DConditionModel, UNet2DModel)

    @register_to_config
    def __init__(self, *, key_steps: list[int] = PAPER_KEY_STEPS, reference_steps: int = 50,
                 reuse_controlnet: bool = True, prior_noise_injection: float | None = None,
                 prior_noise_below: float = 0.5, parallel_decoding: bool = False):
        super().__init__()
        self.key_steps = check_step_indices(key_steps, "key_steps")
        check_positive_int(reference_steps, "reference_steps")
        for name, value in (("reuse_controlnet", reuse_controlnet), ("parallel_decoding", parallel_decoding)):
            if not isinstance(value, bool):
                raise ValueError(f"{name} must be True or False, got {value!r}")
        if prior_noise_injection is not None and (
            isinstance(prior_noise_injection, bool) or not isinstance(prior_noise_injection, int | float)
            or not 0 <= prior_noise_injection < float("inf")
        ):
            raise ValueError(f"prior_noise_injection must be None or a non-negative number, got {prior_noise_injection!r}")
        check_fraction(prior_noise_below, "prior_noise_below")
        self.encoder: ModuleReuse | None = None
        self.prior_noise: PriorNoiseInjection | None = None
        self.controlnet_calls = {"compute": 0, "reuse": 0}

    def is_key_step(self, reading: ClockReading) -> bool:
        keys = scaled_step_indices(self.key_steps, self.config.reference_steps, reading.num_calls)
        return reading.index == 0 or reading.index in keys

    def following_non_key_steps(self, reading: ClockReading) -> list[int]:
        """The call indices after a key step up to the next key step (or the run's end)."""
        following = []
        for index in range(reading.index + 1, reading.num_calls or 0):
            if self.is_key_step(dataclasses.replace(reading, index=index)):
                break
            following.append(index)
        return following

    def _install(self, pipeline: Any) -> None:
        _, unet = pipeline_denoiser(pipeline, type(self).__name__)
        check_denoiser_type(unet, self.supported_denoisers, type(self).__name__)
        strength = self._prior_noise_strength(pipeline)
        controlnet = getattr(pipeline, "controlnet", None)
        if self.config.parallel_decoding and isinstance(controlnet, torch.nn.Module) and not self.config.reuse_controlnet:
            raise ValueError("parallel_decoding needs reuse_controlnet=True on ControlNet pipelines: a non-key step's "
                             "decoder can only be computed ahead with the key step's ControlNet residuals")
        clock = DenoisingClock(pipeline)
        decode_ahead = self.following_non_key_steps if self.config.parallel_decoding else None
        self.encoder = ModuleReuse(self, unet, unet_encoder_modules(unet), clock, self.is_key_step, decode_ahead)
        if self.config.reuse_controlnet and isinstance(controlnet, torch.nn.Module):
            self._reuse_controlnet_outputs(controlnet, clock)
        if strength:
            self.prior_noise = install_scheduler_proxy(
                pipeline, lambda scheduler: PriorNoiseInjection(scheduler, strength, self.config.prior_noise_below))
            self._on_detach(lambda: remove_scheduler_proxy(pipeline, self.prior_noise))

    def _prior_noise_strength(self, pipeline: Any) -> float:
        """``alpha`` for this pipeline's scheduler, or a ``ValueError`` for a number it cannot take."""
        requested = self.config.prior_noise_injection
        scheduler = plain_scheduler(getattr(pipeline, "scheduler", None))
        try:
            is_vp = noise_path_from_scheduler_config(scheduler.config) == "vp"
        except (AttributeError, TypeError, ValueError):
            is_vp = False
        sigma_scaled = float(getattr(scheduler, "init_noise_sigma", 1.0)) != 1.0
        if is_vp and sigma_scaled and not hasattr(scheduler, "sigmas"):
            is_vp = False
        if requested is None:
            return PAPER_PRIOR_NOISE if is_vp else 0.0
        if requested and not is_vp:
            raise ValueError(f"prior_noise_injection needs a scheduler with a DDPM-family (VP) schedule; this pipeline's "
                             f"is {type(scheduler).__name__} (pass prior_noise_injection=None or 0)")
        return float(requested)

    def _reuse_controlnet_outputs(self, controlnet: torch.nn.Module, clock: DenoisingClock) -> None:
        """The ControlNet runs once per step, just before the UNet: at key steps it runs and its residuals are stored
        with the conditioning scale; at other steps they are returned if the scale is unchanged."""
        stored: dict[tuple, tuple[Any, Any]] = {}
        run = [None]

        def forward(original, module, *args, **kwargs):
            stream = ("controlnet", *stream_key(hook.context_name, denoiser_sample(args, kwargs)))
            reading = clock.read(stream)
            if reading.run != run[0]:
                stored.clear()
                run[0] = reading.run
            scale = kwargs.get("conditioning_scale")
            if not self.is_key_step(reading) and stream in stored and stored[stream][0] == scale:
                self.controlnet_calls["reuse"] += 1
                return stored_copy(stored[stream][1])
            self.controlnet_calls["compute"] += 1
            output = original(*args, **kwargs)
            stored[stream] = (scale, stored_copy(output))
            return output

        hook = CallbackHook(new_forward=forward, on_reset=stored.clear)
        self._register_hook(controlnet, hook)


class PriorNoiseInjection(SchedulerProxy):
    """The pipeline's scheduler with Faster Diffusion's prior noise injection after each step (see
    ``FasterDiffusion``): the run's first ``sample`` is ``x_T``; when the next step's timestep is below ``tau``, the
    returned sample gets ``alpha * s_next / s_T * x_T`` added, ``s = sqrt(1 + sigma^2)`` on sigma-scaled samples and 1
    on VP ones."""

    own_attributes = SchedulerProxy.own_attributes | {"strength", "threshold", "injections", "prior", "calls"}

    def __init__(self, scheduler: Any, strength: float, below: float):
        super().__init__(scheduler)
        self.strength = strength
        self.threshold = below * int(scheduler.config.num_train_timesteps)
        self.injections = 0
        self.begin_run()

    def begin_run(self) -> None:
        self.prior = None
        self.calls = 0

    def wrapped_step(self, model_output, timestep, sample, *args, **kwargs):
        output = self.scheduler.step(model_output, timestep, sample, *args, **kwargs)
        self.calls += 1
        position = self._position()
        if self.prior is None:
            self.prior = (sample.detach().clone(), self._sample_scale(position))
        following = position + 1
        timesteps = self.scheduler.timesteps
        if following >= len(timesteps) or not float(timesteps[following]) < self.threshold:
            return output
        prior, prior_scale = self.prior
        scale = self.strength * self._sample_scale(following) / prior_scale
        self.injections += 1
        return with_prev_sample(output, output[0] + scale * prior.to(output[0].dtype))

    def _position(self) -> int:
        """The index in ``timesteps`` of the step just taken: one before the scheduler's own ``step_index`` where it
        keeps one, else counted from the run's ``begin_index`` (DDIM, DDPM and PNDM keep none)."""
        step_index = getattr(self.scheduler, "step_index", None)
        if step_index is not None:
            return int(step_index) - 1
        return int(getattr(self.scheduler, "begin_index", None) or 0) + self.calls - 1

    def _sample_scale(self, position: int) -> float:
        if float(self.scheduler.init_noise_sigma) == 1.0:
            return 1.0
        return float((1 + self.scheduler.sigmas[position] ** 2) ** 0.5)
