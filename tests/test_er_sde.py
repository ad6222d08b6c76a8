import itertools

import numpy as np
import pytest
import torch
from conftest import make_oracle, seeded
from diffusers import DPMSolverMultistepScheduler

from diffusers_ext.diffusion_math import vp_alphas_cumprod, vp_noise_ratio
from diffusers_ext.schedulers import ERSDESolverScheduler
from diffusers_ext.schedulers.scheduling_er_sde import NOISE_SCALE_FUNCTIONS, er_sde_step_coefficients
from diffusers_ext.testing import GaussianMixture, GaussianMixtureSamplingPipeline
from diffusers_ext.testing.metrics import SlicedWasserstein2, sliced_wasserstein2_noise_floor
from diffusers_ext.testing.sampler_accuracy import SD_SCHEDULER_CONFIG, measure_convergence_order

# Broad, overlapping components: the ODE is smooth enough for the asymptotic order to show from 10 steps.
SMOOTH_LAW = GaussianMixture([[-1.0, 0.5], [1.0, 0.8], [0.2, -1.0]], [0.3, 0.25, 0.4], [0.5, 0.3, 0.2])


def karras_noise_levels(num_steps: int, p: float = 7.0) -> list[float]:
    """EDM's grid between the SD schedule's extreme noise levels (the last one is the final target, not sampled)."""
    rho = vp_noise_ratio(vp_alphas_cumprod(SD_SCHEDULER_CONFIG))
    u = np.linspace(0, 1, num_steps + 1)
    high, low = rho[-1].item() ** (1 / p), rho[0].item() ** (1 / p)
    return ((high + u * (low - high)) ** p)[:-1].tolist()


@pytest.mark.parametrize("order", [1, 2, 3])
def test_ode_variant_converges_at_its_order(order):
    """Slope of log error vs log NFE against the exact PF-ODE solution, on a smooth grid ending at timestep 0."""
    measurement = measure_convergence_order(
        lambda steps: ERSDESolverScheduler.from_config(
            SD_SCHEDULER_CONFIG, noise_scale="ode", solver_order=order, final_sigmas_type="sigma_min",
            lower_order_final=False, sampling_schedule=karras_noise_levels(steps),
        ),
        SMOOTH_LAW, step_counts=(10, 20, 40, 80), timestep_end=0,
    )
    assert measurement.nfes == [10, 20, 40, 80]
    assert abs(measurement.order - order) < 0.3, measurement


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction"])
def test_first_order_ode_is_ddim(prediction_type):
    """phi(rho) = rho at first order is DDIM: it matches diffusers' first-order DPM-Solver++ step for step."""
    def sample(scheduler):
        pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config).double(), scheduler=scheduler)
        pipe.set_progress_bar_config(disable=True)
        return pipe(batch_size=64, num_inference_steps=12, generator=seeded(), ).samples

    config = dict(SD_SCHEDULER_CONFIG, prediction_type=prediction_type)
    ours = ERSDESolverScheduler.from_config(config, noise_scale="ode", solver_order=1, sampling_schedule=None)
    stock = DPMSolverMultistepScheduler.from_config(config, solver_order=1, algorithm_type="dpmsolver++")
    assert torch.allclose(sample(ours), sample(stock), atol=1e-5)


@pytest.mark.parametrize("noise_scale", ["reverse_sde", "er_sde_5"])
def test_stochastic_variants_reproduce_the_law(law_2d, noise_scale):
    """At 100 steps the samples are as close to the law as exact samples are (the noise floor); at 5 they are not,
    so the check can fail."""
    num_samples = 4096
    distance = SlicedWasserstein2(law_2d.sample(16 * num_samples, seeded(1)), num_samples)
    floor = sliced_wasserstein2_noise_floor(law_2d, distance, seed=2)
    scheduler = ERSDESolverScheduler(noise_scale=noise_scale)
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    fine = distance(pipe(batch_size=num_samples, num_inference_steps=100, generator=seeded()).samples)
    coarse = distance(pipe(batch_size=num_samples, num_inference_steps=5, generator=seeded()).samples)
    assert fine < floor.mean + 2 * floor.std, (fine, floor)
    assert coarse > floor.mean + 3 * floor.std, (coarse, floor)


@pytest.mark.parametrize("noise_scale", sorted(NOISE_SCALE_FUNCTIONS))
def test_noise_scales_satisfy_the_papers_constraint(noise_scale):
    """phi(rho) / rho must not decrease, so that every step's noise variance rho_t^2 - r^2 rho_s^2 is >= 0."""
    phi = NOISE_SCALE_FUNCTIONS[noise_scale]
    levels = np.geomspace(14.6, 0.029, 60)
    for rho_s, rho_t in itertools.pairwise(levels):
        r = phi(rho_t) / phi(rho_s)
        assert rho_t**2 - (r * rho_s) ** 2 >= -1e-12
    _, _, _, noise_std = er_sde_step_coefficients(1.0, 0.5, phi)
    assert (noise_std == 0) == (noise_scale == "ode")


def test_quadrature_matches_closed_form_for_the_ode():
    """For phi(rho) = rho the integrals are elementary: c1 = rho_t - rho_s + rho_t log(rho_s / rho_t)."""
    rho_s, rho_t = 3.0, 1.2
    r, c1, c2, _ = er_sde_step_coefficients(rho_s, rho_t, NOISE_SCALE_FUNCTIONS["ode"])
    log_ratio = np.log(rho_s / rho_t)
    assert r == pytest.approx(rho_t / rho_s, rel=1e-14)
    assert c1 == pytest.approx(rho_t - rho_s + rho_t * log_ratio, rel=1e-12)
    assert c2 == pytest.approx((rho_s - rho_t) * (rho_s + rho_t) / 2 - rho_t * rho_s * log_ratio, rel=1e-12)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"solver_order": 4}, "solver_order"),
        ({"noise_scale": "brownian"}, "noise_scale"),
        ({"prediction_type": "flow_prediction"}, "flow-matching"),
        ({"prediction_type": "score"}, "prediction_type"),
        ({"timestep_spacing": "cosine"}, "timestep_spacing"),
        ({"final_sigmas_type": "denoise_to_zero"}, "final_sigmas_type"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ERSDESolverScheduler(**kwargs)


def test_step_before_set_timesteps_raises():
    scheduler = ERSDESolverScheduler()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(torch.zeros(1, 2), 999, torch.zeros(1, 2))
