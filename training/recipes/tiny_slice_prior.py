"""Train the tiny 2D slice prior that ships with the package for DiffusionMBIR (3D inverse problems).

    python -m diffusers_ext.training.recipes.tiny_slice_prior [--output diffusers_ext/assets/tiny-slice-prior]
        [--steps 1200] [--checkpoints training_output/tiny-slice-prior]

"Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models" (DiffusionMBIR, Chung et al., arXiv 2211.10655)
needs only a 2D diffusion model of slices. Here a pixel-space ``UNet2DModel`` learns DDPM's epsilon objective
(``DenoisingObjective``, linear betas, 1000 steps) on 32 x 32 slices of the package's synthetic training volumes
(``training/volume_data.py``: random ellipsoid phantoms and smoothed 3D blobs, slices along all three axes) through
the shared ``Trainer``. The report gives the held-out denoising loss (slices of the held-out volumes, a fixed grid of
timesteps and noise) next to the loss of the untrained network, and the training time. The folder is a
``DiffusionMBIRPipeline`` saved with ``save_for_hub``: ``DiffusionPipeline.from_pretrained(folder,
trust_remote_code=True)``; ``benchmarks/volume_inverse.py`` measures it on the inverse problems.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch
from diffusers import DDPMScheduler, UNet2DModel

from ...diffusion_math import alpha_sigma_function
from ...hub import save_for_hub
from ...pipelines.three_d.pipeline_diffusion_mbir import DiffusionMBIRPipeline
from ..denoising import DenoisingObjective
from ..trainer import Trainer, TrainingConfig
from ..volume_data import VolumeSliceDataset, held_out_volumes

SLICE_SIZE = 32
KINDS = ("phantom", "blobs")
EVALUATION_TIMESTEPS = (50, 200, 400, 600, 800)


def tiny_slice_unet() -> UNet2DModel:
    return UNet2DModel(sample_size=SLICE_SIZE, in_channels=1, out_channels=1, block_out_channels=(16, 32, 32),
                       layers_per_block=1, down_block_types=("DownBlock2D",) * 3, up_block_types=("UpBlock2D",) * 3,
                       norm_num_groups=8)


def slice_scheduler() -> DDPMScheduler:
    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="linear", clip_sample=False)


def held_out_slices(count_per_kind: int = 4) -> torch.Tensor:
    """Every axial slice of ``count_per_kind`` held-out volumes of each kind, ``(N, 1, 32, 32)`` in ``[-1, 1]``."""
    volumes = [v for kind in KINDS for v in held_out_volumes(kind, count_per_kind, SLICE_SIZE)]
    return torch.cat([2 * v.float()[:, None] - 1 for v in volumes])


@torch.no_grad()
def held_out_denoising_loss(unet: UNet2DModel, slices: torch.Tensor, scheduler: DDPMScheduler) -> dict[str, float]:
    """The epsilon-MSE on ``slices`` at each of ``EVALUATION_TIMESTEPS`` with fixed noise, and their mean."""
    alpha_sigma = alpha_sigma_function(scheduler.config)
    noise = torch.randn(slices.shape, generator=torch.Generator().manual_seed(0))
    losses = {}
    for timestep in EVALUATION_TIMESTEPS:
        alpha, sigma = (float(v) for v in alpha_sigma(torch.tensor(timestep)))
        prediction = torch.cat([unet(chunk, timestep).sample for chunk in (alpha * slices + sigma * noise).split(64)])
        losses[f"t={timestep}"] = round(float(((prediction - noise) ** 2).mean()), 5)
    losses["mean"] = round(sum(losses.values()) / len(losses), 5)
    return losses


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--output", default="diffusers_ext/assets/tiny-slice-prior")
    parser.add_argument("--steps", type=int, default=1200)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--volumes", type=int, default=48, help="training volumes of each kind")
    parser.add_argument("--checkpoints", default="training_output/tiny-slice-prior")
    parser.add_argument("--resume", action="store_true", help="continue from the newest checkpoint")
    args = parser.parse_args()

    start = time.perf_counter()
    dataset = VolumeSliceDataset(KINDS, args.volumes, SLICE_SIZE)
    scheduler = slice_scheduler()
    torch.manual_seed(0)
    unet = tiny_slice_unet()
    evaluation_slices = held_out_slices()
    untrained = held_out_denoising_loss(unet.eval(), evaluation_slices, scheduler)
    config = TrainingConfig(output_dir=args.checkpoints, max_steps=args.steps, batch_size=args.batch_size,
                            learning_rate=2e-3, checkpoint_every=500, ema_decay=0.995,
                            resume_from="latest" if args.resume else None)
    result = Trainer(DenoisingObjective(scheduler), unet.train(), dataset, config).train()
    unet = result.model.eval()
    unet.load_state_dict(result.ema_weights, strict=False)
    trained = held_out_denoising_loss(unet, evaluation_slices, scheduler)
    minutes = (time.perf_counter() - start) / 60

    pipe = DiffusionMBIRPipeline(unet=unet, scheduler=scheduler)
    report = {"train_slices": len(dataset), "slice_size": SLICE_SIZE, "steps": result.step,
              "batch_size": args.batch_size, "parameters": sum(p.numel() for p in unet.parameters()),
              "final_train_loss_mean_of_last_100": round(sum(result.losses[-100:]) / len(result.losses[-100:]), 5),
              "held_out_epsilon_mse": {"untrained": untrained, "trained (EMA)": trained},
              "minutes": round(minutes, 1)}
    description = (
        f"A tiny 2D prior of 32 x 32 volume slices (pixel-space `UNet2DModel`, {report['parameters'] / 1e6:.2f} M "
        f"parameters, DDPM epsilon objective, linear betas, 1000 steps) trained for {result.step} steps (batch "
        f"{args.batch_size}, EMA 0.995) on {len(dataset)} slices, along all three axes, of synthetic volumes "
        "(random ellipsoid phantoms and smoothed 3D blobs, values in [0, 1]) in "
        f"{minutes:.0f} min on one CPU thread. A demonstration model for DiffusionMBIR on 32^3 volumes.\n\n"
        f"Held-out slices, epsilon MSE over t in {list(EVALUATION_TIMESTEPS)}: {trained['mean']:.4f} "
        f"(untrained network {untrained['mean']:.4f}). Reconstruction figures: `benchmarks/volume_inverse.py`. "
        "Reproduce with `python -m diffusers_ext.training.recipes.tiny_slice_prior`."
    )
    save_for_hub(pipe, args.output, card_template="volume", repo_id="diffusers-ext/tiny-slice-prior",
                 title="tiny-slice-prior", description=description, license="apache-2.0")
    Path(args.output, "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
