"""Causal video extension (Ca2-VDM, arXiv 2411.16375; ViD-GPT, arXiv 2406.10981) for ``diffusers-ext video extend``
with a ``CausalVideoPipeline`` model, and its demo: the shipped tiny FVDM model of bouncing shapes fine-tuned into a
frame-causal one by teacher forcing (``CausalVideoObjective``), then extending held-out clips chunk by chunk with
the KV cache, next to the held-out clips' own continuation."""

from __future__ import annotations

import math
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import torch
from diffusers.utils import export_to_gif
from tqdm.auto import tqdm

from ...cli import CAUSAL_CHUNK_FRAMES, SHIPPED_VIDEO_MODEL, VIDEO_FPS, VIDEO_STEPS
from ...schedulers import FrameAwareFlowMatchScheduler
from ...shipped import load_pipeline_or_shipped, load_shipped_pipeline
from ...training.causal_video import CausalVideoObjective
from ...training.fvdm import BouncingShapes
from ...training.recipes import tiny_fvdm_shapes as recipe
from ...training.trainer import Trainer, TrainingConfig
from .causal_attention import disable_causal_attention, enable_causal_attention
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
    pipe = load_pipeline_or_shipped(CausalVideoPipeline, SHIPPED_VIDEO_MODEL, model, trust_remote_code)
    start = time.perf_counter()
    frames = make_causal_video(pipe, progress=True, **video)
    seconds = time.perf_counter() - start
    write_video(frames, output, fps)
    return frames, seconds


# The demo ---------------------------------------------------------------------------------------------------------

DEMO_CHUNK_FRAMES, DEMO_CONTEXT_FRAMES = 2, (2, 4, 6)
FINETUNE_STEPS = 300


def causal_finetune_of_the_shipped_model(steps: int = FINETUNE_STEPS, learning_rate: float = 2e-3,
                                         output_dir: str | None = None) -> CausalVideoPipeline:
    """The shipped tiny FVDM transformer (bidirectional, 8-frame clips) fine-tuned into a frame-causal one by teacher
    forcing: ``CausalVideoObjective`` with chunks of 2 frames after 2, 4 or 6 clean context frames, ``steps`` steps
    of 16 clips at ``learning_rate`` (the recipe's) on the recipe's training clips, then in a
    ``CausalVideoPipeline``."""
    transformer = load_shipped_pipeline(SHIPPED_VIDEO_MODEL).transformer
    enable_causal_attention(transformer)
    objective = CausalVideoObjective(FrameAwareFlowMatchScheduler(), DEMO_CHUNK_FRAMES, DEMO_CONTEXT_FRAMES,
                                     prompt_embeds=torch.zeros(1, 1, recipe.TEXT_DIM))
    clips = BouncingShapes(steps * 16, num_frames=recipe.NUM_FRAMES, size=recipe.FRAME_SIZE,
                           channels=recipe.CHANNELS, seed=recipe.TRAIN_SEED)
    with tempfile.TemporaryDirectory() as scratch:
        config = TrainingConfig(output_dir=output_dir or scratch, max_steps=steps, batch_size=16,
                                learning_rate=learning_rate, checkpoint_every=0, seed=recipe.TRAIN_SEED)
        model = Trainer(objective, transformer.train(), clips, config).train().model.eval()
    disable_causal_attention(model)  # the pipeline makes it causal for each call
    return CausalVideoPipeline(model, FrameAwareFlowMatchScheduler())


def run_causal_video_demo(output: Path, pipe: CausalVideoPipeline | None = None, num_clips: int = 4,
                          given_frames: int = 4, num_frames: int = 16, long_frames: int = 24,
                          max_cache_frames: int = 6, num_inference_steps: int = 10, shown: int = 4,
                          finetune_steps: int = FINETUNE_STEPS) -> dict[str, float]:
    """Writes ``causal_extension.gif`` (held-out clips' first ``given_frames`` frames extended to ``num_frames`` by
    the model, above the held-out clips themselves), ``causal_long_video.gif`` (extended to ``long_frames``) and
    ``causal_video.txt``: the mean squared error of the new frames to the held-out ones, next to the last given frame
    held still. The KV cache keeps the newest ``max_cache_frames`` frames (the fine-tune's longest context).
    ``pipe``: by default the shipped model fine-tuned into a causal one here
    (``causal_finetune_of_the_shipped_model(finetune_steps)``)."""
    output.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    model_text = "the given causal model"
    if pipe is None:
        pipe = causal_finetune_of_the_shipped_model(finetune_steps)
        model_text = (f"the shipped {SHIPPED_VIDEO_MODEL} transformer fine-tuned frame-causal ({finetune_steps} "
                      f"teacher-forcing steps, {time.perf_counter() - start:.0f} s)")
    pipe.set_progress_bar_config(disable=True)
    truth = recipe.bouncing_clips(num_clips, recipe.HELD_OUT_SEED, long_frames)  # (B, C, F, H, W) in [-1, 1]
    start = time.perf_counter()
    videos = {}
    for name, frames in (("extension", num_frames), ("long_video", long_frames)):
        clips = []
        for index in range(num_clips):
            given = [PIL.Image.fromarray(((truth[index, :, f].permute(1, 2, 0) + 1) * 127.5).round().byte().numpy())
                     for f in range(given_frames)]
            made = make_causal_video(pipe, given, frames, DEMO_CHUNK_FRAMES, max_cache_frames, num_inference_steps,
                                     seed=index)
            clips.append(torch.from_numpy(made).permute(3, 0, 1, 2) * 2 - 1)
        videos[name] = torch.stack(clips)
    seconds = time.perf_counter() - start

    export_to_gif(side_by_side({"causal model": videos["extension"][:shown],
                                "held-out clips": truth[:shown, :, :num_frames]}),
                  str(output / "causal_extension.gif"), fps=VIDEO_FPS)
    export_to_gif(side_by_side({"causal model": videos["long_video"][:shown]}),
                  str(output / "causal_long_video.gif"), fps=VIDEO_FPS)
    new = slice(given_frames, num_frames)
    still = truth[:, :, given_frames - 1:given_frames].expand_as(truth[:, :, new])
    scores = {"model": float((videos["extension"][:, :, new] - truth[:, :, new]).square().mean()),
              "last given frame held still": float((still - truth[:, :, new]).square().mean())}
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
