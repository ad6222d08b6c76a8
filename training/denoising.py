r"""The plain denoising objective of "Denoising Diffusion Probabilistic Models" (Ho et al., arXiv 2006.11239) as a loss
for the shared ``Trainer``: an unconditional image model (a ``UNet2DModel``) learns the scheduler's prediction type.

For clean images ``x0`` (a batch ``(B, C, H, W)``), one loss evaluation is

    t ~ U{0, ..., N - 1}                                   (one training timestep per image)
    (alpha_t, sigma_t) = the scheduler config's noise path at t     (``diffusion_math.alpha_sigma_function``)
    x_t    = alpha_t x0 + sigma_t eps,   eps ~ N(0, I)
    target = eps | x0 | alpha_t eps - sigma_t x0                    (epsilon | sample | v_prediction)
    loss   = mean || model(x_t, t) - target ||^2

which is ``L_simple`` for ``epsilon``; the 2D slice prior of DiffusionMBIR (arXiv 2211.10655) is trained this way
(``training/recipes/tiny_slice_prior.py``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from ..diffusion_math import (
    alpha_sigma_function,
    default_prediction_type,
    noise_path_from_scheduler_config,
    prediction_from_x0_and_eps,
)


class DenoisingObjective:
    """``E || model(alpha_t x0 + sigma_t eps, t) - target ||^2`` with ``t`` uniform over the training timesteps of a
    VP scheduler (module docstring). Batches are clean images ``(B, C, H, W)``.

    Args:
        scheduler: the training scheduler (a VP, DDPM-family one: its ``config`` gives the schedule and the prediction
            type the model learns).
    """

    name = "denoising"

    def __init__(self, scheduler: Any):
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError(f"scheduler must be a diffusers scheduler with a config, got {type(scheduler).__name__}")
        if noise_path_from_scheduler_config(config) != "vp":
            raise ValueError(f"the denoising objective needs a VP (DDPM-family) scheduler, got "
                             f"{type(scheduler).__name__}")
        self.alpha_sigma = alpha_sigma_function(config)
        self.prediction_type = default_prediction_type(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))

    def loss(self, model: torch.nn.Module, batch: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if not torch.is_tensor(batch) or batch.ndim != 4:
            raise ValueError(f"a denoising batch is clean images (B, C, H, W), got "
                             f"{tuple(batch.shape) if torch.is_tensor(batch) else type(batch).__name__}")
        clean = batch
        timesteps = torch.randint(0, self.num_train_timesteps, (clean.shape[0],), generator=generator)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        alpha, sigma = (value.to(device=clean.device, dtype=clean.dtype)[:, None, None, None]
                        for value in self.alpha_sigma(timesteps))
        target = prediction_from_x0_and_eps(clean, noise, alpha, sigma, self.prediction_type)
        prediction = model(alpha * clean + sigma * noise, timesteps.to(clean.device)).sample
        return torch.nn.functional.mse_loss(prediction.float(), target.float())
