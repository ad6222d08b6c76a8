"""The volume renderer, the voxel grid and the procedural shapes (pipelines/three_d/rendering.py, shapes.py)."""

import math

import pytest
import torch

from diffusers_ext.pipelines.three_d.rendering import (
    VoxelGrid,
    camera_azimuth_elevation,
    fit_voxel_grid,
    orbit_cameras,
    random_cameras,
    random_orbit_cameras,
    render,
    render_rgba,
    voxel_iou,
)
from diffusers_ext.pipelines.three_d.shapes import Box, Cylinder, Sphere, random_primitives, random_shape, voxelize

RED, GREEN = (1.0, 0.0, 0.0), (0.0, 1.0, 0.0)


def test_cameras_follow_the_opengl_convention():
    front, side = orbit_cameras(4, elevation=0.0, radius=3.0)[:2]
    # camera at azimuth 0 sits on +z and looks down its -z axis towards the origin; azimuth 90 sits on +x
    torch.testing.assert_close(front[:3, 3], torch.tensor([0.0, 0.0, 3.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(front[:3, 2], torch.tensor([0.0, 0.0, 1.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(side[:3, 3], torch.tensor([3.0, 0.0, 0.0]), atol=1e-6, rtol=0)
    torch.testing.assert_close(front[:3, :3].T @ front[:3, :3], torch.eye(3), atol=1e-6, rtol=0)
    # seen from the front, an object at +x is on the right of the image and one at +y in its top half
    right_object = voxelize([Box((0.5, 0.0, 0.0), (0.2, 0.2, 0.2), RED)], resolution=16)
    top_object = voxelize([Box((0.0, 0.5, 0.0), (0.2, 0.2, 0.2), RED)], resolution=16)
    opacity_right = render_rgba(right_object, front[None], 16, 16)[0, 3]
    opacity_top = render_rgba(top_object, front[None], 16, 16)[0, 3]
    assert opacity_right[:, 8:].sum() > 10 * opacity_right[:, :8].sum() > 0
    assert opacity_top[:8].sum() > 10 * opacity_top[8:].sum() > 0


def test_camera_angles_round_trip():
    generator = torch.Generator().manual_seed(0)
    cameras = random_cameras(64, generator, elevation_range=(-10.0, 60.0), radius_range=(2.0, 3.0))
    azimuth, elevation = camera_azimuth_elevation(cameras)
    assert elevation.min() >= -10 - 1e-4 and elevation.max() <= 60 + 1e-4 and elevation.std() > 10
    assert azimuth.min() >= -180 - 1e-4 and azimuth.max() <= 180 and azimuth.std() > 60
    radius = cameras[:, :3, 3].norm(dim=-1)
    assert radius.min() >= 2 - 1e-5 and radius.max() <= 3 + 1e-5
    # every camera looks at the origin: its -z axis points from its position to the origin
    torch.testing.assert_close(-cameras[:, :3, 2], -cameras[:, :3, 3] / radius[:, None], atol=1e-5, rtol=0)
    orbit_azimuth, orbit_elevation = camera_azimuth_elevation(orbit_cameras(8, elevation=20.0, start_azimuth=10.0))
    expected = torch.tensor([10.0 + 45 * i for i in range(8)], dtype=torch.float64)
    torch.testing.assert_close(torch.remainder(orbit_azimuth - expected + 180, 360) - 180, torch.zeros(8),
                               atol=1e-4, rtol=0, check_dtype=False)
    torch.testing.assert_close(orbit_elevation, torch.full((8,), 20.0, dtype=torch.float64), atol=1e-4, rtol=0)
    assert torch.equal(random_cameras(3, torch.Generator().manual_seed(5)),
                       random_cameras(3, torch.Generator().manual_seed(5)))


def test_random_orbits_are_evenly_spaced_views_of_one_elevation():
    cameras = random_orbit_cameras(3, 4, torch.Generator().manual_seed(0), elevation_range=(0.0, 30.0))
    azimuth, elevation = (values.reshape(3, 4) for values in camera_azimuth_elevation(cameras))
    steps = torch.remainder(azimuth.diff(dim=1), 360)
    torch.testing.assert_close(steps, torch.full((3, 3), 90.0, dtype=torch.float64), atol=1e-3, rtol=0)
    assert (elevation.std(dim=1) < 1e-3).all() and elevation[:, 0].unique().numel() == 3
    assert elevation.min() >= -1e-4 and elevation.max() <= 30 + 1e-4


def test_uniform_density_opacity_matches_beer_lambert():
    """A constant field makes the quadrature exact: a ray crossing the cube along ``z`` through its centre has
    optical depth ``density * 2 bound``."""
    for density in (0.2, 1.0):
        grid = VoxelGrid(resolution=4, bound=1.0, initial_density=density)
        camera = orbit_cameras(1, elevation=0.0, radius=3.0)
        rgba = render_rgba(grid, camera, 2, 2, fov_y=1e-3, num_samples=7)
        torch.testing.assert_close(rgba[0, 3], torch.full((2, 2), 1 - math.exp(-2 * density)), atol=1e-4, rtol=0)
        # grey colour everywhere: premultiplied rgb = 0.5 * opacity; over black the image is that
        torch.testing.assert_close(rgba[0, :3], 0.5 * rgba[0, 3].expand(3, 2, 2), atol=1e-5, rtol=0)


def test_sphere_silhouette_matches_its_projection():
    radius, distance, fov_y, size = 0.5, 2.5, math.radians(40.0), 48
    sphere = voxelize([Sphere((0.0, 0.0, 0.0), radius, RED)], resolution=24)
    images = render(sphere, orbit_cameras(3, elevation=30.0, radius=distance), size, size, fov_y=fov_y)
    covered = (images[:, 1] < 0.5).float().mean(dim=(1, 2))
    # the disc of angular radius asin(r / d) on an image of half-height tan(fov / 2)
    expected = math.pi * (math.tan(math.asin(radius / distance)) / math.tan(fov_y / 2)) ** 2 / 4
    assert torch.allclose(covered, torch.full_like(covered, expected), rtol=0.1), (covered, expected)
    # the sphere is red, the background white
    centre = images[:, :, size // 2, size // 2]
    torch.testing.assert_close(centre, torch.tensor(RED).expand(3, 3), atol=0.02, rtol=0)
    torch.testing.assert_close(images[:, :, 0, 0], torch.ones(3, 3), atol=1e-3, rtol=0)


def test_render_is_differentiable_and_matches_finite_differences():
    grid = voxelize([Sphere((0.1, 0.0, 0.0), 0.4, GREEN)], resolution=6).double()
    cameras = orbit_cameras(2, elevation=20.0).double()

    inputs = (grid.raw_density.detach().clone().requires_grad_(), grid.raw_colour.detach().clone().requires_grad_())
    del grid.raw_density, grid.raw_colour  # the grid reads plain tensors from here on, the inputs of each call

    def mean_red(raw_density, raw_colour):
        grid.raw_density, grid.raw_colour = raw_density, raw_colour
        return render(grid, cameras, 5, 5, num_samples=12)[:, 0].mean()

    assert torch.autograd.gradcheck(mean_red, inputs, eps=1e-6, atol=1e-6, fast_mode=True)


def test_background_and_stratified_sampling():
    grid = random_shape(torch.Generator().manual_seed(1), resolution=12)
    cameras = orbit_cameras(2)
    black = render(grid, cameras, 12, 12, background=0.0)
    blue = render(grid, cameras, 12, 12, background=torch.tensor([[0.0, 0.0, 1.0], [0.0, 0.0, 1.0]]))
    opacity = render_rgba(grid, cameras, 12, 12)[:, 3]
    torch.testing.assert_close(blue[:, 2] - black[:, 2], 1 - opacity, atol=1e-6, rtol=0)
    jittered = [render(grid, cameras, 12, 12, generator=torch.Generator().manual_seed(s)) for s in (0, 0, 1)]
    assert torch.equal(jittered[0], jittered[1]) and not torch.equal(jittered[0], jittered[2])
    # stratified samples average to the midpoint rule's image
    assert (jittered[0] - render(grid, cameras, 12, 12)).abs().mean() < 0.05


def test_fitting_a_grid_to_posed_views_recovers_the_shape():
    target = random_shape(torch.Generator().manual_seed(5), resolution=10)
    cameras = random_cameras(16, torch.Generator().manual_seed(6))
    images = render(target, cameras, 12, 12).detach()
    grid = fit_voxel_grid(images, cameras, resolution=10, num_iterations=60, generator=torch.Generator().manual_seed(0))
    held_out = orbit_cameras(4, elevation=25.0, start_azimuth=20.0)
    error = (render(grid, held_out, 12, 12) - render(target, held_out, 12, 12)).pow(2).mean().item()
    blank = (render(VoxelGrid(resolution=10), held_out, 12, 12) - render(target, held_out, 12, 12)).pow(2).mean()
    assert error < 0.1 * blank.item() and voxel_iou(grid.occupancy(), target.occupancy()) > 0.6
    with pytest.raises(ValueError, match="one image per camera"):
        fit_voxel_grid(images[:3], cameras)


def test_voxel_grid_round_trip(tmp_path):
    grid = random_shape(torch.Generator().manual_seed(2), resolution=10)
    grid.save_pretrained(tmp_path)
    loaded = VoxelGrid.from_pretrained(tmp_path)
    cameras = orbit_cameras(2)
    assert torch.equal(render(grid, cameras, 8, 8), render(loaded, cameras, 8, 8))
    assert loaded.config.resolution == 10


def test_voxelized_shapes():
    sphere = voxelize([Sphere((0.0, 0.0, 0.0), 0.5, RED)], resolution=32)
    volume = sphere.occupancy().float().mean().item() * 8
    assert abs(volume - 4 / 3 * math.pi * 0.5**3) < 0.15 * 4 / 3 * math.pi * 0.5**3
    union = voxelize([Box((-0.4, 0.0, 0.0), (0.2, 0.2, 0.2), RED), Cylinder((0.4, 0.0, 0.0), 0.2, 0.3, GREEN)],
                     resolution=21)
    colours = union.colours()
    # on a 21-vertex axis over [-1, 1], w = 6 is x = -0.4 and w = 14 is x = +0.4
    torch.testing.assert_close(colours[:, 10, 10, 6], torch.tensor(RED), atol=1e-3, rtol=0)
    torch.testing.assert_close(colours[:, 10, 10, 14], torch.tensor(GREEN), atol=1e-3, rtol=0)
    occupied = union.occupancy()
    assert occupied[10, 10, 6] and occupied[10, 10, 14] and not occupied[10, 10, 10] and not occupied[10, 18, 14]
    box_only = voxelize([Box((-0.4, 0.0, 0.0), (0.2, 0.2, 0.2), RED)], resolution=21).occupancy()
    expected_iou = box_only.sum().item() / occupied.sum().item()
    assert voxel_iou(occupied, occupied) == 1.0 and voxel_iou(box_only, occupied) == pytest.approx(expected_iou)
    assert 0.2 < expected_iou < 0.8


def test_random_shapes_are_seeded():
    first = random_shape(torch.Generator().manual_seed(3), resolution=8)
    again = random_shape(torch.Generator().manual_seed(3), resolution=8)
    other = random_shape(torch.Generator().manual_seed(4), resolution=8)
    assert torch.equal(first.densities(), again.densities()) and not torch.equal(first.densities(), other.densities())
    counts = {len(random_primitives(torch.Generator().manual_seed(s), (1, 3))) for s in range(20)}
    assert counts == {1, 2, 3}


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda grid: render(grid, torch.eye(4), 4, 4), r"cameras must be .*\(N, 4, 4\)"),
        (lambda grid: render(grid, torch.eye(4)[None, :3], 4, 4), r"cameras must be .*\(N, 4, 4\)"),
        (lambda grid: render(grid, torch.eye(4, dtype=torch.int64)[None], 4, 4), "floating-point"),
        (lambda grid: render(grid, orbit_cameras(2), 4, 4, fov_y=60.0), "fov_y"),
        (lambda grid: render(grid, orbit_cameras(2), 0, 4), "height"),
        (lambda grid: render(grid, orbit_cameras(2), 4, 4, background=(1.0, 1.0)), "background"),
        (lambda grid: orbit_cameras(0), "num_views"),
        (lambda grid: random_cameras(2, elevation_range=(10.0, 0.0)), "elevation_range"),
        (lambda grid: voxelize([]), "primitives"),
        (lambda grid: voxelize([Sphere((0, 0), 0.3, RED)]), "center"),
        (lambda grid: VoxelGrid(resolution=1), "resolution"),
        (lambda grid: voxel_iou(grid.occupancy(), grid.occupancy()[1:]), "same shape"),
    ],
)
def test_bad_inputs(call, message):
    grid = VoxelGrid(resolution=4)
    with pytest.raises((ValueError, TypeError), match=message):
        call(grid)
