"""Reward curves of DDPO and RLCM on the toy pipeline: held-out JPEG compressibility against optimizer steps.

    python benchmarks/reward_finetuning.py [--steps 300] [--every 50] [--output benchmarks/results]

Each method trains a rank-8 LoRA (LCM-LoRA's targets, learning rate 3e-3) of ``training.ddpo.toy_pipeline`` on four
prompts, at PPO clip ranges 1e-4 (the papers') and 1e-2 (the tests'); every ``--every`` steps the held-out reward
(two prompts no step trained on, 32 fixed initial noises each) is measured, the base model's at step 0. Prints the
table and writes ``reward_finetuning.png``.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, LCMScheduler

from diffusers_ext.guidance.rewards import jpeg_compressibility
from diffusers_ext.training import DDPOObjective, RLCMObjective, Trainer, TrainingConfig
from diffusers_ext.training.ddpo import TOY_PROMPTS, toy_pipeline
from diffusers_ext.training.lcm_lora import LCM_LORA_TARGET_MODULES

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
HELD_OUT_PROMPTS = ("a horse", "a cow")
HELD_OUT_SEEDS = 32
CLIP_RANGES = (1e-4, 1e-2)


def objective(name: str, clip_range: float):
    if name == "ddpo":
        pipe = toy_pipeline(DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1))
        return DDPOObjective(pipe, jpeg_compressibility, num_inference_steps=10, guidance_scale=3.0,
                             images_per_prompt=4, min_count=4, clip_range=clip_range, transitions_per_batch=16)
    pipe = toy_pipeline(LCMScheduler(**SD_SCHEDULE))
    return RLCMObjective(pipe, jpeg_compressibility, num_inference_steps=4, images_per_prompt=4, min_count=4,
                         clip_range=clip_range, transitions_per_batch=16)


class HeldOutReward:
    """The method, validated by the mean held-out reward (``curve``: ``(step, reward)``)."""

    def __init__(self, method):
        self.method, self.name, self.curve = method, method.name, []

    def __getattr__(self, attribute):
        return getattr(self.method, attribute)

    def validate(self, model, step, folder):
        prompts = [p for p in HELD_OUT_PROMPTS for _ in range(HELD_OUT_SEEDS)]
        with torch.no_grad():
            images = self.method.sample(model, prompts, torch.Generator().manual_seed(1000))[2]
        self.curve.append((step, float(jpeg_compressibility(images).mean())))
        return {"held_out_reward": self.curve[-1][1]}


def reward_curve(name: str, clip_range: float, steps: int, every: int) -> list[tuple[int, float]]:
    method = HeldOutReward(objective(name, clip_range))
    unet = method.pipeline.unet
    method.validate(unet.eval(), 0, None)
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(output_dir=folder, max_steps=steps, batch_size=4, learning_rate=3e-3, lora_rank=8,
                                lora_target_modules=LCM_LORA_TARGET_MODULES, validation_every=every)
        Trainer(method, unet.train(), list(TOY_PROMPTS), config).train()
    return method.curve


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=300)
    parser.add_argument("--every", type=int, default=50)
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    curves = {(name, clip): reward_curve(name, clip, args.steps, args.every)
              for name in ("ddpo", "rlcm") for clip in CLIP_RANGES}
    steps = [step for step, _ in next(iter(curves.values()))]
    print("held-out JPEG compressibility (minus kB per image; higher is better)")
    print(f"{'method':<6} {'clip':>6} " + " ".join(f"{s:>8}" for s in steps) + f" {'gain':>8}")
    for (name, clip), curve in curves.items():
        gain = curve[-1][1] - curve[0][1]
        print(f"{name:<6} {clip:>6.0e} " + " ".join(f"{r:>8.4f}" for _, r in curve) + f" {gain:>+8.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, name in zip(axes, ("ddpo", "rlcm"), strict=True):
        for clip in CLIP_RANGES:
            axis.plot(*zip(*curves[name, clip], strict=True), marker="o", label=f"clip range {clip:.0e}")
        axis.set(title=name.upper(), xlabel="optimizer step")
        axis.legend()
    axes[0].set_ylabel("held-out JPEG compressibility")
    figure.tight_layout()
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    figure.savefig(output / "reward_finetuning.png", dpi=120)
    print(f"plot: {output / 'reward_finetuning.png'}")


if __name__ == "__main__":
    main()
