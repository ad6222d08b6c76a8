"""Train the tiny MVDream multi-view model that ships with the package, and measure its cross-view consistency.

    python -m diffusers_ext.training.recipes.tiny_multiview_shapes [--output diffusers_ext/assets/tiny-mvdream-shapes]
        [--budget full|smoke]

MVDream ("MVDream: Multi-view Diffusion for 3D Generation", Shi et al., arXiv 2308.16512) fine-tunes a 2D text-to-image
UNet into a multi-view one (self-attention across an object's views, a camera embedding added to the timestep
embedding) on rendered views of 3D objects, mixed with 2D images. Here, with no pretrained 2D model to start from:

1. the 2D base model: ``training.multiview.toy_unet`` (a 0.25 M-parameter pixel-space UNet, 16 x 16 RGB) trained whole
   on single views of random coloured shapes (``RenderedShapeViews``; every batch a 2D batch, so the model is the 2D
   UNet exactly), DDPM linear schedule, epsilon prediction, unconditional;
2. the multi-view model: that UNet made multi-view for 4 views (orbits at a random elevation in [0, 30] degrees and a
   random starting azimuth) and fine-tuned whole, as the paper fine-tunes its UNet, with the camera MLP, by
   ``MultiViewObjective`` (2D batches with the paper's probability 0.3) through the shared ``Trainer``.

Both stages draw from one pool of ``Budget.train_objects`` objects of the training seed, rendered once before training
(rendering on the fly would cost a third of the run), and keep an EMA of their weights, which is what ships.

Both are sampled with DDPM's ancestral sampler in 250 steps (``MultiViewDiffusionPipeline``; DDIM's deterministic
sampler leaves these small, briefly trained models' samples noisy), the base model with one view per object (each
view sampled on its own, a 2D model used per view), from the authors' default orbit (4 views, elevation 15 degrees),
and scored (``view_set_figures``) against real renders of held-out shapes from the same cameras:

- colour spread: per view set, the mean pairwise distance between its views' mean foreground colours (foreground:
  pixels at least 0.1 from the white background in some channel). The views of one object show the same coloured
  parts, so real sets have a small spread, views of different objects a large one;
- area spread: per view set, the standard deviation of the views' foreground fractions over their mean;
- sliced W2 between the generated single views and real ones (``testing.metrics.sliced_wasserstein2``), a check
  that the views look like renders at all, with the floor of real views against real views;
- held-out-view error (``held_out_view_error``): a voxel grid fitted to three views of a set
  (``rendering.fit_voxel_grid``) renders the fourth camera; its mean squared error to the fourth view.

The folder is the multi-view model as a ``MultiViewDiffusionPipeline`` (the UNet and the camera embedding, each as
its own component) saved with ``save_for_hub``, plus ``base_unet/`` (the 2D base model the benchmark
compares with), ``training_report.json`` and ``samples.png``. ``--budget smoke`` runs every stage in seconds.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from diffusers import DDPMScheduler, UNet2DConditionModel
from tqdm.auto import tqdm

from ...hub import save_for_hub
from ...pipelines.three_d import CameraEmbedding, MultiViewDiffusionPipeline, remove_multiview
from ...pipelines.three_d.rendering import fit_voxel_grid, orbit_cameras, render
from ...pipelines.three_d.shapes import random_shape
from ...testing.metrics import sliced_wasserstein2
from ..multiview import (
    PAPER_SINGLE_VIEW_PROBABILITY,
    TOY_TEXT_WIDTH,
    TOY_VIEWS,
    MultiViewObjective,
    RenderedShapeViews,
    _item_seed,
    multiview_unet,
    toy_unet,
)
from ..trainer import Trainer, TrainingConfig, TrainingResult

NUM_VIEWS, SIZE = TOY_VIEWS["num_views"], TOY_VIEWS["size"]
TRAIN_SEED, HELD_OUT_SEED = 0, 1
EVAL_ELEVATION = 15.0  # the authors' default orbit
BACKGROUND_TOLERANCE = 0.1
BASE_UNET_FOLDER = "base_unet"


@dataclass(frozen=True)
class Budget:
    train_objects: int
    base_steps: int
    multiview_steps: int
    batch_size: int
    eval_objects: int
    inference_steps: int
    fit_sets: int
    fit_iterations: int


BUDGETS = {"full": Budget(train_objects=16384, base_steps=3000, multiview_steps=4000, batch_size=16, eval_objects=32,
                          inference_steps=250, fit_sets=8, fit_iterations=100),
           "smoke": Budget(train_objects=4, base_steps=2, multiview_steps=2, batch_size=2, eval_objects=2,
                           inference_steps=2, fit_sets=1, fit_iterations=2)}
BASE_LEARNING_RATE, MULTIVIEW_LEARNING_RATE, EMA_DECAY = 2e-3, 1e-3, 0.999
FIT_RESOLUTION = 16


def foreground_mask(views: torch.Tensor) -> torch.Tensor:
    """``(M, 3, H, W)`` images in [0, 1] over white -> ``(M, H, W)``: pixels at least ``BACKGROUND_TOLERANCE``
    below white in some channel."""
    return (1 - views).amax(dim=1) >= BACKGROUND_TOLERANCE


def view_set_figures(views: torch.Tensor, num_views: int) -> dict[str, float]:
    """Colour and area spread (module docstring) of view sets ``(B N, 3, H, W)`` in [0, 1], views of one object
    consecutive, averaged over the sets (a view with no foreground counts as white)."""
    mask = foreground_mask(views).to(views.dtype)  # (M, H, W)
    area = mask.mean(dim=(1, 2))
    colour = (views * mask[:, None]).sum(dim=(2, 3)) / mask.sum(dim=(1, 2)).clamp(min=1)[:, None]
    colour = torch.where(area[:, None] > 0, colour, torch.ones_like(colour))
    colour = colour.reshape(-1, num_views, 3)
    pairwise = (colour[:, :, None] - colour[:, None, :]).norm(dim=-1)
    off_diagonal = pairwise.sum(dim=(1, 2)) / (num_views * (num_views - 1))
    area = area.reshape(-1, num_views)
    area_spread = area.std(dim=1) / area.mean(dim=1).clamp(min=1e-6)
    return {"colour_spread": float(off_diagonal.mean()), "area_spread": float(area_spread.mean())}


def held_out_view_error(views: torch.Tensor, cameras: torch.Tensor, num_sets: int, iterations: int) -> float:
    """The issue's consistency figure: for each of the first ``num_sets`` view sets ``(B N, 3, H, W)`` in [0, 1],
    a ``VoxelGrid`` fitted to its first ``N - 1`` views (``rendering.fit_voxel_grid``, ``FIT_RESOLUTION`` voxels a
    side) renders the last camera; the mean squared error to the set's last view, averaged over the sets. Views of one
    3D object are re-rendered well; views that disagree are not."""
    num_views, size = cameras.shape[0], views.shape[-1]
    errors = []
    for index in range(min(num_sets, views.shape[0] // num_views)):
        view_set = views[index * num_views:(index + 1) * num_views]
        grid = fit_voxel_grid(view_set[:-1], cameras[:-1], resolution=FIT_RESOLUTION, num_iterations=iterations,
                              views_per_iteration=num_views - 1, generator=torch.Generator().manual_seed(index))
        with torch.no_grad():
            rerendered = render(grid, cameras[-1:], size, size)
        errors.append(float((rerendered - view_set[-1:]).square().mean()))
    return float(np.mean(errors))


def real_view_sets(num_objects: int, seed: int, cameras: torch.Tensor) -> torch.Tensor:
    """Renders ``(num_objects N, 3, H, W)`` in [0, 1] of ``num_objects`` random shapes (seeded like
    ``RenderedShapeViews``) from ``cameras``."""
    views = []
    with torch.no_grad():
        for index in range(num_objects):
            shape = random_shape(torch.Generator().manual_seed(_item_seed(seed, index)), resolution=16)
            views.append(render(shape, cameras, SIZE, SIZE))
    return torch.cat(views)


def shuffled_across_objects(views: torch.Tensor, num_views: int) -> torch.Tensor:
    """View ``n`` of set ``b`` taken from set ``b + n`` (cyclically): every set mixes objects, each view kept."""
    sets = views.reshape(-1, num_views, *views.shape[1:])
    rolled = [torch.roll(sets[:, view], shifts=-view, dims=0) for view in range(num_views)]
    return torch.stack(rolled, dim=1).reshape(views.shape)


def multiview_pipeline(unet: UNet2DConditionModel, camera_embedding: CameraEmbedding,
                       num_views: int) -> MultiViewDiffusionPipeline:
    pipe = MultiViewDiffusionPipeline(unet=unet.eval(), scheduler=DDPMScheduler(), camera_embedding=camera_embedding,
                                      num_views=num_views)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def per_view_pipeline(base: UNet2DConditionModel) -> MultiViewDiffusionPipeline:
    """The 2D ``base`` UNet used per view: a one-view pipeline, so that every view is sampled on its own (its camera
    embedding is a fresh one, whose zero last layer adds nothing)."""
    return multiview_pipeline(base, CameraEmbedding(base.time_embedding.linear_2.out_features), 1)


def sample_views(pipe: MultiViewDiffusionPipeline, num_images: int, inference_steps: int, seed: int,
                 cameras: torch.Tensor) -> torch.Tensor:
    """``num_images`` views ``(M, 3, H, W)`` in [0, 1], objects of ``pipe.num_views`` views from ``cameras``
    (repeated to the pipeline's view count), guidance 1 (unconditional)."""
    objects = num_images // pipe.num_views
    return pipe(num_objects_per_prompt=objects, cameras=cameras[: pipe.num_views], guidance_scale=1.0,
                num_inference_steps=inference_steps, output_type="pt",
                generator=torch.Generator().manual_seed(seed)).images


def render_training_pool(budget: Budget) -> list[dict[str, torch.Tensor]]:
    """The ``budget.train_objects`` training objects (``RenderedShapeViews`` of the training seed), rendered once."""
    dataset = RenderedShapeViews(budget.train_objects, **TOY_VIEWS, seed=TRAIN_SEED)
    return [dataset[index] for index in tqdm(range(len(dataset)), desc="rendering training views")]


def _ema_model(result: TrainingResult, camera_embedding: CameraEmbedding) -> UNet2DConditionModel:
    result.model.load_state_dict(result.ema_weights, strict=False)
    camera_embedding.load_state_dict(result.method_ema_weights["camera_embedding"])
    return remove_multiview(result.model).eval()


def train_base(pool: list, budget: Budget, output: Path) -> tuple[UNet2DConditionModel, list[float]]:
    """Stage 1: the 2D base model, every weight trained (every batch 2D: single-view attention, no camera)."""
    unet, camera_embedding = multiview_unet(toy_unet(TRAIN_SEED), NUM_VIEWS)
    method = MultiViewObjective(DDPMScheduler(), camera_embedding, single_view_probability=1.0,
                                prompt_embeds=torch.zeros(1, 1, TOY_TEXT_WIDTH))
    config = TrainingConfig(output_dir=str(output / "base"), max_steps=budget.base_steps, batch_size=budget.batch_size,
                            learning_rate=BASE_LEARNING_RATE, ema_decay=EMA_DECAY, checkpoint_every=0,
                            seed=TRAIN_SEED)
    result = Trainer(method, unet.train(), pool, config).train()
    base = _ema_model(result, camera_embedding)
    base.requires_grad_(False)
    return base, result.losses


def train_multiview(pool: list, base: UNet2DConditionModel, budget: Budget,
                    output: Path) -> tuple[UNet2DConditionModel, CameraEmbedding, list[float]]:
    """Stage 2: the base UNet made multi-view and fine-tuned whole with the camera MLP (2D batches 30%)."""
    unet = UNet2DConditionModel.from_config(base.config)
    unet.load_state_dict(base.state_dict())
    unet, camera_embedding = multiview_unet(unet, NUM_VIEWS)
    method = MultiViewObjective(DDPMScheduler(), camera_embedding,
                                single_view_probability=PAPER_SINGLE_VIEW_PROBABILITY,
                                prompt_embeds=torch.zeros(1, 1, TOY_TEXT_WIDTH))
    config = TrainingConfig(output_dir=str(output / "multiview"), max_steps=budget.multiview_steps,
                            batch_size=budget.batch_size, learning_rate=MULTIVIEW_LEARNING_RATE, ema_decay=EMA_DECAY,
                            checkpoint_every=0, seed=TRAIN_SEED)
    result = Trainer(method, unet.train(), pool, config).train()
    return _ema_model(result, camera_embedding), camera_embedding.eval(), result.losses


def evaluate(multiview_unet: UNet2DConditionModel, camera_embedding: CameraEmbedding, base: UNet2DConditionModel,
             budget: Budget) -> tuple[dict[str, Any], torch.Tensor, torch.Tensor]:
    cameras = orbit_cameras(NUM_VIEWS, elevation=EVAL_ELEVATION)
    images = budget.eval_objects * NUM_VIEWS
    real = real_view_sets(budget.eval_objects, HELD_OUT_SEED, cameras)
    reference = real_view_sets(budget.eval_objects, HELD_OUT_SEED + 1, cameras)
    multiview = sample_views(multiview_pipeline(multiview_unet, camera_embedding, NUM_VIEWS), images,
                             budget.inference_steps, seed=0, cameras=cameras)
    # The 2D base model used per view: one view per object, so every view is sampled on its own.
    per_view = sample_views(per_view_pipeline(base), images, budget.inference_steps, seed=0, cameras=cameras)
    rows = {"real renders": real, "multi-view model": multiview, "2D base model per view": per_view,
            "real renders shuffled across objects": shuffled_across_objects(real, NUM_VIEWS)}
    figures = {}
    for name, views in rows.items():
        figures[name] = view_set_figures(views, NUM_VIEWS)
        figures[name]["sliced_w2_to_real"] = sliced_wasserstein2(views, reference)
        figures[name]["held_out_view_mse"] = held_out_view_error(views, cameras, budget.fit_sets,
                                                                 budget.fit_iterations)
    return figures, multiview, per_view


def save_samples(path: Path, multiview: torch.Tensor, per_view: torch.Tensor, objects: int = 4) -> None:
    from diffusers.utils import make_image_grid
    from PIL import Image

    def pil(views: torch.Tensor) -> list[Image.Image]:
        pixels = (views[: objects * NUM_VIEWS].clamp(0, 1) * 255).round().byte().permute(0, 2, 3, 1).numpy()
        return [Image.fromarray(p).resize((64, 64), Image.NEAREST) for p in pixels]

    rows = min(objects, multiview.shape[0] // NUM_VIEWS)
    grid = make_image_grid(pil(multiview)[: rows * NUM_VIEWS] + pil(per_view)[: rows * NUM_VIEWS], rows=2 * rows,
                           cols=NUM_VIEWS)
    grid.save(path)


def card_table(figures: dict[str, dict[str, float]]) -> str:
    lines = ["| view sets | held-out view MSE | colour spread | area spread | sliced W2 to real views |",
             "|---|---|---|---|---|"]
    for name, row in figures.items():
        lines.append(f"| {name} | {row['held_out_view_mse']:.4f} | {row['colour_spread']:.3f} | "
                     f"{row['area_spread']:.3f} | {row['sliced_w2_to_real']:.3f} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--output", default="diffusers_ext/assets/tiny-mvdream-shapes")
    parser.add_argument("--budget", choices=sorted(BUDGETS), default="full")
    parser.add_argument("--checkpoints", default="training_output/tiny-mvdream-shapes")
    args = parser.parse_args(argv)
    budget, output, work = BUDGETS[args.budget], Path(args.output), Path(args.checkpoints)
    torch.manual_seed(0)
    start = time.time()
    pool = render_training_pool(budget)
    base, base_losses = train_base(pool, budget, work)
    base_seconds = time.time() - start
    multiview_unet, camera_embedding, multiview_losses = train_multiview(pool, base, budget, work)
    train_seconds = time.time() - start
    figures, multiview, per_view = evaluate(multiview_unet, camera_embedding, base, budget)
    eval_seconds = time.time() - start - train_seconds

    pipe = multiview_pipeline(multiview_unet, camera_embedding, NUM_VIEWS)
    description = (
        "MVDream (arXiv 2308.16512) in miniature: 4 views of 16 x 16 px of random coloured shapes, in pixel space, "
        f"unconditional. A {sum(p.numel() for p in base.parameters()) / 1e6:.2f} M-parameter UNet2DConditionModel "
        "trained as a 2D model on single renders "
        f"({budget.base_steps} steps), then made multi-view (self-attention across the views, camera embedding) "
        f"and fine-tuned whole with the camera MLP for {budget.multiview_steps} "
        f"steps, 2D batches with probability {PAPER_SINGLE_VIEW_PROBABILITY}. `python -m "
        "diffusers_ext.training.recipes.tiny_multiview_shapes`.\n\n"
        "Held-out figures (DDPM ancestral sampling, 250 steps, default orbit at 15 degrees elevation; lower spread = more consistent views; "
        f"{budget.eval_objects} view sets each):\n\n{card_table(figures)}\n\n"
        "The 2D base model is the multi-view model's starting point, with fewer training steps behind it, so its "
        "single views are also further from real ones (sliced W2). Real views shuffled across objects, as good as "
        "single views get, re-render worse than the multi-view model's: its lower held-out-view error is "
        "consistency across views, not image quality alone.\n\n"
        "`base_unet/` holds the 2D base model (UNet2DConditionModel.from_pretrained(folder, subfolder='base_unet'))."
    )
    save_for_hub(pipe, output, card_template="multiview", title="tiny-mvdream-shapes", description=description)
    base.save_pretrained(output / BASE_UNET_FOLDER, safe_serialization=True)
    save_samples(output / "samples.png", multiview, per_view)
    report = {"budget": asdict(budget), "figures": figures, "base_final_loss": float(np.mean(base_losses[-50:])),
              "multiview_final_loss": float(np.mean(multiview_losses[-50:])), "base_seconds": round(base_seconds, 1),
              "train_seconds": round(train_seconds, 1), "eval_seconds": round(eval_seconds, 1),
              "torch_threads": torch.get_num_threads()}
    (output / "training_report.json").write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    print(json.dumps(report, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
