"""Exact oracles for restoration: a paired Gaussian-mixture law and its exact restoration denoiser.

Clean data ``x0 ~ p(x0)`` (a ``GaussianMixture``) is degraded by a linear operator and Gaussian noise,
``y = A x0 + n``, ``n ~ N(0, noise_std^2 I)``. Then ``p(x0 | y)`` is again a mixture
(``GaussianMixture.posterior_given_linear_measurement``), and for any restoration process of the form
``x_t = a_t x0 + b_t y + s_t eps`` (``schedulers.restoration``) the state shifted by ``b_t y`` is an ordinary noisy
observation of ``x0 | y``:

    x_t - b_t y = a_t x0 + s_t eps        =>    E[x0 | x_t, y] = E_{p(x0 | y)}[x0 | a_t x0 + s_t eps = x_t - b_t y]

which ``GaussianMixture.posterior_mean`` gives in closed form. A sampler driven by this denoiser should reproduce
``p(x0 | y)`` up to its own discretisation error.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from diffusers.utils import BaseOutput

from .gaussian_mixture import GaussianMixture


class PairedGaussianLaw:
    """Clean ``x0 ~ prior`` and degraded ``y = A x0 + n`` in ``D`` dimensions (``A`` is ``D x D``: the degraded image
    lives in the clean image's space, as a blurred or bicubic-upsampled image does).

    Args:
        prior: the clean-data law.
        operator: ``A``, a ``D x D`` matrix.
        noise_std: the degradation noise's standard deviation, positive.
    """

    def __init__(self, prior: GaussianMixture, operator: Sequence | torch.Tensor, noise_std: float):
        operator = torch.as_tensor(operator, dtype=torch.float64)
        if operator.shape != (prior.dim, prior.dim):
            raise ValueError(f"the operator must be {prior.dim} x {prior.dim}, got {tuple(operator.shape)}")
        if not noise_std > 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        self.prior, self.operator, self.noise_std = prior, operator, float(noise_std)
        self._posteriors: dict[tuple[float, ...], GaussianMixture] = {}

    @property
    def dim(self) -> int:
        return self.prior.dim

    def degrade(self, clean: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        clean = clean.reshape(clean.shape[0], -1).to(torch.float64)
        noise = torch.randn(clean.shape, generator=generator, dtype=torch.float64)
        return clean @ self.operator.T + self.noise_std * noise

    def sample(self, num_samples: int, generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``num_samples`` pairs ``(x0, y)``, each ``num_samples x D``."""
        clean = self.prior.sample(num_samples, generator)
        return clean, self.degrade(clean, generator)

    def posterior(self, degraded: torch.Tensor) -> GaussianMixture:
        """The exact law ``p(x0 | y)`` of one degraded vector ``y`` (``D`` values)."""
        degraded = torch.as_tensor(degraded, dtype=torch.float64).reshape(-1)
        key = tuple(degraded.tolist())
        if key not in self._posteriors:
            self._posteriors[key] = self.prior.posterior_given_linear_measurement(self.operator, degraded,
                                                                                self.noise_std)
        return self._posteriors[key]

    def restoration_mean(self, sample: torch.Tensor, degraded: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                         s: torch.Tensor) -> torch.Tensor:
        """``E[x0 | x_t = sample, y = degraded]`` for ``x_t = a x0 + b y + s eps`` (rows of ``B x D`` inputs; ``a``,
        ``b``, ``s`` one per row), float64."""
        sample = sample.reshape(sample.shape[0], -1).to(torch.float64)
        degraded = degraded.reshape(degraded.shape[0], -1).to(torch.float64)
        a, b, s = (torch.as_tensor(c, dtype=torch.float64).expand(sample.shape[0]) for c in (a, b, s))
        shifted = sample - b[:, None] * degraded
        mean = torch.empty_like(sample)
        if bool((degraded == degraded[:1]).all()):  # the common case in tests: one measurement, many chains
            unique_degraded, which = degraded[:1], torch.zeros(len(degraded), dtype=torch.long)
        else:
            unique_degraded, which = torch.unique(degraded, dim=0, return_inverse=True)
        for index, y in enumerate(unique_degraded):
            rows = which == index
            posterior = self.posterior(y)
            # a = s = 0 (a bridge's start, x_t = y): the state says nothing beyond y.
            uninformative = rows & (a == 0) & (s == 0)
            informative = rows & ~uninformative
            if informative.any():
                mean[informative] = posterior.posterior_mean(shifted[informative], a[informative], s[informative])
            if uninformative.any():
                mean[uninformative] = posterior.weights @ posterior.means
        return mean


@dataclass
class ExactRestorationOutput(BaseOutput):
    sample: torch.Tensor


class ExactRestorationDenoiser(torch.nn.Module):
    """The exact restoration model of a ``PairedGaussianLaw`` for a restoration scheduler: called like the UNet of a
    restoration pipeline, on ``torch.cat([x_t, y], dim=1)`` and the timestep, it returns the minimiser of the
    scheduler's training loss, ``scheduler.training_target(x0_hat, y, eps_hat, t)`` with ``x0_hat = E[x0 | x_t, y]``
    and ``eps_hat = (x_t - a x0_hat - b y) / s``. Samples may have any shape ``(B, ...)`` with ``D`` values per item
    and per half of the channel axis. Not a saved model: an in-memory test oracle."""

    def __init__(self, law: PairedGaussianLaw, scheduler):
        super().__init__()
        self.law, self.scheduler = law, scheduler
        self.calls = 0

    def forward(self, sample: torch.Tensor, timestep, return_dict: bool = True):
        state, degraded = sample.chunk(2, dim=1)
        batch = state.shape[0]
        if state[0].numel() != self.law.dim:
            raise ValueError(f"each state has {state[0].numel()} values; the law has {self.law.dim}")
        timestep = torch.as_tensor(timestep, device=sample.device).flatten()
        timestep = timestep.expand(batch) if timestep.numel() == 1 else timestep
        a, b, s = self.scheduler.path_coefficients(timestep)
        x0 = self.law.restoration_mean(state, degraded, a, b, s).reshape(state.shape)
        state64, degraded64 = state.to(torch.float64), degraded.to(torch.float64)
        a, b, s = (c.to(torch.float64).reshape((-1,) + (1,) * (state.ndim - 1)) for c in (a, b, s))
        eps = torch.where(s > 0, (state64 - a * x0 - b * degraded64) / torch.where(s > 0, s, 1.0), 0.0)
        target = self.scheduler.training_target(x0, degraded64, eps, timestep)
        self.calls += 1
        target = target.to(sample.dtype)
        return ExactRestorationOutput(sample=target) if return_dict else (target,)
