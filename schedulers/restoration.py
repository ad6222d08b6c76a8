"""What the restoration schedulers (RDDM, ResShift, the mean-reverting SDE, the diffusion bridge) share.

Each of these processes writes its state at time ``t`` as an affine mix of the clean image ``x0``, the degraded
image ``y`` and Gaussian noise:

    x_t = a_t x0 + b_t y + s_t eps,        eps ~ N(0, I)

    ResShift                 a = 1 - eta_t                 b = eta_t                       s = kappa sqrt(eta_t)
    RDDM                     a = 1 - alpha_bar_t           b = alpha_bar_t                 s = beta_bar_t
    mean-reverting SDE       a = exp(-theta_bar_t)         b = 1 - a                       s = lam sqrt(1 - a^2)
    diffusion bridge (DDBM)  a = alpha_t (1 - SNR_T/SNR_t) b = alpha_t/alpha_T SNR_T/SNR_t s = sigma_t sqrt(1 - SNR_T/SNR_t)

so one forward process (``add_noise``), one set of training targets (``training_target``) and one inversion from a
model output to ``(x0, eps)`` (``original_and_noise``) serve all four, the trainer and the exact test oracle
(``diffusers_ext.testing.ExactRestorationDenoiser``). A subclass supplies its coefficients (``path_coefficients``),
its inference grid (``set_timesteps``), its first state (``initial_sample``), its training-time distribution
(``sample_training_timesteps``) and its update (``step``).

Time runs on the scale ``[0, num_train_timesteps]`` that the model sees as its timestep, so a ``UNet2DModel``'s
sinusoidal embedding works for discrete and continuous processes alike; larger ``t`` is closer to ``y``.

Prediction types (``x0_hat``, ``eps_hat`` are then fixed by ``x_t = a x0 + b y + s eps``):
    ``"sample"``: ``x0``; ``"epsilon"``: ``eps``; ``"residual"``: ``y - x0`` (RDDM's ``I_res``);
    ``"residual_and_noise"``: both, stacked on the channel axis (the model has twice the image channels);
    ``"v_prediction"``: ``a eps - s x0`` on the shifted state ``x_t - b y = a x0 + s eps``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers.configuration_utils import ConfigMixin
from diffusers.schedulers.scheduling_utils import SchedulerMixin
from diffusers.utils import BaseOutput

from ..diffusion_math import prediction_from_x0_and_eps, x0_and_eps_from_prediction
from .step_counter import StepCounterMixin

RESTORATION_PREDICTION_TYPES = ("sample", "epsilon", "residual", "residual_and_noise", "v_prediction")


@dataclass
class RestorationSchedulerOutput(BaseOutput):
    """``prev_sample``: the state at the next (smaller) time; ``pred_original_sample``: the model's ``x0`` estimate."""

    prev_sample: torch.Tensor
    pred_original_sample: torch.Tensor


def per_sample(values: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """A scalar or one value per sample, shaped to broadcast against ``like`` (B, ...) in its dtype and device."""
    values = torch.as_tensor(values, device=like.device).to(like.dtype).flatten()
    return values.reshape((-1,) + (1,) * (like.ndim - 1))


class RestorationScheduler(StepCounterMixin, SchedulerMixin, ConfigMixin):
    """Base class of the restoration schedulers (see the module docstring). Subclasses register their config, which
    must include ``num_train_timesteps`` and ``prediction_type``, and list the prediction types their paper allows in
    ``prediction_types``."""

    order = 1
    prediction_types: tuple[str, ...] = RESTORATION_PREDICTION_TYPES

    def check_prediction_type(self) -> None:
        if self.config.prediction_type not in self.prediction_types:
            raise ValueError(f"{type(self).__name__} supports prediction_type in {self.prediction_types}, got "
                             f"{self.config.prediction_type!r}")

    # What a subclass defines ------------------------------------------------------------------------------------
    def path_coefficients(self, timesteps: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(a_t, b_t, s_t)`` in float64 at ``timesteps`` (model-facing values, scalar or 1-D)."""
        raise NotImplementedError(f"{type(self).__name__} must define its process's path_coefficients")

    def sample_training_timesteps(self, batch_size: int, generator: torch.Generator | None = None,
                                  device: torch.device | str = "cpu") -> torch.Tensor:
        """Timesteps for a training batch; uniform over the training grid ``1 .. num_train_timesteps`` by default."""
        steps = torch.randint(1, self.config.num_train_timesteps + 1, (batch_size,), generator=generator)
        return steps.to(device)

    def initial_sample(self, degraded: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """The state sampling starts from, given the degraded image ``y`` (B, C, H, W)."""
        raise NotImplementedError(f"{type(self).__name__} must define the initial_sample its sampler starts from")

    # Shared machinery -------------------------------------------------------------------------------------------
    @property
    def model_output_channels_factor(self) -> int:
        """How many image-sized tensors the model outputs (2 for ``"residual_and_noise"``)."""
        return 2 if self.config.prediction_type == "residual_and_noise" else 1

    def scale_model_input(self, sample: torch.Tensor, timestep=None) -> torch.Tensor:
        return sample

    def coefficients_like(self, timesteps, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        timesteps = torch.as_tensor(timesteps, device=like.device).flatten()
        return tuple(per_sample(c, like) for c in self.path_coefficients(timesteps))

    def add_noise(self, original_samples: torch.Tensor, degraded_samples: torch.Tensor, noise: torch.Tensor,
                  timesteps: torch.Tensor) -> torch.Tensor:
        """The forward process: ``a_t x0 + b_t y + s_t eps`` at ``timesteps`` (one per sample, or one for all)."""
        a, b, s = self.coefficients_like(timesteps, original_samples)
        return a * original_samples + b * degraded_samples + s * noise

    def training_target(self, original_samples: torch.Tensor, degraded_samples: torch.Tensor, noise: torch.Tensor,
                        timesteps: torch.Tensor) -> torch.Tensor:
        """What the model is trained to output for ``add_noise(original, degraded, noise, timesteps)``."""
        prediction_type = self.config.prediction_type
        if prediction_type == "residual":
            return degraded_samples - original_samples
        if prediction_type == "residual_and_noise":
            return torch.cat([degraded_samples - original_samples, noise], dim=1)
        a, _, s = self.coefficients_like(timesteps, original_samples)
        return prediction_from_x0_and_eps(original_samples, noise, a, s, prediction_type)

    def original_and_noise(self, model_output: torch.Tensor, sample: torch.Tensor, degraded: torch.Tensor,
                           timestep) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` from a model output at ``sample = x_t``: the prediction together with
        ``x_t = a x0 + b y + s eps``. Where a coefficient that the inversion divides by is zero, the prediction does not
        determine that quantity and it is returned as zero; a scheduler whose update still uses it there must decide
        what to put in its place (``RDDMScheduler`` does)."""
        a, b, s = self.coefficients_like(timestep, sample)
        shifted = sample - b * degraded  # = a x0 + s eps
        prediction_type = self.config.prediction_type
        if prediction_type == "residual_and_noise":
            residual, eps = model_output.chunk(2, dim=1)
            return degraded - residual, eps
        if prediction_type == "residual":
            x0 = degraded - model_output
            return x0, _safe_divide(shifted - a * x0, s)
        if prediction_type == "sample":
            return model_output, _safe_divide(shifted - a * model_output, s)
        if prediction_type == "epsilon":
            return _safe_divide(shifted - s * model_output, a), model_output
        return x0_and_eps_from_prediction(model_output, shifted, a, s, prediction_type)

    def begin_step(self, model_output: torch.Tensor, timestep, sample: torch.Tensor, degraded: torch.Tensor) -> int:
        """The checks every ``step`` starts with (a grid is set, the shapes agree, ``timestep`` is this step's);
        returns the step's index in ``self.timesteps`` and moves the counter on."""
        if getattr(self, "timesteps", None) is None:
            raise ValueError("call set_timesteps before step")
        if sample.ndim < 2 or degraded.shape != sample.shape:
            raise ValueError(f"sample and degraded image must be batches (B, C, ...) of one shape, got "
                             f"{tuple(sample.shape)} and {tuple(degraded.shape)}")
        expected = (sample.shape[0], sample.shape[1] * self.model_output_channels_factor, *sample.shape[2:])
        if tuple(model_output.shape) != expected:
            raise ValueError(f"model_output must have shape {expected} for samples of shape {tuple(sample.shape)} "
                             f"(prediction_type {self.config.prediction_type!r}), got {tuple(model_output.shape)}")
        if self._step_index is None:
            self._init_step_index(timestep)
        index = self._step_index
        if index >= len(self.timesteps):
            raise ValueError(f"step called {index + 1} times after set_timesteps({len(self.timesteps)} steps)")
        current = self.timesteps[index]
        if bool((torch.as_tensor(timestep, device=current.device) != current).any()):
            raise ValueError(f"step {index} of this schedule is at timestep {current.item():g}, got {timestep}")
        self._step_index = index + 1
        return index

    def __len__(self) -> int:
        return self.config.num_train_timesteps


def _safe_divide(numerator: torch.Tensor, denominator: torch.Tensor) -> torch.Tensor:
    return torch.where(denominator != 0, numerator / torch.where(denominator != 0, denominator, 1), 0)
