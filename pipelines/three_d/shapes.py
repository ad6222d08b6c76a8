"""Procedural 3D shapes: coloured spheres, boxes and cylinders and their unions, as ``VoxelGrid``s.

A primitive is a signed distance function (negative inside) and a colour. A union's occupancy at a grid vertex is
``clamp(1/2 - min_i sdf_i / voxel_size, 0, 1)``: a linear ramp one voxel wide centred on the surface, so that the
surface is resolved to sub-voxel precision (what marching cubes and the renderer's trilinear interpolation read)
without aliasing, and nothing is absorbed beyond half a voxel outside it. Its density is
``shape_density * occupancy``; the colour at a vertex is that of the primitive with the smallest signed distance
(the innermost one inside, the nearest one outside, so that colours interpolate cleanly across the surface).
``random_shape`` draws unions with a seeded ``torch.Generator``: the synthetic 3D data of the multi-view trainer and
the targets of the score-distillation oracle.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from .rendering import VoxelGrid, grid_points

# Opaque enough that one voxel of a 16^3 grid over [-1, 1]^3 absorbs > 99 % of the light, yet within the reach of
# VoxelGrid's default density_scale.
DEFAULT_SHAPE_DENSITY = 40.0


def _vector(values: Sequence[float], name: str) -> torch.Tensor:
    vector = torch.as_tensor(values, dtype=torch.float32)
    if vector.shape != (3,):
        raise ValueError(f"{name} must be 3 numbers, got {values!r}")
    return vector


@dataclass(frozen=True)
class Sphere:
    center: Sequence[float]
    radius: float
    colour: Sequence[float]

    def signed_distance(self, points: torch.Tensor) -> torch.Tensor:
        return (points - _vector(self.center, "center")).norm(dim=-1) - self.radius


@dataclass(frozen=True)
class Box:
    """An axis-aligned box of half side lengths ``half_size`` (x, y, z)."""

    center: Sequence[float]
    half_size: Sequence[float]
    colour: Sequence[float]

    def signed_distance(self, points: torch.Tensor) -> torch.Tensor:
        q = (points - _vector(self.center, "center")).abs() - _vector(self.half_size, "half_size")
        return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)


@dataclass(frozen=True)
class Cylinder:
    """A cylinder along the world's up axis ``y``: ``radius`` in ``xz``, ``half_height`` along ``y``."""

    center: Sequence[float]
    radius: float
    half_height: float
    colour: Sequence[float]

    def signed_distance(self, points: torch.Tensor) -> torch.Tensor:
        offset = points - _vector(self.center, "center")
        q = torch.stack([offset[..., [0, 2]].norm(dim=-1) - self.radius, offset[..., 1].abs() - self.half_height], -1)
        return q.clamp(min=0).norm(dim=-1) + q.amax(dim=-1).clamp(max=0)


Primitive = Sphere | Box | Cylinder


def voxelize(primitives: Sequence[Primitive], resolution: int = 32, bound: float = 1.0,
             shape_density: float = DEFAULT_SHAPE_DENSITY, density_scale: float = 10.0) -> VoxelGrid:
    """The union of ``primitives`` as a ``VoxelGrid`` of ``resolution^3`` vertices over ``[-bound, bound]^3``."""
    if len(primitives) == 0:
        raise ValueError("primitives must hold at least one Sphere, Box or Cylinder")
    points = grid_points(resolution, bound)
    distances = torch.stack([primitive.signed_distance(points) for primitive in primitives])
    nearest_distance, nearest = distances.min(dim=0)
    colours = torch.stack([_vector(primitive.colour, "colour") for primitive in primitives])
    if colours.min() < 0 or colours.max() > 1:
        raise ValueError(f"colours must lie in [0, 1], got {colours.tolist()}")
    voxel_size = 2 * bound / (resolution - 1)
    density = shape_density * (0.5 - nearest_distance / voxel_size).clamp(0, 1)
    return VoxelGrid.from_fields(density, colours[nearest].permute(3, 0, 1, 2), bound, density_scale)


def _uniform(generator: torch.Generator, low: float, high: float, size: int = 1) -> list[float]:
    return (low + (high - low) * torch.rand(size, generator=generator, dtype=torch.float64)).tolist()


def random_primitives(generator: torch.Generator, num_primitives: tuple[int, int] = (1, 3),
                      extent: float = 0.6) -> list[Primitive]:
    """Between ``num_primitives[0]`` and ``num_primitives[1]`` random primitives (kind, size, placement and a
    saturated colour drawn with ``generator``) inside the cube ``[-extent, extent]^3``."""
    low, high = num_primitives
    if not 1 <= low <= high:
        raise ValueError(f"num_primitives must be (low, high) with 1 <= low <= high, got {num_primitives}")
    count = int(torch.randint(low, high + 1, (1,), generator=generator))
    primitives: list[Primitive] = []
    for _ in range(count):
        kind = int(torch.randint(0, 3, (1,), generator=generator))
        size = _uniform(generator, 0.2, 0.4)[0]
        center = _uniform(generator, -(extent - size), extent - size, 3)
        colour = _uniform(generator, 0.05, 0.95, 3)
        if kind == 0:
            primitives.append(Sphere(center, size, colour))
        elif kind == 1:
            primitives.append(Box(center, [size * f for f in _uniform(generator, 0.6, 1.0, 3)], colour))
        else:
            primitives.append(Cylinder(center, size * _uniform(generator, 0.6, 1.0)[0], size, colour))
    return primitives


def random_shape(generator: torch.Generator, resolution: int = 32, bound: float = 1.0,
                 num_primitives: tuple[int, int] = (1, 3)) -> VoxelGrid:
    """A random union of primitives (``random_primitives``) voxelized at ``resolution``."""
    return voxelize(random_primitives(generator, num_primitives, extent=0.6 * bound), resolution, bound)
