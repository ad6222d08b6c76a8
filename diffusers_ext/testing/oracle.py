"""``GaussianMixtureDenoiser``: a diffusers model whose output is exact, for measuring samplers against the truth."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.utils import BaseOutput

from ..diffusion_math import (
    alpha_sigma_function,
    check_prediction_type,
    default_prediction_type,
    noise_path_from_scheduler_config,
    prediction_from_x0_and_eps,
)
from .gaussian_mixture import GaussianMixture


@dataclass
class GaussianMixtureDenoiserOutput(BaseOutput):
    """``sample``: the exact prediction, in the input's shape and dtype (the field name ``UNet2DModel`` uses)."""

    sample: torch.Tensor


def exact_model_output(
    sample: torch.Tensor, x0: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, prediction_type: str
) -> torch.Tensor:
    """The target of ``prediction_type`` for ``x0_hat = E[x0 | x_t]``, with ``eps_hat = (x_t - alpha x0_hat) / sigma``
    and ``eps_hat = 0`` where ``sigma = 0`` (there ``eps_hat = -sigma * score`` vanishes: a flow inversion's first
    call, a clean frame). ``alpha``, ``sigma`` broadcast against ``sample``."""
    eps = torch.where(sigma > 0, (sample - alpha * x0) / torch.where(sigma > 0, sigma, 1.0), 0.0)
    return prediction_from_x0_and_eps(x0, eps, alpha, sigma, prediction_type)


class PairedScheduleMixin:
    """What the exact denoisers share: the noise path of the scheduler they are paired with, their prediction type and
    their law cached per device. A subclass (also a ``ModelMixin`` and ``ConfigMixin``) sets ``self.law`` and calls
    ``pair_with_scheduler`` in ``__init__``."""

    def pair_with_scheduler(self, scheduler_config: Mapping[str, Any] | None, prediction_type: str | None) -> None:
        """Reads ``(alpha_t, sigma_t)`` from ``scheduler_config`` (``DDPMScheduler``'s linear VP schedule when None) and
        registers ``prediction_type`` (the config's default when None) in the model config."""
        schedule = dict(scheduler_config) if scheduler_config is not None else {"beta_schedule": "linear"}
        self.noise_path = noise_path_from_scheduler_config(schedule)
        self.num_train_timesteps = int(schedule.get("num_train_timesteps", 1000))
        self._alpha_sigma = alpha_sigma_function(schedule)
        prediction_type = check_prediction_type(prediction_type or default_prediction_type(schedule))
        if prediction_type == "flow_prediction" and self.noise_path != "flow":
            raise ValueError("prediction_type='flow_prediction' needs a flow-matching scheduler_config")
        self.register_to_config(prediction_type=prediction_type)
        # ModelMixin saves, loads and reports dtype/device through tensors; the law itself lives in the config.
        self.register_buffer("dtype_anchor", torch.zeros(0))
        self._law_on_device = {}

    def alpha_sigma(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha_t, sigma_t)`` in float64 at training timesteps of any shape."""
        return self._alpha_sigma(timesteps)

    def law_on(self, device: torch.device):
        if device not in self._law_on_device:
            self._law_on_device[device] = self.law.to(device)
        return self._law_on_device[device]


class GaussianMixtureDenoiser(PairedScheduleMixin, ModelMixin, ConfigMixin):
    r"""The exact denoiser of a Gaussian-mixture data law, usable wherever diffusers expects a ``unet``.

    No paper: this is the project's test oracle. For data ``x0 ~ sum_k w_k N(mu_k, Sigma_k)`` and the forward process
    of ``scheduler_config``, ``x_t = alpha_t x0 + sigma_t eps``, it returns the exact minimiser of the diffusion
    training loss for ``prediction_type``:

        x0_hat  = E[x0 | x_t]                          (closed form, see ``GaussianMixture.posterior_mean``)
        eps_hat = (x_t - alpha_t x0_hat) / sigma_t
        output  = eps_hat | x0_hat | alpha_t eps_hat - sigma_t x0_hat | eps_hat - x0_hat
                  (epsilon | sample | v_prediction | flow_prediction)

    ``(alpha_t, sigma_t)`` come from ``diffusers_ext.diffusion_math``: the VP schedule read from a DDPM-family
    scheduler config (``beta_schedule``, ``beta_start``, ``beta_end``, ``trained_betas``, ``rescale_betas_zero_snr``),
    or the rectified-flow path ``(1 - t/N, t/N)`` for a ``FlowMatch*`` config. The computation runs in float64 and the
    output is cast to the input's dtype.

    Args:
        means: ``K x D`` component means.
        covariances: ``K`` isotropic variances, ``K x D`` diagonals or ``K x D x D`` matrices.
        weights: ``K`` mixture weights summing to one (uniform if omitted).
        scheduler_config: the config of the scheduler the model is paired with (``scheduler.config``); when omitted,
            ``DDPMScheduler``'s default linear VP schedule.
        prediction_type: what the model outputs; defaults to the scheduler config's ``prediction_type``, else
            ``"epsilon"`` for VP and ``"flow_prediction"`` for flow configs.
        sample_size, in_channels: the shape ``(in_channels, H, W)`` pipelines allocate for one sample
            (``sample_size`` is ``H == W`` or ``(H, W)``); ``in_channels * H * W`` must equal ``D``.
            ``in_channels`` defaults to ``D / (H * W)``.
    """

    @register_to_config
    def __init__(
        self,
        means: Sequence[Sequence[float]],
        covariances: Sequence,
        weights: Sequence[float] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        prediction_type: str | None = None,
        sample_size: int | Sequence[int] = 1,
        in_channels: int | None = None,
    ):
        super().__init__()
        self.law = GaussianMixture(means, covariances, weights)
        self.pair_with_scheduler(scheduler_config, prediction_type)

        height, width = (sample_size, sample_size) if isinstance(sample_size, int) else tuple(sample_size)
        if in_channels is None:
            in_channels = self.law.dim // (height * width)
        if in_channels * height * width != self.law.dim:
            raise ValueError(
                f"in_channels * H * W = {in_channels} * {height} * {width} does not match the mixture's dimension "
                f"{self.law.dim} (means have shape {tuple(self.law.means.shape)})"
            )
        self.register_to_config(in_channels=in_channels)
        self.sample_shape = (in_channels, height, width)

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> GaussianMixtureDenoiserOutput | tuple[torch.Tensor]:
        batch = sample.shape[0]
        if sample[0].numel() != self.law.dim:
            raise ValueError(
                f"sample of shape {tuple(sample.shape)} has {sample[0].numel()} values per item; "
                f"this oracle models {self.law.dim} (shape {self.sample_shape})"
            )
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(batch) if timestep.ndim == 0 else timestep.reshape(batch)
        alpha, sigma = self.alpha_sigma(timestep)
        x = sample.reshape(batch, -1).to(torch.float64)
        x0 = self.law_on(sample.device).posterior_mean(x, alpha, sigma)
        prediction = exact_model_output(x, x0, alpha[:, None], sigma[:, None], self.config.prediction_type)
        prediction = prediction.reshape(sample.shape).to(sample.dtype)
        return GaussianMixtureDenoiserOutput(sample=prediction) if return_dict else (prediction,)
