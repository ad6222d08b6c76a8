"""RDDMScheduler (Residual Denoising Diffusion Models, arXiv 2308.13712) against the paper's definitions and the exact
restoration oracle.

- The forward process equals the paper's Markov chain x_t = x_{t-1} + alpha_t (y - x0) + beta_t eps, with the official
  code's schedules (cumulative sums exact; moments of a simulated chain).
- ``step`` is the paper's update x_{t'} = x_t - (alpha_bar_t - alpha_bar_t') res - (beta_bar_t - sqrt(beta_bar_t'^2 -
  sigma^2)) eps + sigma z, for every prediction type, written with ``noise_preserving_step``.
- Driven by ``ExactRestorationDenoiser`` the sampler follows the DDIM / DDPM discretisation theory exactly (Gaussian
  posterior, the paper's 10 steps) and converges to the exact p(x0 | y) (Gaussian-mixture prior, rank-deficient
  operator) and, in generation mode (y = 0), to the prior.
"""

import itertools
import math

import pytest
import torch
from diffusers import UNet2DModel

from diffusers_ext.schedulers.restoration import RestorationSchedulerOutput
from diffusers_ext.schedulers.scheduling_rddm import RDDMScheduler
from diffusers_ext.testing import (
    ExactRestorationDenoiser,
    GaussianMixture,
    PairedGaussianLaw,
    SlicedWasserstein2,
    sliced_wasserstein2_noise_floor,
)

torch.set_num_threads(1)

PREDICTION_TYPES = ("residual_and_noise", "residual", "epsilon", "sample")
SCHEDULES = ("decreased", "increased", "average")

# A 4-D, three-component prior with full covariances, seen through a rank-2 pair-averaging operator (a 2-tap blur that
# loses every pair's difference): the posterior of the seed-5 observation has two modes of weight ~0.5 each.
MEANS = [[-1.0, 0.6, 0.8, -0.4], [0.9, -0.5, 0.3, 0.7], [0.2, 1.0, -0.9, -0.6]]
COVARIANCES = [
    [[0.20, 0.06, 0.00, 0.02], [0.06, 0.15, 0.03, 0.00], [0.00, 0.03, 0.12, -0.04], [0.02, 0.00, -0.04, 0.18]],
    [[0.10, 0.00, 0.00, 0.00], [0.00, 0.22, 0.00, 0.00], [0.00, 0.00, 0.08, 0.00], [0.00, 0.00, 0.00, 0.14]],
    [[0.16, -0.05, 0.00, 0.00], [-0.05, 0.10, 0.00, 0.00], [0.00, 0.00, 0.20, 0.06], [0.00, 0.00, 0.06, 0.12]],
]
WEIGHTS = [0.45, 0.35, 0.20]
PAIR_AVERAGE = [[0.5, 0.5, 0.0, 0.0], [0.5, 0.5, 0.0, 0.0], [0.0, 0.0, 0.5, 0.5], [0.0, 0.0, 0.5, 0.5]]
NUM_SAMPLES = 4000
# The sampler's variance deficit is first order in 1 / n (on this law 19-21 % at 10 steps, 4 % at 50; see also
# test_gaussian_posterior_*): at 250 steps (~1 %) it is below the Monte-Carlo resolution of 4000 samples (trace of the
# covariance: 0.8 % standard error).
CONVERGED_STEPS = 250


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_rddm(scheduler: RDDMScheduler, law: PairedGaussianLaw, degraded: torch.Tensor, num_inference_steps: int,
                seed: int = 0, start: torch.Tensor | None = None) -> torch.Tensor:
    """The pipeline's loop, with the exact denoiser as the model (from ``start`` instead of a fresh x_T if given)."""
    model = ExactRestorationDenoiser(law, scheduler)
    generator = seeded(seed)
    scheduler.set_timesteps(num_inference_steps)
    sample = scheduler.initial_sample(degraded, generator) if start is None else start
    for t in scheduler.timesteps:
        output = model(torch.cat([scheduler.scale_model_input(sample, t), degraded], dim=1), t).sample
        sample = scheduler.step(output, t, sample, degraded, generator=generator).prev_sample
    assert model.calls == num_inference_steps
    return sample


def official_schedule(schedule: str, num_train_timesteps: int) -> torch.Tensor:
    """The per-step coefficients of the official code's ``gen_coefficients`` (sum 1), written from its definition."""
    steps = torch.arange(1, num_train_timesteps + 1, dtype=torch.float64)
    weights = {"increased": steps, "decreased": steps.flip(0), "average": torch.ones_like(steps)}[schedule]
    return weights / weights.sum()


@pytest.fixture(scope="module")
def prior() -> GaussianMixture:
    return GaussianMixture(MEANS, COVARIANCES, WEIGHTS)


@pytest.fixture(scope="module")
def restoration_law(prior) -> PairedGaussianLaw:
    return PairedGaussianLaw(prior, PAIR_AVERAGE, noise_std=0.2)


@pytest.fixture(scope="module")
def observation(restoration_law) -> torch.Tensor:
    """One degraded vector whose posterior is bimodal, as a 1 x 4 row."""
    _, degraded = restoration_law.sample(1, seeded(5))
    weights = restoration_law.posterior(degraded[0]).weights
    assert weights.max() < 0.6, weights  # the test law is genuinely multimodal
    return degraded


class ExactLaw:
    """An exact law's reference sample, sliced-W2 noise floor and moments with their Monte-Carlo standard errors."""

    def __init__(self, law: GaussianMixture):
        self.law = law
        reference = law.sample(100_000, seeded(11))
        self.distance = SlicedWasserstein2(reference, NUM_SAMPLES, num_projections=64)
        self.floor = sliced_wasserstein2_noise_floor(law, self.distance, repeats=32)
        self.mean = reference.mean(0)
        centred = reference - self.mean
        products = (centred[:, :, None] * centred[:, None, :]).reshape(len(reference), -1)
        self.covariance = products.mean(0).reshape(law.dim, law.dim)
        self.mean_error = reference.std(0) / math.sqrt(NUM_SAMPLES)
        self.covariance_error = (products.std(0) / math.sqrt(NUM_SAMPLES)).reshape(law.dim, law.dim)

    def check(self, samples: torch.Tensor, label: str) -> None:
        distance = self.distance(samples)
        mean_z = ((samples.mean(0) - self.mean) / self.mean_error).abs().max().item()
        covariance_z = ((torch.cov(samples.T) - self.covariance) / self.covariance_error).abs().max().item()
        threshold = self.floor.mean + 4 * self.floor.std
        print(f"{label}: sliced W2 {distance:.4f} (noise floor {self.floor.mean:.4f} +- {self.floor.std:.4f}, "
              f"threshold {threshold:.4f}); worst mean error {mean_z:.2f} SE, "
              f"worst covariance error {covariance_z:.2f} SE")
        assert distance <= threshold
        assert mean_z <= 4
        assert covariance_z <= 4


@pytest.fixture(scope="module")
def exact_posterior(restoration_law, observation) -> ExactLaw:
    return ExactLaw(restoration_law.posterior(observation[0]))


# The forward process ------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_train_timesteps", [1, 7, 1000])
@pytest.mark.parametrize("alpha_schedule", SCHEDULES)
@pytest.mark.parametrize("beta_squared_schedule", SCHEDULES)
def test_path_coefficients_are_the_papers_cumulative_sums(num_train_timesteps, alpha_schedule, beta_squared_schedule):
    scheduler = RDDMScheduler(num_train_timesteps, alpha_schedule, beta_squared_schedule, final_noise_variance=0.3)
    alphas = official_schedule(alpha_schedule, num_train_timesteps)
    betas_squared = 0.3 * official_schedule(beta_squared_schedule, num_train_timesteps)
    steps = torch.arange(num_train_timesteps + 1)
    a, b, s = scheduler.path_coefficients(steps)
    zero = torch.zeros(1, dtype=torch.float64)
    torch.testing.assert_close(b, torch.cat([zero, alphas.cumsum(0)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(a, 1 - torch.cat([zero, alphas.cumsum(0)]), rtol=0, atol=1e-12)
    torch.testing.assert_close(s**2, torch.cat([zero, betas_squared.cumsum(0)]), rtol=0, atol=1e-12)
    # x_T = y + beta_bar_T eps exactly; x_0 = x0.
    assert (a[-1].item(), b[-1].item(), s[-1].item() ** 2) == (0.0, 1.0, pytest.approx(0.3, abs=1e-15))
    assert (a[0].item(), b[0].item(), s[0].item()) == (1.0, 0.0, 0.0)


@pytest.mark.parametrize("alpha_schedule, beta_squared_schedule", [("decreased", "increased"), ("average", "average")])
def test_add_noise_has_the_moments_of_the_papers_markov_chain(alpha_schedule, beta_squared_schedule):
    """Simulate x_t = x_{t-1} + alpha_t (y - x0) + beta_t eps_{t-1} step by step from the official per-step
    coefficients; its marginals and ``add_noise``'s draws must share mean and variance (4.5 standard errors)."""
    num_train_timesteps, chains, variance_total = 12, 40_000, 0.5
    scheduler = RDDMScheduler(num_train_timesteps, alpha_schedule, beta_squared_schedule, variance_total)
    clean = torch.tensor([[0.7, -1.2]], dtype=torch.float64).expand(chains, 2)
    degraded = torch.tensor([[-0.3, 0.9]], dtype=torch.float64).expand(chains, 2)
    alphas = official_schedule(alpha_schedule, num_train_timesteps)
    betas = (variance_total * official_schedule(beta_squared_schedule, num_train_timesteps)).sqrt()
    generator = seeded(0)
    state = clean.clone()
    for t in range(1, num_train_timesteps + 1):
        state = state + alphas[t - 1] * (degraded - clean) + betas[t - 1] * torch.randn(
            state.shape, generator=generator, dtype=torch.float64)
        if t not in (1, 5, num_train_timesteps):
            continue
        noise = torch.randn(state.shape, generator=generator, dtype=torch.float64)
        direct = scheduler.add_noise(clean, degraded, noise, torch.full((chains,), t))
        variance = float(betas[:t].pow(2).sum())
        mean = clean[0] + alphas[:t].sum() * (degraded[0] - clean[0])
        for name, draws in (("chain", state), ("add_noise", direct)):
            mean_z = ((draws.mean(0) - mean) / math.sqrt(variance / chains)).abs().max().item()
            variance_z = ((draws.var(0) - variance) / (variance * math.sqrt(2 / chains))).abs().max().item()
            print(f"t={t} {name}: mean error {mean_z:.2f} SE, variance error {variance_z:.2f} SE")
            assert mean_z < 4.5 and variance_z < 4.5
        covariance = torch.cov(state.T)[0, 1] / variance  # the chain's coordinates stay independent
        assert abs(covariance) < 4.5 / math.sqrt(chains)


def test_initial_sample_and_training_timesteps():
    scheduler = RDDMScheduler(num_train_timesteps=50, final_noise_variance=0.04)
    degraded = torch.full((20_000, 2), 0.5, dtype=torch.float64)
    start = scheduler.initial_sample(degraded, seeded(0))
    assert abs(start.mean().item() - 0.5) < 4 * 0.2 / math.sqrt(start.numel())
    assert abs(start.var().item() / 0.04 - 1) < 4 * math.sqrt(2 / start.numel())
    steps = scheduler.sample_training_timesteps(10_000, seeded(0))
    assert steps.min().item() == 1 and steps.max().item() == 50
    target = RDDMScheduler().training_target(degraded, degraded, degraded, torch.ones(len(degraded)))
    assert target.shape == (20_000, 4)  # residual and noise, stacked on the channel axis


def test_inference_grid_is_the_official_one():
    scheduler = RDDMScheduler()
    scheduler.set_timesteps(10)
    assert scheduler.timesteps.tolist() == list(range(1000, 0, -100))
    assert scheduler.timesteps.dtype == torch.int64
    # The official grid, reversed(linspace(-1, T - 1, n + 1).int()) + 1, is floor(k T / n).
    scheduler.set_timesteps(3)
    assert scheduler.timesteps.tolist() == [1000, 666, 333]
    scheduler.set_timesteps(1000)
    assert scheduler.timesteps.tolist() == list(range(1000, 0, -1))


# The update ---------------------------------------------------------------------------------------------------------
def papers_update(prediction_type, model_output, sample, degraded, t, t_prev, scheduler, noise):
    """x_{t'} = x_t - (abar_t - abar_t') res - (bbar_t - sqrt(bbar_t'^2 - sigma^2)) eps + sigma z, with the residual
    and the noise read off the model output as the official ``model_predictions`` does."""
    _, alpha_bar, beta_bar = (c.item() for c in scheduler.path_coefficients(torch.tensor(t)))
    _, alpha_bar_prev, beta_bar_prev = (c.item() for c in scheduler.path_coefficients(torch.tensor(t_prev)))
    if prediction_type == "residual_and_noise":
        residual, eps = model_output.chunk(2, dim=1)
    elif prediction_type == "residual":
        residual = model_output
        eps = (sample - degraded + (1 - alpha_bar) * residual) / beta_bar
    elif prediction_type == "sample":
        residual = degraded - model_output
        eps = (sample - degraded + (1 - alpha_bar) * residual) / beta_bar
    else:
        eps = model_output
        residual = degraded - (sample - alpha_bar * degraded - beta_bar * eps) / (1 - alpha_bar)
    beta_squared = beta_bar**2 - beta_bar_prev**2
    sigma = math.sqrt(scheduler.config.eta * beta_squared * beta_bar_prev**2 / beta_bar**2)
    return (sample - (alpha_bar - alpha_bar_prev) * residual
            - (beta_bar - math.sqrt(beta_bar_prev**2 - sigma**2)) * eps + sigma * noise)


@pytest.mark.parametrize("prediction_type", PREDICTION_TYPES)
@pytest.mark.parametrize("eta", [0.0, 0.5, 1.0])
def test_step_is_the_papers_update(prediction_type, eta):
    """Arbitrary (for ``residual_and_noise`` mutually inconsistent) model outputs, at every step of a 7-step grid but
    the first for noise prediction (test_noise_prediction_at_t_T_takes_the_residual_as_zero)."""
    scheduler = RDDMScheduler(num_train_timesteps=100, final_noise_variance=0.7, eta=eta,
                              prediction_type=prediction_type)
    scheduler.set_timesteps(7)
    grid = [*scheduler.timesteps.tolist(), 0]
    generator = seeded(1)
    shape = (5, 3, 2, 2)
    degraded = torch.randn(shape, generator=generator, dtype=torch.float64)
    for index, (t, t_prev) in enumerate(itertools.pairwise(grid)):
        sample = torch.randn(shape, generator=generator, dtype=torch.float64)
        output_shape = (5, 3 * scheduler.model_output_channels_factor, 2, 2)
        model_output = torch.randn(output_shape, generator=generator, dtype=torch.float64)
        noise_seed = 100 + index
        out = scheduler.step(model_output, t, sample, degraded, generator=seeded(noise_seed))
        if prediction_type == "epsilon" and index == 0:
            continue
        noise = torch.randn(shape, generator=seeded(noise_seed), dtype=torch.float64)
        expected = papers_update(prediction_type, model_output, sample, degraded, t, t_prev, scheduler, noise)
        torch.testing.assert_close(out.prev_sample, expected, rtol=1e-10, atol=1e-10)
        assert isinstance(out, RestorationSchedulerOutput)


def test_eta_one_is_the_forward_chains_posterior():
    """With the true x0 and eps, the ancestral step draws from q(x_{t'} | x_t, x0, y) of the paper's chain: a Brownian
    bridge of the noise, mean x0 + abar' res + (bbar'^2 / bbar^2) bbar eps and variance beta^2 bbar'^2 / bbar^2."""
    scheduler = RDDMScheduler(num_train_timesteps=100, eta=1.0, prediction_type="residual_and_noise")
    scheduler.set_timesteps(4)
    t, t_prev = 75, 50
    count = 50_000
    clean = torch.full((count, 1), 0.3, dtype=torch.float64)
    degraded = torch.full((count, 1), -0.8, dtype=torch.float64)
    eps = torch.randn(count, 1, generator=seeded(2), dtype=torch.float64)
    sample = scheduler.add_noise(clean, degraded, eps, torch.tensor(t))
    scheduler.set_begin_index(1)
    target = scheduler.training_target(clean, degraded, eps, torch.tensor(t))
    out = scheduler.step(target, t, sample, degraded, generator=seeded(3)).prev_sample
    bbar = scheduler.path_coefficients(torch.tensor(t))[2].item()
    _, abar_prev, bbar_prev = (c.item() for c in scheduler.path_coefficients(torch.tensor(t_prev)))
    bridge_mean = clean + abar_prev * (degraded - clean) + bbar_prev**2 / bbar * eps
    bridge_variance = (bbar**2 - bbar_prev**2) * bbar_prev**2 / bbar**2
    deviation = out - bridge_mean
    assert abs(deviation.mean().item()) < 4 * math.sqrt(bridge_variance / count)
    assert abs(deviation.var().item() / bridge_variance - 1) < 4 * math.sqrt(2 / count)


def test_noise_prediction_at_t_T_takes_the_residual_as_zero(restoration_law, observation):
    """At t = T (1 - abar_T = 0) a noise prediction says nothing about x0: the step takes res_hat = 0, so it differs
    from an exact residual model's step by a' (y - E[x0 | y]), a' = 1 - abar_t'."""
    degraded = observation.expand(64, 4)
    first_steps = {}
    for prediction_type in ("epsilon", "residual"):
        scheduler = RDDMScheduler(prediction_type=prediction_type)
        scheduler.set_timesteps(10)
        model = ExactRestorationDenoiser(restoration_law, scheduler)
        start = scheduler.initial_sample(degraded, seeded(0))
        output = model(torch.cat([start, degraded], dim=1), 1000).sample
        first_steps[prediction_type] = scheduler.step(output, 1000, start, degraded).prev_sample
        a_prev = scheduler.path_coefficients(torch.tensor(900))[0].item()
    posterior = restoration_law.posterior(observation[0])
    expected = a_prev * (degraded - posterior.weights @ posterior.means)
    torch.testing.assert_close(first_steps["epsilon"] - first_steps["residual"], expected, rtol=0, atol=1e-12)
    print(f"noise prediction's first step: a' = {a_prev:.5f} at 10 steps, "
          f"{RDDMScheduler().path_coefficients(torch.tensor(980))[0].item():.6f} at 50")


# The exact oracle ---------------------------------------------------------------------------------------------------
def test_every_prediction_type_follows_the_same_trajectory(restoration_law, observation):
    """The exact model of each prediction type gives the same (x0, eps): identical stochastic trajectories; noise
    prediction joins after its first step (then identical too)."""
    degraded = observation.expand(256, 4)
    trajectories, generator_states = {}, {}
    for prediction_type in PREDICTION_TYPES:
        scheduler = RDDMScheduler(eta=1.0, prediction_type=prediction_type)
        model = ExactRestorationDenoiser(restoration_law, scheduler)
        scheduler.set_timesteps(10)
        generator = seeded(4)
        states = [scheduler.initial_sample(degraded, generator)]
        if prediction_type == "epsilon":  # start from the residual model's state after the first step
            scheduler.set_begin_index(1)
            states = trajectories["residual"][:2]
            generator.set_state(generator_states["residual"])
        for t in scheduler.timesteps[len(states) - 1:]:
            output = model(torch.cat([states[-1], degraded], dim=1), t).sample
            states.append(scheduler.step(output, t, states[-1], degraded, generator=generator).prev_sample)
            if len(states) == 2:
                generator_states[prediction_type] = generator.get_state()
        trajectories[prediction_type] = states
    for prediction_type in PREDICTION_TYPES[1:]:
        for reference, state in zip(trajectories["residual_and_noise"], trajectories[prediction_type], strict=True):
            torch.testing.assert_close(state, reference, rtol=0, atol=1e-10)


def ddim_variance_after_sampling(scheduler: RDDMScheduler, eigenvalues: torch.Tensor) -> torch.Tensor:
    """Variance of the sampler's output along each eigenvector of a Gaussian p(x0 | y) with those eigenvalues, for the
    exact denoiser. The centred shifted state X = x - a m - b y maps to X' = g X + c z with
    g = (a' a lam + sqrt(s'^2 - c^2) s) / (a^2 lam + s^2), so Var' = g^2 Var + c^2, from Var_T = s_T^2."""
    grid = [*scheduler.timesteps.tolist(), 0]
    variance = scheduler.path_coefficients(torch.tensor(grid[0]))[2] ** 2 * torch.ones_like(eigenvalues)
    for t, t_prev in itertools.pairwise(grid):
        a, _, s = scheduler.path_coefficients(torch.tensor(t))
        a_prev, _, s_prev = scheduler.path_coefficients(torch.tensor(t_prev))
        fresh_variance = scheduler.config.eta * (s**2 - s_prev**2) * s_prev**2 / s**2
        gain = (a_prev * a * eigenvalues + (s_prev**2 - fresh_variance).sqrt() * s) / (a**2 * eigenvalues + s**2)
        variance = gain**2 * variance + fresh_variance
    return variance


@pytest.fixture(scope="module")
def gaussian_law() -> PairedGaussianLaw:
    prior = GaussianMixture([[0.4, -0.3, 0.8]], [[[0.5, 0.2, 0.05], [0.2, 0.4, 0.1], [0.05, 0.1, 0.3]]])
    blur = [[0.6, 0.3, 0.1], [0.2, 0.6, 0.2], [0.1, 0.3, 0.6]]
    return PairedGaussianLaw(prior, blur, noise_std=0.3)


def test_gaussian_posterior_deterministic_sampler_at_the_papers_10_steps(gaussian_law):
    """eta = 0 is an affine map of x_T; with the exact denoiser it must equal the DDIM discretisation exactly: mean
    kept, eigen-directions scaled by the product of the gains. The shrinkage against the exact posterior is the
    sampler's own discretisation error, printed."""
    _, degraded = gaussian_law.sample(1, seeded(0))
    posterior = gaussian_law.posterior(degraded[0])
    eigenvalues, eigenvectors = torch.linalg.eigh(posterior.covariances[0])
    for steps in (10, 50):
        scheduler = RDDMScheduler(eta=0.0, prediction_type="residual")
        scheduler.set_timesteps(steps)
        model = ExactRestorationDenoiser(gaussian_law, scheduler)
        probes = degraded + torch.cat([torch.zeros(1, 3), torch.eye(3)]).to(torch.float64)  # x_T = y (+ e_i)
        states, rows = probes, degraded.expand(4, 3)
        for t in scheduler.timesteps:
            states = scheduler.step(model(torch.cat([states, rows], 1), t).sample, t, states, rows).prev_sample
        torch.testing.assert_close(states[0], posterior.means[0], rtol=0, atol=1e-12)
        gains = (states[1:] - states[0]).T  # d output / d x_T
        predicted_variance = ddim_variance_after_sampling(scheduler, eigenvalues)
        predicted_gains = eigenvectors @ torch.diag(predicted_variance.sqrt()) @ eigenvectors.T  # s_T = 1
        torch.testing.assert_close(gains, predicted_gains, rtol=0, atol=1e-10)
        print(f"Gaussian posterior, eta = 0, {steps} steps: output variance / exact variance per eigen-direction "
              f"{(predicted_variance / eigenvalues).numpy().round(4)}")


def test_gaussian_posterior_stochastic_sampler_at_the_papers_10_steps(gaussian_law):
    """eta = 1: Monte-Carlo variances along the eigenvectors match Var' = g^2 Var + sigma^2 (4 SE)."""
    count = 20_000
    _, degraded = gaussian_law.sample(1, seeded(0))
    posterior = gaussian_law.posterior(degraded[0])
    eigenvalues, eigenvectors = torch.linalg.eigh(posterior.covariances[0])
    scheduler = RDDMScheduler(eta=1.0)
    samples = sample_rddm(scheduler, gaussian_law, degraded.expand(count, 3), 10, seed=1)
    predicted = ddim_variance_after_sampling(scheduler, eigenvalues)
    measured = ((samples - posterior.means[0]) @ eigenvectors).var(0)
    mean_z = ((samples.mean(0) - posterior.means[0]) / (posterior.covariances[0].diagonal() / count).sqrt()).abs()
    print(f"Gaussian posterior, eta = 1, 10 steps: measured / predicted variance {(measured / predicted).numpy()}, "
          f"predicted / exact {(predicted / eigenvalues).numpy().round(4)}")
    assert ((measured / predicted - 1).abs() < 4 * math.sqrt(2 / count)).all()
    assert (mean_z < 4).all()


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_sampler_converges_to_the_restoration_posterior(eta, restoration_law, observation, exact_posterior):
    """At the official 10 steps the samples are too narrow (the discretisation's variance deficit, first order in
    1 / n); at CONVERGED_STEPS they match p(x0 | y) to Monte-Carlo resolution."""
    degraded = observation.expand(NUM_SAMPLES, 4)
    trace = exact_posterior.covariance.trace()
    deficits = []
    for steps in (10, 20, 50):
        samples = sample_rddm(RDDMScheduler(eta=eta), restoration_law, degraded, steps)
        deficits.append(float(1 - torch.cov(samples.T).trace() / trace))
        print(f"restoration, eta = {eta}, {steps} steps: sliced W2 {exact_posterior.distance(samples):.4f}, "
              f"variance deficit {deficits[-1]:.3f}")
    assert deficits == sorted(deficits, reverse=True)
    samples = sample_rddm(RDDMScheduler(eta=eta), restoration_law, degraded, CONVERGED_STEPS)
    exact_posterior.check(samples, f"restoration, eta = {eta}, {CONVERGED_STEPS} steps")


@pytest.fixture(scope="module")
def exact_prior(prior) -> ExactLaw:
    return ExactLaw(prior)


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_generation_mode_reproduces_the_prior(eta, prior, exact_prior):
    """y = 0 and an operator that sees nothing (A = 0): p(x0 | y) is the prior, x_T = beta_bar_T eps."""
    law = PairedGaussianLaw(prior, torch.zeros(4, 4), noise_std=1.0)
    degraded = torch.zeros(NUM_SAMPLES, 4, dtype=torch.float64)
    samples = sample_rddm(RDDMScheduler(eta=eta), law, degraded, CONVERGED_STEPS)
    exact_prior.check(samples, f"generation, eta = {eta}, {CONVERGED_STEPS} steps")


def test_image_shaped_float32_run_matches_float64(restoration_law, observation):
    """(B, C, H, W) float32 samples through the pipeline's loop, with the noise prediction's ill-conditioned inversion
    near t = T (1 - abar_t = 2e-6 at t = 999), agree with the float64 run from the same x_T to float32 rounding
    accumulated over 1000 steps."""
    degraded = observation.reshape(1, 1, 2, 2).expand(16, 1, 2, 2)
    start = RDDMScheduler().initial_sample(degraded, seeded(0))
    results = {}
    for dtype in (torch.float64, torch.float32):
        scheduler = RDDMScheduler(prediction_type="epsilon")
        results[dtype] = sample_rddm(scheduler, restoration_law, degraded.to(dtype), 1000, start=start.to(dtype))
    assert results[torch.float32].dtype == torch.float32 and results[torch.float32].shape == (16, 1, 2, 2)
    error = (results[torch.float32].double() - results[torch.float64]).abs().max().item()
    print(f"float32 vs float64, noise prediction, 1000 steps: max difference {error:.2e}")
    assert error < 1e-4


def test_runs_a_unet_in_the_pipeline_loop_and_trainer_step():
    """Integer timesteps 1..T for the UNet's sinusoidal embedding; residual and noise on 2C output channels."""
    torch.manual_seed(0)
    unet = UNet2DModel(sample_size=8, in_channels=6, out_channels=6, layers_per_block=1, block_out_channels=(8, 8),
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"),
                       norm_num_groups=4)
    scheduler = RDDMScheduler(eta=1.0)
    degraded = torch.rand(2, 3, 8, 8, generator=seeded(11)) * 2 - 1
    generator = seeded(12)
    scheduler.set_timesteps(3)
    with torch.no_grad():
        state = scheduler.initial_sample(degraded, generator)
        for t in scheduler.timesteps:
            output = unet(torch.cat([scheduler.scale_model_input(state, t), degraded], dim=1), t).sample
            state = scheduler.step(output, t, state, degraded, generator=generator).prev_sample
        clean, noise = torch.rand(2, 3, 8, 8, generator=seeded(13)), torch.randn(2, 3, 8, 8, generator=seeded(14))
        t = scheduler.sample_training_timesteps(2, seeded(15))
        noisy = scheduler.add_noise(clean, degraded, noise, t)
        error = unet(torch.cat([noisy, degraded], 1), t).sample - scheduler.training_target(clean, degraded, noise, t)
    assert state.shape == degraded.shape and state.dtype == torch.float32 and torch.isfinite(state).all()
    assert torch.isfinite(error).all()


# Configuration, serialisation, seeds ------------------------------------------------------------------------------
def short_run(scheduler: RDDMScheduler, law: PairedGaussianLaw, observation: torch.Tensor, seed: int) -> torch.Tensor:
    return sample_rddm(scheduler, law, observation.expand(32, 4), 5, seed=seed)


def test_save_load_and_from_config_round_trips(tmp_path, restoration_law, observation):
    scheduler = RDDMScheduler(num_train_timesteps=200, alpha_schedule="average", beta_squared_schedule="decreased",
                              final_noise_variance=0.01, eta=1.0, prediction_type="residual")
    reference = short_run(scheduler, restoration_law, observation, seed=0)
    scheduler.save_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    for copy in (RDDMScheduler.from_pretrained(tmp_path), RDDMScheduler.from_config(scheduler.config)):
        assert public(copy.config) == public(scheduler.config)
        torch.testing.assert_close(short_run(copy, restoration_law, observation, seed=0), reference, rtol=0, atol=0)
    assert RDDMScheduler.from_config(scheduler.config, eta=0.0).config.eta == 0.0


def test_same_seed_same_samples(restoration_law, observation):
    scheduler = RDDMScheduler(eta=1.0)
    first = short_run(scheduler, restoration_law, observation, seed=7)
    torch.testing.assert_close(short_run(scheduler, restoration_law, observation, seed=7), first, rtol=0, atol=0)
    assert not torch.equal(short_run(scheduler, restoration_law, observation, seed=8), first)


@pytest.mark.parametrize("config, message", [
    ({"num_train_timesteps": 0}, "num_train_timesteps"),
    ({"num_train_timesteps": 10.5}, "num_train_timesteps"),
    ({"alpha_schedule": "linear"}, "alpha_schedule"),
    ({"beta_squared_schedule": "cosine"}, "beta_squared_schedule"),
    ({"final_noise_variance": 0.0}, "final_noise_variance"),
    ({"final_noise_variance": float("inf")}, "final_noise_variance"),
    ({"eta": -0.1}, "eta"),
    ({"eta": 1.5}, "eta"),
    ({"prediction_type": "v_prediction"}, "prediction_type"),
    ({"prediction_type": "flow_prediction"}, "prediction_type"),
])
def test_bad_config_raises(config, message):
    with pytest.raises(ValueError, match=message):
        RDDMScheduler(**config)


def test_bad_calls_raise():
    scheduler = RDDMScheduler(num_train_timesteps=20, prediction_type="residual_and_noise")
    sample = torch.zeros(2, 3, 4, 4)
    output = torch.zeros(2, 6, 4, 4)
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(output, 20, sample, sample)
    for bad_count in (0, 21, 2.5):
        with pytest.raises(ValueError, match="num_inference_steps"):
            scheduler.set_timesteps(bad_count)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="degraded image"):
        scheduler.step(output, 20, sample, torch.zeros(2, 3, 4, 5))
    with pytest.raises(ValueError, match="model_output must have shape"):
        scheduler.step(sample, 20, sample, sample)  # one image where residual and noise are expected
    scheduler.step(output, 20, sample, sample)
    with pytest.raises(ValueError, match="timestep"):
        scheduler.step(output, 7, sample, sample)  # the grid's second step is at 10
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        scheduler.step(output, t, sample, sample)
    with pytest.raises(ValueError, match="step called 3 times"):
        scheduler.step(output, 10, sample, sample)
    with pytest.raises(ValueError, match="timesteps lie in"):
        scheduler.path_coefficients(torch.tensor([21]))
    with pytest.raises(ValueError, match="timesteps lie in"):
        scheduler.path_coefficients(torch.tensor([-1.0]))
