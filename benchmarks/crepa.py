"""CREPA LoRA against plain LoRA at toy scale: the same base model, data, data order, noise draws and step budget,
with and without CREPA's alignment term (arXiv 2506.09229), on bouncing shapes.

    nice -n 10 python benchmarks/crepa.py [--seeds 0 1 2] [--steps 300] [--eval-clips 64] [--loss-weight 0.5]
        [--methods plain crepa control] [--control-learning-rates 3e-4 1e-4]

The base is the shipped ``tiny-fvdm-shapes`` transformer (a four-block pixel-space Wan trained on up to 2 shapes at
0.5-2 px a frame). Each run fine-tunes a rank-8 LoRA (learning rate 1e-3, batch 8, the FVDM loss with its authors'
p = 0.2) towards a shifted law: up to 3 shapes at 1.5-3 px a frame (``BouncingShapes(max_shapes=3,
speed=(1.5, 3.0))``); the CREPA run adds ``CREPAObjective``'s defaults (lambda 0.5, or ``--loss-weight``; tau 1,
neighbours at distance 1, block 1 of 4, ``RandomConvFrameEncoder(seed=0)``). For every model, 64 clips are sampled (20 steps, the same initial
noise for every model) and scored against 256 held-out clips of the shifted law:

- fidelity: the held-out denoising loss (the FVDM loss at one timestep per clip on 64 held-out clips, the same draws
  for every model), ``frame_fd`` and ``clip_fd`` (``diffusers_ext.testing.video_metrics``);
- cross-frame consistency: ``adjacent_similarity``, the cosine similarity of adjacent frames' spatially pooled features
  (minus an empty frame's) from an encoder CREPA did not train on (``RandomConvFrameEncoder(seed=1)``: the training
  encoder's features would grade CREPA on its own target), ``pixel_flicker`` (mean absolute change between adjacent frames, on [-1, 1]),
  ``colour_change`` and ``area_change`` (object persistence) and ``centroid_acceleration`` (motion smoothness).
  Consistency figures are to be read next to real clips' (the last row): a frozen clip scores 1 and 0.

``control`` runs plain LoRA at the ``--control-learning-rates`` (CREPA's term also slows the fit of the new law: a
plain run that moves less far from the base separates "more consistent" from "fine-tuned less"). The table gives each
figure's mean over training seeds with its standard error, and the paired difference CREPA - plain per seed. One
thread; about 2 minutes a run on a busy 2-core machine.
"""

from __future__ import annotations

import argparse
import copy
import math
import tempfile
import time

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from torch.nn import functional

from diffusers_ext.shipped import load_shipped_pipeline
from diffusers_ext.testing.video_metrics import VideoMetrics
from diffusers_ext.training import Trainer, TrainingConfig
from diffusers_ext.training.crepa import CREPAObjective, RandomConvFrameEncoder
from diffusers_ext.training.fvdm import BouncingShapes, FVDMObjective
from diffusers_ext.training.recipes.tiny_fvdm_shapes import sample_standard, video_pipeline

SHIFTED_LAW = dict(num_frames=8, size=16, channels=3, max_shapes=3, speed=(1.5, 3.0))
HELD_OUT_SEED, REFERENCE_SEED, SAMPLING_SEED, LOSS_SEED = 1000, 2000, 3000, 4000
REFERENCE_CLIPS, INFERENCE_STEPS = 256, 20
FIGURES = ("held_out_loss", "frame_fd", "clip_fd", "adjacent_similarity", "pixel_flicker", "colour_change",
           "area_change", "centroid_acceleration")


def shifted_clips(count: int, seed: int) -> torch.Tensor:
    clips = BouncingShapes(count, **SHIFTED_LAW, seed=seed)
    return torch.stack([clips[i] for i in range(count)])


def base_objective(vectorized_probability: float = 0.2) -> FVDMObjective:
    return FVDMObjective(FlowMatchEulerDiscreteScheduler(), vectorized_probability=vectorized_probability,
                         prompt_embeds=torch.zeros(1, 1, 16))


def fine_tune(base_model: torch.nn.Module, use_crepa: bool, seed: int, steps: int, loss_weight: float,
              learning_rate: float = 1e-3) -> torch.nn.Module:
    """A rank-8 LoRA of a copy of ``base_model`` trained for ``steps`` on the shifted law, with or without CREPA."""
    model = copy.deepcopy(base_model).train()
    method = (CREPAObjective(base_objective(), model, loss_weight=loss_weight, seed=seed) if use_crepa
              else base_objective())
    initial_head = copy.deepcopy(method.head.state_dict()) if use_crepa else None
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(output_dir=folder, max_steps=steps, batch_size=8, learning_rate=learning_rate, lora_rank=8,
                                ema_decay=None, checkpoint_every=0, seed=seed)
        dataset = BouncingShapes(steps * 8, **SHIFTED_LAW, seed=seed)
        model = Trainer(method, model, dataset, config).train().model.eval()
    if use_crepa and all(torch.equal(value, initial_head[name]) for name, value in method.head.state_dict().items()):
        raise RuntimeError("the Trainer did not train CREPA's projection head: it needs to train a method's "
                           "trainable_modules() (see training/crepa.py)")
    return model


@torch.no_grad()
def held_out_loss(model: torch.nn.Module, clips: torch.Tensor) -> float:
    """The denoising loss at one timestep per clip on ``clips``, batches of 16, the same draws for every model."""
    objective, generator = base_objective(vectorized_probability=0.0), torch.Generator().manual_seed(LOSS_SEED)
    return sum(float(objective.loss(model, batch, generator)) for batch in clips.split(16)) / math.ceil(len(clips) / 16)


@torch.no_grad()
def adjacent_similarity(clips: torch.Tensor, encoder: RandomConvFrameEncoder) -> float:
    """The mean cosine similarity of adjacent frames' spatially pooled encoder features, each minus an empty (all
    background) frame's: the features of what is on the frame (uncentred, the background makes every pair ~0.999)."""
    frames = clips.transpose(1, 2).flatten(0, 1)
    features = encoder(frames).mean(dim=(-2, -1)) - encoder(torch.full_like(frames[:1], -1.0)).mean(dim=(-2, -1))
    features = features.unflatten(0, clips.shape[:1] + clips.shape[2:3])
    return float(functional.cosine_similarity(features[:, 1:], features[:, :-1], dim=-1).mean())


def figures(clips: torch.Tensor, metrics: VideoMetrics, encoder: RandomConvFrameEncoder,
            loss: float = math.nan) -> dict[str, float]:
    video = metrics(clips)
    return {"held_out_loss": loss, "frame_fd": video["frame_fd"], "clip_fd": video["clip_fd"],
            "adjacent_similarity": adjacent_similarity(clips, encoder),
            "pixel_flicker": float(clips.diff(dim=2).abs().mean()), "colour_change": video["colour_change"],
            "area_change": video["area_change"], "centroid_acceleration": video["centroid_acceleration"]}


def evaluate(model: torch.nn.Module, metrics: VideoMetrics, encoder: RandomConvFrameEncoder, held_out: torch.Tensor,
             eval_clips: int) -> dict[str, float]:
    with torch.no_grad():
        clips = sample_standard(video_pipeline(model), eval_clips, INFERENCE_STEPS,
                                torch.Generator().manual_seed(SAMPLING_SEED))
    return figures(clips, metrics, encoder, held_out_loss(model, held_out))


def mean_and_error(values: list[float]) -> str:
    values = torch.tensor(values, dtype=torch.float64)
    error = float(values.std() / math.sqrt(len(values))) if len(values) > 1 else math.nan
    return f"{float(values.mean()):.4g} ± {error:.2g}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--eval-clips", type=int, default=64)
    parser.add_argument("--loss-weight", type=float, default=0.5, help="CREPA's lambda")
    parser.add_argument("--methods", nargs="+", choices=("plain", "crepa", "control"), default=["plain", "crepa"])
    parser.add_argument("--control-learning-rates", type=float, nargs="+", default=[3e-4, 1e-4])
    args = parser.parse_args()
    torch.set_num_threads(1)
    start = time.perf_counter()
    base_model = load_shipped_pipeline("tiny-fvdm-shapes").transformer
    metrics = VideoMetrics(shifted_clips(REFERENCE_CLIPS, REFERENCE_SEED))
    encoder = RandomConvFrameEncoder(3, seed=1)
    held_out = shifted_clips(args.eval_clips, HELD_OUT_SEED)
    rows = {"base (no fine-tuning)": [evaluate(base_model.eval(), metrics, encoder, held_out, args.eval_clips)]}
    runs = [("plain LoRA", False, 1e-3)] if "plain" in args.methods else []
    runs += [("CREPA LoRA", True, 1e-3)] if "crepa" in args.methods else []
    if "control" in args.methods:
        runs += [(f"plain LoRA, lr {rate:g}", False, rate) for rate in args.control_learning_rates]
    for seed in args.seeds:
        for name, use_crepa, learning_rate in runs:
            model = fine_tune(base_model, use_crepa, seed, args.steps, args.loss_weight, learning_rate)
            rows.setdefault(name, []).append(evaluate(model, metrics, encoder, held_out, args.eval_clips))
            print(f"seed {seed} {name}: {rows[name][-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
    if "plain LoRA" in rows and "CREPA LoRA" in rows:
        rows["CREPA - plain (paired by seed)"] = [{key: crepa[key] - plain[key] for key in FIGURES} for crepa, plain
                                                 in zip(rows["CREPA LoRA"], rows["plain LoRA"], strict=True)]
    rows["real held-out clips"] = [figures(held_out, metrics, encoder)]
    print(f"\n{args.steps} steps, seeds {args.seeds}, {args.eval_clips} clips each, lambda {args.loss_weight}, "
          f"{time.perf_counter() - start:.0f} s\n")
    print("| model | " + " | ".join(FIGURES) + " |")
    print("| --- |" + " --- |" * len(FIGURES))
    for name, runs in rows.items():
        print(f"| {name} | " + " | ".join(mean_and_error([run[key] for run in runs]) for key in FIGURES) + " |")


if __name__ == "__main__":
    main()
