"""RDDM: "Residual Denoising Diffusion Models" (Jiawei Liu, Qiang Wang, Huijie Fan, Yinong Wang, Yandong Tang,
Liangqiong Qu; CVPR 2024, arXiv 2308.13712), official code github.com/nachifur/RDDM.

Forward process. With the clean image ``x0`` (the paper's ``I_0``), the degraded input ``y`` (``I_in``) and the
residual ``y - x0`` (``I_res``), each of the ``T = num_train_timesteps`` steps adds a share of the residual and some
noise,

    x_t = x_{t-1} + alpha_t (y - x0) + beta_t eps_{t-1},        eps_{t-1} ~ N(0, I),

so that, with ``alpha_bar_t = sum_{i<=t} alpha_i`` and ``beta_bar_t^2 = sum_{i<=t} beta_i^2``,

    x_t = x0 + alpha_bar_t (y - x0) + beta_bar_t eps,

the restoration path ``x_t = a x0 + b y + s eps`` with ``a = 1 - alpha_bar_t``, ``b = alpha_bar_t`` and
``s = beta_bar_t``. The schedules are normalised so that ``alpha_bar_T = 1`` and
``beta_bar_T^2 = final_noise_variance``: sampling starts from ``x_T = y + beta_bar_T eps``. ``alpha_t`` and
``beta_t^2`` each follow one of the official code's shapes (``alpha_schedule``, ``beta_squared_schedule``; the weights
of its restoration example's ``gen_coefficients``, whose later versions use ``w_i = i - 1`` for "increased", a
difference of order ``1 / T``), written here through their cumulative fraction
``F(t) = sum_{i<=t} w_i / sum_{i<=T} w_i``:

    "decreased"   w_i = T + 1 - i     F(t) = t (2T + 1 - t) / (T (T + 1))     (the paper's alpha_t)
    "increased"   w_i = i             F(t) = t (t + 1) / (T (T + 1))           (the paper's beta_t^2)
    "average"     w_i = 1             F(t) = t / T

and ``alpha_bar_t = F_alpha(t)``, ``beta_bar_t^2 = final_noise_variance * F_beta(t)``. The closed forms extend the
cumulative sums to fractional ``t``; ``1 - F`` is evaluated in factored form, so ``a = 0`` exactly at ``t = T``.

Reverse process: the paper's generalised sampler, from ``t`` to the previous grid time ``t'`` (primes mark ``t'``),

    x_{t'} = x_t - (alpha_bar_t - alpha_bar_t') res_hat - (beta_bar_t - sqrt(beta_bar_t'^2 - sigma^2)) eps_hat
             + sigma z,
    sigma^2 = eta (beta_bar_t^2 - beta_bar_t'^2) beta_bar_t'^2 / beta_bar_t^2

(``beta_bar_t^2 - beta_bar_t'^2`` is the ``beta_t^2`` of a one-step jump). ``eta = 0`` is deterministic (DDIM-like);
``eta = 1`` samples the forward chain's posterior ``q(x_{t'} | x_t, x0, y)`` at the predictions (DDPM-like); as in the
official code, ``eta`` scales the variance. With ``(x0_hat, eps_hat)`` from ``original_and_noise`` and
``res_hat = y - x0_hat`` the update is

    x_{t'} = noise_preserving_step(a' x0_hat + b' y + r, eps_hat, s', sigma, z),
    r = x_t - (a x0_hat + b y + s eps_hat).

``r`` is zero when the model predicts one quantity and the other is solved from ``x_t``; when it predicts the residual
and the noise separately (``"residual_and_noise"``, the paper's SM-Res-N) ``r`` anchors the update on ``x_t`` exactly
as the paper's equation does. The last step (``t' = 0``: ``a' = 1``, ``b' = s' = sigma = 0``) returns
``x_t - alpha_bar_t res_hat - beta_bar_t eps_hat``, the official code's final ``x0`` estimate.

Prediction types: ``"residual"`` (SM-Res), ``"epsilon"`` (SM-N), ``"residual_and_noise"`` (SM-Res-N, the official
default; the model outputs both, stacked on the channel axis) and ``"sample"`` (``x0``).

Noise-only prediction at ``t = T``: there ``a = 1 - alpha_bar_T = 0`` and ``x_T = y + beta_bar_T eps`` carries no
information about ``x0``, so ``eps_hat`` cannot give the residual that the first step needs. The official code divides
by ``1e-6`` instead of ``0`` and clips ``x0`` to ``[-1, 1]`` (for an exact noise model this yields ``x0_hat = 0``;
for a learned one, ``clip(error / 1e-6)``). We take ``res_hat = 0`` (``x0_hat = y``) instead: it equals the official
choice in generation mode (``y = 0``) and keeps the restoration input where the official one jumps to zero. The error
this introduces is ``a'`` times the residual's posterior mean; with the decreasing ``alpha_t`` schedule
``a' = (T - t')(T + 1 - t') / (T (T + 1))`` is small (0.0101 at 10 steps of 1000, 0.0004 at 50).

Generation mode: pass ``y = 0`` (zeros of the image's shape) as the degraded image. Then ``y - x0 = -x0``,
``x_T = beta_bar_T eps`` and, with ``final_noise_variance = 1`` (the official generation setting), ``x_T ~ N(0, I)``.
The scheduler itself does not distinguish the modes.
"""

from __future__ import annotations

import math
from numbers import Integral

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion_math import noise_preserving_step
from .restoration import RestorationScheduler, RestorationSchedulerOutput

RDDM_SCHEDULES = ("decreased", "increased", "average")


def cumulative_schedule_fraction(schedule: str, timesteps: torch.Tensor,
                                 num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(F(t), 1 - F(t))`` in float64 for an RDDM coefficient schedule: the share of the total that the first ``t`` of
    ``T`` steps hold (see the module docstring). The complement is computed in factored form, exact at ``t = T``."""
    t = timesteps.to(torch.float64)
    total = float(num_train_timesteps)
    if schedule == "decreased":
        norm = total * (total + 1)
        return t * (2 * total + 1 - t) / norm, (total - t) * (total + 1 - t) / norm
    if schedule == "increased":
        norm = total * (total + 1)
        return t * (t + 1) / norm, (total - t) * (total + 1 + t) / norm
    if schedule == "average":
        return t / total, (total - t) / total
    raise ValueError(f"schedule must be one of {RDDM_SCHEDULES}, got {schedule!r}")


def rddm_fresh_noise_std(eta: float, noise_std: torch.Tensor, previous_noise_std: torch.Tensor) -> torch.Tensor:
    """RDDM's ``sigma = sqrt(eta (s^2 - s'^2) s'^2 / s^2)`` for a step from noise level ``s = beta_bar_t`` to
    ``s' = beta_bar_t'``: ``eta = 1`` is the forward chain's posterior standard deviation, ``eta = 0`` no fresh
    noise."""
    variance = eta * (noise_std**2 - previous_noise_std**2) * previous_noise_std**2 / noise_std**2
    return variance.clamp(min=0).sqrt()


class RDDMScheduler(RestorationScheduler):
    """The RDDM sampler for restoration (``y`` = the degraded image) and generation (``y = 0``).

    Timesteps are the paper's ``t = 1 .. T`` (the official code's 0-based index plus one); ``t = T`` is the noisy
    input ``x_T = y + beta_bar_T eps``. ``set_timesteps(n)`` samples at ``t_k = floor(k T / n)``, ``k = n .. 1``, and
    the last step lands on ``t = 0``, as the official DDIM-style sampler does.

    Args:
        num_train_timesteps: ``T``.
        alpha_schedule: shape of the residual coefficients ``alpha_t`` (``"decreased"``, ``"increased"``,
            ``"average"``); the paper uses ``"decreased"``.
        beta_squared_schedule: shape of the noise variances ``beta_t^2``; the paper uses ``"increased"``.
        final_noise_variance: ``beta_bar_T^2``, the noise variance of ``x_T`` (the official ``sum_scale``): 1 in the
            official generation and restoration examples (0.01 is the code's fallback for restoration).
        eta: fresh-noise share in ``[0, 1]``: 0 deterministic (the official code forces it for restoration),
            1 ancestral.
        prediction_type: ``"residual_and_noise"`` (SM-Res-N), ``"residual"`` (SM-Res), ``"epsilon"`` (SM-N) or
            ``"sample"``.
    """

    prediction_types = ("residual_and_noise", "residual", "epsilon", "sample")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 1000,
        alpha_schedule: str = "decreased",
        beta_squared_schedule: str = "increased",
        final_noise_variance: float = 1.0,
        eta: float = 0.0,
        prediction_type: str = "residual_and_noise",
    ):
        if isinstance(num_train_timesteps, bool) or not isinstance(num_train_timesteps, Integral) \
                or num_train_timesteps < 1:
            raise ValueError(f"num_train_timesteps must be a positive integer, got {num_train_timesteps!r}")
        for name, schedule in (("alpha_schedule", alpha_schedule), ("beta_squared_schedule", beta_squared_schedule)):
            if schedule not in RDDM_SCHEDULES:
                raise ValueError(f"{name} must be one of {RDDM_SCHEDULES}, got {schedule!r}")
        if not (isinstance(final_noise_variance, (int, float)) and math.isfinite(final_noise_variance)
                and final_noise_variance > 0):
            raise ValueError(f"final_noise_variance (beta_bar_T^2) must be a finite positive number, "
                             f"got {final_noise_variance!r}")
        if not (isinstance(eta, (int, float)) and 0 <= eta <= 1):
            raise ValueError(f"eta must lie in [0, 1] (0: deterministic, 1: ancestral), got {eta!r}")
        self.check_prediction_type()
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._previous_timesteps: list[int] = []

    def path_coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a, b, s) = (1 - alpha_bar_t, alpha_bar_t, beta_bar_t)`` in float64 at ``timesteps`` in ``[0, T]``."""
        timesteps = torch.as_tensor(timesteps)
        total = self.config.num_train_timesteps
        if bool(((timesteps < 0) | (timesteps > total)).any()) or not bool(torch.isfinite(timesteps.double()).all()):
            raise ValueError(f"RDDM timesteps lie in [0, num_train_timesteps={total}], got {timesteps.tolist()}")
        alpha_bar, one_minus_alpha_bar = cumulative_schedule_fraction(self.config.alpha_schedule, timesteps, total)
        noise_fraction, _ = cumulative_schedule_fraction(self.config.beta_squared_schedule, timesteps, total)
        beta_bar = (self.config.final_noise_variance * noise_fraction).sqrt()
        return one_minus_alpha_bar, alpha_bar, beta_bar

    def set_timesteps(self, num_inference_steps: int, device: str | torch.device | None = None) -> None:
        """Sample at ``t_k = floor(k T / n)`` for ``k = n, ..., 1``; the step from ``t_1`` lands on ``t = 0``."""
        total = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, Integral):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= total:
            raise ValueError(f"num_inference_steps must lie in [1, num_train_timesteps={total}], "
                             f"got {num_inference_steps}")
        num_inference_steps = int(num_inference_steps)
        grid = [k * total // num_inference_steps for k in range(num_inference_steps, -1, -1)]
        self.num_inference_steps = num_inference_steps
        self.timesteps = torch.tensor(grid[:-1], dtype=torch.int64, device=device)
        self._previous_timesteps = grid[1:]
        self._reset_step_index()

    def initial_sample(self, degraded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_T = y + beta_bar_T eps`` (generation: ``y = 0``)."""
        noise = randn_tensor(degraded.shape, generator=generator, device=degraded.device, dtype=degraded.dtype)
        return degraded + math.sqrt(self.config.final_noise_variance) * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        degraded: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RestorationSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One step of the paper's sampler from ``timestep`` to the previous grid time (see the module docstring)."""
        index = self.begin_step(model_output, timestep, sample, degraded)
        current = int(self.timesteps[index])
        previous = self._previous_timesteps[index]

        a, b, s = self.coefficients_like(current, sample)
        a_prev, b_prev, s_prev = self.coefficients_like(previous, sample)
        x0, eps = self.original_and_noise(model_output, sample, degraded, current)
        if self.config.prediction_type == "epsilon" and current == self.config.num_train_timesteps:
            # a = 0: the noise says nothing about x0 here; take the residual as zero (module docstring).
            x0 = degraded
        # Zero unless residual and noise are predicted separately; then it anchors the update on x_t, as the paper's.
        anchor = sample - (a * x0 + b * degraded + s * eps)

        fresh_std = rddm_fresh_noise_std(self.config.eta, s, s_prev)
        noise = None
        if bool((fresh_std > 0).any()):
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = noise_preserving_step(a_prev * x0 + b_prev * degraded + anchor, eps, s_prev, fresh_std, noise)
        if not return_dict:
            return prev_sample, x0
        return RestorationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)

