"""Restoration quality and speed: PSNR / SSIM / seconds per image for each method and step count.

    python benchmarks/restoration.py [--train-steps 600] [--only shipped|methods]

1. The shipped tiny ResShift 4x super-resolution model on the held-out photos (8 crops), at 1 to 15 steps,
   against bicubic upsampling measured in the same run; ResShift's claim that 4 steps are about as good as 15 is
   checked (within 0.5 dB).
2. Each restoration method (RDDM, ResShift, mean-reverting SDE with MRS, diffusion bridge with DBIM) trained by this
   script with the same tiny UNet, data, optimiser and budget on the same 4x task, then sampled at several step
   counts: a like-for-like comparison of the processes at a toy scale, not of the papers' models.
"""

from __future__ import annotations

import argparse
import time

import torch
from diffusers import UNet2DModel

from diffusers_ext.pipelines.restoration import (
    BridgePipeline,
    MeanRevertingPipeline,
    RDDMPipeline,
    ResShiftPipeline,
)
from diffusers_ext.pipelines.restoration.demo import held_out_crops, load_restoration_pipeline, super_resolve_held_out
from diffusers_ext.pipelines.restoration.pipeline_restoration import upscale_bicubic
from diffusers_ext.schedulers import BridgeScheduler, MeanRevertingScheduler, RDDMScheduler, ResShiftScheduler
from diffusers_ext.training import PairedRestorationObjective, Trainer, TrainingConfig
from diffusers_ext.training.recipes.tiny_resshift_sr import EVALUATION_TILES
from diffusers_ext.training.restoration_data import (
    DegradedPatchDataset,
    make_degradation,
    psnr,
    random_patches,
    scikit_image_photos,
    ssim,
)

METHODS = {
    "ResShift": (ResShiftPipeline, lambda: ResShiftScheduler(num_train_timesteps=15, kappa=1.0), (4, 15)),
    "RDDM": (RDDMPipeline, lambda: RDDMScheduler(prediction_type="residual"), (5, 10, 20)),
    "mean-reverting (MRS)": (MeanRevertingPipeline, lambda: MeanRevertingScheduler(prediction_type="sample"),
                             (10, 20)),
    "bridge (DBIM)": (BridgePipeline, lambda: BridgeScheduler(), (5, 10, 20)),
}


def measure(pipe, steps: int | None) -> tuple[float, float, float]:
    start = time.perf_counter()
    images = super_resolve_held_out(pipe, tiles=EVALUATION_TILES, num_inference_steps=steps)
    seconds = (time.perf_counter() - start) / len(images["reference"])
    reference = images["reference"]
    return (float(psnr(images["restored"], reference).mean()), float(ssim(images["restored"], reference).mean()),
            seconds)


def bicubic_scores(factor: int = 4) -> tuple[float, float]:
    reference = held_out_crops(tiles=EVALUATION_TILES)
    lowres = make_degradation("downscale", factor=factor)(reference)
    bicubic = upscale_bicubic(lowres, factor)
    return float(psnr(bicubic, reference).mean()), float(ssim(bicubic, reference).mean())


def row(name: str, steps, scores) -> str:
    return f"| {name} | {steps} | {scores[0]:.2f} | {scores[1]:.3f} | {scores[2]:.3f} |"


HEADER = "| model | steps | PSNR (dB) | SSIM | s / image |\n| --- | --- | --- | --- | --- |"


def shipped_model_part() -> None:
    shipped = load_restoration_pipeline()
    shipped.set_progress_bar_config(disable=True)
    bicubic = bicubic_scores()
    print("Shipped tiny ResShift, 4x, held-out photos (8 crops of 128 px)\n")
    print(HEADER)
    print(f"| bicubic | - | {bicubic[0]:.2f} | {bicubic[1]:.3f} | - |")
    by_steps = {}
    for steps in (1, 2, 4, 8, 15):
        by_steps[steps] = measure(shipped, steps)
        print(row("tiny-resshift-sr4", steps, by_steps[steps]))
    gap = by_steps[15][0] - by_steps[4][0]
    print(f"\n4 steps vs 15 steps: {gap:+.2f} dB ({'within' if abs(gap) <= 0.5 else 'NOT within'} 0.5 dB); "
          f"15 steps vs bicubic: {by_steps[15][0] - bicubic[0]:+.2f} dB")


def methods_part(train_steps: int) -> None:
    print(f"\nEach method trained here for {train_steps} steps (batch 16, 32 px patches, 4x), same UNet\n")
    print(HEADER)
    bicubic = bicubic_scores()
    print(f"| bicubic | - | {bicubic[0]:.2f} | {bicubic[1]:.3f} | - |")
    patches = random_patches(scikit_image_photos("train"), 32, count=4096, seed=0)
    data = DegradedPatchDataset(patches, make_degradation("downscale", factor=4), seed=0)
    for name, (pipeline_class, make_scheduler, step_counts) in METHODS.items():
        scheduler = make_scheduler()
        torch.manual_seed(0)
        unet = UNet2DModel(sample_size=32, in_channels=6, out_channels=3 * scheduler.model_output_channels_factor,
                           block_out_channels=(32, 64, 64), layers_per_block=1, norm_num_groups=8,
                           down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3)
        config = TrainingConfig(output_dir=f"training_output/benchmark-{pipeline_class.__name__}",
                                max_steps=train_steps, batch_size=16, learning_rate=5e-4, checkpoint_every=0)
        model = Trainer(PairedRestorationObjective(scheduler), unet, data, config).train().model.eval()
        pipe = pipeline_class(unet=model, scheduler=scheduler, upscale_factor=4)
        pipe.set_progress_bar_config(disable=True)
        for steps in step_counts:
            print(row(name, steps, measure(pipe, steps)), flush=True)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--train-steps", type=int, default=600)
    parser.add_argument("--only", choices=("shipped", "methods"), help="run one of the two parts")
    args = parser.parse_args()
    if args.only != "methods":
        shipped_model_part()
    if args.only != "shipped":
        methods_part(args.train_steps)


if __name__ == "__main__":
    main()
