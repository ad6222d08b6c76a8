import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, EDMEulerScheduler, EulerDiscreteScheduler, FlowMatchEulerDiscreteScheduler

from diffusers_ext.diffusion_math import (
    PREDICTION_TYPES,
    flow_alpha_sigma,
    flow_shift,
    flow_unshift,
    noise_path_from_scheduler_config,
    prediction_from_x0_and_eps,
    vp_alpha_sigma,
    vp_alphas_cumprod,
    x0_and_eps_from_prediction,
)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
def test_prediction_conversions_invert_each_other(prediction_type):
    generator = torch.Generator().manual_seed(0)
    x0, eps = torch.randn(2, 16, 3, generator=generator, dtype=torch.float64)
    if prediction_type == "flow_prediction":
        sigma = torch.rand(16, 1, generator=generator, dtype=torch.float64) * 0.98 + 0.01
        alpha = 1 - sigma
    else:
        alpha = torch.rand(16, 1, generator=generator, dtype=torch.float64) * 0.98 + 0.01
        sigma = (1 - alpha**2).sqrt()
    x = alpha * x0 + sigma * eps
    prediction = prediction_from_x0_and_eps(x0, eps, alpha, sigma, prediction_type)
    x0_back, eps_back = x0_and_eps_from_prediction(prediction, x, alpha, sigma, prediction_type)
    torch.testing.assert_close(x0_back, x0)
    torch.testing.assert_close(eps_back, eps)


def test_v_prediction_matches_diffusers_get_velocity():
    scheduler = DDIMScheduler()
    generator = torch.Generator().manual_seed(1)
    x0, eps = torch.randn(2, 4, 3, generator=generator)
    t = torch.tensor([10, 200, 500, 990])
    alpha, sigma = vp_alpha_sigma(t, scheduler.alphas_cumprod)
    ours = prediction_from_x0_and_eps(x0.double(), eps.double(), alpha[:, None], sigma[:, None], "v_prediction")
    torch.testing.assert_close(ours.float(), scheduler.get_velocity(x0, eps, t), atol=1e-6, rtol=1e-5)


def test_vp_alpha_sigma_exact_at_integers_and_euler_interpolation_between():
    euler = EulerDiscreteScheduler(beta_schedule="scaled_linear", beta_start=0.00085, beta_end=0.012)
    abar = vp_alphas_cumprod(euler.config)
    torch.testing.assert_close(abar, euler.alphas_cumprod)
    alpha, sigma = vp_alpha_sigma(torch.tensor([0, 500, 999]), abar)
    torch.testing.assert_close(alpha**2, abar[[0, 500, 999]].double())
    euler.set_timesteps(7)  # linspace timesteps are fractional: 999, 832.5, ...
    alpha, sigma = vp_alpha_sigma(euler.timesteps, abar)
    np.testing.assert_allclose((sigma / alpha).numpy(), euler.sigmas[:-1].numpy(), rtol=1e-6)


def test_flow_alpha_sigma_follows_flow_match_timesteps():
    scheduler = FlowMatchEulerDiscreteScheduler(shift=3.0)
    scheduler.set_timesteps(10)
    alpha, sigma = flow_alpha_sigma(scheduler.timesteps, 1000)
    np.testing.assert_allclose(sigma.numpy(), scheduler.sigmas[:-1].numpy(), rtol=1e-6)
    torch.testing.assert_close(alpha + sigma, torch.ones_like(alpha))


def test_noise_path_detection_and_clear_errors():
    assert noise_path_from_scheduler_config(DDIMScheduler().config) == "vp"
    assert noise_path_from_scheduler_config(EulerDiscreteScheduler().config) == "vp"
    assert noise_path_from_scheduler_config(FlowMatchEulerDiscreteScheduler().config) == "flow"
    with pytest.raises(ValueError, match="cannot read a noise schedule"):
        noise_path_from_scheduler_config(EDMEulerScheduler().config)
    with pytest.raises(TypeError, match="mapping"):
        noise_path_from_scheduler_config(["beta_schedule"])
    with pytest.raises(ValueError, match="beta_schedule"):
        vp_alphas_cumprod({"beta_schedule": "cubic"})
    with pytest.raises(ValueError, match="prediction_type"):
        prediction_from_x0_and_eps(torch.zeros(1), torch.zeros(1), 1.0, 0.0, "score")


def test_per_sample_broadcasts_one_value_per_row():
    from diffusers_ext.diffusion_math import per_sample

    values, like = torch.tensor([1.0, 2.0, 3.0], dtype=torch.float64), torch.ones(3, 2, 4, 4, dtype=torch.float16)
    shaped = per_sample(values, like)
    assert shaped.shape == (3, 1, 1, 1) and shaped.dtype == torch.float16
    torch.testing.assert_close((shaped * like)[:, 1, 2, 3], values.half())
    assert per_sample(values, like, torch.float32).dtype == torch.float32


@pytest.mark.parametrize(("config", "mu", "factor"), [
    ({"shift": 3.0}, None, 3.0),
    ({"use_dynamic_shifting": True, "time_shift_type": "exponential"}, 0.8, np.exp(0.8)),
    ({"use_dynamic_shifting": True, "time_shift_type": "linear"}, 1.7, 1.7),
])
def test_flow_unshift_gives_the_sigmas_that_land_on_a_wanted_grid(config, mu, factor):
    """Passing ``flow_unshift(levels)`` as ``sigmas`` makes FlowMatchEuler sample at ``levels``; ``flow_shift`` is
    the shift it applies."""
    scheduler = FlowMatchEulerDiscreteScheduler(**config)
    wanted = torch.tensor([1.0, 0.8, 0.45, 0.2, 0.05], dtype=torch.float64)
    scheduler.set_timesteps(sigmas=flow_unshift(wanted, factor).numpy(), mu=mu)
    torch.testing.assert_close(scheduler.sigmas[:-1].double(), wanted, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(flow_shift(flow_unshift(wanted, factor), factor), wanted)
