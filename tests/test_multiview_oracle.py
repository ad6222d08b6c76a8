"""The exact multi-view oracle (MVDream, arXiv 2308.16512): its joint denoiser is the Gaussian-mixture denoiser of
whole view sets and its per-view one that of each view's marginal; MultiViewDiffusionPipeline with the joint oracle
returns every view set from one shape (with diffusers' DDIM and our ER-SDE solver), while the same pipeline sampling
each view on its own mixes shapes across views at the rate the law predicts."""

from __future__ import annotations

import pytest
import torch
from diffusers import DDIMScheduler

from diffusers_ext.pipelines.three_d import MultiViewDiffusionPipeline
from diffusers_ext.pipelines.three_d.rendering import orbit_cameras, render
from diffusers_ext.pipelines.three_d.shapes import random_shape
from diffusers_ext.schedulers import ERSDESolverScheduler
from diffusers_ext.testing import GaussianMixtureDenoiser
from diffusers_ext.testing.multiview_oracle import MultiViewMixtureDenoiser, nearest_shapes, one_shape_fraction

NUM_VIEWS, VARIANCE = 4, 0.01


def shape_renders(num_shapes: int = 2, size: int = 8) -> torch.Tensor:
    """``(K, N, 3, size, size)`` renders in [-1, 1] of random shapes from an orbit."""
    cameras = orbit_cameras(NUM_VIEWS)
    with torch.no_grad():
        return torch.stack([render(random_shape(torch.Generator().manual_seed(k), resolution=16), cameras, size, size)
                            for k in range(num_shapes)]) * 2 - 1


def test_joint_and_per_view_oracles_are_the_mixture_denoisers_of_view_sets_and_of_views():
    renders = shape_renders(size=4).double()
    scheduler = DDIMScheduler()
    joint = MultiViewMixtureDenoiser(renders.tolist(), VARIANCE, scheduler_config=scheduler.config)
    per_view = MultiViewMixtureDenoiser(renders.tolist(), VARIANCE, joint=False, scheduler_config=scheduler.config)
    sample = torch.randn(3 * NUM_VIEWS, 3, 4, 4, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    timestep = torch.tensor(600)
    whole_sets = GaussianMixtureDenoiser(renders.reshape(2, -1).tolist(), [VARIANCE] * 2,
                                         scheduler_config=scheduler.config, sample_size=1)
    expected = whole_sets(sample.reshape(3, -1, 1, 1), timestep).sample.reshape(sample.shape)
    torch.testing.assert_close(joint(sample, timestep).sample, expected, rtol=1e-10, atol=1e-12)
    for view in range(NUM_VIEWS):
        one_view = GaussianMixtureDenoiser(renders[:, view].reshape(2, -1).tolist(), [VARIANCE] * 2,
                                           scheduler_config=scheduler.config, sample_size=1)
        expected = one_view(sample[view::NUM_VIEWS].reshape(3, -1, 1, 1), timestep).sample
        torch.testing.assert_close(per_view(sample, timestep).sample[view::NUM_VIEWS],
                                   expected.reshape(3, 3, 4, 4), rtol=1e-10, atol=1e-12)


def test_the_pipeline_keeps_each_objects_views_together_and_per_view_sampling_mixes_shapes():
    renders = shape_renders()
    scheduler = DDIMScheduler()
    fractions, objects = {}, 32
    for joint in (True, False):
        oracle = MultiViewMixtureDenoiser(renders.tolist(), VARIANCE, joint=joint, scheduler_config=scheduler.config)
        pipe = MultiViewDiffusionPipeline(unet=oracle, scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        out = pipe(num_objects_per_prompt=objects, num_inference_steps=20, guidance_scale=1.0, output_type="pt",
                   generator=torch.Generator().manual_seed(1))
        views = out.images * 2 - 1
        shapes = nearest_shapes(views, renders)
        # Every view is a render of some shape, up to the law's pixel noise (std 0.1).
        nearest = renders[shapes.reshape(-1), torch.arange(NUM_VIEWS).repeat(objects)]
        assert (views - nearest).pow(2).mean().sqrt() < 0.15
        fractions[joint] = one_shape_fraction(shapes)
    assert fractions[True] == 1.0
    # Independent views agree with probability sum_k w_k^4 = 1/8: 32 sets give 4 on average, above 12 with
    # probability below 1e-4.
    assert fractions[False] <= 12 / objects


def test_one_of_our_schedulers_samples_whole_view_sets_too():
    renders = shape_renders()
    scheduler = ERSDESolverScheduler()
    oracle = MultiViewMixtureDenoiser(renders.tolist(), VARIANCE, scheduler_config=scheduler.config)
    pipe = MultiViewDiffusionPipeline(unet=oracle, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    views = pipe(num_objects_per_prompt=8, num_inference_steps=20, guidance_scale=1.0, output_type="pt",
                 generator=torch.Generator().manual_seed(1)).images * 2 - 1
    shapes = nearest_shapes(views, renders)
    assert one_shape_fraction(shapes) == 1.0
    nearest = renders[shapes.reshape(-1), torch.arange(NUM_VIEWS).repeat(8)]
    assert (views - nearest).pow(2).mean().sqrt() < 0.15


def test_bad_inputs_raise_one_clear_error():
    renders = shape_renders(size=4)
    with pytest.raises(ValueError, match=r"\(K, N, C, H, W\)"):
        MultiViewMixtureDenoiser(renders[0].tolist(), VARIANCE)
    with pytest.raises(ValueError, match="variance must be positive"):
        MultiViewMixtureDenoiser(renders.tolist(), 0.0)
    oracle = MultiViewMixtureDenoiser(renders.tolist(), VARIANCE)
    with pytest.raises(ValueError, match="4 views per object; the batch has 6 images"):
        oracle(torch.zeros(6, 3, 4, 4), 10)
    with pytest.raises(ValueError, match="one timestep for all the views"):
        oracle(torch.zeros(4, 3, 4, 4), torch.tensor([10, 10, 20, 10]))
    with pytest.raises(ValueError, match=r"views must be \(B\*4, 3, 4, 4\)"):
        nearest_shapes(torch.zeros(4, 3, 8, 8), renders)
