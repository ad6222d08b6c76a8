"""``diffusers-ext 3d reconstruct`` and the ``3d_inverse`` demo part's functions, on a tiny random
``DiffusionMBIRPipeline`` folder: bad options are one-line errors found before torch is imported, and write nothing;
a run writes the pipeline's reconstruction for the seed."""

import json

import numpy as np
import pytest
import torch
from diffusers import DDPMScheduler, UNet2DModel
from test_video_cli import assert_clear_errors_before_torch

from diffusers_ext.cli import main
from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.three_d.pipeline_diffusion_mbir import DiffusionMBIRPipeline
from diffusers_ext.pipelines.three_d.volume_demo import TASKS, reconstruct, volume_scores

SIZE = 12


def tiny_pipeline() -> DiffusionMBIRPipeline:
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=SIZE, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(8, 8),
                       norm_num_groups=4, down_block_types=("DownBlock2D",) * 2, up_block_types=("UpBlock2D",) * 2)
    pipe = DiffusionMBIRPipeline(unet=unet.eval(), scheduler=DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    return save_for_hub(tiny_pipeline(), tmp_path_factory.mktemp("model") / "tiny-mbir")


@pytest.fixture(scope="module")
def inputs(tmp_path_factory):
    folder = tmp_path_factory.mktemp("inputs")
    volume = np.random.default_rng(0).random((SIZE, SIZE, SIZE), dtype=np.float32)
    np.save(folder / "volume.npy", volume)
    np.save(folder / "flat.npy", volume[0])
    np.save(folder / "odd.npy", volume[:, :11, :11])
    np.save(folder / "oblong.npy", volume[:, :, :6])
    np.save(folder / "nan.npy", np.full((SIZE, SIZE, SIZE), np.nan, dtype=np.float32))
    np.save(folder / "deep6.npy", volume[:6])  # not a multiple of 4
    (folder / "notes.npy").write_text("not numpy")
    return folder




def test_bad_options_are_one_line_errors_before_torch_is_imported_and_write_nothing(tmp_path, inputs, model):
    out = str(tmp_path / "out.npy")
    i = lambda name: str(inputs / name)  # noqa: E731
    m = ["--model", str(model), "--trust-remote-code"]
    cases = [
        ([i("missing.npy"), out], "no volume at"),
        ([i("notes.npy"), out], "cannot read"),
        ([i("flat.npy"), out], "a volume is a real (D, H, W) array"),
        ([i("nan.npy"), out], "NaN or infinite"),
        ([i("volume.npy"), str(tmp_path / "out.png")], "the output is a .npy file"),
        ([i("oblong.npy"), out, *m], "parallel-beam CT takes square slices"),
        ([i("odd.npy"), out, *m], "multiples of 2; odd.npy (12x11x11) gives slices of 11x11 along axis 0"),
        ([i("deep6.npy"), out, "--sr", "4", *m], "its depth 6 must be a multiple of 4"),
        ([i("volume.npy"), out, "--sr", "4", "--views", "8"], "leave out --views and --limited-angle"),
        ([i("volume.npy"), out, "--sr", "1"], "--sr must be a factor of at least 2"),
        ([i("volume.npy"), out, "--lambda-tv", "-1"], "--lambda-tv must be >= 0"),
        ([i("volume.npy"), out, "--rho", "0"], "--rho must be > 0"),
        ([i("volume.npy"), out, "--views", "0"], "must be a positive integer"),
    ]
    assert_clear_errors_before_torch([(["3d", "reconstruct", *arguments], message) for arguments, message in cases])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("options, task", [([], "sparse-view"), (["--limited-angle", "--views", "6"], "limited-angle"),
                                           (["--sr", "2"], "sr")])
def test_reconstruct_writes_the_pipelines_volume_for_the_seed(tmp_path, inputs, model, capsys, options, task):
    out = tmp_path / "out.npy"
    assert main(["3d", "reconstruct", str(inputs / "volume.npy"), str(out), "--model", str(model),
                 "--trust-remote-code", "--steps", "2", "--seed", "3", *options]) == 0
    written = np.load(out)
    truth = torch.from_numpy(np.load(inputs / "volume.npy"))
    operator = TASKS[task].operator(SIZE, views=6 if task == "limited-angle" else None, factor=2)
    expected = reconstruct(tiny_pipeline(), TASKS[task], operator.forward(truth), operator, truth.shape,
                           "DiffusionMBIR", num_inference_steps=2, seed=3)
    np.testing.assert_allclose(written, expected.numpy(), rtol=0, atol=1e-6)
    scores = volume_scores(expected, truth, TASKS[task].axis)
    assert f"DiffusionMBIR {scores['psnr']:.2f} dB" in capsys.readouterr().out
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out.npy"]


def test_volume_scores_against_known_values():
    truth = torch.zeros(12, 12, 12)
    shifted = truth + 0.1
    scores = volume_scores(shifted, truth)
    assert scores["psnr"] == pytest.approx(20.0) and scores["gradient_error"] == pytest.approx(0.0, abs=1e-7)
    ramp = torch.arange(12.0)[:, None, None].expand(12, 12, 12) / 12
    assert volume_scores(ramp, truth)["gradient_error"] == pytest.approx(1 / 12, rel=1e-5)
    assert volume_scores(truth, truth)["ssim"] == pytest.approx(1.0)


def test_volume_demo_writes_every_task_and_kind_with_its_scores(tmp_path, capsys):
    from diffusers_ext.pipelines.three_d.volume_demo import METHODS, run_volume_demo

    scores = run_volume_demo(tmp_path, num_inference_steps=2, pipe=tiny_pipeline(), kinds=("blobs",), size=16)
    expected = {f"{task}/blobs" for task in TASKS}
    assert set(scores) == expected and all(set(row) == set(METHODS) for row in scores.values())
    assert json.loads((tmp_path / "scores.json").read_text()) == scores
    assert sorted(p.name for p in tmp_path.glob("*.png")) == sorted(f"{k.replace('/', '_')}.png" for k in expected)
    printed = capsys.readouterr().out
    assert f"{scores['sparse-view/blobs']['baseline']['psnr']:.2f}" in printed
