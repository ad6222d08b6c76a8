"""Cross-view consistency of a multi-view model (MVDream, arXiv 2308.16512) against its 2D base model sampled per view.

    python benchmarks/multiview_consistency.py [--model FOLDER] [--objects 32] [--steps 250]

The model is the shipped ``tiny-mvdream-shapes`` by default, or a folder written by ``python -m
diffusers_ext.training.recipes.tiny_multiview_shapes``: a ``MultiViewDiffusionPipeline`` and its 2D base UNet in
``base_unet/``. Both are sampled with DDPM (ancestral) from the authors'
default orbit (4 views at 15 degrees elevation), the base model with one view per object (every view on its own),
and scored against real renders of held-out random shapes from the same cameras (the recipe's figures): the
held-out-view error (a voxel grid fitted to three views of a set renders the fourth camera: its MSE to the fourth
view, ``held_out_view_error``), colour spread and area spread across the views of a set (lower: more consistent;
real renders are the floor, real views shuffled across objects the ceiling) and the sliced W2 of the single views to
real ones (are they renders at all).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from diffusers import UNet2DConditionModel

from diffusers_ext import shipped_model_path
from diffusers_ext.pipelines.three_d import MultiViewDiffusionPipeline
from diffusers_ext.pipelines.three_d.demo import SHIPPED_MULTIVIEW_MODEL
from diffusers_ext.training.recipes.tiny_multiview_shapes import BASE_UNET_FOLDER, BUDGETS, card_table, evaluate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a folder written by the tiny_multiview_shapes recipe "
                        f"(default: the shipped {SHIPPED_MULTIVIEW_MODEL})")
    parser.add_argument("--objects", type=int, default=32)
    parser.add_argument("--steps", type=int, default=250)
    parser.add_argument("--fit-sets", type=int, default=8, help="view sets per row for the held-out-view error")
    args = parser.parse_args()
    torch.set_num_threads(1)
    model = args.model or shipped_model_path(SHIPPED_MULTIVIEW_MODEL)
    pipe = MultiViewDiffusionPipeline.from_pretrained(model, trust_remote_code=True)
    pipe.set_progress_bar_config(disable=True)
    base = UNet2DConditionModel.from_pretrained(model, subfolder=BASE_UNET_FOLDER)
    budget = dataclasses.replace(BUDGETS["full"], eval_objects=args.objects, inference_steps=args.steps,
                                 fit_sets=args.fit_sets)
    start = time.time()
    figures, _, _ = evaluate(pipe.unet, pipe.camera_embedding, base, budget)
    print(card_table(figures))
    print(f"{args.objects} view sets of {pipe.num_views} views per row, {args.steps} DDPM steps, "
          f"{time.time() - start:.0f} s")


if __name__ == "__main__":
    main()
