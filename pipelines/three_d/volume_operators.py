"""Linear measurement operators on volumes, each with its exact adjoint, and the classical baselines they come with.

The operators are the forward models of "Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models"
(DiffusionMBIR, Chung et al., arXiv 2211.10655): sparse-view and limited-angle parallel-beam CT applied slice by
slice, through-plane downsampling (keep every k-th slice) and masking. A volume is a float tensor ``(D, H, W)``; its
slices along dim 0 (``(H, W)``, H = W for CT) are what a 2D prior sees.

Every operator ``A`` has ``forward(x) = A x``, ``adjoint(y) = A^T y`` with ``<A x, y> = <x, A^T y>`` exactly (up to
the rounding of the dtype), ``measurement_shape(volume_shape)`` and ``check_measurement(y, volume_shape)``, which
raises one ``ValueError`` for a measurement of the wrong shape or with NaN / inf. They follow the volume's dtype and
device.

Projection geometry (``ParallelBeamProjection``): pixel ``(i, j)`` of a ``size x size`` slice has its centre at
``(x, y) = (j - (size - 1) / 2, i - (size - 1) / 2)`` in pixel units; at angle ``theta`` it lies on the detector at
``s = x cos(theta) + y sin(theta)``, and its value (times its unit area) is shared between the two nearest detector
bins (unit spacing, centred) by linear interpolation. The sinogram of a slice is ``(num_angles, num_detectors)``, the
line integrals in pixel units. The transpose of this pixel-driven projector is the usual linearly interpolating
back-projector, so ``filtered_back_projection`` is the adjoint applied to ramp-filtered projections.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def _require_volume(volume: Tensor, name: str = "volume") -> None:
    if not isinstance(volume, Tensor) or not volume.is_floating_point() or volume.dim() != 3:
        raise ValueError(f"{name} must be a float tensor (D, H, W), got "
                         f"{volume.dtype if isinstance(volume, Tensor) else type(volume).__name__} "
                         f"{tuple(volume.shape) if isinstance(volume, Tensor) else ''}".rstrip())


def _require_volume_shape(volume_shape: Sequence[int]) -> tuple[int, int, int]:
    shape = tuple(volume_shape)
    if len(shape) != 3 or not all(isinstance(n, (int, np.integer)) and not isinstance(n, bool) and n >= 1
                                  for n in shape):
        raise ValueError(f"volume_shape must be three positive integers (D, H, W), got {volume_shape!r}")
    return tuple(int(n) for n in shape)


def _require_positive_integer(name: str, value: object, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
    return int(value)


def check_measurement_tensor(measurement: Tensor, expected_shape: tuple[int, ...], what: str) -> None:
    """Raise one ``ValueError`` unless ``measurement`` is a float tensor of ``expected_shape`` with finite values."""
    if not isinstance(measurement, Tensor) or not measurement.is_floating_point():
        raise ValueError(f"the measurement of {what} must be a float tensor of shape {expected_shape}, got "
                         f"{measurement.dtype if isinstance(measurement, Tensor) else type(measurement).__name__}")
    if tuple(measurement.shape) != expected_shape:
        raise ValueError(f"the measurement of {what} must have shape {expected_shape}, got {tuple(measurement.shape)}")
    if not bool(torch.isfinite(measurement).all()):
        raise ValueError(f"the measurement of {what} has NaN or infinite values")


# --------------------------------------------------------------------------------------------------------------------
# Parallel-beam CT, slice by slice
# --------------------------------------------------------------------------------------------------------------------


def sparse_view_angles(num_views: int) -> Tensor:
    """``num_views`` projection angles (radians, float64) evenly spread over ``[0, pi)``: sparse-view CT (the paper
    uses 8, 4 and 2 views; 8, 16, 32 are the usual settings)."""
    num_views = _require_positive_integer("num_views", num_views)
    return torch.arange(num_views, dtype=torch.float64) * (math.pi / num_views)


def limited_angle_angles(num_views: int, wedge: float = math.pi / 2) -> Tensor:
    """``num_views`` projection angles (radians, float64) evenly spread over the wedge ``[0, wedge)``: limited-angle
    CT (the paper's 90 degree wedge at one view per degree is ``limited_angle_angles(90)``)."""
    num_views = _require_positive_integer("num_views", num_views)
    if not isinstance(wedge, (int, float)) or isinstance(wedge, bool) or not 0 < wedge <= math.pi:
        raise ValueError(f"wedge must be an angle in (0, pi] radians, got {wedge!r}")
    return torch.arange(num_views, dtype=torch.float64) * (float(wedge) / num_views)


def _projection_matrix(angles: Tensor, size: int, num_detectors: int) -> Tensor:
    """The pixel-driven projection matrix, COO float64 ``(num_angles * num_detectors, size * size)``."""
    centres = torch.arange(size, dtype=torch.float64) - (size - 1) / 2
    y, x = torch.meshgrid(centres, centres, indexing="ij")  # row i -> y, column j -> x
    positions = (x.reshape(1, -1) * angles.cos()[:, None] + y.reshape(1, -1) * angles.sin()[:, None]
                 + (num_detectors - 1) / 2)  # (num_angles, pixels), in detector-bin units from bin 0
    lower = positions.floor()
    upper_weight = positions - lower
    lower = lower.long()
    pixels = torch.arange(size * size).expand_as(lower)
    angle_rows = (torch.arange(len(angles)) * num_detectors)[:, None].expand_as(lower)
    rows, columns, values = [], [], []
    for bin_offset, weight in ((0, 1 - upper_weight), (1, upper_weight)):
        bins = lower + bin_offset
        keep = (bins >= 0) & (bins < num_detectors)
        rows.append((angle_rows + bins)[keep])
        columns.append(pixels[keep])
        values.append(weight[keep])
    indices = torch.stack([torch.cat(rows), torch.cat(columns)])
    shape = (len(angles) * num_detectors, size * size)
    return torch.sparse_coo_tensor(indices, torch.cat(values), shape, check_invariants=True).coalesce()


class ParallelBeamProjection:
    """Parallel-beam projection of every slice ``volume[d]`` (``(size, size)``) at the given angles: the measurement
    is a sinogram ``(D, num_angles, num_detectors)`` of line integrals in pixel units.

    The projector is one sparse matrix ``P`` built once (float64, then cast per dtype / device on first use); the
    adjoint applies ``P^T`` built from the same entries, so ``<A x, y> = <x, A^T y>`` to rounding.

    Args:
        angles: projection angles in radians, each in ``[0, pi)`` (see ``sparse_view_angles``,
            ``limited_angle_angles``).
        size: the slices' height and width in pixels.
        num_detectors: detector bins of unit width; the default covers the whole square slice at every angle.
    """

    def __init__(self, angles: Sequence[float] | Tensor | np.ndarray, size: int, num_detectors: int | None = None):
        size = _require_positive_integer("size", size, minimum=2)
        angles = torch.as_tensor(np.asarray(angles.cpu() if isinstance(angles, Tensor) else angles, dtype=np.float64))
        if angles.dim() != 1 or len(angles) == 0:
            raise ValueError(f"angles must be a non-empty 1-D sequence of radians, got shape {tuple(angles.shape)}")
        if not bool(((angles >= 0) & (angles < math.pi)).all()):
            raise ValueError(f"angles must lie in [0, pi) radians (parallel beams at theta and theta + pi coincide), "
                             f"got values from {angles.min().item():.6g} to {angles.max().item():.6g}")
        if num_detectors is None:
            # Pixel centres reach (size - 1) / sqrt(2) from the centre, plus a spare bin each side for the
            # interpolation; the parity of size puts the bins on the pixel centres at 0 and pi / 2.
            num_detectors = math.ceil(math.sqrt(2) * (size - 1)) + 3
            num_detectors += (num_detectors - size) % 2
        num_detectors = _require_positive_integer("num_detectors", num_detectors)
        self.angles, self.size, self.num_detectors = angles, size, num_detectors
        self._coo = _projection_matrix(angles, size, num_detectors)
        self._matrices: dict[tuple[torch.dtype, torch.device], tuple[Tensor, Tensor]] = {}

    def __repr__(self) -> str:
        return (f"{type(self).__name__}(num_angles={len(self.angles)}, size={self.size}, "
                f"num_detectors={self.num_detectors})")

    def _apply(self, which: int, columns: Tensor) -> Tensor:
        """``P @ columns`` (``which = 0``) or ``P^T @ columns`` (1) in the columns' dtype and device; half precision
        is computed in float32 (torch has no half-precision sparse products on CPU, and long sums need the bits)."""
        compute_dtype = torch.float32 if columns.element_size() < 4 else columns.dtype
        key = (compute_dtype, columns.device)
        if key not in self._matrices:
            matrix = self._coo.to(dtype=compute_dtype, device=columns.device)
            # CSR products are 2-3x faster than COO ones on CPU; torch warns that CSR is "beta" on first use.
            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message="Sparse CSR tensor support is in beta state")
                self._matrices[key] = (matrix.to_sparse_csr(), matrix.t().coalesce().to_sparse_csr())
        return (self._matrices[key][which] @ columns.to(compute_dtype)).to(columns.dtype)

    def measurement_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int]:
        depth, height, width = _require_volume_shape(volume_shape)
        if (height, width) != (self.size, self.size):
            raise ValueError(f"this projection takes slices of {self.size}x{self.size} pixels, "
                             f"got a volume of shape {(depth, height, width)}")
        return (depth, len(self.angles), self.num_detectors)

    def check_measurement(self, measurement: Tensor, volume_shape: Sequence[int]) -> None:
        check_measurement_tensor(measurement, self.measurement_shape(volume_shape), repr(self))

    def forward(self, volume: Tensor) -> Tensor:
        _require_volume(volume)
        depth = volume.shape[0]
        measurement_shape = self.measurement_shape(volume.shape)
        # Slices as the columns of one dense matrix: one sparse product projects them all.
        return self._apply(0, volume.reshape(depth, -1).T).T.reshape(measurement_shape)

    def adjoint(self, measurement: Tensor) -> Tensor:
        if not isinstance(measurement, Tensor) or measurement.dim() != 3 or tuple(measurement.shape[1:]) != (
                len(self.angles), self.num_detectors):
            raise ValueError(f"the adjoint of {self!r} takes sinograms (D, {len(self.angles)}, {self.num_detectors}), "
                             f"got {tuple(measurement.shape) if isinstance(measurement, Tensor) else measurement!r}")
        depth = measurement.shape[0]
        return self._apply(1, measurement.reshape(depth, -1).T).T.reshape(depth, self.size, self.size)

    __call__ = forward


def ramp_filter(num_detectors: int, dtype: torch.dtype = torch.float64) -> Tensor:
    """The frequency response (``torch.fft.rfft`` layout) of the band-limited ramp filter for unit detector spacing,
    on ``num_detectors`` zero-padded to the next power of two at least twice as long: the Fourier transform of its
    sampled impulse response ``h(0) = 1/4``, ``h(n) = -1 / (pi n)^2`` for odd ``n``, 0 for even ``n`` (Kak & Slaney,
    eq. 61), which, unlike a sampled ``|omega|``, has the right zero-frequency value."""
    length = max(64, 2 ** math.ceil(math.log2(2 * num_detectors)))
    offsets = torch.cat([torch.arange(0, length // 2 + 1), torch.arange(-length // 2 + 1, 0)]).to(torch.float64)
    impulse = torch.where(offsets.remainder(2) == 1, -1 / (math.pi * offsets) ** 2, torch.zeros_like(offsets))
    impulse[0] = 0.25
    return torch.fft.rfft(impulse).real.to(dtype)


def _angular_weight(angles: Tensor) -> float:
    """The angular step each view stands for in the back-projection integral over ``[0, pi)``: the median gap between
    consecutive sorted angles, counting the wrap-around gap (``pi / n`` for ``n`` evenly spread views; the step of
    a limited-angle wedge, whose missing angles contribute nothing)."""
    ordered = angles.sort().values
    gaps = torch.cat([ordered.diff(), (ordered[:1] + math.pi - ordered[-1:])])
    return float(gaps.median()) if len(angles) > 2 else float(math.pi / len(angles))


def filtered_back_projection(sinogram: Tensor, operator: ParallelBeamProjection) -> Tensor:
    """Filtered back-projection, the classical CT baseline: each projection is convolved with the ramp filter
    (``ramp_filter``, zero padding), back-projected with ``operator.adjoint`` and weighted by the angular step, which
    approximates ``f(x, y) = int_0^pi (p_theta * h)(x cos theta + y sin theta) d theta``. Returns ``(D, size, size)``
    in the sinogram's dtype."""
    if not isinstance(operator, ParallelBeamProjection):
        raise TypeError(f"operator must be a ParallelBeamProjection, got {type(operator).__name__}")
    if not isinstance(sinogram, Tensor) or sinogram.dim() != 3:
        raise ValueError(f"sinogram must be a float tensor (D, num_angles, num_detectors), got "
                         f"{tuple(sinogram.shape) if isinstance(sinogram, Tensor) else type(sinogram).__name__}")
    operator.check_measurement(sinogram, (sinogram.shape[0], operator.size, operator.size))
    response = ramp_filter(operator.num_detectors, sinogram.dtype).to(sinogram.device)
    length = 2 * (len(response) - 1)
    filtered = torch.fft.irfft(torch.fft.rfft(sinogram, n=length) * response, n=length)
    filtered = filtered[..., : operator.num_detectors].contiguous()
    return operator.adjoint(filtered) * _angular_weight(operator.angles)


# --------------------------------------------------------------------------------------------------------------------
# Through-plane downsampling and masking
# --------------------------------------------------------------------------------------------------------------------


class ThroughPlaneDownsampling:
    """Keep every ``factor``-th slice along dim 0 (slices ``0, factor, 2 factor, ...``): the measurement of a
    ``(D, H, W)`` volume is ``(D / factor, H, W)``; ``D`` must be a multiple of ``factor``, so that a measurement
    tells its volume's depth and the adjoint (measured slices back in place, zeros elsewhere) needs nothing else.

    Args:
        factor: the slice spacing ``k`` of the measurement (4 for the paper's 4x through-plane super-resolution).
    """

    def __init__(self, factor: int):
        self.factor = _require_positive_integer("factor", factor)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(factor={self.factor})"

    def measurement_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int]:
        depth, height, width = _require_volume_shape(volume_shape)
        if depth % self.factor:
            raise ValueError(f"{self!r} takes volumes whose depth is a multiple of {self.factor}, got depth {depth}")
        return (depth // self.factor, height, width)

    def check_measurement(self, measurement: Tensor, volume_shape: Sequence[int]) -> None:
        check_measurement_tensor(measurement, self.measurement_shape(volume_shape), repr(self))

    def forward(self, volume: Tensor) -> Tensor:
        _require_volume(volume)
        self.measurement_shape(volume.shape)
        return volume[:: self.factor]

    def adjoint(self, measurement: Tensor) -> Tensor:
        _require_volume(measurement, "measurement")
        volume = measurement.new_zeros((measurement.shape[0] * self.factor, *measurement.shape[1:]))
        volume[:: self.factor] = measurement
        return volume

    __call__ = forward


def interpolate_through_plane(measurement: Tensor, operator: ThroughPlaneDownsampling) -> Tensor:
    """The classical through-plane super-resolution baseline: each missing slice linearly interpolated along z from
    the two measured slices around it; the slices past the last measured one repeat it. Returns
    ``(len(measurement) * factor, H, W)``."""
    if not isinstance(operator, ThroughPlaneDownsampling):
        raise TypeError(f"operator must be a ThroughPlaneDownsampling, got {type(operator).__name__}")
    _require_volume(measurement, "measurement")
    depth = measurement.shape[0] * operator.factor
    operator.check_measurement(measurement, (depth, *measurement.shape[1:]))
    positions = torch.arange(depth, dtype=torch.float64) / operator.factor
    below = positions.floor().long()
    above = (below + 1).clamp(max=measurement.shape[0] - 1)
    weight = (positions - below).to(measurement)[:, None, None]
    return (1 - weight) * measurement[below] + weight * measurement[above]


class VolumeMask:
    """Keep the voxels where ``mask`` is 1 and zero the others: ``A x = mask * x``, its own adjoint. The measurement
    has the volume's shape (zeros where unmeasured).

    Args:
        mask: a ``(D, H, W)`` tensor of zeros and ones (bool or float).
    """

    def __init__(self, mask: Tensor):
        if not isinstance(mask, Tensor) or mask.dim() != 3:
            raise ValueError(f"mask must be a (D, H, W) tensor, got "
                             f"{tuple(mask.shape) if isinstance(mask, Tensor) else type(mask).__name__}")
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ValueError("mask must hold only zeros and ones")
        self.mask = mask.bool()

    def __repr__(self) -> str:
        return f"{type(self).__name__}(shape={tuple(self.mask.shape)}, measured={int(self.mask.sum())})"

    def measurement_shape(self, volume_shape: Sequence[int]) -> tuple[int, int, int]:
        shape = _require_volume_shape(volume_shape)
        if shape != tuple(self.mask.shape):
            raise ValueError(f"this mask is for volumes of shape {tuple(self.mask.shape)}, got {shape}")
        return shape

    def check_measurement(self, measurement: Tensor, volume_shape: Sequence[int]) -> None:
        check_measurement_tensor(measurement, self.measurement_shape(volume_shape), repr(self))

    def forward(self, volume: Tensor) -> Tensor:
        _require_volume(volume)
        self.measurement_shape(volume.shape)
        return volume * self.mask.to(device=volume.device, dtype=volume.dtype)

    def adjoint(self, measurement: Tensor) -> Tensor:
        _require_volume(measurement, "measurement")
        return self.forward(measurement)

    __call__ = forward


__all__ = [
    "ParallelBeamProjection",
    "ThroughPlaneDownsampling",
    "VolumeMask",
    "check_measurement_tensor",
    "filtered_back_projection",
    "interpolate_through_plane",
    "limited_angle_angles",
    "ramp_filter",
    "sparse_view_angles",
]
