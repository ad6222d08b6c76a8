"""Loss guidance (DPS / steered diffusion): the gradient of a loss on the x0 prediction, through the denoiser."""

from __future__ import annotations

import torch
from diffusers.configuration_utils import register_to_config

from ..diffusion_math import per_sample
from .steering import (
    DenoisingStep,
    Loss,
    SteeringMethod,
    check_callable,
    check_guidance_range,
    check_non_negative,
    check_reward_space,
    gradient_of_sum,
    in_guidance_range,
)


class LossGuidance(SteeringMethod):
    r"""Guidance by the gradient of a loss on the x0 prediction, differentiated through the denoiser: diffusion
    posterior sampling for inverse problems, and plug-and-play conditioning by any differentiable loss.

    Papers: *Diffusion Posterior Sampling for General Noisy Inverse Problems*, Chung et al., arXiv 2209.14687 (DPS);
    *Steered Diffusion: A Generalized Framework for Plug-and-Play Conditional Image Synthesis*, Nair et al.,
    arXiv 2310.00224.

    At a guided step from ``x_t`` the scheduler first takes its own step to ``x_{t-1}'``; then, with ``x0_hat(x_t)``
    the pipeline's x0 prediction re-computed under autograd (one extra model call, CFG included) and ``zeta`` the
    ``scale``:

        L_t     = L(x0_hat(x_t))                                      (per sample)
        zeta_t  = zeta / sqrt(L_t)    if normalize    else  zeta
        x_{t-1} = x_{t-1}' - zeta_t grad_{x_t} L_t

    ``grad_{x_t} (-L)`` stands in for ``grad log p(y | x_t)`` (DPS's approximation ``p(y | x_t) ~ p(y | x0_hat(x_t))``).
    For ``L = ||A x - y||^2 / (2 noise_std^2)`` (``MeasurementConsistency(...).loss``) the normalised step is the DPS
    code's ``zeta_DPS grad_{x_t} ||y - A x0_hat||`` with ``zeta = zeta_DPS noise_std / sqrt(2)``; its configs use
    ``zeta_DPS`` 0.3 to 0.5 on 256 x 256 images in ``[-1, 1]`` with 1000 ancestral steps. The normalised step has the
    same length whatever the residual, so a good ``zeta`` depends on the problem's dimension (on a 2-D problem the
    images' value leaves a spread of about ``zeta_DPS / 2`` around the measurement, see the tests). Without
    normalisation the step is steered diffusion's plain gradient step. It applies after any scheduler's step, VP
    (DDPM, DDIM, DPM-Solver, ...) or rectified flow (SD3, Flux).

    Args:
        loss: ``loss(images_or_samples) -> (B,)`` tensor, lower is better, differentiable; non-negative when
            ``normalize``.
        scale: ``zeta``, non-negative.
        normalize: divide the step by ``sqrt(L_t)`` per sample (DPS's step size).
        guidance_start, guidance_end: guide the steps whose position ``i / num_steps`` in the run lies in
            ``[guidance_start, guidance_end)``.
        reward_space: ``"image"`` (the loss reads images in ``[0, 1]`` decoded by the VAE) or ``"sample"``.

    Attributes:
        last_losses: the per-sample loss ``L_t`` at the latest guided step.
    """

    uses_denoiser = True
    ignore_for_config = ["loss"]

    @register_to_config
    def __init__(
        self,
        *,
        loss: Loss | None = None,
        scale: float = 1.0,
        normalize: bool = True,
        guidance_start: float = 0.0,
        guidance_end: float = 1.0,
        reward_space: str = "image",
    ):
        super().__init__()
        check_callable(loss, "LossGuidance", "loss")
        check_non_negative(scale, "scale")
        if not isinstance(normalize, bool):
            raise ValueError(f"normalize must be True or False, got {normalize!r}")
        check_guidance_range(guidance_start, guidance_end)
        check_reward_space(reward_space)
        self.loss = loss
        self.last_losses: torch.Tensor | None = None

    def begin(self) -> None:
        self.last_losses = None

    def after_step(self, step: DenoisingStep, prev_sample: torch.Tensor) -> torch.Tensor:
        config = self.config
        if config.scale == 0 or not in_guidance_range(self.scheduler, step, config.guidance_start, config.guidance_end):
            return prev_sample
        with torch.enable_grad():
            sample = step.sample.detach().requires_grad_(True)
            x0 = step.x0_and_eps(self.denoise(sample, step.timestep, step), sample)[0]
            losses = self.score(self.loss, x0, name="loss")
            gradient = gradient_of_sum(losses, sample, "loss")
        losses = losses.detach()
        self.last_losses = losses
        step_size = torch.full_like(losses, config.scale)
        if config.normalize:
            if (losses < 0).any():
                raise ValueError(
                    f"normalize=True divides by the square root of the loss, which must be non-negative; got "
                    f"{losses.tolist()}"
                )
            step_size = torch.where(losses > 0, config.scale / losses.clamp_min(1e-30).sqrt(), 0.0)
        step_size = per_sample(step_size, gradient)
        return prev_sample - step_size * gradient.to(prev_sample.dtype)
