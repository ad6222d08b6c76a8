r"""Score distillation: optimise a 3D representation so that its renders look like samples of a 2D diffusion prior.

Methods (``x0 = encode(render(theta, c))`` a render from a random camera ``c``, ``(alpha_t, sigma_t)`` the prior's VP
schedule, ``eps_hat`` its guided noise prediction, ``y`` the prompt):

- **SDS**, Score Distillation Sampling ("DreamFusion: Text-to-3D using 2D Diffusion", arXiv 2209.14988)::

      t ~ U[t_min, t_max],   eps ~ N(0, I),   x_t = alpha_t x0 + sigma_t eps
      grad_theta = w(t) (eps_hat(x_t; y, t) - eps) dx0/dtheta,        w(t) = sigma_t^2

- **SDI**, Score Distillation via Inversion ("Score Distillation via Reparametrized DDIM", arXiv 2405.15891): SDS's
  fresh noise ``eps`` is replaced by the noise ``kappa`` that DDIM inversion of ``x0`` finds, so that each update
  follows one DDIM trajectory instead of a new random one::

      t = t_max - (t_max - t_min) i / (n - 1)                       (annealed, iteration i of n)
      x_{s_0} = x0,  x_{s_{j+1}} = alpha_{j+1} x0_hat_j + sqrt(sigma_{j+1}^2 - c_j^2) eps_hat_j + c_j z_j
          over 0 = s_0 < s_1 < ... < s_m = t,   eps_hat_j = eps_hat(x_{s_j}; y, s_j) at inversion_guidance_scale,
          x0_hat_0 = x0,   x0_hat_j = (x_{s_j} - sigma_j eps_hat_j) / alpha_j,
          c_j = inversion_eta * sigma_j sqrt(1 - (rho_j / rho_{j+1})^2),   rho = sigma / alpha
      kappa = (x_t - alpha_t x0) / sigma_t
      x0_target = (x_t - sigma_t eps_hat(x_t; y, t)) / alpha_t,    grad_theta = (x0 - x0_target) dx0/dtheta
                = (sigma_t / alpha_t) (eps_hat(x_t; y, t) - kappa) dx0/dtheta

  The authors' code (threestudio's ``stable-diffusion-sdi-guidance``) inverts on a 10-step grid, adds the fresh noise
  ``c_j z_j`` on top of the DDIM step (we keep the noise level at ``sigma_{j+1}`` with ``noise_preserving_step``) and
  evaluates the final prediction at ``t`` on a sample inverted to a random ``t + delta``; we invert to ``t`` exactly.
  Their defaults: inversion guidance -7.5 in their convention ``eps_c + s (eps_c - eps_u)``, i.e. ``-6.5`` in the
  standard ``eps_u + w (eps_c - eps_u)`` used here; ``inversion_eta = 0.3``; ``t`` annealed linearly from 0.98 to 0.02.

Both gradients enter through the surrogate loss ``0.5 ||x0 - stopgrad(x0 - g)||^2 / N`` (``g`` the per-image gradient
above), so any torch optimiser applies them. Camera-dependent prompts follow DreamFusion: ``"<prompt>, front view"``
for azimuths within 45 degrees of the front, ``"back view"`` within 45 degrees of the back, ``"side view"`` otherwise,
``"overhead view"`` above 60 degrees of elevation.

The prior is a small interface (``DistillationPrior``): ``TextToImagePrior`` wraps any diffusers VP text-to-image
pipeline with a VAE and a UNet (SD 1.x / 2.x, SDXL), ``MultiViewPrior`` a ``MultiViewDiffusionPipeline`` (MVDream:
one timestep and one random orbit of cameras per object), and the exact oracle
``diffusers_ext.testing.view_oracle.ViewConditionedGaussianPrior`` implements it directly.
"""

from __future__ import annotations

import itertools
import os
import shutil
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch
import torch.nn.functional as F
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from ...diffusion_math import (
    noise_path_from_scheduler_config,
    noise_preserving_step,
    vp_alpha_sigma,
    vp_alphas_cumprod,
    x0_and_eps_from_prediction,
)
from .rendering import (
    VoxelGrid,
    camera_azimuth_elevation,
    check_cameras,
    grid_points,
    random_cameras,
    random_orbit_cameras,
    render,
)

METHODS = ("sds", "sdi")
DEFAULT_GUIDANCE_SCALE = {"sds": 100.0, "sdi": 7.5}  # DreamFusion's and SDI's text-to-3D settings
SDI_INVERSION_GUIDANCE_SCALE = -6.5  # the authors' -7.5 in their eps_c + s (eps_c - eps_u) convention


@runtime_checkable
class DistillationPrior(Protocol):
    """What score distillation needs from a diffusion model.

    ``alphas_cumprod``: its VP schedule ``(T,)``. ``encode(images)``: renders ``(N, 3, H, W)`` in [0, 1] to the
    model's sample space, differentiably (a VAE encoder, or ``2 x - 1`` for a pixel model). ``__call__(samples,
    timesteps, cameras, prompts, guidance_scale)``: the guided noise prediction ``eps_hat`` for noisy samples ``(N,
    ...)`` at integer training timesteps ``(N,)`` seen from ``cameras`` ``(N, 4, 4)``, with one prompt per sample
    (a multi-view prior reads the cameras; a 2D prior may ignore them).
    """

    alphas_cumprod: torch.Tensor

    def encode(self, images: torch.Tensor) -> torch.Tensor: ...

    def __call__(self, samples: torch.Tensor, timesteps: torch.Tensor, cameras: torch.Tensor,
                 prompts: Sequence[str], guidance_scale: float) -> torch.Tensor: ...


def check_vp_pipeline(pipeline) -> None:
    """Raises a ``ValueError`` unless ``pipeline`` is a VP (DDPM-family) text-to-image pipeline with a VAE, a UNet and a
    text encoder; score distillation's gradient is written for ``x_t = alpha_t x0 + sigma_t eps`` with a noise
    prediction, and flow-matching pipelines (SD3, Flux) are rejected rather than silently mis-weighted."""
    scheduler = getattr(pipeline, "scheduler", None)
    if scheduler is None:
        raise ValueError(f"pipeline must be a diffusers pipeline with a scheduler, got {type(pipeline).__name__}")
    try:
        path = noise_path_from_scheduler_config(scheduler.config)
    except ValueError as error:
        raise ValueError(f"score distillation needs a VP (DDPM-family) pipeline: {error}") from error
    if path != "vp":
        raise ValueError(f"score distillation needs a VP (DDPM-family) pipeline such as Stable Diffusion 1.x / 2.x or "
                         f"SDXL; {type(pipeline).__name__} uses a flow-matching scheduler "
                         f"({type(scheduler).__name__})")
    missing = [name for name in ("vae", "unet", "text_encoder", "tokenizer") if getattr(pipeline, name, None) is None]
    if missing:
        raise ValueError(f"score distillation needs a text-to-image pipeline with a VAE, a UNet and a text encoder; "
                         f"{type(pipeline).__name__} has no {', '.join(missing)}")


class TextToImagePrior:
    """``DistillationPrior`` of a diffusers VP text-to-image pipeline (SD 1.x / 2.x, SDXL): renders resized to
    ``image_size`` (bilinear, as threestudio feeds 64-pixel renders to Stable Diffusion at 512; unchanged when None),
    encoded by the VAE (posterior mean, times ``scaling_factor``), prompts encoded once each, classifier-free guidance
    ``eps_u + w (eps_c - eps_u)`` against the empty prompt, any ``prediction_type`` converted to ``eps``. The camera
    argument is ignored: a 2D prior sees cameras only through the view-dependent prompts."""

    def __init__(self, pipeline, image_size: int | None = None):
        check_vp_pipeline(pipeline)
        self.pipeline = pipeline
        self.image_size = image_size
        self.alphas_cumprod = vp_alphas_cumprod(pipeline.scheduler.config)
        self.prediction_type = pipeline.scheduler.config.get("prediction_type", "epsilon")
        self.is_sdxl = getattr(pipeline, "text_encoder_2", None) is not None
        self._embeddings: dict[str, tuple[torch.Tensor, ...]] = {}

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        if self.image_size is not None:
            images = F.interpolate(images, size=(self.image_size, self.image_size), mode="bilinear",
                                   align_corners=False)
        latents = vae.encode((2 * images - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).to(images.device)

    @torch.no_grad()
    def _prompt_embeddings(self, prompt: str) -> tuple[torch.Tensor, ...]:
        """``(uncond, cond)`` sequence embeddings, and for SDXL ``(uncond, cond)`` pooled ones, for one prompt."""
        if prompt not in self._embeddings:
            device = self.pipeline.unet.device
            if self.is_sdxl:
                cond, uncond, pooled, uncond_pooled = self.pipeline.encode_prompt(
                    prompt, device=device, num_images_per_prompt=1, do_classifier_free_guidance=True,
                    negative_prompt="")
                self._embeddings[prompt] = (uncond, cond, uncond_pooled, pooled)
            else:
                cond, uncond = self.pipeline.encode_prompt(prompt, device, 1, True, negative_prompt="")
                self._embeddings[prompt] = (uncond, cond)
        return self._embeddings[prompt]

    def _sdxl_conditioning(self, pooled: torch.Tensor, height: int, width: int) -> dict[str, torch.Tensor]:
        scale = self.pipeline.vae_scale_factor
        size = (height * scale, width * scale)
        projection_dim = self.pipeline.text_encoder_2.config.projection_dim
        time_ids = self.pipeline._get_add_time_ids(size, (0, 0), size, dtype=pooled.dtype,
                                                   text_encoder_projection_dim=projection_dim)
        return {"text_embeds": pooled, "time_ids": time_ids.to(pooled.device).expand(pooled.shape[0], -1)}

    @torch.no_grad()
    def __call__(self, samples, timesteps, cameras, prompts, guidance_scale):
        embeddings = [self._prompt_embeddings(prompt) for prompt in prompts]
        uncond = torch.cat([e[0] for e in embeddings])
        cond = torch.cat([e[1] for e in embeddings])
        unet = self.pipeline.unet
        # The representation and its renders may live elsewhere (the CPU) than the pipeline (a GPU).
        doubled = torch.cat([samples, samples]).to(unet.device)
        kwargs = {}
        if self.is_sdxl:
            pooled = torch.cat([torch.cat([e[2] for e in embeddings]), torch.cat([e[3] for e in embeddings])])
            kwargs["added_cond_kwargs"] = self._sdxl_conditioning(pooled, *samples.shape[-2:])
        output = unet(doubled.to(unet.dtype), torch.cat([timesteps, timesteps]).to(unet.device),
                      encoder_hidden_states=torch.cat([uncond, cond]), **kwargs).sample.to(samples.dtype)
        alpha, sigma = (v.to(unet.device, samples.dtype)[:, None, None, None]
                        for v in vp_alpha_sigma(timesteps.cpu(), self.alphas_cumprod))
        _, eps = x0_and_eps_from_prediction(output, doubled, alpha.repeat(2, 1, 1, 1), sigma.repeat(2, 1, 1, 1),
                                            self.prediction_type)
        eps_uncond, eps_cond = eps.chunk(2)
        return (eps_uncond + guidance_scale * (eps_cond - eps_uncond)).to(samples.device)


class MultiViewPrior:
    """``DistillationPrior`` of a ``MultiViewDiffusionPipeline`` (MVDream, "MVDream: Multi-view Diffusion for 3D
    Generation", arXiv 2308.16512, which distils its 3D objects by SDS with this prior): the samples are objects of
    ``pipeline.num_views`` consecutive views denoised jointly, each view conditioned on its camera, one prompt per
    view, classifier-free guidance against the empty prompt (zero embeddings without a text encoder). Renders are
    encoded by the pipeline's VAE, or mapped to ``[-1, 1]`` for a pixel-space denoiser."""

    def __init__(self, pipeline):
        scheduler_config = pipeline.scheduler.config
        if noise_path_from_scheduler_config(scheduler_config) != "vp":
            raise ValueError(f"score distillation needs a VP scheduler; the multi-view pipeline has "
                             f"{type(pipeline.scheduler).__name__}")
        self.pipeline = pipeline
        self.num_views = pipeline.num_views
        self.alphas_cumprod = vp_alphas_cumprod(scheduler_config)
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        vae = self.pipeline.vae
        if vae is None:
            return 2 * images - 1
        latents = vae.encode((2 * images - 1).to(vae.device, vae.dtype)).latent_dist.mean
        return (latents * vae.config.scaling_factor).to(images.device)

    @torch.no_grad()
    def __call__(self, samples, timesteps, cameras, prompts, guidance_scale):
        if samples.shape[0] % self.num_views:
            raise ValueError(f"a multi-view prior takes whole objects of {self.num_views} views; got "
                             f"{samples.shape[0]} samples")
        pipeline, count = self.pipeline, samples.shape[0]
        unet = pipeline.unet
        device = unet.device  # the renders may live elsewhere (the CPU)
        cond = pipeline.encode_prompt(list(prompts) if any(prompts) else None, count, device, unet.dtype)
        uncond = (pipeline.encode_prompt([""] * count, count, device, unet.dtype)
                  if pipeline.text_encoder is not None else torch.zeros_like(cond))
        doubled = torch.cat([samples, samples]).to(device)
        output = unet(doubled.to(unet.dtype), torch.cat([timesteps, timesteps]).to(device),
                      encoder_hidden_states=torch.cat([uncond, cond]),
                      cameras=torch.cat([cameras, cameras]).to(device, torch.float32), return_dict=False)[0]
        alpha, sigma = (v.to(device, samples.dtype)[:, None, None, None].repeat(2, 1, 1, 1)
                        for v in vp_alpha_sigma(timesteps.cpu(), self.alphas_cumprod))
        _, eps = x0_and_eps_from_prediction(output.to(samples.dtype), doubled, alpha, sigma, self.prediction_type)
        eps_uncond, eps_cond = eps.chunk(2)
        return (eps_uncond + guidance_scale * (eps_cond - eps_uncond)).to(samples.device)


def view_dependent_prompt(prompt: str, azimuth: float, elevation: float) -> str:
    """DreamFusion's view-dependent prompt for a camera at ``azimuth`` / ``elevation`` degrees (0 = the front)."""
    if elevation > 60:
        return f"{prompt}, overhead view"
    if abs(azimuth) <= 45:
        return f"{prompt}, front view"
    if abs(azimuth) >= 135:
        return f"{prompt}, back view"
    return f"{prompt}, side view"


def annealed_timestep(iteration: int, num_iterations: int, timestep_range: tuple[float, float],
                      num_train_timesteps: int) -> int:
    """SDI's schedule: the training timestep falls linearly from ``t_max`` to ``t_min`` (fractions of ``T``) over the
    run."""
    progress = iteration / max(num_iterations - 1, 1)
    t_min, t_max = timestep_range
    return round((t_max - (t_max - t_min) * progress) * (num_train_timesteps - 1))


def random_timesteps(num: int, timestep_range: tuple[float, float], num_train_timesteps: int,
                     generator: torch.Generator | None) -> torch.Tensor:
    """DreamFusion's schedule: integer timesteps drawn uniformly in ``[t_min T, t_max T]``, one per view."""
    low, high = (round(fraction * (num_train_timesteps - 1)) for fraction in timestep_range)
    return torch.randint(low, high + 1, (num,), generator=generator)


@dataclass
class ScoreDistillationOutput(BaseOutput):
    """``representation``: the optimised ``VoxelGrid``; ``losses``: the surrogate loss per iteration; ``mesh_path``
    and ``turntable_path``: the files written when an output folder was given."""

    representation: VoxelGrid
    losses: list[float] = field(default_factory=list)
    mesh_path: Path | None = None
    turntable_path: Path | None = None


class ScoreDistillation:
    """Text-to-3D by score distillation (SDS or SDI, see the module docstring) against a diffusion prior.

    Args:
        prior: a diffusers VP text-to-image pipeline (wrapped in ``TextToImagePrior``), or any ``DistillationPrior``
            (a multi-view prior, the exact oracle).
        method: ``"sds"`` or ``"sdi"``.
        guidance_scale: classifier-free guidance ``w``; by default the papers' 100 (SDS) and 7.5 (SDI). Priors with no
            unconditional model (the oracle) take 1.
        timestep_range: ``(t_min, t_max)`` as fractions of the training timesteps (both papers: 0.02, 0.98).
        timestep_schedule: ``"random"`` (DreamFusion: uniform per view) or ``"annealed"`` (SDI: linear decrease);
            by default the method's own.
        inversion_steps, inversion_guidance_scale, inversion_eta: SDI's DDIM inversion (the authors' 10 steps,
            guidance -6.5 in our convention, eta 0.3).
        view_dependent_prompts: append DreamFusion's view suffixes; by default on for a 2D text-to-image prior
            (a pipeline or ``TextToImagePrior``), off for other priors (a multi-view prior reads the cameras).
    """

    def __init__(self, prior, method: str = "sds", guidance_scale: float | None = None,
                 timestep_range: tuple[float, float] = (0.02, 0.98), timestep_schedule: str | None = None,
                 inversion_steps: int = 10, inversion_guidance_scale: float = SDI_INVERSION_GUIDANCE_SCALE,
                 inversion_eta: float = 0.3, view_dependent_prompts: bool | None = None):
        if method not in METHODS:
            raise ValueError(f"method must be one of {METHODS}, got {method!r}")
        timestep_schedule = timestep_schedule or ("annealed" if method == "sdi" else "random")
        if timestep_schedule not in ("random", "annealed"):
            raise ValueError(f"timestep_schedule must be 'random' or 'annealed', got {timestep_schedule!r}")
        if not 0 <= timestep_range[0] <= timestep_range[1] <= 1:
            raise ValueError(f"timestep_range must be (t_min, t_max) with 0 <= t_min <= t_max <= 1, got "
                             f"{timestep_range}")
        if not isinstance(inversion_steps, int) or inversion_steps < 1:
            raise ValueError(f"inversion_steps must be a positive int, got {inversion_steps!r}")
        if not 0 <= inversion_eta <= 1:
            raise ValueError(f"inversion_eta must lie in [0, 1], got {inversion_eta}")
        from .pipeline_multiview import MultiViewDiffusionPipeline

        if isinstance(prior, MultiViewDiffusionPipeline):
            prior = MultiViewPrior(prior)
        self.prior = prior if isinstance(prior, DistillationPrior) else TextToImagePrior(prior)
        self.method = method
        self.guidance_scale = DEFAULT_GUIDANCE_SCALE[method] if guidance_scale is None else guidance_scale
        self.timestep_range = timestep_range
        self.timestep_schedule = timestep_schedule
        self.inversion_steps = inversion_steps
        self.inversion_guidance_scale = inversion_guidance_scale
        self.inversion_eta = inversion_eta
        if view_dependent_prompts is None:
            view_dependent_prompts = isinstance(self.prior, TextToImagePrior)
        self.view_dependent_prompts = view_dependent_prompts
        # every timestep used is an integer training timestep: (alpha_t, sigma_t) read from one table
        self._alpha_table, self._sigma_table = vp_alpha_sigma(torch.arange(self.num_train_timesteps),
                                                              self.prior.alphas_cumprod)

    @property
    def num_train_timesteps(self) -> int:
        return self.prior.alphas_cumprod.numel()

    def prompts_for(self, prompt: str, cameras: torch.Tensor) -> list[str]:
        if not self.view_dependent_prompts:
            return [prompt] * cameras.shape[0]
        azimuths, elevations = camera_azimuth_elevation(cameras)
        return [view_dependent_prompt(prompt, a, e) for a, e in zip(azimuths.tolist(), elevations.tolist(), strict=True)]

    def _alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        shape = (-1,) + (1,) * (like.ndim - 1)
        alpha, sigma = self._alpha_table[timesteps.cpu()], self._sigma_table[timesteps.cpu()]
        return alpha.to(like).reshape(shape), sigma.to(like).reshape(shape)

    @torch.no_grad()
    def invert(self, x0: torch.Tensor, timesteps: torch.Tensor, cameras: torch.Tensor, prompts: Sequence[str],
               generator: torch.Generator | None = None) -> torch.Tensor:
        """SDI's DDIM inversion of clean samples ``x0`` to ``x_t`` at ``timesteps`` (one per sample), on
        ``inversion_steps`` equal steps from 0 (see the module docstring)."""
        x = x0
        fractions = torch.arange(self.inversion_steps + 1, dtype=torch.float64) / self.inversion_steps
        grid = (timesteps.double()[None, :] * fractions[:, None]).round().long()  # (steps + 1, N)
        for step, (current, upcoming) in enumerate(itertools.pairwise(grid)):
            alpha, sigma = self._alpha_sigma(current, x0)
            alpha_next, sigma_next = self._alpha_sigma(upcoming, x0)
            eps = self.prior(x, current, cameras, prompts, self.inversion_guidance_scale)
            # the first step starts from the clean render itself, as the authors' inversion does (alpha_0 = 1)
            x0_hat = x0 if step == 0 else (x - sigma * eps) / alpha
            ratio = (sigma * alpha_next) / (alpha * sigma_next)
            fresh_std = self.inversion_eta * sigma * (1 - ratio**2).clamp(min=0).sqrt()
            noise = torch.randn(x.shape, generator=generator).to(x) if self.inversion_eta > 0 else None
            x = noise_preserving_step(alpha_next * x0_hat, eps, sigma_next, fresh_std, noise)
        return x

    def gradient(self, x0: torch.Tensor, timesteps: torch.Tensor, cameras: torch.Tensor, prompts: Sequence[str],
                 generator: torch.Generator | None = None) -> torch.Tensor:
        """The method's gradient with respect to the encoded renders ``x0`` ``(N, ...)`` (no graph): SDS's
        ``sigma_t^2 (eps_hat - eps)`` or SDI's ``x0 - x0_target``."""
        x0 = x0.detach()
        alpha, sigma = self._alpha_sigma(timesteps, x0)
        if self.method == "sds":
            noise = torch.randn(x0.shape, generator=generator).to(x0)
            eps_hat = self.prior(alpha * x0 + sigma * noise, timesteps, cameras, prompts, self.guidance_scale)
            return sigma**2 * (eps_hat - noise)
        noisy = self.invert(x0, timesteps, cameras, prompts, generator)
        eps_hat = self.prior(noisy, timesteps, cameras, prompts, self.guidance_scale)
        return x0 - (noisy - sigma * eps_hat) / alpha

    @property
    def views_per_object(self) -> int:
        """Views that share one timestep: a multi-view prior's ``num_views`` (MVDream noises an object's views
        together), 1 for a 2D prior."""
        return getattr(self.prior, "num_views", 1)

    def timesteps_for(self, iteration: int, num_iterations: int, num: int,
                      generator: torch.Generator | None) -> torch.Tensor:
        if self.timestep_schedule == "annealed":
            t = annealed_timestep(iteration, num_iterations, self.timestep_range, self.num_train_timesteps)
            return torch.full((num,), t, dtype=torch.long)
        per_object = random_timesteps(num // self.views_per_object, self.timestep_range, self.num_train_timesteps,
                                      generator)
        return per_object.repeat_interleave(self.views_per_object)

    def __call__(self, prompt: str, representation: VoxelGrid | None = None, num_iterations: int = 500,
                 views_per_iteration: int = 4, height: int = 64, width: int = 64, learning_rate: float = 0.05,
                 resolution: int = 32, background: float = 1.0, camera_kwargs: dict | None = None,
                 generator: torch.Generator | None = None, output_dir: str | os.PathLike | None = None,
                 mesh_format: str = "glb", turntable_kwargs: dict | None = None,
                 checkpoint_every: int | None = None, show_progress: bool = True,
                 callback: Callable[[int, VoxelGrid, float], None] | None = None) -> ScoreDistillationOutput:
        """Optimise ``representation`` (by default ``density_blob(resolution)``) for ``num_iterations``
        Adam steps, each on ``views_per_iteration`` renders from ``random_cameras(**camera_kwargs)`` (for a
        multi-view prior: ``random_orbit_cameras``, one orbit per object). With
        ``output_dir`` the mesh (``mesh.<mesh_format>``) and ``turntable.gif`` (``export_turntable`` with
        ``turntable_kwargs``) are written there, and with
        ``checkpoint_every`` the representation every that many iterations (``checkpoint-<iteration>``, each
        written whole or not at all). ``callback(iteration, representation, loss)`` runs after each step."""
        if not isinstance(prompt, str):
            raise TypeError(f"prompt must be a str, got {type(prompt).__name__}")
        for name, value in (("num_iterations", num_iterations), ("views_per_iteration", views_per_iteration)):
            if not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if views_per_iteration % self.views_per_object:
            raise ValueError(f"views_per_iteration must be a multiple of the multi-view prior's "
                             f"{self.views_per_object} views per object, got {views_per_iteration}")
        if checkpoint_every is not None and (output_dir is None or checkpoint_every < 1):
            raise ValueError("checkpoint_every needs an output_dir and must be a positive int")
        from .mesh_export import MESH_FORMATS, import_trimesh

        if mesh_format not in MESH_FORMATS:
            raise ValueError(f"mesh_format must be one of {MESH_FORMATS}, got {mesh_format!r}")
        if output_dir is not None:
            import_trimesh()  # before the optimisation, not after it
        representation = representation if representation is not None else density_blob(resolution)
        optimizer = torch.optim.Adam(representation.parameters(), lr=learning_rate)
        output_dir = Path(output_dir) if output_dir is not None else None
        losses = []
        for iteration in tqdm(range(num_iterations), disable=not show_progress, desc=f"{self.method.upper()}"):
            cameras = (random_cameras(views_per_iteration, generator, **(camera_kwargs or {}))
                       if self.views_per_object == 1 else
                       random_orbit_cameras(views_per_iteration // self.views_per_object, self.views_per_object,
                                            generator, **(camera_kwargs or {})))
            images = render(representation, cameras, height, width, background=background, generator=generator)
            x0 = self.prior.encode(images)
            timesteps = self.timesteps_for(iteration, num_iterations, views_per_iteration, generator)
            gradient = self.gradient(x0, timesteps, cameras, self.prompts_for(prompt, cameras), generator)
            loss = 0.5 * ((x0 - (x0 - gradient).detach()) ** 2).sum() / views_per_iteration
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
            if callback is not None:
                callback(iteration, representation, losses[-1])
            if checkpoint_every is not None and (iteration + 1) % checkpoint_every == 0:
                save_checkpoint(representation, output_dir / f"checkpoint-{iteration + 1:06d}")
        output = ScoreDistillationOutput(representation=representation, losses=losses)
        if output_dir is not None:
            from .mesh_export import export_mesh, export_turntable

            # The grid first, so that a surface-less result (an empty mesh raises) still leaves the optimised grid;
            # the mesh before the turntable, so that it does not leave a turntable of nothing.
            save_checkpoint(representation, output_dir / "representation")
            output.mesh_path = export_mesh(representation, output_dir / f"mesh.{mesh_format}")
            turntable = {"background": background} | (turntable_kwargs or {})
            output.turntable_path = export_turntable(representation, output_dir / "turntable.gif", **turntable)
        return output


def density_blob(resolution: int = 32, bound: float = 1.0, peak_density: float = 20.0,
                 radius: float = 0.5) -> VoxelGrid:
    """DreamFusion's starting point: a grey ``VoxelGrid`` with a density bump at the centre, ``peak_density (1 -
    |x| / radius)`` inside ``radius`` (DreamFusion adds ``5 (1 - |x| / 0.2)`` to its NeRF's pre-activation density),
    over ``VoxelGrid``'s initial density elsewhere, so that the first renders have an object to shade."""
    distance = grid_points(resolution, bound).norm(dim=-1)
    density = peak_density * (1 - distance / radius).clamp(min=0) + VoxelGrid().config.initial_density
    return VoxelGrid.from_fields(density, torch.full((3, resolution, resolution, resolution), 0.5), bound)


def save_checkpoint(representation: VoxelGrid, path: Path) -> Path:
    """``representation.save_pretrained(path)`` written to a temporary folder beside ``path`` and renamed into place,
    so that an interrupted save leaves no half-written checkpoint."""
    from .mesh_export import current_umask

    path.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{path.name}.", dir=path.parent))
    try:
        representation.save_pretrained(staging)
        os.chmod(staging, 0o777 & ~current_umask())  # mkdtemp makes the folder private; give it a new folder's mode
        if path.exists():
            shutil.rmtree(path)
        os.replace(staging, path)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    return path


def check_prior_cameras(cameras: torch.Tensor, num_samples: int) -> torch.Tensor:
    """``cameras`` checked to be ``(N, 4, 4)`` with one camera per sample."""
    cameras = check_cameras(cameras)
    if cameras.shape[0] != num_samples:
        raise ValueError(f"cameras must hold one camera per sample ({num_samples}), got {cameras.shape[0]}")
    return cameras


def distill_pretrained(prompt: str, pipeline_path: str | os.PathLike, output_dir: str | os.PathLike,
                       method: str = "sds", guidance_scale: float | None = None, image_size: int | None = None,
                       seed: int = 0, **call_kwargs) -> ScoreDistillationOutput:
    """``diffusers-ext 3d distill``: loads the text-to-image pipeline saved at ``pipeline_path``, distils ``prompt``
    with ``method`` and writes the mesh and turntable (and checkpoints) to ``output_dir``."""
    from diffusers import DiffusionPipeline

    pipeline = DiffusionPipeline.from_pretrained(pipeline_path)
    pipeline.to("cuda" if torch.cuda.is_available() else "cpu")  # the prior's calls are the cost; the grid stays put
    pipeline.set_progress_bar_config(disable=True)
    distillation = ScoreDistillation(TextToImagePrior(pipeline, image_size), method=method,
                                     guidance_scale=guidance_scale)
    return distillation(prompt, output_dir=output_dir, generator=torch.Generator().manual_seed(seed), **call_kwargs)
