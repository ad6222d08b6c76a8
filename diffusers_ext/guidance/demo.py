"""The steering part of ``diffusers-ext demo``: steered against unsteered sampling on the exact 2-D oracle, each next
to the law it should reach, with sliced W2 distances and a plot."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler

from ..testing import GaussianMixture, GaussianMixtureDenoiser, GaussianMixtureSamplingPipeline, sliced_wasserstein2
from .fk_steering import FKSteering
from .flowchef import FlowChef
from .loss_guidance import LossGuidance
from .rewards import MeasurementConsistency, matrix_operator

MEANS = [[-1.5, 1.0], [1.5, 1.0], [0.0, -1.5]]
VARIANCES = [0.15, 0.15, 0.15]
WEIGHTS = [0.45, 0.45, 0.10]
TILT = [1.0, -1.0]  # the reward a . x favours the right and the bottom


@dataclass
class DemoPanel:
    title: str
    unsteered: torch.Tensor
    steered: torch.Tensor
    target: torch.Tensor
    distance_unsteered: float
    distance_steered: float


def fk_panel(num_samples: int, num_particles: int, seed: int = 0) -> DemoPanel:
    """FK steering toward ``p(x) exp(a.x)`` with ``num_particles`` particles per output sample."""
    scheduler = DDPMScheduler(clip_sample=False)
    pipe = GaussianMixtureSamplingPipeline(GaussianMixtureDenoiser(MEANS, VARIANCES, WEIGHTS, scheduler.config), scheduler)
    pipe.set_progress_bar_config(disable=True)
    law = GaussianMixture(MEANS, VARIANCES, WEIGHTS)
    tilt = torch.tensor(TILT, dtype=torch.float64)
    target = law.exponentially_tilted(tilt).sample(50_000, torch.Generator().manual_seed(seed + 1))

    def reward(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1).double() @ tilt

    unsteered = pipe(batch_size=num_samples, num_inference_steps=50, generator=torch.Generator().manual_seed(seed)).samples
    steering = FKSteering(reward=reward, num_particles=num_particles, reward_scale=1.0, reward_space="sample", seed=seed)
    with steering.attached(pipe):
        particles = pipe(batch_size=num_samples * num_particles, num_inference_steps=50,
                         generator=torch.Generator().manual_seed(seed)).samples
    steered = particles.reshape(num_samples, num_particles, -1)[:, 0]
    return DemoPanel(
        f"FK steering, K={num_particles}, toward p(x) exp(a.x)", unsteered, steered, target,
        sliced_wasserstein2(unsteered, target), sliced_wasserstein2(steered, target),
    )


def inverse_problem_panels(num_samples: int, seed: int = 0) -> list[DemoPanel]:
    """FlowChef and DPS-style loss guidance on the rectified-flow oracle for ``y = x_1 + n``, toward the exact
    posterior ``p(x | y)``. FlowChef takes the authors' 8 % of the residual per step (as in the tests); DPS runs at
    its default scale. Neither was tuned on this mixture."""
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    pipe = GaussianMixtureSamplingPipeline(GaussianMixtureDenoiser(MEANS, VARIANCES, WEIGHTS, scheduler.config), scheduler)
    pipe.set_progress_bar_config(disable=True)
    operator, measurement, noise_std = torch.tensor([[1.0, 0.0]]), torch.tensor([[0.8]]), 0.1
    posterior = GaussianMixture(MEANS, VARIANCES, WEIGHTS).posterior_given_linear_measurement(
        operator.double(), measurement[0].double(), noise_std)
    target = posterior.sample(50_000, torch.Generator().manual_seed(seed + 1))
    loss = MeasurementConsistency(matrix_operator(operator), measurement, noise_std).loss
    inputs = dict(batch_size=num_samples, num_inference_steps=100)
    unsteered = pipe(**inputs, generator=torch.Generator().manual_seed(seed)).samples
    methods = {
        "FlowChef, y = x1 + n, toward p(x | y)": FlowChef(loss=loss, step_size=0.081 * noise_std**2, guidance_end=0.99,
                                                          reward_space="sample"),
        "Loss guidance (DPS), y = x1 + n, toward p(x | y)": LossGuidance(loss=loss, reward_space="sample"),
    }
    panels = []
    for title, method in methods.items():
        with method.attached(pipe):
            steered = pipe(**inputs, generator=torch.Generator().manual_seed(seed)).samples
        panels.append(DemoPanel(title, unsteered, steered, target, sliced_wasserstein2(unsteered, target),
                                sliced_wasserstein2(steered, target)))
    return panels


def plot_panels(panels: list[DemoPanel], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(len(panels), 3, figsize=(9.6, 3.4 * len(panels)), squeeze=False)
    for row, panel in zip(axes, panels, strict=True):
        shown = [("unsteered", panel.unsteered, panel.distance_unsteered),
                 ("steered", panel.steered, panel.distance_steered), ("exact target", panel.target, 0.0)]
        for ax, (name, samples, distance) in zip(row, shown, strict=True):
            ax.scatter(panel.target[:2000, 0], panel.target[:2000, 1], s=2, color="lightgray")
            ax.scatter(samples[:2000, 0], samples[:2000, 1], s=2)
            label = f"{name}" + (f"\nSW2 to target {distance:.3f}" if name != "exact target" else "")
            ax.set(title=label, xlim=(-3.5, 3.5), ylim=(-3.5, 3.5), aspect="equal", xticks=[], yticks=[])
        row[0].set_ylabel(panel.title, fontsize=8)
    fig.suptitle("Steering on the exact Gaussian-mixture oracle (grey: exact target law)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def run_steering_demo(output: Path, num_samples: int = 2000) -> list[DemoPanel]:
    output.mkdir(parents=True, exist_ok=True)
    panels = [fk_panel(num_samples, num_particles=8), *inverse_problem_panels(num_samples)]
    lines = [f"{'method':<52}{'SW2 unsteered':>15}{'SW2 steered':>13}"]
    lines += [f"{p.title:<52}{p.distance_unsteered:>15.3f}{p.distance_steered:>13.3f}" for p in panels]
    table = "\n".join(lines)
    print(table)
    (output / "steering.txt").write_text(table + "\n", encoding="utf-8")
    plot_panels(panels, output / "steering.png")
    print(f"\nwritten to {output}/: steering.png, steering.txt")
    return panels
