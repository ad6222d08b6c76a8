r"""An exact multi-view oracle: a law of view sets over a finite set of shapes and its exact joint denoiser, for
checking that a multi-view sampler keeps each object's views together (MVDream, "MVDream: Multi-view Diffusion for
3D Generation", arXiv 2308.16512, trains a UNet to denoise the ``N`` views of one object jointly).

The law. ``K`` shapes, each seen from the same ``N`` cameras: ``R_k[n]`` is shape ``k``'s render from camera ``n``
(``D = C H W`` values). An object's view set is the ``N x D`` matrix ``X`` with

    X ~ sum_k w_k N(R_k, s^2 I_{N D})

i.e. pick one shape, then every view is that shape's render plus independent pixel noise of variance ``s^2``. This
is a Gaussian mixture in ``N D`` dimensions, so its exact denoiser is ``GaussianMixture.posterior_mean``:

    r_k(X_t)       = softmax_k( log w_k - |X_t - alpha R_k|^2 / (2 (alpha^2 s^2 + sigma^2)) )
    E[X0 | X_t]    = sum_k r_k(X_t) (R_k + alpha s^2 / (alpha^2 s^2 + sigma^2) (X_t - alpha R_k))

with one responsibility per object from all of its views: the views cannot disagree on the shape.

Independent per-view sampling (a 2D model run once per view, ``joint=False``) denoises view ``n`` alone with its
marginal law ``sum_k w_k N(R_k[n], s^2 I_D)``: each view picks its own shape, and a set of ``N`` views comes from one
shape with probability ``sum_k w_k^N`` only (1/8 for two equally likely shapes and four views).

``MultiViewMixtureDenoiser`` is that law as a diffusers model with a UNet's call: ``model(sample, timestep,
encoder_hidden_states=None, cameras=None)`` on ``(B N, C, H, W)`` batches, views of one object consecutive (the
layout of ``MultiViewAttnProcessor``); text and cameras are accepted and ignored (view ``n`` is the render from the
law's camera ``n``). ``nearest_shapes`` and ``one_shape_fraction`` score sampled view sets.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from diffusers import ModelMixin
from diffusers.configuration_utils import ConfigMixin, register_to_config

from .gaussian_mixture import GaussianMixture, mixture_weights
from .oracle import GaussianMixtureDenoiserOutput, PairedScheduleMixin, exact_model_output


def check_view_renders(view_renders: Any) -> torch.Tensor:
    """``view_renders`` as a float64 ``(K, N, C, H, W)`` tensor; a ``ValueError`` for another shape."""
    renders = torch.as_tensor(view_renders, dtype=torch.float64)
    if renders.ndim != 5 or 0 in renders.shape:
        raise ValueError("view_renders must be the renders of K shapes from N cameras, (K, N, C, H, W); got shape "
                         f"{tuple(renders.shape)}")
    return renders


class MultiViewMixtureDenoiser(PairedScheduleMixin, ModelMixin, ConfigMixin):
    r"""The exact denoiser of the view-set law ``sum_k w_k N(R_k, s^2 I)`` (module docstring), jointly over each
    object's ``N`` views (``joint=True``) or view by view from each view's marginal (``joint=False``: independent
    per-view sampling). Output, per object:

        x0_hat  = E[X0 | X_t]                   (``GaussianMixture.posterior_mean``, float64)
        output  = eps_hat | x0_hat | v | flow   (``exact_model_output``, for the config's ``prediction_type``)

    Args:
        view_renders: ``R``, ``(K, N, C, H, W)``: shape ``k`` seen from camera ``n``, in the model's value range.
        variance: ``s^2``, the pixel noise around each render (> 0).
        weights: ``K`` shape probabilities (uniform if omitted).
        joint: denoise the ``N`` views of an object together (the multi-view model) or each view alone.
        scheduler_config: the paired scheduler's ``config``; ``DDPMScheduler``'s linear VP schedule when omitted.
        prediction_type: defaults to the scheduler config's, else ``"epsilon"`` (VP) or ``"flow_prediction"``.
    """

    @register_to_config
    def __init__(
        self,
        view_renders: Sequence,
        variance: float,
        weights: Sequence[float] | None = None,
        joint: bool = True,
        scheduler_config: Mapping[str, Any] | None = None,
        prediction_type: str | None = None,
    ):
        super().__init__()
        renders = check_view_renders(view_renders)
        if not variance > 0:
            raise ValueError(f"variance must be positive, got {variance!r}")
        num_shapes, num_views, channels, height, width = renders.shape
        weights = mixture_weights(weights, num_shapes)
        self.view_shape = (channels, height, width)
        self.renders = renders
        # Joint: one mixture over whole view sets. Per view: view n's marginal, a mixture over the K renders R_k[n].
        self.law = GaussianMixture(renders.reshape(num_shapes, -1), torch.full((num_shapes,), float(variance)),
                                   weights)
        self.view_laws = [GaussianMixture(renders[:, view].reshape(num_shapes, -1),
                                          torch.full((num_shapes,), float(variance)), weights)
                          for view in range(num_views)]
        self.pair_with_scheduler(scheduler_config, prediction_type)
        # What a UNet's config tells a pipeline: the views per object and the shape of one image.
        self.register_to_config(num_views=num_views, in_channels=channels, sample_size=[height, width])

    def _view_law_on(self, view: int, device: torch.device) -> GaussianMixture:
        key = (view, device)
        if key not in self._law_on_device:
            self._law_on_device[key] = self.view_laws[view].to(device)
        return self._law_on_device[key]

    def forward(
        self,
        sample: torch.Tensor,
        timestep: torch.Tensor | float | int,
        encoder_hidden_states: torch.Tensor | None = None,
        cameras: torch.Tensor | None = None,
        return_dict: bool = True,
    ) -> GaussianMixtureDenoiserOutput | tuple[torch.Tensor]:
        num_views = self.config.num_views
        if sample.ndim != 4 or tuple(sample.shape[1:]) != self.view_shape:
            raise ValueError(f"sample must be views of shape (B*N, {', '.join(map(str, self.view_shape))}), got "
                             f"{tuple(sample.shape)}")
        rows = sample.shape[0]
        if rows % num_views:
            raise ValueError(f"this oracle models {num_views} views per object; the batch has {rows} images, not a "
                             f"multiple of {num_views}")
        timestep = torch.as_tensor(timestep, device=sample.device)
        timestep = timestep.expand(rows) if timestep.ndim == 0 else timestep.reshape(rows)
        alpha, sigma = self.alpha_sigma(timestep)
        x = sample.reshape(rows, -1).to(torch.float64)
        if self.config.joint:
            per_object = timestep.reshape(-1, num_views)
            if not bool((per_object == per_object[:, :1]).all()):
                raise ValueError("the joint oracle needs one timestep for all the views of an object")
            objects = rows // num_views
            x0 = self.law_on(sample.device).posterior_mean(x.reshape(objects, -1), alpha[::num_views],
                                                           sigma[::num_views]).reshape(rows, -1)
        else:
            x0 = torch.empty_like(x)
            for view in range(num_views):
                x0[view::num_views] = self._view_law_on(view, sample.device).posterior_mean(
                    x[view::num_views], alpha[view::num_views], sigma[view::num_views])
        prediction = exact_model_output(x, x0, alpha[:, None], sigma[:, None], self.config.prediction_type)
        prediction = prediction.reshape(sample.shape).to(sample.dtype)
        return GaussianMixtureDenoiserOutput(sample=prediction) if return_dict else (prediction,)


def nearest_shapes(views: torch.Tensor, view_renders: Any) -> torch.Tensor:
    """For sampled views ``(B N, C, H, W)`` (views of one object consecutive), the shape ``k`` whose render
    ``R_k[n]`` is nearest to each view in Euclidean distance: ``(B, N)`` indices."""
    renders = check_view_renders(view_renders).to(views.device)
    num_views = renders.shape[1]
    if views.ndim != 4 or tuple(views.shape[1:]) != tuple(renders.shape[2:]) or views.shape[0] % num_views:
        raise ValueError(f"views must be (B*{num_views}, {', '.join(map(str, renders.shape[2:]))}) for these renders, "
                         f"got {tuple(views.shape)}")
    per_object = views.to(torch.float64).reshape(-1, num_views, 1, renders[0, 0].numel())
    distances = (per_object - renders.reshape(1, *renders.shape[:2], -1).transpose(1, 2)).square().sum(-1)
    return distances.argmin(dim=-1)


def one_shape_fraction(shape_indices: torch.Tensor) -> float:
    """The fraction of view sets ``(B, N)`` (``nearest_shapes``) whose ``N`` views all show one shape."""
    return float((shape_indices == shape_indices[:, :1]).all(dim=1).double().mean())
