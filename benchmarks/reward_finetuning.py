"""DDPO and RLCM on the toy pipeline: held-out JPEG compressibility gains over training seeds, the policy gradient's
signal-to-noise ratio, and reward curves.

    python benchmarks/reward_finetuning.py seeds [--seeds 0 1 2 3 4] [--recipes tests former]
    python benchmarks/reward_finetuning.py snr [--rounds 12]
    python benchmarks/reward_finetuning.py curves [--every 10] [--output benchmarks/results]

Every run trains a rank-8 LoRA (LCM-LoRA's targets) of ``training.ddpo.toy_pipeline`` on four prompts; the held-out
reward is that of two prompts no step trained on, 32 fixed initial noises each, paired with the base model's.

- ``seeds``: the gain per training seed, for the tests' recipe (16 images a prompt, two updates a round on half of
  its transitions each, learning rate 1e-2; 100 rounds of RLCM, 60 of DDPO) and the former one (4 images a prompt,
  16 transitions an update, learning rate 3e-3, 300 updates), at PPO clip range 1e-2.
- ``snr``: at the base model, ``|E g|^2 / tr Cov g`` of one round's policy gradient (4 prompts x 4 images) over
  ``--rounds`` independent rounds, in all and per denoising step: how much of an update is signal.
- ``curves``: the held-out reward every ``--every`` steps of the tests' recipe at clip ranges 1e-4 (the papers') and
  1e-2 (the tests'); writes ``reward_finetuning.png``.
"""

from __future__ import annotations

import argparse
import itertools
import tempfile
from pathlib import Path

import torch
from diffusers import DDIMScheduler, LCMScheduler

from diffusers_ext.guidance.rewards import jpeg_compressibility
from diffusers_ext.training import DDPOObjective, RLCMObjective, Trainer, TrainingConfig
from diffusers_ext.training.ddpo import TOY_PROMPTS, toy_pipeline
from diffusers_ext.training.lcm_lora import LCM_LORA_TARGET_MODULES
from diffusers_ext.training.trainer import add_lora_adapter

SD_SCHEDULE = dict(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
HELD_OUT_PROMPTS = ("a horse", "a cow")
HELD_OUT_SEEDS = 32
CLIP_RANGES = (1e-4, 1e-2)
METHODS = ("ddpo", "rlcm")
STEPS_PER_TRAJECTORY = {"ddpo": 10, "rlcm": 3}  # stochastic transitions: 10 DDIM steps; 4 LCM steps, the last exact
# images_per_prompt, updates a round, learning rate and rounds (per method) of each recipe.
RECIPES = {
    "tests": dict(images_per_prompt=16, updates_per_round=2, learning_rate=1e-2, rounds={"ddpo": 60, "rlcm": 100}),
    "former": dict(images_per_prompt=4, updates_per_round=None, learning_rate=3e-3, rounds=None),
}


def objective(name: str, images_per_prompt: int, clip_range: float, transitions_per_batch: int):
    options = dict(images_per_prompt=images_per_prompt, min_count=images_per_prompt, clip_range=clip_range,
                   transitions_per_batch=transitions_per_batch)
    if name == "ddpo":
        pipe = toy_pipeline(DDIMScheduler(**SD_SCHEDULE, clip_sample=False, set_alpha_to_one=False, steps_offset=1))
        return DDPOObjective(pipe, jpeg_compressibility, num_inference_steps=10, guidance_scale=3.0, **options)
    return RLCMObjective(toy_pipeline(LCMScheduler(**SD_SCHEDULE)), jpeg_compressibility, num_inference_steps=4,
                         **options)


def held_out_rewards(method, unet) -> torch.Tensor:
    prompts = [p for p in HELD_OUT_PROMPTS for _ in range(HELD_OUT_SEEDS)]
    unet.eval()
    with torch.no_grad():
        return jpeg_compressibility(method.sample(unet, prompts, torch.Generator().manual_seed(1000))[2])


class HeldOutReward:
    """The method, validated by the mean held-out reward (``curve``: ``(step, reward)``)."""

    def __init__(self, method):
        self.method, self.name, self.curve = method, method.name, []

    def __getattr__(self, attribute):
        return getattr(self.method, attribute)

    def validate(self, model, step, folder):
        self.curve.append((step, float(held_out_rewards(self.method, model).mean())))
        return {"held_out_reward": self.curve[-1][1]}


def train(name: str, recipe: str, seed: int, clip_range: float = 1e-2, every: int = 0):
    """The held-out rewards before and after training (paired per image), and the method (its ``curve`` when
    ``every`` is set)."""
    options = RECIPES[recipe]
    round_transitions = len(TOY_PROMPTS) * options["images_per_prompt"] * STEPS_PER_TRAJECTORY[name]
    if options["updates_per_round"] is None:
        transitions_per_batch, steps = 16, 300
    else:
        transitions_per_batch = round_transitions // options["updates_per_round"]
        steps = options["rounds"][name] * options["updates_per_round"]
    method = HeldOutReward(objective(name, options["images_per_prompt"], clip_range, transitions_per_batch))
    unet = method.pipeline.unet
    before = held_out_rewards(method.method, unet)
    method.curve.append((0, float(before.mean())))
    with tempfile.TemporaryDirectory() as folder:
        config = TrainingConfig(output_dir=folder, max_steps=steps, batch_size=len(TOY_PROMPTS),
                                learning_rate=options["learning_rate"], lora_rank=8,
                                lora_target_modules=LCM_LORA_TARGET_MODULES, validation_every=every, seed=seed)
        model = Trainer(method, unet.train(), list(TOY_PROMPTS), config).train().model
    return before, held_out_rewards(method.method, model), method


def seeds_table(seeds: list[int], recipes: list[str]) -> None:
    print("held-out JPEG compressibility gain (kB per 16 x 16 image, paired; +- its standard error)")
    for recipe, name in itertools.product(recipes, METHODS):
        gains = []
        for seed in seeds:
            before, after, _ = train(name, recipe, seed)
            gains.append(after - before)
            print(f"{recipe:<7} {name:<5} seed {seed}: {float(gains[-1].mean()):+.4f} "
                  f"+- {float(gains[-1].std() / len(gains[-1]) ** 0.5):.4f}", flush=True)
        means = torch.stack([g.mean() for g in gains])
        print(f"{recipe:<7} {name:<5} over seeds {seeds}: mean {float(means.mean()):+.4f}, std "
              f"{float(means.std()):.4f}, min {float(means.min()):+.4f}", flush=True)


def signal_to_noise(gram: torch.Tensor) -> tuple[float, float]:
    """``(|E g|^2, tr Cov g)`` from the Gram matrix of independent gradient estimates: the mean off-diagonal entry
    estimates ``|E g|^2`` without bias, the mean diagonal entry ``|E g|^2 + tr Cov g``."""
    count = len(gram)
    signal = (gram.sum() - gram.diag().sum()) / (count * (count - 1))
    return float(signal), float(gram.diag().mean() - signal)


def snr_table(rounds: int) -> None:
    print(f"policy gradient at the base model (rank-8 LoRA), {rounds} rounds of 4 prompts x 4 images")
    for name in METHODS:
        method = objective(name, images_per_prompt=4, clip_range=1e-2, transitions_per_batch=10**6)
        unet = add_lora_adapter(method.pipeline.unet, TrainingConfig(lora_rank=8,
                                                                     lora_target_modules=LCM_LORA_TARGET_MODULES))
        parameters = [p for p in unet.parameters() if p.requires_grad]
        generator = torch.Generator().manual_seed(0)
        per_step = []  # (rounds, steps, parameters): each step's share of the round's gradient
        for _ in range(rounds):
            with torch.no_grad():
                batch = method.collect(unet.eval(), TOY_PROMPTS, generator)[0]
            unet.train()
            shares = []
            for k in range(method.policy.num_transitions):
                chosen = batch["step"] == k
                loss = method.loss(unet, dict(batch, trajectory=batch["trajectory"][chosen], step=batch["step"][chosen]),
                                   generator) / method.policy.num_transitions
                shares.append(torch.cat([g.flatten() for g in torch.autograd.grad(loss, parameters)]).double())
            per_step.append(torch.stack(shares))
        per_step = torch.stack(per_step)
        gradients = per_step.sum(dim=1)
        signal, noise = signal_to_noise(gradients @ gradients.T)
        print(f"{name}: |E g|^2 {signal:.2e}, tr Cov g {noise:.2e}, signal-to-noise {signal / noise:.4f} per round")
        for k in range(per_step.shape[1]):
            step_signal, step_noise = signal_to_noise(per_step[:, k] @ per_step[:, k].T)
            print(f"  step {k} (t = {int(method.policy.timesteps[k])}): |E g_k|^2 {step_signal:+.2e}, tr Cov g_k "
                  f"{step_noise:.2e} ({step_noise / noise:.0%} of the round's)")


def curves(every: int, output: Path) -> None:
    results = {(name, clip): train(name, "tests", 0, clip, every)[2].curve for name in METHODS for clip in CLIP_RANGES}
    print("held-out JPEG compressibility (minus kB per image; higher is better), the tests' recipe, seed 0")
    for (name, clip), curve in results.items():
        print(f"{name:<5} clip {clip:.0e}: " + " ".join(f"{step}: {reward:.4f}" for step, reward in curve)
              + f"  gain {curve[-1][1] - curve[0][1]:+.4f}")

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(1, 2, figsize=(9, 3.5), sharey=True)
    for axis, name in zip(axes, METHODS, strict=True):
        for clip in CLIP_RANGES:
            axis.plot(*zip(*results[name, clip], strict=True), marker="o", label=f"clip range {clip:.0e}")
        axis.set(title=name.upper(), xlabel="optimizer step")
        axis.legend()
    axes[0].set_ylabel("held-out JPEG compressibility")
    figure.tight_layout()
    output.mkdir(parents=True, exist_ok=True)
    figure.savefig(output / "reward_finetuning.png", dpi=120)
    print(f"plot: {output / 'reward_finetuning.png'}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    commands = parser.add_subparsers(dest="command", required=True)
    seeds = commands.add_parser("seeds")
    seeds.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    seeds.add_argument("--recipes", nargs="+", choices=list(RECIPES), default=list(RECIPES))
    commands.add_parser("snr").add_argument("--rounds", type=int, default=12)
    curve = commands.add_parser("curves")
    curve.add_argument("--every", type=int, default=10)
    curve.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.command == "seeds":
        seeds_table(args.seeds, args.recipes)
    elif args.command == "snr":
        snr_table(args.rounds)
    else:
        curves(args.every, Path(args.output))


if __name__ == "__main__":
    main()
