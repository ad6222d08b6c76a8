"""``CausalVideoPipeline``: autoregressive video, chunk by chunk, on a causal Wan with a KV cache of the clean context
shared by every denoising step (Ca2-VDM, ViD-GPT)."""

from __future__ import annotations

from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any

import torch
from diffusers import WanTransformer3DModel
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor

from ...testing.video_oracle import VideoGaussianMixtureDenoiser
from .causal_attention import (
    FrameKVCache,
    FrameLayout,
    causal_attention_context,
    causal_attention_state,
    disable_causal_attention,
    enable_causal_attention,
    is_causal_attention_enabled,
)
from .frame_plan import FrameTimestepPlan, latent_frame_count
from .pipeline_frame_aware import OUTPUT_TYPES, FrameAwareVideoPipeline, latent_statistics

CONTEXT_POLICIES = (None, "drop_oldest")


@dataclass
class CausalVideoPipelineOutput(BaseOutput):
    """``frames``: ``(B, F, H, W, C)`` in [0, 1] (``"np"``), lists of PIL images (``"pil"``), ``(B, F, C, H, W)``
    (``"pt"``) or the latents ``(B, C, F, h, w)`` (``"latent"``), given context frames included; ``cache_frames``:
    per chunk, the latent frames of context its steps read from the KV cache (empty without the cache)."""

    frames: Any
    cache_frames: list[int]


class CausalVideoPipeline(FrameAwareVideoPipeline):
    r"""Autoregressive video generation chunk by chunk with causal temporal attention and a KV cache shared across
    denoising steps.

    Papers: *Ca2-VDM: Efficient Autoregressive Video Diffusion Model with Causal Generation and Cache Sharing*
    (Gao et al., arXiv 2411.16375); *ViD-GPT: Introducing GPT-style Autoregressive Generation in Video Diffusion
    Models* (Gao et al., arXiv 2406.10981).

    The transformer's attention over frames is made causal for the call (``enable_causal_attention``: a frame sees
    its own and earlier frames, or its block of ``frames_per_block`` frames within a chunk and earlier ones). The
    latent video ``X`` grows by chunks of ``n = chunk_frames / r`` latent frames (``r``: the VAE's temporal
    compression). For chunk ``c`` every denoising step ``k`` of a plan on the chunk alone predicts

        m_k = v([X_cache ; X^c_{t_k}], [0 ; t_k])[c]      X^c <- scheduler.step(m_k, level_k, X^c, level_{k+1})

    where the clean context ``X_cache`` enters at timestep 0. With ``use_cache=True`` its keys and values are
    computed once per chunk (a write pass of the finished chunk at timestep 0) and read by every step; with
    ``use_cache=False`` the model reruns the whole context at every step (the same output, growing cost).
    ``max_cache_frames`` bounds the context: the oldest frames are dropped, a chunk attends back to the oldest frame
    kept when it was made (the uncached run applies the same window as a mask), and frames keep their absolute
    positions (Wan's rotary attention depends only on frame distances; ``position_period`` takes Ca2-VDM's cyclic
    positions for a model trained with them).

    The first chunk comes from the text (or follows ``image``, the first frame, or ``video``, a clip to extend);
    any number of chunks follow until ``num_frames``. Prompt encoding, the VAE (or pixel space without one),
    classifier-free guidance, the frame-aware scheduler's per-frame step and output types are
    ``FrameAwareVideoPipeline``'s. Components: a ``WanTransformer3DModel`` (the cache needs one timestep per frame
    and the rotary attention the processors know) or the exact test oracle ``VideoGaussianMixtureDenoiser`` (causal
    by construction: it conditions on the frames it is given; no attention, so ``use_cache=False``), a frame-aware
    ``scheduler``, optionally ``vae``, ``text_encoder`` and ``tokenizer``.
    """

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None):
        if not isinstance(transformer, WanTransformer3DModel | VideoGaussianMixtureDenoiser):
            raise ValueError(f"CausalVideoPipeline needs a WanTransformer3DModel (frame self-attention with rotary "
                             f"positions and one timestep per frame) or the exact VideoGaussianMixtureDenoiser, got "
                             f"{type(transformer).__name__}")
        super().__init__(transformer, scheduler, vae=vae, text_encoder=text_encoder, tokenizer=tokenizer)

    @property
    def _has_attention(self) -> bool:
        """Whether the transformer has attention to make causal (Wan), or is causal by construction (the oracle)."""
        return isinstance(self.transformer, WanTransformer3DModel)

    def _attention(self, layout: FrameLayout, cache: FrameKVCache | None = None, cache_mode: str | None = None,
                   position_period: int | None = None):
        if not self._has_attention:
            return nullcontext()
        return causal_attention_context(self.transformer, layout, cache, cache_mode, position_period)

    def check_causal_inputs(self, num_frames, chunk_frames, image, video, max_cache_frames, context_policy,
                            frames_per_block, use_cache, output_type, guidance_scale) -> tuple[int, int]:
        """``(latent frames of the video, latent frames per chunk)``; a ``ValueError`` for anything else."""
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1: no classifier-free guidance), got {guidance_scale}")
        latent_frames = latent_frame_count(num_frames, self.temporal_compression)
        ratio = self.temporal_compression
        if isinstance(chunk_frames, bool) or not isinstance(chunk_frames, int) or chunk_frames < 1 \
                or chunk_frames % ratio:
            raise ValueError(f"chunk_frames must be a positive multiple of the VAE's temporal compression {ratio} "
                             f"(each chunk is chunk_frames / {ratio} latent frames), got {chunk_frames!r}")
        for name, value in (("max_cache_frames", max_cache_frames), ("frames_per_block", frames_per_block)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ValueError(f"{name} must be a positive int{' or None' if name == 'max_cache_frames' else ''}, "
                                 f"got {value!r}")
        if context_policy not in CONTEXT_POLICIES:
            raise ValueError(f"context_policy must be one of {CONTEXT_POLICIES}, got {context_policy!r}")
        if image is not None and video is not None:
            raise ValueError("pass image (the first frame) or video (a clip to extend), not both")
        if not self._has_attention and use_cache:
            raise ValueError(f"the KV cache holds attention keys and values; {type(self.transformer).__name__} has "
                             "none: pass use_cache=False")
        if self._has_attention and is_causal_attention_enabled(self.transformer) and frames_per_block is not None \
                and frames_per_block != causal_attention_state(self.transformer).frames_per_block:
            raise ValueError(f"the transformer is already causal with frames_per_block="
                             f"{causal_attention_state(self.transformer).frames_per_block}; got frames_per_block="
                             f"{frames_per_block} (leave it None to use the model's)")
        return latent_frames, chunk_frames // ratio

    def encode_video(self, video: Any, height: int, width: int, batch_size: int, like: torch.Tensor
                     ) -> torch.Tensor:
        """A clip (a list of PIL images, an array ``(F, H, W, C)`` or a tensor ``(F, C, H, W)`` in [0, 1]) as clean,
        normalized latents ``(batch_size, C, f, h, w)``."""
        pixels = self.video_processor.preprocess_video(video, height=height, width=width).to(like)
        if pixels.shape[0] != 1:
            raise ValueError(f"video must be one clip, got {pixels.shape[0]}")
        if tuple(pixels.shape[-2:]) != (height, width):
            raise ValueError(f"video frames are {pixels.shape[-2]}x{pixels.shape[-1]}; the video is {height}x{width}")
        latent_frame_count(pixels.shape[2], self.temporal_compression)  # raises for a length the VAE cannot take
        if self.vae is None:
            latents = pixels
        else:
            latents = self.vae.encode(pixels).latent_dist.mode()
            mean, std, scale = latent_statistics(self.vae, latents)
            latents = (latents - mean) * scale / std
        if latents.shape[1] != like.shape[1]:
            raise ValueError(f"video latents have {latents.shape[1]} channels; the model takes {like.shape[1]}")
        return latents.expand(batch_size, *latents.shape[1:])

    def _context_latents(self, image, video, height, width, batch, like, max_cache_frames, context_policy,
                         latent_frames) -> torch.Tensor:
        if image is not None:
            context = self._encode_frames({0: image}, height, width, batch, like[:, :, 0])[0][:, :, None]
        elif video is not None:
            context = self.encode_video(video, height, width, batch, like)
        else:
            return like[:, :, :0]
        if context.shape[2] >= latent_frames:
            raise ValueError(f"the given context is {context.shape[2]} latent frames; num_frames asks for "
                             f"{latent_frames}: nothing left to generate")
        if max_cache_frames is not None and context.shape[2] > max_cache_frames and context_policy is None:
            raise ValueError(f"the given context is {context.shape[2]} latent frames, longer than max_cache_frames="
                             f"{max_cache_frames}: pass context_policy='drop_oldest' to keep its newest "
                             f"{max_cache_frames} frames as context, or a larger bound")
        return context

    def _chunk_prediction_input(self, history: torch.Tensor, start: torch.Tensor, grid: torch.Tensor
                                ) -> tuple[torch.Tensor, FrameTimestepPlan]:
        """Uncached: the context frames (clean, kept at the clean level) followed by the chunk."""
        frames = history.shape[2] + start.shape[2]
        plan = FrameTimestepPlan.image_to_video(grid, frames, clean_frames=list(range(history.shape[2]))) \
            if history.shape[2] else FrameTimestepPlan.standard(grid, frames)
        return torch.cat([history, start], dim=2), plan

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 9,
        chunk_frames: int = 4,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        image: Any = None,
        video: Any = None,
        use_cache: bool = True,
        max_cache_frames: int | None = None,
        context_policy: str | None = None,
        frames_per_block: int | None = None,
        position_period: int | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> CausalVideoPipelineOutput | tuple:
        r"""
        Args:
            prompt, negative_prompt: text (needs a text encoder), or pass ``prompt_embeds`` /
                ``negative_prompt_embeds``.
            num_frames: pixel frames of the whole video, given context included (with a VAE of temporal
                compression ``r``, ``num_frames - 1`` must be a multiple of ``r``).
            chunk_frames: pixel frames per chunk, a multiple of ``r`` (``chunk_frames / r`` latent frames); the last
                chunk may be shorter.
            height, width: frame size in pixels.
            num_inference_steps: denoising steps per chunk.
            image: the first frame (PIL image, array ``(H, W, C)`` or tensor ``(C, H, W)`` in [0, 1]).
            video: a clip to extend (list of PIL images, array ``(F, H, W, C)`` or tensor ``(F, C, H, W)`` in
                [0, 1]; ``F - 1`` a multiple of ``r``); it is the start of the output.
            use_cache: compute the context's keys and values once per chunk (Ca2-VDM) instead of at every step.
            max_cache_frames: latent frames of context kept (oldest dropped); ``None``: all.
            context_policy: for a ``video`` longer than ``max_cache_frames``: ``"drop_oldest"`` keeps its newest
                frames as context; ``None`` raises.
            frames_per_block: causal blocks within a chunk (1: frame-causal; the chunk length: chunk-causal); it
                must match how the model was trained. ``None``: that of a transformer already made causal
                (``enable_causal_attention(transformer, frames_per_block)``), else 1.
            position_period: cyclic frame positions ``p mod L`` (Ca2-VDM's cyclic temporal positions); ``None``:
                absolute positions.
            guidance_scale: classifier-free guidance weight (1: none).
            eta: DDIM's stochasticity (0: deterministic; the cached and uncached runs draw their step noise in
                different shapes, so only ``eta=0`` gives them equal outputs).
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``callback(pipe, step, timesteps, tensors) -> dict`` after every step of every
                chunk; ``latents`` are the frames being denoised (uncached: with their context in front).
            backbone_kwargs: passed to the transformer.
        """
        latent_frames, chunk_latent_frames = self.check_causal_inputs(
            num_frames, chunk_frames, image, video, max_cache_frames, context_policy, frames_per_block, use_cache,
            output_type, guidance_scale)
        callback_tensor_inputs = self.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)
        height, width = self._frame_size(height, width)
        device, dtype = self._execution_device, self.transformer.dtype

        batch, embeds = self.named_prompt_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                                 num_videos_per_prompt, guidance_scale, device, dtype)
        stacked = torch.cat(list(embeds.values()))

        # The exact test oracle has no in_channels; it names the clip shape it takes.
        channels = self.transformer.config.get("in_channels") or self.transformer.sample_shape[0]
        latent_shape = (batch, channels, 1, height // self.spatial_compression,
                        width // self.spatial_compression)
        video_latents = self._context_latents(image, video, height, width, batch,
                                              torch.empty(latent_shape, device=device, dtype=dtype),
                                              max_cache_frames, context_policy, latent_frames)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        grid = self.scheduler.noise_levels
        clean_level = grid[-1]
        run = dict(guidance_scale=guidance_scale, eta=eta, generator=generator, backbone_kwargs=backbone_kwargs or {},
                   callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_tensor_inputs,
                   prompt_embeds=embeds)

        enabled_here = self._has_attention and not is_causal_attention_enabled(self.transformer)
        if enabled_here:
            enable_causal_attention(self.transformer, frames_per_block or 1)
        # Blocks of the layouts: the causal transformer's own (the oracle has none to follow).
        frames_per_block = causal_attention_state(self.transformer).frames_per_block if self._has_attention \
            else frames_per_block or 1
        try:
            video_latents, cache_frames = self._generate(
                video_latents, latent_frames, chunk_latent_frames, frames_per_block, max_cache_frames,
                position_period, use_cache, grid, clean_level, stacked, run, generator)
        finally:
            if enabled_here:
                disable_causal_attention(self.transformer)

        if output_type == "latent":
            frames = video_latents
        else:
            frames = self.video_processor.postprocess_video(self.decode_latents(video_latents),
                                                            output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, cache_frames)
        return CausalVideoPipelineOutput(frames=frames, cache_frames=cache_frames)

    def _generate(self, video_latents, latent_frames, chunk_latent_frames, frames_per_block, max_cache_frames,
                  position_period, use_cache, grid, clean_level, stacked, run, generator):
        """The chunk loop (class docstring): the latent video, and per chunk the frames read from the cache."""
        guidance_scale, backbone_kwargs = run["guidance_scale"], run["backbone_kwargs"]
        given = video_latents.shape[2]
        kept_from = given - max_cache_frames if max_cache_frames is not None and given > max_cache_frames else 0
        layout = FrameLayout.block_causal(given - kept_from, frames_per_block, first_position=kept_from,
                                          window_start=kept_from)
        cache = FrameKVCache(max_cache_frames) if use_cache else None
        cache_frames = []

        def write(frames: torch.Tensor, frames_layout: FrameLayout) -> None:
            """Ca2-VDM's cache write: the clean frames at timestep 0, their keys and values kept."""
            with self._attention(frames_layout, cache, "write", position_period):
                self._predict(frames, torch.full((frames.shape[2],), float(clean_level)), stacked, guidance_scale,
                              backbone_kwargs)

        if use_cache and len(layout):
            write(video_latents[:, :, kept_from:], layout)
        while video_latents.shape[2] < latent_frames:
            frames = min(chunk_latent_frames, latent_frames - video_latents.shape[2])
            position = video_latents.shape[2]
            window_start = kept_from if max_cache_frames is None else max(kept_from, position - max_cache_frames)
            next_block = int(layout.blocks[-1]) + 1 if len(layout) else 0
            chunk_layout = FrameLayout.block_causal(frames, frames_per_block, position, next_block, window_start)
            plan = FrameTimestepPlan.standard(grid, frames)
            noise = randn_tensor((*video_latents.shape[:2], frames, *video_latents.shape[3:]), generator=generator,
                                 device=video_latents.device, dtype=video_latents.dtype)
            start = self.scheduler.add_noise(torch.zeros_like(noise), noise, plan.levels[0])
            if use_cache:
                cache_frames.append(cache.num_frames)
                with self._attention(chunk_layout, cache, "read", position_period):
                    chunk = self._denoise_window(start, plan, stacked, **run)
            else:
                history = video_latents[:, :, kept_from:]
                window, window_plan = self._chunk_prediction_input(history, start, grid)
                with self._attention(FrameLayout.cat([layout, chunk_layout]), position_period=position_period):
                    chunk = self._denoise_window(window, window_plan, stacked, **run)[:, :, history.shape[2]:]
            video_latents = torch.cat([video_latents, chunk], dim=2)
            layout = FrameLayout.cat([layout, chunk_layout])
            if use_cache and video_latents.shape[2] < latent_frames:
                write(chunk, chunk_layout)
        return video_latents, cache_frames
