"""Noise-process math shared by every diffusers-ext component; each conversion is written once, here.

Every path we support writes a noisy sample as

    x_t = alpha_t * x0 + sigma_t * eps,        eps ~ N(0, I)

- VP (the DDPM family: DDIM, DPM-Solver, UniPC, Euler, DEIS, ...):
  ``alpha_t = sqrt(alphas_cumprod[t])``, ``sigma_t = sqrt(1 - alphas_cumprod[t])``.
- Rectified flow (``FlowMatchEulerDiscreteScheduler`` and the SD3 / Flux pipelines):
  ``s = t / num_train_timesteps``, ``alpha_t = 1 - s``, ``sigma_t = s``.

A network predicts one of four targets; with ``x = x_t`` they are

    epsilon:          eps
    sample:           x0
    v_prediction:     v = alpha_t * eps - sigma_t * x0
    flow_prediction:  u = eps - x0                       (dx/ds along the rectified-flow path)

and the inverse maps below solve the 2x2 linear system {x, prediction} -> {x0, eps} in closed form,
so they hold for any (alpha_t, sigma_t), not only for alpha_t**2 + sigma_t**2 == 1.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

import torch

PREDICTION_TYPES = ("epsilon", "sample", "v_prediction", "flow_prediction")

VP_SCHEDULE_KEYS = ("num_train_timesteps", "beta_start", "beta_end", "beta_schedule", "trained_betas",
                    "rescale_betas_zero_snr")


def check_prediction_type(prediction_type: str) -> str:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")
    return prediction_type


def noise_path_from_scheduler_config(scheduler_config: Mapping[str, Any]) -> str:
    """Which forward process a diffusers scheduler config describes: ``"vp"`` or ``"flow"``.

    Raises a ``ValueError`` naming the keys it found when the config describes neither (for example an EDM or
    variance-exploding config, whose noise levels are not a function of ``num_train_timesteps`` alone).
    """
    if not isinstance(scheduler_config, Mapping):
        raise TypeError(f"scheduler_config must be a mapping (a scheduler's .config), got {type(scheduler_config)}")
    class_name = str(scheduler_config.get("_class_name", ""))
    if class_name.startswith("FlowMatch") or "shift" in scheduler_config:
        return "flow"
    vp_markers = {"beta_schedule", "beta_start", "beta_end", "trained_betas"}
    if vp_markers & set(scheduler_config):
        return "vp"
    raise ValueError(
        "cannot read a noise schedule from this scheduler config: expected a VP schedule (keys "
        f"{sorted(vp_markers)}) or a flow-matching one (key 'shift' or a FlowMatch* class); "
        f"got _class_name={class_name or None!r} and keys {sorted(k for k in scheduler_config if not k.startswith('_'))}"
    )


def vp_betas(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """``betas`` of a VP scheduler config, computed by diffusers' own ``DDPMScheduler`` (float32, as every VP
    scheduler holds them; zero-terminal-SNR rescaling included), so that our math and the samplers' math cannot
    disagree."""
    from diffusers import DDPMScheduler

    schedule = {key: scheduler_config[key] for key in VP_SCHEDULE_KEYS if key in scheduler_config}
    try:
        return DDPMScheduler(**schedule).betas.clone()
    except NotImplementedError as error:
        raise ValueError(f"unsupported beta_schedule in scheduler config: {error}") from error


def vp_alphas_cumprod(scheduler_config: Mapping[str, Any]) -> torch.Tensor:
    """``alphas_cumprod`` of a VP scheduler config: ``cumprod(1 - betas)`` in float32, as ``DDPMScheduler`` and every
    VP scheduler compute it."""
    return torch.cumprod(1.0 - vp_betas(scheduler_config), dim=0)


def vp_alpha_sigma(timesteps: torch.Tensor, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t)`` at (possibly fractional) training timesteps of a VP schedule.

    Between integer timesteps the noise-to-signal ratio ``sqrt((1 - abar) / abar)`` is interpolated linearly in
    ``t``, exactly as ``EulerDiscreteScheduler.set_timesteps`` does (``np.interp``) for the fractional timesteps it
    hands the model; integer timesteps are exact.
    """
    abar = alphas_cumprod.to(device=timesteps.device, dtype=torch.float64)
    t = timesteps.to(torch.float64).clamp(0, abar.numel() - 1)
    low = t.floor().long()
    high = (low + 1).clamp(max=abar.numel() - 1)
    frac = t - low
    noise_ratio = vp_noise_ratio(abar)
    ratio = torch.where(frac == 0, noise_ratio[low], torch.lerp(noise_ratio[low], noise_ratio[high], frac))
    alpha = (1 + ratio**2).rsqrt()
    return alpha, ratio * alpha


def vp_noise_ratio(alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """``rho_t = sigma_t / alpha_t = sqrt((1 - abar_t) / abar_t)``: the DDIM / EDM noise level of a VP schedule
    (what diffusers' Karras-style VP schedulers call ``sigmas``), float64."""
    abar = alphas_cumprod.to(torch.float64)
    return ((1 - abar) / abar).sqrt()


def vp_timesteps_from_noise_ratio(noise_ratio: torch.Tensor, alphas_cumprod: torch.Tensor) -> torch.Tensor:
    """The fractional training timesteps at which ``vp_alpha_sigma`` gives ``sigma / alpha == noise_ratio``: its exact
    inverse (piecewise linear in ``t``), float64. Ratios outside the schedule's range raise ``ValueError``."""
    grid = vp_noise_ratio(alphas_cumprod).to(noise_ratio.device)
    rho = noise_ratio.to(torch.float64)
    if (rho < grid[0]).any() or (rho > grid[-1]).any():
        raise ValueError(
            f"noise levels must lie in the schedule's range [{grid[0].item():.4g}, {grid[-1].item():.4g}], "
            f"got [{rho.min().item():.4g}, {rho.max().item():.4g}]"
        )
    high = torch.searchsorted(grid, rho).clamp(1, grid.numel() - 1)
    low = high - 1
    return low + (rho - grid[low]) / (grid[high] - grid[low])


def flow_alpha_sigma(timesteps: torch.Tensor, num_train_timesteps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha_t, sigma_t) = (1 - s, s)`` with ``s = t / num_train_timesteps`` (the FlowMatch timestep scale)."""
    s = (timesteps.to(torch.float64) / num_train_timesteps).clamp(0, 1)
    return 1 - s, s


def alpha_sigma_function(
    scheduler_config: Mapping[str, Any],
) -> Callable[[torch.Tensor], tuple[torch.Tensor, torch.Tensor]]:
    """``timesteps -> (alpha_t, sigma_t)`` (float64) for the noise path a scheduler config describes, on the
    timestep scale the scheduler hands the model."""
    num_train_timesteps = int(scheduler_config.get("num_train_timesteps", 1000))
    if noise_path_from_scheduler_config(scheduler_config) == "flow":
        return lambda timesteps: flow_alpha_sigma(torch.as_tensor(timesteps), num_train_timesteps)
    alphas_cumprod = vp_alphas_cumprod(scheduler_config)
    return lambda timesteps: vp_alpha_sigma(torch.as_tensor(timesteps), alphas_cumprod)


def default_prediction_type(scheduler_config: Mapping[str, Any]) -> str:
    """What the model paired with this scheduler config predicts: the config's ``prediction_type``, or
    ``flow_prediction`` for flow-matching configs (which have none)."""
    if noise_path_from_scheduler_config(scheduler_config) == "flow":
        return "flow_prediction"
    return check_prediction_type(scheduler_config.get("prediction_type", "epsilon"))


def per_sample(values: torch.Tensor, like: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """One value per batch row, ``(B,)``, shaped ``(B, 1, ..., 1)`` to broadcast against ``like`` ``(B, ...)``, on
    its device, in ``dtype`` (``like``'s by default)."""
    return values.to(device=like.device, dtype=dtype or like.dtype).reshape(-1, *[1] * (like.ndim - 1))


def ddim_step(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """DDIM's step from noise level ``(alpha, sigma)`` to ``(alpha_next, sigma_next)`` on any path
    ``x = alpha x0 + sigma eps``:

        c      = eta * sigma_next * sqrt(1 - (rho_next / rho)^2),      rho = sigma / alpha
        x_next = alpha_next x0 + sqrt(sigma_next^2 - c^2) eps + c z,    z ~ N(0, I)

    ``eta = 0`` is the probability-flow ODE's DDIM step; ``eta = 1`` is DDPM's ancestral step, the discretised VP
    reverse SDE. The step depends on the path only through ``rho``, so on a flow path it equals rescaling ``x`` by
    ``1 / sqrt(alpha^2 + sigma^2)`` onto the VP path of the same signal-to-noise ratio, taking the VP step there and
    scaling back: this is how a rectified-flow model is sampled stochastically.
    """
    if eta == 0:
        return alpha_next * x0 + sigma_next * eps
    mean, std = ddim_step_distribution(x0, eps, alpha, sigma, alpha_next, sigma_next, eta)
    return _draw(mean, std, noise)


def ddim_step_distribution(
    x0: torch.Tensor,
    eps: torch.Tensor,
    alpha: torch.Tensor,
    sigma: torch.Tensor,
    alpha_next: torch.Tensor,
    sigma_next: torch.Tensor,
    eta: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """The Gaussian law ``N(mean, std^2 I)`` that ``ddim_step`` draws ``x_next`` from: ``mean = alpha_next x0 +
    sqrt(sigma_next^2 - c^2) eps`` and ``std = c``. It makes a stochastic sampler a policy with a log-density."""
    ratio = torch.where(sigma > 0, (sigma_next * alpha) / (alpha_next * sigma), torch.zeros_like(sigma))
    fresh_noise_std = eta * sigma_next * (1 - ratio**2).clamp(min=0).sqrt()
    return noise_preserving_distribution(alpha_next * x0, eps, sigma_next, fresh_noise_std)


def noise_preserving_step(
    mean: torch.Tensor,
    eps: torch.Tensor,
    noise_std: torch.Tensor | float,
    fresh_noise_std: torch.Tensor | float,
    noise: torch.Tensor | None = None,
) -> torch.Tensor:
    """The next state of a process whose noise has standard deviation ``noise_std`` there:

        x_next = mean + sqrt(noise_std^2 - c^2) eps + c z,        c = fresh_noise_std,  z ~ N(0, I)

    ``mean`` is the noise-free part (``alpha' x0`` for DDIM, ``a' x0 + b' y`` for the restoration processes), ``eps``
    the predicted noise, reused for all but the fresh share ``c`` (``c = 0``: deterministic, DDIM-like; ``c`` at the
    Markov posterior's standard deviation: ancestral sampling). ``c`` is clipped to ``noise_std``.
    """
    return _draw(*noise_preserving_distribution(mean, eps, noise_std, fresh_noise_std), noise)


def noise_preserving_distribution(
    mean: torch.Tensor, eps: torch.Tensor, noise_std: torch.Tensor | float, fresh_noise_std: torch.Tensor | float
) -> tuple[torch.Tensor, torch.Tensor]:
    """``noise_preserving_step``'s law: ``N(mean + sqrt(noise_std^2 - c^2) eps, c^2 I)``, ``c`` clipped to
    ``noise_std``."""
    fresh_noise_std = torch.as_tensor(fresh_noise_std, dtype=mean.dtype, device=mean.device)
    noise_std = torch.as_tensor(noise_std, dtype=mean.dtype, device=mean.device)
    fresh_noise_std = torch.minimum(fresh_noise_std, noise_std)
    return mean + (noise_std**2 - fresh_noise_std**2).clamp(min=0).sqrt() * eps, fresh_noise_std


def _draw(mean: torch.Tensor, std: torch.Tensor, noise: torch.Tensor | None) -> torch.Tensor:
    if not bool((std > 0).any()):
        return mean
    if noise is None:
        raise ValueError("a step with fresh noise (fresh_noise_std > 0) needs noise")
    return mean + std * noise


def x0_and_eps_from_prediction(
    prediction: torch.Tensor, sample: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> tuple[torch.Tensor, torch.Tensor]:
    """Solve ``x = alpha x0 + sigma eps`` together with the prediction's definition for ``(x0, eps)``."""
    if prediction_type == "epsilon":
        eps = prediction
        return (sample - sigma * eps) / alpha, eps
    if prediction_type == "sample":
        x0 = prediction
        return x0, (sample - alpha * x0) / sigma
    if prediction_type == "v_prediction":
        norm = alpha**2 + sigma**2
        return (alpha * sample - sigma * prediction) / norm, (sigma * sample + alpha * prediction) / norm
    if prediction_type == "flow_prediction":
        norm = alpha + sigma
        return (sample - sigma * prediction) / norm, (sample + alpha * prediction) / norm
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def prediction_from_x0_and_eps(
    x0: torch.Tensor, eps: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The network target of ``prediction_type`` given the clean sample and the noise."""
    if prediction_type == "epsilon":
        return eps
    if prediction_type == "sample":
        return x0
    if prediction_type == "v_prediction":
        return alpha * eps - sigma * x0
    if prediction_type == "flow_prediction":
        return eps - x0
    raise ValueError(f"prediction_type must be one of {PREDICTION_TYPES}, got {prediction_type!r}")


def flow_shift(levels: torch.Tensor, factor: float) -> torch.Tensor:
    """The time shift of flow-matching schedulers, ``factor s / (1 + (factor - 1) s)`` on noise levels ``s`` in
    ``[0, 1]``: ``FlowMatchEulerDiscreteScheduler`` applies it to every grid (and to custom ``sigmas``) with
    ``factor = shift``, or with dynamic shifting ``factor = exp(mu)`` (``time_shift_type="exponential"``) or ``mu``
    (``"linear"``)."""
    return factor * levels / (1 + (factor - 1) * levels)


def flow_unshift(shifted_levels: torch.Tensor, factor: float) -> torch.Tensor:
    """The inverse of ``flow_shift``: the ``sigmas`` to pass so that the scheduler samples at ``shifted_levels``."""
    return shifted_levels / (factor - (factor - 1) * shifted_levels)
