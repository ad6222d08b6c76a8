"""The video part of ``diffusers-ext demo`` and the work of ``diffusers-ext video``: the shipped tiny FVDM model of
bouncing shapes generates clips, animates a held-out first frame, interpolates between held-out key frames and rolls
its window over a video four times its length, each next to held-out clips, with the video metrics of
``diffusers_ext.testing.video_metrics``."""

from __future__ import annotations

import math
import os
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import PIL.Image
import PIL.ImageDraw
import torch
from diffusers.utils import export_to_gif, export_to_video
from tqdm.auto import tqdm

from ...cli import PIPELINE_CONTEXT_FRAMES, SHIPPED_VIDEO_MODEL, VIDEO_FPS, VIDEO_STEPS
from ...shipped import load_pipeline_or_shipped
from ...testing.video_metrics import VideoMetrics
from ...training.recipes import tiny_fvdm_shapes as recipe
from .frame_plan import latent_frame_count
from .pipeline_frame_aware import FrameAwareVideoPipeline


def load_video_pipeline(model: str | Path | None = None, trust_remote_code: bool = False) -> FrameAwareVideoPipeline:
    """The shipped model (``model=None``), or a ``FrameAwareVideoPipeline`` from a folder or Hub id."""
    return load_pipeline_or_shipped(FrameAwareVideoPipeline, SHIPPED_VIDEO_MODEL, model, trust_remote_code)


def window_count(num_latent_frames: int, window_frames: int, context_frames: int) -> int:
    """How many windows the pipeline runs for ``num_latent_frames``: the first makes ``window_frames``, each later
    one ``window_frames - context_frames`` new frames."""
    if num_latent_frames <= window_frames:
        return 1
    return 1 + math.ceil((num_latent_frames - window_frames) / (window_frames - context_frames))


def make_video(pipe: FrameAwareVideoPipeline, num_frames: int, clip_frames: int | None = None,
               num_inference_steps: int = VIDEO_STEPS, seed: int = 0,
               conditioning_frames: Mapping[int, PIL.Image.Image] | None = None,
               video: Sequence[PIL.Image.Image] | None = None, context_frames: int = PIPELINE_CONTEXT_FRAMES,
               progress: bool = False) -> np.ndarray:
    """One video ``(num_frames, H, W, 3)`` in ``[0, 1]``: generated, from ``conditioning_frames`` (``{0: image}``:
    image-to-video; several: interpolation), or ``video`` extended to ``num_frames`` frames in all (its last
    ``context_frames`` frames, or only its last frame through a VAE that compresses time, are the model's clean
    context). The model sees ``clip_frames`` pixel frames per call (None: all of them); longer videos roll its window,
    each window after the first keeping ``context_frames`` latent frames of the one before. ``progress``: one bar over
    every step of every window."""
    temporal = pipe.temporal_compression
    conditioning = dict(conditioning_frames or {})
    made_frames = num_frames
    if video is not None:
        given = 1 if temporal > 1 else context_frames
        conditioning = dict(enumerate(video[-given:]))
        made_frames = given + num_frames - len(video)
    latent_frames = latent_frame_count(made_frames, temporal)
    window = latent_frame_count(clip_frames, temporal) if clip_frames else latent_frames
    steps = window_count(latent_frames, window, context_frames) * num_inference_steps
    pipe.set_progress_bar_config(disable=True)  # one bar over all windows instead of one per window
    with tqdm(total=steps, desc="sampling", unit="step", disable=not progress) as bar:

        def count_step(*_) -> dict:
            bar.update()
            return {}

        frames = pipe(num_frames=made_frames, num_inference_steps=num_inference_steps,
                      conditioning_frames=conditioning or None, window_frames=min(window, latent_frames),
                      context_frames=context_frames, generator=torch.Generator().manual_seed(seed), output_type="np",
                      callback_on_step_end=count_step).frames[0]
    if video is not None:
        frames = np.concatenate([np.stack([np.asarray(frame, dtype=np.float32) / 255 for frame in video]),
                                 frames[len(conditioning):]])
    return frames


def write_video(frames: np.ndarray, path: str | Path, fps: int = VIDEO_FPS) -> None:
    """``frames`` ``(F, H, W, 3)`` in ``[0, 1]`` as a GIF or (with imageio-ffmpeg) an MP4, by ``path``'s suffix. The
    file appears whole or not at all: it is written beside ``path`` under a temporary name, then renamed."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(f".{path.stem}.{os.getpid()}.partial{path.suffix}")  # the writers go by the suffix
    try:
        if path.suffix.lower() == ".gif":
            images = [PIL.Image.fromarray(frame) for frame in (frames * 255).round().astype(np.uint8)]
            export_to_gif(images, str(temporary), fps=fps)
        else:
            export_to_video(list(frames), str(temporary), fps=fps)
        temporary.replace(path)
    finally:
        temporary.unlink(missing_ok=True)


def make_video_file(output: str | Path, model: str | None = None, trust_remote_code: bool = False,
                    fps: int = VIDEO_FPS, **video: Any) -> tuple[np.ndarray, float]:
    """``diffusers-ext video``: ``make_video(pipe, **video)`` with the given model, written to ``output``; returns the
    frames and the seconds the sampling took."""
    pipe = load_video_pipeline(model, trust_remote_code)
    start = time.perf_counter()
    frames = make_video(pipe, progress=True, **video)
    seconds = time.perf_counter() - start
    write_video(frames, output, fps)
    return frames, seconds


# The demo ---------------------------------------------------------------------------------------------------------


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def side_by_side(rows: Mapping[str, torch.Tensor], scale: int = 6, gutter: int = 4) -> list[PIL.Image.Image]:
    """GIF frames showing each row's clips ``(B, 3, F, H, W)`` in ``[-1, 1]`` side by side under the row's name,
    enlarged ``scale`` times."""
    clips = list(rows.values())
    count, _, num_frames, height, width = clips[0].shape
    label = 12
    band = label + height * scale + gutter
    frames = []
    for f in range(num_frames):
        canvas = PIL.Image.new("RGB", (gutter + count * (width * scale + gutter), gutter + len(clips) * band),
                               (96, 96, 96))
        draw = PIL.ImageDraw.Draw(canvas)
        for row, (name, clip) in enumerate(rows.items()):
            top = gutter + row * band
            draw.text((gutter, top - 2), name, fill=(255, 255, 255))
            pixels = ((clip[:, :, f].clamp(-1, 1) + 1) * 127.5).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
            for column in range(count):
                image = PIL.Image.fromarray(pixels[column]).resize((width * scale, height * scale), PIL.Image.NEAREST)
                canvas.paste(image, (gutter + column * (width * scale + gutter), top + label))
        frames.append(canvas)
    return frames


def run_video_demo(output: Path, num_clips: int = 16, num_long_clips: int = 4, num_reference_clips: int = 64,
                   num_inference_steps: int = VIDEO_STEPS, pipe: FrameAwareVideoPipeline | None = None,
                   shown: int = 4) -> dict[str, dict[str, float]]:
    """Writes ``generation.gif``, ``image_to_video.gif``, ``interpolation.gif`` and ``long_video.gif`` (the model's
    clips above held-out ones: the same first frame, the same ends) and ``video.txt``: the video metrics of
    ``num_clips`` clips per task (``num_long_clips`` long ones) against ``num_reference_clips`` real clips, held-out
    clips' own figures as the floor, and the error to the held-out frames where frames were given, next to naive
    baselines. The held-out tasks of the shipped model's recipe (``training/recipes/tiny_fvdm_shapes.py``: its seeds,
    clip size, window and context), on fewer clips. ``pipe``: the shipped model by default."""
    output.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_video_pipeline()
    pipe.set_progress_bar_config(disable=True)
    frames, long_frames = recipe.NUM_FRAMES, recipe.LONG_VIDEO_WINDOWS * recipe.NUM_FRAMES
    keys = list(recipe.INTERPOLATION_KEY_FRAMES)
    held_out = recipe.bouncing_clips(max(num_clips, num_long_clips), recipe.HELD_OUT_SEED, long_frames)
    truth, long_truth = held_out[:num_clips, :, :frames], held_out[:num_long_clips]
    metrics = {count: VideoMetrics(recipe.bouncing_clips(num_reference_clips, recipe.REFERENCE_SEED, count))
               for count in (frames, long_frames)}
    start = time.perf_counter()
    results = {  # (clips, given frames, the held-out clips they go with)
        "generation": (recipe.sample_standard(pipe, num_clips, num_inference_steps, seeded(0)), [], truth),
        "image_to_video": (recipe.sample_with_clean_frames(pipe, truth, [0], num_inference_steps, seeded(1)), [0],
                           truth),
        "interpolation": (recipe.sample_with_clean_frames(pipe, truth, keys, num_inference_steps, seeded(2)), keys,
                          truth),
        "long_video": (recipe.sample_standard(pipe, num_long_clips, num_inference_steps, seeded(3), long_frames), [],
                       long_truth),
    }
    seconds = time.perf_counter() - start

    for task, (clips, given, ground_truth) in results.items():
        held_out_name = "held-out clips" + (f" (same frames {', '.join(map(str, given))})" if given else "")
        export_to_gif(side_by_side({"model": clips[:shown], held_out_name: ground_truth[:shown]}),
                      str(output / f"{task}.gif"), fps=VIDEO_FPS)

    scores = {"held-out clips (floor)": metrics[frames](truth)}
    scores |= {task.replace("_", " "): metrics[frames](clips) for task, (clips, _, _) in results.items()
               if task != "long_video"}
    scores[f"held-out {long_frames}-frame clips"] = metrics[long_frames](long_truth)
    scores["long video"] = metrics[long_frames](results["long_video"][0])
    weights = torch.linspace(0, 1, frames)[None, None, :, None, None]
    baselines = {"image_to_video": ("frame 0 held still", truth[:, :, :1].expand_as(truth)),
                 "interpolation": ("cross-fade of the ends",
                                   truth[:, :, :1] * (1 - weights) + truth[:, :, -1:] * weights)}

    names = {"clean_fraction": "clean", "frame_fd": "frame FD", "clip_fd": "clip FD", "area_change": "area chg",
             "colour_change": "colour chg", "centroid_acceleration": "accel (px)"}
    lines = [f"The shipped tiny FVDM model ({SHIPPED_VIDEO_MODEL}), {frames} frames of {recipe.FRAME_SIZE}x"
             f"{recipe.FRAME_SIZE} pixels a window, {num_inference_steps} steps: {num_clips} held-out clips a task "
             f"({num_long_clips} of {long_frames} frames for the long video: window {frames}, context "
             f"{recipe.CONTEXT_FRAMES}), sampled in {seconds:.1f} s; figures against {num_reference_clips} other real "
             "clips",
             f"  {'':<26}" + "".join(f"{name:>11}" for name in names.values())]
    lines += [f"  {row:<26}" + "".join(f"{score[key]:>11.3f}" for key in names) for row, score in scores.items()]
    lines.append("  clean: share of background / shape-coloured pixels (1 on real frames); FD: Fréchet distance of "
                 "frame / clip features; chg: frame-to-frame change of the shapes' area and colour; accel: the "
                 "centroid's acceleration (lower is steadier)")
    for task, (baseline, baseline_clips) in baselines.items():
        clips, given, ground_truth = results[task]
        lines.append(f"  {task.replace('_', ' ')}: mean squared error to the held-out frames it makes "
                     f"{float(recipe.held_out_mse(clips, ground_truth, given).mean()):.3f} (model), "
                     f"{float(recipe.held_out_mse(baseline_clips, ground_truth, given).mean()):.3f} ({baseline})")
    lines.append(f"  the model card has these figures on {recipe.BUDGETS['full'].eval_clips} clips a task, next to "
                 f"a scalar-timestep model (diffusers_ext/assets/{SHIPPED_VIDEO_MODEL})")
    text = "\n".join(lines)
    print(text)
    (output / "video.txt").write_text(text + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/: {', '.join(f'{task}.gif' for task in results)}, video.txt")
    return scores
