"""Plumbing shared by diffusers-ext's VP (DDPM-family) schedulers, so that each scheduler file holds only its method.

It covers the training schedule (``betas``, ``alphas`` and ``alphas_cumprod`` from the config, through
``diffusers_ext.diffusion_math``), the inference grid and its checks (``timestep_spacing`` as
``DPMSolverMultistepScheduler`` defines it, or custom ``timesteps=`` / ``sigmas=``), the step counter that img2img's
``set_begin_index`` drives, and the forward process (``add_noise``). Noise levels are kept as ``rho = sigma / alpha``
(diffusers' VP ``sigmas``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput

from ..diffusion_math import (
    check_prediction_type,
    vp_alpha_sigma,
    vp_betas,
    vp_noise_ratio,
    vp_timesteps_from_noise_ratio,
    x0_and_eps_from_prediction,
)
from .sampling_schedules import clip_to_range, sampling_schedule_levels
from .step_counter import StepCounterMixin

# diffusers' zero-terminal-SNR schedulers clip the last alphas_cumprod to this, so that rho stays finite.
ZERO_SNR_ALPHA_CUMPROD = 2.0**-24


@dataclass
class VPSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next noise level; ``pred_original_sample``: the model's ``x0`` estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


TIMESTEP_SPACINGS = ("linspace", "leading", "trailing")
FINAL_SIGMA_TYPES = ("zero", "sigma_min")


def every_training_timestep(num_train_timesteps: int) -> torch.Tensor:
    """The grid of ``num_train_timesteps`` steps. At that count the spacings' formulas round two grid points to one
    timestep (``linspace``) or all of them to one (``leading``): a zero-length step, which multistep solvers divide
    by (diffusers' DPM-Solver returns NaN there); ``leading`` with ``steps_offset`` also leaves the schedule."""
    return torch.arange(num_train_timesteps - 1, -1, -1)


def spaced_timesteps(num_train_timesteps: int, num_inference_steps: int, spacing: str, steps_offset: int = 0) -> np.ndarray:
    """Descending int64 timesteps, spaced as ``DPMSolverMultistepScheduler`` spaces them (Table 2 of
    "Common Diffusion Noise Schedules and Sample Steps are Flawed", arXiv 2305.08891); as many steps as training
    timesteps are every training timestep (see ``every_training_timestep``)."""
    if num_inference_steps == num_train_timesteps:
        return every_training_timestep(num_train_timesteps).numpy()
    if spacing == "linspace":
        grid = np.linspace(0, num_train_timesteps - 1, num_inference_steps + 1).round()[::-1][:-1]
    elif spacing == "leading":
        ratio = num_train_timesteps // (num_inference_steps + 1)
        grid = (np.arange(num_inference_steps + 1) * ratio).round()[::-1][:-1] + steps_offset
    elif spacing == "trailing":
        grid = np.arange(num_train_timesteps, 0, -num_train_timesteps / num_inference_steps).round() - 1
    else:
        raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {spacing!r}")
    return grid.astype(np.int64)


def loglinear_resample(noise_levels: Sequence[float], num_steps: int) -> np.ndarray:
    """Resample a descending schedule of positive noise levels to ``num_steps`` levels, piecewise linear in
    ``log(level)`` over the schedule's fraction of the way (how Align Your Steps adapts a schedule to other step
    counts); the end points are kept."""
    levels = np.asarray(noise_levels, dtype=np.float64)
    if len(levels) == num_steps:
        return levels
    fraction = np.linspace(0.0, 1.0, len(levels))
    return np.exp(np.interp(np.linspace(0.0, 1.0, num_steps), fraction, np.log(levels)))


def check_strictly_decreasing(values: torch.Tensor, name: str) -> None:
    if values.ndim != 1 or values.numel() == 0:
        raise ValueError(f"{name} must be a non-empty 1-D sequence, got shape {tuple(values.shape)}")
    if not torch.isfinite(values).all():
        raise ValueError(f"{name} must be finite, got {values.tolist()}")
    if values.numel() > 1 and not (values[1:] < values[:-1]).all():
        raise ValueError(f"{name} must be strictly decreasing, got {values.tolist()}")


def check_num_inference_steps(num_inference_steps, num_train_timesteps: int) -> int:
    if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, (int, np.integer)):
        raise ValueError(f"num_inference_steps must be an int, got {num_inference_steps!r}")
    if not 1 <= num_inference_steps <= num_train_timesteps:
        raise ValueError(
            f"num_inference_steps must be in [1, num_train_timesteps={num_train_timesteps}], got {num_inference_steps}"
        )
    return int(num_inference_steps)


class VPDiscreteScheduler(StepCounterMixin, SchedulerMixin, ConfigMixin):
    """Base class; a subclass registers its config (with the VP schedule keys, ``prediction_type``,
    ``timestep_spacing``, ``steps_offset``, ``final_sigmas_type`` and ``sampling_schedule``), calls
    ``_init_vp_schedule()`` in ``__init__`` and implements ``step``. ``_on_set_timesteps()`` runs after every
    ``set_timesteps``."""

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]
    order = 1

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # diffusers-ext 0.1 saved a learned schedule as `sigma_schedule`, the key under which EDM schedulers keep a
        # string; read such a list as `sampling_schedule` (for configs saved by that release).
        legacy = config_dict.get("sigma_schedule")
        if isinstance(legacy, list) and "sampling_schedule" not in config_dict:
            config_dict = {**config_dict, "sampling_schedule": legacy}
        return super().extract_init_dict(config_dict, **kwargs)

    def _init_vp_schedule(self) -> None:
        if check_prediction_type(self.config.prediction_type) == "flow_prediction":
            raise ValueError("prediction_type 'flow_prediction' is for flow-matching schedulers, not a VP schedule")
        if self.config.final_sigmas_type not in FINAL_SIGMA_TYPES:
            raise ValueError(f"final_sigmas_type must be one of {FINAL_SIGMA_TYPES}, got {self.config.final_sigmas_type!r}")
        if self.config.timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {self.config.timestep_spacing!r}")
        self.betas = vp_betas(self.config)
        self.alphas = 1.0 - self.betas
        self.alphas_cumprod = torch.cumprod(self.alphas, dim=0)
        if self.alphas_cumprod[-1] == 0:
            self.alphas_cumprod[-1] = ZERO_SNR_ALPHA_CUMPROD
        self.init_noise_sigma = 1.0
        self.num_inference_steps = None
        self.timesteps = torch.arange(self.config.num_train_timesteps - 1, -1, -1)
        self.sigmas = vp_noise_ratio(self.alphas_cumprod).flip(0)
        self._sampling_levels()  # a bad sampling_schedule raises here, not at the first set_timesteps
        self._reset_step_index()

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """Set the inference grid: ``num_inference_steps`` levels of ``config.sampling_schedule``, log-linearly
        resampled, or, when it is ``None``, spaced by ``config.timestep_spacing``; or custom ``timesteps`` (strictly
        decreasing training timesteps, possibly fractional) or ``sigmas`` (strictly decreasing noise levels
        ``rho = sigma / alpha`` inside the schedule's range, to a relative ``RANGE_RELATIVE_TOLERANCE``). Sampling
        ends at ``rho = 0`` (``final_sigmas_type="zero"``) or at timestep 0 (``"sigma_min"``)."""
        num_train = self.config.num_train_timesteps
        if timesteps is not None and sigmas is not None:
            raise ValueError("pass at most one of `timesteps` and `sigmas`")
        custom = timesteps if timesteps is not None else sigmas
        levels = self._sampling_levels() if custom is None else None
        if levels is not None and num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, num_train)
            sigmas = custom = loglinear_resample(levels, num_inference_steps)
        if custom is None:
            if num_inference_steps is None:
                raise ValueError("pass num_inference_steps, timesteps or sigmas")
            steps = check_num_inference_steps(num_inference_steps, num_train)
            grid = spaced_timesteps(num_train, steps, self.config.timestep_spacing, self.config.steps_offset)
            model_timesteps = torch.from_numpy(grid)
            noise_levels = self._noise_ratio_at(model_timesteps)
        else:
            name = "timesteps" if timesteps is not None else "sigmas"
            values = torch.as_tensor(custom, dtype=torch.float64).flatten() if not isinstance(custom, torch.Tensor) \
                else custom.detach().to("cpu", torch.float64)
            check_strictly_decreasing(values, name)
            if num_inference_steps is not None and num_inference_steps != values.numel():
                raise ValueError(f"{name} has {values.numel()} entries but num_inference_steps={num_inference_steps}")
            check_num_inference_steps(values.numel(), num_train)
            if timesteps is not None:
                if values[-1] < 0 or values[0] > num_train - 1:
                    raise ValueError(f"timesteps must lie in [0, {num_train - 1}], got {values.tolist()}")
                model_timesteps = values.long() if (values == values.round()).all() else values.float()
                noise_levels = self._noise_ratio_at(values)
            else:
                extremes = vp_noise_ratio(self.alphas_cumprod[[0, -1]]).tolist()
                values = torch.from_numpy(clip_to_range(values.numpy(), *extremes, "sigmas"))
                model_timesteps = vp_timesteps_from_noise_ratio(values, self.alphas_cumprod).float()
                noise_levels = values
            # Distinct in float64 is not enough: the model is handed float32 (or integer) timesteps.
            check_strictly_decreasing(model_timesteps.double(), f"{name}, as float32 model timesteps,")
        final = self._final_noise_ratio()
        if final.item() >= noise_levels[-1].item():
            raise ValueError(f"the last noise level {noise_levels[-1].item():.4g} is not above the final one {final.item():.4g}")
        self.num_inference_steps = model_timesteps.numel()
        self.timesteps = model_timesteps.to(device)
        self.sigmas = torch.cat([noise_levels, final]).to(device)
        self._reset_step_index()
        self._on_set_timesteps()

    def _on_set_timesteps(self) -> None:
        """Precompute what ``step`` needs for the new grid."""

    def _sampling_levels(self) -> np.ndarray | None:
        """The noise levels of ``config.sampling_schedule`` (read at each ``set_timesteps``, so that a schedule
        written to the config later, e.g. by ``optimize_timesteps``, applies)."""
        extremes = vp_noise_ratio(self.alphas_cumprod[[0, -1]]).tolist()
        return sampling_schedule_levels(self.config.sampling_schedule, self.config, *extremes)

    def _final_noise_ratio(self) -> torch.Tensor:
        """Where sampling ends, ``(1,)`` float64: ``rho = 0`` or the schedule's smallest noise level."""
        if self.config.final_sigmas_type == "zero":
            return torch.zeros(1, dtype=torch.float64)
        return self._noise_ratio_at(torch.zeros(1))

    def _noise_ratio_at(self, timesteps: torch.Tensor) -> torch.Tensor:
        alpha, sigma = vp_alpha_sigma(timesteps, self.alphas_cumprod)
        return sigma / alpha

    def _x0_from_model_output(self, model_output: torch.Tensor, sample: torch.Tensor, noise_ratio: float) -> torch.Tensor:
        alpha = (1 + noise_ratio**2) ** -0.5
        x0, _ = x0_and_eps_from_prediction(model_output, sample, alpha, noise_ratio * alpha, self.config.prediction_type)
        return x0

    def add_noise(self, original_samples: torch.Tensor, noise: torch.Tensor, timesteps: torch.Tensor) -> torch.Tensor:
        """``alpha_t x0 + sigma_t eps`` at training ``timesteps`` (one per sample, or one for all)."""
        alpha, sigma = vp_alpha_sigma(torch.as_tensor(timesteps, device=original_samples.device).flatten(), self.alphas_cumprod)
        shape = (-1,) + (1,) * (original_samples.ndim - 1)
        alpha = alpha.to(original_samples.dtype).reshape(shape)
        sigma = sigma.to(original_samples.dtype).reshape(shape)
        return alpha * original_samples + sigma * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps
