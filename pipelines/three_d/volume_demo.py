"""The ``3d_inverse`` part of ``diffusers-ext demo`` and the work of ``diffusers-ext 3d reconstruct``: the shipped tiny
slice prior (``tiny-slice-prior``) reconstructs held-out volumes with ``DiffusionMBIRPipeline`` (DiffusionMBIR, arXiv
2211.10655) from 8-view sparse CT, 90-degree limited-angle CT and every 4th slice, next to the classical baseline
(filtered back-projection, or linear interpolation along z) and the same prior slice by slice without the z-TV (the
paper's ablation), with PSNR / SSIM over the volume and the mean absolute error of the gradient across the slices.

Each task's settings (``TASKS``: operator, slicing axis, ``rho``, ``lambda_tv``) were chosen on training volumes by
``benchmarks/volume_inverse.py --tune`` and are used unchanged by the demo, the command and the benchmark.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ...shipped import load_pipeline_or_shipped
from .pipeline_diffusion_mbir import DiffusionMBIRPipeline
from .volume_operators import (
    ParallelBeamProjection,
    ThroughPlaneDownsampling,
    filtered_back_projection,
    interpolate_through_plane,
    limited_angle_angles,
    sparse_view_angles,
)

SHIPPED_SLICE_PRIOR = "tiny-slice-prior"
VOLUME_SIZE = 32  # the shipped prior's slices are 32 x 32
LIMITED_ANGLE_VIEWS = 90  # one view per degree over the 90-degree wedge, as in the paper
NUM_INFERENCE_STEPS = 50


@dataclass(frozen=True)
class VolumeTask:
    """One inverse problem: how its operator is built, the classical baseline, and DiffusionMBIR's settings.
    ``axis`` is the volume dim the prior's slices are taken along and the TV runs across (dim 1 for through-plane
    super-resolution: the prior then sees every 4th row of each slice, not empty slices)."""

    name: str
    description: str
    axis: int
    rho: float
    lambda_tv: float

    def operator(self, size: int, views: int | None = None, factor: int | None = None) -> Any:
        if self.name == "sparse-view":
            return ParallelBeamProjection(sparse_view_angles(views or 8), size)
        if self.name == "limited-angle":
            return ParallelBeamProjection(limited_angle_angles(views or LIMITED_ANGLE_VIEWS, math.pi / 2), size)
        return ThroughPlaneDownsampling(factor or 4)

    @staticmethod
    def baseline(measurement: torch.Tensor, operator: Any) -> torch.Tensor:
        """Filtered back-projection for CT, linear interpolation along z for through-plane super-resolution."""
        if isinstance(operator, ThroughPlaneDownsampling):
            return interpolate_through_plane(measurement, operator)
        return filtered_back_projection(measurement, operator)


# Chosen by PSNR on training phantom 0 at 50 steps over benchmarks/volume_inverse.GRIDS (the limited-angle lambda at
# the grid's largest value).
TASKS = {
    "sparse-view": VolumeTask("sparse-view", "8-view sparse CT", axis=0, rho=10.0, lambda_tv=1.0),
    "limited-angle": VolumeTask("limited-angle", "90-degree limited-angle CT", axis=0, rho=50.0, lambda_tv=5.0),
    "sr": VolumeTask("sr", "4x through-plane super-resolution", axis=1, rho=0.1, lambda_tv=0.01),
}
METHODS = ("baseline", "slice-wise", "DiffusionMBIR")


def load_volume_pipeline(model: str | Path | None = None, trust_remote_code: bool = False) -> DiffusionMBIRPipeline:
    """The shipped slice prior (``model=None``), or a ``DiffusionMBIRPipeline`` from a folder or Hub id."""
    return load_pipeline_or_shipped(DiffusionMBIRPipeline, SHIPPED_SLICE_PRIOR, model, trust_remote_code)


def volume_scores(reconstruction: torch.Tensor, truth: torch.Tensor, axis: int = 0) -> dict[str, float]:
    """PSNR (dB, peak 1) and SSIM (scikit-image's, 3D Gaussian window of 11 voxels; NaN for a volume with a side
    below 11) over the volume, and the mean absolute error of the finite difference across the slices along ``axis``
    (how well neighbouring slices agree)."""
    from skimage.metrics import peak_signal_noise_ratio, structural_similarity

    estimate, reference = (np.asarray(v.detach().cpu(), dtype=np.float64) for v in (reconstruction, truth))
    gradient_error = np.abs(np.diff(estimate, axis=axis) - np.diff(reference, axis=axis)).mean()
    return {"psnr": float(peak_signal_noise_ratio(reference, estimate, data_range=1.0)),
            "ssim": float(structural_similarity(reference, estimate, data_range=1.0, gaussian_weights=True,
                                                sigma=1.5, use_sample_covariance=False))
            if min(reference.shape) >= 11 else float("nan"),
            "gradient_error": float(gradient_error)}


def reconstruct(pipe: DiffusionMBIRPipeline, task: VolumeTask, measurement: torch.Tensor, operator: Any,
                volume_shape: tuple[int, int, int], method: str, num_inference_steps: int = NUM_INFERENCE_STEPS,
                seed: int = 0, **pipeline_kwargs: Any) -> torch.Tensor:
    """One reconstruction ``(D, H, W)`` by ``method``: ``"baseline"``, ``"slice-wise"`` (``lambda_tv = 0``) or
    ``"DiffusionMBIR"`` (the task's ``rho`` and ``lambda_tv``)."""
    if method == "baseline":
        return task.baseline(measurement, operator)
    lambda_tv = 0.0 if method == "slice-wise" else task.lambda_tv
    settings = {"rho": task.rho, "lambda_tv": lambda_tv, "axis": task.axis, "slice_batch_size": 64,
                **pipeline_kwargs}
    return pipe(measurement, operator, volume_shape, num_inference_steps=num_inference_steps,
                generator=torch.Generator().manual_seed(seed), output_type="pt", **settings).volume.float()


def reconstruct_volume_file(input_path: str | Path, output_path: str | Path, views: int = 8,
                            limited_angle: bool = False, sr: int | None = None,
                            num_inference_steps: int = NUM_INFERENCE_STEPS,
                            seed: int = 0, model: str | None = None, trust_remote_code: bool = False,
                            lambda_tv: float | None = None, rho: float | None = None) -> dict[str, Any]:
    """``diffusers-ext 3d reconstruct``: measure the volume in ``input_path`` (``(D, H, W)`` in ``[0, 1]``) with the
    task's operator, reconstruct it with DiffusionMBIR and write the reconstruction to ``output_path`` (``.npy``,
    float32); returns the scores of the reconstruction and of the classical baseline against the input, and the
    seconds it took."""
    start = time.perf_counter()
    truth = torch.from_numpy(np.load(input_path).astype(np.float32))
    name = "sr" if sr else "limited-angle" if limited_angle else "sparse-view"
    task = TASKS[name]
    if lambda_tv is not None or rho is not None:
        task = VolumeTask(task.name, task.description, task.axis, task.rho if rho is None else rho,
                          task.lambda_tv if lambda_tv is None else lambda_tv)
    operator = task.operator(truth.shape[-1], views=views, factor=sr)
    measurement = operator.forward(truth)
    pipe = load_volume_pipeline(model, trust_remote_code)
    volume = reconstruct(pipe, task, measurement, operator, tuple(truth.shape), "DiffusionMBIR",
                         num_inference_steps=num_inference_steps, seed=seed)
    output_path = Path(output_path)
    output_path.parent.mkdir(parents=True, exist_ok=True)
    partial = output_path.with_name(output_path.name + ".partial.npy")
    np.save(partial, volume.numpy().astype(np.float32))
    partial.replace(output_path)  # whole or not at all
    baseline = task.baseline(measurement, operator)
    return {"task": task.description, "DiffusionMBIR": volume_scores(volume, truth, task.axis),
            "baseline": volume_scores(baseline, truth, task.axis), "seconds": time.perf_counter() - start}


def orthogonal_slices(volumes: dict[str, torch.Tensor], truth: torch.Tensor, path: Path, title: str) -> None:
    """A figure: one column per reconstruction (PSNR in its title), the central axial, coronal and sagittal slices in
    its rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(3, len(volumes), figsize=(2.2 * len(volumes), 6.6), squeeze=False)
    for column, (name, volume) in enumerate(volumes.items()):
        label = name if name == "ground truth" else f"{name}\n{volume_scores(volume, truth)['psnr']:.2f} dB"
        volume = volume.detach().cpu().float().clamp(0, 1)  # for display only
        centre = [n // 2 for n in volume.shape]
        views = (volume[centre[0]], volume[:, centre[1]], volume[:, :, centre[2]])
        for row, (view, plane) in enumerate(zip(views, ("axial (z)", "coronal", "sagittal"), strict=True)):
            axis = axes[row][column]
            axis.imshow(view.numpy(), cmap="gray", vmin=0, vmax=1)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(label, fontsize=9)
            if column == 0:
                axis.set_ylabel(plane, fontsize=9)
    figure.suptitle(title, fontsize=10)
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)


def run_volume_demo(output: Path, num_inference_steps: int = NUM_INFERENCE_STEPS,
                    pipe: DiffusionMBIRPipeline | None = None, kinds: tuple[str, ...] = ("phantom", "blobs"),
                    size: int = VOLUME_SIZE) -> dict[str, dict[str, dict[str, float]]]:
    """For each task, one held-out volume of each of ``kinds`` (``size``^3) reconstructed by every method:
    ``<task>_<kind>.png`` (orthogonal slices with PSNR) and ``scores.json`` in ``output``; the table is printed.
    Returns the scores."""
    import json

    from ...training.volume_data import held_out_volumes

    output.mkdir(parents=True, exist_ok=True)
    pipe = pipe or load_volume_pipeline()
    pipe.set_progress_bar_config(disable=True)
    scores: dict[str, dict[str, dict[str, float]]] = {}
    print(f"{'task':<58}{'method':<15}{'PSNR (dB)':>10}{'SSIM':>8}{'|grad err|':>12}")
    for kind in kinds:
        truth = held_out_volumes(kind, 1, size)[0].float()
        for task in TASKS.values():
            operator = task.operator(size)
            measurement = operator.forward(truth)
            volumes = {"ground truth": truth}
            for method in METHODS:
                volume = reconstruct(pipe, task, measurement, operator, tuple(truth.shape), method,
                                     num_inference_steps=num_inference_steps)
                volumes["FBP" if method == "baseline" and task.name != "sr" else
                        "z-interpolation" if method == "baseline" else method] = volume
                row = volume_scores(volume, truth, task.axis)
                scores.setdefault(f"{task.name}/{kind}", {})[method] = row
                print(f"{task.description + ', ' + kind:<58}{method:<15}{row['psnr']:>10.2f}{row['ssim']:>8.3f}"
                      f"{row['gradient_error']:>12.4f}")
            orthogonal_slices(volumes, truth, output / f"{task.name}_{kind}.png",
                              f"{task.description}, held-out {kind} volume")
    (output / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    print(f"\nwritten to {output}/: one figure per task and volume kind, scores.json")
    return scores
