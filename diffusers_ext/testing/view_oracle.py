r"""An exact view-conditioned prior for score distillation: the law of the image seen from camera ``c`` is a Gaussian
(or a mixture) around the renders of known target shapes, so its noise prediction is closed form and SDS / SDI
("DreamFusion", arXiv 2209.14988; "Score Distillation via Reparametrized DDIM", arXiv 2405.15891) driven by it can be
checked against the shapes they should recover.

The law. With ``m_k(c) = 2 render(shape_k, c) - 1`` (pixel space, ``(3, H, W)`` flattened to ``D`` values)::

    p(x0 | c) = sum_k w_k N(x0; m_k(c), s^2 I)

and a VP path ``x_t = alpha x0 + sigma eps``, every component stays isotropic, so with ``v = alpha^2 s^2 + sigma^2``::

    r_k(x_t)          = softmax_k( log w_k - |x_t - alpha m_k|^2 / (2 v) )        (all components share v)
    E[x0 | x_t, k]    = m_k + (alpha s^2 / v) (x_t - alpha m_k)
    E[x0 | x_t]       = sum_k r_k E[x0 | x_t, k],        eps_hat = (x_t - alpha E[x0 | x_t]) / sigma

This is ``GaussianMixture``'s posterior specialised to one shared isotropic variance, written out because its means
change with every camera batch and ``GaussianMixture`` would build ``D x D`` covariances for each. Computed in float64.
The law is the conditional one; it has no unconditional part, so ``guidance_scale`` must be 1.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch

from ..diffusion_math import vp_alpha_sigma, vp_alphas_cumprod
from .gaussian_mixture import mixture_weights

# Stable Diffusion's training schedule, the VP schedule the oracle pairs with by default.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012,
                             "num_train_timesteps": 1000}


class ViewConditionedGaussianPrior:
    """The exact prior above, a ``DistillationPrior`` (``pipelines/three_d/score_distillation.py``).

    Args:
        targets: the ``K`` target shapes (``VoxelGrid`` or anything ``render`` takes).
        height, width: the image size the prior is defined on.
        std: ``s``, each component's standard deviation around its render (pixel units of [-1, 1]).
        weights: the ``K`` mixture weights (uniform by default).
        scheduler_config: the VP schedule (Stable Diffusion's by default).
        render_kwargs: passed to ``render`` for the target images (``fov_y``, ``background``, ``num_samples``).
    """

    def __init__(self, targets: Sequence, height: int, width: int, std: float = 0.1,
                 weights: Sequence[float] | None = None, scheduler_config: Mapping[str, Any] | None = None,
                 render_kwargs: Mapping[str, Any] | None = None):
        if len(targets) == 0:
            raise ValueError("targets must hold at least one shape")
        if std <= 0:
            raise ValueError(f"std must be positive, got {std}")
        self.targets = list(targets)
        self.height, self.width, self.std = height, width, std
        self.weights = mixture_weights(weights, len(self.targets))
        self.alphas_cumprod = vp_alphas_cumprod(scheduler_config or STABLE_DIFFUSION_SCHEDULE)
        self.render_kwargs = dict(render_kwargs or {})
        self._last_means: tuple[torch.Tensor, torch.Tensor] | None = None

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if images.ndim != 4 or tuple(images.shape[1:]) != (3, self.height, self.width):
            raise ValueError(f"images must be (N, 3, {self.height}, {self.width}) renders, got {tuple(images.shape)}")
        return 2 * images - 1

    @torch.no_grad()
    def target_means(self, cameras: torch.Tensor) -> torch.Tensor:
        """``m_k(c)`` for every target and camera: ``(K, N, 3, H, W)``, float64. The last batch's renders are kept:
        SDI's inversion asks for the same cameras ``inversion_steps + 1`` times per update."""
        from diffusers_ext.pipelines.three_d.rendering import render

        if self._last_means is None or not torch.equal(self._last_means[0], cameras):
            means = torch.stack([2 * render(target, cameras, self.height, self.width, **self.render_kwargs).double()
                                 - 1 for target in self.targets])
            self._last_means = (cameras.clone(), means)
        return self._last_means[1]

    def posterior(self, samples: torch.Tensor, timesteps: torch.Tensor,
                  cameras: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``E[x0 | x_t, c]`` ``(N, 3, H, W)`` and the responsibilities ``(N, K)``, float64."""
        from diffusers_ext.pipelines.three_d.score_distillation import check_prior_cameras

        check_prior_cameras(cameras, samples.shape[0])
        x = samples.double()
        alpha, sigma = (v[:, None, None, None] for v in vp_alpha_sigma(timesteps, self.alphas_cumprod))
        means = self.target_means(cameras)
        variance = alpha**2 * self.std**2 + sigma**2
        residuals = x[None] - alpha[None] * means  # (K, N, 3, H, W)
        log_likelihood = -(residuals**2).sum(dim=(2, 3, 4)) / (2 * variance.reshape(1, -1))
        responsibilities = torch.softmax(self.weights.log()[:, None] + log_likelihood, dim=0)  # (K, N)
        component_means = means + (alpha * self.std**2 / variance)[None] * residuals
        return (responsibilities[..., None, None, None] * component_means).sum(dim=0), responsibilities.T

    @torch.no_grad()
    def __call__(self, samples: torch.Tensor, timesteps: torch.Tensor, cameras: torch.Tensor,
                 prompts: Sequence[str] | None = None, guidance_scale: float = 1.0) -> torch.Tensor:
        """The exact ``eps_hat`` ``(N, 3, H, W)`` in ``samples``' dtype; ``prompts`` are ignored."""
        if not math.isclose(guidance_scale, 1.0):
            raise ValueError(f"the view-conditioned oracle has no unconditional law: guidance_scale must be 1, got "
                             f"{guidance_scale}")
        x0, _ = self.posterior(samples, timesteps, cameras)
        alpha, sigma = (v[:, None, None, None] for v in vp_alpha_sigma(timesteps, self.alphas_cumprod))
        return ((samples.double() - alpha * x0) / sigma).to(samples.dtype)
