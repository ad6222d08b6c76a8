"""JVID's joint image-video sampling against each model alone, on the exact oracle and on trained tiny models.

    python benchmarks/joint_image_video.py [--only oracle|shapes] [--clips 128] [--steps 20]
        [--image-model training_output/jvid-image-model] [--train-steps 900]

"JVID: Joint Video-Image Diffusion for Visual-Quality and Temporal-Consistency in Video Generation" (Reynaud et al.,
arXiv 2409.14149) denoises one latent video with an image model (every frame on its own) at some steps and a video
model at the others (``JointImageVideoPipeline``). Each part prints one table, a row per schedule: ``video`` and
``image`` (each model alone), ``alternate`` (the pipeline's default), ``random`` (a fair coin per step),
``video-then-image`` / ``image-then-video`` (one switch half-way).

1. **Oracle** (``diffusers_ext.testing.video_oracle.jvid_oracle_models``): clips of a two-component AR(1) Gaussian
   mixture; the image model is the exact denoiser of the true frame marginal with independent frames, the video
   model the exact denoiser of the moment-matched one-component AR(1) law (right mean, variance and lag-1
   correlation, a unimodal marginal instead of the bimodal one). Figures: sliced W2 of single frames to the true
   marginal (``frame SW2``, with the floor exact samples reach), the lag-1 correlation's error, the share of clips
   whose frames all sit in one component (``one-mode clips``; the law's is about 1) and sliced W2 of consecutive
   frame pairs (``pair SW2``).
2. **Bouncing shapes**: the video model is the shipped ``tiny-fvdm-shapes`` (FVDM, 8 frames of 16 x 16 px); the
   image model is the same transformer architecture trained here with the same loss on single frames of the same
   ``BouncingShapes`` data (``--train-steps`` steps of 128 frames, cached in ``--image-model``; 0.3 s a step on one
   idle thread, 900 steps took 27 min on a 2-core machine shared at load 5-10). That is a quarter of the frames the
   shipped video model saw (4000 steps of 16 clips of 8 frames). Figures from ``VideoMetrics`` against 512 real clips
   (another seed), each with its bootstrap standard error, and real held-out clips as the floor.

Measured (20 steps; oracle 1000 clips, shapes 128 clips): on the oracle no schedule beats the Gaussian video model
and the image model each on its own strength (alternation lands between them); with the broad video model, video
first and image for the last 40 % of the steps beats both models on frame pairs (pair SW2 0.078 against 0.236 and
0.483), while alternation is worse than the video model alone. On bouncing shapes the trained image model is worse
per frame than the shipped video model (frame FD 3.15 against 2.07), and no schedule beats the video model alone.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from diffusers_ext import load_shipped_pipeline
from diffusers_ext.pipelines.video import JointImageVideoPipeline
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.testing import VideoGaussianMixtureDenoiser
from diffusers_ext.testing.metrics import SlicedWasserstein2
from diffusers_ext.testing.video_metrics import VideoMetrics
from diffusers_ext.testing.video_oracle import (
    JVID_ORACLE_LAW,
    autoregressive_video_mixture,
    consecutive_frame_pairs,
    frame_marginal_denoiser,
    frame_samples,
    lag_one_correlation,
    moment_matched_video_denoiser,
    single_mode_clip_share,
    with_mirror_images,
)
from diffusers_ext.training.fvdm import BouncingShapes, FVDMObjective
from diffusers_ext.training.recipes.tiny_fvdm_shapes import (
    CHANNELS,
    FRAME_SIZE,
    HELD_OUT_SEED,
    NUM_FRAMES,
    REFERENCE_SEED,
    TEXT_DIM,
    TRAIN_SEED,
    as_clips,
    bouncing_clips,
    tiny_video_transformer,
)
from diffusers_ext.training.trainer import Trainer, TrainingConfig

IMAGE_BATCH = 128
ORACLE_FRAMES = 8
SWITCH_FRACTION = 0.6  # video-then-image: the video model for the first 60 % of the steps


def schedules(steps: int) -> dict[str, str | list[str]]:
    """The table's rows: each model alone, JVID's alternation, a fair coin per step, and one switch from the video
    model to the image model after ``SWITCH_FRACTION`` of the steps."""
    switch = round(SWITCH_FRACTION * steps)
    return {"video model alone": "video", "image model alone": "image", "alternate (default)": "alternate",
            "random, p = 0.5": "random", f"video {switch} steps, then image": ["video"] * switch + ["image"] * (
                steps - switch)}


def oracle_comparison(clips: int, steps: int) -> None:
    """The oracle table, for each coarse video model (module docstring); figures of the clips with their mirror
    images (``with_mirror_images``: the law and both models are symmetric about 0)."""
    law = autoregressive_video_mixture(**JVID_ORACLE_LAW, num_frames=ORACLE_FRAMES)
    reference = with_mirror_images(law.sample(8 * clips, torch.Generator().manual_seed(1)))
    frame_distance = SlicedWasserstein2(frame_samples(reference), 2 * clips * ORACLE_FRAMES)
    pair_distance = SlicedWasserstein2(consecutive_frame_pairs(reference), 2 * clips * (ORACLE_FRAMES - 1))
    true_lag_one = float(law.frame_correlation(1).mean())

    def row(name: str, videos: torch.Tensor) -> None:
        mirrored = with_mirror_images(videos.double())
        print(f"| {name} | {frame_distance(frame_samples(mirrored)):.3f} | "
              f"{pair_distance(consecutive_frame_pairs(mirrored)):.3f} | {lag_one_correlation(mirrored):.3f} | "
              f"{single_mode_clip_share(videos, law):.3f} |")

    scheduler = FrameAwareFlowMatchScheduler()
    config = dict(num_frames=ORACLE_FRAMES, scheduler_config=scheduler.config)
    video_models = {
        "moment-matched Gaussian AR(1) (right mean, variance, lag-1 correlation; no modes)":
            moment_matched_video_denoiser(**JVID_ORACLE_LAW, **config),
        "the law with twice the spread within a mode (right modes and correlation)":
            VideoGaussianMixtureDenoiser(**(JVID_ORACLE_LAW | {"scales": [0.6, 0.6]}), **config),
    }
    image_model = frame_marginal_denoiser(**JVID_ORACLE_LAW, scheduler_config=scheduler.config)
    print(f"\n## Oracle: {clips} clips of {ORACLE_FRAMES} frames, {steps} Euler steps, true lag-1 correlation "
          f"{true_lag_one:.3f}")
    for description, video_model in video_models.items():
        pipe = JointImageVideoPipeline(video_model, image_model, scheduler)
        pipe.set_progress_bar_config(disable=True)
        print(f"\nVideo model: {description}; image model: the exact frame marginal, frames independent.\n")
        print("| schedule | frame SW2 | pair SW2 | lag-1 correlation | one-mode clips |\n| --- | --- | --- | --- | --- |")
        row("exact samples (floor)", law.sample(clips, torch.Generator().manual_seed(2)))
        for name, schedule in schedules(steps).items():
            row(name, pipe(num_frames=ORACLE_FRAMES, height=2, width=2, num_inference_steps=steps,
                           num_videos_per_prompt=clips, denoiser_schedule=schedule, output_type="latent",
                           generator=torch.Generator().manual_seed(0)).frames)


def train_image_model(steps: int, folder: Path) -> WanTransformer3DModel:
    """The shipped video model's transformer architecture trained on single ``BouncingShapes`` frames (1-frame clips,
    so the per-frame timestep is the clip's), with the shipped model's loss, learning rate and EMA; saved to
    ``folder`` with ``training_report.json``. Reused when ``folder`` holds a model trained for ``steps`` steps."""
    report_path = folder / "training_report.json"
    if report_path.exists() and json.loads(report_path.read_text())["steps"] == steps:
        return WanTransformer3DModel.from_pretrained(folder).eval()
    objective = FVDMObjective(FlowMatchEulerDiscreteScheduler(), prompt_embeds=torch.zeros(1, 1, TEXT_DIM))
    dataset = BouncingShapes(steps * IMAGE_BATCH, num_frames=1, size=FRAME_SIZE, channels=CHANNELS, seed=TRAIN_SEED)
    config = TrainingConfig(output_dir=str(folder / "run"), max_steps=steps, batch_size=IMAGE_BATCH,
                            learning_rate=2e-3, ema_decay=0.999, checkpoint_every=0, seed=TRAIN_SEED)
    start = time.perf_counter()
    result = Trainer(objective, tiny_video_transformer(TRAIN_SEED).train(), dataset, config).train()
    model = result.model.eval()
    model.load_state_dict(result.ema_weights, strict=False)
    model.save_pretrained(folder)
    tail = np.asarray(result.losses)[-max(1, len(result.losses) // 10):]
    report = {"steps": result.step, "batch_frames": IMAGE_BATCH, "seconds": round(time.perf_counter() - start, 1),
              "final_loss": round(float(tail.mean()), 4)}
    report_path.write_text(json.dumps(report, indent=2))
    print(f"image model: {report}")
    return model


FIGURES = ("clean_fraction", "frame_fd", "clip_fd", "area_change", "colour_change", "centroid_speed",
           "centroid_acceleration")


def shapes_comparison(image_model: WanTransformer3DModel, clips: int, steps: int) -> None:
    """The bouncing-shapes table: ``clips`` clips per schedule from the same noise, scored by ``VideoMetrics``
    against 512 real clips, with bootstrap standard errors; held-out real clips as the floor."""
    shipped = load_shipped_pipeline("tiny-fvdm-shapes")
    pipe = JointImageVideoPipeline(shipped.transformer, image_model, shipped.scheduler)
    pipe.set_progress_bar_config(disable=True)
    metrics = VideoMetrics(bouncing_clips(512, REFERENCE_SEED))

    def row(name: str, videos: torch.Tensor, seconds: float | None = None) -> None:
        values, errors = metrics(videos), metrics.standard_errors(videos)
        cells = " | ".join(f"{values[key]:.3f} ± {errors[key]:.3f}" for key in FIGURES)
        print(f"| {name} | {cells} | {'' if seconds is None else f'{seconds:.0f}'} |")

    print(f"\n## Bouncing shapes: {clips} clips of {NUM_FRAMES} frames, {steps} Euler steps; video model: shipped "
          "tiny-fvdm-shapes; image model: its architecture trained on single frames\n")
    print(f"| schedule | {' | '.join(FIGURES)} | s |\n|{' --- |' * (len(FIGURES) + 2)}")
    row("real held-out clips (floor)", bouncing_clips(clips, HELD_OUT_SEED))
    for name, schedule in schedules(steps).items():
        start = time.perf_counter()
        frames = pipe(num_frames=NUM_FRAMES, height=FRAME_SIZE, width=FRAME_SIZE, num_inference_steps=steps,
                      prompt_embeds=torch.zeros(clips, 1, TEXT_DIM), denoiser_schedule=schedule, output_type="pt",
                      generator=torch.Generator().manual_seed(0)).frames
        row(name, as_clips(frames), time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", choices=("oracle", "shapes", "train"))
    parser.add_argument("--clips", type=int, default=128)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--image-model", type=Path, default=Path("training_output/jvid-image-model"))
    parser.add_argument("--train-steps", type=int, default=900)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    if args.only in (None, "oracle"):
        oracle_comparison(max(args.clips, 1000), args.steps)
    if args.only in (None, "shapes", "train"):
        image_model = train_image_model(args.train_steps, args.image_model)
    if args.only in (None, "shapes"):
        shapes_comparison(image_model, args.clips, args.steps)


if __name__ == "__main__":
    main()
