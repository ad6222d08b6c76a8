"""Diffusion bridges for restoration: the DDBM process, sampled with DBIM or with DDBM's own hybrid sampler.

Process: "Denoising Diffusion Bridge Models" (Linqi Zhou, Aaron Lou, Samar Khanna, Stefano Ermon; ICLR 2024,
arXiv 2309.16948; code github.com/alexzhou907/DDBM). Sampler: "Diffusion Bridge Implicit Models" (Kaiwen Zheng,
Guande He, Jianfei Chen, Fan Bao, Jun Zhu; ICLR 2025, arXiv 2405.15885; code github.com/thu-ml/DiffusionBridge).

**The process.** A reference diffusion ``dx = f_t x dt + g_t dw`` with ``x_t | x0 ~ N(alpha_t x0, sigma_t^2 I)`` and
noise ratio ``rho_t = sigma_t / alpha_t`` (``SNR_t = 1 / rho_t^2``) runs on the paper's time ``t`` in ``[0, T]``:

    VP (bridge_type="vp", T = 1):          alpha_t = exp(-B_t / 2),  rho_t^2 = exp(B_t) - 1,
                                           B_t = beta_min t + beta_d t^2 / 2,
                                           f_t = -(beta_min + beta_d t) / 2,  g_t^2 = beta_min + beta_d t
    VE (bridge_type="ve", T = sigma_max):  alpha_t = 1,  rho_t = sigma_t = t,  f_t = 0,  g_t^2 = 2 t

Pinned at ``x_T = y`` (the degraded image) it is the bridge ``q(x_t | x0, y) = N(a_t x0 + b_t y, s_t^2 I)`` with
``r_t = SNR_T / SNR_t = rho_t^2 / rho_T^2``:

    a_t = alpha_t (1 - r_t),     b_t = (alpha_t / alpha_T) r_t,     s_t = sigma_t sqrt(1 - r_t)

**Time.** The model sees ``timestep = num_train_timesteps * t / T`` (so ``[0, num_train_timesteps]``, larger is closer
to ``y``). DDBM feeds its network ``250 log t`` instead; a ported DDBM checkpoint needs that embedding (and its
preconditioning, below) in a wrapper. Training draws ``t ~ U[t_min, T]``: DDBM's ``real-uniform`` schedule sampler,
which for the VE bridge is uniform in ``sigma = t``.

**Prediction.** The model predicts ``x0`` (``prediction_type="sample"``). DDBM wraps its network in EDM-style
preconditioning, ``x0_hat = c_skip x_t + c_out F(c_in x_t)``; that is a parametrisation of the network, not of the
process, and this scheduler keeps the plain ``x0`` prediction that the shared trainer (whose loss calls the model on
``x_t`` directly, without ``scale_model_input``), ``training_target`` and the exact oracle assume.
``scale_model_input`` is the identity.

**DBIM** (``solver="dbim"``). With ``eps_hat = (x_s - a_s x0_hat - b_s y) / s_s``, one step from ``s`` to ``t < s``:

    x_t = a_t x0_hat + b_t y + sqrt(s_t^2 - c^2) eps_hat + c z,        c = eta sigma_t sqrt(1 - SNR_s / SNR_t)

``c`` at ``eta = 1`` is the standard deviation of the Markov bridge's posterior ``q(x_t | x_s, x0)``: DDBM's ancestral
step; ``eta = 0`` is deterministic. The first model call is at ``t = T`` on ``x_T = y``, where ``s_T = 0`` and
``eps_hat`` does not exist: that step draws all of its noise fresh whatever ``eta`` is (``c = s_t``), DBIM's booting
noise. ``set_timesteps(n)`` makes ``n`` model calls (the paper's NFE): at ``T``, then at ``n - 1`` times from
``T - 1e-3`` down, and the last step lands on ``t_min`` (with its noise: the state there has standard deviation
``s_{t_min}``, ``3e-3`` for the default VP bridge; the reference code drops that last draw). The grid is the paper's,
uniform in ``t``, on the VP bridge (the only one DBIM was run on). On the VE bridge a uniform grid leaves the last
model call at ``t = T / (n - 1)`` (9 for 10 calls and ``T = 80``), far above the scale of images, and the result is
nearly the posterior mean (on the test oracle: sliced W2 0.29 at 10 and 0.22 at 50 calls, against a noise floor of
0.013), so DBIM uses EDM's grid (``rho = 7``) there, as DDBM does.

DBIM's higher-order solvers (``solver_order`` 2 or 3, ``eta = 0``) integrate the deterministic DBIM ODE exactly in its
linear part; in ``lambda_t = log(a_t / s_t)``

    x_t = (s_t / s_s) (x_s - b_s y) + b_t y + s_t int_{lambda_s}^{lambda_t} e^lambda x0(lambda) d lambda

and a Taylor expansion of ``x0`` at ``lambda_s``, with derivatives ``x0'``, ``x0''`` from divided differences of the
last ``x0_hat`` (multistep, one model call per step), gives

    x_t = a_t (x0_hat + phi_2(h) x0' + phi_3(h) x0'') + b_t y + s_t eps_hat,      h = lambda_t - lambda_s
    phi_2(h) = h - 1 + e^-h,      phi_3(h) = h^2 / 2 - h + 1 - e^-h

As in the reference code the first step after booting and the last step are first order, and the order grows by one
per step in between.

**DDBM** (``solver="ddbm"``, the baseline). The bridge score and the h-transform term ``grad log p(y | x_t)`` are

    score_t = -(x - a_t x0_hat - b_t y) / s_t^2 = -eps_hat / s_t
    h_t     = ((alpha_t / alpha_T) y - x) / (alpha_t^2 (rho_T^2 - rho_t^2))

with the reverse SDE's drift ``f_t x - g_t^2 (score_t - h_t)`` and the probability-flow ODE's ``f_t x - g_t^2
(score_t / 2 - h_t)``. On EDM's grid (``rho = 7``) from ``T - 1e-4`` to ``t_min``, then ``0``, each interval
``t_i -> t_{i+1}`` is, starting from ``x = y`` at ``T - 1e-4`` as the reference code does:

    Euler-Maruyama on the SDE (churn > 0):  t_hat = t_i + churn (t_{i+1} - t_i),
                                x <- x + drift_SDE(x, t_i) (t_hat - t_i) + g_{t_i} sqrt(t_i - t_hat) z
    Heun on the ODE:            x' = x + d (t_{i+1} - t_hat),  d = drift_ODE(x, t_hat)
                                x <- x + (d + drift_ODE(x', t_{i+1})) / 2 (t_{i+1} - t_hat)   (Euler on the last one)

so ``set_timesteps(n)`` makes ``3 n - 1`` model calls (``2 n - 1`` without churn; then the sampler is deterministic
from ``x = y`` and every chain ends at the same point). Each is one entry of
``timesteps``, as in diffusers' ``HeunDiscreteScheduler``: the Heun predictor returns ``x'`` and the corrector, called
at ``t_{i+1}`` on ``x'``, finishes the step from the state it kept.
"""

from __future__ import annotations

import itertools
import math
from typing import NamedTuple

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from diffusers_ext.diffusion_math import noise_preserving_step

from .restoration import RestorationScheduler, RestorationSchedulerOutput

BRIDGE_TYPES = ("vp", "ve")
SOLVERS = ("dbim", "ddbm")
TIMESTEP_SPACINGS = ("uniform", "karras")
# The reference codes' smallest times (their ``sigma_min``), in the paper's time.
DEFAULT_T_MIN = {"vp": 1e-4, "ve": 2e-3}
# DBIM's grid starts at T - 1e-3 after the booting call at T; DDBM's at T - 1e-4 (both codes, in the paper's time).
DBIM_GRID_START_OFFSET = 1e-3
DDBM_GRID_START_OFFSET = 1e-4


class BridgePoint(NamedTuple):
    """The process at one paper time ``t``: ``alpha_t``, ``rho_t^2``, the bridge's ``(a, b, s)`` and the reference
    SDE's ``f_t``, ``g_t^2`` (python floats)."""

    t: float
    alpha: float
    rho_sq: float
    a: float
    b: float
    s: float
    f: float
    g_sq: float


# The numerical core ------------------------------------------------------------------------------------------------
def vp_alpha_and_noise_ratio(t: torch.Tensor, beta_d: float, beta_min: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, rho_t^2)`` of DDBM's VP schedule at paper times ``t``: ``alpha_t = exp(-B_t / 2)``, ``rho_t^2 =
    exp(B_t) - 1`` with ``B_t = beta_min t + beta_d t^2 / 2`` (``expm1`` keeps ``rho_t^2`` accurate near 0)."""
    integrated_beta = beta_min * t + 0.5 * beta_d * t**2
    return torch.exp(-0.5 * integrated_beta), torch.expm1(integrated_beta)


def bridge_coefficients(alpha: torch.Tensor, rho_sq: torch.Tensor, alpha_end: float, rho_sq_end: float
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(a_t, b_t, s_t)`` of the bridge pinned at ``x_T = y``, from ``(alpha_t, rho_t^2)`` and their values at
    ``T``: ``a = alpha (1 - r)``, ``b = (alpha / alpha_T) r``, ``s = alpha rho sqrt(1 - r)``, with
    ``r = rho^2 / rho_T^2``."""
    snr_ratio = rho_sq / rho_sq_end  # SNR_T / SNR_t
    kept = (1 - snr_ratio).clamp(min=0)
    return alpha * kept, alpha / alpha_end * snr_ratio, alpha * (rho_sq * kept).sqrt()


def bridge_posterior_std(alpha_next: float, rho_sq_next: float, rho_sq: float) -> float:
    """Standard deviation of the Markov bridge's posterior ``q(x_t | x_s, x0)``, ``t < s``:
    ``sigma_t sqrt(1 - SNR_s / SNR_t) = alpha_t rho_t sqrt(1 - rho_t^2 / rho_s^2)``."""
    return alpha_next * math.sqrt(max(rho_sq_next * (1 - rho_sq_next / rho_sq), 0.0))


def dbim_taylor_terms(x0_history: list[torch.Tensor], lambdas: list[float], lambda_next: float) -> torch.Tensor:
    """``phi_2(h) x0' + phi_3(h) x0''`` of DBIM's order-``len(x0_history)`` step (2 or 3), ``h = lambda_next -
    lambdas[0]``; the derivatives in ``lambda`` at the newest point (``x0_history[0]``, newest first) are those of the
    polynomial through the stored ``x0_hat``: a backward difference, or the quadratic's first and second
    derivatives."""
    h = lambda_next - lambdas[0]
    phi_2 = h + math.expm1(-h)
    phi_3 = h**2 / 2 - h - math.expm1(-h)
    h_1 = lambdas[0] - lambdas[1]
    slope_1 = (x0_history[0] - x0_history[1]) / h_1
    if len(x0_history) == 2:
        return phi_2 * slope_1
    h_2 = lambdas[1] - lambdas[2]
    slope_2 = (x0_history[1] - x0_history[2]) / h_2
    second = 2 * (slope_1 - slope_2) / (h_1 + h_2)
    first = slope_1 + h_1 * second / 2
    return phi_2 * first + phi_3 * second


def bridge_drift(sample: torch.Tensor, degraded: torch.Tensor, eps_hat: torch.Tensor, point: BridgePoint,
                 alpha_end: float, rho_sq_end: float, score_weight: float) -> torch.Tensor:
    """DDBM's drift ``f_t x - g_t^2 (w score_t - h_t)`` in the paper's time: ``w = 1`` for the reverse SDE, ``1/2``
    for the probability-flow ODE (see the module docstring)."""
    score = -eps_hat / point.s
    log_h_gradient = (point.alpha / alpha_end * degraded - sample) / (point.alpha**2 * (rho_sq_end - point.rho_sq))
    return point.f * sample - point.g_sq * (score_weight * score - log_h_gradient)


def karras_times(start: float, end: float, count: int, rho: float) -> torch.Tensor:
    """EDM's ``count`` times from ``start`` down to ``end``, uniform in ``t^(1/rho)`` (just ``start`` for one),
    float64."""
    ramp = torch.linspace(0, 1, count, dtype=torch.float64)
    return (start ** (1 / rho) + ramp * (end ** (1 / rho) - start ** (1 / rho))) ** rho


class BridgeScheduler(RestorationScheduler):
    """The DDBM diffusion bridge from the clean image (``t = 0``) to the degraded one (``t = T``), sampled with DBIM
    (default) or with DDBM's hybrid SDE/Heun sampler; see the module docstring for the equations.

    Args:
        num_train_timesteps: the model-facing time scale: the model sees ``num_train_timesteps * t / T``.
        bridge_type: ``"vp"`` (DDBM's VP schedule, ``T = 1``) or ``"ve"`` (``sigma_t = t``, ``T = sigma_max``).
        beta_d, beta_min: the VP schedule's ``B_t = beta_min t + beta_d t^2 / 2`` (DDBM: 2 and 0.1).
        sigma_max: ``T`` of the VE bridge (DDBM: 80).
        t_min: the smallest time, in the paper's time (``None``: the reference codes' 1e-4 for VP, 0.002 for VE):
            training draws ``t`` in ``[t_min, T]`` and sampling ends there (DBIM) or steps from there to 0 (DDBM).
        prediction_type: ``"sample"`` (``x0``), the papers' only one.
        solver: ``"dbim"`` (one model call per step) or ``"ddbm"`` (Euler-Maruyama and Heun; ``3 n - 1`` calls for
            ``n`` steps, ``2 n - 1`` without churn).
        eta: DBIM's stochasticity in ``[0, 1]``: 0 deterministic, 1 the Markov bridge's ancestral step.
        solver_order: DBIM's order, 1, 2 or 3 (orders 2 and 3 are deterministic: ``eta = 0``).
        churn_step_ratio: DDBM's share of each interval taken by the stochastic Euler-Maruyama step, in ``[0, 1)``
            (the DDBM paper: 0.33).
        rho: the exponent of EDM's grid.
        timestep_spacing: ``"uniform"`` in ``t`` or ``"karras"`` (EDM's grid); ``None``: uniform for DBIM on the VP
            bridge (the DBIM paper's), Karras otherwise (DDBM's; DBIM on the VE bridge, see the module docstring).
        clip_sample: clamp ``x0_hat`` to ``[-1, 1]`` before it is used, as both reference codes do for images.
    """

    prediction_types = ("sample",)

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        bridge_type: str = "vp",
        beta_d: float = 2.0,
        beta_min: float = 0.1,
        sigma_max: float = 80.0,
        t_min: float | None = None,
        prediction_type: str = "sample",
        solver: str = "dbim",
        eta: float = 0.0,
        solver_order: int = 1,
        churn_step_ratio: float = 0.33,
        rho: float = 7.0,
        timestep_spacing: str | None = None,
        clip_sample: bool = False,
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, int) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        if bridge_type not in BRIDGE_TYPES:
            raise ValueError(f"bridge_type must be one of {BRIDGE_TYPES}, got {bridge_type!r}")
        if not all(_is_finite_number(value) and value >= 0 for value in (beta_d, beta_min)) or beta_d + beta_min <= 0:
            raise ValueError(f"beta_d and beta_min must be non-negative and not both zero, got {beta_d!r}, "
                             f"{beta_min!r}")
        if not (_is_finite_number(sigma_max) and sigma_max > 0):
            raise ValueError(f"sigma_max must be a positive finite number, got {sigma_max!r}")
        end_time = 1.0 if bridge_type == "vp" else float(sigma_max)
        smallest_time = DEFAULT_T_MIN[bridge_type] if t_min is None else t_min
        if not (_is_finite_number(smallest_time) and 0 < smallest_time < end_time - DBIM_GRID_START_OFFSET):
            raise ValueError(f"t_min must lie in (0, T - {DBIM_GRID_START_OFFSET}) with T = {end_time} for the "
                             f"{bridge_type} bridge, got {t_min!r}")
        self.check_prediction_type()
        if solver not in SOLVERS:
            raise ValueError(f"solver must be one of {SOLVERS}, got {solver!r}")
        if not (_is_finite_number(eta) and 0 <= eta <= 1):
            raise ValueError(f"eta must lie in [0, 1], got {eta!r}")
        if solver_order not in (1, 2, 3) or isinstance(solver_order, bool):
            raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order!r}")
        if solver_order > 1 and (solver != "dbim" or eta != 0):
            raise ValueError(f"solver_order {solver_order} is DBIM's deterministic high-order solver: it needs "
                             f"solver='dbim' and eta=0, got solver={solver!r}, eta={eta!r}")
        if not (_is_finite_number(churn_step_ratio) and 0 <= churn_step_ratio < 1):
            raise ValueError(f"churn_step_ratio must lie in [0, 1), got {churn_step_ratio!r}")
        if not (_is_finite_number(rho) and rho > 0):
            raise ValueError(f"rho must be a positive finite number, got {rho!r}")
        if timestep_spacing is not None and timestep_spacing not in TIMESTEP_SPACINGS:
            raise ValueError(f"timestep_spacing must be None or one of {TIMESTEP_SPACINGS}, got {timestep_spacing!r}")
        if not isinstance(clip_sample, bool):
            raise ValueError(f"clip_sample must be a bool, got {clip_sample!r}")

        self.end_time, self.smallest_time = end_time, float(smallest_time)
        alpha_end, rho_sq_end = self._alpha_and_noise_ratio(torch.tensor(end_time, dtype=torch.float64))
        self.alpha_end, self.rho_sq_end = float(alpha_end), float(rho_sq_end)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._targets: list[float] = []  # the model-facing time each step lands on
        self._stages: list[str] = []  # DDBM: which part of its interval each call is
        self._reset_solver_state()

    @property
    def order(self) -> int:
        """Model calls per inference step (diffusers' ``order``): 1 for DBIM; 2 for DDBM's Heun, 3 with churn."""
        if self.config.solver == "dbim":
            return 1
        return 3 if self.config.churn_step_ratio > 0 else 2

    # The process ----------------------------------------------------------------------------------------------------
    def _alpha_and_noise_ratio(self, t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, rho_t^2)`` at paper times ``t`` (float64)."""
        if self.config.bridge_type == "vp":
            return vp_alpha_and_noise_ratio(t, self.config.beta_d, self.config.beta_min)
        return torch.ones_like(t), t**2

    def paper_time(self, timesteps) -> torch.Tensor:
        """The paper's ``t = T * timestep / num_train_timesteps`` (float64) of model-facing timesteps."""
        timesteps = torch.as_tensor(timesteps).to(torch.float64)
        if bool(((timesteps < 0) | (timesteps > self.config.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in [0, {self.config.num_train_timesteps}], got "
                             f"{timesteps.flatten().tolist()}")
        return timesteps * (self.end_time / self.config.num_train_timesteps)

    def path_coefficients(self, timesteps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_t, b_t, s_t)`` in float64 at model-facing timesteps."""
        alpha, rho_sq = self._alpha_and_noise_ratio(self.paper_time(timesteps))
        return bridge_coefficients(alpha, rho_sq, self.alpha_end, self.rho_sq_end)

    def _point(self, timestep: float) -> BridgePoint:
        t = self.paper_time(timestep)
        alpha, rho_sq = self._alpha_and_noise_ratio(t)
        a, b, s = bridge_coefficients(alpha, rho_sq, self.alpha_end, self.rho_sq_end)
        if self.config.bridge_type == "vp":
            beta = self.config.beta_min + self.config.beta_d * t
            f, g_sq = -beta / 2, beta
        else:
            f, g_sq = torch.zeros_like(t), 2 * t
        return BridgePoint(*(float(value) for value in (t, alpha, rho_sq, a, b, s, f, g_sq)))

    def _model_time(self, t: float) -> float:
        return t * self.config.num_train_timesteps / self.end_time

    def sample_training_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                                  device: torch.device | str = "cpu") -> torch.Tensor:
        """Model-facing timesteps of ``t ~ U[t_min, T)`` (DDBM's ``real-uniform`` sampler), float32."""
        uniform = torch.rand(batch_size, generator=generator, dtype=torch.float64)
        t = self.smallest_time + uniform * (self.end_time - self.smallest_time)
        return (t * self.config.num_train_timesteps / self.end_time).to(device=device, dtype=torch.float32)

    def initial_sample(self, degraded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_T = y``: both samplers start from the degraded image itself."""
        return degraded.clone()

    # The grids ------------------------------------------------------------------------------------------------------
    def _descending_times(self, start: float, end: float, count: int, spacing: str) -> torch.Tensor:
        if spacing == "karras":
            return karras_times(start, end, count, self.config.rho)
        return torch.linspace(start, end, count, dtype=torch.float64)

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """DBIM: ``num_inference_steps`` model calls. DDBM: ``num_inference_steps`` intervals of its grid, each one
        Euler-Maruyama call (with churn) and two Heun calls (one on the last interval, an Euler step to 0)."""
        num_train_timesteps = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(f"num_inference_steps must lie in 1 .. num_train_timesteps={num_train_timesteps}, got "
                             f"{num_inference_steps}")
        plan = self._dbim_plan(num_inference_steps) if self.config.solver == "dbim" else \
            self._ddbm_plan(num_inference_steps)
        calls, targets, stages = zip(*plan, strict=True)
        # The model sees float32 timesteps; every coefficient is computed at exactly those values.
        timesteps = torch.tensor([self._model_time(t) for t in calls], dtype=torch.float32)
        self._targets = torch.tensor([self._model_time(t) for t in targets], dtype=torch.float32).tolist()
        self._stages = list(stages)
        self.timesteps = timesteps.to(device)
        self.num_inference_steps = num_inference_steps
        self._reset_step_index()
        self._reset_solver_state()

    def _dbim_plan(self, num_calls: int) -> list[tuple[float, float, str]]:
        """``(call time, landing time, stage)`` per model call, in the paper's time: calls at ``T`` and at
        ``num_calls - 1`` grid times from ``T - 1e-3``; the last step lands on ``t_min``."""
        spacing = self.config.timestep_spacing or ("uniform" if self.config.bridge_type == "vp" else "karras")
        if num_calls == 1:  # the booting call alone: from y straight to t_min
            landings = [self.smallest_time]
        else:
            landings = self._descending_times(self.end_time - DBIM_GRID_START_OFFSET, self.smallest_time, num_calls,
                                              spacing).tolist()
        times = [self.end_time, *landings]
        return [(call, landing, "dbim") for call, landing in itertools.pairwise(times)]

    def _ddbm_plan(self, num_intervals: int) -> list[tuple[float, float, str]]:
        """``(call time, landing time, stage)`` per model call: on each interval of ``T - 1e-4 > ... > t_min > 0``, the
        Euler-Maruyama call (with churn), then Heun's two (one, Euler's, on the last interval)."""
        spacing = self.config.timestep_spacing or "karras"
        grid = [*self._descending_times(self.end_time - DDBM_GRID_START_OFFSET, self.smallest_time, num_intervals,
                                        spacing).tolist(), 0.0]
        churn = self.config.churn_step_ratio
        plan = []
        for start, end in itertools.pairwise(grid):
            heun_start = start
            if churn > 0:
                heun_start = start + churn * (end - start)
                plan.append((start, heun_start, "euler_maruyama"))
            if end == 0:
                plan.append((heun_start, end, "euler"))
            else:
                plan += [(heun_start, end, "heun_predictor"), (end, end, "heun_corrector")]
        return plan

    # Sampling -------------------------------------------------------------------------------------------------------
    def _reset_solver_state(self) -> None:
        self._x0_history: list[torch.Tensor] = []  # DBIM's multistep memory, newest first
        self._lambda_history: list[float] = []
        self._heun_start: tuple[torch.Tensor, torch.Tensor, float] | None = None  # (x, drift, dt) of the predictor

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        degraded: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RestorationSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One model call's update: a DBIM step, or DDBM's Euler-Maruyama, Heun predictor or Heun corrector."""
        index = self.begin_step(model_output, timestep, sample, degraded)
        current = self.timesteps[index]
        if index == 0:
            self._reset_solver_state()
        if self.config.clip_sample:
            model_output = model_output.clamp(-1, 1)
        x0, eps = self.original_and_noise(model_output, sample, degraded, current)
        here, there = self._point(float(current)), self._point(self._targets[index])
        if self.config.solver == "dbim":
            prev_sample = self._dbim_step(index, x0, eps, degraded, here, there, generator)
        else:
            prev_sample = self._ddbm_step(index, sample, degraded, eps, here, there, generator)
        if not return_dict:
            return prev_sample, x0
        return RestorationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

    def _dbim_step(self, index: int, x0: torch.Tensor, eps: torch.Tensor, degraded: torch.Tensor, here: BridgePoint,
                   there: BridgePoint, generator: torch.Generator | None) -> torch.Tensor:
        effective_x0 = x0
        if here.s == 0:  # booting: x_T = y carries no noise to reuse
            fresh_noise_std = there.s
        else:
            fresh_noise_std = self.config.eta * bridge_posterior_std(there.alpha, there.rho_sq, here.rho_sq)
            self._x0_history = [x0, *self._x0_history[:2]]
            self._lambda_history = [math.log(here.a / here.s), *self._lambda_history[:2]]
            order = min(self.config.solver_order, len(self._x0_history))
            if index < len(self.timesteps) - 1 and order > 1:  # the last step is first order
                lambda_next = math.log(there.a / there.s)
                effective_x0 = x0 + dbim_taylor_terms(self._x0_history[:order], self._lambda_history[:order],
                                                     lambda_next)
        noise = None
        if fresh_noise_std > 0:
            noise = randn_tensor(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
        return noise_preserving_step(there.a * effective_x0 + there.b * degraded, eps, there.s, fresh_noise_std, noise)

    def _ddbm_step(self, index: int, sample: torch.Tensor, degraded: torch.Tensor, eps: torch.Tensor,
                   here: BridgePoint, there: BridgePoint, generator: torch.Generator | None) -> torch.Tensor:
        stage = self._stages[index]
        dt = there.t - here.t
        if stage == "euler_maruyama":
            drift = bridge_drift(sample, degraded, eps, here, self.alpha_end, self.rho_sq_end, score_weight=1.0)
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
            return sample + drift * dt + math.sqrt(-dt * here.g_sq) * noise
        drift = bridge_drift(sample, degraded, eps, here, self.alpha_end, self.rho_sq_end, score_weight=0.5)
        if stage == "euler":
            return sample + drift * dt
        if stage == "heun_predictor":
            self._heun_start = (sample, drift, dt)
            return sample + drift * dt
        if self._heun_start is None:
            raise ValueError(f"step {index} is a Heun corrector, but the predictor before it did not run")
        start, start_drift, start_dt = self._heun_start
        self._heun_start = None
        return start + (start_drift + drift) / 2 * start_dt


def _is_finite_number(value) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
