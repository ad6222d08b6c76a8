r"""``DiffusionMBIRPipeline``: 3D inverse problems (sparse-view and limited-angle CT, through-plane super-resolution,
masking) solved with a 2D diffusion prior on slices and a total-variation prior across them.

Paper: "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models" (Hyungjin Chung, Dohoon Ryu, Michael T.
McCann, Marc L. Klasky, Jong Chul Ye; arXiv 2211.10655), DiffusionMBIR.

A volume ``v`` is ``(D, H, W)`` in data units (``[0, 1]``), measured by a linear operator ``A`` (``forward`` /
``adjoint``, ``pipelines/three_d/volume_operators.py``) as ``y = A v``. The 2D ``unet`` models single slices in the
diffusers range ``x = 2 v - 1``; slices are taken along ``axis`` (dim 0 by default) and denoised in batches of
``slice_batch_size``. One step ``i`` of ``num_inference_steps`` (timestep ``t``, next noise level ``t'``):

    x_t' = scheduler.step(unet(x_t[slices], t), t, x_t)            every slice, one scheduler step on the whole volume
    u    = (x_t' / alpha_t' + 1) / 2                                the state on the variance-exploding path, data units
    u    <- ADMM-TV(u; y)                                            data consistency + TV across slices (below)
    x_t' = alpha_t' (2 u - 1)

DiffusionMBIR runs on the variance-exploding SDE, whose state ``x0 + s z`` is a VP state divided by ``alpha``; the
update therefore acts on ``x_t' / alpha_t'`` (``alpha = 1`` after the last step). ADMM-TV is ``admm_iterations``
iterations of ADMM on ``min_u 1/2 ||y - A u||^2 + lambda ||D u||_1`` with ``D`` the finite difference across the slices
(along ``axis``), warm-started at ``u``, its splitting variables ``z = D u`` and scaled dual ``w`` carried from step to
step (the authors' code keeps them for the whole run), one pair per axis:

    u <- CG_{cg_iterations}[(A^T A + rho D^T D) u = A^T y + rho D^T (z - w)]     from the current u
    z <- soft_threshold(D u + w, lambda / rho)
    w <- w + D u - z

(``pipelines/three_d/admm_tv.py``). With ``lambda_tv = 0`` there is no TV prior: the update is ``cg_iterations`` of CG
on ``A^T A u = A^T y`` from the diffusion's ``u`` (slice-wise data consistency, the paper's ablation without the
z-TV). The paper uses ``rho = 10``, ``lambda = 0.04``, one ADMM iteration with one CG iteration per step, for its
operator's scale and 2000 steps. The defaults here depend on the operator's kind (``DEFAULT_ADMM_SETTINGS``:
10 / 1 for projections, 0.1 / 0.01 for slice sampling and masks), the best found at 50 steps
(``volume_demo.TASKS``). ``rho`` has to match the scale of ``A^T A`` (about ``num_views * size`` for
``ParallelBeamProjection``, 1 for ``ThroughPlaneDownsampling`` and masks): the carried ``z`` holds the slice
differences of the previous, noisier state, and with a ``rho`` far above ``A^T A``'s scale the CG step pulls the new
state back to them, which with tens of steps rather than thousands makes the reconstruction diverge (measured on the
exact oracle, a mask and 50 steps: stable at ``rho = 0.1``, diverging at ``rho = 1``). ``alternate_axes`` cycles
the slicing axis (and the TV's) from step to step.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...diffusion_math import alpha_sigma_function, noise_path_from_scheduler_config
from .admm_tv import ADMMTVState, admm_tv_update, conjugate_gradient
from .volume_operators import ParallelBeamProjection, ThroughPlaneDownsampling, VolumeMask

OUTPUT_TYPES = ("np", "pt", "montage")
# (rho, lambda_tv) by operator, chosen on a training phantom at 50 steps (volume_demo.TASKS): rho must match the
# scale of A^T A, about views x size for projections and 1 for slice sampling and masks. The authors' script's
# lamb = 0.04, rho = 10 are for their back-projector's scale and 2000 steps.
DEFAULT_ADMM_SETTINGS = {ParallelBeamProjection: (10.0, 1.0), ThroughPlaneDownsampling: (0.1, 0.01),
                         VolumeMask: (0.1, 0.01)}


def default_admm_settings(operator: Any) -> tuple[float, float]:
    """``(rho, lambda_tv)`` for ``operator``'s kind; a ``ValueError`` for another kind, whose scale is unknown."""
    for kind, settings in DEFAULT_ADMM_SETTINGS.items():
        if isinstance(operator, kind):
            return settings
    raise ValueError(f"no default rho / lambda_tv for a {type(operator).__name__}: pass both (rho of the order of "
                     "the scale of A^T A)")


@dataclass
class DiffusionMBIRPipelineOutput(BaseOutput):
    """``volume``: the reconstruction ``(D, H, W)`` in data units (``np.ndarray`` or ``torch.Tensor``, in the
    UNet's dtype, unclipped), or a ``PIL.Image`` montage of its slices along dim 0 (clipped to ``[0, 1]``)."""

    volume: np.ndarray | torch.Tensor | PIL.Image.Image


def volume_montage(volume: torch.Tensor | np.ndarray, columns: int | None = None) -> PIL.Image.Image:
    """The slices ``volume[d]`` of a ``(D, H, W)`` volume in ``[0, 1]`` side by side, row by row (``columns`` per row,
    about a square grid by default), as an 8-bit grayscale image; values outside ``[0, 1]`` are clipped."""
    volume = np.asarray(volume.detach().cpu() if isinstance(volume, torch.Tensor) else volume, dtype=np.float32)
    depth, height, width = volume.shape
    columns = columns or math.ceil(math.sqrt(depth))
    rows = math.ceil(depth / columns)
    sheet = np.zeros((rows * height, columns * width), dtype=np.float32)
    for index, image in enumerate(volume):
        row, column = divmod(index, columns)
        sheet[row * height:(row + 1) * height, column * width:(column + 1) * width] = image
    return PIL.Image.fromarray((np.clip(sheet, 0, 1) * 255).round().astype(np.uint8), mode="L")


class AxisMovedOperator:
    """``operator`` seen on volumes whose dim 0 is the original ``axis``: the ADMM's finite difference runs along
    dim 0, so TV along another axis runs on the moved volume."""

    def __init__(self, operator: Any, axis: int):
        self.operator, self.axis = operator, axis

    def check_measurement(self, measurement: torch.Tensor, volume_shape: Sequence[int]) -> None:
        shape = list(volume_shape)
        shape.insert(self.axis, shape.pop(0))
        self.operator.check_measurement(measurement, tuple(shape))

    def forward(self, volume: torch.Tensor) -> torch.Tensor:
        return self.operator.forward(volume.movedim(0, self.axis))

    def adjoint(self, measurement: torch.Tensor) -> torch.Tensor:
        return self.operator.adjoint(measurement).movedim(self.axis, 0)


def _require_integer(name: str, value: Any, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def _require_number(name: str, value: Any, minimum: float, strict: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or (
            value <= minimum if strict else value < minimum):
        raise ValueError(f"{name} must be a finite number {'>' if strict else '>='} {minimum:g}, got {value!r}")
    return float(value)


class DiffusionMBIRPipeline(DiffusionPipeline):
    r"""Reconstruct a volume from a linear measurement with a 2D diffusion prior on its slices and ADMM-TV across them
    (DiffusionMBIR, arXiv 2211.10655; the update equations are in the module docstring).

    Components:
        unet: a 2D model of single slices, one channel in and out, in ``[-1, 1]`` (a ``UNet2DModel``; the exact test
            oracle ``diffusers_ext.testing.volume_oracle`` fits too).
        scheduler: a VP (DDPM-family) scheduler whose samples are ``alpha_t x0 + sigma_t eps`` (``DDPMScheduler``,
            ``DDIMScheduler``, ``DPMSolverMultistepScheduler``, ``UniPCMultistepScheduler``, ...); schedulers that
            sample in the variance-exploding scale (``init_noise_sigma != 1``: Euler, Heun, ...) are refused.
    """

    model_cpu_offload_seq = "unet"
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler):
        super().__init__()
        self.register_modules(unet=unet, scheduler=scheduler)

    # Checks ---------------------------------------------------------------------------------------------------------
    def slice_shape_error(self, slice_shape: tuple[int, int]) -> str | None:
        """Why the UNet cannot take slices of ``slice_shape`` (``None`` when it can): a ``UNet2DModel`` takes sides
        that are multiples of its downsampling, another model (the oracle) its ``sample_size`` only."""
        config = self.unet.config
        if isinstance(self.unet, UNet2DModel):
            multiple = 2 ** (len(config.block_out_channels) - 1)
            if any(side % multiple for side in slice_shape):
                return f"this UNet takes slices whose sides are multiples of {multiple}"
            return None
        size = config.sample_size
        expected = (size, size) if isinstance(size, int) else tuple(size)
        return None if tuple(slice_shape) == expected else f"this model takes slices of {expected[0]}x{expected[1]}"

    def check_components(self) -> None:
        config = self.unet.config
        channels = (config.get("in_channels"), config.get("out_channels", config.get("in_channels")))
        if channels != (1, 1):
            raise ValueError(f"the unet must model one-channel slices (in_channels = out_channels = 1), got "
                             f"in_channels={channels[0]}, out_channels={channels[1]}")
        if noise_path_from_scheduler_config(self.scheduler.config) != "vp":
            raise ValueError(f"DiffusionMBIRPipeline needs a VP (DDPM-family) scheduler, got "
                             f"{type(self.scheduler).__name__}")
        if getattr(self.scheduler, "init_noise_sigma", 1.0) != 1.0:
            raise ValueError(f"{type(self.scheduler).__name__} samples in the variance-exploding scale "
                             f"(init_noise_sigma={float(self.scheduler.init_noise_sigma):g}); use a scheduler whose "
                             "samples are alpha_t x0 + sigma_t eps (DDPM, DDIM, DPM-Solver multistep, UniPC)")

    def check_inputs(self, measurement, operator, volume_shape, axes, lambda_tv, output_type,
                     tensor_inputs) -> tuple[int, ...]:
        for method in ("forward", "adjoint", "check_measurement"):
            if not callable(getattr(operator, method, None)):
                raise TypeError(f"operator must have forward, adjoint and check_measurement (see "
                                f"pipelines/three_d/volume_operators.py); {type(operator).__name__} has no {method}")
        if (not isinstance(volume_shape, (tuple, list)) or len(volume_shape) != 3
                or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                           for n in volume_shape)):
            raise ValueError(f"volume_shape must be three positive integers (D, H, W), got {volume_shape!r}")
        volume_shape = tuple(int(n) for n in volume_shape)
        if not isinstance(measurement, torch.Tensor):
            raise ValueError(f"measurement must be a torch tensor, got {type(measurement).__name__}")
        operator.check_measurement(measurement, volume_shape)
        for axis in sorted(set(axes)):
            if lambda_tv > 0 and volume_shape[axis] < 2:
                raise ValueError(f"lambda_tv > 0 needs at least two slices along axis {axis} for the TV across them; "
                                 f"the volume has shape {volume_shape}")
            slice_shape = tuple(n for dim, n in enumerate(volume_shape) if dim != axis)
            problem = self.slice_shape_error(slice_shape)
            if problem is not None:
                raise ValueError(f"a volume of shape {volume_shape} has slices of {slice_shape[0]}x{slice_shape[1]} "
                                 f"along axis {axis}; {problem}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got "
                             f"{sorted(unknown)}")
        return volume_shape

    @staticmethod
    def slicing_axes(axis: Any, alternate_axes: Sequence[int] | None) -> tuple[int, ...]:
        """The slicing axis of step ``i`` is ``axes[i % len(axes)]``."""
        axes = (axis,) if alternate_axes is None else tuple(alternate_axes)
        if not axes or not all(isinstance(a, (int, np.integer)) and not isinstance(a, bool) and a in (0, 1, 2)
                               for a in axes):
            name = "axis" if alternate_axes is None else "alternate_axes"
            raise ValueError(f"{name} must be {'one of' if alternate_axes is None else 'a non-empty sequence of'} "
                             f"0, 1, 2 (the volume's dims), got {axis if alternate_axes is None else alternate_axes!r}")
        return tuple(int(a) for a in axes)

    # The loop -------------------------------------------------------------------------------------------------------
    def predict_slices(self, latents: torch.Tensor, timestep: torch.Tensor, axis: int,
                       slice_batch_size: int) -> torch.Tensor:
        """The UNet's prediction for every slice of ``latents`` ``(D, 1, H, W)`` along ``axis``, ``slice_batch_size``
        slices per call, laid out as ``latents``."""
        slices = latents[:, 0].movedim(axis, 0)
        prediction = torch.empty_like(slices)
        for start in range(0, slices.shape[0], slice_batch_size):
            batch = slices[start:start + slice_batch_size, None]
            model_input = self.scheduler.scale_model_input(batch, timestep)
            prediction[start:start + slice_batch_size] = self.unet(model_input, timestep).sample[:, 0]
        return prediction.movedim(0, axis)[:, None]

    def next_alpha(self, step_index: int) -> float:
        """``alpha`` of the state a scheduler step leaves: the next timestep's, 1 (clean) after the last step."""
        timesteps = self.scheduler.timesteps
        if step_index + 1 >= len(timesteps):
            return 1.0
        alpha, _ = alpha_sigma_function(self.scheduler.config)(timesteps[step_index + 1].cpu())
        return float(alpha)

    @torch.no_grad()
    def __call__(
        self,
        measurement: torch.Tensor,
        operator: Any,
        volume_shape: Sequence[int],
        num_inference_steps: int = 50,
        rho: float | None = None,
        lambda_tv: float | None = None,
        admm_iterations: int = 1,
        cg_iterations: int = 1,
        axis: int = 0,
        alternate_axes: Sequence[int] | None = None,
        slice_batch_size: int = 16,
        generator: torch.Generator | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> DiffusionMBIRPipelineOutput | tuple:
        """
        Args:
            measurement: ``y = A v`` of the volume to reconstruct, of ``operator.measurement_shape(volume_shape)``,
                finite.
            operator: the linear operator ``A`` (``forward``, ``adjoint``, ``check_measurement``), e.g.
                ``ParallelBeamProjection``, ``ThroughPlaneDownsampling``, ``VolumeMask``.
            volume_shape: ``(D, H, W)`` of the volume.
            num_inference_steps: diffusion steps (each followed by one ADMM-TV update).
            rho: the ADMM penalty ``rho`` (> 0); default: the operator kind's (``DEFAULT_ADMM_SETTINGS``).
            lambda_tv: the TV weight ``lambda`` across slices (>= 0; 0: slice-wise data consistency only);
                default: the operator kind's.
            admm_iterations: ADMM iterations per diffusion step (the paper: 1).
            cg_iterations: conjugate-gradient iterations per ADMM iteration (the paper: 1).
            axis: the volume dim the 2D prior's slices are taken along (and the TV runs across): 0, 1 or 2.
            alternate_axes: slicing axes to cycle through from step to step (e.g. ``(0, 1)``); overrides ``axis``.
            slice_batch_size: slices per UNet call; bounds the memory of the UNet's activations.
            generator: for the starting noise and stochastic schedulers.
            output_type: ``"np"`` / ``"pt"`` (the volume ``(D, H, W)``) or ``"montage"`` (a PIL image of its slices).
            callback_on_step_end: ``callback(pipe, i, t, {"latents": ...}) -> dict`` after each step's update; the
                latents are the state ``(D, 1, H, W)`` in model space and may be replaced.
            callback_on_step_end_tensor_inputs: which of ``_callback_tensor_inputs`` the callback receives.

        Returns:
            ``DiffusionMBIRPipelineOutput(volume=...)``, or ``(volume,)`` when ``return_dict=False``.
        """
        num_inference_steps = _require_integer("num_inference_steps", num_inference_steps, 1)
        if rho is None or lambda_tv is None:
            default_rho, default_lambda_tv = default_admm_settings(operator)
            rho = default_rho if rho is None else rho
            lambda_tv = default_lambda_tv if lambda_tv is None else lambda_tv
        rho = _require_number("rho", rho, 0.0, strict=True)
        lambda_tv = _require_number("lambda_tv", lambda_tv, 0.0, strict=False)
        admm_iterations = _require_integer("admm_iterations", admm_iterations, 1)
        cg_iterations = _require_integer("cg_iterations", cg_iterations, 1)
        slice_batch_size = _require_integer("slice_batch_size", slice_batch_size, 1)
        axes = self.slicing_axes(axis, alternate_axes)
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        self.check_components()
        volume_shape = self.check_inputs(measurement, operator, volume_shape, axes, lambda_tv, output_type,
                                         tensor_inputs)

        device, dtype = self._execution_device, self.unet.dtype
        measurement = measurement.to(device=device, dtype=dtype)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = randn_tensor((volume_shape[0], 1, *volume_shape[1:]), generator=generator, device=device,
                               dtype=dtype)
        latents = latents * self.scheduler.init_noise_sigma
        moved_operators = {a: AxisMovedOperator(operator, a) for a in set(axes)}
        admm_states: dict[int, ADMMTVState] = {}  # z and w of each TV axis, carried across steps
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            slice_axis = axes[i % len(axes)]
            prediction = self.predict_slices(latents, t, slice_axis, slice_batch_size)
            latents = self.scheduler.step(prediction, t, latents, generator=generator).prev_sample
            alpha = self.next_alpha(i)
            volume = (latents[:, 0] / alpha + 1) / 2
            if lambda_tv == 0:
                volume = conjugate_gradient(lambda u: operator.adjoint(operator.forward(u)),
                                            operator.adjoint(measurement), volume, cg_iterations)
            else:
                moved = volume.movedim(slice_axis, 0)
                state = admm_states.get(slice_axis)
                moved, admm_states[slice_axis] = admm_tv_update(
                    moved, measurement, moved_operators[slice_axis], rho=rho, tv_weight=lambda_tv, state=state,
                    num_admm_iterations=admm_iterations, num_cg_iterations=cg_iterations)
                volume = moved.movedim(0, slice_axis)
            latents = (alpha * (2 * volume - 1))[:, None]
            if callback_on_step_end is not None:
                returned = callback_on_step_end(self, i, t, {name: {"latents": latents}[name] for name in tensor_inputs})
                latents = returned.pop("latents", latents)

        volume = ((latents[:, 0] + 1) / 2).contiguous()
        if output_type == "np":
            volume = volume.cpu().numpy()
        elif output_type == "montage":
            volume = volume_montage(volume)
        self.maybe_free_model_hooks()
        return DiffusionMBIRPipelineOutput(volume=volume) if return_dict else (volume,)
