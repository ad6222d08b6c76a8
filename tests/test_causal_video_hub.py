"""A causal video model saved for the Hub: the transformer ``diffusers-ext train causal-video`` writes, in a
``CausalVideoPipeline`` saved with ``save_for_hub`` (the ``causal_video`` card), loaded by Hub id through a local Hub
server (olah; see shared/HUB_TESTING.md) in a fresh Python with stock ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)``, extends a clip causally into the same frames for the same seed; ``diffusers-ext video
extend`` with such a folder writes the pipeline's continuation after the clip as it was, and refuses bad options in
one line."""

import re

import numpy as np
import PIL.Image
import PIL.ImageSequence
import pytest
import torch
from diffusers import DiffusionPipeline, WanTransformer3DModel
from huggingface_hub import ModelCard
from test_hub import _commit_folder, local_hub, run_against_local_hub  # noqa: F401  (local_hub: the local Hub server fixture)
from tiny_video import FLOAT32_TOLERANCE

from diffusers_ext.cli import main
from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.video import CausalVideoPipeline, FrameAwareVideoPipeline
from diffusers_ext.pipelines.video.causal_demo import make_causal_video, run_causal_video_demo
from diffusers_ext.pipelines.video.demo import write_video
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.training import BouncingShapes
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.fvdm import toy_backbone

# Extend a 4-frame held-out bouncing-shapes clip to 8 frames, chunks of 2, the cache bounded to 4 frames.
EXTEND = """
import json, sys, torch
from diffusers import DiffusionPipeline
from diffusers_ext.training import BouncingShapes

# olah answers repo metadata offline only for an explicit revision.
pipe = DiffusionPipeline.from_pretrained("org/tiny-causal-video", revision="main", trust_remote_code=True)
pipe.set_progress_bar_config(disable=True)
clip = (BouncingShapes(1, num_frames=4, size=16, seed=7)[0].transpose(0, 1) + 1) / 2  # (F, C, H, W) in [0, 1]
frames = pipe(video=clip, num_frames=8, chunk_frames=2, max_cache_frames=4, num_inference_steps=3,
              output_type="pt", generator=torch.Generator().manual_seed(4)).frames
print(json.dumps({"class": type(pipe).__name__, "scheduler": type(pipe.scheduler).__module__,
                  "frames": frames.tolist()}))
"""


def extend_held_out_clip(pipe: CausalVideoPipeline) -> torch.Tensor:
    """What ``EXTEND`` computes, here."""
    pipe.set_progress_bar_config(disable=True)
    clip = (BouncingShapes(1, num_frames=4, size=16, seed=7)[0].transpose(0, 1) + 1) / 2
    return pipe(video=clip, num_frames=8, chunk_frames=2, max_cache_frames=4, num_inference_steps=3, output_type="pt",
                generator=torch.Generator().manual_seed(4)).frames


def test_a_trained_causal_model_round_trips_by_hub_id_and_extends_a_clip_the_same(tmp_path, local_hub):  # noqa: F811
    endpoint, models = local_hub
    assert train_main(["causal-video", "--max-steps", "2", "--batch-size", "2", "--checkpoint-every", "0",
                       "--output-dir", str(tmp_path / "run")]) == 0
    pipe = CausalVideoPipeline(WanTransformer3DModel.from_pretrained(tmp_path / "run" / "final"),
                               FrameAwareFlowMatchScheduler())
    repo = save_for_hub(pipe, models / "org" / "tiny-causal-video", card_template="causal_video",
                        repo_id="org/tiny-causal-video", title="tiny causal video")
    card = ModelCard.load(repo / "README.md")
    assert 'DiffusionPipeline.from_pretrained("org/tiny-causal-video", trust_remote_code=True)' in card.text
    assert {"causal-video-pipeline", "arxiv:2411.16375"} <= set(card.data.tags)
    _commit_folder(repo)

    expected = extend_held_out_clip(pipe)
    loaded = run_against_local_hub(endpoint, tmp_path / "hf_home", EXTEND)
    assert loaded["class"] == "CausalVideoPipeline" and loaded["scheduler"].startswith("diffusers_ext.schedulers")
    frames = torch.tensor(loaded["frames"])
    assert frames.shape == (1, 8, 3, 16, 16)
    torch.testing.assert_close(frames, expected, **FLOAT32_TOLERANCE)
    clip = (BouncingShapes(1, num_frames=4, size=16, seed=7)[0].transpose(0, 1) + 1) / 2
    torch.testing.assert_close(frames[0, :4], clip, atol=1 / 255, rtol=0)  # the clip starts the video
    assert (frames[0, 4:] - frames[0, 3:4]).abs().max() > 0.05  # and new frames follow
    assert list((tmp_path / "hf_home").rglob("diffusers_ext_pipeline.py"))  # it came over HTTP into the fresh cache


# ``diffusers-ext video extend`` with a CausalVideoPipeline folder ---------------------------------------------------


@pytest.fixture(scope="module")
def causal_model(tmp_path_factory):
    """A random frame-causal toy Wan (``training/fvdm.py``) in a ``CausalVideoPipeline``, as ``save_for_hub`` lays
    it out."""
    return save_for_hub(CausalVideoPipeline(toy_backbone(seed=0).eval(), FrameAwareFlowMatchScheduler()),
                        tmp_path_factory.mktemp("causal") / "model")


@pytest.fixture(scope="module")
def clip_file(tmp_path_factory):
    """A 4-frame held-out bouncing-shapes GIF of 16 x 16 pixels."""
    path = tmp_path_factory.mktemp("clip") / "clip.gif"
    clip = BouncingShapes(1, num_frames=4, size=16, seed=7)[0]
    write_video(((clip.permute(1, 2, 3, 0) + 1) / 2).numpy(), path)
    return path


def gif_frames(path) -> np.ndarray:
    with PIL.Image.open(path) as video:
        return np.stack([np.asarray(frame.convert("RGB")) for frame in PIL.ImageSequence.Iterator(video)])


def test_video_extend_continues_a_clip_with_a_causal_model(tmp_path, causal_model, clip_file, capsys):
    output = tmp_path / "longer.gif"
    assert main(["video", "extend", "--model", str(causal_model), "--trust-remote-code", "--video", str(clip_file),
                 "--frames", "8", "--steps", "2", "--context-frames", "4", "--output", str(output)]) == 0
    assert "wrote" in capsys.readouterr().out
    written, given = gif_frames(output), gif_frames(clip_file)
    assert written.shape == (8, 16, 16, 3)
    np.testing.assert_array_equal(written[:4], given)  # the clip as it was
    pipe = DiffusionPipeline.from_pretrained(causal_model, trust_remote_code=True)
    video = [PIL.Image.fromarray(frame) for frame in given]
    expected = make_causal_video(pipe, video, 8, chunk_frames=2, max_cache_frames=4, num_inference_steps=2)
    # The file holds the pipeline's frames for the seed, up to the GIF's 8-bit palette.
    assert np.abs(written[4:] / 255 - expected[4:]).max() < 0.05


@pytest.mark.parametrize("arguments, message", [
    (["generate"], "is a CausalVideoPipeline: it extends a video .* not generate"),
    (["extend", "--video", "{clip}", "--window", "4"], "--window is for a FrameAwareVideoPipeline"),
    (["extend", "--video", "{clip}", "--frames", "4"], "--frames 4 must exceed the 4 frames"),
    (["extend", "--video", "{tmp}/none.gif"], "no such file"),
])
def test_video_extend_refuses_bad_options_in_one_line(tmp_path, causal_model, clip_file, capsys, arguments, message):
    arguments = [a.format(clip=clip_file, tmp=tmp_path) for a in arguments]
    output = tmp_path / "out.gif"
    code = main(["video", arguments[0], "--model", str(causal_model), "--trust-remote-code", "--output", str(output),
                 *arguments[1:]])
    error = capsys.readouterr().err
    assert code == 2 and len(error.strip().splitlines()) == 1 and re.search(message, error), error
    assert not output.exists()


def test_chunk_frames_needs_a_causal_model(tmp_path, clip_file, capsys):
    folder = save_for_hub(FrameAwareVideoPipeline(toy_backbone(seed=0).eval(), FrameAwareFlowMatchScheduler()),
                          tmp_path / "fvdm")
    assert main(["video", "extend", "--model", str(folder), "--trust-remote-code", "--video", str(clip_file),
                 "--chunk-frames", "2", "--output", str(tmp_path / "out.gif")]) == 2
    assert "--chunk-frames is for a CausalVideoPipeline" in capsys.readouterr().err


def test_the_causal_demo_writes_its_gifs_and_figures(tmp_path):
    pipe = CausalVideoPipeline(toy_backbone(seed=0).eval(), FrameAwareFlowMatchScheduler())
    scores = run_causal_video_demo(tmp_path, pipe=pipe, num_clips=1, num_frames=6, long_frames=8, max_cache_frames=2,
                                   num_inference_steps=1, shown=1)
    assert set(scores) == {"model", "last given frame held still"} and all(v > 0 for v in scores.values())
    assert len(gif_frames(tmp_path / "causal_extension.gif")) == 6
    assert len(gif_frames(tmp_path / "causal_long_video.gif")) == 8
    assert "the given causal model" in (tmp_path / "causal_video.txt").read_text()
