"""DiffusionMBIR ("Solving 3D Inverse Problems using Pre-trained 2D Diffusion Models", arXiv 2211.10655) on held-out
volumes with the shipped tiny slice prior, against the classical baseline and the same prior slice by slice.

    python benchmarks/volume_inverse.py [--volumes 2] [--steps 50] [--tune] [--memory-size 128]

For each task of ``pipelines/three_d/volume_demo.TASKS`` (8-view sparse CT, 90-degree limited-angle CT with 90 views,
4x through-plane super-resolution) and each held-out volume (``training/volume_data.held_out_volumes``: ellipsoid
phantoms and smoothed blobs, 32^3), three reconstructions:

- the classical baseline: filtered back-projection (CT) or linear interpolation along z (super-resolution);
- slice-wise: the 2D prior with data consistency after every step and no TV (``lambda_tv = 0``), the paper's
  ablation;
- DiffusionMBIR: the same with ADMM-TV across the slices, at the task's ``rho`` / ``lambda_tv``.

Scores: PSNR and SSIM over the volume and the mean absolute error of the gradient across the prior's slices (along
the TV's axis: z for CT, y for super-resolution); mean and standard error over volumes. ``--tune`` first grid-searches
``rho`` and ``lambda_tv`` per task on a training volume (never a held-out one) and prints the best; ``TASKS`` holds
the values chosen that way. Last, peak memory: the pipeline on a ``--memory-size``^3 volume (8-view CT), resident
memory after every step, for two step counts: it must not grow with the number of steps.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import re
import time
from pathlib import Path

import torch

from diffusers_ext.pipelines.three_d.volume_demo import (
    METHODS,
    NUM_INFERENCE_STEPS,
    TASKS,
    VOLUME_SIZE,
    VolumeTask,
    load_volume_pipeline,
    reconstruct,
    volume_scores,
)
from diffusers_ext.training.volume_data import held_out_volumes, training_volume

KINDS = ("phantom", "blobs")
# rho must be of the order of A^T A's scale (the carried ADMM state diverges otherwise): about 8 x 32 for 8 views of
# 32-pixel slices, 90 x 32 for 90 views, 1 for keeping slices. The TV weight is in the volume's units.
GRIDS = {"sparse-view": ((3.0, 10.0, 50.0), (0.01, 0.04, 0.2, 1.0, 5.0)),
         "limited-angle": ((10.0, 50.0, 300.0), (0.01, 0.04, 0.2, 1.0, 5.0)),
         "sr": ((0.03, 0.1, 0.3), (0.003, 0.01, 0.03))}


def mean_and_standard_error(values: list[float]) -> tuple[float, float]:
    mean = sum(values) / len(values)
    if len(values) < 2:
        return mean, float("nan")
    variance = sum((v - mean) ** 2 for v in values) / (len(values) - 1)
    return mean, math.sqrt(variance / len(values))


def tune(pipe, steps: int, kinds: tuple[str, ...]) -> dict[str, dict[str, float]]:
    """The ``(rho, lambda_tv)`` of each task's grid with the best mean PSNR on training volume 0 of each of
    ``kinds``."""
    best = {}
    volumes = [training_volume(kind, 0, VOLUME_SIZE) for kind in kinds]
    for task in TASKS.values():
        results = []
        rho_grid, lambda_grid = GRIDS[task.name]
        for rho in rho_grid:
            for lambda_tv in lambda_grid:
                candidate = VolumeTask(task.name, task.description, task.axis, rho, lambda_tv)
                psnrs = []
                for truth in volumes:
                    operator = candidate.operator(VOLUME_SIZE)
                    volume = reconstruct(pipe, candidate, operator.forward(truth), operator, tuple(truth.shape),
                                         "DiffusionMBIR", num_inference_steps=steps)
                    psnrs.append(volume_scores(volume, truth, task.axis)["psnr"])
                results.append((sum(psnrs) / len(psnrs), rho, lambda_tv))
                print(f"tune {task.name}: rho {rho:g}, lambda_tv {lambda_tv:g}: PSNR {results[-1][0]:.2f} dB")
        psnr, rho, lambda_tv = max(results)
        best[task.name] = {"rho": rho, "lambda_tv": lambda_tv, "training_psnr": round(psnr, 2)}
        print(f"best for {task.name}: {best[task.name]}")
    return best


def compare(pipe, steps: int, count: int) -> dict[str, dict[str, dict[str, list[float]]]]:
    """Every method's scores on ``count`` held-out volumes of each kind, per task."""
    scores: dict[str, dict[str, dict[str, list[float]]]] = {}
    for task in TASKS.values():
        for kind in KINDS:
            for index, truth in enumerate(held_out_volumes(kind, count, VOLUME_SIZE)):
                truth = truth.float()
                operator = task.operator(VOLUME_SIZE)
                measurement = operator.forward(truth)
                for method in METHODS:
                    volume = reconstruct(pipe, task, measurement, operator, tuple(truth.shape), method,
                                         num_inference_steps=steps, seed=index)
                    for name, value in volume_scores(volume, truth, task.axis).items():
                        scores.setdefault(task.name, {}).setdefault(method, {}).setdefault(name, []).append(value)
                print(f"{task.name} {kind} {index}: " + ", ".join(
                    f"{m} {scores[task.name][m]['psnr'][-1]:.2f} dB" for m in METHODS))
    return scores


def table(scores) -> str:
    lines = ["| task | method | PSNR (dB) | SSIM | mean abs. gradient error across slices |",
             "| --- | --- | --- | --- | --- |"]
    for name, methods in scores.items():
        for method, values in methods.items():
            cells = []
            for metric, digits in (("psnr", 2), ("ssim", 3), ("gradient_error", 4)):
                mean, error = mean_and_standard_error(values[metric])
                cells.append(f"{mean:.{digits}f} ± {error:.{digits}f}")
            label = {"baseline": "FBP" if name != "sr" else "linear interpolation along z"}.get(method, method)
            lines.append(f"| {TASKS[name].description} | {label} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def resident_megabytes(field: str = "VmRSS") -> float:
    """This process's resident memory (``VmRSS``) or its peak so far (``VmHWM``), MB, from ``/proc/self/status``."""
    status = Path("/proc/self/status").read_text()
    return int(re.search(rf"^{field}:\s+(\d+) kB", status, re.MULTILINE).group(1)) / 1024


def live_tensor_megabytes() -> float:
    """The storage of every tensor the garbage collector can reach (parameters included), MB: what the pipeline
    holds, free of the allocator's caching, which makes resident memory wander by tens of MB between steps."""
    storages = {}
    for item in gc.get_objects():
        if isinstance(item, torch.Tensor) and item.layout == torch.strided:  # the operator's sparse matrix is fixed
            storage = item.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values()) / 2**20


def memory(pipe, size: int, step_counts: tuple[int, ...] = (2, 6), slice_batch_size: int = 16) -> dict:
    """Resident memory and live tensor memory after every step of 8-view CT on a ``size``^3 volume, for each step
    count, and the peak resident memory."""
    task = TASKS["sparse-view"]
    truth = torch.rand(size, size, size, generator=torch.Generator().manual_seed(0))
    operator = task.operator(size)
    measurement = operator.forward(truth)
    before = resident_megabytes()
    report = {"size": size, "slice_batch_size": slice_batch_size, "resident_mb_before": round(before, 1)}
    for steps in step_counts:
        after_step, live = [], []

        def record(pipe, i, t, tensors, after_step=after_step, live=live):
            after_step.append(round(resident_megabytes(), 1))
            live.append(round(live_tensor_megabytes(), 2))
            return {}

        start = time.perf_counter()
        reconstruct(pipe, task, measurement, operator, (size, size, size), "DiffusionMBIR", num_inference_steps=steps,
                    slice_batch_size=slice_batch_size, callback_on_step_end=record)
        report[f"{steps} steps"] = {"resident_mb_after_each_step": after_step, "live_tensor_mb_after_each_step": live,
                                    "seconds": round(time.perf_counter() - start, 1)}
        print(f"{size}^3, {steps} steps: resident MB after each step {after_step}, live tensor MB {live}")
    report["peak_resident_mb"] = round(resident_megabytes("VmHWM"), 1)
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--volumes", type=int, default=2, help="held-out volumes of each kind per task")
    parser.add_argument("--steps", type=int, default=NUM_INFERENCE_STEPS)
    parser.add_argument("--tune", action="store_true", help="grid-search rho / lambda_tv on training volumes first")
    parser.add_argument("--tune-kinds", nargs="+", default=["phantom"], choices=KINDS)
    parser.add_argument("--tune-only", action="store_true", help="print the tuned settings and stop")
    parser.add_argument("--memory-size", type=int, default=128, help="side of the memory test's volume (0: skip)")
    parser.add_argument("--memory-only", action="store_true", help="only the memory test")
    parser.add_argument("--output", default="benchmarks/results")
    args = parser.parse_args()
    torch.set_num_threads(1)
    pipe = load_volume_pipeline()
    pipe.set_progress_bar_config(disable=True)
    report = {"steps": args.steps, "volumes_per_kind": args.volumes,
              "settings": {name: {"rho": t.rho, "lambda_tv": t.lambda_tv, "axis": t.axis} for name, t in TASKS.items()}}
    if args.memory_only:
        report = {"memory": memory(pipe, args.memory_size)}
        print(json.dumps(report, indent=2))
        return
    if args.tune:
        tuned = tune(pipe, args.steps, tuple(args.tune_kinds))
        report["tuned_on_training_volumes"] = tuned
        if args.tune_only:
            print(json.dumps(tuned, indent=2))
            return
        for name, best in tuned.items():  # the comparison below runs at the tuned settings
            task = TASKS[name]
            TASKS[name] = VolumeTask(task.name, task.description, task.axis, best["rho"], best["lambda_tv"])
        report["settings"] = {name: {"rho": t.rho, "lambda_tv": t.lambda_tv, "axis": t.axis}
                              for name, t in TASKS.items()}
    scores = compare(pipe, args.steps, args.volumes)
    report["scores"] = scores
    markdown = table(scores)
    print("\n" + markdown)
    if args.memory_size:
        report["memory"] = memory(pipe, args.memory_size)
    output = Path(args.output)
    output.mkdir(parents=True, exist_ok=True)
    (output / "volume_inverse.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    (output / "volume_inverse.md").write_text(markdown + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/volume_inverse.json and volume_inverse.md")


if __name__ == "__main__":
    main()
