r"""Causal video training by teacher forcing: a video backbone with frame-causal attention learns to denoise a chunk of
frames given clean earlier frames, as a loss for the shared ``Trainer``.

Papers: *Ca2-VDM: Efficient Autoregressive Video Diffusion Model with Causal Generation and Cache Sharing* (Kaifeng
Gao, Jiaxin Shi, Hanwang Zhang, Chunping Wang, Jun Xiao, Long Chen; arXiv 2411.16375) and *ViD-GPT: Introducing
GPT-style Autoregressive Generation in Video Diffusion Models* (Kaifeng Gao, Jiaxin Shi, Hanwang Zhang, Chunping
Wang, Jun Xiao; arXiv 2406.10981).

Both make a video model's temporal attention unidirectional (a frame sees itself and earlier frames,
``diffusers_ext.pipelines.video.causal_attention.enable_causal_attention``) and generate a video chunk by chunk: the
clean frames generated so far are the context (prompt) of the next chunk, at timestep 0, so that their keys and
values do not depend on the chunk being denoised and can be cached once for all its denoising steps
(``CausalVideoPipeline``). Training feeds the model exactly that situation, from clean clips ``X0`` of shape
``(B, C, F, H, W)``:

    c ~ U(context_frames)             context length, once per batch (0 trains the first chunk, from text alone)
    chunk = frames [c, c + K)         K = chunk_frames; the clip's frames after the chunk are not used
    u ~ q,  tau = floor(u N)  (VP)  |  flow_shift(u, shift) N  (flow)          one timestep per clip for the chunk
    tau^i = 0 and x^i = x^i_0 for context frames i < c              (clean, exactly: sigma = 0 on a VP path too)
    x^i = alpha(tau) x^i_0 + sigma(tau) eps^i for chunk frames      eps ~ N(0, I)
    loss = mean over chunk frames || model(X, (tau^i)_i)[i] - target^i ||^2,
    target^i = eps^i | x^i_0 | alpha eps^i - sigma x^i_0 | eps^i - x^i_0   (the scheduler's prediction type)

with the causal mask on, so the chunk's predictions see the clean context and the chunk's own earlier frames, never
later ones; the context frames' outputs carry no loss (the model is never asked to denoise a clean frame). The
timestep law ``q`` and its flow shift are FVDM's with one timestep per clip (``FVDMObjective`` with
``vectorized_probability=0``, whose checks and backbone adapter ``per_frame_prediction`` this class shares).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch.utils.data import Dataset

from ..diffusion_math import prediction_from_x0_and_eps
from ..pipelines.video.backbones import check_per_frame_backbone, per_frame_prediction
from ..pipelines.video.causal_attention import causal_attention_state, enable_causal_attention
from ..testing.video_oracle import VideoGaussianMixtureDenoiser
from .fvdm import TOY_CLIP, TOY_TEXT_SHAPE, BouncingShapes, FVDMObjective, toy_backbone


def check_causal_backbone(model: torch.nn.Module) -> None:
    """A ``ValueError`` unless ``model`` (or the model inside an accelerate / DDP wrapper) takes per-frame timesteps
    and has causal attention enabled; the exact video oracle, which has no attention, passes as it is."""
    check_per_frame_backbone(model)
    backbone = extract_model_from_parallel(model, keep_torch_compile=False)
    if not isinstance(backbone, VideoGaussianMixtureDenoiser):
        causal_attention_state(backbone)


class CausalVideoObjective(FVDMObjective):
    """Teacher forcing for a frame-causal video backbone (Ca2-VDM, arXiv 2411.16375; ViD-GPT, arXiv 2406.10981):
    clean context frames at timestep 0 followed by a chunk noised at one timestep, the loss on the chunk's frames
    only (equations in the module docstring). Batches are clean latents ``(B, C, F, H, W)`` with ``F >=
    max(context_frames) + chunk_frames``, or ``{"latents": ..., "prompt_embeds": ...}``.

    The model must already be causal: call ``enable_causal_attention(model, frames_per_block)`` before handing it to
    the ``Trainer`` (a LoRA adapter added by the ``Trainer`` keeps the causal attention).

    Args:
        scheduler: the training scheduler (its ``config`` is read): VP (DDPM-family) or flow matching with a static
            shift, as for ``FVDMObjective``; its prediction type is what the model learns.
        chunk_frames: ``K``, the frames denoised together, as ``CausalVideoPipeline`` generates them.
        context_frames: the context lengths to train on, one drawn uniformly per batch; include 0 for a model that
            also generates the first chunk. With block-causal attention they should be multiples of the block.
        timestep_distribution, logit_mean, logit_std: the law of the chunk's timestep (``FVDMObjective``'s).
        prompt_embeds: text embeddings ``(1, L, D)`` or ``(B, L, D)`` for batches without them; ``None`` for the
            oracle.
        backbone_kwargs: passed to every backbone call.
    """

    name = "causal-video"

    def __init__(
        self,
        scheduler: Any,
        chunk_frames: int,
        context_frames: Sequence[int],
        timestep_distribution: str = "uniform",
        logit_mean: float = 0.0,
        logit_std: float = 1.0,
        prompt_embeds: torch.Tensor | None = None,
        backbone_kwargs: Mapping[str, Any] | None = None,
    ):
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1:
            raise ValueError(f"chunk_frames must be a positive integer, got {chunk_frames!r}")
        lengths = list(context_frames) if isinstance(context_frames, Sequence) else None
        if not lengths or not all(isinstance(n, int) and not isinstance(n, bool) and n >= 0 for n in lengths):
            raise ValueError(f"context_frames must be a non-empty sequence of integers >= 0, got {context_frames!r}")
        super().__init__(scheduler, vectorized_probability=0.0, timestep_distribution=timestep_distribution,
                         logit_mean=logit_mean, logit_std=logit_std, prompt_embeds=prompt_embeds,
                         backbone_kwargs=backbone_kwargs)
        self.chunk_frames = chunk_frames
        self.context_frames = sorted(set(lengths))

    def draw_context_length(self, generator: torch.Generator) -> int:
        """One of ``context_frames``, uniformly."""
        return self.context_frames[int(torch.randint(len(self.context_frames), (), generator=generator))]

    def teacher_forcing_inputs(
        self, clean: torch.Tensor, context_length: int, generator: torch.Generator
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The model's input ``X`` and timesteps ``(B, c + K)`` for the first ``c + K`` frames of ``clean``, and the
        chunk's target ``(B, C, K, H, W)``: context frames clean at timestep 0, the chunk noised at one timestep per
        clip."""
        batch_size, num_frames = clean.shape[0], context_length + self.chunk_frames
        if clean.shape[2] < num_frames:
            raise ValueError(f"a clip of {clean.shape[2]} frames is too short for {context_length} context frames and "
                             f"a chunk of {self.chunk_frames}")
        clip = clean[:, :, :num_frames]
        chunk = clip[:, :, context_length:]
        chunk_timesteps = self.sample_frame_timesteps(batch_size, self.chunk_frames, generator).to(clean.device)
        noise = torch.randn(chunk.shape, generator=generator, dtype=chunk.dtype).to(chunk.device)
        alpha, sigma = (value.to(chunk.dtype)[:, None, :, None, None] for value in self.alpha_sigma(chunk_timesteps))
        noisy_chunk = alpha * chunk + sigma * noise
        target = prediction_from_x0_and_eps(chunk, noise, alpha, sigma, self.prediction_type)
        context_timesteps = chunk_timesteps.new_zeros(batch_size, context_length)
        return (torch.cat([clip[:, :, :context_length], noisy_chunk], dim=2),
                torch.cat([context_timesteps, chunk_timesteps], dim=1), target)

    def loss(self, model: torch.nn.Module, batch: Any, generator: torch.Generator) -> torch.Tensor:
        check_causal_backbone(model)
        clean, prompt_embeds = self._latents_and_prompt_embeds(batch)
        context_length = self.draw_context_length(generator)
        inputs, timesteps, target = self.teacher_forcing_inputs(clean, context_length, generator)
        prediction = per_frame_prediction(model, inputs, timesteps, prompt_embeds, **self.backbone_kwargs)
        return torch.nn.functional.mse_loss(prediction[:, :, context_length:].float(), target.float())


# The toy run: TOY_CLIP's 8 frames, chunks of 2 after 0, 2, 4 or 6 context frames.
TOY_CHUNK_FRAMES = 2
TOY_CONTEXT_FRAMES = (0, 2, 4, 6)


def toy_run(config: Any, args: Any = None) -> tuple[CausalVideoObjective, torch.nn.Module, Dataset]:
    """``diffusers-ext train causal-video``: teacher forcing with chunks of ``TOY_CHUNK_FRAMES`` after
    ``TOY_CONTEXT_FRAMES`` clean frames (uniform times, flow matching with ``FlowMatchEulerDiscreteScheduler()``'s
    defaults) on ``toy_backbone(config.seed)`` made frame-causal, over 1024 ``BouncingShapes`` clips of ``TOY_CLIP``
    in pixel space, unconditional (a zero text embedding). ``lora_rank`` set: a LoRA adapter on the attention
    projections; unset: the whole transformer."""
    from diffusers import FlowMatchEulerDiscreteScheduler

    dataset = BouncingShapes(1024, **TOY_CLIP, seed=config.seed)
    method = CausalVideoObjective(FlowMatchEulerDiscreteScheduler(), TOY_CHUNK_FRAMES, TOY_CONTEXT_FRAMES,
                                  prompt_embeds=torch.zeros(1, *TOY_TEXT_SHAPE))
    model = toy_backbone(config.seed)
    enable_causal_attention(model)
    return method, model.train(), dataset
