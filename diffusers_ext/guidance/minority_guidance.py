"""Self-guided minority guidance: steer sampling toward low-density (minority) samples with the model alone."""

from __future__ import annotations

from collections.abc import Callable

import torch
from diffusers.configuration_utils import register_to_config

from ..diffusion_math import per_sample, x0_and_eps_from_prediction
from .steering import (
    DenoisingStep,
    SteeringMethod,
    check_guidance_range,
    check_non_negative,
    check_positive_int,
    check_reward_space,
    check_reward_values,
    gradient_of_sum,
    step_position,
)

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
SCALE_TYPES = ("variance", "fixed")


def euclidean_distance(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``||x - y||_2`` per sample, shape ``(B,)`` (the official code's choice when LPIPS is off)."""
    return (x - y).reshape(x.shape[0], -1).norm(dim=1)


class MinorityGuidance(SteeringMethod):
    r"""Self-guided minority guidance: push each sample toward features the model reconstructs badly, i.e. toward the
    low-density regions of the data law, using only the pretrained model.

    Papers: *Self-Guided Generation of Minority Samples Using Diffusion Models*, Um & Ye, arXiv 2407.11555 (implemented
    here), which replaces the trained minority classifier of *Don't Play Favorites: Minority Guidance for Diffusion
    Models*, Um et al., arXiv 2301.12334, by the minority score of the intermediate sample itself.

    At a guided step from ``x_t``, with ``x0_hat(x)`` the pipeline's x0 prediction (CFG included), ``s`` the
    perturbation timestep ``perturbation_strength * num_train_timesteps`` with noise level ``(alpha_s, sigma_s)``,
    ``d`` the ``distance`` and ``M`` Monte-Carlo draws ``eps_m ~ N(0, I)``:

        x_s^m   = alpha_s x0_hat(x_t) + sigma_s eps_m                     (re-noise the prediction)
        r^m     = sg[ x0_hat(x_s^m) ]                                     (its Tweedie reconstruction, no gradient)
        l(x_t)  = (1 / M) sum_m d(x0_hat(x_t), r^m)                        (the minority score: high for minority
                                                                            features, which Tweedie pulls toward
                                                                            the majority)
        g       = grad_{x_t} l(x_t)                                       (through the denoiser)
        g       = g / max_i |g_i|                   if normalize_gradient  (per sample, the official default)
        x_{t-1} = x_{t-1}' + w c_t g                                      (w is ``scale``)

    where ``x_{t-1}'`` is the scheduler's own step and ``c_t`` is, for ``scale_type="variance"``, the variance of the
    ancestral (DDPM) step from ``t`` to the next level ``t'``, ``sigma_{t'}^2 (1 - (rho_{t'} / rho_t)^2)`` with
    ``rho = sigma / alpha`` (the paper's ``Sigma_t``, as in classifier guidance; its models learn a variance between
    this and ``beta_t``), and ``1`` for ``"fixed"``. Guidance runs at every ``interval``-th step of the schedule (the
    paper's intermittent guidance) within ``[guidance_start, guidance_end)``. The official code's defaults:
    ancestral sampling over 250 steps, ``s = 0.8 T``, ``M = 1``, variance scaling, normalised gradient, guidance every
    5th step, ``w = 1`` (its README uses 0.4 on CelebA, 0.2 with every 2nd step on ImageNet-64) and LPIPS as ``d``
    on images, else the L2 distance (``euclidean_distance``, the default here). It applies to VP and rectified-flow
    pipelines alike; on a flow pipeline ``c_t`` is read on the flow path with the same formula (``ddim_step``'s
    stochastic part at ``eta = 1``).

    The replayed denoiser cannot reach timestep ``0``'s scale from a recorded call at ``0`` (the machine maps
    timesteps by ratio), so a step at scheduler timestep ``0`` is not guided; its ancestral variance is ``0`` anyway.

    Args:
        distance: ``distance(x0_hat, reconstruction) -> (B,)``, differentiable in its first argument; reads samples /
            latents with ``reward_space="sample"`` (default) or decoded images in ``[0, 1]`` with ``"image"`` (e.g.
            LPIPS). ``None`` is ``euclidean_distance``.
        scale: ``w``, non-negative.
        perturbation_strength: ``s / num_train_timesteps`` in ``(0, 1]``.
        num_mc_samples: ``M``.
        interval: guide every this many steps (counted from the start of the schedule).
        scale_type: ``"variance"`` or ``"fixed"``.
        normalize_gradient: divide ``g`` by its largest absolute entry per sample.
        guidance_start, guidance_end: guide the steps whose position ``i / num_steps`` lies in this range.
        reward_space: where ``distance`` is measured, ``"sample"`` or ``"image"``.
        seed: seeds the re-noising draws, so a run is reproducible.

    Attributes:
        last_scores: the per-sample minority score ``l(x_t)`` at the latest guided step.
    """

    uses_denoiser = True
    ignore_for_config = ["distance"]

    @register_to_config
    def __init__(
        self,
        *,
        distance: Distance | None = None,
        scale: float = 1.0,
        perturbation_strength: float = 0.8,
        num_mc_samples: int = 1,
        interval: int = 5,
        scale_type: str = "variance",
        normalize_gradient: bool = True,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        reward_space: str = "sample",
        seed: int = 0,
    ):
        super().__init__()
        if distance is not None and not callable(distance):
            raise ValueError("distance must be a callable (x0_hat, reconstruction) -> (B,) tensor, or None for L2")
        check_non_negative(scale, "scale")
        if not 0 < perturbation_strength <= 1:
            raise ValueError(f"perturbation_strength must lie in (0, 1], got {perturbation_strength!r}")
        check_positive_int(num_mc_samples, "num_mc_samples")
        check_positive_int(interval, "interval")
        if scale_type not in SCALE_TYPES:
            raise ValueError(f"scale_type must be one of {SCALE_TYPES}, got {scale_type!r}")
        if not isinstance(normalize_gradient, bool):
            raise ValueError(f"normalize_gradient must be True or False, got {normalize_gradient!r}")
        check_guidance_range(guidance_start, guidance_end)
        check_reward_space(reward_space)
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.distance = euclidean_distance if distance is None else distance
        self.last_scores: torch.Tensor | None = None

    def begin(self) -> None:
        self.last_scores = None

    def _perturbation_timestep(self) -> float:
        return self.config.perturbation_strength * int(self.scheduler.config.get("num_train_timesteps", 1000))

    def _step_coefficient(self, step: DenoisingStep, position: int, count: int) -> torch.Tensor:
        """``c_t``: the ancestral step's variance from ``step``'s noise level to the next one, or 1."""
        if self.config.scale_type == "fixed":
            return torch.ones((), dtype=torch.float64)
        if self.noise_path == "flow":
            alpha_next, sigma_next = self.next_flow_alpha_sigma()
        else:
            if position + 1 < count:
                alpha_next, sigma_next = self.alpha_sigma(self.scheduler.timesteps[position + 1])
            else:  # the last step lands on clean data
                alpha_next, sigma_next = torch.ones((), dtype=torch.float64), torch.zeros((), dtype=torch.float64)
        ratio = (sigma_next * step.alpha) / (alpha_next * step.sigma)
        return sigma_next**2 * (1 - ratio**2).clamp(min=0)

    def _minority_scores(self, step: DenoisingStep, sample: torch.Tensor) -> torch.Tensor:
        timestep = self._perturbation_timestep()
        alpha, sigma = (v.to(sample.dtype) for v in self.alpha_sigma(timestep))
        x0 = step.x0_and_eps(self.denoise(sample, step.timestep, step), sample)[0]
        features = self.decode(x0)
        scores = 0
        for _ in range(self.config.num_mc_samples):
            with torch.no_grad():
                noisy = alpha * x0.detach() + sigma * self.randn_like(x0)
                prediction = self.denoise(noisy, timestep, step)
                reconstruction = x0_and_eps_from_prediction(prediction, noisy, alpha, sigma, self._prediction_type)[0]
                reconstruction = self.decode(reconstruction)
            scores = scores + check_reward_values(self.distance(features, reconstruction), sample.shape[0], "distance")
        return scores / self.config.num_mc_samples

    def after_step(self, step: DenoisingStep, prev_sample: torch.Tensor) -> torch.Tensor:
        config = self.config
        position, count = step_position(self.scheduler, step)
        if config.scale == 0 or position % config.interval:
            return prev_sample
        if not config.guidance_start <= position / count < config.guidance_end:
            return prev_sample
        coefficient = self._step_coefficient(step, position, count)
        if float(coefficient) == 0:
            return prev_sample
        with torch.enable_grad():
            sample = step.sample.detach().requires_grad_(True)
            scores = self._minority_scores(step, sample)
            gradient = gradient_of_sum(scores, sample, "distance")
        self.last_scores = scores.detach()
        if config.normalize_gradient:
            peak = gradient.reshape(gradient.shape[0], -1).abs().amax(dim=1).clamp_min(1e-30)
            gradient = gradient / per_sample(peak, gradient)
        step_size = (config.scale * coefficient).to(prev_sample)
        return prev_sample + step_size * gradient.to(prev_sample.dtype)
