"""Known-good sampling schedules, selectable by name in the ``sampling_schedule`` config key of diffusers-ext's VP
schedulers (``ERSDESolverScheduler``, ``TimeShiftScheduler``), and the checks a schedule passes before it is used.

A schedule is a descending list of noise levels ``rho = sigma / alpha`` (diffusers' VP ``sigmas``) at which the model
is called, made for one training schedule; ``set_timesteps(n)`` resamples it log-linearly to ``n`` levels. Named ones:

- ``"ays"``: Align Your Steps' 10-step table for Stable Diffusion 1.5 ("Align Your Steps: Optimizing Sampling
  Schedules in Diffusion Models", Sabour et al., arXiv 2404.14507), as diffusers ships it
  (``diffusers.schedulers.AysSchedules["StableDiffusionSigmas"]``).
- ``"ays_sdxl"``: the same paper's table for SDXL (``AysSchedules["StableDiffusionXLSigmas"]``).
- ``"family_ld3"``: LD3 ("Learning to Discretize Denoising Diffusion ODEs", Tong et al., arXiv 2405.15506) fitted
  once on the exact oracles of ``diffusers_ext.testing.sampler_accuracy.law_family(seed=1)``; see
  ``FAMILY_LD3_LEVELS``.

All were made for SD's training schedule (``scaled_linear`` betas from 0.00085 to 0.012 over 1000 steps), which
SD 1.x, SD 2.x and SDXL share, so a scheduler config cannot tell those models apart.

``"auto"`` (the schedulers' default) is the named schedule of ``DEFAULT_SCHEDULES`` made for the config's training
schedule, or ``timestep_spacing``'s grid when there is none.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from diffusers.schedulers import AysSchedules

# Published tables round the largest noise level (SD: 14.6146) to 14.615: levels this close beyond the schedule's
# range are clipped to it; anything further out is refused.
RANGE_RELATIVE_TOLERANCE = 1e-4

STABLE_DIFFUSION_TRAINING_SCHEDULE = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "trained_betas": None,
    "rescale_betas_zero_snr": False,
}


@dataclass(frozen=True)
class NamedSchedule:
    """``noise_levels``: where the model is called (descending, without the final level); ``training_schedule``:
    the VP config keys the levels are made for; ``source``: where they come from."""

    noise_levels: tuple[float, ...]
    training_schedule: Mapping[str, Any]
    source: str


# `python benchmarks/fast_samplers.py --fit-schedule` reproduces these levels: optimize_timesteps(method="ld3") for
# DPM-Solver++ 2M (TimeShiftScheduler with window_size=0) on SD 1.x's schedule, 10 steps, the eight laws of
# law_family(seed=1) as one objective (each law's distance to a 200-step teacher, 128 noise samples per law, relative
# to its value on the "ays" table the search starts from): 0.38 of the start after 10 sweeps. On the held-out family
# (law_family(seed=0), 8192 samples) it did not beat "ays": median excess-SW2 ratio to DEIS at NFE 5 / 10 for
# DPM-Solver++ 2M 0.60 / 0.86 (on "ays": 0.52 / 0.85), for TimeShift 0.48 / 0.43 (0.41 / 0.41); only ER-SDE with
# noise_scale="reverse_sde" gained at NFE 10, 0.27 (0.33).
FAMILY_LD3_LEVELS = (14.6146, 9.0115, 5.1751, 2.9708, 1.9981, 1.3439, 0.8798, 0.576, 0.3569, 0.1826)

NAMED_SCHEDULES = {
    "ays": NamedSchedule(
        tuple(AysSchedules["StableDiffusionSigmas"][:-1]), STABLE_DIFFUSION_TRAINING_SCHEDULE,
        "Align Your Steps, Stable Diffusion 1.5 (diffusers.schedulers.AysSchedules['StableDiffusionSigmas'])",
    ),
    "ays_sdxl": NamedSchedule(
        tuple(AysSchedules["StableDiffusionXLSigmas"][:-1]), STABLE_DIFFUSION_TRAINING_SCHEDULE,
        "Align Your Steps, SDXL (diffusers.schedulers.AysSchedules['StableDiffusionXLSigmas'])",
    ),
    "family_ld3": NamedSchedule(
        FAMILY_LD3_LEVELS, STABLE_DIFFUSION_TRAINING_SCHEDULE,
        "LD3 fitted once on the oracle family law_family(seed=1) (benchmarks/fast_samplers.py --fit-schedule)",
    ),
}


# The default for each training schedule, chosen by measurement on the oracle family (benchmarks/fast_samplers.py):
# on SD's, "ays" instead of timestep_spacing takes ER-SDE's median excess-SW2 ratio to DEIS at NFE 5 / 10 from
# 1.08 / 0.99 to 0.63 / 0.54 (better on all 16 law-NFE pairs); "ays_sdxl" and "family_ld3" are no better overall.
DEFAULT_SCHEDULES = (("ays", STABLE_DIFFUSION_TRAINING_SCHEDULE),)


def default_schedule_name(scheduler_config: Mapping[str, Any]) -> str | None:
    """The named schedule ``"auto"`` stands for under ``scheduler_config``'s training schedule (``None``: none)."""
    return next((name for name, schedule in DEFAULT_SCHEDULES if has_training_schedule(scheduler_config, schedule)),
                None)


def has_training_schedule(scheduler_config: Mapping[str, Any], training_schedule: Mapping[str, Any]) -> bool:
    """Whether ``scheduler_config`` trains on ``training_schedule`` (floats compared to a relative 1e-9)."""
    for key, expected in training_schedule.items():
        value = scheduler_config.get(key)
        if isinstance(expected, float) and isinstance(value, (int, float)):
            if not math.isclose(value, expected, rel_tol=1e-9):
                return False
        elif value != expected:
            return False
    return True


def clip_to_range(levels: np.ndarray, low: float, high: float, name: str) -> np.ndarray:
    """``levels`` clipped to ``[low, high]``; a level beyond it by more than ``RANGE_RELATIVE_TOLERANCE`` raises."""
    if (levels > high * (1 + RANGE_RELATIVE_TOLERANCE)).any() or (levels < low * (1 - RANGE_RELATIVE_TOLERANCE)).any():
        raise ValueError(
            f"{name} must lie in the schedule's range of noise levels [{low:.6g}, {high:.6g}], "
            f"got [{levels.min():.6g}, {levels.max():.6g}]"
        )
    return levels.clip(low, high)


def sampling_schedule_levels(
    sampling_schedule: str | Sequence[float] | None, scheduler_config: Mapping[str, Any], low: float, high: float
) -> np.ndarray | None:
    """The noise levels ``sampling_schedule`` names or lists, checked against the training schedule of
    ``scheduler_config`` (whose noise levels span ``[low, high]``); ``None`` when it is ``None``.

    A list may end with diffusers' final ``0.0`` (as ``AysSchedules`` tables do): the final level is the scheduler's
    ``final_sigmas_type``, so it is dropped."""
    if sampling_schedule == "auto":
        sampling_schedule = default_schedule_name(scheduler_config)
    if sampling_schedule is None:
        return None
    if isinstance(sampling_schedule, str):
        if sampling_schedule not in NAMED_SCHEDULES:
            raise ValueError(f"sampling_schedule must be 'auto', one of {sorted(NAMED_SCHEDULES)}, a list of noise "
                             f"levels or None, got {sampling_schedule!r}")
        named = NAMED_SCHEDULES[sampling_schedule]
        if not has_training_schedule(scheduler_config, named.training_schedule):
            raise ValueError(f"sampling_schedule={sampling_schedule!r} is made for the training schedule "
                             f"{dict(named.training_schedule)}, which this config does not have")
        levels = np.array(named.noise_levels, dtype=np.float64)
    else:
        try:
            levels = np.array(sampling_schedule, dtype=np.float64)
        except (TypeError, ValueError) as error:
            raise ValueError(f"sampling_schedule must be a name or a list of noise levels, got {sampling_schedule!r}") \
                from error
        if levels.ndim != 1:
            raise ValueError(f"sampling_schedule must be a flat list of noise levels, got shape {levels.shape}")
        if len(levels) > 1 and levels[-1] == 0:
            levels = levels[:-1]
    if len(levels) < 2 or not np.isfinite(levels).all() or not (np.diff(levels) < 0).all():
        raise ValueError(f"sampling_schedule must list at least two finite, strictly decreasing noise levels, "
                         f"got {levels.tolist()}")
    levels = clip_to_range(levels, low, high, "sampling_schedule")
    if not (np.diff(levels) < 0).all():
        raise ValueError(f"sampling_schedule has several levels beyond the schedule's range, got {levels.tolist()}")
    return levels
