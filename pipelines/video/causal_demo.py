"""Causal video extension (Ca2-VDM, arXiv 2411.16375; ViD-GPT, arXiv 2406.10981) for ``diffusers-ext video extend``
with a ``CausalVideoPipeline`` model, and its demo: the shipped causal model of bouncing shapes (``tiny-causal-shapes``,
the shipped FVDM model fine-tuned frame-causal by ``training/recipes/tiny_causal_shapes.py``) extending held-out clips
chunk by chunk with the KV cache, next to the held-out clips' own continuation."""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import export_to_gif
from tqdm.auto import tqdm

from ...cli import CAUSAL_CHUNK_FRAMES, VIDEO_FPS, VIDEO_STEPS
from ...shipped import load_pipeline_or_shipped, load_shipped_pipeline
from ...training.recipes import tiny_fvdm_shapes as recipe
from .demo import side_by_side, write_video
from .frame_plan import latent_frame_count
from .pipeline_causal import CausalVideoPipeline


def make_causal_video(pipe: CausalVideoPipeline, video: Sequence[PIL.Image.Image], num_frames: int,
                      chunk_frames: int = CAUSAL_CHUNK_FRAMES, max_cache_frames: int | None = None,
                      num_inference_steps: int = VIDEO_STEPS, seed: int = 0, progress: bool = False) -> np.ndarray:
    """``video`` extended to ``num_frames`` frames in all, ``(num_frames, H, W, 3)`` in ``[0, 1]``: the given frames
    as they are, then the model's chunks of ``chunk_frames`` frames, each denoised given the clean frames before it
    (the newest ``max_cache_frames`` latent frames of them; None: all). ``progress``: one bar over every step of
    every chunk."""
    ratio = pipe.temporal_compression
    new_latent_frames = latent_frame_count(num_frames, ratio) - latent_frame_count(len(video), ratio)
    steps = math.ceil(new_latent_frames / (chunk_frames // ratio)) * num_inference_steps
    pipe.set_progress_bar_config(disable=True)  # one bar over all chunks instead of one per chunk
    with tqdm(total=steps, desc="sampling", unit="step", disable=not progress) as bar:

        def count_step(*_) -> dict:
            bar.update()
            return {}

        frames = pipe(video=list(video), num_frames=num_frames, chunk_frames=chunk_frames,
                      max_cache_frames=max_cache_frames, context_policy="drop_oldest",
                      num_inference_steps=num_inference_steps, generator=torch.Generator().manual_seed(seed),
                      output_type="np", callback_on_step_end=count_step).frames[0]
    given = np.stack([np.asarray(frame.convert("RGB"), dtype=np.float32) / 255 for frame in video])
    return np.concatenate([given, frames[len(video):]])


def make_causal_video_file(output: str | Path, model: str, trust_remote_code: bool = False, fps: int = VIDEO_FPS,
                           **video: Any) -> tuple[np.ndarray, float]:
    """``diffusers-ext video extend`` with a ``CausalVideoPipeline`` ``model`` (a folder or Hub id):
    ``make_causal_video(pipe, **video)`` written to ``output``; returns the frames and the sampling's seconds."""
    pipe = load_pipeline_or_shipped(CausalVideoPipeline, SHIPPED_CAUSAL_VIDEO_MODEL, model, trust_remote_code)
    start = time.perf_counter()
    frames = make_causal_video(pipe, progress=True, **video)
    seconds = time.perf_counter() - start
    write_video(frames, output, fps)
    return frames, seconds


# The demo ---------------------------------------------------------------------------------------------------------

SHIPPED_CAUSAL_VIDEO_MODEL = "tiny-causal-shapes"
DEMO_CHUNK_FRAMES = 2  # the shipped causal model's training chunk (training/recipes/tiny_causal_shapes.py)


def as_pil_frames(clip: torch.Tensor) -> list[PIL.Image.Image]:
    """A clip ``(C, F, H, W)`` in [-1, 1] as RGB images."""
    return [PIL.Image.fromarray(((frame.permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
            for frame in clip.unbind(1)]


def extend_held_out_clips(pipe: CausalVideoPipeline, truth: torch.Tensor, given_frames: int, num_frames: int,
                          max_cache_frames: int, num_inference_steps: int, seed: int = 0) -> torch.Tensor:
    """Each clip of ``truth`` ``(B, C, F, H, W)`` in [-1, 1]: its first ``given_frames`` frames extended to
    ``num_frames`` by ``make_causal_video`` in chunks of ``DEMO_CHUNK_FRAMES`` (clip ``i`` with seed ``seed + i``),
    ``(B, C, num_frames, H, W)`` in [-1, 1]."""
    clips = []
    for index, clip in enumerate(truth):
        made = make_causal_video(pipe, as_pil_frames(clip[:, :given_frames]), num_frames, DEMO_CHUNK_FRAMES,
                                 max_cache_frames, num_inference_steps, seed=seed + index)
        clips.append(torch.from_numpy(made).permute(3, 0, 1, 2) * 2 - 1)
    return torch.stack(clips)


def extension_errors(videos: torch.Tensor, truth: torch.Tensor, given_frames: int) -> dict[str, torch.Tensor]:
    """``(B,)`` each: the mean squared error of the new frames of ``videos`` (those after the first
    ``given_frames``) to the same frames of ``truth``, for the model and for the last given frame held still."""
    new = slice(given_frames, videos.shape[2])
    target = truth[:, :, new]
    still = truth[:, :, given_frames - 1:given_frames].expand_as(target)
    return {"model": (videos[:, :, new] - target).square().mean(dim=(1, 2, 3, 4)),
            "last given frame held still": (still - target).square().mean(dim=(1, 2, 3, 4))}


def run_causal_video_demo(output: Path, pipe: CausalVideoPipeline | None = None, num_clips: int = 4,
                          given_frames: int = 4, num_frames: int = 16, long_frames: int = 24,
                          max_cache_frames: int = 6, num_inference_steps: int = 10, shown: int = 4) -> dict[str, float]:
    """Writes ``causal_extension.gif`` (held-out clips' first ``given_frames`` frames extended to ``num_frames`` by
    the model, above the held-out clips themselves), ``causal_long_video.gif`` (extended to ``long_frames``) and
    ``causal_video.txt``: the mean squared error of the new frames to the held-out ones, next to the last given frame
    held still. The KV cache keeps the newest ``max_cache_frames`` frames (the fine-tune's longest context).
    ``pipe``: by default the shipped causal model (``SHIPPED_CAUSAL_VIDEO_MODEL``)."""
    output.mkdir(parents=True, exist_ok=True)
    model_text = "the given causal model"
    if pipe is None:
        pipe = load_shipped_pipeline(SHIPPED_CAUSAL_VIDEO_MODEL)
        model_text = f"the shipped {SHIPPED_CAUSAL_VIDEO_MODEL} model"
    pipe.set_progress_bar_config(disable=True)
    truth = recipe.bouncing_clips(num_clips, recipe.HELD_OUT_SEED, long_frames)  # (B, C, F, H, W) in [-1, 1]
    start = time.perf_counter()
    videos = {name: extend_held_out_clips(pipe, truth, given_frames, frames, max_cache_frames, num_inference_steps)
              for name, frames in (("extension", num_frames), ("long_video", long_frames))}
    seconds = time.perf_counter() - start

    export_to_gif(side_by_side({"causal model": videos["extension"][:shown],
                                "held-out clips": truth[:shown, :, :num_frames]}),
                  str(output / "causal_extension.gif"), fps=VIDEO_FPS)
    export_to_gif(side_by_side({"causal model": videos["long_video"][:shown]}),
                  str(output / "causal_long_video.gif"), fps=VIDEO_FPS)
    errors = extension_errors(videos["extension"], truth[:, :, :num_frames], given_frames)
    scores = {name: float(per_clip.mean()) for name, per_clip in errors.items()}
    lines = [f"Causal extension: {model_text}; {num_clips} held-out clips, "
             f"{given_frames} frames given, extended to {num_frames} and to {long_frames} in chunks of "
             f"{DEMO_CHUNK_FRAMES} with the KV cache of the newest {max_cache_frames} frames ({num_inference_steps} "
             f"steps a chunk), sampled in {seconds:.1f} s",
             f"  mean squared error of frames {given_frames}-{num_frames - 1} to the held-out ones: "
             + ", ".join(f"{value:.3f} ({name})" for name, value in scores.items())]
    text = "\n".join(lines)
    print(text)
    (output / "causal_video.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/: causal_extension.gif, causal_long_video.gif, causal_video.txt")
    return scores
