"""Volumes the package makes offline for DiffusionMBIR ("Solving 3D Inverse Problems using Pre-trained 2D Diffusion
Models", arXiv 2211.10655): random 3D ellipsoid phantoms (Shepp-Logan-like, rendered analytically) and smoothed 3D
``skimage.data.binary_blobs``; a fixed held-out split; and a data set of their 2D slices for a ``UNet2DModel`` prior.

A volume is a float32 tensor ``(size, size, size)`` with values in ``[0, 1]`` (dims D, H, W as in
``pipelines/three_d/volume_operators.py``). Volume ``i`` of the training split is drawn from a generator seeded with
``i``; held-out volume ``i`` from ``HELD_OUT_SEED_START + i``: the two seed ranges never meet, and every volume is a
function of its kind, seed and size.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import scipy.ndimage
import skimage.data
import torch
from torch import Tensor
from torch.utils.data import Dataset

KINDS = ("phantom", "blobs")
# Training seeds are 0 .. HELD_OUT_SEED_START - 1, held-out seeds HELD_OUT_SEED_START onwards.
HELD_OUT_SEED_START = 1_000_000


def _require_integer(name: str, value: object, minimum: int, maximum: int | None = None) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < minimum or (
            maximum is not None and value > maximum):
        bound = f">= {minimum}" if maximum is None else f"in [{minimum}, {maximum}]"
        raise ValueError(f"{name} must be an integer {bound}, got {value!r}")
    return int(value)


def _require_kind(kind: object) -> str:
    if kind not in KINDS:
        raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
    return kind


# --------------------------------------------------------------------------------------------------------------------
# Ellipsoid phantoms
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Ellipsoid:
    """An ellipsoid adding ``value`` to the voxels inside it. Coordinates are normalised: the volume spans
    ``[-1, 1]`` along each axis (ordered D, H, W); ``rotation``'s columns are the directions of the semi-axes."""

    centre: Tensor  # (3,)
    semi_axes: Tensor  # (3,)
    rotation: Tensor  # (3, 3), orthonormal
    value: float


def render_ellipsoids(ellipsoids: Sequence[Ellipsoid], size: int, supersampling: int = 2) -> Tensor:
    """The sum of the ellipsoids' values over a ``size^3`` grid, each voxel the mean over ``supersampling^3`` points
    spread evenly inside it (the partial-volume effect of an analytic phantom), float32 ``(size, size, size)``."""
    size = _require_integer("size", size, 2)
    supersampling = _require_integer("supersampling", supersampling, 1)
    volume = torch.zeros(size, size, size, dtype=torch.float64)
    # The sample points along one axis: `supersampling` evenly spread inside each voxel, (size * supersampling,).
    points = ((torch.arange(size * supersampling, dtype=torch.float64) + 0.5) / supersampling) * (2 / size) - 1
    for ellipsoid in ellipsoids:
        # Inside means p^T Q p <= 1 with p relative to the centre and Q = R diag(1 / s^2) R^T; the ellipsoid's
        # bounding box along axis i is +- sqrt((R diag(s^2) R^T)_ii).
        quadric = ellipsoid.rotation @ torch.diag(ellipsoid.semi_axes.pow(-2)) @ ellipsoid.rotation.T
        half_widths = (ellipsoid.rotation.pow(2) @ ellipsoid.semi_axes.pow(2)).sqrt()
        low = ((ellipsoid.centre - half_widths + 1) * size / 2).floor().clamp(0, size - 1).long().tolist()
        high = ((ellipsoid.centre + half_widths + 1) * size / 2).ceil().clamp(1, size).long().tolist()
        z, y, x = (points[lo * supersampling: hi * supersampling] - c
                   for lo, hi, c in zip(low, high, ellipsoid.centre.tolist(), strict=True))
        z, y, x = z[:, None, None], y[None, :, None], x[None, None, :]
        form = (quadric[0, 0] * z * z + quadric[1, 1] * y * y + quadric[2, 2] * x * x
                + 2 * (quadric[0, 1] * z * y + quadric[0, 2] * z * x + quadric[1, 2] * y * x))
        inside = (form <= 1).double()
        shape = [h - lo for lo, h in zip(low, high, strict=True)]
        # Mean over each voxel's supersampling^3 points.
        fraction = inside.reshape(shape[0], supersampling, shape[1], supersampling, shape[2], supersampling)
        volume[low[0]:high[0], low[1]:high[1], low[2]:high[2]] += ellipsoid.value * fraction.mean(dim=(1, 3, 5))
    return volume.float()


def _random_rotation(generator: torch.Generator) -> Tensor:
    # QR of a Gaussian matrix, signs fixed by R's diagonal: a uniformly random orthogonal matrix; a flipped column
    # makes it a rotation.
    q, r = torch.linalg.qr(torch.randn(3, 3, generator=generator, dtype=torch.float64))
    q = q * torch.sign(torch.diagonal(r))
    if torch.linalg.det(q) < 0:
        q[:, 0] = -q[:, 0]
    return q


def _uniform(low: float, high: float, generator: torch.Generator, shape: Sequence[int] = ()) -> Tensor:
    return low + (high - low) * torch.rand(tuple(shape), generator=generator, dtype=torch.float64)


def random_phantom_ellipsoids(generator: torch.Generator) -> list[Ellipsoid]:
    """A random Shepp-Logan-like head: a bright shell (an outer ellipsoid of value 1 minus an inner one of value
    -0.7 to -0.8 sharing its centre and orientation) and 3 to 7 features inside of value -0.2 to 0.4 (magnitude at
    least 0.05), each with its own random size, position and orientation."""
    rotation = _random_rotation(generator)
    centre = _uniform(-0.05, 0.05, generator, (3,))
    outer = _uniform(0.6, 0.85, generator, (3,))
    inner = outer * _uniform(0.82, 0.9, generator)
    ellipsoids = [Ellipsoid(centre, outer, rotation, 1.0),
                  Ellipsoid(centre, inner, rotation, -float(_uniform(0.7, 0.8, generator)))]
    for _ in range(int(torch.randint(3, 8, (), generator=generator))):
        # A point of the unit ball (direction times radius^(1/3) is uniform in volume), inside the inner ellipsoid.
        direction = torch.randn(3, generator=generator, dtype=torch.float64)
        radius = 0.7 * float(torch.rand((), generator=generator, dtype=torch.float64)) ** (1 / 3)
        feature_centre = centre + rotation @ (inner * radius * direction / direction.norm())
        magnitude = float(_uniform(0.05, 0.4, generator))
        sign = -1.0 if float(torch.rand((), generator=generator)) < 1 / 3 else 1.0
        ellipsoids.append(Ellipsoid(feature_centre, inner.min() * _uniform(0.1, 0.4, generator, (3,)),
                                    _random_rotation(generator), sign * min(magnitude, 0.2 if sign < 0 else 0.4)))
    return ellipsoids


def random_ellipsoid_phantom(size: int, generator: torch.Generator) -> Tensor:
    """A random 3D ellipsoid phantom (``random_phantom_ellipsoids`` rendered analytically with 2x2x2 points per
    voxel), float32 ``(size, size, size)`` clipped to ``[0, 1]`` where features overlap."""
    size = _require_integer("size", size, 2)
    return render_ellipsoids(random_phantom_ellipsoids(generator), size).clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Smoothed blobs
# --------------------------------------------------------------------------------------------------------------------


def smoothed_binary_blobs(size: int, generator: torch.Generator, *, blob_size_fraction: float = 0.15,
                          volume_fraction: float = 0.3, smoothing: float = 1.0) -> Tensor:
    """``skimage.data.binary_blobs`` in 3D (``blob_size_fraction`` of the side, ``volume_fraction`` of the voxels
    set) smoothed by a Gaussian of ``smoothing`` voxels per 32 voxels of side, float32 ``(size, size, size)`` in
    ``[0, 1]``. The blobs' seed is drawn from ``generator``."""
    size = _require_integer("size", size, 2)
    if not 0 < blob_size_fraction <= 1 or not 0 < volume_fraction < 1 or smoothing < 0:
        raise ValueError(f"need 0 < blob_size_fraction <= 1, 0 < volume_fraction < 1 and smoothing >= 0, got "
                         f"{blob_size_fraction!r}, {volume_fraction!r}, {smoothing!r}")
    seed = int(torch.randint(0, 2**31 - 1, (), generator=generator))
    blobs = skimage.data.binary_blobs(length=size, blob_size_fraction=blob_size_fraction, n_dim=3,
                                      volume_fraction=volume_fraction, rng=seed).astype(np.float64)
    smoothed = scipy.ndimage.gaussian_filter(blobs, sigma=smoothing * size / 32, mode="nearest")
    return torch.from_numpy(smoothed).float().clamp(0, 1)


# --------------------------------------------------------------------------------------------------------------------
# Splits and the slice data set
# --------------------------------------------------------------------------------------------------------------------


def make_volume(kind: str, seed: int, size: int) -> Tensor:
    """The volume of ``kind`` (``"phantom"`` or ``"blobs"``) drawn from a generator seeded with ``seed``."""
    kind = _require_kind(kind)
    generator = torch.Generator().manual_seed(_require_integer("seed", seed, 0))
    return (random_ellipsoid_phantom if kind == "phantom" else smoothed_binary_blobs)(size, generator)


def training_volume(kind: str, index: int, size: int) -> Tensor:
    """Training volume ``index`` (seed ``index``, below ``HELD_OUT_SEED_START``)."""
    return make_volume(kind, _require_integer("index", index, 0, HELD_OUT_SEED_START - 1), size)


def held_out_volumes(kind: str, count: int, size: int) -> Tensor:
    """The first ``count`` held-out volumes of ``kind`` (seeds ``HELD_OUT_SEED_START + i``), ``(count, size, size,
    size)``: the same on every call and machine, never a training volume."""
    count = _require_integer("count", count, 1, HELD_OUT_SEED_START)
    return torch.stack([make_volume(kind, HELD_OUT_SEED_START + i, size) for i in range(count)])


class VolumeSliceDataset(Dataset):
    """The 2D slices of training volumes, for a ``UNet2DModel`` slice prior: item ``i`` is one slice ``(1, size,
    size)`` float32 in ``[-1, 1]`` (``2 v - 1``). Items run over kinds, then volumes (``num_volumes`` of each kind,
    training seeds ``0 .. num_volumes - 1``), then ``axes``, then the slice's position; each is a function of its
    index. Volumes are made on first use and kept (``num_volumes * len(kinds)`` of them, 128 KiB each at 32^3).

    Args:
        kinds: ``"phantom"``, ``"blobs"`` or both.
        num_volumes: training volumes of each kind.
        size: the volumes' side (the slices' height and width).
        axes: the dims slices are taken across (the DiffusionMBIR prior runs on dim 0; the volumes' laws are close
            to isotropic, so slices across all three dims are more data of nearly the same law).
    """

    def __init__(self, kinds: str | Sequence[str] = KINDS, num_volumes: int = 32, size: int = 32,
                 axes: Sequence[int] = (0, 1, 2)):
        self.kinds = (kinds,) if isinstance(kinds, str) else tuple(kinds)
        if not self.kinds or len(set(self.kinds)) != len(self.kinds):
            raise ValueError(f"kinds must name distinct kinds among {KINDS}, got {kinds!r}")
        for kind in self.kinds:
            _require_kind(kind)
        self.num_volumes = _require_integer("num_volumes", num_volumes, 1, HELD_OUT_SEED_START)
        self.size = _require_integer("size", size, 2)
        self.axes = tuple(axes)
        if not self.axes or len(set(self.axes)) != len(self.axes) or not set(self.axes) <= {0, 1, 2}:
            raise ValueError(f"axes must be distinct dims among (0, 1, 2), got {axes!r}")
        self._volumes: dict[tuple[str, int], Tensor] = {}

    def __len__(self) -> int:
        return len(self.kinds) * self.num_volumes * len(self.axes) * self.size

    def volume(self, kind: str, index: int) -> Tensor:
        """Training volume ``index`` of ``kind`` at this data set's size (cached)."""
        key = (kind, index)
        if key not in self._volumes:
            self._volumes[key] = training_volume(kind, index, self.size)
        return self._volumes[key]

    def __getitem__(self, index: int) -> Tensor:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)) or not 0 <= index < len(self):
            raise IndexError(f"slice {index!r} of a data set of {len(self)}")
        rest, position = divmod(int(index), self.size)
        rest, axis = divmod(rest, len(self.axes))
        kind, volume_index = divmod(rest, self.num_volumes)
        plane = self.volume(self.kinds[kind], volume_index).select(self.axes[axis], position)
        return (2 * plane - 1)[None].contiguous()


__all__ = [
    "HELD_OUT_SEED_START",
    "KINDS",
    "Ellipsoid",
    "VolumeSliceDataset",
    "held_out_volumes",
    "make_volume",
    "random_ellipsoid_phantom",
    "random_phantom_ellipsoids",
    "render_ellipsoids",
    "smoothed_binary_blobs",
    "training_volume",
]
