"""What the shared trainer core costs per step against a plain hand-written PEFT LoRA loop.

    python benchmarks/trainer_overhead.py [--steps 20] [--repeats 5] [--batch-size 8] [--threads 1]

Both sides train the same small ``UNet2DConditionModel`` with a rank-4 LoRA added by diffusers' ``add_adapter``, on
the same batch (the Trainer's data set is that batch's items, so its loader yields it every step), with AdamW at the
same learning rate, the same number of steps and the same loss: epsilon-prediction MSE on
``DDPMScheduler.add_noise`` with noise and timesteps from a seeded generator. The plain loop is
``loss.backward(); optimizer.step(); optimizer.zero_grad()`` plus ``loss.item()`` for its log; the core adds
accelerate (prepare, accumulate, the seedable loader), the progress bar and its checks. Each repeat times both
(setup excluded, in alternating order, fresh models) in one process; the script prints the median seconds per step of
each and the median of the per-repeat ratios. The issue's target is a ratio of at most 1.1.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import statistics
import tempfile
import time

import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from peft import LoraConfig

from diffusers_ext.training import Trainer, TrainingConfig

TEXT_DIM = 64
LATENT_SIZE = 16
LORA_RANK = 4
LEARNING_RATE = 1e-4


def small_unet() -> UNet2DConditionModel:
    torch.manual_seed(0)
    return UNet2DConditionModel(
        block_out_channels=(32, 64), layers_per_block=2, sample_size=LATENT_SIZE, in_channels=4, out_channels=4,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    ).train()


class EpsilonMSE:
    """The loss both sides use."""

    name = "epsilon-mse"

    def __init__(self):
        self.scheduler = DDPMScheduler()

    def loss(self, model: torch.nn.Module, batch: dict, generator: torch.Generator) -> torch.Tensor:
        latents = batch["latents"]
        noise = torch.randn(latents.shape, generator=generator)
        timesteps = torch.randint(0, self.scheduler.config.num_train_timesteps, (latents.shape[0],),
                                  generator=generator)
        noisy = self.scheduler.add_noise(latents, noise, timesteps)
        prediction = model(noisy, timesteps, encoder_hidden_states=batch["embeds"]).sample
        return torch.nn.functional.mse_loss(prediction, noise)


def make_batch(batch_size: int) -> dict[str, torch.Tensor]:
    generator = torch.Generator().manual_seed(0)
    return {"latents": torch.randn(batch_size, 4, LATENT_SIZE, LATENT_SIZE, generator=generator),
            "embeds": torch.randn(batch_size, 8, TEXT_DIM, generator=generator)}


def time_plain_loop(batch: dict[str, torch.Tensor], steps: int) -> float:
    """Seconds per step of the hand-written loop."""
    unet = small_unet()
    unet.requires_grad_(False)
    unet.add_adapter(LoraConfig(r=LORA_RANK, lora_alpha=LORA_RANK, init_lora_weights="gaussian",
                                target_modules=["to_k", "to_q", "to_v", "to_out.0"]))
    optimizer = torch.optim.AdamW([p for p in unet.parameters() if p.requires_grad], lr=LEARNING_RATE)
    method, generator, losses = EpsilonMSE(), torch.Generator().manual_seed(1), []
    start = time.perf_counter()
    for _ in range(steps):
        loss = method.loss(unet, batch, generator)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        losses.append(loss.item())
    return (time.perf_counter() - start) / steps


def time_trainer(batch: dict[str, torch.Tensor], steps: int, output_dir: str) -> float:
    """Seconds per step of ``Trainer.train()`` (its construction excluded)."""
    items = [{name: value[i] for name, value in batch.items()} for i in range(len(batch["latents"]))]
    config = TrainingConfig(output_dir=output_dir, max_steps=steps, batch_size=len(items), learning_rate=LEARNING_RATE,
                            lora_rank=LORA_RANK, checkpoint_every=0)  # the hand-written loop saves nothing either
    trainer = Trainer(EpsilonMSE(), small_unet(), items, config)
    # The progress bar's cost counts; its output does not belong in the report.
    with open(os.devnull, "w") as devnull, contextlib.redirect_stderr(devnull):
        start = time.perf_counter()
        trainer.train()
        return (time.perf_counter() - start) / steps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: steadier on a shared machine)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    batch = make_batch(args.batch_size)

    with tempfile.TemporaryDirectory() as output_dir:
        # Warm-up: first-call allocations and lazy imports are no one's per-step cost.
        time_plain_loop(batch, 2)
        time_trainer(batch, 2, output_dir)
        plain, core = [], []
        for repeat in range(args.repeats):
            # Alternate the order so that drift in the machine's load falls on both sides alike.
            if repeat % 2 == 0:
                plain.append(time_plain_loop(batch, args.steps))
                core.append(time_trainer(batch, args.steps, output_dir))
            else:
                core.append(time_trainer(batch, args.steps, output_dir))
                plain.append(time_plain_loop(batch, args.steps))

    ratios = [c / p for c, p in zip(core, plain, strict=True)]
    print(f"UNet2DConditionModel ({sum(p.numel() for p in small_unet().parameters()) / 1e6:.2f} M parameters), "
          f"LoRA rank {LORA_RANK}, batch {args.batch_size} x 4 x {LATENT_SIZE} x {LATENT_SIZE}, {args.steps} steps x "
          f"{args.repeats} repeats, {args.threads} thread(s)")
    print(f"plain PEFT loop : {statistics.median(plain) * 1e3:8.2f} ms/step  (each repeat: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in plain)})")
    print(f"Trainer core    : {statistics.median(core) * 1e3:8.2f} ms/step  (each repeat: "
          f"{', '.join(f'{t * 1e3:.1f}' for t in core)})")
    print(f"ratio core / plain: median {statistics.median(ratios):.3f} (per repeat: "
          f"{', '.join(f'{r:.3f}' for r in ratios)}); target <= 1.1")


if __name__ == "__main__":
    main()
