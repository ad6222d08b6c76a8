"""Learned sampling schedules for VP schedulers: Align Your Steps and LD3.

Both search the noise levels ``rho_n > ... > rho_1 > rho_0`` (``rho = sigma / alpha``; the model is called at
``rho_n ... rho_1``, the end points are the schedule's extremes and stay fixed) by the zeroth-order coordinate search
of Align Your Steps' Algorithm 1: sweep over the interior points, try ``num_candidates`` values of each between its
neighbours (the current one included, so the objective never rises) and keep the best, until a sweep changes nothing.
All expectations use fixed random numbers, so the objective is deterministic.

- ``method="ays"``: "Align Your Steps: Optimizing Sampling Schedules in Diffusion Models" (Sabour et al.,
  arXiv 2404.14507). The KL upper bound between the true reverse SDE and its stochastic-DDIM discretisation, with
  ``D`` the model's data prediction and ``x_t = x0 + t eps`` in EDM scaling (``t = rho``):

      KLUB = sum_i int_{rho_{i-1}}^{rho_i} t^-3 E || D(x_t, t) - D(x_{rho_i}, rho_i) ||^2 dt,
      x_{rho_i} = x_t + sqrt(rho_i^2 - t^2) eps'

  over data samples ``x0`` (Gauss-Legendre nodes in ``log t`` replace the paper's importance sampling).
- ``method="ld3"``: "Learning to Discretize Denoising Diffusion ODEs" (Tong et al., arXiv 2405.15506). The mean
  squared distance between the scheduler's few-step output and a many-step teacher run of the same scheduler from the
  same noise samples. Differences from the paper: L2 instead of LPIPS (no perceptual network here), the hard loss
  (no slack ball around the noise), and the coordinate search above instead of RMSprop on softmax logits (it needs
  no gradient through the scheduler, so any scheduler works).

The result is written to the scheduler's config as ``sampling_schedule``, so ``save_pretrained`` / ``from_pretrained``
keep it; diffusers-ext schedulers sample on it for every ``num_inference_steps`` (log-linearly resampled), and for
stock schedulers ``OptimizedSchedule.timesteps`` goes to the pipeline call (``pipe(..., timesteps=...)``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion_math import (
    noise_path_from_scheduler_config,
    vp_alphas_cumprod,
    vp_noise_ratio,
    vp_timesteps_from_noise_ratio,
    x0_and_eps_from_prediction,
)
from .vp_discrete import VPDiscreteScheduler, check_num_inference_steps

METHODS = ("ays", "ld3")
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass
class OptimizedSchedule:
    """``sigmas``: the noise levels ``rho`` the model is called at; ``timesteps``: the same as integer training
    timesteps (for stock schedulers' ``timesteps=``); ``objective``: the objective after each sweep (first: the
    initial schedule)."""

    sigmas: list[float]
    timesteps: list[int]
    objective: list[float]


def optimize_timesteps(
    scheduler,
    model: Model,
    num_inference_steps: int,
    method: str = "ays",
    data: torch.Tensor | None = None,
    noise: torch.Tensor | None = None,
    teacher_steps: int = 200,
    num_candidates: int = 11,
    max_sweeps: int = 10,
    num_quadrature_nodes: int = 8,
    seed: int = 0,
    progress: bool = True,
) -> OptimizedSchedule:
    """Optimise ``scheduler``'s sampling schedule for ``model`` and store it in ``scheduler.config.sampling_schedule``.

    Args:
        scheduler: a VP scheduler whose ``set_timesteps`` accepts ``sigmas=`` (diffusers-ext's) or ``timesteps=``.
        model: ``model(sample, timestep) -> prediction`` of ``scheduler.config.prediction_type``, e.g.
            ``lambda x, t: unet(x, t, encoder_hidden_states=embeds).sample`` (batch it as ``data`` / ``noise``).
        num_inference_steps: model calls of the schedule.
        method: ``"ays"`` (needs ``data``: clean samples, e.g. VAE latents) or ``"ld3"`` (needs ``noise``: starting
            samples ``x_T``; LD3 uses about 100).
        teacher_steps: steps of LD3's teacher run.
        num_candidates, max_sweeps: the coordinate search.
        num_quadrature_nodes: AYS's integration nodes per interval.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    if noise_path_from_scheduler_config(scheduler.config) != "vp":
        raise ValueError("optimize_timesteps supports VP (DDPM-family) schedulers; flow-matching ones are not supported yet")
    parameters = inspect.signature(scheduler.set_timesteps).parameters
    if "sigmas" not in parameters and "timesteps" not in parameters:
        raise ValueError(f"{type(scheduler).__name__}.set_timesteps accepts neither `sigmas` nor `timesteps`")
    num_train = scheduler.config.num_train_timesteps
    steps = check_num_inference_steps(num_inference_steps, num_train)
    if steps < 2:
        raise ValueError("a schedule with one step has nothing to optimise")
    samples = data if method == "ays" else noise
    if not isinstance(samples, torch.Tensor):
        raise ValueError(f"method={method!r} needs `{'data' if method == 'ays' else 'noise'}` as a tensor")

    alphas_cumprod = vp_alphas_cumprod(scheduler.config)
    extremes = vp_noise_ratio(alphas_cumprod)
    # Initialised time-uniform, as AYS does for discrete-time models.
    initial = vp_noise_ratio(alphas_cumprod)[np.linspace(num_train - 1, 0, steps + 1).round().astype(int)].numpy()
    initial[0], initial[-1] = extremes[-1].item(), extremes[0].item()

    if method == "ays":
        objective = _klub_objective(model, samples, alphas_cumprod, scheduler.config.prediction_type, num_quadrature_nodes, seed)
    else:
        run = _scheduler_runner(scheduler, model, samples, alphas_cumprod)
        scheduler.set_timesteps(teacher_steps)
        teacher = run(None)
        objective = lambda levels: float((run(levels[:-1]) - teacher).pow(2).mean())  # noqa: E731

    levels, history = _coordinate_search(objective, initial, num_candidates, max_sweeps, method == "ays", progress)
    sigmas = levels[:-1].tolist()
    timesteps = vp_timesteps_from_noise_ratio(torch.tensor(sigmas, dtype=torch.float64), alphas_cumprod).round().long().tolist()
    scheduler.register_to_config(sampling_schedule=sigmas)
    return OptimizedSchedule(sigmas=sigmas, timesteps=timesteps, objective=history)


def _coordinate_search(objective, levels: np.ndarray, num_candidates: int, max_sweeps: int, local: bool, progress: bool):
    """AYS Algorithm 1 on ``log(levels)``; ``local``: the objective is a sum over intervals (only the two intervals
    around a point change when it moves)."""
    levels = levels.copy()
    history = [objective(levels) if not local else sum(objective(levels[i : i + 2]) for i in range(len(levels) - 1))]
    for _ in tqdm(range(max_sweeps), desc="optimize_timesteps", disable=not progress):
        changed = False
        for i in range(1, len(levels) - 1):
            log_high, log_low = np.log(levels[i - 1]), np.log(levels[i + 1])
            candidates = np.exp(np.linspace(log_low, log_high, num_candidates + 2)[1:-1])
            candidates = np.append(candidates, levels[i])
            scores = []
            for candidate in candidates:
                trial = levels.copy()
                trial[i] = candidate
                scores.append(objective(trial[i - 1 : i + 2]) if local else objective(trial))
            best = int(np.argmin(scores))
            if best != len(candidates) - 1 and scores[best] < scores[-1]:
                levels[i] = candidates[best]
                changed = True
        history.append(objective(levels) if not local else sum(objective(levels[i : i + 2]) for i in range(len(levels) - 1)))
        if not changed:
            break
    return levels, history


def _klub_objective(model: Model, data, alphas_cumprod, prediction_type, num_nodes, seed):
    generator = torch.Generator().manual_seed(seed)
    x0 = data.to(torch.float64)
    eps = [torch.randn(x0.shape, generator=generator, dtype=torch.float64) for _ in range(num_nodes)]
    eps_up = [torch.randn(x0.shape, generator=generator, dtype=torch.float64) for _ in range(num_nodes)]
    nodes, weights = np.polynomial.legendre.leggauss(num_nodes)

    def denoise(x_ve: torch.Tensor, rho: float) -> torch.Tensor:
        alpha = (1 + rho**2) ** -0.5
        timestep = vp_timesteps_from_noise_ratio(torch.tensor([rho], dtype=torch.float64), alphas_cumprod).to(torch.float32)
        sample = (alpha * x_ve).to(data.dtype)
        prediction = model(sample, timestep.expand(len(sample))).to(torch.float64)
        return x0_and_eps_from_prediction(prediction, alpha * x_ve, alpha, rho * alpha, prediction_type)[0]

    cache: dict[tuple[float, float], float] = {}

    def interval_bound(pair: np.ndarray) -> float:
        """``int_{lo}^{hi} t^-3 E||D(x_t, t) - D(x_hi, hi)||^2 dt`` for ``pair = (hi, lo)`` (or ``(hi, mid, lo)``)."""
        if len(pair) == 3:
            return interval_bound(pair[:2]) + interval_bound(pair[1:])
        high, low = float(pair[0]), float(pair[1])
        if (high, low) not in cache:
            half = 0.5 * (np.log(high) - np.log(low))
            total = 0.0
            for node, weight, noise, noise_up in zip(nodes, weights, eps, eps_up, strict=True):
                t = float(np.exp(half * node + 0.5 * (np.log(high) + np.log(low))))
                x_t = x0 + t * noise
                x_high = x_t + np.sqrt(high**2 - t**2) * noise_up
                gap = (denoise(x_t, t) - denoise(x_high, high)).pow(2).flatten(1).sum(1).mean()
                total += weight * half * t * float(gap) / t**3  # dt = t d(log t)
            cache[high, low] = total
        return cache[high, low]

    return interval_bound


def _scheduler_runner(scheduler, model: Model, noise: torch.Tensor, alphas_cumprod):
    """``run(levels)``: the scheduler's output from ``noise`` sampling at noise levels ``levels`` (``None``: the grid
    already set)."""
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    use_sigmas = isinstance(scheduler, VPDiscreteScheduler) and "sigmas" in inspect.signature(scheduler.set_timesteps).parameters

    def run(levels: np.ndarray | None) -> torch.Tensor:
        if levels is not None:
            if use_sigmas:
                scheduler.set_timesteps(sigmas=levels.tolist())
            else:
                timesteps = vp_timesteps_from_noise_ratio(torch.from_numpy(levels), alphas_cumprod).round().long()
                if not (timesteps[1:] < timesteps[:-1]).all():
                    return torch.full_like(noise, float("inf"))  # two levels share an integer timestep
                scheduler.set_timesteps(timesteps=timesteps.tolist())
        sample = noise * scheduler.init_noise_sigma
        # A stochastic scheduler sees the same noise in every run, so that runs differ only by their schedule.
        step_kwargs = {"generator": torch.Generator(noise.device).manual_seed(0)} if takes_generator else {}
        for t in scheduler.timesteps:
            output = model(scheduler.scale_model_input(sample, t), t.expand(len(sample)))
            sample = scheduler.step(output, t, sample, **step_kwargs).prev_sample
        return sample.to(torch.float64)

    return run
