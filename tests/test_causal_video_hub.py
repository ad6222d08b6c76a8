"""A causal video model from ``diffusers-ext train causal-video`` on the Hub: its transformer in a
``CausalVideoPipeline`` saved with ``save_for_hub`` (the ``causal_video`` card), loaded by Hub id through a local Hub
server (olah; see shared/HUB_TESTING.md) in a fresh Python with stock ``DiffusionPipeline.from_pretrained(...,
trust_remote_code=True)``, extends a clip causally into the same frames for the same seed."""

import torch
from diffusers import WanTransformer3DModel
from huggingface_hub import ModelCard
from test_hub import _commit_folder, local_hub, run_against_local_hub  # noqa: F401  (local_hub: the local Hub server fixture)
from tiny_video import FLOAT32_TOLERANCE

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.video import CausalVideoPipeline
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.training import BouncingShapes
from diffusers_ext.training.cli import main as train_main

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
