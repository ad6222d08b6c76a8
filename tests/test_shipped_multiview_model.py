"""The tiny multi-view model that ships in the package (``tiny-mvdream-shapes``, trained by
``training/recipes/tiny_multiview_shapes.py``): it loads through stock diffusers, is small and safetensors only, its
views of one object agree with each other more than its 2D base model's views sampled one by one (the issue's
consistency figure, measured afresh on held-out sampling seeds), and the recipe's smoke run writes a folder that
loads."""

import json

import pytest
from diffusers import DiffusionPipeline, UNet2DConditionModel
from huggingface_hub import ModelCard

from diffusers_ext import load_shipped_pipeline, shipped_model_path
from diffusers_ext.pipelines.three_d import CameraEmbedding, MultiViewDiffusionPipeline
from diffusers_ext.pipelines.three_d.demo import SHIPPED_MULTIVIEW_MODEL
from diffusers_ext.pipelines.three_d.rendering import orbit_cameras
from diffusers_ext.training.recipes import tiny_multiview_shapes as recipe

NAME = "tiny-mvdream-shapes"
OBJECTS = 8  # view sets per sample: the recipe's fit_sets
STEPS = 50  # the pipeline's default number of DDPM steps


@pytest.fixture(scope="module")
def pipe():
    pipe = load_shipped_pipeline(NAME)  # stock DiffusionPipeline.from_pretrained(..., trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def base():
    return UNet2DConditionModel.from_pretrained(shipped_model_path(NAME), subfolder=recipe.BASE_UNET_FOLDER)


@pytest.fixture(scope="module")
def cameras():
    return orbit_cameras(recipe.NUM_VIEWS, elevation=recipe.EVAL_ELEVATION)


@pytest.fixture(scope="module")
def samples(pipe, base, cameras):
    """Seed -> the multi-view model's and the base model's views of ``OBJECTS`` objects (the recipe's sampling)."""
    per_view = recipe.per_view_pipeline(base)
    return {seed: {"multi-view": recipe.sample_views(pipe, OBJECTS * pipe.num_views, STEPS, seed, cameras),
                   "2D base per view": recipe.sample_views(per_view, OBJECTS * pipe.num_views, STEPS, seed, cameras)}
            for seed in (1000, 2000)}


def test_ships_as_a_small_loadable_multiview_pipeline_with_its_card_and_report(pipe, base):
    folder = shipped_model_path(NAME)
    assert NAME == SHIPPED_MULTIVIEW_MODEL
    assert type(pipe) is MultiViewDiffusionPipeline and pipe.num_views == 4 and pipe.vae is None
    assert isinstance(pipe.camera_embedding, CameraEmbedding)
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 10_000_000 and not list(folder.rglob("*.bin")) and len(list(folder.rglob("*.safetensors"))) == 3
    card = ModelCard.load(folder / "README.md")
    assert {"multi-view-diffusion-pipeline", "arxiv:2308.16512"} <= set(card.data.tags)
    report = json.loads((folder / "training_report.json").read_text())
    assert report["budget"]["multiview_steps"] >= 1000 and report["budget"]["base_steps"] >= 1000
    figures = report["figures"]
    assert set(figures) == {"real renders", "multi-view model", "2D base model per view",
                            "real renders shuffled across objects"}
    for row in figures.values():
        assert set(row) == {"colour_spread", "area_spread", "sliced_w2_to_real", "held_out_view_mse"}
    assert base.state_dict().keys() == pipe.unet.state_dict().keys()  # the same UNet before fine-tuning


def test_its_views_of_one_object_agree_more_than_the_base_models_views_sampled_one_by_one(samples):
    """Colour spread (multi-view / base) was 0.31-0.52 over twelve runs (seeds 0-5000, 50 and 250 DDPM steps of 8
    objects): the bound leaves room for another CPU's rounding and these seeds."""
    for seed, views in samples.items():
        multiview, per_view = (recipe.view_set_figures(views[name], recipe.NUM_VIEWS)["colour_spread"]
                               for name in ("multi-view", "2D base per view"))
        print(f"\nseed {seed}: colour spread multi-view {multiview:.3f}, 2D base per view {per_view:.3f}")
        assert multiview < 0.7 * per_view, seed


def test_a_voxel_grid_fitted_to_its_views_renders_the_held_out_view_better(samples, cameras):
    """The issue's figure: three views of a set fitted by a voxel grid, the fourth camera re-rendered. The ratio was
    0.44-0.59 over the same twelve runs (0.61 over the report's 32 objects)."""
    views = samples[1000]
    multiview, per_view = (recipe.held_out_view_error(views[name], cameras, OBJECTS, iterations=100)
                           for name in ("multi-view", "2D base per view"))
    print(f"\nheld-out-view MSE: multi-view {multiview:.4f}, 2D base per view {per_view:.4f}")
    assert multiview < 0.8 * per_view


def test_the_recipes_smoke_run_writes_a_folder_that_loads_with_its_report(tmp_path):
    assert recipe.main(["--budget", "smoke", "--output", str(tmp_path / "model"),
                        "--checkpoints", str(tmp_path / "checkpoints")]) == 0
    written = DiffusionPipeline.from_pretrained(tmp_path / "model", trust_remote_code=True)
    assert type(written) is MultiViewDiffusionPipeline
    report = json.loads((tmp_path / "model" / "training_report.json").read_text())
    assert report["budget"] == {**recipe.BUDGETS["smoke"].__dict__}
    assert (tmp_path / "model" / "samples.png").is_file()
    assert UNet2DConditionModel.from_pretrained(tmp_path / "model", subfolder=recipe.BASE_UNET_FOLDER) is not None
