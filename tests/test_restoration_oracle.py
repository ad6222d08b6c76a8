"""The restoration oracle itself: ``PairedGaussianLaw``'s posterior and ``ExactRestorationDenoiser``'s conditional
mean, checked against importance sampling and brute-force alternatives, and its bad inputs."""

import pytest
import torch

from diffusers_ext.schedulers import ResShiftScheduler
from diffusers_ext.testing import ExactRestorationDenoiser, GaussianMixture, PairedGaussianLaw

PRIOR = GaussianMixture([[-1.0, 0.5, 0.0], [1.0, -0.5, 0.5]], [[0.2, 0.1, 0.3], [0.1, 0.2, 0.1]], [0.4, 0.6])
BLUR = [[0.6, 0.4, 0.0], [0.2, 0.6, 0.2], [0.0, 0.4, 0.6]]


def law() -> PairedGaussianLaw:
    return PairedGaussianLaw(PRIOR, BLUR, noise_std=0.3)


def test_restoration_mean_matches_importance_sampling():
    paired = law()
    y = torch.tensor([[0.2, -0.1, 0.4]], dtype=torch.float64)
    state = torch.tensor([[0.5, 0.0, 0.3]], dtype=torch.float64)
    a, b, s = torch.tensor([0.7]), torch.tensor([0.3]), torch.tensor([0.4])
    exact = paired.restoration_mean(state, y, a, b, s)[0]
    # E[x0 | x_t, y] = E_prior[x0 w] / E_prior[w], w = N(y; A x0, noise^2) N(x_t; a x0 + b y, s^2)
    x0 = PRIOR.sample(400_000, torch.Generator().manual_seed(0))
    operator = torch.tensor(BLUR, dtype=torch.float64)
    log_w = -((y - x0 @ operator.T) ** 2).sum(1) / (2 * 0.3**2) - ((state - 0.7 * x0 - 0.3 * y) ** 2).sum(1) / (2 * 0.4**2)
    weights = torch.softmax(log_w, 0)
    estimate = weights @ x0
    standard_error = ((weights[:, None] * (x0 - estimate) ** 2).sum(0) * (weights**2).sum()).sqrt()
    assert ((estimate - exact).abs() < 5 * standard_error + 1e-3).all(), (estimate, exact)


def test_one_measurement_fast_path_equals_the_grouped_path():
    paired = law()
    generator = torch.Generator().manual_seed(1)
    y = torch.randn(1, 3, generator=generator, dtype=torch.float64)
    other = torch.randn(1, 3, generator=generator, dtype=torch.float64)
    states = torch.randn(6, 3, generator=generator, dtype=torch.float64)
    a, b, s = torch.full((6,), 0.5), torch.full((6,), 0.4), torch.full((6,), 0.6)
    shared = paired.restoration_mean(states, y.expand(6, 3), a, b, s)
    mixed = paired.restoration_mean(states, torch.cat([y.expand(3, 3), other.expand(3, 3)]), a, b, s)
    torch.testing.assert_close(mixed[:3], shared[:3])
    assert not torch.allclose(mixed[3:], shared[3:])


def test_a_state_equal_to_the_measurement_gives_the_posterior_mean():
    paired = law()
    y = torch.tensor([[0.2, -0.1, 0.4]], dtype=torch.float64)
    posterior = paired.posterior(y)
    mean = paired.restoration_mean(y, y, torch.zeros(1), torch.ones(1), torch.zeros(1))[0]
    torch.testing.assert_close(mean, posterior.weights @ posterior.means)


def test_denoiser_returns_the_schedulers_training_target():
    paired = law()
    scheduler = ResShiftScheduler(num_train_timesteps=4, prediction_type="residual")
    denoiser = ExactRestorationDenoiser(paired, scheduler)
    y = torch.tensor([[0.2, -0.1, 0.4]]).expand(2, 3)
    state = torch.tensor([[0.5, 0.0, 0.3], [0.1, 0.2, -0.3]])
    output = denoiser(torch.cat([state, y], dim=1), torch.tensor(2)).sample
    a, b, s = scheduler.path_coefficients(torch.tensor([2, 2]))
    x0 = paired.restoration_mean(state, y, a, b, s).float()
    torch.testing.assert_close(output, y - x0)
    assert denoiser.calls == 1 and output.dtype == torch.float32


def test_bad_inputs():
    with pytest.raises(ValueError, match="3 x 3"):
        PairedGaussianLaw(PRIOR, [[1.0, 0.0]], 0.1)
    with pytest.raises(ValueError, match="noise_std"):
        PairedGaussianLaw(PRIOR, BLUR, 0.0)
    denoiser = ExactRestorationDenoiser(law(), ResShiftScheduler(num_train_timesteps=4))
    with pytest.raises(ValueError, match="the law has 3"):
        denoiser(torch.zeros(2, 8), torch.tensor(1))
