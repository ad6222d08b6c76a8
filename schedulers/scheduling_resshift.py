"""ResShift: "ResShift: Efficient Diffusion Model for Image Super-resolution by Residual Shifting" (Zongsheng Yue,
Jianyi Wang, Chen Change Loy, NeurIPS 2023, arXiv 2307.12348), and its 4-step extension "Efficient Diffusion Model
for Image Restoration by Residual Shifting" (same authors, arXiv 2403.07319).

A Markov chain of ``T = num_train_timesteps`` steps moves the clean image ``x0`` towards the degraded image ``y`` by
shifting the residual ``y - x0`` while adding noise:

    q(x_t | x_{t-1}, x0, y) = N(x_{t-1} + alpha_t (y - x0), kappa^2 alpha_t I),      alpha_t = eta_t - eta_{t-1}
    q(x_t | x0, y)          = N(x0 + eta_t (y - x0), kappa^2 eta_t I)

so in the shared restoration form ``x_t = a x0 + b y + s eps`` (``schedulers.restoration``):
``a = 1 - eta_t``, ``b = eta_t``, ``s = kappa sqrt(eta_t)``, with ``eta_0 = 0`` (``x_0`` is the clean image).

The shifting schedule grows geometrically in a warped time (the paper's schedule, squared):

    eta_t = eta_1 (eta_T / eta_1) ** (((t - 1) / (T - 1)) ** power),     t = 1 .. T
    (equivalently sqrt(eta_t) = sqrt(eta_1) b0 ** beta_t, beta_t = ((t - 1) / (T - 1)) ** power (T - 1),
     b0 = exp(log(eta_T / eta_1) / (2 (T - 1))))

with the paper's ``eta_1 = min((0.04 / kappa)^2, 0.001)``, ``eta_T = 0.999``, ``power = 0.3``, ``kappa = 2``.
The official code (github.com/zsyOAOA/ResShift, ``get_named_eta_schedule``) writes the same law in ``sqrt(eta)`` with
``sqrt(eta_1) = min(min_noise_level / kappa, min_noise_level)`` and ``sqrt(eta_T) = etas_end = 0.99``: its released
models were trained with ``eta_end = 0.99 ** 2 = 0.9801`` (and ``eta_start = 0.02 ** 2`` for the 15-step SR models,
``0.1 ** 2`` for the 4-step journal model), which this scheduler takes as config values.

Sampling starts at ``x_T = y + kappa sqrt(eta_T) eps`` (the marginal at ``T`` with ``x0`` replaced by ``y``: exact up
to ``(1 - eta_T) (x0 - y)``) and follows the exact posterior of the chain with the model's ``x0_hat`` plugged in.
Between any two grid times ``r < t`` the chain restricted to them is again Markov with increment ``eta_t - eta_r``,
so the same posterior serves a sub-grid of the trained chain:

    q(x_r | x_t, x0) = N((eta_r / eta_t) x_t + ((eta_t - eta_r) / eta_t) x0,  kappa^2 eta_r (eta_t - eta_r) / eta_t I)

Written through ``eps_hat = (x_t - a_t x0_hat - b_t y) / s_t`` this is ``noise_preserving_step``:

    x_r = (1 - eta_r) x0_hat + eta_r y + sqrt(s_r^2 - c^2) eps_hat + c z,     s_r = kappa sqrt(eta_r),
    c^2 = kappa^2 eta_r (eta_t - eta_r) / eta_t

(``s_r^2 - c^2 = kappa^2 eta_r^2 / eta_t``, the weight ``eta_r / eta_t`` of ``x_t``'s noise). The last step, to
``r = 0``, returns ``x0_hat``. Even with the exact ``x0_hat = E[x0 | x_t, y]`` this sampler is narrower than
``p(x0 | y)``: each step leaves out the spread ``((eta_t - eta_r) / eta_t)^2 Cov(x0 | x_t)`` of the true reverse
kernel, an error that vanishes only as the chain grows (measured in ``tests/test_resshift.py``).

Model-facing timesteps are the chain index ``t`` in ``1 .. T`` (``T`` first); the official code feeds the model
``t - 1``, so a ported official network needs its timestep shifted by one. The official networks also see their input
divided by ``sqrt(kappa^2 eta_t + 1)`` (its ``normalize_input``); here ``scale_model_input`` is the identity, as the
trainer feeds the model the unscaled ``x_t``.
"""

from __future__ import annotations

import math
from numbers import Real

import torch
from diffusers.configuration_utils import register_to_config
from diffusers.utils.torch_utils import randn_tensor

from diffusers_ext.diffusion_math import noise_preserving_step

from .restoration import RestorationScheduler, RestorationSchedulerOutput


def resshift_default_eta_start(kappa: float) -> float:
    """The paper's ``eta_1 = min((0.04 / kappa)^2, 0.001)``: the first state's noise ``kappa sqrt(eta_1)`` is at most
    0.04, and its shift ``eta_1 (y - x0)`` is negligible."""
    return min((0.04 / kappa) ** 2, 0.001)


def resshift_etas(num_train_timesteps: int, eta_start: float, eta_end: float, power: float) -> torch.Tensor:
    """``eta_0 .. eta_T`` (float64, ``T + 1`` values, ``eta_0 = 0``) of the ResShift shifting schedule:
    ``eta_t = eta_start (eta_end / eta_start) ** (((t - 1) / (T - 1)) ** power)`` for ``t = 1 .. T``."""
    steps = torch.arange(num_train_timesteps, dtype=torch.float64)  # t - 1
    warped_time = (steps / (num_train_timesteps - 1)) ** power
    etas = eta_start * (eta_end / eta_start) ** warped_time
    return torch.cat([torch.zeros(1, dtype=torch.float64), etas])


def resshift_fresh_noise_std(eta: torch.Tensor, eta_prev: torch.Tensor, kappa: float) -> torch.Tensor:
    """Standard deviation of ``q(x_r | x_t, x0)`` for ``eta_prev = eta_r < eta = eta_t``:
    ``kappa sqrt(eta_r (eta_t - eta_r) / eta_t)``, zero at ``eta_r = 0``."""
    return kappa * (eta_prev * (eta - eta_prev) / eta).sqrt()


def evenly_spaced_chain_indices(num_train_timesteps: int, num_inference_steps: int) -> torch.Tensor:
    """``num_inference_steps`` chain indices from ``T`` down to ``1`` (just ``T`` for one step), evenly spaced and
    rounded half up: the official code's respacing (``space_timesteps``) of ``1 .. T``."""
    if num_inference_steps == 1:
        return torch.tensor([num_train_timesteps], dtype=torch.int64)
    positions = torch.linspace(0, num_train_timesteps - 1, num_inference_steps, dtype=torch.float64)
    return (1 + (positions + 0.5).floor().to(torch.int64)).flip(0)


def _is_positive_finite(value) -> bool:
    return isinstance(value, Real) and not isinstance(value, bool) and math.isfinite(value) and value > 0


class ResShiftScheduler(RestorationScheduler):
    """ResShift's residual-shifting chain and its ancestral sampler (see the module docstring for the equations).

    One model call per step. ``set_timesteps(n)`` samples with ``n <= num_train_timesteps`` steps on an evenly spaced
    subset of the trained chain that starts at ``T``; ``n = num_train_timesteps`` is the paper's sampler.

    Args:
        num_train_timesteps: ``T``, the length of the Markov chain (15 in the NeurIPS paper, 4 in the extension).
        kappa: the noise scale ``kappa`` (``x_T`` has noise ``kappa sqrt(eta_T)``); the paper uses 2.
        power: the schedule's warping exponent ``p`` (0.3 in both papers); smaller shifts faster early on.
        eta_start: ``eta_1``; ``None`` takes the paper's ``min((0.04 / kappa)^2, 0.001)``.
        eta_end: ``eta_T``, in ``(eta_start, 1]``; the paper's 0.999 (the official models: ``0.99 ** 2``).
        prediction_type: ``"sample"`` (the paper's: the model predicts ``x0``) or ``"residual"`` (``y - x0``, also in
            the official code). ``"epsilon"`` is refused: recovering ``x0 = (x_t - eta_t y - kappa sqrt(eta_t) eps) /
            (1 - eta_t)`` multiplies the model's error by ``kappa sqrt(eta_t) / (1 - eta_t)``, about 2000 at the
            first step (``eta_T = 0.999``), where the state carries almost no information about ``x0``;
            ``"v_prediction"`` and ``"residual_and_noise"`` are not ResShift parameterisations.
    """

    prediction_types = ("sample", "residual")

    @register_to_config
    def __init__(
        self,
        num_train_timesteps: int = 15,
        kappa: float = 2.0,
        power: float = 0.3,
        eta_start: float | None = None,
        eta_end: float = 0.999,
        prediction_type: str = "sample",
    ):
        is_integer = isinstance(num_train_timesteps, int) and not isinstance(num_train_timesteps, bool)
        if not is_integer or num_train_timesteps < 2:
            raise ValueError(
                f"num_train_timesteps must be an integer >= 2 (the chain's length), got {num_train_timesteps!r}"
            )
        if not _is_positive_finite(kappa):
            raise ValueError(f"kappa must be a positive finite number, got {kappa!r}")
        if not _is_positive_finite(power):
            raise ValueError(f"power must be a positive finite number, got {power!r}")
        if not (_is_positive_finite(eta_end) and eta_end <= 1):
            raise ValueError(f"eta_end must lie in (0, 1], got {eta_end!r}")
        first_eta = resshift_default_eta_start(kappa) if eta_start is None else eta_start
        if not (_is_positive_finite(first_eta) and first_eta < eta_end):
            given = f"{eta_start!r}" if eta_start is not None else f"None (the paper's default for kappa: {first_eta})"
            raise ValueError(f"eta_start must lie in (0, eta_end={eta_end}), got {given}")
        self.check_prediction_type()

        self.etas = resshift_etas(num_train_timesteps, first_eta, eta_end, power)
        self.num_inference_steps: int | None = None
        self.timesteps: torch.Tensor | None = None
        self._previous_timesteps: torch.Tensor | None = None

    def path_coefficients(self, timesteps) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(1 - eta_t, eta_t, kappa sqrt(eta_t))`` in float64 at chain indices ``t`` in ``0 .. T``."""
        timesteps = torch.as_tensor(timesteps)
        if timesteps.is_floating_point() and bool((timesteps != timesteps.round()).any()):
            raise ValueError(f"ResShift timesteps are chain indices (integers), got {timesteps.tolist()}")
        indices = timesteps.long()
        if bool(((indices < 0) | (indices > self.config.num_train_timesteps)).any()):
            raise ValueError(f"timesteps must lie in 0 .. {self.config.num_train_timesteps}, got {indices.tolist()}")
        eta = self.etas.to(timesteps.device)[indices]
        return 1 - eta, eta, self.config.kappa * eta.sqrt()

    def set_timesteps(self, num_inference_steps: int, device: torch.device | str | None = None) -> None:
        """Sample with ``num_inference_steps`` steps (``1 .. num_train_timesteps``) on an evenly spaced subset of the
        chain indices that starts at ``T``."""
        num_train_timesteps = self.config.num_train_timesteps
        if isinstance(num_inference_steps, bool) or not isinstance(num_inference_steps, int):
            raise ValueError(f"num_inference_steps must be an integer, got {num_inference_steps!r}")
        if not 1 <= num_inference_steps <= num_train_timesteps:
            raise ValueError(
                f"num_inference_steps must lie in 1 .. num_train_timesteps={num_train_timesteps}: ResShift samples "
                f"on (a subset of) the trained chain's {num_train_timesteps} steps, got {num_inference_steps}"
            )
        timesteps = evenly_spaced_chain_indices(num_train_timesteps, num_inference_steps)
        self.num_inference_steps = num_inference_steps
        self.timesteps = timesteps.to(device)
        self._previous_timesteps = torch.cat([timesteps[1:], torch.zeros(1, dtype=torch.int64)]).to(device)
        self._reset_step_index()

    def initial_sample(self, degraded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """``x_T = y + kappa sqrt(eta_T) eps``."""
        noise = randn_tensor(degraded.shape, generator=generator, device=degraded.device, dtype=degraded.dtype)
        _, _, noise_std = self.coefficients_like(self.config.num_train_timesteps, degraded)
        return degraded + noise_std * noise

    def step(
        self,
        model_output: torch.Tensor,
        timestep: int | torch.Tensor,
        sample: torch.Tensor,
        degraded: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
    ) -> RestorationSchedulerOutput | tuple[torch.Tensor, torch.Tensor]:
        """One draw from ``q(x_r | x_t, x0 = x0_hat)``, from this grid time ``t`` to the next one ``r`` (0 after the
        last; that step returns ``x0_hat``)."""
        index = self.begin_step(model_output, timestep, sample, degraded)
        current, previous = self.timesteps[index], self._previous_timesteps[index]

        x0, eps = self.original_and_noise(model_output, sample, degraded, current)
        a_prev, b_prev, s_prev = self.coefficients_like(previous, sample)
        eta, eta_prev = self.etas[int(current)], self.etas[int(previous)]
        fresh_noise_std = float(resshift_fresh_noise_std(eta, eta_prev, self.config.kappa))
        noise = None
        if fresh_noise_std > 0:
            noise = randn_tensor(sample.shape, generator=generator, device=sample.device, dtype=sample.dtype)
        prev_sample = noise_preserving_step(a_prev * x0 + b_prev * degraded, eps, s_prev, fresh_noise_std, noise)

        if not return_dict:
            return prev_sample, x0
        return RestorationSchedulerOutput(prev_sample=prev_sample, pred_original_sample=x0)
