"""MeanRevertingScheduler: IR-SDE's mean-reverting SDE (arXiv 2301.11699) sampled by MRS (arXiv 2502.07856).

The exact-oracle tests draw 1000 samples of p(x0 | y) for one y of a 3-D Gaussian-mixture prior seen through a blur
with noise, whose posterior has three modes (weights 0.77 / 0.13 / 0.10) and a narrowest direction of standard
deviation 0.046 against the process's stationary noise lam = 0.39. Samples are compared with the exact posterior by
sliced W2 (against the noise floor of exact samples) and by the mean and covariance in the posterior's whitened
coordinates, where every direction counts alike and each statistic is a z-score against its Monte-Carlo standard
error (estimated from 16 000 exact samples). With about ten runs of three means and six covariance entries, an exact
sampler exceeds |z| = 4 somewhere with probability below 1 %.
"""

import math

import numpy as np
import pytest
import torch
from diffusers.utils.torch_utils import randn_tensor

from diffusers_ext.diffusion_math import ddim_step
from diffusers_ext.schedulers.restoration import RestorationSchedulerOutput
from diffusers_ext.schedulers.scheduling_mean_reverting import (
    MeanRevertingScheduler,
    mrs_data_coefficients,
    mrs_noise_coefficients,
)
from diffusers_ext.testing import (
    ExactRestorationDenoiser,
    GaussianMixture,
    PairedGaussianLaw,
    SlicedWasserstein2,
    distance_to_reference,
    sliced_wasserstein2_noise_floor,
)

NUM_SAMPLES = 1000
PRIOR = GaussianMixture(
    [[0.3, -0.2, 0.1], [-0.2, 0.3, 0.0], [0.3, 0.3, -0.3]],
    [[0.02, 0.01, 0.015], [0.015, 0.02, 0.01], [0.02, 0.015, 0.02]],
    [0.4, 0.35, 0.25],
)
BLUR = [[0.6, 0.3, 0.1], [0.3, 0.4, 0.3], [0.1, 0.3, 0.6]]
LAW = PairedGaussianLaw(PRIOR, BLUR, noise_std=0.05)
DEGRADED = torch.tensor([0.1, 0.05, 0.0], dtype=torch.float64)
Z_LIMIT = 4.0


@pytest.fixture(scope="module", autouse=True)
def one_thread():
    """The oracle's small batched linear algebra runs fastest on one thread (and the suite shares the machine)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


def seeded(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def sample_posterior(num_inference_steps: int, num_samples: int = NUM_SAMPLES, dtype=torch.float64,
                     scheduler: MeanRevertingScheduler | None = None, seed: int = 0, **config) -> torch.Tensor:
    """The restoration pipeline's loop, driven by the exact restoration denoiser, for ``num_samples`` copies of y."""
    scheduler = scheduler or MeanRevertingScheduler(**config)
    model = ExactRestorationDenoiser(LAW, scheduler)
    generator = seeded(seed)
    degraded = DEGRADED.to(dtype).expand(num_samples, -1).clone()
    scheduler.set_timesteps(num_inference_steps)
    sample = scheduler.initial_sample(degraded, generator)
    for t in scheduler.timesteps:
        model_output = model(torch.cat([scheduler.scale_model_input(sample, t), degraded], dim=1), t).sample
        sample = scheduler.step(model_output, t, sample, degraded, generator=generator).prev_sample
    assert model.calls == num_inference_steps
    return sample


class PosteriorCheck:
    """Distances of a sample set to the exact p(x0 | y): sliced W2, and z-scores of the mean and the covariance in
    whitened coordinates."""

    def __init__(self):
        self.posterior = LAW.posterior(DEGRADED)
        weights, means, covariances = self.posterior.weights, self.posterior.means, self.posterior.covariances
        self.mean = weights @ means
        second_moment = (weights[:, None, None] * (covariances + means[:, :, None] * means[:, None, :])).sum(0)
        self.covariance = second_moment - self.mean.outer(self.mean)
        eigenvalues, eigenvectors = torch.linalg.eigh(self.covariance)
        self.whitening = eigenvectors @ torch.diag(eigenvalues.rsqrt()) @ eigenvectors.T
        reference = self.posterior.sample(16 * NUM_SAMPLES, seeded(1))
        white = (reference - self.mean) @ self.whitening
        self.covariance_standard_error = (white[:, :, None] * white[:, None, :]).std(0) / math.sqrt(NUM_SAMPLES)
        self.distance = SlicedWasserstein2(reference, NUM_SAMPLES)
        self.floor = sliced_wasserstein2_noise_floor(self.posterior, self.distance, seed=2)

    def __call__(self, samples: torch.Tensor) -> dict[str, float]:
        white = (samples.to(torch.float64) - self.mean) @ self.whitening
        white_covariance = torch.cov(white.T)
        covariance_z = (white_covariance - torch.eye(3, dtype=torch.float64)) / self.covariance_standard_error
        eigenvalues = torch.linalg.eigvalsh(white_covariance)
        distance = self.distance(samples)
        return {
            "sw2": distance,
            "sw2_excess_sd": (distance - self.floor.mean) / self.floor.std,
            "mean_z": float((white.mean(0) * math.sqrt(NUM_SAMPLES)).abs().max()),
            "cov_z": float(covariance_z.abs().max()),
            "eig_min": float(eigenvalues.min()),
            "eig_max": float(eigenvalues.max()),
        }

    def describe(self, name: str, figures: dict[str, float]) -> str:
        return (f"{name}: sliced W2 {figures['sw2']:.4f} (floor {self.floor.mean:.4f} +- {self.floor.std:.4f}, "
                f"{figures['sw2_excess_sd']:+.1f} sd), whitened mean |z| <= {figures['mean_z']:.2f}, covariance "
                f"|z| <= {figures['cov_z']:.1f}, eigenvalues [{figures['eig_min']:.3f}, {figures['eig_max']:.3f}]")

    def assert_reproduces(self, name: str, samples: torch.Tensor) -> dict[str, float]:
        figures = self(samples)
        print(self.describe(name, figures))
        assert figures["sw2"] < self.floor.mean + 3 * self.floor.std, self.describe(name, figures)
        assert figures["mean_z"] < Z_LIMIT, self.describe(name, figures)
        assert figures["cov_z"] < Z_LIMIT, self.describe(name, figures)
        return figures


@pytest.fixture(scope="module")
def check() -> PosteriorCheck:
    return PosteriorCheck()


@pytest.fixture(scope="module")
def euler_maruyama_reference(check) -> dict[str, float]:
    """IR-SDE's own sampler at 1000 steps (ten per unit of its 100-step chain): the reference the fast solvers must
    match."""
    samples = sample_posterior(1000, solver="euler_maruyama", timestep_spacing="linspace")
    return check(samples)


# The exact oracle ----------------------------------------------------------------------------------------------------
def test_starting_state_cannot_matter(check):
    """x_T = y + lam eps drops a_T (x0 - y) from the marginal at T. By convexity of KL and data processing, the
    sampler's output law moves by at most TV sqrt(KL / 2) with KL <= E_x0 KL(N(y, lam^2) || N(y + a_T (x0 - y),
    s_T^2)): far below what 1000 samples resolve (about 1 / sqrt(1000) = 0.03)."""
    scheduler = MeanRevertingScheduler()
    a_terminal, _, s_terminal = (float(c) for c in scheduler.path_coefficients(100))
    lam = scheduler.config.max_sigma
    distance_squared = float(((check.mean - DEGRADED) ** 2).sum() + check.covariance.trace())  # E |x0 - y|^2
    ratio = lam**2 / s_terminal**2
    kl_bound = 1.5 * (ratio - 1 - math.log(ratio)) + a_terminal**2 * distance_squared / (2 * s_terminal**2)
    tv_bound = math.sqrt(kl_bound / 2)
    print(f"a_T = {a_terminal:.4f}, a_T sqrt(E|x0 - y|^2) / lam = {a_terminal * math.sqrt(distance_squared) / lam:.2e}, "
          f"KL <= {kl_bound:.2e}, TV <= {tv_bound:.4f}")
    assert a_terminal == pytest.approx(0.005, rel=1e-12)
    assert tv_bound < 0.01


def test_euler_maruyama_at_1000_steps_reproduces_the_posterior(check, euler_maruyama_reference):
    print(check.describe("Euler-Maruyama, 1000 steps", euler_maruyama_reference))
    assert euler_maruyama_reference["sw2"] < check.floor.mean + 3 * check.floor.std
    assert euler_maruyama_reference["mean_z"] < Z_LIMIT
    assert euler_maruyama_reference["cov_z"] < Z_LIMIT


def test_euler_maruyama_at_10_steps_is_visibly_wrong(check):
    """MRS's point: IR-SDE's sampler needs hundreds of steps."""
    figures = check(sample_posterior(10, solver="euler_maruyama", timestep_spacing="linspace"))
    print(check.describe("Euler-Maruyama, 10 steps", figures))
    assert figures["sw2"] > check.floor.mean + 6 * check.floor.std
    assert figures["cov_z"] > 10


@pytest.mark.parametrize(("solver", "num_inference_steps"), [("ode", 10), ("sde", 20)])
def test_mrs_reproduces_the_posterior_for_every_prediction_type(check, euler_maruyama_reference, solver,
                                                                 num_inference_steps):
    """MRS (data parameterisation, second order) at 10 (ODE) or 20 (SDE) model calls is as close to p(x0 | y) as
    Euler-Maruyama at 1000; the three prediction types, inverted through the shared base class, give the same
    samples."""
    print(check.describe("Euler-Maruyama, 1000 steps", euler_maruyama_reference))
    runs = {}
    for prediction_type in ("epsilon", "sample", "v_prediction"):
        runs[prediction_type] = sample_posterior(num_inference_steps, solver=solver, prediction_type=prediction_type)
        check.assert_reproduces(f"MRS {solver}-2, {prediction_type}, {num_inference_steps} NFE",
                                runs[prediction_type])
    torch.testing.assert_close(runs["sample"], runs["epsilon"], rtol=0, atol=1e-9)
    torch.testing.assert_close(runs["v_prediction"], runs["epsilon"], rtol=0, atol=1e-9)


def test_mrs_noise_parameterisation(check):
    """MRS's noise-prediction solvers: the ODE reproduces the posterior at 20 calls; the SDE diverges at 10, where
    the data-prediction SDE does not (the paper's case for data prediction)."""
    check.assert_reproduces("MRS ode-2, noise parameterisation, 20 NFE",
                            sample_posterior(20, solver="ode", solver_parameterization="noise"))
    by_noise = check(sample_posterior(10, solver="sde", solver_parameterization="noise"))
    by_data = check(sample_posterior(10, solver="sde"))
    print(check.describe("MRS sde-2, noise parameterisation, 10 NFE", by_noise))
    print(check.describe("MRS sde-2, data parameterisation, 10 NFE", by_data))
    assert by_noise["sw2"] > 5 * by_data["sw2"]
    assert by_data["sw2"] < check.floor.mean + 3 * check.floor.std


def test_linspace_grid_collapses_narrow_directions(check):
    """On MRS's "linspace" grid the last model call is at t = T / n (noise 0.067 at n = 10) and the last step returns
    x0_hat there, shrinking the posterior's narrow direction (sd 0.046); the default "karras" grid ends at t = 1
    (noise 0.0074) and keeps it."""
    linspace = check(sample_posterior(10, solver="ode", timestep_spacing="linspace"))
    karras = check(sample_posterior(10, solver="ode"))
    print(check.describe("MRS ode-2, linspace grid, 10 NFE", linspace))
    print(check.describe("MRS ode-2, karras grid, 10 NFE", karras))
    assert linspace["eig_min"] < 0.5
    assert karras["eig_min"] > 0.9


CONVERGENCE_SAMPLES = 200


@pytest.fixture(scope="module")
def ode_reference() -> torch.Tensor:
    return sample_posterior(640, CONVERGENCE_SAMPLES, solver="ode")


@pytest.mark.parametrize(("solver_parameterization", "order"), [("data", 1), ("data", 2), ("noise", 2)])
def test_ode_solver_converges_at_its_order(ode_reference, solver_parameterization, order):
    """Pathwise, from the same x_T, against the second-order ODE solver at 640 calls (the log-log slope over 10 to 80
    calls)."""
    step_counts = [10, 20, 40, 80]
    errors = [distance_to_reference(
        sample_posterior(n, CONVERGENCE_SAMPLES, solver="ode", solver_order=order,
                         solver_parameterization=solver_parameterization), ode_reference) for n in step_counts]
    slope = -np.polyfit(np.log(step_counts), np.log(errors), 1)[0]
    print(f"ODE, {solver_parameterization} parameterisation, order {order}: errors {np.round(errors, 7).tolist()} "
          f"at {step_counts} calls, slope {slope:.2f}")
    assert abs(slope - order) < 0.3


# Single steps against the papers' formulas ----------------------------------------------------------------------------
def ir_sde_schedule(num_train_timesteps: int = 100, terminal_decay: float = 0.005):
    """IR-SDE's cosine rates theta_k and its dt, recomputed from the official code's definitions (numpy)."""
    steps = num_train_timesteps + 2
    x = np.linspace(0, steps, steps + 1)
    alphas_cumprod = np.cos(((x / steps) + 0.008) / 1.008 * np.pi * 0.5) ** 2
    thetas = 1 - (alphas_cumprod / alphas_cumprod[0])[1:-1]
    thetas_cumsum = np.cumsum(thetas) - thetas[0]
    dt = -math.log(terminal_decay) / thetas_cumsum[-1]
    return thetas, thetas_cumsum, dt


def forward_chain_moments(t: float, substeps: int, lam: float) -> tuple[float, float]:
    """Mean factor and variance of x_t - mu for x_0 - mu = 1, from IR-SDE's forward chain x <- x + theta_k (mu - x) dt
    + sigma_k sqrt(dt) z (sigma_k^2 = 2 lam^2 theta_k) run with ``substeps`` Euler steps per unit of time."""
    thetas, _, dt = ir_sde_schedule()
    mean, variance = 1.0, 0.0
    for k in range(1, math.ceil(t) + 1):
        duration = min(t - (k - 1), 1.0) * dt / substeps
        for _ in range(substeps):
            mean *= 1 - thetas[k] * duration
            variance = (1 - thetas[k] * duration) ** 2 * variance + 2 * lam**2 * thetas[k] * duration
    return mean, variance


@pytest.mark.parametrize("t", [37.0, 37.5, 100.0])
def test_marginals_are_those_of_ir_sde_forward_chain(t):
    """a_t and s_t^2 are the limit of IR-SDE's per-step chain (within its Euler error, which shrinks tenfold from 100
    to 1000 substeps), and add_noise draws have mean a x0 + b y and covariance s^2 I."""
    scheduler = MeanRevertingScheduler()
    lam = scheduler.config.max_sigma
    a, b, s = (float(c) for c in scheduler.path_coefficients(t))
    assert b == pytest.approx(1 - a, abs=1e-15)
    coarse, fine = forward_chain_moments(t, 100, lam), forward_chain_moments(t, 1000, lam)
    coarse_error = max(abs(coarse[0] - a) / a, abs(coarse[1] - s**2) / s**2)
    fine_error = max(abs(fine[0] - a) / a, abs(fine[1] - s**2) / s**2)
    print(f"t = {t}: a = {a:.6f}, s = {s:.6f}; forward chain relative error {coarse_error:.1e} (100 substeps), "
          f"{fine_error:.1e} (1000)")
    assert fine_error < 2e-3 and fine_error < coarse_error / 5

    num_draws = 20000
    clean = torch.tensor([0.4, -0.3], dtype=torch.float64).expand(num_draws, -1)
    degraded = torch.tensor([-0.1, 0.2], dtype=torch.float64).expand(num_draws, -1)
    noise = torch.randn(num_draws, 2, generator=seeded(3), dtype=torch.float64)
    draws = scheduler.add_noise(clean, degraded, noise, torch.full((num_draws,), t))
    mean_z = (draws.mean(0) - (a * clean[0] + b * degraded[0])) / (s / math.sqrt(num_draws))
    variance_z = (draws.var(0) - s**2) / (s**2 * math.sqrt(2 / num_draws))
    assert mean_z.abs().max() < Z_LIMIT and variance_z.abs().max() < Z_LIMIT


def test_theta_bar_is_ir_sde_cumulative_schedule():
    _, thetas_cumsum, dt = ir_sde_schedule()
    scheduler = MeanRevertingScheduler()
    torch.testing.assert_close(scheduler.theta_bars, torch.tensor(thetas_cumsum * dt), rtol=1e-12, atol=1e-14)
    assert scheduler.theta_bar(37.25).item() == pytest.approx((0.75 * thetas_cumsum[37] + 0.25 * thetas_cumsum[38]) * dt)


def one_step(scheduler: MeanRevertingScheduler, index: int, model_output, sample, degraded, seed: int = 5):
    """Step ``index`` of the grid alone (the first-order steps need no history)."""
    scheduler.set_timesteps(len(scheduler.timesteps))
    scheduler.set_begin_index(index)
    return scheduler.step(model_output, scheduler.timesteps[index], sample, degraded, generator=seeded(seed))


def fresh_noise(shape, seed: int = 5) -> torch.Tensor:
    return randn_tensor(shape, generator=seeded(seed), dtype=torch.float64)


def state_and_inputs(seed: int = 4):
    generator = seeded(seed)
    sample, degraded, prediction = (torch.randn(6, 3, generator=generator, dtype=torch.float64) for _ in range(3))
    return sample, degraded, prediction


def test_euler_maruyama_step_is_ir_sde_reverse_step():
    """On the unit grid: x_{k-1} = x_k - (theta_k (mu - x_k) - sigma_k^2 score) dt + sigma_k sqrt(dt) z, score =
    -eps / sigma_bar_k (IR-SDE's reverse_sde_step; the sign of z is immaterial)."""
    thetas, thetas_cumsum, dt = ir_sde_schedule()
    scheduler = MeanRevertingScheduler(solver="euler_maruyama", timestep_spacing="linspace")
    scheduler.set_timesteps(100)
    lam = scheduler.config.max_sigma
    sample, degraded, eps = state_and_inputs()
    for k in (100, 60, 1):
        index = 100 - k
        assert scheduler.timesteps[index].item() == k
        sigma_bar = lam * math.sqrt(1 - math.exp(-2 * thetas_cumsum[k] * dt))
        sigma = math.sqrt(2 * lam**2 * thetas[k])
        score = -eps / sigma_bar
        expected = (sample - (thetas[k] * (degraded - sample) - sigma**2 * score) * dt
                    + sigma * math.sqrt(dt) * fresh_noise(sample.shape))
        torch.testing.assert_close(one_step(scheduler, index, eps, sample, degraded).prev_sample, expected,
                                   rtol=1e-10, atol=1e-12)


def test_first_order_sde_step_is_ir_sde_posterior_step():
    """First-order data-prediction MRS SDE between neighbouring chain times is IR-SDE's "optimum" posterior sampler
    (reverse_optimum_step plus reverse_optimum_std noise)."""
    thetas, thetas_cumsum, dt = ir_sde_schedule()
    scheduler = MeanRevertingScheduler(solver="sde", solver_order=1, prediction_type="sample",
                                       timestep_spacing="linspace")
    scheduler.set_timesteps(100)
    lam = scheduler.config.max_sigma
    sample, degraded, x0 = state_and_inputs()
    for k in (100, 60, 2):
        decay_step = math.exp(-thetas[k] * dt)
        decay_now, decay_next = math.exp(-thetas_cumsum[k] * dt), math.exp(-thetas_cumsum[k - 1] * dt)
        state_weight = decay_step * (1 - decay_next**2) / (1 - decay_now**2)
        x0_weight = decay_next * (1 - decay_step**2) / (1 - decay_now**2)
        std = lam * math.sqrt((1 - decay_step**2) * (1 - decay_next**2) / (1 - decay_now**2))
        expected = (degraded + state_weight * (sample - degraded) + x0_weight * (x0 - degraded)
                    + std * fresh_noise(sample.shape))
        torch.testing.assert_close(one_step(scheduler, 100 - k, x0, sample, degraded).prev_sample, expected,
                                   rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("solver_parameterization", ["data", "noise"])
def test_first_order_ode_step_is_ddim(solver_parameterization):
    """In w = x - mu both first-order MRS ODE steps are DDIM: w_t = a_t (x0_hat - mu) + s_t eps_hat; the last step,
    to t = 0, returns x0_hat."""
    scheduler = MeanRevertingScheduler(solver="ode", solver_order=1, solver_parameterization=solver_parameterization)
    scheduler.set_timesteps(6)
    sample, degraded, eps = state_and_inputs()
    for index in range(6):
        t, t_next = scheduler.timesteps[index], ([*scheduler.timesteps.tolist(), 0.0])[index + 1]
        x0, eps_hat = scheduler.original_and_noise(eps, sample, degraded, t)
        (a, _, s), (a_next, _, s_next) = scheduler.path_coefficients(t), scheduler.path_coefficients(t_next)
        expected = degraded + ddim_step(x0 - degraded, eps_hat, a, s, a_next, s_next, eta=0.0)
        output = one_step(scheduler, index, eps, sample, degraded)
        torch.testing.assert_close(output.prev_sample, expected, rtol=1e-10, atol=1e-12)
    torch.testing.assert_close(output.prev_sample, output.pred_original_sample, rtol=0, atol=1e-12)


GAUSS_NODES, GAUSS_WEIGHTS = np.polynomial.legendre.leggauss(40)


def integrate(function, h: float) -> float:
    u = 0.5 * h * (GAUSS_NODES + 1)
    return float(0.5 * h * (GAUSS_WEIGHTS * function(u)).sum())


@pytest.mark.parametrize("h", [0.05, 0.7, 3.0])
def test_step_coefficients_are_the_exact_integrals(h):
    """The closed forms against quadrature of the exponential integrators' integrals, with the prediction linear in
    lambda (u = lambda - lambda_s from 0 to h): data ODE a_t int e^{u-h} D(u), data SDE 2 a_t int e^{2(u-h)} D(u),
    noise ODE / SDE (1 or 2) s_s (a_t / a_s) int e^{-u} E(u); SDE noise variances int 2 e^{2(u-h)} = int 2 e^{-2u}."""
    for stochastic, k in ((False, 1), (True, 2)):
        decay, c0, c1, noise = mrs_data_coefficients(h, stochastic)
        def weight(u, k=k):
            return k * np.exp(k * (u - h))

        assert decay == pytest.approx(math.exp(-k * h), rel=1e-13)
        assert c0 == pytest.approx(integrate(weight, h), rel=1e-12)
        assert c1 == pytest.approx(integrate(lambda u, w=weight: w(u) * u, h) / h, rel=1e-12)
        c0, c1, noise_by_noise = mrs_noise_coefficients(h, stochastic)
        assert c0 == pytest.approx(k * integrate(lambda u: np.exp(-u), h), rel=1e-12)
        assert c1 == pytest.approx(k * integrate(lambda u: np.exp(-u) * u, h) / h, rel=1e-12)
        variance = integrate(lambda u: 2 * np.exp(2 * (u - h)), h) if stochastic else 0.0
        assert noise**2 == pytest.approx(variance, rel=1e-12, abs=1e-15)
        assert noise_by_noise == noise


def test_float32_sampling_matches_float64():
    """The pipelines run in float32: from the same x_T (a_T = 0.005, so an eps-prediction's x0 is divided by 200 at
    the first step) the float32 ODE run stays within float32 noise of the float64 one."""
    runs = {}
    for dtype in (torch.float64, torch.float32):
        scheduler = MeanRevertingScheduler(solver="ode")
        model = ExactRestorationDenoiser(LAW, scheduler)
        degraded = DEGRADED.expand(64, -1).to(dtype)
        sample = scheduler.initial_sample(DEGRADED.expand(64, -1), seeded()).to(dtype)
        scheduler.set_timesteps(10)
        for t in scheduler.timesteps:
            model_output = model(torch.cat([sample, degraded], dim=1), t).sample
            sample = scheduler.step(model_output, t, sample, degraded).prev_sample
        runs[dtype] = sample
    assert runs[torch.float32].dtype == torch.float32
    difference = (runs[torch.float32].double() - runs[torch.float64]).abs().max().item()
    print(f"float32 against float64, ODE at 10 NFE: max |difference| {difference:.1e}")
    assert difference < 1e-4


def test_training_timesteps_are_uniform_on_the_continuous_range():
    scheduler = MeanRevertingScheduler()
    t = scheduler.sample_training_timesteps(20000, seeded(6))
    assert t.dtype == torch.float32 and bool((t > 0).all()) and bool((t <= 100).all())
    mean_z = (t.double().mean().item() - 50) / (100 / math.sqrt(12 * 20000))
    assert abs(mean_z) < Z_LIMIT
    assert len(torch.unique(t)) > 19000  # continuous, not the chain's integers


# Interop ------------------------------------------------------------------------------------------------------------
def public(config) -> dict:
    return {key: value for key, value in config.items() if not key.startswith("_")}


def test_round_trips_and_seeds(tmp_path):
    scheduler = MeanRevertingScheduler(max_sigma=0.3, solver="sde", prediction_type="v_prediction",
                                       timestep_spacing="lambda")
    first = sample_posterior(8, 16, scheduler=scheduler, seed=3)
    torch.testing.assert_close(sample_posterior(8, 16, scheduler=scheduler, seed=3), first, rtol=0, atol=0)
    assert not torch.equal(sample_posterior(8, 16, scheduler=scheduler, seed=4), first)

    scheduler.save_pretrained(tmp_path)
    for loaded in (MeanRevertingScheduler.from_pretrained(tmp_path), MeanRevertingScheduler.from_config(scheduler.config)):
        assert public(loaded.config) == public(scheduler.config)
        torch.testing.assert_close(sample_posterior(8, 16, scheduler=loaded, seed=3), first, rtol=0, atol=0)


def test_step_returns_a_tuple_without_return_dict():
    scheduler = MeanRevertingScheduler()
    scheduler.set_timesteps(3)
    sample, degraded, eps = state_and_inputs()
    output = scheduler.step(eps, scheduler.timesteps[0], sample, degraded, generator=seeded(), return_dict=False)
    assert isinstance(output, tuple) and len(output) == 2
    scheduler.set_timesteps(3)
    as_dict = scheduler.step(eps, scheduler.timesteps[0], sample, degraded, generator=seeded())
    assert isinstance(as_dict, RestorationSchedulerOutput)
    torch.testing.assert_close(as_dict.prev_sample, output[0], rtol=0, atol=0)


# Bad inputs ---------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_train_timesteps": 1}, "num_train_timesteps"),
        ({"num_train_timesteps": 100.0}, "num_train_timesteps"),
        ({"max_sigma": 0.0}, "max_sigma"),
        ({"max_sigma": float("inf")}, "max_sigma"),
        ({"terminal_decay": 1.0}, "terminal_decay"),
        ({"terminal_decay": 0.0}, "terminal_decay"),
        ({"theta_schedule": "sigmoid"}, "theta_schedule"),
        ({"solver": "heun"}, "solver"),
        ({"solver_order": 3}, "solver_order"),
        ({"solver_order": True}, "solver_order"),
        ({"solver_parameterization": "velocity"}, "solver_parameterization"),
        ({"timestep_spacing": "trailing"}, "timestep_spacing"),
        ({"prediction_type": "residual"}, "prediction_type"),
        ({"prediction_type": "residual_and_noise"}, "prediction_type"),
        ({"prediction_type": "flow_prediction"}, "prediction_type"),
    ],
)
def test_bad_config_raises(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MeanRevertingScheduler(**kwargs)


@pytest.mark.parametrize("num_inference_steps", [0, -3, 2.5, True])
def test_bad_step_count_raises(num_inference_steps):
    with pytest.raises(ValueError, match="num_inference_steps"):
        MeanRevertingScheduler().set_timesteps(num_inference_steps)


@pytest.mark.parametrize("t", [-1.0, 100.5, float("nan")])
def test_timesteps_outside_the_process_raise(t):
    with pytest.raises(ValueError, match="timesteps must lie in"):
        MeanRevertingScheduler().path_coefficients(torch.tensor([t]))


def test_bad_step_calls_raise():
    scheduler = MeanRevertingScheduler()
    sample, degraded, eps = state_and_inputs()
    with pytest.raises(ValueError, match="set_timesteps"):
        scheduler.step(eps, 100.0, sample, degraded)
    scheduler.set_timesteps(2)
    with pytest.raises(ValueError, match="model_output must have shape"):
        scheduler.step(eps[:, :2], scheduler.timesteps[0], sample, degraded)
    with pytest.raises(ValueError, match="one shape"):
        scheduler.step(eps, scheduler.timesteps[0], sample, degraded[:3])
    scheduler.step(eps, scheduler.timesteps[0], sample, degraded, generator=seeded())
    with pytest.raises(ValueError, match="at timestep"):
        scheduler.step(eps, scheduler.timesteps[0], sample, degraded)
    scheduler.set_timesteps(2)
    for t in scheduler.timesteps:
        sample = scheduler.step(eps, t, sample, degraded, generator=seeded()).prev_sample
    with pytest.raises(ValueError, match="step called 3 times"):
        scheduler.step(eps, scheduler.timesteps[-1], sample, degraded)
