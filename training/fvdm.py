r"""FVDM training: a video denoiser conditioned on one timestep per frame, as a loss for the shared ``Trainer``.

Paper: *Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach* (Yaofang Liu, Yumeng Ren,
Xiaodong Cun, Aitor Artola, Yang Liu, Tieyong Zeng, Raymond H. Chan, Jean-Michel Morel; arXiv 2410.03160).

FVDM gives frame ``i`` of a clip its own timestep ``tau^i`` (the vectorized timestep ``tau = (tau^1, ..., tau^F)``)
and noises each frame with the scheduler's own forward process at its own level. With clean latents ``X0`` of shape
``(B, C, F, H, W)``, one loss evaluation is

    PTSS (probabilistic timestep sampling):  b ~ Bernoulli(p), once per batch
        b = 1:  u^i ~ q  independently for every frame i of every clip     (vectorized timesteps)
        b = 0:  u ~ q  once per clip,  u^i = u for all i                    (a conventional synchronized timestep)
    tau^i  = floor(u^i N)                 on a VP (DDPM-family) schedule, integer training timesteps
           = flow_shift(u^i, shift) N     on a flow-matching schedule (the config's static ``shift``)
    (alpha_i, sigma_i) = the scheduler config's noise path at tau^i       (``diffusion_math.alpha_sigma_function``)
    x^i_tau = alpha_i x^i_0 + sigma_i eps^i,   eps ~ N(0, I)
    target^i = eps^i | x^i_0 | alpha_i eps^i - sigma_i x^i_0 | eps^i - x^i_0
               (the scheduler's prediction type: epsilon | sample | v_prediction | flow_prediction)
    loss = mean || model(X_tau, tau) - target ||^2

``q`` is the per-frame law of ``u`` in ``[0, 1)``: uniform (the authors' ``torch.randint(0, N)``) or logit-normal
(``sigmoid(N(logit_mean, logit_std^2))``, SD3's, through diffusers' ``compute_density_for_timestep_sampling``).
``p`` is the probability of vectorized (per-frame) timesteps, 0.2 by default, as in the authors' training script
(github.com/Yaofang-Liu/FVDM, ``train_video.py``): one ``torch.rand(1) < p`` draw per batch, per-frame timesteps
when it holds and one timestep per clip otherwise, with ``p = 0.2`` (its comments list the other values tried: 0,
0.1, 0.3, 0.5, 0.6, 0.8, 1). Note the direction: ``p`` is the share of batches with per-frame timesteps, not of
batches with a shared one.

The backbone is called through ``diffusers_ext.pipelines.video.backbones.per_frame_prediction`` (Wan, SkyReels-V2,
LTX-Video, or the exact test oracle). Full fine-tuning or a LoRA adapter comes from ``TrainingConfig.lora_rank``.
``BouncingShapes`` is a synthetic clip set (shapes bouncing off the walls) that the toy run trains on.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import torch
from torch.utils.data import Dataset

from ..diffusion_math import (
    alpha_sigma_function,
    default_prediction_type,
    flow_shift,
    noise_path_from_scheduler_config,
    prediction_from_x0_and_eps,
)
from ..pipelines.video.backbones import check_per_frame_backbone, per_frame_prediction

# The authors' p (train_video.py: per-frame timesteps when torch.rand(1) < p, p = 0.2).
PAPER_VECTORIZED_PROBABILITY = 0.2
TIMESTEP_DISTRIBUTIONS = ("uniform", "logit_normal")


def ptss_unit_times(
    batch_size: int,
    num_frames: int,
    vectorized_probability: float,
    generator: torch.Generator,
    distribution: str = "uniform",
    logit_mean: float = 0.0,
    logit_std: float = 1.0,
) -> torch.Tensor:
    """FVDM's probabilistic timestep sampling on the unit interval, ``(B, F)`` values ``u^i`` in ``[0, 1)``: with
    probability ``vectorized_probability`` (``p``, once for the whole batch) every frame of every clip draws its own
    ``u^i ~ q``, otherwise each clip draws one ``u ~ q`` for all its frames (arXiv 2410.03160; module docstring).
    ``q`` is ``distribution``: ``"uniform"`` or ``"logit_normal"`` with ``logit_mean``, ``logit_std``."""
    from diffusers.training_utils import compute_density_for_timestep_sampling

    vectorized = bool(torch.rand((), generator=generator) < vectorized_probability)
    draws = batch_size * num_frames if vectorized else batch_size
    unit_times = compute_density_for_timestep_sampling(
        "logit_normal" if distribution == "logit_normal" else "none", draws, logit_mean=logit_mean,
        logit_std=logit_std, generator=generator)
    if vectorized:
        return unit_times.reshape(batch_size, num_frames)
    return unit_times[:, None].expand(batch_size, num_frames)


class FVDMObjective:
    """The FVDM loss ``E || model(X_tau, tau) - target ||^2`` with PTSS per-frame timesteps ``tau`` and each frame
    noised by the scheduler's forward process at its own ``tau^i`` (arXiv 2410.03160; equations in the module
    docstring). Batches are clean latents ``(B, C, F, H, W)``, or ``{"latents": ..., "prompt_embeds": ...}``.

    Args:
        scheduler: the training scheduler (its ``config`` is read): a DDPM-family config (``beta_schedule``, ...) or a
            flow-matching one (``FlowMatchEulerDiscreteScheduler``; a static ``shift`` is applied to the drawn
            times, as diffusers' SD3 / Flux training scripts do by indexing the shifted grid). Its prediction type
            (``flow_prediction`` for flow configs) is what the model learns.
        vectorized_probability: ``p``, the probability that a batch gets per-frame timesteps (the authors' 0.2).
        timestep_distribution: the per-frame law of ``u``: ``"uniform"`` (the authors') or ``"logit_normal"``.
        logit_mean, logit_std: the logit-normal law's parameters.
        prompt_embeds: text embeddings ``(1, L, D)`` or ``(B, L, D)`` for batches without ``prompt_embeds`` (an
            unconditional run of a text backbone passes a fixed one, e.g. zeros); ``None`` for the oracle.
        backbone_kwargs: passed to every backbone call (SkyReels-V2's ``fps``, LTX's ``rope_interpolation_scale``).
    """

    name = "fvdm"

    def __init__(
        self,
        scheduler: Any,
        vectorized_probability: float = PAPER_VECTORIZED_PROBABILITY,
        timestep_distribution: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ):
        if isinstance(vectorized_probability, bool) or not 0 <= vectorized_probability <= 1:
            raise ValueError(f"vectorized_probability must be a number in [0, 1], got {vectorized_probability!r}")
        if timestep_distribution not in TIMESTEP_DISTRIBUTIONS:
            raise ValueError(f"timestep_distribution must be one of {TIMESTEP_DISTRIBUTIONS}, got "
                             f"{timestep_distribution!r}")
        if not (math.isfinite(logit_mean) and logit_std > 0 and math.isfinite(logit_std)):
            raise ValueError(f"logit_mean must be finite and logit_std positive, got {logit_mean!r}, {logit_std!r}")
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping):
            raise ValueError(f"scheduler must be a diffusers scheduler with a config, got {type(scheduler).__name__}")
        self.noise_path = noise_path_from_scheduler_config(config)
        if self.noise_path == "flow" and config.get("use_dynamic_shifting", False):
            raise ValueError("the scheduler uses dynamic shifting (a shift that depends on the resolution); FVDM "
                             "training needs a static shift: pass a scheduler with use_dynamic_shifting=False")
        self.alpha_sigma = alpha_sigma_function(config)
        self.prediction_type = default_prediction_type(config)
        self.num_train_timesteps = int(config.get("num_train_timesteps", 1000))
        self.shift = float(config.get("shift", 1.0))
        self.vectorized_probability = float(vectorized_probability)
        self.timestep_distribution = timestep_distribution
        self.logit_mean, self.logit_std = float(logit_mean), float(logit_std)
        self.prompt_embeds = prompt_embeds
        self.backbone_kwargs = dict(backbone_kwargs or {})

    def sample_frame_timesteps(self, batch_size: int, num_frames: int, generator: torch.Generator) -> torch.Tensor:
        """PTSS timesteps ``tau`` ``(B, F)`` on the scheduler's training scale: integers ``floor(u N)`` (VP) or
        ``flow_shift(u, shift) N`` (flow, float32)."""
        unit_times = ptss_unit_times(batch_size, num_frames, self.vectorized_probability, generator,
                                     self.timestep_distribution, self.logit_mean, self.logit_std)
        if self.noise_path == "vp":
            return (unit_times * self.num_train_timesteps).long().clamp(max=self.num_train_timesteps - 1)
        return flow_shift(unit_times, self.shift) * self.num_train_timesteps

    def _latents_and_prompt_embeds(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor | None]:
        latents, prompt_embeds = batch, self.prompt_embeds
        if isinstance(batch, Mapping):
            latents, prompt_embeds = batch.get("latents"), batch.get("prompt_embeds", prompt_embeds)
        if not torch.is_tensor(latents) or latents.ndim != 5:
            raise ValueError("an FVDM batch is clean latents of shape (B, C, F, H, W), or a dict with them under "
                             f"'latents'; got {tuple(latents.shape) if torch.is_tensor(latents) else type(latents)}")
        if prompt_embeds is not None:
            prompt_embeds = prompt_embeds.to(latents.device).expand(latents.shape[0], *prompt_embeds.shape[1:])
        return latents, prompt_embeds

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        check_per_frame_backbone(model)
        clean, prompt_embeds = self._latents_and_prompt_embeds(batch)
        batch_size, _, num_frames = clean.shape[:3]
        timesteps = self.sample_frame_timesteps(batch_size, num_frames, generator).to(clean.device)
        noise = torch.randn(clean.shape, generator=generator, dtype=clean.dtype).to(clean.device)
        alpha, sigma = (value.to(clean.dtype)[:, None, :, None, None] for value in self.alpha_sigma(timesteps))
        noisy = alpha * clean + sigma * noise
        target = prediction_from_x0_and_eps(clean, noise, alpha, sigma, self.prediction_type)
        prediction = per_frame_prediction(model, noisy, timesteps, prompt_embeds, **self.backbone_kwargs)
        return torch.nn.functional.mse_loss(prediction.float(), target.float())


def bounce(start: torch.Tensor, velocity: torch.Tensor, low: torch.Tensor, high: torch.Tensor,
           times: torch.Tensor) -> torch.Tensor:
    """Positions at ``times`` of points moving at constant ``velocity`` from ``start`` between walls at ``low`` and
    ``high`` that reflect them: ``low + tri(start - low + velocity t)`` with the triangle wave ``tri(q) = q`` on
    ``[0, L]``, ``2L - q`` on ``[L, 2L]``, period ``2L``, ``L = high - low``. Shapes broadcast (``times`` last)."""
    span = high - low
    phase = torch.remainder(start - low + velocity * times, 2 * span)
    return low + torch.where(phase <= span, phase, 2 * span - phase)


class BouncingShapes(Dataset):
    """Synthetic clips for FVDM (arXiv 2410.03160) toy training: 1 to ``max_shapes`` squares and discs of random
    colour (each channel in ``[-0.5, 1]``) and size on a black background, each moving at its own constant velocity
    and bouncing off the frame's edges (``bounce``). Item ``i`` is ``(channels, num_frames, size, size)`` float32 in ``[-1, 1]`` (background
    ``-1``), drawn on the fly from a generator seeded by ``(seed, i)``: the same item every time, nothing stored.

    Args:
        num_clips: the data set's length.
        num_frames: frames per clip.
        size: frame height and width in pixels.
        channels: colour channels.
        max_shapes: shapes per clip at most.
        speed: the range of speeds in pixels per frame.
        seed: which clips.
    """

    def __init__(self, num_clips: int, num_frames: int = 8, size: int = 16, channels: int = 3, max_shapes: int = 2,
                 speed: tuple[float, float] = (0.5, 2.0), seed: int = 0):
        for name, value, minimum in (("num_clips", num_clips, 1), ("num_frames", num_frames, 1), ("size", size, 4),
                                     ("channels", channels, 1), ("max_shapes", max_shapes, 1)):
            if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
                raise ValueError(f"{name} must be an integer >= {minimum}, got {value!r}")
        if not 0 <= speed[0] <= speed[1]:
            raise ValueError(f"speed must be a range (low, high) with 0 <= low <= high, got {speed!r}")
        self.num_clips, self.num_frames, self.size, self.channels = num_clips, num_frames, size, channels
        self.max_shapes, self.speed, self.seed = max_shapes, (float(speed[0]), float(speed[1])), seed

    def __len__(self) -> int:
        return self.num_clips

    def __getitem__(self, index: int) -> torch.Tensor:
        if not 0 <= index < self.num_clips:
            raise IndexError(f"clip {index} of a data set of {self.num_clips}")
        # torch's CPU generator keeps 32 bits of its seed: mix (seed, index) into 32 well-spread bits.
        generator = torch.Generator().manual_seed(int(np.random.SeedSequence([self.seed, index]).generate_state(1)[0]))
        size, frames = self.size, self.num_frames
        clip = torch.full((self.channels, frames, size, size), -1.0)
        pixel_centres = torch.arange(size, dtype=torch.float32) + 0.5
        times = torch.arange(frames, dtype=torch.float32)
        num_shapes = int(torch.randint(1, self.max_shapes + 1, (), generator=generator))
        for _ in range(num_shapes):
            radius = size * (0.1 + 0.15 * torch.rand((), generator=generator))  # half the side of a square
            start = radius + (size - 2 * radius) * torch.rand(2, generator=generator)
            speed = self.speed[0] + (self.speed[1] - self.speed[0]) * torch.rand((), generator=generator)
            angle = 2 * math.pi * torch.rand((), generator=generator)
            velocity = speed * torch.stack([angle.cos(), angle.sin()])
            centre = bounce(start[:, None], velocity[:, None], radius, size - radius, times)  # (2, F): row, column
            rows = pixel_centres[None, :, None] - centre[0][:, None, None]
            columns = pixel_centres[None, None, :] - centre[1][:, None, None]
            is_disc = bool(torch.rand((), generator=generator) < 0.5)
            inside = rows**2 + columns**2 <= radius**2 if is_disc else torch.maximum(rows.abs(), columns.abs()) <= radius
            colour = 1.5 * torch.rand(self.channels, generator=generator) - 0.5  # never the background's black
            clip = torch.where(inside[None], colour[:, None, None, None], clip)
        return clip


# The toy run: 8 frames of 16 x 16 RGB pixels (no VAE), a two-block Wan transformer, flow matching.
TOY_CLIP = dict(num_frames=8, size=16, channels=3)
TOY_TEXT_SHAPE = (1, 16)  # one token: the unconditional run's fixed (zero) text embedding


def toy_backbone(seed: int = 0) -> Any:
    """A tiny random ``WanTransformer3DModel`` for ``TOY_CLIP`` pixels (patches 1 x 2 x 2, two blocks of two 16-wide
    heads), the same for the same ``seed``: the base model of ``toy_run``."""
    from diffusers import WanTransformer3DModel

    torch.manual_seed(seed)
    return WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=16,
                                 in_channels=TOY_CLIP["channels"], out_channels=TOY_CLIP["channels"],
                                 text_dim=TOY_TEXT_SHAPE[-1], freq_dim=32, ffn_dim=64, num_layers=2,
                                 rope_max_seq_len=32)


def toy_run(config: Any, args: Any = None) -> tuple[FVDMObjective, torch.nn.Module, Dataset]:
    """``diffusers-ext train fvdm``: the FVDM loss (PTSS with the authors' p = 0.2, uniform times, flow matching with
    ``FlowMatchEulerDiscreteScheduler()``'s defaults) on ``toy_backbone(config.seed)`` over 1024 ``BouncingShapes``
    clips of ``TOY_CLIP`` in pixel space, unconditional (a zero text embedding). ``lora_rank`` set: a LoRA adapter on
    the attention projections; unset: the whole transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dataset = BouncingShapes(1024, **TOY_CLIP, seed=config.seed)
    method = FVDMObjective(FlowMatchEulerDiscreteScheduler(), prompt_embeds=torch.zeros(1, *TOY_TEXT_SHAPE))
    return method, toy_backbone(config.seed).train(), dataset
