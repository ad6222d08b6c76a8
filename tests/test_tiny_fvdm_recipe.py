"""The tiny FVDM recipe (diffusers_ext.training.recipes.tiny_fvdm_shapes) at its smoke budget: both models train,
every task and sampler is scored, the folder loads as a FrameAwareVideoPipeline through stock diffusers, a second
run gives the same figures, and both conditioning methods return the given frames as they were given."""

import json

import PIL.Image
import pytest
import torch
from diffusers import DiffusionPipeline
from huggingface_hub import ModelCard

from diffusers_ext.pipelines.video import FrameAwareVideoPipeline
from diffusers_ext.training.recipes import tiny_fvdm_shapes as recipe

SAMPLERS = {
    "standard": ["FVDM", "scalar timestep"],
    "image-to-video": ["FVDM", "scalar timestep, replacement", "scalar timestep, FVDM plan"],
    "interpolation": ["FVDM", "scalar timestep, replacement", "scalar timestep, FVDM plan"],
    "long video": ["FVDM", "scalar timestep, replacement", "scalar timestep, FVDM plan"],
}
BASELINES = ["frames sampled independently", "real clips (floor)"]


@pytest.fixture(scope="module")
def smoke_run(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-fvdm")
    report = recipe.main(["--budget", "smoke", "--output", str(folder / "model"), "--checkpoints",
                          str(folder / "checkpoints")])
    return folder / "model", report


def test_the_smoke_run_scores_every_task_and_sampler(smoke_run):
    folder, report = smoke_run
    assert json.loads((folder / "training_report.json").read_text()) == report
    assert list(report["standard_errors"]) == list(SAMPLERS)
    assert report["runs"]["fvdm"]["vectorized_probability"] == 0.2
    assert report["runs"]["scalar_timestep"]["vectorized_probability"] == 0.0
    assert report["runs"]["fvdm"]["steps"] == report["runs"]["scalar_timestep"]["steps"] == recipe.BUDGETS[
        "smoke"].steps
    assert list(report["held_out"]) == list(SAMPLERS)
    for task, samplers in SAMPLERS.items():
        rows = report["held_out"][task]
        assert list(rows) == samplers + BASELINES
        for name, figures in rows.items():
            assert all(isinstance(value, float) and value == value for value in figures.values())
            assert ("held_out_mse" in figures) == (task in ("image-to-video", "interpolation"))
            errors = report["standard_errors"][task][name]
            assert errors.keys() == figures.keys() and all(value >= 0 for value in errors.values())
        assert rows["real clips (floor)"]["clean_fraction"] == 1.0
    card = ModelCard.load(folder / "README.md")
    assert {"frame-aware-video-pipeline", "arxiv:2410.03160", "video"} <= set(card.data.tags)
    assert all(task in card.text for task in SAMPLERS) and "| task | sampler |" in card.text
    rows = sum(len(samplers) + len(BASELINES) for samplers in SAMPLERS.values())
    with PIL.Image.open(folder / "samples.png") as sheet:
        assert sheet.size == (4 * 17 * recipe.LONG_VIDEO_WINDOWS * recipe.NUM_FRAMES, 4 * 17 * rows)


def test_the_folder_loads_with_stock_diffusers_and_generates(smoke_run):
    folder, report = smoke_run
    assert not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert type(pipe) is FrameAwareVideoPipeline and pipe.vae is None
    assert sum(p.numel() for p in pipe.transformer.parameters()) == report["parameters"]
    frames = pipe(num_frames=8, height=16, width=16, num_inference_steps=2, output_type="pt",
                  generator=torch.Generator().manual_seed(0)).frames
    assert frames.shape == (1, 8, 3, 16, 16) and torch.isfinite(frames).all()


def test_a_second_run_gives_the_same_figures(smoke_run, tmp_path):
    _, report = smoke_run
    again = recipe.main(["--budget", "smoke", "--output", str(tmp_path / "model"), "--checkpoints",
                         str(tmp_path / "checkpoints")])
    assert again["held_out"] == report["held_out"] and again["standard_errors"] == report["standard_errors"]


@pytest.mark.parametrize("conditioning", [recipe.sample_with_clean_frames, recipe.sample_with_replacement])
def test_given_frames_come_back_as_given(conditioning):
    pipe = recipe.video_pipeline(recipe.tiny_video_transformer(seed=0).eval())
    given = recipe.bouncing_clips(2, seed=5)
    frames = [0, recipe.NUM_FRAMES - 1]
    clips = conditioning(pipe, given, frames, 3, torch.Generator().manual_seed(0))
    assert clips.shape == given.shape
    torch.testing.assert_close(clips[:, :, frames], given[:, :, frames], atol=1e-6, rtol=0)
    assert not torch.allclose(clips[:, :, 1:-1], given[:, :, 1:-1], atol=0.1)
