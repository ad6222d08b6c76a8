"""How far SDI's and SDS's updates move a render the prior already finds likely, by timestep, with the shipped
multi-view model as the prior.

    python benchmarks/sdi_target_error.py [--objects 2] [--seed 0]

Real renders of held-out random shapes from the default orbit (``tiny_multiview_shapes.real_view_sets``, the data
``tiny-mvdream-shapes`` was trained on) are taken as the current
``x0`` of ``ScoreDistillation`` with ``MultiViewPrior`` (guidance 1, the model being unconditional). For each
timestep the script prints the root mean square and the largest entry of each method's gradient with respect to
``x0`` (``ScoreDistillation.gradient``): SDS's ``sigma_t^2 (eps_hat - eps)`` and SDI's ``x0 - x0_target``, where
``x0_target`` is the prior's clean estimate from the DDIM-inverted ``x_t`` (arXiv 2405.15891). Pixels lie in
[-1, 1], so an SDI gradient near or above 1 means the inversion did not return a point the prior maps back near
``x0``.
"""

from __future__ import annotations

import argparse

import torch

from diffusers_ext.pipelines.three_d.demo import SHIPPED_MULTIVIEW_MODEL
from diffusers_ext.pipelines.three_d.rendering import orbit_cameras
from diffusers_ext.pipelines.three_d.score_distillation import MultiViewPrior, ScoreDistillation
from diffusers_ext.shipped import load_shipped_pipeline
from diffusers_ext.training.recipes.tiny_multiview_shapes import EVAL_ELEVATION, HELD_OUT_SEED, real_view_sets

TIMESTEPS = (980, 800, 500, 200, 50)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--objects", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    pipe = load_shipped_pipeline(SHIPPED_MULTIVIEW_MODEL)
    pipe.set_progress_bar_config(disable=True)
    prior, num_views = MultiViewPrior(pipe), pipe.num_views
    generator = torch.Generator().manual_seed(args.seed)
    orbit = orbit_cameras(num_views, elevation=EVAL_ELEVATION)
    x0 = real_view_sets(args.objects, HELD_OUT_SEED, orbit) * 2 - 1
    cameras = orbit.repeat(args.objects, 1, 1)
    prompts = [""] * x0.shape[0]
    print(f"{'t':>5}{'SDS rms':>10}{'SDS max':>10}{'SDI rms':>10}{'SDI max':>10}")
    for timestep in TIMESTEPS:
        timesteps = torch.full((x0.shape[0],), timestep)
        row = []
        for method in ("sds", "sdi"):
            distillation = ScoreDistillation(prior, method=method, guidance_scale=1.0, inversion_guidance_scale=1.0)
            gradient = distillation.gradient(x0, timesteps, cameras, prompts, generator)
            row += [float(gradient.square().mean().sqrt()), float(gradient.abs().max())]
        print(f"{timestep:>5}" + "".join(f"{value:>10.3f}" for value in row))
    print(f"{args.objects} held-out objects of {num_views} views, the shipped {SHIPPED_MULTIVIEW_MODEL} as the prior")


if __name__ == "__main__":
    main()
