"""Frame-aware schedulers: one vectorized step that moves every video frame from its own noise level to its own next
level, for FVDM ("Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach", Liu et al.,
arXiv 2410.03160) and Diffusion Forcing ("Diffusion Forcing: Next-token Prediction Meets Full-Sequence Diffusion",
Chen et al., arXiv 2407.01392) sampling.

A noise level is ``sigma`` in ``x = alpha x0 + sigma eps`` (0 clean, 1 pure noise; see
``diffusers_ext.pipelines.video.frame_plan``): ``alpha = 1 - sigma`` on the flow-matching path
(``FrameAwareFlowMatchScheduler``) and ``alpha = sqrt(1 - sigma^2)`` on the VP path (``FrameAwareVPScheduler``).
``step(model_output, noise_level, sample, next_noise_level)`` takes levels ``(F,)`` or ``(B, F)`` for the ``F``
frames along ``config.frame_dim`` (2 for the ``(B, C, F, H, W)`` latents of Wan, SkyReels-V2 and LTX-Video once
unpacked) and computes, per frame, from ``(alpha, sigma)`` now and ``(alpha', sigma')`` next:

    x0, eps = the solution of {x = alpha x0 + sigma eps, m = the model's prediction}   (linear in x and m)
    c       = eta sigma' sqrt(1 - (rho' / rho)^2),    rho = sigma / alpha
    x'      = alpha' x0 + sqrt(sigma'^2 - c^2) eps + c z                        (DDIM, ``solver_order=1``)

which on the flow path with a velocity model is Euler's ``x' = x + (sigma' - sigma) m``. The step is linear in
``(x, m)``, so it is applied as ``x' = a x + b m (+ c z)``: ``a, b, c`` come from ``diffusion_math``
(``x0_and_eps_from_prediction``, ``ddim_step``, ``ddim_step_distribution``) in float64, once per distinct pair of
levels in the step (a plan's row has few), and are broadcast over the latents in one pass, whatever the frames' levels.

``solver_order=2`` is DPM-Solver++(2M) ("DPM-Solver++: Fast Solver for Guided Sampling of Diffusion Probabilistic
Models", Lu et al., arXiv 2211.01095) with per-frame history. With ``lambda = log(alpha / sigma)``, a frame that moved
before from ``lambda_p`` (where the data prediction was ``x0_p``) to its current ``lambda``, and moves on to
``lambda'`` with ``sigma' > 0``, takes

    h = lambda' - lambda,   r = (lambda - lambda_p) / h
    x' = [DDIM step above, eta = 0] + alpha' (1 - e^{-h}) / (2 r) * (x0 - x0_p)

(diffusers' ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_type="midpoint"``). A
frame's history is its last move, however many steps it paused since, as when each frame has its own scheduler
(SkyReels-V2's pipeline keeps one deep copy per frame). Its first move, a move onto ``sigma' = 0`` (as diffusers does
with ``final_sigmas_type="zero"``) and a move from a level other than where its last move landed (a new run) are
first order.

Frames whose level does not change in a step (``next_noise_level == noise_level``) come out bit-identical: they are
copied from ``sample``, not computed.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.schedulers.scheduling_utils import KarrasDiffusionSchedulers, SchedulerMixin
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion_math import (
    check_prediction_type,
    ddim_step,
    ddim_step_distribution,
    vp_alpha_sigma,
    vp_alphas_cumprod,
    vp_noise_ratio,
    vp_timesteps_from_noise_ratio,
    x0_and_eps_from_prediction,
)

LevelsLike = torch.Tensor | float | Sequence[float]
SOLVER_ORDERS = (1, 2)
Rows = list[list[float]]  # per-frame values, (B or 1) rows of F


@dataclass
class FrameAwareSchedulerOutput(BaseOutput):
    """``prev_sample``: the latents at the next levels; ``pred_original_sample``: the model's ``x0`` estimate, which
    the second-order solver computes (the first-order step leaves it ``None``, to make one pass over the latents;
    ``predict_original_sample`` gives it)."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor | None = None


def frame_coefficients_view(
    values: Rows | list[Rows] | torch.Tensor, like: torch.Tensor, frame_dim: int
) -> torch.Tensor:
    """Per-frame values ``(..., B or 1, F)`` (a CPU tensor or nested lists) shaped to broadcast against ``like``
    along its batch (0) and frame axes, after their leading axes, on ``like``'s device, in its dtype. The copy to an
    accelerator does not wait for the work queued there."""
    values = torch.as_tensor(values, dtype=like.dtype).to(like.device, non_blocking=True)
    shape = [1] * like.ndim
    shape[0], shape[frame_dim] = values.shape[-2:]
    return values.reshape(*values.shape[:-2], *shape)


def x0_coefficients(alpha: float, sigma: float, prediction_type: str) -> tuple[float, float]:
    """``(p, q)`` with ``x0 = p x + q m`` for a model predicting ``m`` of ``prediction_type`` at ``(alpha, sigma)``:
    ``diffusion_math.x0_and_eps_from_prediction`` (linear in ``(x, m)``) of the unit vectors."""
    return (float(x0_and_eps_from_prediction(0.0, 1.0, alpha, sigma, prediction_type)[0]),
            float(x0_and_eps_from_prediction(1.0, 0.0, alpha, sigma, prediction_type)[0]))


def ddim_step_coefficients(
    alpha: float, sigma: float, alpha_next: float, sigma_next: float, eta: float, prediction_type: str
) -> tuple[float, float, float]:
    """``(a, b, c)`` with DDIM's step ``x' = a x + b m + c z`` for a model predicting ``m`` of ``prediction_type``:
    ``diffusion_math.ddim_step`` (``ddim_step_distribution`` for ``eta > 0``), which is linear in ``(x0, eps)``,
    composed with ``x0_and_eps_from_prediction``, which is linear in ``(x, m)``."""
    x0_x, eps_x = x0_and_eps_from_prediction(0.0, 1.0, alpha, sigma, prediction_type)
    x0_m, eps_m = x0_and_eps_from_prediction(1.0, 0.0, alpha, sigma, prediction_type)
    if eta == 0:
        return (float(ddim_step(x0_x, eps_x, alpha, sigma, alpha_next, sigma_next, eta)),
                float(ddim_step(x0_m, eps_m, alpha, sigma, alpha_next, sigma_next, eta)), 0.0)
    levels = torch.tensor([alpha, sigma, alpha_next, sigma_next], dtype=torch.float64)
    x0_and_eps = torch.tensor([[x0_x, eps_x], [x0_m, eps_m]], dtype=torch.float64)
    ab, c = ddim_step_distribution(x0_and_eps[:, 0], x0_and_eps[:, 1], *levels, eta)
    return float(ab[0]), float(ab[1]), float(c)


def log_snr(alpha: float, sigma: float) -> float:
    """``lambda = log(alpha / sigma)``, DPM-Solver's time variable (``-inf`` at pure noise); ``sigma > 0``."""
    return math.log(alpha) - math.log(sigma) if alpha > 0 else -math.inf


def dpmsolver_2m_correction(
    alpha_sigma_previous: tuple[float, float], alpha_sigma: tuple[float, float], alpha_sigma_next: tuple[float, float]
) -> float:
    """The coefficient of ``x0 - x0_previous`` that DPM-Solver++(2M) adds to the first-order step,
    ``alpha' (1 - e^{-h}) / (2 r)`` with ``h = lambda' - lambda``, ``r = (lambda - lambda_previous) / h`` and
    ``lambda = log_snr(alpha, sigma)``; each argument an ``(alpha, sigma)`` pair. A history at pure noise
    (``lambda_previous = -inf``) gives ``r = inf``: no correction."""
    lambda_previous, lambda_now, lambda_next = (log_snr(*pair) for pair in (alpha_sigma_previous, alpha_sigma,
                                                                             alpha_sigma_next))
    h = lambda_next - lambda_now
    r = (lambda_now - lambda_previous) / h
    return -alpha_sigma_next[0] * math.expm1(-h) / (2 * r)


def frame_blocks(frames: list[list[bool]], batch: int) -> list[tuple[int, int, int, int]]:
    """``(row, rows, start, length)``: the blocks of ``rows`` batch rows from ``row`` and ``length`` consecutive frames
    from ``start`` where ``frames`` (``(B or 1)`` rows of ``F``; one row stands for the whole batch) is True."""
    row_spans = [(0, batch)] if len(frames) == 1 else [(row, 1) for row in range(len(frames))]
    blocks = []
    for mask, (row, rows) in zip(frames, row_spans, strict=True):
        start = 0
        for value, group in itertools.groupby(mask):
            length = len(list(group))
            if value:
                blocks.append((row, rows, start, length))
            start += length
    return blocks


def frame_block(tensor: torch.Tensor, block: tuple[int, int, int, int], frame_dim: int) -> torch.Tensor:
    """The view of ``tensor`` on a ``frame_blocks`` block; a tensor with one batch row (per-frame coefficients shared
    by the batch) keeps it."""
    row, rows, start, length = block
    if tensor.shape[0] > 1:
        tensor = tensor.narrow(0, row, rows)
    return tensor.narrow(frame_dim, start, length)


def copy_frames(destination: torch.Tensor, source: torch.Tensor, frames: list[list[bool]], frame_dim: int) -> None:
    """``destination[b, .., f, ..] = source[b, .., f, ..]`` wherever ``frames[b][f]`` (``(B or 1)`` rows of ``F``), in
    place, by blocks of consecutive frames: plain copies (bit-exact), costing what the frames weigh, not the tensor."""
    for block in frame_blocks(frames, destination.shape[0]):
        frame_block(destination, block, frame_dim).copy_(frame_block(source, block, frame_dim))


class FrameAwareSchedulerMixin:
    """The vectorized per-frame step both frame-aware schedulers share; a subclass registers its config (with
    ``prediction_type``, ``solver_order`` and ``frame_dim``) and defines ``alpha_sigma`` (on floats and tensors),
    ``set_timesteps`` and the timestep conversions."""

    order = 1
    init_noise_sigma = 1.0

    def _init_frame_aware(self) -> None:
        check_prediction_type(self.config.prediction_type)
        if self.config.solver_order not in SOLVER_ORDERS:
            raise ValueError(f"solver_order must be one of {SOLVER_ORDERS}, got {self.config.solver_order!r}")
        frame_dim = self.config.frame_dim
        if isinstance(frame_dim, bool) or not isinstance(frame_dim, int) or frame_dim < 1:
            raise ValueError(f"frame_dim must be an int >= 1 (axis 0 is the batch), got {frame_dim!r}")
        self.num_inference_steps = None
        self.timesteps = None
        self.noise_levels = None
        self._reset_history()

    def _reset_history(self) -> None:
        self._x0_history = None  # per frame, the data prediction at its last move
        self._history_levels = None  # (B or 1) rows of F: the level that prediction was made at (None: none)
        self._landed_levels = None  # (B or 1) rows of F: where that move took the frame

    def alpha_sigma(self, noise_levels):
        raise NotImplementedError

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def _frame_levels(self, values: LevelsLike, name: str, batch: int, num_frames: int) -> Rows:
        """``values`` (one level for all frames, ``(F,)`` or ``(B, F)``) as ``(B or 1)`` rows of ``F`` floats."""
        levels = values if isinstance(values, torch.Tensor) else torch.as_tensor(values, dtype=torch.float64)
        if levels.ndim == 0:
            levels = levels.expand(1, num_frames)
        elif levels.ndim == 1:
            levels = levels[None]
        if levels.ndim != 2 or levels.shape[1] != num_frames or levels.shape[0] not in (1, batch):
            raise ValueError(
                f"{name} must be one level, ({num_frames},) or ({batch}, {num_frames}) for a sample with batch "
                f"{batch} and {num_frames} frames on axis frame_dim={self.config.frame_dim}, got shape "
                f"{tuple(levels.shape)}"
            )
        rows = levels.tolist()
        if not all(0 <= level <= 1 for row in rows for level in row):  # NaN fails too
            raise ValueError(f"{name} must be noise levels in [0, 1], got {rows}")
        return rows

    def _check_step_inputs(self, model_output, sample, noise_level, next_noise_level) -> tuple[Rows, Rows]:
        if not isinstance(sample, torch.Tensor) or not isinstance(model_output, torch.Tensor):
            raise TypeError("model_output and sample must be tensors")
        if model_output.shape != sample.shape:
            raise ValueError(
                f"model_output has shape {tuple(model_output.shape)} but sample has {tuple(sample.shape)}"
            )
        frame_dim = self.config.frame_dim
        if sample.ndim <= frame_dim:
            raise ValueError(f"sample has {sample.ndim} axes; frame_dim={frame_dim} needs at least {frame_dim + 1}")
        batch, num_frames = sample.shape[0], sample.shape[frame_dim]
        level = self._frame_levels(noise_level, "noise_level", batch, num_frames)
        next_level = self._frame_levels(next_noise_level, "next_noise_level", batch, num_frames)
        if len(level) != len(next_level):  # one shared row against one per batch row
            level, next_level = (rows * batch if len(rows) == 1 else rows for rows in (level, next_level))
        for row, (now, then) in enumerate(zip(level, next_level, strict=True)):
            for frame, (a, b) in enumerate(zip(now, then, strict=True)):
                if b > a:
                    raise ValueError(
                        f"next_noise_level must not exceed noise_level: frame {frame} (batch row {row}) would go "
                        f"from {a:.6g} to {b:.6g}"
                    )
        return level, next_level

    def _per_pair(self, level: Rows, next_level: Rows, coefficients, still: tuple[float, ...]) -> torch.Tensor:
        """``coefficients(alpha, sigma, alpha_next, sigma_next)`` (a tuple of floats) for every frame that moves,
        computed once per distinct pair of levels, and ``still`` for the others: ``(len(still), B or 1, F)`` float64
        on the CPU."""
        pairs = list(zip(itertools.chain(*level), itertools.chain(*next_level), strict=True))
        by_pair = {}
        for now, then in pairs:
            if then < now and (now, then) not in by_pair:
                try:
                    by_pair[now, then] = coefficients(*self.alpha_sigma(now), *self.alpha_sigma(then))
                except ZeroDivisionError as error:
                    raise ValueError(
                        f"prediction_type {self.config.prediction_type!r} cannot be stepped from noise level {now} "
                        "(the clean signal's weight alpha is 0 there)"
                    ) from error
        per_frame = torch.tensor([by_pair.get(pair, still) for pair in pairs], dtype=torch.float64)
        return per_frame.T.reshape(len(still), len(level), -1)

    def _x0_coefficients(self, level: Rows) -> torch.Tensor:
        """``(2, B or 1, F)``: ``(p, q)`` with ``x0 = p x + q m`` for every frame, once per distinct level; NaN where
        ``x0`` is undefined (an epsilon model where ``alpha = 0``)."""
        by_level = {}
        for now in itertools.chain(*level):
            if now not in by_level:
                try:
                    by_level[now] = x0_coefficients(*self.alpha_sigma(now), self.config.prediction_type)
                except ZeroDivisionError:
                    by_level[now] = (math.nan, math.nan)
        per_frame = torch.tensor([by_level[now] for now in itertools.chain(*level)], dtype=torch.float64)
        return per_frame.T.reshape(2, len(level), -1)

    def step(
        self,
        model_output: torch.Tensor,
        noise_level: LevelsLike,
        sample: torch.Tensor,
        next_noise_level: LevelsLike,
        eta: float = 0.0,
        generator: torch.Generator | None = None,
        variance_noise: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> FrameAwareSchedulerOutput | tuple:
        """Move every frame of ``sample`` from ``noise_level`` to ``next_noise_level`` (each: one level, ``(F,)`` or
        ``(B, F)``; a plan's rows, kept on the CPU) in one vectorized update (see the module docstring).

        Args:
            model_output: the model's prediction (``config.prediction_type``), shaped like ``sample``.
            noise_level, next_noise_level: per-frame levels now and after the step, ``next <= now``.
            sample: the latents, frames on axis ``config.frame_dim``.
            eta: DDIM's stochasticity (0: the ODE step; 1: DDPM's ancestral step); first order only.
            generator, variance_noise: the noise ``z`` for ``eta > 0``: drawn with ``generator``, or given.
        """
        level, next_level = self._check_step_inputs(model_output, sample, noise_level, next_noise_level)
        if eta < 0:
            raise ValueError(f"eta must be >= 0, got {eta}")
        if eta > 0 and self.config.solver_order != 1:
            raise ValueError("eta > 0 needs solver_order=1 (DDIM); DPM-Solver++(2M) here is the deterministic solver")
        if variance_noise is not None and variance_noise.shape != sample.shape:
            raise ValueError(f"variance_noise must have the sample's shape {tuple(sample.shape)}, got "
                             f"{tuple(variance_noise.shape)}")
        active = [[then < now for now, then in zip(row, next_row, strict=True)]
                  for row, next_row in zip(level, next_level, strict=True)]
        if not any(itertools.chain(*active)):
            prev_sample = sample.clone()
            return (prev_sample, None) if not return_dict else FrameAwareSchedulerOutput(prev_sample=prev_sample)

        prediction_type = self.config.prediction_type
        # Still frames get the identity (they are copied afterwards), which keeps Euler's one-pass form below.
        step_coefficients = self._per_pair(level, next_level, lambda *alpha_sigmas: ddim_step_coefficients(
            *alpha_sigmas, eta, prediction_type), still=(1.0, 0.0, 0.0))
        # Upcast, as diffusers' schedulers do, so that bf16 latents are stepped in float32.
        compute_dtype = torch.promote_types(sample.dtype, torch.float32)
        x, m = sample.to(compute_dtype), model_output.to(compute_dtype)
        prev_sample = self._combine(x, m, step_coefficients[:2], frames=active)
        pred_original_sample = None
        if self.config.solver_order == 2:
            pred_original_sample = self._combine(x, m, self._x0_coefficients(level))
            self._add_multistep_correction(prev_sample, pred_original_sample, level, next_level, active)
        c = step_coefficients[2]
        if eta > 0 and bool((c > 0).any()):
            if variance_noise is None:
                variance_noise = randn_tensor(sample.shape, generator=generator, device=sample.device,
                                              dtype=compute_dtype)
            prev_sample.addcmul_(self._frame_view(c, x), variance_noise.to(compute_dtype))

        prev_sample = prev_sample.to(sample.dtype)  # a new tensor either way: `x` may be `sample` itself
        still = [[not moves for moves in row] for row in active]
        copy_frames(prev_sample, sample, still, self.config.frame_dim)  # frames that stay are copied, not computed
        if not return_dict:
            return (prev_sample, pred_original_sample)
        return FrameAwareSchedulerOutput(prev_sample=prev_sample, pred_original_sample=pred_original_sample)

    def _frame_view(self, values, like: torch.Tensor) -> torch.Tensor:
        return frame_coefficients_view(values, like, self.config.frame_dim)

    def _combine(self, x: torch.Tensor, y: torch.Tensor, coefficients: torch.Tensor,
                 frames: list[list[bool]] | None = None) -> torch.Tensor:
        """``coefficients[0] x + coefficients[1] y`` per frame (``coefficients``: ``(2, B or 1, F)`` on the CPU), a new
        tensor, computed for ``frames`` (all by default; the others are left unset), in one pass when every
        ``coefficients[0]`` is 1 in ``x``'s dtype (a velocity model's Euler step, ``x + (sigma' - sigma) m``)."""
        coefficients = coefficients.to(x.dtype)
        scale = not bool((coefficients[0] == 1).all())  # on the CPU: no wait for an accelerator
        x_view, y_view = self._frame_view(coefficients, x)
        if frames is None or all(itertools.chain(*frames)):
            return torch.addcmul(x * x_view if scale else x, y_view, y)
        result = torch.empty_like(x)
        frame_dim = self.config.frame_dim
        for block in frame_blocks(frames, x.shape[0]):
            x_block, y_block, y_view_block = (frame_block(t, block, frame_dim) for t in (x, y, y_view))
            if scale:
                x_block = x_block * frame_block(x_view, block, frame_dim)
            torch.addcmul(x_block, y_view_block, y_block, out=frame_block(result, block, frame_dim))
        return result

    def _add_multistep_correction(self, prev_sample, x0, level: Rows, next_level: Rows, active) -> None:
        """Add DPM-Solver++(2M)'s correction in place for the moving frames whose last move landed where they are
        (and that do not move onto level 0), then record ``x0`` as the moving frames' history."""
        if self._x0_history is not None and (self._x0_history.shape != x0.shape
                                             or len(self._landed_levels) != len(level)):
            self._reset_history()
        if self._x0_history is None:
            self._x0_history = torch.zeros_like(x0)
            self._history_levels = [[None] * len(row) for row in level]
            self._landed_levels = [[None] * len(row) for row in level]

        corrections, has_correction = [], False
        for rows in zip(level, next_level, active, self._history_levels, self._landed_levels, strict=True):
            corrections.append([])
            history_row, landed_row = rows[3:]
            for frame, (now, then, moves, previous, landed) in enumerate(zip(*rows, strict=True)):
                second_order = moves and landed == now and then > 0
                corrections[-1].append(dpmsolver_2m_correction(self.alpha_sigma(previous), self.alpha_sigma(now),
                                                               self.alpha_sigma(then)) if second_order else 0.0)
                has_correction |= second_order
                if moves:
                    history_row[frame], landed_row[frame] = now, then
        if has_correction:
            correction = self._frame_view(corrections, x0)
            prev_sample.addcmul_(correction, x0).addcmul_(correction, self._x0_history, value=-1)
        copy_frames(self._x0_history, x0, active, self.config.frame_dim)

    def predict_original_sample(
        self, model_output: torch.Tensor, noise_level: LevelsLike, sample: torch.Tensor
    ) -> torch.Tensor:
        """The model's per-frame estimate of the clean latents, ``x0 = p x + q m`` (``x0_coefficients``) at
        ``noise_level`` (one, ``(F,)`` or ``(B, F)``)."""
        level, _ = self._check_step_inputs(model_output, sample, noise_level, noise_level)
        compute_dtype = torch.promote_types(sample.dtype, torch.float32)
        x0 = self._combine(sample.to(compute_dtype), model_output.to(compute_dtype), self._x0_coefficients(level))
        return x0.to(sample.dtype)

    def add_noise(
        self, original_samples: torch.Tensor, noise: torch.Tensor, noise_levels: LevelsLike
    ) -> torch.Tensor:
        """The forward process per frame, ``alpha x0 + sigma eps`` at ``noise_levels`` (one, ``(F,)`` or
        ``(B, F)``): the starting latents of a plan's row 0 (noise, clean conditioning frames, or anything
        between)."""
        if noise.shape != original_samples.shape:
            raise ValueError(f"noise has shape {tuple(noise.shape)} but original_samples has "
                             f"{tuple(original_samples.shape)}")
        levels = self._frame_levels(noise_levels, "noise_levels", original_samples.shape[0],
                                    original_samples.shape[self.config.frame_dim])
        alpha, sigma = ([[self.alpha_sigma(level)[k] for level in row] for row in levels] for k in (0, 1))
        return self._frame_view(alpha, original_samples) * original_samples + \
            self._frame_view(sigma, original_samples) * noise

    def __len__(self) -> int:
        return self.config.num_train_timesteps


class FrameAwareFlowMatchScheduler(FrameAwareSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Per-frame (vectorized-timestep) flow-matching sampler for video models such as Wan, SkyReels-V2 and LTX-Video:
    FVDM (arXiv 2410.03160) / Diffusion Forcing (arXiv 2407.01392) sampling over a ``FrameTimestepPlan``.

    On the rectified-flow path ``x = (1 - sigma) x0 + sigma eps`` with a velocity model (``m = eps - x0``) the
    first-order step is Euler's, per frame: ``x' = x + (sigma' - sigma) m``; ``solver_order=2`` is DPM-Solver++(2M)
    (arXiv 2211.01095) with per-frame history (module docstring). Levels are ``FlowMatchEulerDiscreteScheduler``'s
    ``sigmas``; the model's timesteps are ``sigma * num_train_timesteps``.

    ``set_timesteps`` lays out ``FlowMatchEulerDiscreteScheduler``'s grid (``shift``, or dynamic shifting with
    ``mu``, or custom ``sigmas`` / ``timesteps``) as ``self.noise_levels`` (``n + 1`` levels ending at 0) and
    ``self.timesteps``; a config with ``flow_shift`` (Wan's and SkyReels-V2's ``UniPCMultistepScheduler``) sets
    ``shift``.

    Args:
        num_train_timesteps, shift, use_dynamic_shifting, base_shift, max_shift, base_image_seq_len,
            max_image_seq_len, shift_terminal, time_shift_type: as in ``FlowMatchEulerDiscreteScheduler``.
        prediction_type: what the model predicts; ``"flow_prediction"`` (velocity) for flow models.
        solver_order: 1 (Euler / DDIM) or 2 (DPM-Solver++(2M)).
        frame_dim: the frame axis of the latents (2 for ``(B, C, F, H, W)``).
    """

    _compatibles = ["FlowMatchEulerDiscreteScheduler", "UniPCMultistepScheduler", "DPMSolverMultistepScheduler"]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        shift: float = 1.0,
        use_dynamic_shifting: bool = False,
        base_shift: float | None = 0.5,
        max_shift: float | None = 1.15,
        base_image_seq_len: int = 256,
        max_image_seq_len: int = 4096,
        shift_terminal: float | None = None,
        time_shift_type: str = "exponential",
        prediction_type: str = "flow_prediction",
        solver_order: int = 1,
        frame_dim: int = 2,
    ):
        self._init_frame_aware()

    @classmethod
    def extract_init_dict(cls, config_dict, **kwargs):
        # Wan's and SkyReels-V2's UniPC configs name the shift `flow_shift`; without this, from_config would keep
        # shift=1.0 and sample on an unshifted grid.
        if "flow_shift" in config_dict and "shift" not in config_dict:
            config_dict = {**config_dict, "shift": config_dict["flow_shift"]}
        return super().extract_init_dict(config_dict, **kwargs)

    def _grid_scheduler(self) -> FlowMatchEulerDiscreteScheduler:
        keys = ("num_train_timesteps", "shift", "use_dynamic_shifting", "base_shift", "max_shift",
                "base_image_seq_len", "max_image_seq_len", "shift_terminal", "time_shift_type")
        return FlowMatchEulerDiscreteScheduler(**{key: self.config[key] for key in keys})

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """``FlowMatchEulerDiscreteScheduler.set_timesteps``' grid: ``self.timesteps`` (``n``, float32, on
        ``device``) and ``self.noise_levels`` (``n + 1`` levels ending at 0, float64 on the CPU, for
        ``FrameTimestepPlan``). Clears the solver's history."""
        grid = self._grid_scheduler()
        grid.set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.num_inference_steps = grid.num_inference_steps
        self.timesteps = grid.timesteps
        self.noise_levels = grid.sigmas.detach().to("cpu", torch.float64)
        self._reset_history()

    def alpha_sigma(self, noise_levels):
        """``(1 - sigma, sigma)`` (``diffusion_math.flow_alpha_sigma`` on the [0, 1] scale), for floats or tensors."""
        return 1 - noise_levels, noise_levels

    def timesteps_from_noise_levels(self, noise_levels: LevelsLike) -> torch.Tensor:
        """The model's timesteps at ``noise_levels``: ``sigma * num_train_timesteps``, float32."""
        return (torch.as_tensor(noise_levels, dtype=torch.float64) * self.config.num_train_timesteps).float()

    def noise_levels_from_timesteps(self, timesteps: LevelsLike) -> torch.Tensor:
        """``timesteps / num_train_timesteps``, float64 (e.g. to read a SkyReels-style timestep matrix)."""
        return torch.as_tensor(timesteps, dtype=torch.float64) / self.config.num_train_timesteps


class FrameAwareVPScheduler(FrameAwareSchedulerMixin, SchedulerMixin, ConfigMixin):
    """Per-frame (vectorized-timestep) sampler for VP (DDPM-family) video models: FVDM (arXiv 2410.03160) / Diffusion
    Forcing (arXiv 2407.01392) sampling over a ``FrameTimestepPlan``.

    On the VP path ``x = alpha x0 + sigma eps``, ``alpha = sqrt(1 - sigma^2)``, the first-order step is DDIM's
    ("Denoising Diffusion Implicit Models", Song et al., arXiv 2010.02502) with ``eta``, per frame (module docstring);
    ``solver_order=2`` is DPM-Solver++(2M) (arXiv 2211.01095) with per-frame history. A level is
    ``sqrt(1 - alphas_cumprod[t])``; the model's timesteps are the training timesteps with that level (fractional
    between the integers, interpolated as ``diffusion_math.vp_alpha_sigma`` does).

    ``set_timesteps(n)`` takes ``DDIMScheduler``'s timesteps (``timestep_spacing``, ``steps_offset``) and ends at
    level 0 (``set_alpha_to_one=True``) or at timestep 0's level; each step lands on the next grid level (DDIM itself
    steps to ``t - num_train_timesteps // n``, the same for ``"leading"`` and ``"trailing"`` spacing). No ``x0``
    clipping or thresholding.

    Args:
        num_train_timesteps, beta_start, beta_end, beta_schedule, trained_betas, rescale_betas_zero_snr: the training
            noise schedule, as in every diffusers VP scheduler.
        set_alpha_to_one, steps_offset, timestep_spacing: as in ``DDIMScheduler``.
        prediction_type: ``"epsilon"``, ``"sample"`` or ``"v_prediction"``.
        solver_order: 1 (DDIM) or 2 (DPM-Solver++(2M)).
        frame_dim: the frame axis of the latents (2 for ``(B, C, F, H, W)``).
    """

    _compatibles = [e.name for e in KarrasDiffusionSchedulers]

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        beta_start: float = 0.0001,
        beta_end: float = 0.02,
        beta_schedule: str = "linear",
        trained_betas: list[float] | None = None,
        rescale_betas_zero_snr: bool = False,
        set_alpha_to_one: bool = True,
        steps_offset: int = 0,
        timestep_spacing: str = "leading",
        prediction_type: str = "epsilon",
        solver_order: int = 1,
        frame_dim: int = 2,
    ):
        self._init_frame_aware()
        self.alphas_cumprod = vp_alphas_cumprod(self.config)

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """``DDIMScheduler``'s timesteps (int64, on ``device``) and ``self.noise_levels`` (``n + 1`` levels, float64 on
        the CPU, for ``FrameTimestepPlan``). Clears the solver's history."""
        keys = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                "rescale_betas_zero_snr", "set_alpha_to_one", "steps_offset", "timestep_spacing")
        grid = DDIMScheduler(**{key: self.config[key] for key in keys})
        grid.set_timesteps(num_inference_steps, device=device)
        final_level = (1 - grid.final_alpha_cumprod.double()).sqrt().reshape(1)
        self.num_inference_steps = grid.num_inference_steps
        self.timesteps = grid.timesteps
        self.noise_levels = torch.cat([self.noise_levels_from_timesteps(grid.timesteps.cpu()), final_level])
        self._reset_history()

    def alpha_sigma(self, noise_levels):
        """``(sqrt(1 - sigma^2), sigma)``, for floats or tensors."""
        if isinstance(noise_levels, torch.Tensor):
            return (1 - noise_levels**2).sqrt(), noise_levels
        return math.sqrt(1 - noise_levels * noise_levels), noise_levels

    def noise_levels_from_timesteps(self, timesteps: LevelsLike) -> torch.Tensor:
        """``sigma_t = sqrt(1 - alphas_cumprod[t])`` at (possibly fractional) training timesteps, float64."""
        _, sigma = vp_alpha_sigma(torch.as_tensor(timesteps), self.alphas_cumprod)
        return sigma

    def timesteps_from_noise_levels(self, noise_levels: LevelsLike) -> torch.Tensor:
        """The (fractional) training timesteps at ``noise_levels``, float32: the inverse of
        ``noise_levels_from_timesteps``. Levels below timestep 0's (clean frames) give 0."""
        levels = torch.as_tensor(noise_levels, dtype=torch.float64)
        lowest, highest = self.noise_levels_from_timesteps(torch.tensor([0, self.config.num_train_timesteps - 1]))
        if (levels > highest * (1 + 1e-12)).any():
            raise ValueError(f"noise_levels must not exceed the last training timestep's level {highest.item():.8g}, "
                             f"got {levels.max().item():.8g}")
        alpha, sigma = self.alpha_sigma(levels.clamp(lowest, highest))
        # The round trip from a timestep's level may land an ulp outside the table of noise ratios.
        noise_ratio = (sigma / alpha).clamp(*vp_noise_ratio(self.alphas_cumprod[[0, -1]]))
        return vp_timesteps_from_noise_ratio(noise_ratio, self.alphas_cumprod).float()
