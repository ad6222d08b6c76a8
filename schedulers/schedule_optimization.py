"""Learned sampling schedules: Align Your Steps and LD3.

Both search the noise levels the model is called at, ``l_1 > l_2 > ... > l_n`` (``rho = sigma / alpha`` for VP,
the flow's ``s``): ``l_1`` is the schedule's largest level and stays fixed, every other level moves between its
neighbours, the last one above the schedule's smallest level. The search is the zeroth-order coordinate search of
Align Your Steps' Algorithm 1: sweep over the levels, try ``num_candidates`` values of each between its neighbours
(the current one included, so the objective never rises) and keep the best, until a sweep changes nothing. All
expectations use fixed random numbers, so the objective is deterministic.

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

Where the schedule goes depends on the scheduler, and ``OptimizedSchedule.pipeline_kwargs`` says what to pass to
the pipeline call (``pipe(prompt, **schedule.pipeline_kwargs)``), which works for all of them:

- diffusers-ext's VP schedulers (``ERSDESolverScheduler``, ``TimeShiftScheduler``): the noise levels, also written
  to the config as ``sampling_schedule``, so that ``save_pretrained`` keeps them and every ``num_inference_steps``
  samples them (log-linearly resampled); ``pipeline_kwargs`` is ``{"sigmas": ...}``.
- stock VP schedulers whose ``set_timesteps`` takes ``timesteps`` (``DPMSolverMultistepScheduler``,
  ``EulerDiscreteScheduler``, ...): integer training timesteps, ``{"timesteps": ...}``; the config is left alone.
  Those that take neither ``timesteps`` nor VP ``sigmas`` (``DDIMScheduler``, ``DEISMultistepScheduler``,
  ``PNDMScheduler``, ...) cannot sample a custom schedule and raise.
- flow-matching schedulers (``FlowMatchEulerDiscreteScheduler``, ``RFSolverScheduler``; LD3 only): the levels ``s``
  are where the model is called, and ``{"sigmas": ...}`` holds them un-shifted (``flow_unshift``), because the
  scheduler shifts any ``sigmas`` it is given. With dynamic shifting (Flux) the shift depends on the image size
  through ``mu``: pass the ``mu`` the pipeline uses.
"""

from __future__ import annotations

import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
from tqdm.auto import tqdm

from ..diffusion_math import (
    flow_shift,
    flow_unshift,
    noise_path_from_scheduler_config,
    vp_alphas_cumprod,
    vp_noise_ratio,
    vp_timesteps_from_noise_ratio,
    x0_and_eps_from_prediction,
)
from .vp_discrete import VPDiscreteScheduler, check_num_inference_steps

METHODS = ("ays", "ld3")
Model = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# set_timesteps options of FlowMatchEulerDiscreteScheduler that transform a grid beyond the shift.
FLOW_GRID_TRANSFORMS = ("shift_terminal", "use_karras_sigmas", "use_exponential_sigmas", "use_beta_sigmas",
                        "invert_sigmas")


@dataclass
class OptimizedSchedule:
    """``sigmas``: the noise levels the model is called at (``rho = sigma / alpha`` for VP, the flow's ``s``);
    ``timesteps``: the model's timesteps there; ``pipeline_kwargs``: what to pass to the pipeline call
    (``pipe(..., **pipeline_kwargs)``); ``objective``: the objective after each sweep (first: the initial
    schedule)."""

    sigmas: list[float]
    timesteps: list[float]
    pipeline_kwargs: dict[str, list[float]]
    objective: list[float] = field(default_factory=list)


@dataclass
class _ScheduleTarget:
    """How noise levels reach one scheduler: ``set_timesteps`` arguments for a grid of levels (``None``: the grid
    cannot be sampled, e.g. two levels round to one integer timestep), and the model timesteps there."""

    scheduler: object
    path: str
    mu: float | None
    alphas_cumprod: torch.Tensor | None = None
    shift_factor: float = 1.0

    @classmethod
    def of(cls, scheduler, mu: float | None) -> _ScheduleTarget:
        path = noise_path_from_scheduler_config(scheduler.config)
        parameters = inspect.signature(scheduler.set_timesteps).parameters
        name = type(scheduler).__name__
        if path == "flow":
            if "sigmas" not in parameters:
                raise ValueError(f"{name}.set_timesteps does not take `sigmas`, so it cannot sample a custom schedule")
            transforms = [key for key in FLOW_GRID_TRANSFORMS if scheduler.config.get(key)]
            if transforms:
                raise ValueError(f"{name} transforms custom sigmas beyond the shift ({transforms} set); "
                                 "optimize_timesteps cannot place its levels through that")
            return cls(scheduler, path, mu, shift_factor=_flow_shift_factor(scheduler.config, mu))
        if mu is not None:
            raise ValueError("mu is for flow-matching schedulers with dynamic shifting")
        ours = isinstance(scheduler, VPDiscreteScheduler)
        if not ours and "timesteps" not in parameters:
            raise ValueError(
                f"{name}.set_timesteps takes no `timesteps`, so no pipeline can sample it on a custom schedule; use "
                "a scheduler that does (DPMSolverMultistepScheduler, EulerDiscreteScheduler, ERSDESolverScheduler, "
                "TimeShiftScheduler, ...)"
            )
        return cls(scheduler, path, None, alphas_cumprod=vp_alphas_cumprod(scheduler.config))

    @property
    def ours(self) -> bool:
        return isinstance(self.scheduler, VPDiscreteScheduler)

    def bounds(self) -> tuple[float, float]:
        """The largest level (fixed: where sampling starts) and the lower bound of the smallest one."""
        if self.path == "flow":
            num_train = self.scheduler.config.num_train_timesteps
            return 1.0, float(flow_shift(torch.tensor(1.0 / num_train, dtype=torch.float64), self.shift_factor))
        extremes = vp_noise_ratio(self.alphas_cumprod[[0, -1]])
        return extremes[1].item(), extremes[0].item()

    def model_timesteps(self, levels: np.ndarray) -> torch.Tensor:
        levels = torch.from_numpy(np.asarray(levels, dtype=np.float64))
        if self.path == "flow":
            return levels * self.scheduler.config.num_train_timesteps
        timesteps = vp_timesteps_from_noise_ratio(levels, self.alphas_cumprod)
        return timesteps if self.ours else timesteps.round()

    def set_timesteps_kwargs(self, levels: np.ndarray) -> dict | None:
        if self.path == "flow":
            sigmas = flow_unshift(torch.from_numpy(np.asarray(levels, dtype=np.float64)), self.shift_factor)
            return {"sigmas": sigmas.tolist(), **({"mu": self.mu} if self.mu is not None else {})}
        if self.ours:
            return {"sigmas": np.asarray(levels).tolist()}
        timesteps = self.model_timesteps(levels).long()
        if not (timesteps[1:] < timesteps[:-1]).all():
            return None
        return {"timesteps": timesteps.tolist()}


def _flow_shift_factor(config, mu: float | None) -> float:
    if not config.get("use_dynamic_shifting", False):
        if mu is not None:
            raise ValueError("mu is only used by schedulers with use_dynamic_shifting=True")
        return float(config.get("shift", 1.0))
    if mu is None:
        raise ValueError("this scheduler shifts its grid by the image size (use_dynamic_shifting=True): pass the `mu` "
                         "the pipeline computes for your resolution")
    return math.exp(mu) if config.get("time_shift_type", "exponential") == "exponential" else float(mu)


@torch.no_grad()
def optimize_timesteps(
    scheduler,
    model: Model | Sequence[Model],
    num_inference_steps: int,
    method: str = "ays",
    data: torch.Tensor | Sequence[torch.Tensor] | None = None,
    noise: torch.Tensor | Sequence[torch.Tensor] | None = None,
    teacher_steps: int = 200,
    num_candidates: int = 11,
    max_sweeps: int = 10,
    num_quadrature_nodes: int = 8,
    seed: int = 0,
    mu: float | None = None,
    progress: bool = True,
) -> OptimizedSchedule:
    """Optimise ``scheduler``'s sampling schedule for ``model``; pass the result's ``pipeline_kwargs`` to the
    pipeline (see the module docstring for where else it goes).

    Args:
        scheduler: a VP scheduler (diffusers-ext's, or a stock one whose ``set_timesteps`` takes ``timesteps``) or a
            flow-matching one (``method="ld3"``).
        model: ``model(sample, timestep) -> prediction`` of the scheduler's prediction type, called on the whole
            batch of ``data`` / ``noise``, e.g. ``lambda x, t: unet(x, t, encoder_hidden_states=embeds).sample``
            with ``embeds`` repeated to the batch (``embeds.expand(len(x), -1, -1)``). A list of models (each with
            its own tensor in a list of ``data`` / ``noise``) fits one schedule to all of them: the objective is the
            mean over models of each one's objective relative to its value on the initial schedule.
        num_inference_steps: model calls of the schedule.
        method: ``"ays"`` (VP only; needs ``data``: clean samples, e.g. VAE latents) or ``"ld3"`` (needs ``noise``:
            starting samples ``x_T``; LD3 uses about 100).
        teacher_steps: steps of LD3's teacher run, which is the scheduler itself at that many steps. A scheduler
            whose settings suit few steps only makes a poor teacher: fitted to TimeShift's 200-step run (its window
            made for 10-20 steps), a 10-step schedule was 4.6x worse than DEIS on the held-out oracle family.
        num_candidates, max_sweeps: the coordinate search.
        num_quadrature_nodes: AYS's integration nodes per interval.
        mu: for flow schedulers with dynamic shifting, the pipeline's ``mu``.
    """
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    target = _ScheduleTarget.of(scheduler, mu)
    if target.path == "flow" and method == "ays":
        raise ValueError("method='ays' (its KL bound) is implemented for VP schedulers; use method='ld3' for "
                         "flow matching")
    num_train = scheduler.config.num_train_timesteps
    steps = check_num_inference_steps(num_inference_steps, num_train)
    if steps < 2:
        raise ValueError("a schedule with one step has nothing to optimise")
    input_name = "data" if method == "ays" else "noise"
    models, batches = _paired(model, data if method == "ays" else noise, input_name)
    top, bottom = target.bounds()
    for one_model, batch in zip(models, batches, strict=True):
        _check_model_on_the_batch(one_model, batch, target.model_timesteps(np.array([top])).to(torch.float32))

    # The search moves every level but the first between its neighbours; the last one's lower neighbour is `bottom`.
    set_timesteps_kwargs = {"mu": mu} if mu is not None else {}
    if target.path == "flow" or target.ours:  # the scheduler's own grid (e.g. a named sampling_schedule)
        scheduler.set_timesteps(steps, **set_timesteps_kwargs)
        initial = np.append(scheduler.sigmas[:-1].double().cpu().numpy(), bottom)
    else:  # time-uniform, as AYS initialises discrete-time models
        rho = vp_noise_ratio(target.alphas_cumprod)
        initial = rho[np.linspace(num_train - 1, 0, steps + 1).round().astype(int)].numpy()
    initial[0], initial[-1] = top, bottom

    objectives = []
    for one_model, batch in zip(models, batches, strict=True):
        if method == "ays":
            objectives.append(_klub_objective(one_model, batch, target.alphas_cumprod,
                                              scheduler.config.prediction_type, num_quadrature_nodes, seed))
        else:
            run = _scheduler_runner(target, one_model, batch)
            scheduler.set_timesteps(teacher_steps, **set_timesteps_kwargs)
            objectives.append(_distance_to_teacher(run, run(None)))
    objective = objectives[0] if len(objectives) == 1 else _relative_mean(objectives, initial, local=method == "ays")

    levels, history = _coordinate_search(objective, initial, num_candidates, max_sweeps, method == "ays", progress)
    called = levels[:-1]
    pipeline_kwargs = target.set_timesteps_kwargs(called)
    pipeline_kwargs.pop("mu", None)
    if target.ours:
        scheduler.register_to_config(sampling_schedule=called.tolist())
    return OptimizedSchedule(sigmas=called.tolist(), timesteps=target.model_timesteps(called).tolist(),
                             pipeline_kwargs=pipeline_kwargs, objective=history)


def _paired(model, samples, name: str) -> tuple[list, list[torch.Tensor]]:
    models = list(model) if isinstance(model, (list, tuple)) else [model]
    batches = list(samples) if isinstance(samples, (list, tuple)) else [samples]
    if not all(isinstance(batch, torch.Tensor) for batch in batches) or len(batches) != len(models):
        raise ValueError(f"this method needs `{name}`: a tensor, or a list of tensors with one per model "
                         f"({len(models)} models)")
    return models, batches


def _distance_to_teacher(run, teacher: torch.Tensor):
    return lambda levels: float((run(levels[:-1]) - teacher).pow(2).mean())


def _total(objective, levels: np.ndarray, local: bool) -> float:
    """The objective of a whole schedule; a ``local`` one is a sum over its intervals."""
    return float(sum(objective(levels[i : i + 2]) for i in range(len(levels) - 1)) if local else objective(levels))


def _relative_mean(objectives, initial: np.ndarray, local: bool):
    """The mean of ``objectives`` each divided by its value on ``initial``, so that every model weighs the same."""
    scales = [_total(objective, initial, local) for objective in objectives]
    return lambda levels: sum(o(levels) / s for o, s in zip(objectives, scales, strict=True)) / len(objectives)


def _check_model_on_the_batch(model: Model, samples: torch.Tensor, timestep: torch.Tensor) -> None:
    """One call on the whole batch before the search, so that a model that closes over un-batched conditioning
    fails with a clear message."""
    try:
        output = model(samples, timestep.to(samples.device).expand(len(samples)))
    except RuntimeError as error:
        raise ValueError(
            f"model(sample, timestep) failed on the batch of {len(samples)} samples ({error}). It is called on the "
            "whole batch: conditioning it closes over must have that batch size too, e.g. "
            "encoder_hidden_states=embeds.expand(len(x), -1, -1)"
        ) from error
    if not isinstance(output, torch.Tensor) or output.shape != samples.shape:
        raise ValueError(f"model(sample, timestep) must return a tensor of the sample's shape {tuple(samples.shape)}, "
                         f"got {getattr(output, 'shape', type(output))}; for a diffusers model, return its `.sample`")


def _coordinate_search(objective, levels: np.ndarray, num_candidates: int, max_sweeps: int, local: bool, progress: bool):
    """AYS Algorithm 1 on ``log(levels)``; ``local``: the objective is a sum over intervals (only the two intervals
    around a point change when it moves)."""
    levels = levels.copy()
    history = [_total(objective, levels, local)]
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
        history.append(_total(objective, levels, local))
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


def _scheduler_runner(target: _ScheduleTarget, model: Model, noise: torch.Tensor):
    """``run(levels)``: the scheduler's output from ``noise`` with the model called at noise levels ``levels``
    (``None``: the grid already set)."""
    scheduler = target.scheduler
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters

    def run(levels: np.ndarray | None) -> torch.Tensor:
        if levels is not None:
            kwargs = target.set_timesteps_kwargs(levels)
            if kwargs is None:
                return torch.full_like(noise, float("inf"), dtype=torch.float64)
            scheduler.set_timesteps(**kwargs)
        sample = noise * getattr(scheduler, "init_noise_sigma", 1.0)
        # A stochastic scheduler sees the same noise in every run, so that runs differ only by their schedule.
        step_kwargs = {"generator": torch.Generator(noise.device).manual_seed(0)} if takes_generator else {}
        for t in scheduler.timesteps:
            model_input = scheduler.scale_model_input(sample, t) if hasattr(scheduler, "scale_model_input") else sample
            output = model(model_input, t.expand(len(sample)))
            sample = scheduler.step(output, t, sample, **step_kwargs).prev_sample
        return sample.to(torch.float64)

    return run
