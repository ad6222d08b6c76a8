"""Time-Shift Sampler: "Alleviating Exposure Bias in Diffusion Models through Sampling with Shifted Time Steps"
(Li et al., ICLR 2024, arXiv 2305.15583), around DDIM or DPM-Solver++ (2M).

Exposure bias: a sample generated at step ``t`` is noisier or cleaner than the training inputs at ``t``. After each
step the sampler measures the sample's variance and feeds the model, at the next step, the training timestep whose
noise level best explains it (the paper's Algorithm 3):

    v     = mean over the batch of Var(x_{t_next})                      (variance over each sample's values)
    t_s   = argmin_{tau in [t_next - w/2, t_next + w/2]} | v - (1 - abar_tau) |     if t_next > cutoff, else t_next

The model is called at ``t_s``; the update still lands on the base sampler's next noise level. With
``rho = sigma / alpha`` and ``x0`` the data prediction at the model's timestep ``t_s``, both bases read

    x_next = alpha_next * ( (rho_next / rho_s) * x / alpha_s + (1 - rho_next / rho_s) * D )
    DDIM:            D = x0_s
    DPM-Solver++ 2M: D = x0_s + (x0_s - x0_prev) / (2 r),   r = (lambda_s - lambda_prev) / (lambda_next - lambda_s),
                     lambda = -log(rho), first order on the first step and on a final step to rho = 0

with the history at the shifted times, as in the authors' DPM-Solver code. The grid is the default
``sampling_schedule`` (on Stable Diffusion's training schedule, Align Your Steps' table: see
``sampling_schedules``), or with ``sampling_schedule=None`` the stock base scheduler's own (spacing, offsets, final
noise level), where ``window_size=0`` reproduces ``DDIMScheduler`` / ``DPMSolverMultistepScheduler`` step for step.

How the model gets ``t_s``: stock pipelines loop over the scheduler's own ``timesteps`` tensor, so the shifted
timestep is written into ``self.timesteps[i + 1]`` before the pipeline reads it. ``step`` always treats the
``timestep`` it is given as the model's time, so a pipeline that copied the timesteps beforehand gets a correct,
unshifted DDIM / DPM-Solver++ run (and a warning).

One shifted timestep serves the whole batch, because pipelines pass one timestep per call; the authors' code shifts
each sample. The paper's CIFAR-10 settings: ``window_size`` 40 / 30 / 8 / 2 for 10 / 20 / 50 / 100 steps,
``cutoff_timestep`` 200-300.
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence

import numpy as np
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler
from diffusers.configuration_utils import register_to_config
from diffusers.utils import logging

from ..diffusion_math import vp_noise_ratio
from .vp_discrete import (
    VPDiscreteScheduler,
    VPSchedulerOutput,
    check_num_inference_steps,
    every_training_timestep,
)

logger = logging.get_logger(__name__)

BASE_SCHEDULERS = {"ddim": DDIMScheduler, "dpmsolver++": DPMSolverMultistepScheduler}


def variance_matched_timestep(variance: float, alphas_cumprod: torch.Tensor, center: int, window_size: int) -> int:
    """The training timestep within ``window_size // 2`` of ``center`` whose noise variance ``1 - abar`` is closest
    to ``variance``."""
    low = max(center - window_size // 2, 0)
    high = min(center + window_size // 2, len(alphas_cumprod) - 1)
    candidates = 1.0 - alphas_cumprod[low : high + 1].to(torch.float64)
    return low + int((candidates - variance).abs().argmin())


class TimeShiftScheduler(VPDiscreteScheduler):
    """Time-Shift Sampler around a stock base sampler: ``TimeShiftScheduler.from_config(pipe.scheduler.config)``.
    One model call per step.

    Args:
        base_scheduler: ``"dpmsolver++"`` (default; 2M, midpoint form, diffusers' default DPM-Solver) or ``"ddim"``.
            On the oracle family (``benchmarks/fast_samplers.py``) the DPM-Solver++ base has about half DDIM's
            error at NFE 5 and 10.
        window_size: width of the search window in training timesteps (0 turns shifting off).
        cutoff_timestep: shift only while the next timestep is above this.
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr,
        prediction_type, timestep_spacing, steps_offset, set_alpha_to_one, final_sigmas_type, lower_order_final:
            passed to the base scheduler (whose own defaults fill in the rest).
        sampling_schedule: the noise levels to sample at instead of the base scheduler's grid: ``"auto"`` (default),
            a name from ``sampling_schedules.NAMED_SCHEDULES`` (e.g. ``"ays"``), a list of levels ``rho``, or
            ``None`` (the base scheduler's grid), as in ``ERSDESolverScheduler``.
    """

    @register_to_config
    def __init__(
        self,
        base_scheduler: str = "dpmsolver++",
        window_size: int = 30,
        cutoff_timestep: int = 300,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: np.ndarray | list[float] | None = None,
        prediction_type: str = "epsilon",
        timestep_spacing: str = "leading",
        steps_offset: int = 0,
        set_alpha_to_one: bool = True,
        final_sigmas_type: str = "zero",
        lower_order_final: bool = True,
        rescale_betas_zero_snr: bool = False,
        sampling_schedule: str | list[float] | None = "auto",
    ):
        if base_scheduler not in BASE_SCHEDULERS:
            raise ValueError(f"base_scheduler must be one of {sorted(BASE_SCHEDULERS)}, got {base_scheduler!r}")
        if not isinstance(window_size, int) or window_size < 0:
            raise ValueError(f"window_size must be a non-negative int, got {window_size!r}")
        self.base = self._make_base()
        self._init_vp_schedule()
        self._noise_ratio_table = vp_noise_ratio(self.alphas_cumprod).tolist()
        self._x0_previous: torch.Tensor | None = None
        self._rho_previous: float | None = None

    def _make_base(self):
        base_class = BASE_SCHEDULERS[self.config.base_scheduler]
        keys = inspect.signature(base_class.__init__).parameters
        base_config = {k: v for k, v in self.config.items() if k in keys and v is not None}
        return base_class(**base_config)

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        timesteps: Sequence[float] | torch.Tensor | None = None,
        sigmas: Sequence[float] | torch.Tensor | None = None,
    ) -> None:
        """The base scheduler's grid for ``num_inference_steps``, or ``config.sampling_schedule``'s, or custom
        ``timesteps`` / ``sigmas`` (as in ``VPDiscreteScheduler.set_timesteps``); shifted entries are written during
        sampling."""
        if timesteps is not None or sigmas is not None or self._sampling_levels() is not None:
            super().set_timesteps(num_inference_steps, device, timesteps, sigmas)
            return
        check_num_inference_steps(num_inference_steps, self.config.num_train_timesteps)
        self.base.set_timesteps(num_inference_steps, device="cpu")
        scheduled = self.base.timesteps.clone()
        if num_inference_steps == self.config.num_train_timesteps:
            scheduled = every_training_timestep(num_inference_steps)
        self.num_inference_steps = len(scheduled)
        self.timesteps = scheduled.to(device)
        self.sigmas = torch.cat([self._noise_ratio_at(scheduled), self._final_noise_ratio()])
        self._reset_step_index()
        self._on_set_timesteps()

    def _final_noise_ratio(self) -> torch.Tensor:
        if isinstance(self.base, DDIMScheduler):
            final_abar = float(self.base.final_alpha_cumprod)
            return torch.tensor([((1 - final_abar) / final_abar) ** 0.5], dtype=torch.float64)
        return super()._final_noise_ratio()

    def _on_set_timesteps(self) -> None:
        self.noise_levels = self.sigmas.tolist()
        self.scheduled_timesteps = self.timesteps.cpu().clone()
        self._x0_previous, self._rho_previous = None, None
        self._warned = False

    def _noise_ratio_of_timestep(self, timestep: float) -> float:
        if timestep.is_integer():  # the usual case: a table lookup instead of interpolation's small tensor ops
            return self._noise_ratio_table[int(timestep)]
        return float(self._noise_ratio_at(torch.tensor(timestep)))

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        return_dict: bool = True,
    ) -> VPSchedulerOutput | tuple:
        """Update from the model's (possibly shifted) timestep to the base grid's next noise level, then pick the
        next call's timestep by variance matching."""
        if self.num_inference_steps is None:
            raise ValueError("call set_timesteps before step")
        if self.step_index is None:
            self._init_step_index(timestep)
            self._x0_previous, self._rho_previous = None, None
        i = self.step_index
        model_timestep = float(timestep)
        if model_timestep != float(self.timesteps[i]) and not self._warned:
            logger.warning("the pipeline did not call the model at the shifted timestep; sampling goes on unshifted")
            self._warned = True
        rho_s = self._noise_ratio_of_timestep(model_timestep)
        rho_next = self.noise_levels[i + 1]
        x0 = self._x0_from_model_output(model_output, sample, rho_s)

        data_term = x0
        final_to_zero = rho_next == 0.0
        lower_final = self.config.lower_order_final and self.num_inference_steps < 15 and i == self.num_inference_steps - 1
        # On a fine grid the shift can call the model at (or below) the previous call's noise level: the two
        # predictions then give no derivative along the step, which is taken at first order.
        ordered = self._rho_previous is not None and self._rho_previous > rho_s > rho_next
        if self.config.base_scheduler == "dpmsolver++" and ordered and not (final_to_zero or lower_final):
            r = np.log(self._rho_previous / rho_s) / np.log(rho_s / rho_next)
            data_term = x0 + (x0 - self._x0_previous) / (2 * r)
        ratio = rho_next / rho_s
        alpha_s, alpha_next = (1 + rho_s**2) ** -0.5, (1 + rho_next**2) ** -0.5
        prev_sample = sample * (alpha_next * ratio / alpha_s)
        prev_sample.add_(data_term, alpha=alpha_next * (1 - ratio))
        self._x0_previous, self._rho_previous = x0, rho_s

        next_index = i + 1
        if self.config.window_size > 0 and next_index < self.num_inference_steps:
            scheduled = int(self.scheduled_timesteps[next_index])
            if scheduled > self.config.cutoff_timestep:
                variance = float(prev_sample.flatten(1).var(dim=1).mean())
                shifted = variance_matched_timestep(variance, self.alphas_cumprod, scheduled, self.config.window_size)
                self.timesteps[next_index] = shifted
        self._step_index += 1
        if not return_dict:
            return (prev_sample, x0)
        return VPSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
