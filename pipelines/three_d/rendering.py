r"""A differentiable volume renderer and a voxel-grid 3D representation in pure torch (CPU or GPU).

Cameras. A camera is a camera-to-world matrix ``c2w`` (4 x 4), a batch of them ``(N, 4, 4)``, in the OpenGL
convention: in camera coordinates the camera sits at the origin and looks down its ``-z`` axis, ``+x`` is right
and ``+y`` up in the image. ``c2w[:3, :3]`` holds the camera's right, up and backward axes as columns in world
coordinates and ``c2w[:3, 3]`` its position. The field of view is vertical, ``fov_y`` in radians, and square pixels
set the horizontal one. The world's up axis is ``+y``; ``orbit_cameras`` and ``random_cameras`` place cameras on a
sphere around the origin, looking at it, by azimuth and elevation **in degrees**: azimuth 0 looks at the object from
``+z`` (its front), azimuth 90 from ``+x`` (its side), 180 from ``-z`` (its back); elevation is the angle above the
``xz`` plane.

Representation. Anything with a ``bound`` (the scene is the cube ``[-bound, bound]^3``) and a ``query(points) ->
(density, rgb)`` method renders. ``VoxelGrid`` stores raw density and colour values on an ``R^3`` grid of vertices
spanning the cube (voxel index ``[d, h, w]`` is the point ``(x, y, z) = grid_points(R, bound)[d, h, w]``, with
``w`` along ``x``, ``h`` along ``y`` and ``d`` along ``z``), interpolates them trilinearly and activates them:

    density(p) = density_scale * softplus(raw_density(p)),        rgb(p) = sigmoid(raw_colour(p))

Rendering is emission-absorption volume rendering (the NeRF quadrature, "NeRF: Representing Scenes as Neural Radiance
Fields for View Synthesis", arXiv 2003.08934, used by DreamFusion, arXiv 2209.14988). A ray ``o + s d`` (``|d| = 1``)
is cut to the scene cube and sampled at ``S`` points ``s_k`` spaced ``delta``:

    alpha_k = 1 - exp(-density_k delta),    T_k = exp(-sum_{j<k} density_j delta),    w_k = T_k alpha_k
    rgb     = sum_k w_k rgb_k + (1 - sum_k w_k) background,                 opacity = sum_k w_k

Every step is a torch op, so images are differentiable with respect to the representation's parameters.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

DEFAULT_FOV_Y = math.radians(40.0)
WORLD_UP = (0.0, 1.0, 0.0)


def check_cameras(cameras: torch.Tensor) -> torch.Tensor:
    """``cameras`` as given, after checking it is a floating tensor of camera-to-world matrices ``(N, 4, 4)``."""
    if not isinstance(cameras, torch.Tensor):
        raise TypeError(f"cameras must be a torch.Tensor of camera-to-world matrices (N, 4, 4), got {type(cameras)}")
    if cameras.ndim != 3 or tuple(cameras.shape[1:]) != (4, 4) or cameras.shape[0] == 0:
        raise ValueError(f"cameras must be camera-to-world matrices of shape (N, 4, 4) with N >= 1, got "
                         f"{tuple(cameras.shape)}")
    if not cameras.is_floating_point():
        raise TypeError(f"cameras must be a floating-point tensor, got {cameras.dtype}")
    return cameras


def look_at_cameras(positions: torch.Tensor, target: Sequence[float] = (0.0, 0.0, 0.0),
                    up: Sequence[float] = WORLD_UP) -> torch.Tensor:
    """Camera-to-world matrices ``(N, 4, 4)`` of cameras at ``positions`` ``(N, 3)`` looking at ``target``, with
    ``up`` (world ``+y`` by default) projecting to the image's up direction. A camera looking straight along ``up``
    uses world ``-z`` as its image up instead, so that the frame stays defined at the poles."""
    positions = torch.as_tensor(positions, dtype=torch.float32)
    if positions.ndim != 2 or positions.shape[1] != 3:
        raise ValueError(f"positions must have shape (N, 3), got {tuple(positions.shape)}")
    target = torch.as_tensor(target, dtype=positions.dtype)
    backward = F.normalize(positions - target, dim=-1)
    up = torch.as_tensor(up, dtype=positions.dtype).expand_as(backward)
    right = torch.linalg.cross(up, backward, dim=-1)
    at_pole = right.norm(dim=-1, keepdim=True) < 1e-6
    fallback_up = torch.tensor([0.0, 0.0, -1.0], dtype=positions.dtype).expand_as(backward)
    right = F.normalize(torch.where(at_pole, torch.linalg.cross(fallback_up, backward, dim=-1), right), dim=-1)
    camera_up = torch.linalg.cross(backward, right, dim=-1)
    c2w = torch.zeros(positions.shape[0], 4, 4, dtype=positions.dtype)
    c2w[:, :3, 0], c2w[:, :3, 1], c2w[:, :3, 2], c2w[:, :3, 3] = right, camera_up, backward, positions
    c2w[:, 3, 3] = 1.0
    return c2w


def spherical_positions(azimuth: torch.Tensor, elevation: torch.Tensor, radius: torch.Tensor) -> torch.Tensor:
    """Points ``(N, 3)`` at ``radius`` from the origin, azimuth and elevation in degrees (see the module docstring):
    ``(r cos(el) sin(az), r sin(el), r cos(el) cos(az))``."""
    azimuth, elevation = torch.deg2rad(azimuth.float()), torch.deg2rad(elevation.float())
    radius = radius.float()
    return torch.stack([radius * elevation.cos() * azimuth.sin(), radius * elevation.sin(),
                        radius * elevation.cos() * azimuth.cos()], dim=-1)


def orbit_cameras(num_views: int, elevation: float = 15.0, radius: float = 2.5,
                  start_azimuth: float = 0.0) -> torch.Tensor:
    """``num_views`` cameras ``(num_views, 4, 4)`` evenly spaced in azimuth on a circle at ``elevation`` degrees and
    ``radius``, looking at the origin; view ``i`` is at azimuth ``start_azimuth + 360 i / num_views`` degrees."""
    if not isinstance(num_views, int) or num_views < 1:
        raise ValueError(f"num_views must be a positive int, got {num_views!r}")
    if radius <= 0:
        raise ValueError(f"radius must be positive, got {radius}")
    azimuth = start_azimuth + 360.0 * torch.arange(num_views, dtype=torch.float64) / num_views
    positions = spherical_positions(azimuth, torch.full_like(azimuth, elevation), torch.full_like(azimuth, radius))
    return look_at_cameras(positions)


def _uniform(low: float, high: float, num: int, generator: torch.Generator | None) -> torch.Tensor:
    return low + (high - low) * torch.rand(num, generator=generator, dtype=torch.float64)


def random_cameras(num: int, generator: torch.Generator | None = None,
                   elevation_range: tuple[float, float] = (-10.0, 60.0),
                   azimuth_range: tuple[float, float] = (-180.0, 180.0),
                   radius_range: tuple[float, float] = (2.5, 2.5)) -> torch.Tensor:
    """``num`` cameras ``(num, 4, 4)`` on a sphere around the origin, looking at it: azimuth, elevation (degrees)
    and radius drawn uniformly from their ranges with ``generator`` (a CPU ``torch.Generator``). DreamFusion draws
    elevations in [-10, 90] degrees and all azimuths; the default stops at 60 degrees, where a voxel object's top is
    still seen together with its sides."""
    if not isinstance(num, int) or num < 1:
        raise ValueError(f"num must be a positive int, got {num!r}")
    for name, (low, high) in (("elevation_range", elevation_range), ("azimuth_range", azimuth_range),
                              ("radius_range", radius_range)):
        if low > high:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
    if radius_range[0] <= 0:
        raise ValueError(f"radius_range must be positive, got {radius_range}")
    azimuth = _uniform(*azimuth_range, num, generator)
    elevation = _uniform(*elevation_range, num, generator)
    radius = _uniform(*radius_range, num, generator)
    return look_at_cameras(spherical_positions(azimuth, elevation, radius))


def random_orbit_cameras(num_objects: int, num_views: int, generator: torch.Generator | None = None,
                         elevation_range: tuple[float, float] = (0.0, 30.0),
                         radius_range: tuple[float, float] = (2.5, 2.5)) -> torch.Tensor:
    """``num_objects`` orbits of ``num_views`` cameras ``(num_objects * num_views, 4, 4)``, views of one orbit
    consecutive: each orbit at its own random elevation and radius, its views evenly spaced in azimuth from a random
    start (the camera sets a multi-view model such as MVDream is trained and distilled with)."""
    if not isinstance(num_objects, int) or num_objects < 1:
        raise ValueError(f"num_objects must be a positive int, got {num_objects!r}")
    for name, (low, high) in (("elevation_range", elevation_range), ("radius_range", radius_range)):
        if low > high:
            raise ValueError(f"{name} must be (low, high) with low <= high, got {(low, high)}")
    starts = _uniform(0.0, 360.0, num_objects, generator).tolist()
    elevations = _uniform(*elevation_range, num_objects, generator).tolist()
    radii = _uniform(*radius_range, num_objects, generator).tolist()
    return torch.cat([orbit_cameras(num_views, elevation=e, radius=r, start_azimuth=a)
                      for a, e, r in zip(starts, elevations, radii, strict=True)])


def camera_azimuth_elevation(cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Azimuth in (-180, 180] and elevation in [-90, 90] degrees ``(N,)`` of each camera's position (the inverse of
    ``spherical_positions`` up to the radius)."""
    position = check_cameras(cameras)[:, :3, 3].double()
    azimuth = torch.rad2deg(torch.atan2(position[:, 0], position[:, 2]))
    azimuth = torch.where(azimuth <= -180, azimuth + 360, azimuth)
    elevation = torch.rad2deg(torch.asin((position[:, 1] / position.norm(dim=-1)).clamp(-1, 1)))
    return azimuth, elevation


def camera_rays(cameras: torch.Tensor, height: int, width: int,
                fov_y: float = DEFAULT_FOV_Y) -> tuple[torch.Tensor, torch.Tensor]:
    """World-space ray origins and unit directions ``(N, H, W, 3)`` through the pixel centres of each camera."""
    cameras = check_cameras(cameras)
    if not 0 < fov_y < math.pi:
        raise ValueError(f"fov_y must be a vertical field of view in radians in (0, pi), got {fov_y}")
    half_height = math.tan(fov_y / 2)
    half_width = half_height * width / height
    rows = (1 - 2 * (torch.arange(height, dtype=cameras.dtype) + 0.5) / height) * half_height
    cols = (2 * (torch.arange(width, dtype=cameras.dtype) + 0.5) / width - 1) * half_width
    y, x = torch.meshgrid(rows, cols, indexing="ij")
    directions_camera = torch.stack([x, y, -torch.ones_like(x)], dim=-1).to(cameras.device)
    directions = F.normalize(torch.einsum("nij,hwj->nhwi", cameras[:, :3, :3], directions_camera), dim=-1)
    origins = cameras[:, None, None, :3, 3].expand_as(directions)
    return origins, directions


def ray_box_interval(origins: torch.Tensor, directions: torch.Tensor,
                     bound: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The ray parameters ``(near, far)`` where rays enter and leave the cube ``[-bound, bound]^3`` (the slab
    method); rays that miss it get ``near = far``."""
    safe = torch.where(directions.abs() < 1e-9, torch.full_like(directions, 1e-9), directions)
    low, high = (-bound - origins) / safe, (bound - origins) / safe
    near = torch.minimum(low, high).amax(dim=-1).clamp(min=0)
    far = torch.maximum(low, high).amin(dim=-1)
    return near, torch.maximum(far, near)


def composite(densities: torch.Tensor, colours: torch.Tensor, deltas: torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Emission-absorption quadrature along the last sample axis: ``densities`` ``(..., S)``, ``colours``
    ``(..., S, 3)``, ``deltas`` ``(..., 1)`` or ``(..., S)`` -> premultiplied ``rgb`` ``(..., 3)`` and ``opacity``
    ``(...)``."""
    optical_depth = densities * deltas
    alphas = 1 - torch.exp(-optical_depth)
    transmittance = torch.exp(-(torch.cumsum(optical_depth, dim=-1) - optical_depth))
    weights = transmittance * alphas
    return (weights[..., None] * colours).sum(dim=-2), weights.sum(dim=-1)


def background_colour(background: float | Sequence[float] | torch.Tensor, num: int) -> torch.Tensor:
    """A background given as a grey level, an RGB triple ``(3,)`` or one colour per view ``(N, 3)``, as ``(N, 3)``."""
    colour = torch.as_tensor(background, dtype=torch.float32)
    if colour.ndim == 0:
        colour = colour.expand(3)
    if colour.shape not in ((3,), (num, 3)):
        raise ValueError(f"background must be a float, an RGB triple or one RGB triple per camera ({num}, 3), got "
                         f"shape {tuple(colour.shape)}")
    return colour.expand(num, 3)


def render_rgba(representation, cameras: torch.Tensor, height: int, width: int, fov_y: float = DEFAULT_FOV_Y,
                num_samples: int = 64, generator: torch.Generator | None = None) -> torch.Tensor:
    """Premultiplied RGB and opacity ``(N, 4, H, W)`` of ``representation`` seen by ``cameras`` (see the module
    docstring). Samples sit at the centres of ``num_samples`` equal segments of each ray's span inside the scene
    cube; with ``generator`` each sample is jittered uniformly inside its segment (stratified sampling)."""
    cameras = check_cameras(cameras)
    for name, value in (("height", height), ("width", width), ("num_samples", num_samples)):
        if not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    origins, directions = camera_rays(cameras, height, width, fov_y)
    near, far = ray_box_interval(origins, directions, representation.bound)
    offsets = torch.arange(num_samples, dtype=origins.dtype, device=origins.device)
    if generator is None:
        offsets = (offsets + 0.5).expand(*near.shape, num_samples)
    else:
        offsets = offsets + torch.rand(*near.shape, num_samples, generator=generator).to(origins)
    deltas = ((far - near) / num_samples)[..., None]
    distances = near[..., None] + deltas * offsets
    points = origins[..., None, :] + distances[..., None] * directions[..., None, :]
    densities, colours = representation.query(points)
    rgb, opacity = composite(densities, colours, deltas)
    return torch.cat([rgb, opacity[..., None]], dim=-1).permute(0, 3, 1, 2)


def render(representation, cameras: torch.Tensor, height: int, width: int, fov_y: float = DEFAULT_FOV_Y,
           background: float | Sequence[float] | torch.Tensor = 1.0, num_samples: int = 64,
           generator: torch.Generator | None = None) -> torch.Tensor:
    """RGB images ``(N, 3, H, W)`` in [0, 1] of ``representation`` seen by ``cameras`` ``(N, 4, 4)``, composited
    over ``background`` (white by default); differentiable with respect to the representation. See
    ``render_rgba`` for the sampling and the module docstring for the conventions."""
    rgba = render_rgba(representation, cameras, height, width, fov_y, num_samples, generator)
    background = background_colour(background, cameras.shape[0]).to(rgba)[..., None, None]
    return rgba[:, :3] + (1 - rgba[:, 3:]) * background


def grid_points(resolution: int, bound: float) -> torch.Tensor:
    """World coordinates ``(R, R, R, 3)`` of a voxel grid's vertices, indexed ``[d, h, w]`` = ``[z, y, x]``; the
    outer vertices lie on the cube's faces."""
    axis = torch.linspace(-bound, bound, resolution)
    z, y, x = torch.meshgrid(axis, axis, axis, indexing="ij")
    return torch.stack([x, y, z], dim=-1)


def _softplus_inverse(values: torch.Tensor) -> torch.Tensor:
    return values + torch.log(-torch.expm1(-values))


class VoxelGrid(ModelMixin, ConfigMixin):
    r"""A density + colour voxel grid over the cube ``[-bound, bound]^3``, rendered by ``render``.

    Parameters ``raw_density`` ``(1, 1, R, R, R)`` and ``raw_colour`` ``(1, 3, R, R, R)`` are interpolated
    trilinearly and activated, ``density = density_scale * softplus(raw_density)``, ``rgb = sigmoid(raw_colour)``;
    a new grid has density ``initial_density`` and grey colour everywhere. ``save_pretrained`` /
    ``from_pretrained`` store it the diffusers way (a config and safetensors weights).

    Args:
        resolution: vertices per axis ``R``.
        bound: half the side of the cube.
        density_scale: density per unit of softplus, so that Adam-sized steps on the raw values reach opaque
            densities (tens per unit length) in a few dozen iterations.
        initial_density: the density everywhere at creation.
    """

    @register_to_config
    def __init__(self, resolution: int = 32, bound: float = 1.0, density_scale: float = 10.0,
                 initial_density: float = 0.5):
        super().__init__()
        if not isinstance(resolution, int) or resolution < 2:
            raise ValueError(f"resolution must be an int >= 2, got {resolution!r}")
        if bound <= 0 or density_scale <= 0 or initial_density <= 0:
            raise ValueError(f"bound, density_scale and initial_density must be positive, got {bound}, "
                             f"{density_scale}, {initial_density}")
        raw = _softplus_inverse(torch.tensor(initial_density / density_scale, dtype=torch.float64)).float()
        self.raw_density = torch.nn.Parameter(torch.full((1, 1, resolution, resolution, resolution), raw.item()))
        self.raw_colour = torch.nn.Parameter(torch.zeros(1, 3, resolution, resolution, resolution))

    @property
    def bound(self) -> float:
        return float(self.config.bound)

    @property
    def voxel_size(self) -> float:
        return 2 * self.bound / (self.config.resolution - 1)

    @classmethod
    def from_fields(cls, density: torch.Tensor, colour: torch.Tensor, bound: float = 1.0,
                    density_scale: float = 10.0) -> VoxelGrid:
        """The grid whose vertices hold ``density`` ``(R, R, R)`` (>= 0) and ``colour`` ``(3, R, R, R)`` (in [0, 1]),
        indexed as ``grid_points``. Densities are clipped to at least ``1e-6 density_scale`` and colours to [1e-4, 1 - 1e-4], where the
        activations are invertible."""
        resolution = density.shape[0]
        if density.shape != (resolution,) * 3 or colour.shape != (3,) + (resolution,) * 3:
            raise ValueError(f"density must be (R, R, R) and colour (3, R, R, R), got {tuple(density.shape)} and "
                             f"{tuple(colour.shape)}")
        grid = cls(resolution=resolution, bound=bound, density_scale=density_scale)
        with torch.no_grad():
            scaled = (density.double() / density_scale).clamp(min=1e-6)
            grid.raw_density.copy_(_softplus_inverse(scaled).float()[None, None])
            grid.raw_colour.copy_(torch.logit(colour.double().clamp(1e-4, 1 - 1e-4)).float()[None])
        return grid

    def densities(self) -> torch.Tensor:
        """Density at the vertices ``(R, R, R)``."""
        return self.config.density_scale * F.softplus(self.raw_density[0, 0])

    def colours(self) -> torch.Tensor:
        """RGB at the vertices ``(3, R, R, R)``."""
        return torch.sigmoid(self.raw_colour[0])

    def occupancy(self, threshold: float | None = None) -> torch.Tensor:
        """Boolean ``(R, R, R)``: density above ``threshold``, by default the density at which one voxel's length
        absorbs half the light (``ln 2 / voxel_size``)."""
        return self.densities() > (math.log(2) / self.voxel_size if threshold is None else threshold)

    def query(self, points: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Density ``(...)`` and RGB ``(..., 3)`` at world ``points`` ``(..., 3)``; zero density outside the cube."""
        shape = points.shape[:-1]
        grid = (points / self.bound).reshape(1, 1, 1, -1, 3).to(self.raw_density.dtype)
        raw = torch.cat([self.raw_density, self.raw_colour], dim=1)
        values = F.grid_sample(raw, grid, mode="bilinear", padding_mode="border", align_corners=True)
        values = values.reshape(4, -1).T.reshape(*shape, 4)
        inside = (points.abs() <= self.bound).all(dim=-1)
        density = torch.where(inside, self.config.density_scale * F.softplus(values[..., 0]), 0.0)
        return density, torch.sigmoid(values[..., 1:])


def fit_voxel_grid(images: torch.Tensor, cameras: torch.Tensor, resolution: int = 32, num_iterations: int = 200,
                   views_per_iteration: int = 4, learning_rate: float = 0.1, fov_y: float = DEFAULT_FOV_Y,
                   background: float | Sequence[float] | torch.Tensor = 1.0,
                   generator: torch.Generator | None = None) -> VoxelGrid:
    """A ``VoxelGrid`` fitted to posed ``images`` ``(N, 3, H, W)`` in [0, 1] seen by ``cameras`` ``(N, 4, 4)``: Adam
    on the mean squared error of its renders, ``views_per_iteration`` views drawn per step with ``generator``. Its
    renders from held-out cameras measure how consistent the views are with one 3D object."""
    cameras = check_cameras(cameras)
    if images.ndim != 4 or images.shape[1] != 3 or images.shape[0] != cameras.shape[0]:
        raise ValueError(f"images must be (N, 3, H, W) with one image per camera ({cameras.shape[0]}), got "
                         f"{tuple(images.shape)}")
    grid = VoxelGrid(resolution=resolution)
    optimizer = torch.optim.Adam(grid.parameters(), lr=learning_rate)
    height, width = images.shape[-2:]
    backgrounds = background_colour(background, images.shape[0])
    for _ in range(num_iterations):
        views = torch.randperm(images.shape[0], generator=generator)[:views_per_iteration]
        renders = render(grid, cameras[views], height, width, fov_y, backgrounds[views])
        loss = ((renders - images[views].to(renders)) ** 2).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return grid


def voxel_iou(occupancy: torch.Tensor, reference: torch.Tensor) -> float:
    """Intersection over union of two boolean occupancy grids of the same shape (1.0 when both are empty)."""
    if occupancy.shape != reference.shape:
        raise ValueError(f"occupancy grids must have the same shape, got {tuple(occupancy.shape)} and "
                         f"{tuple(reference.shape)}")
    union = (occupancy | reference).sum().item()
    return 1.0 if union == 0 else (occupancy & reference).sum().item() / union
