"""The exact probability-flow ODE solution of an oracle, for measuring a sampler's discretisation error.

Both paths are solved in the variables that make the ODE ``d state / d time = (state - x0_hat) / time``, integrated
in ``log(time)`` where it reads ``d state / d log(time) = state - x0_hat`` and is smooth across all noise levels:

- VP: ``state = x / alpha``, ``time = rho = sigma / alpha`` (the DDIM / EDM form: ``d state / d rho = eps_hat``);
- rectified flow: ``state = x``, ``time = s`` with ``alpha = 1 - s``, ``sigma = s``
  (``d x / d s = eps_hat - x0_hat``, the velocity a flow model predicts).

An adaptive 8th-order Dormand–Prince solver (``scipy.integrate.solve_ivp``, DOP853) integrates from the sampler's
starting noise level down to ``time_end``; the last, vanishing piece is closed by the exact denoiser, whose error is
``O(time_end**2)``.
"""

from __future__ import annotations

import numpy as np
import torch
from scipy.integrate import solve_ivp

from .oracle import GaussianMixtureDenoiser


def probability_flow_ode_solution(
    denoiser: GaussianMixtureDenoiser,
    noise: torch.Tensor,
    timestep_start: float | None = None,
    rtol: float = 1e-9,
    atol: float = 1e-9,
    time_end: float = 1e-5,
    timestep_end: float | None = None,
) -> torch.Tensor:
    """Map ``noise`` (the sample a pipeline starts from, ``x_T``) to the data point the exact PF-ODE reaches.

    Args:
        denoiser: the oracle; its scheduler config fixes the path.
        noise: ``(N, ...)`` starting samples ``x_T`` at ``timestep_start`` (as a pipeline's scheduler sees them,
            before any ``init_noise_sigma`` scaling).
        timestep_start: training timestep of ``noise``; the last training timestep for VP
            (``num_train_timesteps - 1``) and ``num_train_timesteps`` (pure noise) for flow, by default.
        timestep_end: stop the ODE at this training timestep and return the noisy sample ``x`` there (what a
            sampler whose grid ends at that timestep returns) instead of the data point.

    Returns:
        ``(N, D)`` float64 endpoints.
    """
    law = denoiser.law_on(torch.device("cpu"))
    num_samples = noise.shape[0]
    start_noise = noise.reshape(num_samples, -1).to(torch.float64).cpu()
    if start_noise.shape[1] != law.dim:
        raise ValueError(f"noise has {start_noise.shape[1]} values per sample, the oracle models {law.dim}")
    if timestep_start is None:
        offset = 1 if denoiser.noise_path == "vp" else 0
        timestep_start = denoiser.num_train_timesteps - offset
    alpha_start, sigma_start = (float(v) for v in denoiser.alpha_sigma(torch.tensor(float(timestep_start))))

    if denoiser.noise_path == "vp":
        def noisy_sample(state, rho):
            alpha = 1.0 / np.sqrt(1.0 + rho**2)
            return alpha * state, alpha, rho * alpha

        state_start, time_start = start_noise / alpha_start, sigma_start / alpha_start
    else:
        def noisy_sample(state, s):
            return state, 1.0 - s, s

        state_start, time_start = start_noise, sigma_start
    if timestep_end is not None:
        alpha_end, sigma_end = (float(v) for v in denoiser.alpha_sigma(torch.tensor(float(timestep_end))))
        time_end = sigma_end / alpha_end if denoiser.noise_path == "vp" else sigma_end
    if time_start <= time_end:
        raise ValueError(f"timestep_start={timestep_start} is already at the data end of the path")

    def x0_hat(state: torch.Tensor, time: float) -> torch.Tensor:
        x, alpha, sigma = noisy_sample(state, time)
        return law.posterior_mean(x, alpha, sigma)

    def derivative(log_time: float, flat_state: np.ndarray) -> np.ndarray:
        state = torch.from_numpy(flat_state).view(num_samples, law.dim)
        return (state - x0_hat(state, float(np.exp(log_time)))).reshape(-1).numpy()

    solution = solve_ivp(
        derivative,
        (np.log(time_start), np.log(time_end)),
        state_start.reshape(-1).numpy(),
        method="DOP853",
        rtol=rtol,
        atol=atol,
    )
    if not solution.success:
        raise RuntimeError(f"reference ODE solve failed: {solution.message}")
    state_end = torch.from_numpy(solution.y[:, -1].copy()).view(num_samples, law.dim)
    if timestep_end is not None:
        return noisy_sample(state_end, time_end)[0]
    return x0_hat(state_end, time_end)
