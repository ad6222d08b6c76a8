r"""An exact video oracle: a Gaussian-mixture law of clips and its exact denoiser when every frame has its own noise
level (FVDM, "Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach", arXiv 2410.03160).

Layout. A clip is ``(C, F, H, W)`` and a batch ``(B, C, F, H, W)``, the layout of Wan and SkyReels-V2 (the diffusers
backbones that take per-frame timesteps); backbones in ``(B, F, C, H, W)`` (CogVideoX) convert with
``video.transpose(1, 2)``. Internally frame ``f`` is the vector ``x[f]`` of ``D = C H W`` values (``(C, H, W)``
order), and a clip the ``F x D`` matrix ``X`` of its frames.

The law (``VideoGaussianMixture``). ``p(X0) = sum_k w_k N(X0; M_k, T_k (x) I_D)``: component ``k`` has the mean
trajectory ``M_k`` (``F x D``) and the temporal covariance ``T_k`` (``F x F``), shared by all ``D`` pixels, which are
independent given the component. Every quantity below is therefore ``F x F`` linear algebra applied to ``D`` columns;
no ``(F D) x (F D)`` matrix is ever formed. ``autoregressive_video_mixture`` builds the stationary AR(1) law

    x0[f] = m_k + rho_k (x0[f-1] - m_k) + sqrt(1 - rho_k^2) s_k e_f,     x0[0] = m_k + s_k e_0
    =>  M_k = 1_F m_k^T,   T_k[i, j] = s_k^2 rho_k^|i - j|

with one frame mean ``m_k`` for all frames: the law is then stationary, so it is defined for any number of frames
and its frame-to-frame statistics (``frame_mean``, ``frame_covariance``) are the same at frame 3 and frame 300, which
is what a rolling-window sampler run far past its window is compared with.

Per-frame noise. ``x_t[f] = alpha_f x0[f] + sigma_f eps_f``, i.e. ``X_t = A X0 + S E`` with ``A = diag(alpha)``,
``S = diag(sigma)``. Per component, the columns of ``X_t`` are Gaussian with

    mean  A M_k,     covariance  C_k = A T_k A + S^2                        (F x F)

and the posterior of ``X0`` is Gaussian, in the gain form, which needs no inverse of ``S`` (clean frames,
``sigma_f = 0``, are exact observations) nor of ``A`` (pure-noise frames, ``alpha_f = 0``, carry no signal):

    R_k            = X_t - A M_k
    E[X0 | X_t, k]  = M_k + T_k A C_k^{-1} R_k
    Cov[X0 | X_t, k] = (T_k - T_k A C_k^{-1} A T_k) (x) I_D
    log p(X_t | k)  = -1/2 [ tr(R_k^T C_k^{-1} R_k) + D log det C_k + F D log(2 pi) ]
    r_k(X_t)        = softmax_k( log w_k + log p(X_t | k) )                            (responsibilities)
    E[X0 | X_t]     = sum_k r_k E[X0 | X_t, k]

``C_k`` is positive definite whenever no frame has ``alpha_f = sigma_f = 0``; it is factored by Cholesky. For a clean
frame the formula returns ``x_t[f] / alpha_f`` up to rounding; ``posterior_mean`` returns exactly that. Conditioning
on clean frames ``O`` (``VideoGaussianMixture.conditional``) is the same computation with ``alpha = 1, sigma = 0`` on
``O`` and ``alpha = 0, sigma = 1`` elsewhere: the gain form reduces to Gaussian conditioning
``M_u + T_uO T_OO^{-1} (X_O - M_O)``, ``T_uu - T_uO T_OO^{-1} T_Ou``, and the responsibilities to
``w_k N(X_O; M_k[O], T_k[O, O] (x) I_D)`` (the unobserved frames contribute the same factor to every component).
Everything runs in float64.

``VideoGaussianMixtureDenoiser`` wraps the AR(1) law as a diffusers model: ``(sample, timestep) -> prediction`` with
``timestep`` a scalar, one per clip ``(B,)`` or one per frame ``(B, F)``, mapped to ``(alpha, sigma)`` by the paired
scheduler's config (``diffusion_math.alpha_sigma_function``).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .gaussian_mixture import mixture_weights
from .oracle import GaussianMixtureDenoiserOutput, PairedScheduleMixin, exact_model_output


def frames_from_video(video: torch.Tensor) -> torch.Tensor:
    """``(..., C, F, H, W) -> (..., F, C*H*W)``: each frame as one vector."""
    channels, num_frames, height, width = video.shape[-4:]
    frames = video.transpose(-4, -3)
    return frames.reshape(*video.shape[:-4], num_frames, channels * height * width)


def video_from_frames(frames: torch.Tensor, frame_shape: Sequence[int]) -> torch.Tensor:
    """``(..., F, C*H*W) -> (..., C, F, H, W)``, the inverse of ``frames_from_video``."""
    return frames.reshape(*frames.shape[:-1], *frame_shape).transpose(-4, -3)


def per_frame_values(
    values: torch.Tensor | float, batch: int, num_frames: int, name: str, device: torch.device | None = None
) -> torch.Tensor:
    """``values`` given as a scalar, one per clip ``(B,)`` or one per frame ``(B, F)``, as a ``(B, F)`` tensor (a
    ``(B,)`` tensor is read as one value per clip even when ``B == F``)."""
    values = torch.as_tensor(values, device=device)
    if values.ndim == 0:
        return values.expand(batch, num_frames)
    if values.shape == (batch,):
        return values[:, None].expand(batch, num_frames)
    if values.shape == (batch, num_frames):
        return values
    raise ValueError(
        f"{name} must be a scalar, one value per clip ({batch},) or one per frame ({batch}, {num_frames}); "
        f"got shape {tuple(values.shape)}"
    )


def ar1_temporal_covariances(scales: torch.Tensor, correlations: torch.Tensor, num_frames: int) -> torch.Tensor:
    """``T_k[i, j] = s_k^2 rho_k^|i - j|``, the covariance of ``F`` frames of a stationary AR(1) process, ``K x F x F``."""
    lags = torch.arange(num_frames, dtype=torch.float64)
    lags = (lags[:, None] - lags[None, :]).abs()
    return scales[:, None, None] ** 2 * correlations[:, None, None] ** lags


class VideoGaussianMixture:
    """The clip law ``sum_k w_k N(M_k, T_k (x) I_D)`` (module docstring); videos are ``(B, C, F, H, W)``.

    Args:
        means: ``K x F x D`` mean trajectories (``D = C H W``), or ``K x F x C x H x W``.
        temporal_covariances: ``K x F x F`` symmetric positive definite frame covariances.
        weights: ``K`` non-negative weights summing to one; uniform when omitted.
        frame_shape: ``(C, H, W)``; taken from 5-D ``means``, else ``(D, 1, 1)``.
    """

    def __init__(
        self,
        means: Sequence | torch.Tensor,
        temporal_covariances: Sequence | torch.Tensor,
        weights: Sequence | torch.Tensor | None = None,
        frame_shape: Sequence[int] | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim == 5:
            frame_shape = frame_shape or tuple(means.shape[2:])
            means = means.reshape(*means.shape[:2], -1)
        if means.ndim != 3 or means.numel() == 0:
            raise ValueError(f"means must be a non-empty K x F x D array, got shape {tuple(means.shape)}")
        num_components, num_frames, frame_dim = means.shape
        frame_shape = tuple(int(n) for n in frame_shape) if frame_shape is not None else (frame_dim, 1, 1)
        if len(frame_shape) != 3 or math.prod(frame_shape) != frame_dim:
            raise ValueError(f"frame_shape must be (C, H, W) with C*H*W = {frame_dim}, got {frame_shape}")

        covariances = torch.as_tensor(temporal_covariances, dtype=torch.float64)
        if covariances.shape != (num_components, num_frames, num_frames):
            raise ValueError(
                f"temporal_covariances must have shape ({num_components}, {num_frames}, {num_frames}) to match means "
                f"of shape {tuple(means.shape)}; got {tuple(covariances.shape)}"
            )
        if not torch.allclose(covariances, covariances.transpose(1, 2), atol=1e-12):
            raise ValueError("temporal_covariances must be symmetric")
        cholesky, info = torch.linalg.cholesky_ex(covariances)
        if bool((info != 0).any()):
            raise ValueError("temporal_covariances must be positive definite")

        weights = mixture_weights(weights, num_components)

        self.means = means
        self.temporal_covariances = covariances
        self.temporal_cholesky = cholesky
        self.weights = weights
        self.frame_shape = frame_shape

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def num_frames(self) -> int:
        return self.means.shape[1]

    @property
    def frame_dim(self) -> int:
        return self.means.shape[2]

    @property
    def video_shape(self) -> tuple[int, int, int, int]:
        """``(C, F, H, W)``: one clip."""
        channels, height, width = self.frame_shape
        return channels, self.num_frames, height, width

    def to(self, device: torch.device | str) -> VideoGaussianMixture:
        moved = object.__new__(VideoGaussianMixture)
        moved.frame_shape = self.frame_shape
        for name in ("means", "temporal_covariances", "temporal_cholesky", "weights"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, return_components: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``(num_samples, C, F, H, W)`` clips drawn from the law, float64 (and, if asked, each one's component)."""
        device = self.means.device
        components = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        white = torch.randn(
            num_samples, self.num_frames, self.frame_dim, generator=generator, dtype=torch.float64, device=device
        )
        frames = self.means[components] + self.temporal_cholesky[components] @ white
        videos = video_from_frames(frames, self.frame_shape)
        return (videos, components) if return_components else videos

    # -- the exact posterior under per-frame noise ------------------------------------------------------------------

    def _frames(self, videos: torch.Tensor, name: str = "x") -> torch.Tensor:
        """``(B, C, F, H, W)`` clips, or ``(B, C*F*H*W)`` rows flattened in that order, as ``(B, F, D)`` float64."""
        videos = torch.as_tensor(videos)
        if videos.ndim == 2 and videos.shape[1] == math.prod(self.video_shape):
            videos = videos.reshape(videos.shape[0], *self.video_shape)
        if videos.ndim != 5 or tuple(videos.shape[1:]) != self.video_shape:
            raise ValueError(
                f"{name} must be clips of shape (B, C, F, H, W) = (B, {', '.join(map(str, self.video_shape))}) "
                f"(or rows of their {math.prod(self.video_shape)} values); got shape {tuple(videos.shape)}"
            )
        return frames_from_video(videos.to(device=self.means.device, dtype=torch.float64))

    def _levels(self, alpha, sigma, batch: int) -> tuple[torch.Tensor, torch.Tensor]:
        device = self.means.device
        alpha, sigma = (
            per_frame_values(value, batch, self.num_frames, name, device).to(torch.float64)
            for value, name in ((alpha, "alpha"), (sigma, "sigma"))
        )
        for value, name in ((alpha, "alpha"), (sigma, "sigma")):
            if not bool(torch.isfinite(value).all()) or bool((value < 0).any()):
                raise ValueError(f"{name} must be finite and non-negative")
        if bool(((alpha == 0) & (sigma == 0)).any()):
            raise ValueError("every frame needs alpha > 0 or sigma > 0 (alpha = sigma = 0 observes nothing)")
        return alpha, sigma

    def _posterior_components(
        self, frames: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor, with_covariance: bool = False
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Per component: ``log w_k + log p(X_t | k)`` ``(B, K)``, ``E[X0 | X_t, k]`` ``(B, K, F, D)`` and, if asked,
        the temporal factor of ``Cov[X0 | X_t, k]`` ``(B, K, F, F)``."""
        temporal = self.temporal_covariances[None]  # 1, K, F, F
        alpha_k = alpha[:, None]  # B, 1, F
        observed_covariance = alpha_k[..., :, None] * temporal * alpha_k[..., None, :] + torch.diag_embed(sigma**2)[:, None]
        cholesky = torch.linalg.cholesky(observed_covariance)  # B, K, F, F
        residual = frames[:, None] - alpha_k[..., None] * self.means[None]
        whitened = torch.cholesky_solve(residual, cholesky)  # C_k^{-1} R_k
        log_det = 2 * torch.diagonal(cholesky, dim1=-2, dim2=-1).log().sum(-1)
        log_likelihood = -0.5 * (
            (residual * whitened).sum((-2, -1))
            + self.frame_dim * log_det
            + self.num_frames * self.frame_dim * math.log(2 * math.pi)
        )
        component_means = self.means[None] + temporal @ (alpha_k[..., None] * whitened)
        covariances = None
        if with_covariance:
            signal = alpha_k[..., :, None] * temporal  # A T_k
            covariances = temporal - signal.transpose(-1, -2) @ torch.cholesky_solve(signal, cholesky)
            covariances = (covariances + covariances.transpose(-1, -2)) / 2
        return self.weights.log()[None] + log_likelihood, component_means, covariances

    def log_prob(self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0):
        """Log-density of ``x_t[f] = alpha_f x0[f] + sigma_f eps_f`` at clips ``x`` (the law itself by default),
        ``(B,)``. ``alpha``, ``sigma``: scalars, ``(B,)`` or per frame ``(B, F)``."""
        frames = self._frames(x)
        alpha, sigma = self._levels(alpha, sigma, frames.shape[0])
        return torch.logsumexp(self._posterior_components(frames, alpha, sigma)[0], dim=1)

    def responsibilities(self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0):
        """``P(component k | x_t = x)``, ``(B, K)``."""
        frames = self._frames(x)
        alpha, sigma = self._levels(alpha, sigma, frames.shape[0])
        return torch.softmax(self._posterior_components(frames, alpha, sigma)[0], dim=1)

    def posterior_mean(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor):
        """The exact denoiser ``E[x0 | x_t = x]`` with per-frame levels, ``(B, C, F, H, W)`` float64.

        Args:
            x: noisy clips ``(B, C, F, H, W)``.
            alpha, sigma: signal and noise scales, each a scalar, one per clip ``(B,)`` or one per frame ``(B, F)``;
                ``sigma_f = 0`` marks a clean frame (returned as ``x[f] / alpha_f``), ``alpha_f = 0`` a pure-noise one.
        """
        frames = self._frames(x)
        alpha, sigma = self._levels(alpha, sigma, frames.shape[0])
        log_joint, component_means, _ = self._posterior_components(frames, alpha, sigma)
        mean = torch.einsum("bk,bkfd->bfd", torch.softmax(log_joint, dim=1), component_means)
        clean = (sigma == 0)[..., None]
        mean = torch.where(clean, frames / torch.where(clean, alpha[..., None], 1.0), mean)
        return video_from_frames(mean, self.frame_shape)

    # -- conditioning on clean frames -------------------------------------------------------------------------------

    def _clean_frames(self, clean_frames: Mapping[int, torch.Tensor]) -> tuple[list[int], torch.Tensor]:
        if not isinstance(clean_frames, Mapping) or not clean_frames:
            raise ValueError("clean_frames must be a non-empty dict {frame index: frame of shape (C, H, W)}")
        indices = sorted(clean_frames)
        if not all(isinstance(index, int) and 0 <= index < self.num_frames for index in indices):
            raise ValueError(f"clean_frames keys must be frame indices in [0, {self.num_frames}), got {indices}")
        if len(indices) == self.num_frames:
            raise ValueError("clean_frames must leave at least one frame to sample")
        values = []
        for index in indices:
            value = torch.as_tensor(clean_frames[index], dtype=torch.float64, device=self.means.device)
            if tuple(value.shape) not in (self.frame_shape, (self.frame_dim,)):
                raise ValueError(
                    f"clean_frames[{index}] must have shape {self.frame_shape} (C, H, W), got {tuple(value.shape)}"
                )
            values.append(value.reshape(-1))
        return indices, torch.stack(values)

    def conditional(self, clean_frames: Mapping[int, torch.Tensor]) -> VideoGaussianMixture:
        """The exact law of the other frames given some clean ones: per component Gaussian conditioning, weights
        multiplied by the given frames' marginal likelihood (module docstring). Its frames are the remaining ones in
        increasing order.

        Args:
            clean_frames: ``{frame index: frame (C, H, W)}``, one condition shared by all samples.
        """
        indices, values = self._clean_frames(clean_frames)
        observed = torch.zeros(self.num_frames, dtype=torch.bool, device=self.means.device)
        observed[indices] = True
        frames = torch.zeros(1, self.num_frames, self.frame_dim, dtype=torch.float64, device=self.means.device)
        frames[0, observed] = values
        alpha, sigma = observed.to(torch.float64)[None], (~observed).to(torch.float64)[None]
        log_joint, means, covariances = self._posterior_components(frames, alpha, sigma, with_covariance=True)
        free = ~observed
        return VideoGaussianMixture(
            means[0][:, free],
            covariances[0][:, free][:, :, free],
            torch.softmax(log_joint[0], dim=0),
            self.frame_shape,
        )

    def sample_conditional(
        self, clean_frames: Mapping[int, torch.Tensor], num_samples: int, generator: torch.Generator | None = None
    ) -> torch.Tensor:
        """``(num_samples, C, F, H, W)`` clips from the exact conditional law, the clean frames in place."""
        indices, values = self._clean_frames(clean_frames)
        free = [index for index in range(self.num_frames) if index not in indices]
        frames = torch.empty(num_samples, self.num_frames, self.frame_dim, dtype=torch.float64, device=self.means.device)
        frames[:, indices] = values
        frames[:, free] = frames_from_video(self.conditional(clean_frames).sample(num_samples, generator))
        return video_from_frames(frames, self.frame_shape)

    # -- exact frame statistics -------------------------------------------------------------------------------------

    def frame_mean(self) -> torch.Tensor:
        """``E[x0]`` per frame and pixel, ``(C, F, H, W)``."""
        return video_from_frames(torch.einsum("k,kfd->fd", self.weights, self.means), self.frame_shape)

    def frame_covariance(self, lag: int = 0) -> torch.Tensor:
        """``Cov(x0[f][d], x0[f + lag][d])`` for ``f < F - lag`` and every pixel ``d``, ``(C, F - lag, H, W)``:

            sum_k w_k (T_k[f, f + lag] + M_k[f, d] M_k[f + lag, d]) - mu[f, d] mu[f + lag, d],   mu = sum_k w_k M_k

        (``lag = 0``: the per-frame variance). For a stationary law every ``f`` gives the same value."""
        if not isinstance(lag, int) or not 0 <= lag < self.num_frames:
            raise ValueError(f"lag must be an integer in [0, {self.num_frames}), got {lag!r}")
        ahead = self.num_frames - lag
        lagged = torch.diagonal(self.temporal_covariances, offset=lag, dim1=1, dim2=2)  # K, F - lag
        products = self.means[:, :ahead] * self.means[:, lag:]
        second_moment = torch.einsum("k,kfd->fd", self.weights, lagged[..., None] + products)
        mean = torch.einsum("k,kfd->fd", self.weights, self.means)
        return video_from_frames(second_moment - mean[:ahead] * mean[lag:], self.frame_shape)

    def frame_correlation(self, lag: int = 1) -> torch.Tensor:
        """``Corr(x0[f][d], x0[f + lag][d])``, ``(C, F - lag, H, W)``."""
        variance = self.frame_covariance(0)
        return self.frame_covariance(lag) / (variance[:, : self.num_frames - lag] * variance[:, lag:]).sqrt()


def autoregressive_video_mixture(
    frame_means: Sequence | torch.Tensor,
    scales: Sequence[float] | torch.Tensor,
    correlations: Sequence[float] | torch.Tensor,
    num_frames: int,
    weights: Sequence[float] | torch.Tensor | None = None,
    frame_shape: Sequence[int] | None = None,
) -> VideoGaussianMixture:
    """The stationary AR(1) clip mixture: ``M_k = 1_F m_k^T``, ``T_k[i, j] = s_k^2 rho_k^|i - j|``.

    Args:
        frame_means: ``m_k``, ``K x D`` or ``K x C x H x W``.
        scales: ``s_k > 0``, each frame's standard deviation in component ``k``, ``K`` values.
        correlations: ``rho_k`` in ``(-1, 1)``, the lag-1 correlation in component ``k``, ``K`` values.
        num_frames: ``F >= 1``.
        weights: ``K`` mixture weights (uniform if omitted).
        frame_shape: ``(C, H, W)``; taken from 4-D ``frame_means``, else ``(D, 1, 1)``.
    """
    frame_means = torch.as_tensor(frame_means, dtype=torch.float64)
    if frame_means.ndim == 4:
        frame_shape = frame_shape or tuple(frame_means.shape[1:])
        frame_means = frame_means.reshape(frame_means.shape[0], -1)
    if frame_means.ndim != 2 or frame_means.numel() == 0:
        raise ValueError(f"frame_means must be a non-empty K x D or K x C x H x W array, got {tuple(frame_means.shape)}")
    num_components = frame_means.shape[0]
    scales = torch.as_tensor(scales, dtype=torch.float64)
    correlations = torch.as_tensor(correlations, dtype=torch.float64)
    for value, name in ((scales, "scales"), (correlations, "correlations")):
        if value.shape != (num_components,):
            raise ValueError(
                f"{name} must have shape ({num_components},), one per component of frame_means, got {tuple(value.shape)}"
            )
    if not bool((scales > 0).all()):
        raise ValueError(f"scales must be positive, got {scales.tolist()}")
    if not bool((correlations.abs() < 1).all()):
        raise ValueError(f"correlations must lie in (-1, 1), got {correlations.tolist()}")
    if not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive integer, got {num_frames!r}")
    means = frame_means[:, None].expand(num_components, num_frames, frame_means.shape[1])
    return VideoGaussianMixture(
        means, ar1_temporal_covariances(scales, correlations, num_frames), weights, frame_shape
    )


class VideoGaussianMixtureDenoiser(PairedScheduleMixin, ModelMixin, ConfigMixin):
    r"""The exact per-frame-timestep denoiser of the AR(1) clip mixture (``autoregressive_video_mixture``), usable
    where a pipeline calls a video backbone.

    Call: ``model(sample, timestep).sample`` (or ``return_dict=False`` for a tuple), with ``sample`` of shape
    ``(B, C, F, H, W)`` (Wan's layout) and ``timestep`` a scalar, ``(B,)`` or one per frame ``(B, F)`` on the paired
    scheduler's scale. With ``(alpha_f, sigma_f)`` from ``scheduler_config`` (``diffusion_math.alpha_sigma_function``:
    VP for DDPM-family configs, ``(1 - t/N, t/N)`` for flow matching) it returns, per frame,

        x0_hat  = E[x0 | x_t]                         (``VideoGaussianMixture.posterior_mean``)
        eps_hat = (x_t - alpha_f x0_hat) / sigma_f    (0 on clean frames, sigma_f = 0)
        output  = eps_hat | x0_hat | alpha_f eps_hat - sigma_f x0_hat | eps_hat - x0_hat
                  (epsilon | sample | v_prediction | flow_prediction)

    computed in float64 and cast to ``sample``'s dtype. An image-to-video or interpolation pipeline passes its given
    frames at a timestep with ``sigma = 0`` (``t = 0`` on a flow schedule; on a VP schedule ``t = 0`` still has
    ``sigma = sqrt(1 - alphas_cumprod[0]) > 0``) and gets them back unchanged as ``x0_hat``.

    Args:
        frame_means: ``K x D`` or ``K x C x H x W`` frame means ``m_k``.
        scales: ``K`` per-frame standard deviations ``s_k``.
        correlations: ``K`` lag-1 correlations ``rho_k`` in ``(-1, 1)``.
        num_frames: ``F``, the clip length the model takes.
        weights: ``K`` mixture weights (uniform if omitted).
        frame_shape: ``(C, H, W)``; taken from 4-D ``frame_means``, else ``(D, 1, 1)``.
        scheduler_config: the paired scheduler's ``config``; ``DDPMScheduler``'s linear VP schedule when omitted.
        prediction_type: defaults to the scheduler config's, else ``"epsilon"`` (VP) or ``"flow_prediction"`` (flow).
    """

    @register_to_config
    def __init__(
        self,
        frame_means: Sequence,
        scales: Sequence[float],
        correlations: Sequence[float],
        num_frames: int,
        weights: Sequence[float] | None = None,
        frame_shape: Sequence[int] | None = None,
        scheduler_config: Mapping[str, Any] | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        self.law = autoregressive_video_mixture(frame_means, scales, correlations, num_frames, weights, frame_shape)
        self.pair_with_scheduler(scheduler_config, prediction_type)
        self.register_to_config(frame_shape=list(self.law.frame_shape))
        self.sample_shape = self.law.video_shape  # (C, F, H, W): what a pipeline allocates for one clip

    def forward(
        self, sample: torch.Tensor, timestep: torch.Tensor | float | int, return_dict: bool = True
    ) -> GaussianMixtureDenoiserOutput | tuple[torch.Tensor]:
        if sample.ndim != 5 or tuple(sample.shape[1:]) != self.sample_shape:
            raise ValueError(
                f"sample must have shape (B, C, F, H, W) = (B, {', '.join(map(str, self.sample_shape))}), "
                f"got {tuple(sample.shape)}"
            )
        timestep = per_frame_values(timestep, sample.shape[0], self.law.num_frames, "timestep", sample.device)
        alpha, sigma = self.alpha_sigma(timestep)
        x0 = self.law_on(sample.device).posterior_mean(sample, alpha, sigma)
        alpha, sigma = (value[:, None, :, None, None] for value in (alpha, sigma))
        prediction = exact_model_output(sample.to(torch.float64), x0, alpha, sigma, self.config.prediction_type)
        prediction = prediction.to(sample.dtype)
        return GaussianMixtureDenoiserOutput(sample=prediction) if return_dict else (prediction,)


# -- JVID's oracle experiment (arXiv 2409.14149): an exact image model and a coarse video model ----------------------

# Clips of 1 x 2 x 2 pixels from two mirrored AR(1) components (every pixel 1 away from 0 in either, so both share
# one per-pixel variance): a frame sits near one of two modes and a clip stays in its mode.
JVID_ORACLE_LAW = dict(frame_means=[[1.0, -1.0, 1.0, -1.0], [-1.0, 1.0, -1.0, 1.0]], scales=[0.3, 0.3],
                       correlations=[0.9, 0.9], frame_shape=(1, 2, 2))


def frame_marginal_denoiser(
    frame_means: Sequence,
    scales: Sequence[float],
    correlations: Sequence[float],
    weights: Sequence[float] | None = None,
    frame_shape: Sequence[int] | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
) -> VideoGaussianMixtureDenoiser:
    """The exact image model of the AR(1) clip mixture: the denoiser of its frame marginal ``sum_k w_k N(m_k,
    s_k^2 I)`` (a 1-frame clip; ``correlations`` only complete the law's description). Applied to every frame on its
    own it is the exact denoiser of clips with the true frame marginal and independent frames."""
    return VideoGaussianMixtureDenoiser(frame_means, scales, correlations, 1, weights, frame_shape, scheduler_config,
                                        prediction_type)


def moment_matched_video_denoiser(
    frame_means: Sequence,
    scales: Sequence[float],
    correlations: Sequence[float],
    num_frames: int,
    weights: Sequence[float] | None = None,
    frame_shape: Sequence[int] | None = None,
    scheduler_config: Mapping[str, Any] | None = None,
    prediction_type: str | None = None,
) -> VideoGaussianMixtureDenoiser:
    """A coarse video model of the AR(1) clip mixture: the exact denoiser of the one-component AR(1) law with the
    mixture's per-pixel mean ``mu = sum_k w_k m_k``, per-frame variance and lag-1 correlation,

        s'^2 = mean_d [sum_k w_k (s_k^2 + m_kd^2) - mu_d^2],   rho' = mean_d [sum_k w_k (s_k^2 rho_k + m_kd^2)
               - mu_d^2] / s'^2

    (exact per pixel when every pixel has the same between-component spread, as in ``JVID_ORACLE_LAW``). It knows the
    temporal correlation (to second order) but not the marginal: its frames are Gaussian, not a mixture, and its
    pixels independent."""
    law = autoregressive_video_mixture(frame_means, scales, correlations, 2, weights, frame_shape)
    variance = law.frame_covariance(0).mean()
    lag_one = law.frame_covariance(1).mean()
    mean = law.weights @ law.means[:, 0]  # D
    return VideoGaussianMixtureDenoiser([mean.tolist()], [float(variance.sqrt())], [float(lag_one / variance)],
                                        num_frames, None, law.frame_shape, scheduler_config, prediction_type)


def frame_samples(videos: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W) -> (B F, C H W)``: every frame of every clip as one sample of the frame marginal."""
    frames = frames_from_video(videos)
    return frames.reshape(-1, frames.shape[-1])


def consecutive_frame_pairs(videos: torch.Tensor) -> torch.Tensor:
    """``(B, C, F, H, W) -> (B (F - 1), 2 C H W)``: every pair of neighbouring frames as one vector."""
    frames = frames_from_video(videos)
    return torch.cat([frames[:, :-1], frames[:, 1:]], dim=-1).reshape(-1, 2 * frames.shape[-1])


def lag_one_correlation(videos: torch.Tensor) -> float:
    """The empirical correlation of a pixel with itself one frame later, pooled over clips, frames and pixels
    (each pixel centred and scaled by its mean and spread over clips and frames; for a stationary law)."""
    frames = frames_from_video(videos.to(torch.float64))  # B, F, D
    centred = frames - frames.mean(dim=(0, 1))
    variance = centred.pow(2).mean(dim=(0, 1))
    return float(((centred[:, 1:] * centred[:, :-1]).mean(dim=(0, 1)) / variance).mean())


def single_mode_clip_share(videos: torch.Tensor, law: VideoGaussianMixture) -> float:
    """The share of clips whose frames all have the same most probable component of the law's frame marginal (1 up
    to misassignment for the AR(1) mixture, whose clips never change component; ``K^(1 - F)`` for independent frames
    of ``K`` equally likely components)."""
    frame_law = VideoGaussianMixture(law.means[:, :1], law.temporal_covariances[:, :1, :1], law.weights,
                                     law.frame_shape)
    batch, num_frames = videos.shape[0], videos.shape[2]
    frames = video_from_frames(frame_samples(videos)[:, None], law.frame_shape)
    components = frame_law.responsibilities(frames).argmax(dim=1).reshape(batch, num_frames)
    return float((components == components[:, :1]).all(dim=1).double().mean())


def with_mirror_images(videos: torch.Tensor) -> torch.Tensor:
    """``videos`` followed by ``-videos``. For a law symmetric about 0 (``JVID_ORACLE_LAW``) sampled by symmetric
    models, the mirror images are as likely as the clips, and scoring both gives the two modes exactly equal shares:
    the binomial noise of how many clips fell in each far-apart mode, which otherwise dominates a sliced W2 of a few
    hundred clips, is gone, and what remains is the shape of the frames and of their sequence."""
    return torch.cat([videos, -videos])
