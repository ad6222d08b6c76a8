import itertools

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from test_er_sde import SMOOTH_LAW
from tiny_pipelines import sd3_inputs, tiny_sd3

from diffusers_ext.schedulers import RFSolverScheduler
from diffusers_ext.testing import GaussianMixtureSamplingPipeline
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG, measure_convergence_order, oracle_for


def test_second_order_against_the_exact_ode_with_nfe_counted():
    rf = measure_convergence_order(lambda n: RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG), SMOOTH_LAW, (5, 10, 20, 40))
    euler = measure_convergence_order(lambda n: FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG),
                                      SMOOTH_LAW, (10, 20, 40, 80))
    assert rf.nfes == [10, 20, 40, 80] == euler.nfes  # two model calls per step
    assert abs(rf.order - 2) < 0.3 and abs(euler.order - 1) < 0.3, (rf, euler)
    assert all(r < e / 5 for r, e in zip(rf.errors[1:], euler.errors[1:], strict=True))


def _regenerate(oracle, scheduler, noise, steps):
    pipe = GaussianMixtureSamplingPipeline(unet=oracle, scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe(batch_size=len(noise), num_inference_steps=steps, latents=noise.clone()).samples


def test_inversion_round_trip_beats_euler_at_equal_nfe():
    rf = RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)
    oracle = oracle_for(SMOOTH_LAW, rf.config).double()
    data = SMOOTH_LAW.sample(256, torch.Generator().manual_seed(0)).view(256, *oracle.sample_shape)
    velocity = lambda x, t: oracle(x, t).sample  # noqa: E731
    noise = rf.invert(velocity, data, 10, progress=False)  # 20 NFE
    rf_error = (_regenerate(oracle, rf, noise, 10) - data.flatten(1)).norm(dim=1).mean()

    euler = FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)
    euler.set_timesteps(20)
    levels, latents = euler.sigmas.flip(0).double(), data.clone()
    for low, high in itertools.pairwise(levels):
        latents = latents + (high - low) * velocity(latents, low * 1000)
    euler_error = (_regenerate(oracle, euler, latents, 20) - data.flatten(1)).norm(dim=1).mean()
    assert rf_error < euler_error / 10, (rf_error, euler_error)
    assert rf_error < 0.01


def test_inversion_returns_a_tensor_detached_from_the_models_graph():
    weight = torch.nn.Parameter(torch.tensor(0.5))
    noise = RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG).invert(
        lambda x, t: weight * x, torch.ones(2, 3), num_inference_steps=3, progress=False)
    assert not noise.requires_grad and noise.grad_fn is None


def test_same_grid_as_flow_match_euler_with_midpoints():
    """Shift and dynamic shifting (mu) are FlowMatchEuler's own; every other entry is a midpoint."""
    config = dict(SD3_SCHEDULER_CONFIG, use_dynamic_shifting=True)
    ours, stock = RFSolverScheduler.from_config(config), FlowMatchEulerDiscreteScheduler.from_config(config)
    sigmas = np.linspace(1.0, 1 / 6, 6)
    ours.set_timesteps(6, sigmas=sigmas, mu=0.8)
    stock.set_timesteps(6, sigmas=sigmas, mu=0.8)
    assert torch.equal(ours.sigmas[::2], stock.sigmas)
    assert torch.allclose(ours.sigmas[1::2], (stock.sigmas[:-1] + stock.sigmas[1:]) / 2)
    assert torch.allclose(ours.timesteps, ours.sigmas[:-1] * 1000)


def test_sd3_img2img_starts_at_a_step_boundary():
    from diffusers import StableDiffusion3Img2ImgPipeline

    pipe = tiny_sd3(RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG))
    img2img = StableDiffusion3Img2ImgPipeline.from_pipe(pipe)
    image = torch.rand(1, 3, 8, 8)
    inputs = sd3_inputs(image=image, strength=0.6, num_inference_steps=5)
    del inputs["height"], inputs["width"]
    out = img2img(**inputs).images
    assert out.shape == (1, 8, 8, 3) and np.isfinite(out).all()
    scheduler = img2img.scheduler
    assert scheduler.begin_index > 0 and scheduler.begin_index % 2 == 0  # a step's first call, not a midpoint
    assert scheduler.step_index == len(scheduler.timesteps)


def test_rejects_stochastic_sampling_and_bad_grids():
    with pytest.raises(ValueError, match="stochastic_sampling"):
        RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG, stochastic_sampling=True).set_timesteps(4)
    scheduler = RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)
    with pytest.raises(ValueError, match="sigmas must lie"):
        scheduler.set_timesteps(2, sigmas=[1.5, 0.5])
    with pytest.raises(ValueError, match="before step"):
        RFSolverScheduler().step(torch.zeros(1), 1000.0, torch.zeros(1))
