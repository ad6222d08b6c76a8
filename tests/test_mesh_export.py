"""Mesh and turntable export (pipelines/three_d/mesh_export.py)."""

import math

import numpy as np
import PIL.Image
import pytest
import torch
import trimesh

from diffusers_ext.pipelines.three_d.mesh_export import (
    current_umask,
    export_mesh,
    export_turntable,
    extract_mesh,
    surface_threshold,
)
from diffusers_ext.pipelines.three_d.rendering import VoxelGrid, orbit_cameras, render
from diffusers_ext.pipelines.three_d.shapes import DEFAULT_SHAPE_DENSITY, Box, Sphere, voxelize

RED, BLUE = (1.0, 0.0, 0.0), (0.0, 0.0, 1.0)


def two_part_shape(resolution: int = 20) -> VoxelGrid:
    return voxelize([Sphere((-0.35, 0.0, 0.0), 0.3, RED), Box((0.4, 0.0, 0.0), (0.2, 0.25, 0.2), BLUE)], resolution)


def test_sphere_mesh_is_closed_outward_and_of_the_right_size():
    sphere = voxelize([Sphere((0.2, -0.1, 0.0), 0.5, RED)], resolution=24)
    vertices, faces, colours = extract_mesh(sphere)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight
    # the surface sits where the ramp of one voxel around the true surface crosses the threshold
    radius = 0.5 + sphere.voxel_size * (0.5 - surface_threshold(sphere, None) / DEFAULT_SHAPE_DENSITY)
    assert mesh.volume == pytest.approx(4 / 3 * math.pi * radius**3, rel=0.05)  # positive: normals point out
    np.testing.assert_allclose(mesh.centroid, [0.2, -0.1, 0.0], atol=0.01)
    np.testing.assert_allclose(colours, np.tile(RED, (len(colours), 1)), atol=1e-3)


@pytest.mark.parametrize("suffix", ["ply", "obj", "glb"])
def test_mesh_files_keep_geometry_and_vertex_colours(tmp_path, suffix):
    shape = two_part_shape()
    vertices, faces, _ = extract_mesh(shape)
    path = export_mesh(shape, tmp_path / f"shape.{suffix}")
    loaded = trimesh.load(path, force="mesh", process=False)
    assert len(loaded.faces) == len(faces)
    assert loaded.volume == pytest.approx(trimesh.Trimesh(vertices, faces, process=False).volume, rel=1e-4)
    # red vertices on the sphere's side (x < 0), blue on the box's
    loaded_colours = loaded.visual.vertex_colors[:, :3] / 255.0
    left = loaded.vertices[:, 0] < -0.2
    right = loaded.vertices[:, 0] > 0.25
    assert left.any() and right.any()
    np.testing.assert_allclose(loaded_colours[left].mean(0), RED, atol=0.02)
    np.testing.assert_allclose(loaded_colours[right].mean(0), BLUE, atol=0.02)
    assert sorted(p.name for p in tmp_path.iterdir()) == [f"shape.{suffix}"]
    assert path.stat().st_mode & 0o777 == 0o666 & ~current_umask()  # a new file's mode, not mkstemp's private one


def test_empty_volume_is_a_clear_error_and_writes_nothing(tmp_path):
    with pytest.raises(ValueError, match="empty volume"):
        export_mesh(VoxelGrid(resolution=8, initial_density=0.1), tmp_path / "empty.glb")
    assert list(tmp_path.iterdir()) == []


def test_failed_write_leaves_nothing_half_written(tmp_path, monkeypatch):
    path = tmp_path / "shape.ply"
    path.write_bytes(b"previous")

    def broken_export(self, file_obj=None, file_type=None, **kwargs):
        with open(file_obj, "wb") as handle:
            handle.write(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(trimesh.Trimesh, "export", broken_export)
    with pytest.raises(OSError, match="disk full"):
        export_mesh(two_part_shape(12), path)
    assert path.read_bytes() == b"previous" and [p.name for p in tmp_path.iterdir()] == ["shape.ply"]


def test_turntable_gif_is_the_orbit_render(tmp_path):
    shape = two_part_shape(12)
    path = export_turntable(shape, tmp_path / "turntable.gif", num_frames=6, size=24, elevation=20.0)
    with PIL.Image.open(path) as gif:
        assert gif.n_frames == 6 and gif.size == (24, 24)
        first = np.asarray(gif.convert("RGB"), dtype=np.float32) / 255
    expected = render(shape, orbit_cameras(6, elevation=20.0)[:1], 24, 24)[0].detach().permute(1, 2, 0).numpy()
    assert np.abs(first - expected).mean() < 0.03  # GIF palette quantisation only


@pytest.mark.parametrize(
    "call, message",
    [
        (lambda path: export_mesh(two_part_shape(8), path / "shape.stl"), "must end in"),
        (lambda path: export_turntable(two_part_shape(8), path / "turntable.mp4"), "must end in .gif"),
    ],
)
def test_bad_inputs(tmp_path, call, message):
    with pytest.raises(ValueError, match=message):
        call(tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_mesh_of_a_full_cube_closes_at_the_boundary():
    full = VoxelGrid.from_fields(torch.full((6, 6, 6), 40.0), torch.full((3, 6, 6, 6), 0.5))
    vertices, faces, _ = extract_mesh(full)
    mesh = trimesh.Trimesh(vertices, faces, process=False)
    assert mesh.is_watertight and mesh.volume == pytest.approx(8.0, rel=1e-4)
