"""The ``3d`` part of ``diffusers-ext demo`` (pipelines/three_d/demo.py) at a reduced size: every file it promises is
written, the meshes load, the scores are IoUs and fractions, and ``diffusers-ext demo --help`` lists the part."""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys

import PIL.Image
import pytest

from diffusers_ext.pipelines.three_d.demo import run_3d_demo

SMALL = {"num_iterations": 30, "size": 8, "resolution": 8, "turntable_size": 16, "num_objects": 2,
         "num_inference_steps": 3, "shipped_inference_steps": 3}


def test_the_3d_demo_writes_meshes_turntables_view_grids_and_scores(tmp_path, capsys):
    trimesh = pytest.importorskip("trimesh")
    scores = run_3d_demo(tmp_path, **SMALL)
    for method in ("sds", "sdi"):
        mesh = trimesh.load(tmp_path / method / "mesh.glb", force="mesh")
        assert len(mesh.vertices) > 0 and len(mesh.faces) > 0
        with PIL.Image.open(tmp_path / method / "turntable.gif") as turntable:
            assert turntable.n_frames > 1 and turntable.size == (16, 16)
    for name in ("distillation.png", "views_joint.png", "views_per_view.png"):
        with PIL.Image.open(tmp_path / name) as image:
            assert image.width > 0
    with PIL.Image.open(tmp_path / "views_joint.png") as grid:  # 2 objects by 4 views of 8 pixels, enlarged 4 times
        assert grid.size == (4 * 8 * 4, 2 * 8 * 4)
    for name in ("views_shipped.png", "views_shipped_base.png"):  # the shipped model's 16-pixel views
        with PIL.Image.open(tmp_path / name) as grid:
            assert grid.size == (4 * 16 * 4, 2 * 16 * 4)
    written = json.loads((tmp_path / "scores.json").read_text(encoding="utf-8"))
    assert written == pytest.approx(scores)
    for key in ("sds_voxel_iou", "sdi_voxel_iou", "joint_one_shape_fraction", "per_view_one_shape_fraction"):
        assert isinstance(written[key], float) and 0 <= written[key] <= 1
    for key in ("shipped_colour_spread", "shipped_base_colour_spread"):  # distances between colours in [0, 1]^3
        assert isinstance(written[key], float) and 0 <= written[key] <= 3 ** 0.5
    table = capsys.readouterr().out
    assert "SDS" in table and "SDI" in table and "sets of one shape" in table and "tiny-mvdream-shapes" in table


def test_without_trimesh_the_demo_writes_everything_but_the_meshes(tmp_path, monkeypatch, capsys):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None if name == "trimesh"
                        else find_spec(name, *args))
    run_3d_demo(tmp_path, **SMALL)
    assert not list(tmp_path.rglob("*.glb"))
    assert (tmp_path / "sds" / "turntable.gif").is_file() and (tmp_path / "scores.json").is_file()
    assert "no meshes written" in capsys.readouterr().out


def test_demo_help_lists_the_3d_part():
    result = subprocess.run([sys.executable, "-m", "diffusers_ext.cli", "demo", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert result.returncode == 0
    assert "'3d'" in result.stdout and "3d_inverse" in result.stdout
