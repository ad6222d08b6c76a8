"""The tiny 4x super-resolution ResShift model that ships in the package: it loads through stock diffusers, beats
bicubic upsampling on photos it was not trained on, its 4-step result is close to its 15-step one, its report says
what it measures, and the ``diffusers-ext restore`` command uses it."""

import json

import numpy as np
import PIL.Image
import pytest
import torch
from huggingface_hub import ModelCard

from diffusers_ext import load_shipped_pipeline, shipped_model_path
from diffusers_ext.cli import main
from diffusers_ext.pipelines import ResShiftPipeline
from diffusers_ext.pipelines.restoration.demo import super_resolve_held_out
from diffusers_ext.training.recipes.tiny_resshift_sr import EVALUATION_TILES
from diffusers_ext.training.restoration_data import psnr, scikit_image_photos


@pytest.fixture(scope="module")
def pipe():
    pipe = load_shipped_pipeline("tiny-resshift-sr4")
    pipe.set_progress_bar_config(disable=True)
    return pipe


@pytest.fixture(scope="module")
def held_out_scores(pipe):
    scores = {}
    for steps in (4, 15):
        images = super_resolve_held_out(pipe, tiles=EVALUATION_TILES, num_inference_steps=steps)
        scores["bicubic"] = float(psnr(images["bicubic"], images["reference"]).mean())
        scores[steps] = float(psnr(images["restored"], images["reference"]).mean())
    print(f"\nheld-out PSNR: bicubic {scores['bicubic']:.2f} dB, 4 steps {scores[4]:.2f} dB, "
          f"15 steps {scores[15]:.2f} dB")
    return scores


def test_ships_as_a_loadable_pipeline_with_its_card(pipe):
    folder = shipped_model_path("tiny-resshift-sr4")
    assert type(pipe) is ResShiftPipeline and pipe.config.upscale_factor == 4
    size = sum(f.stat().st_size for f in folder.rglob("*") if f.is_file())
    assert size < 8_000_000 and not list(folder.rglob("*.bin")) and list(folder.rglob("*.safetensors"))
    card = ModelCard.load(folder / "README.md")
    assert card.data.pipeline_tag == "image-to-image" and "res-shift-pipeline" in card.data.tags
    assert "PSNR" in card.text


def test_beats_bicubic_on_held_out_photos(held_out_scores):
    assert held_out_scores[15] > held_out_scores["bicubic"]
    assert held_out_scores[4] > held_out_scores["bicubic"]


def test_four_steps_are_within_half_a_decibel_of_fifteen(held_out_scores):
    assert abs(held_out_scores[15] - held_out_scores[4]) <= 0.5


def test_training_report_matches_a_fresh_measurement(held_out_scores):
    report = json.loads((shipped_model_path("tiny-resshift-sr4") / "training_report.json").read_text())["held_out"]
    assert report["bicubic"]["psnr"] == pytest.approx(held_out_scores["bicubic"], abs=1e-3)
    assert report["resshift, 15 steps"]["psnr"] == pytest.approx(held_out_scores[15], abs=1e-2)


def test_the_held_out_photos_are_not_training_photos():
    train = scikit_image_photos("train")
    for photo in scikit_image_photos("held_out"):
        assert all(photo.shape != other.shape or not torch.equal(photo, other) for other in train)


def test_restore_command_upscales_a_file_by_four(tmp_path, capsys):
    lowres = (np.random.default_rng(0).random((12, 10, 3)) * 255).astype(np.uint8)
    PIL.Image.fromarray(lowres).save(tmp_path / "low.png")
    assert main(["restore", str(tmp_path / "low.png"), str(tmp_path / "out" / "high.png"), "--steps", "4"]) == 0
    assert PIL.Image.open(tmp_path / "out" / "high.png").size == (40, 48)
    assert "wrote" in capsys.readouterr().out
    main(["restore", str(tmp_path / "low.png"), str(tmp_path / "same.png"), "--steps", "2", "--scale", "1"])
    assert PIL.Image.open(tmp_path / "same.png").size == (10, 12)


def test_restore_command_bad_inputs_are_one_line_errors(tmp_path, capsys):
    def error_of(*arguments) -> str:
        assert main(["restore", *map(str, arguments)]) == 2
        message = capsys.readouterr().err.strip()
        assert message.count("\n") == 0
        return message

    assert "no input image" in error_of(tmp_path / "missing.png", tmp_path / "out.png")
    (tmp_path / "broken.png").write_bytes(b"not an image")
    assert "cannot read" in error_of(tmp_path / "broken.png", tmp_path / "out.png")
    PIL.Image.new("RGB", (8, 8)).save(tmp_path / "ok.png")
    assert "trust_remote_code" in error_of(tmp_path / "ok.png", tmp_path / "out.png", "--model", shipped_model_path("tiny-resshift-sr4"))


def test_a_call_without_steps_samples_the_models_best_step_count(pipe):
    report = json.loads((shipped_model_path("tiny-resshift-sr4") / "training_report.json").read_text())["held_out"]
    best = max((name for name in report if name.startswith("resshift")), key=lambda name: report[name]["psnr"])
    calls = []
    handle = pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(args[1]))
    try:
        pipe(torch.rand(1, 3, 8, 8), output_type="np")
    finally:
        handle.remove()
    assert best == f"resshift, {len(calls)} steps" == f"resshift, {pipe.config.default_num_inference_steps} steps"


def test_an_unknown_shipped_model_is_a_clear_error():
    with pytest.raises(ValueError, match="the package ships"):
        shipped_model_path("tiny-sd")
