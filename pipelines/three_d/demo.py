"""The ``3d`` part of ``diffusers-ext demo``, on exact oracles (nothing trained, nothing downloaded):

- score distillation: ``ScoreDistillation`` with SDS (DreamFusion, arXiv 2209.14988) and SDI (arXiv 2405.15891)
  against ``ViewConditionedGaussianPrior``, the exact noise prediction of a Gaussian law around a target shape's
  renders, each writing its mesh and turntable; the voxel IoU with the target says how much of the shape came back;
- multi-view sampling: ``MultiViewDiffusionPipeline`` with the exact joint denoiser of view sets of two shapes
  (``MultiViewMixtureDenoiser``, MVDream's setting, arXiv 2308.16512) next to the same law sampled view by view,
  as view grids; the fraction of objects whose views all show one shape says whether the views were kept together;
- the shipped multi-view model (``tiny-mvdream-shapes``): its view sets next to its 2D base model's views sampled one
  by one, as view grids, with their colour spread across each set's views.
"""

from __future__ import annotations

import importlib.util
import json
import time
from pathlib import Path

import PIL.Image
import torch

from ...testing import ViewConditionedGaussianPrior
from .mesh_export import export_mesh, export_turntable
from .pipeline_multiview import MultiViewDiffusionPipeline, view_grid
from .rendering import VoxelGrid, orbit_cameras, render, voxel_iou
from .score_distillation import METHODS, ScoreDistillation
from .shapes import Box, Cylinder, Sphere, voxelize

NUM_VIEWS = 4
GRID_SCALE = 4  # the view grids' pixels are enlarged (nearest neighbour) so that 16-pixel views can be seen
SHIPPED_MULTIVIEW_MODEL = "tiny-mvdream-shapes"


def target_shape(resolution: int) -> VoxelGrid:
    """The distillation target of docs/three_d.md: a red sphere on a blue box."""
    return voxelize([Sphere((0, 0.1, 0), 0.35, (0.9, 0.2, 0.1)), Box((0, -0.3, 0), (0.4, 0.15, 0.3), (0.1, 0.3, 0.9))],
                    resolution=resolution)


def multiview_shapes(resolution: int) -> list[VoxelGrid]:
    """Two shapes that differ from every side: the sphere on a box, and a green cylinder beside a yellow box."""
    return [target_shape(resolution),
            voxelize([Cylinder((-0.25, 0, 0), 0.2, 0.5, (0.1, 0.7, 0.2)), Box((0.35, -0.2, 0.1), (0.2, 0.2, 0.2),
                                                                             (0.9, 0.8, 0.1))], resolution=resolution)]


def distill(method: str, target: VoxelGrid, num_iterations: int, size: int, resolution: int,
            seed: int = 0) -> VoxelGrid:
    """``method`` ("sds" or "sdi") from a blank grid against the exact prior around ``target`` (std 0.1, no
    guidance: the oracle has no unconditional model), with docs/three_d.md's settings."""
    prior = ViewConditionedGaussianPrior([target], size, size, std=0.1)
    distillation = ScoreDistillation(prior, method=method, guidance_scale=1.0, inversion_guidance_scale=1.0)
    return distillation("", VoxelGrid(resolution=resolution), num_iterations=num_iterations, height=size, width=size,
                        learning_rate=0.1, generator=torch.Generator().manual_seed(seed),
                        show_progress=False).representation


@torch.no_grad()
def comparison_figure(grids: dict[str, VoxelGrid], titles: dict[str, str], path: Path, size: int = 64) -> None:
    """One column per grid (its title above), its renders from the front, side and back in the rows."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    cameras = orbit_cameras(NUM_VIEWS)[:3]
    figure, axes = plt.subplots(3, len(grids), figsize=(2.0 * len(grids), 6.0), squeeze=False)
    for column, (name, grid) in enumerate(grids.items()):
        images = render(grid, cameras, size, size).clamp(0, 1).permute(0, 2, 3, 1).numpy()
        for row, image in enumerate(images):
            axis = axes[row][column]
            axis.imshow(image)
            axis.set_xticks([])
            axis.set_yticks([])
            if row == 0:
                axis.set_title(titles[name], fontsize=9)
            if column == 0:
                axis.set_ylabel(("front", "side", "back")[row], fontsize=9)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)


def sample_view_sets(shapes: list[VoxelGrid], joint: bool, num_objects: int, size: int, num_inference_steps: int,
                     seed: int = 0) -> tuple[torch.Tensor, float]:
    """``num_objects`` view sets from the law of the shapes' orbit renders (variance 0.01), with the exact joint
    denoiser or view by view; returns the views ``(B N, 3, H, W)`` in [0, 1] and the fraction of sets whose views
    all show one shape."""
    from diffusers import DDIMScheduler

    from ...testing.multiview_oracle import MultiViewMixtureDenoiser, nearest_shapes, one_shape_fraction

    with torch.no_grad():
        renders = torch.stack([render(shape, orbit_cameras(NUM_VIEWS), size, size) for shape in shapes]) * 2 - 1
    scheduler = DDIMScheduler()
    oracle = MultiViewMixtureDenoiser(renders.tolist(), 0.01, joint=joint, scheduler_config=scheduler.config)
    pipe = MultiViewDiffusionPipeline(unet=oracle, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    out = pipe(num_objects_per_prompt=num_objects, num_inference_steps=num_inference_steps, guidance_scale=1.0,
               output_type="pt", generator=torch.Generator().manual_seed(seed))
    fraction = one_shape_fraction(nearest_shapes(out.images * 2 - 1, renders))
    return out.images, fraction


def save_view_grid(views: torch.Tensor, path: Path) -> None:
    """Views ``(B N, 3, H, W)`` in [0, 1] as a grid enlarged ``GRID_SCALE`` times: one row per object."""
    pixels = (views.clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
    grid = view_grid([PIL.Image.fromarray(view) for view in pixels], NUM_VIEWS)
    grid.resize((grid.width * GRID_SCALE, grid.height * GRID_SCALE), resample=0).save(path)


def sample_shipped_model(output: Path, num_objects: int, num_inference_steps: int, seed: int = 0) -> dict[str, float]:
    """``views_shipped.png`` and ``views_shipped_base.png``: ``num_objects`` view sets of the shipped multi-view
    model and of its 2D base model sampled view by view (the recipe's comparison, DDPM from the default orbit).
    Returns each one's colour spread (the mean distance between the mean foreground colours of one set's views)."""
    from diffusers import UNet2DConditionModel

    from ...shipped import load_shipped_pipeline, shipped_model_path
    from ...training.recipes import tiny_multiview_shapes as recipe

    pipe = load_shipped_pipeline(SHIPPED_MULTIVIEW_MODEL)
    pipe.set_progress_bar_config(disable=True)
    base = UNet2DConditionModel.from_pretrained(shipped_model_path(SHIPPED_MULTIVIEW_MODEL),
                                                subfolder=recipe.BASE_UNET_FOLDER)
    cameras = orbit_cameras(NUM_VIEWS, elevation=recipe.EVAL_ELEVATION)
    scores = {}
    for name, sampler in (("shipped", pipe), ("shipped_base", recipe.per_view_pipeline(base))):
        views = recipe.sample_views(sampler, num_objects * NUM_VIEWS, num_inference_steps, seed, cameras)
        save_view_grid(views, output / f"views_{name}.png")
        scores[f"{name}_colour_spread"] = recipe.view_set_figures(views, NUM_VIEWS)["colour_spread"]
    return scores


def run_3d_demo(output: Path, num_iterations: int = 100, size: int = 16, resolution: int = 12,
                turntable_size: int = 64, num_objects: int = 8, num_inference_steps: int = 20,
                shipped_inference_steps: int = 50) -> dict[str, float]:
    """Writes to ``output``: ``sds/`` and ``sdi/`` (``mesh.glb``, ``turntable.gif``), ``distillation.png``
    (target / SDS / SDI renders with their voxel IoU), ``views_joint.png`` and ``views_per_view.png`` (one row per
    object, one column per view), the shipped model's ``views_shipped.png`` and ``views_shipped_base.png``
    (``sample_shipped_model``) and ``scores.json``; the table is printed. Returns the scores."""
    output.mkdir(parents=True, exist_ok=True)
    # trimesh is an optional dependency ([three_d], in [dev]): without it the demo writes everything but the meshes
    write_meshes = importlib.util.find_spec("trimesh") is not None
    target = target_shape(resolution)
    grids, titles, scores = {"target": target}, {"target": "target"}, {}
    print(f"{'part':<44}{'result':>30}{'seconds':>9}")
    for method in METHODS:
        start = time.perf_counter()
        grid = distill(method, target, num_iterations, size, resolution)
        export_turntable(grid, output / method / "turntable.gif", size=turntable_size)
        if write_meshes:
            export_mesh(grid, output / method / "mesh.glb")
        scores[f"{method}_voxel_iou"] = voxel_iou(grid.occupancy(), target.occupancy())
        grids[method], titles[method] = grid, f"{method.upper()}, IoU {scores[f'{method}_voxel_iou']:.2f}"
        print(f"{method.upper() + f', {num_iterations} iterations on the exact prior':<44}"
              f"{'voxel IoU ' + format(scores[f'{method}_voxel_iou'], '.3f'):>30}{time.perf_counter() - start:>9.1f}")
    comparison_figure(grids, titles, output / "distillation.png")
    shapes = multiview_shapes(resolution)
    for joint, name in ((True, "joint"), (False, "per_view")):
        start = time.perf_counter()
        images, fraction = sample_view_sets(shapes, joint, num_objects, size, num_inference_steps)
        scores[f"{name}_one_shape_fraction"] = fraction
        save_view_grid(images, output / f"views_{name}.png")
        label = "joint multi-view sampling" if joint else "each view sampled on its own"
        print(f"{label + ', ' + str(num_objects) + ' objects':<44}"
              f"{f'{round(fraction * num_objects)}/{num_objects} sets of one shape':>30}"
              f"{time.perf_counter() - start:>9.1f}")
    start = time.perf_counter()
    shipped = sample_shipped_model(output, num_objects, shipped_inference_steps)
    scores.update(shipped)
    print(f"{'shipped ' + SHIPPED_MULTIVIEW_MODEL + ', ' + str(num_objects) + ' objects':<44}"
          f"{'colour spread ' + format(shipped['shipped_colour_spread'], '.3f'):>30}"
          f"{time.perf_counter() - start:>9.1f}")
    print(f"{'its 2D base model, each view on its own':<44}"
          f"{'colour spread ' + format(shipped['shipped_base_colour_spread'], '.3f'):>30}")
    (output / "scores.json").write_text(json.dumps(scores, indent=2) + "\n", encoding="utf-8")
    if not write_meshes:
        print("\nno meshes written: mesh export needs trimesh (pip install 'diffusers-ext[three_d]')")
    print(f"\nwritten to {output}/: sds/ and sdi/ (mesh.glb, turntable.gif), distillation.png, views_joint.png, "
          "views_per_view.png, views_shipped.png, views_shipped_base.png, scores.json")
    return scores
