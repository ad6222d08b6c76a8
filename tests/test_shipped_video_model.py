"""The tiny FVDM video model that ships in the package: it loads through stock diffusers, is small and safetensors
only, its card and report say what they measure, a fresh measurement of one row reproduces its report, and its
clips hold together in time better than its own frames shuffled across clips."""

import json

import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_ext import load_shipped_pipeline, shipped_model_path
from diffusers_ext.pipelines.video import FrameAwareVideoPipeline
from diffusers_ext.testing.video_metrics import VideoMetrics, independent_frames
from diffusers_ext.training.recipes import tiny_fvdm_shapes as recipe

NAME = "tiny-fvdm-shapes"


@pytest.fixture(scope="module")
def pipe():
    pipe = load_shipped_pipeline(NAME)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def report():
    return json.loads((shipped_model_path(NAME) / "training_report.json").read_text())


def test_ships_as_a_loadable_pipeline_with_its_card_and_report(pipe, report):
    folder = shipped_model_path(NAME)
    assert type(pipe) is FrameAwareVideoPipeline and pipe.vae is None
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 10_000_000 and not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    card = ModelCard.load(folder / "README.md")
    assert {"frame-aware-video-pipeline", "arxiv:2410.03160"} <= set(card.data.tags)
    assert "| task | sampler |" in card.text and (folder / "samples.png").is_file()
    assert report["budget"]["name"] == "full"
    assert report["runs"]["fvdm"]["steps"] == report["runs"]["scalar_timestep"]["steps"]
    assert sum(p.numel() for p in pipe.transformer.parameters()) == report["parameters"]


def test_image_to_video_reproduces_the_report(pipe, report):
    """The report's FVDM image-to-video row, measured again as the recipe measures it (task 1's seed)."""
    budget = recipe.BUDGETS["full"]
    held_out = recipe.bouncing_clips(budget.eval_clips, recipe.HELD_OUT_SEED)
    metrics = VideoMetrics(recipe.bouncing_clips(budget.reference_clips, recipe.REFERENCE_SEED))
    clips = recipe.sample_with_clean_frames(pipe, held_out, [0], budget.inference_steps,
                                            torch.Generator().manual_seed(1))
    fresh = {**metrics(clips), "held_out_mse": float(recipe.held_out_mse(clips, held_out, [0]).mean())}
    recorded = report["held_out"]["image-to-video"]["FVDM"]
    print("\nfresh", {k: round(v, 4) for k, v in fresh.items()}, "\nrecorded", recorded)
    for key, value in recorded.items():
        assert fresh[key] == pytest.approx(value, rel=0.02, abs=2e-3), key


def test_generated_clips_hold_together_better_than_their_frames_shuffled_across_clips(pipe):
    """The temporal link the model learned: its clips' centroids accelerate less, and their foreground changes
    area and colour less, than the same frames taken from different clips."""
    clips = recipe.sample_standard(pipe, 32, 20, torch.Generator().manual_seed(0))
    metrics = VideoMetrics(recipe.bouncing_clips(64, recipe.REFERENCE_SEED))
    generated = metrics(clips)
    shuffled = metrics(independent_frames(clips, torch.Generator().manual_seed(0)))
    print("\ngenerated", generated, "\nframes from other clips", shuffled)
    for key in ("centroid_acceleration", "area_change", "colour_change"):
        assert generated[key] < 0.7 * shuffled[key], key
