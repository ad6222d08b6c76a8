"""diffusers-ext's samplers against diffusers' built-ins on a family of exact oracles, and their step time.

    python benchmarks/fast_samplers.py                     # the family table (about 45 min on one busy core)
    python benchmarks/fast_samplers.py --num-samples 2048  # a quicker, noisier table
    python benchmarks/fast_samplers.py --fit-schedule      # refits sampling_schedules.FAMILY_LD3_LEVELS (~10 min)
    python benchmarks/fast_samplers.py --step-time-only

1. Excess sliced W2 over the noise floor at NFE 5 and 10 on each law of ``law_family(seed)`` (eight Gaussian
   mixtures in 2 to 256 dimensions; VP samplers under SD 1.x's schedule, flow-matching ones under SD3's), for
   diffusers' built-ins at their defaults, ours at their defaults and ours in their best configuration. Printed as
   the median and worst ratio to the best built-in on each law (and to DEIS), then per law; the rows go to
   ``fast_samplers_family.csv``. Every sampler starts from the same noise; at SD's schedule ``x_T ~ N(0, I)`` is not
   the exact marginal, so no VP sampler goes below the exact ODE's own excess (large on ``sharp-256d``).
2. ``--fit-schedule``: the schedule stored as ``sampling_schedules.FAMILY_LD3_LEVELS`` (``"family_ld3"``), fitted
   once by ``optimize_timesteps`` on the family drawn with seed 1 (the table evaluates seed 0).
3. ``step()`` time on SD-size latents (2 x 4 x 128 x 128) relative to ``DPMSolverMultistepScheduler.step()``.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch
from diffusers import (
    DPMSolverMultistepScheduler,
    FlowMatchHeunDiscreteScheduler,
)
from diffusers.utils import logging

from diffusers_ext.schedulers import ERSDESolverScheduler, RFSolverScheduler, TimeShiftScheduler, optimize_timesteps
from diffusers_ext.testing.sampler_accuracy import (
    BUILTIN_SCHEDULERS,
    SD3_SCHEDULER_CONFIG,
    SD_SCHEDULER_CONFIG,
    law_family,
    measure_law_family,
    oracle_for,
)

BUILTINS = BUILTIN_SCHEDULERS | {"FlowMatchHeun": FlowMatchHeunDiscreteScheduler}


def samplers() -> dict[str, object]:
    """The table's rows: built-ins (classes, so at their defaults), ours at their defaults, ours at diffusers-ext
    0.1's defaults, ours in other configurations, and DPM-Solver++ 2M on the AYS table (ours with no time shift)."""
    def er_sde(**kwargs):
        return ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, **kwargs)

    def time_shift(**kwargs):
        return TimeShiftScheduler.from_config(SD_SCHEDULER_CONFIG, **kwargs)

    return BUILTINS | {
        "ER-SDE (default)": er_sde(),
        "TimeShift (default)": time_shift(),
        "RF-Solver (default)": RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG),
        "ER-SDE, 0.1 default": er_sde(sampling_schedule=None),
        "TimeShift, 0.1 default": time_shift(base_scheduler="ddim", sampling_schedule=None),
        "ER-SDE reverse_sde": er_sde(noise_scale="reverse_sde"),
        "ER-SDE reverse_sde, family_ld3": er_sde(noise_scale="reverse_sde", sampling_schedule="family_ld3"),
        "ER-SDE ODE 3": er_sde(noise_scale="ode"),
        "TimeShift, ays_sdxl": time_shift(sampling_schedule="ays_sdxl"),
        "TimeShift, family_ld3": time_shift(sampling_schedule="family_ld3"),
        "DPM-Solver++ 2M on ays (no shift)": time_shift(window_size=0),
    }


def accuracy(num_samples: int, family_seed: int, output: Path) -> None:
    report = measure_law_family(samplers(), laws=law_family(family_seed), nfes=(5, 10), num_samples=num_samples)
    print(report.summary_table())
    print()
    print(report.summary_table("DEIS"))
    print()
    print(report.table())
    report.write_csv(output / "fast_samplers_family.csv")


def fit_family_schedule(num_inference_steps: int = 10, num_noise: int = 128) -> list[float]:
    """``sampling_schedules.FAMILY_LD3_LEVELS``: LD3 for DPM-Solver++ 2M (TimeShift with no shift) from the "ays"
    table, with the eight laws of the family drawn with seed 1 as one objective."""
    scheduler = TimeShiftScheduler.from_config(SD_SCHEDULER_CONFIG, window_size=0, sampling_schedule="ays")
    oracles = [oracle_for(law, scheduler.config).double() for law in law_family(seed=1).values()]
    generator = torch.Generator().manual_seed(1234)
    noise = [torch.randn(num_noise, *oracle.sample_shape, generator=generator, dtype=torch.float64)
             for oracle in oracles]
    models = [lambda x, t, oracle=oracle: oracle(x, t).sample for oracle in oracles]
    result = optimize_timesteps(scheduler, models, num_inference_steps, method="ld3", noise=noise, teacher_steps=200)
    print(f"objective by sweep (relative to the ays table): {[round(v, 4) for v in result.objective]}")
    print(f"noise levels: {[round(v, 4) for v in result.sigmas]}")
    return result.sigmas


def step_time(repeats: int = 30) -> None:
    shape = (2, 4, 128, 128)
    candidates = {
        "DPMSolverMultistep (baseline)": DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG),
        "SDE-DPMSolver++ (stochastic)": DPMSolverMultistepScheduler.from_config(
            SD_SCHEDULER_CONFIG, algorithm_type="sde-dpmsolver++"),
        "ERSDESolver order 3": ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG),
        "ERSDESolver order 3 (ODE)": ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, noise_scale="ode"),
        "TimeShift (DPM-Solver++)": TimeShiftScheduler.from_config(SD_SCHEDULER_CONFIG, base_scheduler="dpmsolver++"),
        "RFSolver": RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG),
    }
    generator = torch.Generator().manual_seed(0)
    sample, output = torch.randn(shape, generator=generator), torch.randn(shape, generator=generator)
    timings = {}
    for _ in range(3):  # interleaved rounds against drift
        for name, scheduler in candidates.items():
            scheduler.set_timesteps(repeats)
            start = time.perf_counter()
            for t in scheduler.timesteps[:repeats]:
                scheduler.step(output, t, sample)
            timings.setdefault(name, []).append((time.perf_counter() - start) / repeats)
    baseline = min(timings["DPMSolverMultistep (baseline)"])
    print(f"step() on {shape}, best of 3 rounds of {repeats} steps:")
    for name, values in timings.items():
        print(f"  {name:<32} {min(values) * 1e3:7.2f} ms   {min(values) / baseline:5.2f}x")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", type=Path, default=Path("benchmarks/results"))
    parser.add_argument("--num-samples", type=int, default=8192)
    parser.add_argument("--family-seed", type=int, default=0, help="which draw of the law family to evaluate on")
    parser.add_argument("--step-time-only", action="store_true")
    parser.add_argument("--fit-schedule", action="store_true", help="refit the stored family schedule and print it")
    args = parser.parse_args()
    args.output.mkdir(parents=True, exist_ok=True)
    logging.set_verbosity_error()
    if args.fit_schedule:
        fit_family_schedule()
        return
    step_time()
    if not args.step_time_only:
        accuracy(args.num_samples, args.family_seed, args.output)


if __name__ == "__main__":
    main()
