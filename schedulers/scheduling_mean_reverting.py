"""The mean-reverting SDE of IR-SDE, sampled by the MR Sampler (MRS) or by Euler–Maruyama.

The process: "Image Restoration with Mean-Reverting Stochastic Differential Equations" (Ziwei Luo, Fredrik K.
Gustafsson, Zheng Zhao, Jens Sjölund, Thomas B. Schön, ICML 2023, arXiv 2301.11699; code
github.com/Algolzw/image-restoration-sde). The sampler: "MRS: A Fast Sampler for Mean Reverting Diffusion based on ODE
and SDE Solvers" (Ao Li, Wei Fang, Hongbo Zhao, Le Lu, Ge Yang, Minfeng Xu, ICLR 2025, arXiv 2502.07856; code
github.com/grrrute/mr-sampler).

The forward SDE drifts the clean image ``x0`` toward the degraded image ``mu = y`` with stationary variance
``lam^2`` (``lam = max_sigma``, ``sigma_t^2 / theta_t = 2 lam^2``):

    dx = theta_t (mu - x) dt + sigma_t dw
    x_t = mu + (x0 - mu) exp(-theta_bar_t) + lam sqrt(1 - exp(-2 theta_bar_t)) eps,     theta_bar_t = int_0^t theta

so in the shared restoration form ``x_t = a x0 + b y + s eps`` (``schedulers.restoration``): ``a = exp(-theta_bar_t)``,
``b = 1 - a``, ``s = lam sqrt(1 - a^2)``.

Time. IR-SDE is a chain of ``T = num_train_timesteps`` steps with rates ``theta_1 .. theta_T`` (its cosine schedule:
``theta_i = 1 - abar_{i+1}``, ``abar_k = cos^2(((k / (T + 2)) + 0.008) / 1.008 * pi / 2)`` normalised by ``abar_0``),
scaled by ``dt`` so that ``theta_bar_T = -log(terminal_decay)`` (its ``eps``, 0.005 in its configs). Here time is
continuous: the model-facing timestep ``t`` runs over ``[0, T]`` and ``theta_bar(t)`` interpolates the chain's
``theta_bar_k = dt (theta_1 + ... + theta_k)`` linearly, which is the SDE with ``theta`` held at ``theta_k dt`` on
``(k - 1, k]``: at integer ``t`` the marginals are IR-SDE's, so a model trained on its chain can be sampled here.
Training draws ``t`` uniformly from ``(0, T]``, because the samplers query the model between the integers.

Sampling starts at ``x_T = mu + lam eps``: the marginal at ``T`` with ``a_T (x0 - mu)`` dropped (``a_T =
terminal_decay``) and the variance ``lam^2 (1 - a_T^2)`` rounded up.

MRS. In ``w = x - mu`` the process is an ordinary diffusion ``w_t = a_t (x0 - mu) + s_t eps`` with half log-SNR
``lambda_t = log(a_t / s_t)``, so its probability-flow ODE and reverse SDE have exponential-integrator solutions (those
of DPM-Solver, DPM-Solver++ and their SDE variants). With ``h = lambda_t - lambda_s > 0`` from grid time ``s`` to the
next one ``t``, the data predictions ``D0 = x0_hat_s - mu`` and ``D1 = (h / h_prev) (D0 - D_prev)`` (order 2;
``h_prev`` the previous step's ``h``), or the noise predictions ``E0 = eps_hat_s``, ``E1`` likewise:

    data,  ODE (k = 1) / SDE (k = 2):
        w_t = (a_t / a_s) e^{-k h} w_s + a_t (c0 D0 + c1 D1) + s_t n z,
        c0 = 1 - e^{-k h},   c1 = 1 - c0 / (k h),   n = 0 (ODE) or sqrt(1 - e^{-2 h}) (SDE)
    noise, ODE (k = 1) / SDE (k = 2):
        w_t = (a_t / a_s) (w_s - s_s (c0 E0 + c1 E1) + s_s n z),
        c0 = k (1 - e^{-h}),   c1 = k ((1 - e^{-h}) / h - e^{-h}),   n as above

(the noise form is MRS's ``s_t (e^h - 1)`` rewritten with ``s_t e^h = a_t s_s / a_s``, finite at ``s_t = 0``). The
first step is first order (no history) and so is the last one, to ``t = 0`` (``lambda = inf``): there every data
solver returns ``x0_hat``. First-order data SDE is the exact posterior ``q(x_t | x_s, x0_hat)``, IR-SDE's "optimum"
posterior sampler; first-order ODE is DDIM.

Euler–Maruyama (IR-SDE's own sampler), with ``score = -eps_hat / s_s`` and the exact increment ``d = theta_bar_s -
theta_bar_t`` of the step (at unit steps on the integer grid, IR-SDE's ``theta_t dt``):

    w_t = (1 + d) w_s - 2 lam^2 d eps_hat / s_s + lam sqrt(2 d) z

Grids (``timestep_spacing``; ``n`` model calls from ``t = T`` down, then the step to ``t = 0``): ``"karras"``, the
default, ``t_i = (T^(1/7) (1 - i / (n - 1)) + i / (n - 1))^7`` from ``T`` to 1 (MRS's ``karras-t``); ``"linspace"``,
``t_i = T (1 - i / n)`` (MRS's ``linspace``); ``"lambda"``, ``lambda`` evenly spaced from ``lambda(T)`` to
``lambda(1)`` (MRS's ``linear-lambda``, whose ``lambda(0) = inf`` end is replaced by the chain's first step). The last
step returns the last call's ``x0_hat``, which shrinks every direction whose posterior spread is below that call's
noise: ``s(T / n) = 0.17 lam`` on ``linspace`` with ``n = 10``, against ``s(1) = 0.019 lam`` on the other two grids.
On an exact oracle with a posterior spread of ``0.12 lam`` the Karras grid keeps it at 10 calls, ``linspace`` loses
70 % of its variance, and ``lambda`` spaces the middle of the path too coarsely for the SDE solver.
"""

from __future__ import annotations

import math

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from .restoration import RestorationScheduler, RestorationSchedulerOutput

SOLVERS = ("sde", "ode", "euler_maruyama")
SOLVER_PARAMETERIZATIONS = ("data", "noise")
THETA_SCHEDULES = ("cosine", "linear", "constant")
TIMESTEP_SPACINGS = ("karras", "linspace", "lambda")
KARRAS_RHO = 7.0  # MRS's default for its "karras-t" grid


# The process ---------------------------------------------------------------------------------------------------------
def ir_sde_thetas(num_train_timesteps: int, schedule: str) -> torch.Tensor:
    """IR-SDE's unscaled rates ``theta_0 .. theta_T`` (float64; ``theta_0`` only offsets its cumulative sum)."""
    steps = num_train_timesteps + 1
    if schedule == "cosine":
        # Improved DDPM's cosine abar over T + 2 steps, its first and last values dropped.
        k = torch.arange(num_train_timesteps + 3, dtype=torch.float64)
        abar = torch.cos((k / (num_train_timesteps + 2) + 0.008) / 1.008 * math.pi / 2) ** 2
        return 1 - (abar / abar[0])[1:-1]
    if schedule == "linear":
        scale = 1000 / steps
        return torch.linspace(scale * 1e-4, scale * 0.02, steps, dtype=torch.float64)
    if schedule == "constant":
        return torch.ones(steps, dtype=torch.float64)
    raise ValueError(f"theta_schedule must be one of {THETA_SCHEDULES}, got {schedule!r}")


def mean_reverting_theta_bars(thetas: torch.Tensor, terminal_decay: float) -> torch.Tensor:
    """``theta_bar_0 .. theta_bar_T``: ``dt (theta_1 + ... + theta_k)`` with ``dt`` such that
    ``exp(-theta_bar_T) = terminal_decay``."""
    sums = torch.cat([torch.zeros(1, dtype=thetas.dtype), thetas[1:].cumsum(0)])
    return sums * (-math.log(terminal_decay) / sums[-1])


def interpolate_linearly(x: torch.Tensor, knots_x: torch.Tensor, knots_y: torch.Tensor) -> torch.Tensor:
    """The piecewise-linear function through ``(knots_x, knots_y)`` (``knots_x`` increasing) at ``x`` inside them."""
    high = torch.searchsorted(knots_x, x).clamp(1, knots_x.numel() - 1)
    low = high - 1
    weight = (x - knots_x[low]) / (knots_x[high] - knots_x[low])
    return torch.lerp(knots_y[low], knots_y[high], weight)


def half_log_snr(theta_bar: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """``lambda = log(a / s)`` with ``a = exp(-theta_bar)``, ``s = lam sqrt(1 - a^2)``."""
    return -theta_bar - math.log(max_sigma) - 0.5 * torch.log(-torch.expm1(-2 * theta_bar))


def theta_bar_from_half_log_snr(half_log_snr: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """The inverse of ``half_log_snr``: ``theta_bar = log1p(exp(-2 lambda) / lam^2) / 2``."""
    return 0.5 * torch.log1p(torch.exp(-2 * half_log_snr) / max_sigma**2)


def inference_times(num_inference_steps: int, spacing: str, theta_bars: torch.Tensor, max_sigma: float) -> torch.Tensor:
    """The ``n`` model-facing times (float64, descending from ``T = len(theta_bars) - 1``) of a sampling grid:
    ``"linspace"``: ``T (1 - i / n)``; ``"karras"``: ``(T^(1/7) (1 - i / (n - 1)) + i / (n - 1))^7``, from ``T`` to 1;
    ``"lambda"``: evenly spaced in ``half_log_snr`` from ``t = T`` to ``t = 1``."""
    num_train_timesteps = theta_bars.numel() - 1
    train_times = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
    fraction = torch.linspace(0, 1, num_inference_steps, dtype=torch.float64)
    if spacing == "linspace":
        times = num_train_timesteps * (1 - torch.arange(num_inference_steps, dtype=torch.float64) / num_inference_steps)
    elif spacing == "karras":
        times = (num_train_timesteps ** (1 / KARRAS_RHO) * (1 - fraction) + fraction) ** KARRAS_RHO
    else:
        ends = half_log_snr(theta_bars[[num_train_timesteps, 1]], max_sigma)
        lambdas = torch.lerp(ends[0], ends[1], fraction)
        theta_bar = theta_bar_from_half_log_snr(lambdas, max_sigma).clamp(0, float(theta_bars[-1]))
        times = interpolate_linearly(theta_bar, theta_bars, train_times)
    times[0] = num_train_timesteps  # exactly T, whatever the rounding on the way
    return times


# One step's coefficients (pure functions of the log-SNR step h) -------------------------------------------------------
def mrs_data_coefficients(h: float, stochastic: bool) -> tuple[float, float, float, float]:
    """``(decay, c0, c1, n)`` of the data-prediction step
    ``w_t = (a_t / a_s) decay w_s + a_t (c0 D0 + c1 D1) + s_t n z`` (``h = inf`` lands on ``x0_hat``)."""
    k = 2 if stochastic else 1
    decay = math.exp(-k * h)
    c0 = -math.expm1(-k * h)
    c1 = 1 - c0 / (k * h)
    noise = math.sqrt(-math.expm1(-2 * h)) if stochastic else 0.0
    return decay, c0, c1, noise


def mrs_noise_coefficients(h: float, stochastic: bool) -> tuple[float, float, float]:
    """``(c0, c1, n)`` of the noise-prediction step ``w_t = (a_t / a_s) (w_s - s_s (c0 E0 + c1 E1) + s_s n z)``."""
    k = 2 if stochastic else 1
    c0 = -k * math.expm1(-h)
    c1 = k * (-math.expm1(-h) / h - math.exp(-h))
    noise = math.sqrt(-math.expm1(-2 * h)) if stochastic else 0.0
    return c0, c1, noise


def euler_maruyama_coefficients(theta_increment: float, max_sigma: float,
                                noise_std: float) -> tuple[float, float, float]:
    """``(state, eps, n)`` of IR-SDE's reverse Euler–Maruyama step ``w_t = state w_s + eps eps_hat + n z`` over the
    increment ``d = theta_bar_s - theta_bar_t``, from a state of noise ``s_s = noise_std``: the reverse drift
    ``theta (w + 2 lam^2 score)`` with ``score = -eps_hat / s_s``, the diffusion ``lam sqrt(2 theta)``."""
    state = 1 + theta_increment
    eps_weight = -2 * max_sigma**2 * theta_increment / noise_std
    return state, eps_weight, max_sigma * math.sqrt(2 * theta_increment)


class MeanRevertingScheduler(RestorationScheduler):
    """IR-SDE's mean-reverting SDE, sampled by MRS's ODE or SDE solver (first or second order, in data or noise
    prediction) or by IR-SDE's Euler–Maruyama (see the module docstring for the equations).

    One model call per step. ``set_timesteps(n)`` takes any ``n >= 1``: time is continuous.

    Args:
        num_train_timesteps: ``T``, IR-SDE's chain length (100 in its configs); the model sees ``t`` in ``[0, T]``.
        max_sigma: ``lam``, the stationary noise level, in the units of the images the model sees (the pipelines'
            ``[-1, 1]``: MRS's DA-CLIP model uses ``max_sigma = 50`` on the 0..255 scale, ``100 / 255`` here).
        terminal_decay: ``a_T = exp(-theta_bar_T)``, IR-SDE's ``eps`` (0.005 in its configs), in ``(0, 1)``.
        theta_schedule: IR-SDE's ``"cosine"`` (its configs'), ``"linear"`` or ``"constant"`` rates.
        prediction_type: ``"epsilon"`` (IR-SDE's), ``"sample"`` or ``"v_prediction"`` (the base class's
            ``a eps - s x0``; MRS's official code reads a velocity model as ``lam a eps - sqrt(1 - a^2) (x0 - mu)``,
            another target, so such a model's output must be converted first).
        solver: ``"sde"`` or ``"ode"`` (MRS), or ``"euler_maruyama"`` (IR-SDE's reverse SDE, first order; it ignores
            ``solver_order`` and ``solver_parameterization``).
        solver_order: 1 or 2, the order of the MRS solvers.
        solver_parameterization: what MRS integrates, ``"data"`` (``x0_hat``; MRS's recommendation, stable at few
            steps) or ``"noise"`` (``eps_hat``), whatever the model predicts.
        timestep_spacing: ``"karras"`` (dense near ``t = 0``), ``"linspace"`` (evenly spaced in ``t``) or
            ``"lambda"`` (in the half log-SNR); see the module docstring.
    """

    prediction_types = ("epsilon", "sample", "v_prediction")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 100,
        max_sigma: float = 100 / 255,
        terminal_decay: float = 0.005,
        theta_schedule: str = "cosine",
        prediction_type: str = "epsilon",
        solver: str = "sde",
        solver_order: int = 2,
        solver_parameterization: str = "data",
        timestep_spacing: str = "karras",
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) or num_train_timesteps < 2:
            raise ValueError(f"num_train_timesteps must be an integer >= 2, got {num_train_timesteps!r}")
        if isinstance(max_sigma, bool) or not (isinstance(max_sigma, int | float) and math.isfinite(max_sigma)
                                               and max_sigma > 0):
            raise ValueError(f"max_sigma must be a positive finite number, got {max_sigma!r}")
        if not (isinstance(terminal_decay, int | float) and 0 < terminal_decay < 1):
            raise ValueError(f"terminal_decay (exp(-theta_bar_T)) must lie in (0, 1), got {terminal_decay!r}")
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if solver_order not in (1, 2) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1 or 2, got {solver_order!r}")
        if solver_parameterization not in SOLVER_PARAMETERIZATIONS:
            raise ValueError(f"solver_parameterization must be one of {SOLVER_PARAMETERIZATIONS}, got "
                             f"{solver_parameterization!r}")
        if timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        self.check_prediction_type()

        self.theta_bars = mean_reverting_theta_bars(ir_sde_thetas(num_train_timesteps, theta_schedule), terminal_decay)
        self._train_times = torch.arange(num_train_timesteps + 1, dtype=torch.float64)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._grid: list[dict[str, float]] = []
        self._history: tuple[float, torch.Tensor] | None = None

    # The process -----------------------------------------------------------------------------------------------------
    def theta_bar(self, timesteps) -> torch.Tensor:
        """``theta_bar(t)`` (float64) at model-facing timesteps in ``[0, T]``."""
        timesteps = torch.as_tensor(timesteps).to(torch.float64)
        num_train_timesteps = self.config.num_train_timesteps
        if bool(((timesteps < 0) | (timesteps > num_train_timesteps)).any()) or not bool(timesteps.isfinite().all()):
            raise ValueError(f"timesteps must lie in [0, num_train_timesteps={num_train_timesteps}], got "
                             f"{timesteps.flatten().tolist()}")
        device = timesteps.device
        return interpolate_linearly(timesteps.cpu(), self._train_times, self.theta_bars).to(device)

    def path_coefficients(self, timesteps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, 1 - a, lam sqrt(1 - a^2))`` with ``a = exp(-theta_bar(t))``, float64."""
        theta_bar = self.theta_bar(timesteps)
        a = torch.exp(-theta_bar)
        return a, 1 - a, self.config.max_sigma * torch.sqrt(-torch.expm1(-2 * theta_bar))

    def sample_training_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                                  device: torch.device | str = "cpu") -> torch.Tensor:
        """``t`` uniform on ``(0, T]`` (float32): the samplers evaluate the model between the chain's integers."""
        uniform = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        return (self.config.num_train_timesteps * (1 - uniform)).to(device=device, dtype=torch.float32)

    def initial_sample(self, degraded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_T = mu + lam eps`` (IR-SDE's and MRS's start; see the module docstring)."""
        noise = randn_tensor(degraded.shape, generator=generator, device=degraded.device, dtype=degraded.dtype)
        return degraded + self.config.max_sigma * noise

    # The grid ----------------------------------------------------------------------------------------------------------
    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """``num_inference_steps`` model evaluations from ``t = T`` down (``timestep_spacing``), then ``t = 0``."""
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int) or num_inference_steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        num_train_timesteps = self.config.num_train_timesteps
        times = inference_times(num_inference_steps, self.config.timestep_spacing, self.theta_bars,
                                self.config.max_sigma)
        # The model sees float32 timesteps; the steps use exactly those times, and t = 0 after the last one.
        times = torch.cat([times.to(torch.float32), torch.zeros(1)])
        if bool((times[1:] >= times[:-1]).any()):
            raise ValueError(f"{num_inference_steps} steps do not fit in float32 timesteps on [0, {num_train_timesteps}]")
        theta_bars = self.theta_bar(times)
        a, _, s = self.path_coefficients(times)
        lambdas = torch.where(s > 0, torch.log(a / s), math.inf)
        self._grid = [{"t": float(t), "theta_bar": float(tb), "a": float(a_), "s": float(s_), "lambda": float(lam)}
                      for t, tb, a_, s_, lam in zip(times, theta_bars, a, s, lambdas, strict=True)]
        self.num_inference_steps = num_inference_steps
        self.timesteps = times[:-1].to(device)
        self._history = None
        self._reset_step_index()

    # The update ------------------------------------------------------------------------------------------------------
    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        degraded: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RestorationSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step from this grid time to the next (to ``t = 0`` after the last evaluation)."""
        index = self.begin_step(model_output, timestep, sample, degraded)
        current = self.timesteps[index]
        here, there = self._grid[index], self._grid[index + 1]

        x0, eps = self.original_and_noise(model_output, sample, degraded, current)
        shifted = sample - degraded  # w = x - mu
        if self.config.solver == "euler_maruyama":
            state, eps_weight, noise_std = euler_maruyama_coefficients(
                here["theta_bar"] - there["theta_bar"], self.config.max_sigma, here["s"])
            shifted_next = state * shifted + eps_weight * eps
        else:
            shifted_next, noise_std = self._mrs_update(shifted, x0 - degraded, eps, here, there)
        if noise_std > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            shifted_next = shifted_next + noise_std * noise
        prev_sample = degraded + shifted_next
        if not return_dict:
            return prev_sample, x0
        return RestorationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _mrs_update(self, shifted: torch.Tensor, data: torch.Tensor, noise: torch.Tensor, here: dict[str, float],
                    there: dict[str, float]) -> tuple[torch.Tensor, float]:
        """MRS's step of ``w`` (module docstring) without its fresh noise, and that noise's standard deviation, from
        the data prediction ``D0 = x0_hat - mu`` or the noise prediction ``E0 = eps_hat``."""
        stochastic = self.config.solver == "sde"
        by_data = self.config.solver_parameterization == "data"
        prediction = data if by_data else noise
        h = there["lambda"] - here["lambda"]
        history, self._history = self._history, (here["lambda"], prediction)
        if by_data:
            decay, c0, c1, noise_scale = mrs_data_coefficients(h, stochastic)
        else:
            c0, c1, noise_scale = mrs_noise_coefficients(h, stochastic)
        combined = c0 * prediction
        # The step to t = 0 (h = inf) stays first order: no expansion in lambda reaches that far.
        if self.config.solver_order == 2 and history is not None and math.isfinite(h):
            previous_lambda, previous_prediction = history
            combined = combined + c1 * (h / (here["lambda"] - previous_lambda)) * (prediction - previous_prediction)
        a_ratio = there["a"] / here["a"]
        if by_data:
            return (a_ratio * decay) * shifted + there["a"] * combined, there["s"] * noise_scale
        return a_ratio * (shifted - here["s"] * combined), a_ratio * here["s"] * noise_scale
