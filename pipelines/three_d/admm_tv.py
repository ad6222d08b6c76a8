"""DiffusionMBIR's data-consistency step: ADMM on a least-squares data term plus total variation along z.

"Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models" (DiffusionMBIR, Chung et al., arXiv 2211.10655)
denoises every slice of a volume with a 2D diffusion prior and, after each reverse-diffusion step, moves the whole
volume ``x`` (``(D, H, W)``) towards the solution of

    min_x  1/2 ||y - A x||^2 + tv_weight * ||D_z x||_1

where ``A`` is a linear operator of ``volume_operators`` and ``D_z`` the finite difference along dim 0
(``finite_difference_z``). ADMM with the split ``z = D_z x`` and the scaled dual ``u``, penalty ``rho``; one iteration:

    x <- CG solve of (A^T A + rho D_z^T D_z) x = A^T y + rho D_z^T (z - u), warm-started at the current x
    z <- soft_threshold(D_z x + u, tv_weight / rho)
    u <- u + D_z x - z

As in the official code (github.com/HJ-harry/DiffusionMBIR, ``get_pc_radon_ADMM_TV_vol``), each diffusion step runs
one ADMM iteration with one conjugate-gradient iteration, starting from the diffusion's current sample, and ``z``,
``u`` start at zero and persist from one diffusion step to the next (``ADMMTVState`` carries them). The paper's prior
only regularises along z: the 2D diffusion model is the in-plane prior.

Two differences from the official code, both deliberate: ``D_z`` has open ends (``D - 1`` differences; the official
one wraps around, tying the first slice to the last), and ``A^T`` is the exact adjoint, whereas the official
back-projection is ``pi / (2 num_views)`` times it. The official CT settings ``lamb_1 = 0.04, rho = 10`` therefore
correspond here to ``tv_weight = 0.04 / c`` and ``rho = 10 / c`` with ``c = pi / (2 num_views)`` (for volumes in
[0, 1] and line integrals in pixel units, as here).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import Tensor

from .volume_operators import _require_volume


def finite_difference_z(volume: Tensor) -> Tensor:
    """``D_z x``: the forward differences ``x[d + 1] - x[d]`` along dim 0, ``(D - 1, H, W)``."""
    _require_volume(volume)
    return volume.diff(dim=0)


def finite_difference_z_adjoint(differences: Tensor) -> Tensor:
    """``D_z^T g`` for ``g`` of shape ``(D - 1, H, W)``: ``(D_z^T g)[d] = g[d - 1] - g[d]`` with ``g[-1] = g[D - 1]
    = 0``, a ``(D, H, W)`` volume."""
    _require_volume(differences, "differences")
    zero = differences.new_zeros((1, *differences.shape[1:]))
    return -torch.cat([zero, differences, zero]).diff(dim=0)


def soft_threshold(values: Tensor, threshold: float) -> Tensor:
    """The proximal map of ``threshold * ||.||_1``: ``sign(v) * max(|v| - threshold, 0)`` elementwise."""
    if threshold < 0:
        raise ValueError(f"threshold must be >= 0, got {threshold!r}")
    return values.sign() * (values.abs() - threshold).clamp(min=0)


def conjugate_gradient(apply_matrix: Callable[[Tensor], Tensor], rhs: Tensor, x0: Tensor,
                       num_iterations: int) -> Tensor:
    """``num_iterations`` conjugate-gradient iterations on ``M x = rhs`` from ``x0``, for a symmetric positive
    (semi-)definite ``M`` given as ``apply_matrix(x) = M x``; inner products run over all elements of the tensors.
    Stops early once the residual is at rounding level (``eps * ||rhs||``), where another step would divide by
    rounding noise."""
    if isinstance(num_iterations, bool) or not isinstance(num_iterations, int) or num_iterations < 0:
        raise ValueError(f"num_iterations must be an integer >= 0, got {num_iterations!r}")
    if rhs.shape != x0.shape:
        raise ValueError(f"rhs and x0 must have the same shape, got {tuple(rhs.shape)} and {tuple(x0.shape)}")
    x = x0.clone()
    residual = rhs - apply_matrix(x)
    direction = residual.clone()
    residual_norm2 = residual.pow(2).sum()
    floor = (torch.finfo(rhs.dtype).eps * rhs.norm()) ** 2
    for _ in range(num_iterations):
        if residual_norm2 <= floor:
            break
        image = apply_matrix(direction)
        step = residual_norm2 / (direction * image).sum()
        x = x + step * direction
        residual = residual - step * image
        new_norm2 = residual.pow(2).sum()
        direction = residual + (new_norm2 / residual_norm2) * direction
        residual_norm2 = new_norm2
    return x


@dataclass
class ADMMTVState:
    """What ADMM carries between calls (between diffusion steps, in DiffusionMBIR): the split variable ``z``
    (``≈ D_z x``) and the scaled dual ``u``, both ``(D - 1, H, W)``."""

    split: Tensor
    scaled_dual: Tensor

    @classmethod
    def zeros_for(cls, volume: Tensor) -> ADMMTVState:
        """The initial state (both zero) for volumes shaped, typed and placed like ``volume``."""
        _require_volume(volume)
        shape = (volume.shape[0] - 1, *volume.shape[1:])
        return cls(volume.new_zeros(shape), volume.new_zeros(shape))


def _require_positive_number(name: str, value: object, *, allow_zero: bool) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not (
            value >= 0 if allow_zero else value > 0) or value != value or value == float("inf"):
        raise ValueError(f"{name} must be a finite number {'>= 0' if allow_zero else '> 0'}, got {value!r}")
    return float(value)


def admm_tv_update(volume: Tensor, measurement: Tensor, operator, *, rho: float, tv_weight: float,
                   state: ADMMTVState | None = None, num_admm_iterations: int = 1,
                   num_cg_iterations: int = 1) -> tuple[Tensor, ADMMTVState]:
    """``num_admm_iterations`` ADMM iterations (each with ``num_cg_iterations`` CG iterations for the x-update) on
    ``min_x 1/2 ||measurement - A x||^2 + tv_weight ||D_z x||_1``, starting at ``volume`` and ``state`` (zeros when
    ``None``). Returns the new volume and state; the inputs are left unchanged. With the defaults this is one
    DiffusionMBIR data-consistency step.

    Args:
        volume: the current estimate ``(D, H, W)``, at least two slices.
        measurement: ``y``, checked with ``operator.check_measurement``.
        operator: a linear operator with ``forward`` / ``adjoint`` (``volume_operators``).
        rho: the ADMM penalty, > 0.
        tv_weight: the weight ``lambda`` of the z-TV, >= 0 (0: least squares).
        state: ``z`` and ``u`` from the previous call.
        num_admm_iterations, num_cg_iterations: iteration counts, >= 1.
    """
    _require_volume(volume)
    if volume.shape[0] < 2:
        raise ValueError(f"volume needs at least two slices for a difference along z, got shape {tuple(volume.shape)}")
    rho = _require_positive_number("rho", rho, allow_zero=False)
    tv_weight = _require_positive_number("tv_weight", tv_weight, allow_zero=True)
    for name, value in (("num_admm_iterations", num_admm_iterations), ("num_cg_iterations", num_cg_iterations)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be an integer >= 1, got {value!r}")
    operator.check_measurement(measurement, volume.shape)
    if state is None:
        state = ADMMTVState.zeros_for(volume)
    expected = (volume.shape[0] - 1, *volume.shape[1:])
    if not isinstance(state, ADMMTVState) or tuple(state.split.shape) != expected or tuple(
            state.scaled_dual.shape) != expected:
        raise ValueError(f"state must be an ADMMTVState with tensors of shape {expected} (the volume's z-differences)")

    measurement = measurement.to(volume)
    split, scaled_dual = state.split.to(volume), state.scaled_dual.to(volume)

    def normal_matrix(x: Tensor) -> Tensor:
        return operator.adjoint(operator.forward(x)) + rho * finite_difference_z_adjoint(finite_difference_z(x))

    back_projection = operator.adjoint(measurement)
    for _ in range(num_admm_iterations):
        rhs = back_projection + rho * finite_difference_z_adjoint(split - scaled_dual)
        volume = conjugate_gradient(normal_matrix, rhs, volume, num_cg_iterations)
        differences = finite_difference_z(volume)
        split = soft_threshold(differences + scaled_dual, tv_weight / rho)
        scaled_dual = scaled_dual + differences - split
    return volume, ADMMTVState(split, scaled_dual)


__all__ = [
    "ADMMTVState",
    "admm_tv_update",
    "conjugate_gradient",
    "finite_difference_z",
    "finite_difference_z_adjoint",
    "soft_threshold",
]
