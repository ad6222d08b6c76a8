"""``FrameAwareVideoPipeline``: FVDM's vectorized-timestep sampling on any per-frame video backbone."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.utils import BaseOutput
from diffusers.utils.torch_utils import randn_tensor
from diffusers.video_processor import VideoProcessor

from ...schedulers.scheduling_frame_aware import FrameAwareSchedulerMixin
from .backbones import check_per_frame_backbone, per_frame_prediction
from .frame_plan import FrameTimestepPlan, latent_frame_count

OUTPUT_TYPES = ("np", "pil", "pt", "latent")


@dataclass
class FrameAwareVideoPipelineOutput(BaseOutput):
    """``frames``: ``(B, F, H, W, C)`` in [0, 1] (``"np"``), lists of PIL images (``"pil"``), ``(B, F, C, H, W)``
    (``"pt"``) or the latents ``(B, C, F, h, w)`` (``"latent"``); ``plan``: the plan of the first window."""

    frames: Any
    plan: FrameTimestepPlan


def vae_compression(vae: Any) -> tuple[int, int]:
    """``(temporal, spatial)`` compression of a video VAE (Wan's config names, LTX-Video's attributes); ``(1, 1)``
    without one (pixel-space models)."""
    if vae is None:
        return 1, 1
    config = vae.config
    temporal = getattr(config, "scale_factor_temporal", None) or getattr(vae, "temporal_compression_ratio", None)
    spatial = getattr(config, "scale_factor_spatial", None) or getattr(vae, "spatial_compression_ratio", None)
    if temporal is None or spatial is None:
        raise ValueError(f"{type(vae).__name__} does not say its compression (scale_factor_temporal / "
                         "temporal_compression_ratio); FrameAwareVideoPipeline takes Wan- or LTX-Video-style VAEs")
    return int(temporal), int(spatial)


def latent_statistics(vae: Any, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """``(mean, std, scale)`` that normalize the VAE's latents, ``(z - mean) * scale / std`` (Wan: config lists,
    scale 1; LTX-Video: buffers and ``scaling_factor``), shaped to broadcast over ``(B, C, F, h, w)``."""
    channels = like.shape[1]
    mean = getattr(vae.config, "latents_mean", None)
    std = getattr(vae.config, "latents_std", None)
    if mean is None:
        mean, std = getattr(vae, "latents_mean", None), getattr(vae, "latents_std", None)
    mean = torch.zeros(channels) if mean is None else torch.as_tensor(mean)
    std = torch.ones(channels) if std is None else torch.as_tensor(std)
    view = (1, channels, 1, 1, 1)
    scale = float(getattr(vae.config, "scaling_factor", None) or 1.0)
    return mean.view(view).to(like), std.view(view).to(like), scale


def image_size(image: Any) -> tuple[int, int]:
    """``(height, width)`` of a PIL image, an array ``(H, W[, C])`` or a tensor ``(C, H, W)``."""
    if isinstance(image, PIL.Image.Image):
        return image.size[1], image.size[0]
    if isinstance(image, torch.Tensor) and image.ndim == 3:
        return tuple(image.shape[-2:])
    if hasattr(image, "shape") and len(image.shape) in (2, 3):
        return tuple(image.shape[:2])
    raise ValueError(f"a conditioning frame must be a PIL image, an array (H, W[, C]) or a tensor (C, H, W), got "
                     f"{type(image).__name__} of shape {tuple(getattr(image, 'shape', ()))}")


class FrameAwareVideoPipeline(DiffusionPipeline):
    r"""Video generation, image-to-video, interpolation and long video with one model, by the per-frame noise levels
    of a ``FrameTimestepPlan``.

    Paper: *Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach* (FVDM), Liu et al.,
    arXiv 2410.03160; long video as in *Diffusion Forcing: Next-token Prediction Meets Full-Sequence Diffusion*,
    Chen et al., arXiv 2407.01392.

    Every frame ``f`` has its own noise level ``sigma^f`` (``x^f = alpha(sigma^f) x0^f + sigma^f eps^f``). Step ``k``
    of a plan calls the backbone once on all frames at their timesteps ``tau^f = t(levels[k, f])`` (each backbone in
    the shape it takes: ``per_frame_prediction``) and the frame-aware scheduler moves each frame from
    ``levels[k, f]`` to ``levels[k + 1, f]`` in one vectorized update; a frame whose level does not change (a given
    frame, clean) stays exactly as it is and is seen by the model as clean context:

        m = v(X, tau_k) [+ w (v(X, tau_k | c) - v(X, tau_k | 0)) with classifier-free guidance]
        X <- scheduler.step(m, levels[k], X, levels[k + 1])

    ``conditioning_frames={f: image}`` fixes frames: frame 0 alone is image-to-video, several frames interpolation
    (the default plan then keeps them clean and walks the rest together). ``window_frames`` generates videos longer
    than the model's window: after the first window, each window keeps the last ``context_frames`` latent frames of
    the previous one as clean context and generates ``window_frames - context_frames`` new ones, so every new frame
    costs the same.

    Components: ``transformer`` (Wan, SkyReels-V2, LTX-Video, or the exact test oracle: ``PER_FRAME_BACKBONES``), a
    frame-aware ``scheduler`` (``FrameAwareFlowMatchScheduler`` or ``FrameAwareVPScheduler``), optionally a ``vae``
    (Wan- or LTX-Video-style; without one the model works on pixels in [-1, 1]) and a ``text_encoder`` with its
    ``tokenizer``. Without a text encoder, pass ``prompt_embeds``; unconditional models get one zero token.
    """

    model_cpu_offload_seq = "text_encoder->transformer->vae"
    _optional_components = ["vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents", "prompt_embeds", "negative_prompt_embeds"]

    def __init__(self, transformer, scheduler, vae=None, text_encoder=None, tokenizer=None):
        super().__init__()
        check_per_frame_backbone(transformer)
        if not isinstance(scheduler, FrameAwareSchedulerMixin):
            raise ValueError("FrameAwareVideoPipeline needs a frame-aware scheduler (FrameAwareFlowMatchScheduler or "
                             f"FrameAwareVPScheduler, e.g. FrameAwareFlowMatchScheduler.from_config(pipe.scheduler."
                             f"config)), got {type(scheduler).__name__}")
        self.register_modules(transformer=transformer, scheduler=scheduler, vae=vae, text_encoder=text_encoder,
                              tokenizer=tokenizer)
        self.temporal_compression, self.spatial_compression = vae_compression(vae)
        self.video_processor = VideoProcessor(vae_scale_factor=self.spatial_compression)

    # Inputs -----------------------------------------------------------------------------------------------------

    def _frame_size(self, height: int | None, width: int | None) -> tuple[int, int]:
        """``(height, width)`` in pixels: multiples of the VAE's spatial compression times the backbone's patch."""
        patch = self.transformer.config.get("patch_size") or 1
        patch = patch[-1] if isinstance(patch, tuple | list) else patch
        multiple = self.spatial_compression * patch
        default = getattr(self.transformer.config, "sample_size", None) or 16
        height, width = height or default * self.spatial_compression, width or default * self.spatial_compression
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % multiple:
                raise ValueError(f"{name} must be a positive multiple of {multiple} (the VAE's spatial compression "
                                 f"{self.spatial_compression} times the backbone's patch {patch}), got {value!r}")
        return height, width

    def check_inputs(self, num_latent_frames: int, plan: FrameTimestepPlan | None,
                     conditioning_frames: Mapping[int, Any] | None, window_frames: int | None, context_frames: int,
                     output_type: str, guidance_scale: float) -> None:
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1: no classifier-free guidance), got {guidance_scale}")
        if plan is not None and not isinstance(plan, FrameTimestepPlan):
            raise ValueError(f"plan must be a FrameTimestepPlan, got {type(plan).__name__}")
        window = num_latent_frames if window_frames is None else window_frames
        if isinstance(window, bool) or not isinstance(window, int) or not 1 <= window <= num_latent_frames:
            raise ValueError(f"window_frames must be an int in [1, {num_latent_frames}] (latent frames), "
                             f"got {window_frames!r}")
        if window < num_latent_frames and not 1 <= context_frames < window:
            raise ValueError(f"context_frames must be in [1, window_frames - 1] = [1, {window - 1}] for a rolling "
                             f"window, got {context_frames!r}")
        if plan is not None:
            plan.check_frames(window)
        for index in conditioning_frames or {}:
            if isinstance(index, bool) or not isinstance(index, int) or not 0 <= index < window:
                raise ValueError(f"conditioning_frames keys must be frame indices in the first window [0, {window}), "
                                 f"got {index!r}")
            if index and self.temporal_compression > 1:
                raise ValueError(f"with a VAE of temporal compression {self.temporal_compression} only frame 0 can be "
                                 "given as an image (a latent frame after the first encodes several pixel frames); "
                                 "pass latents= with the clean latent frames in place and a plan that keeps them clean")
        if plan is not None and conditioning_frames:
            still_clean = plan.levels[:, sorted(conditioning_frames)] == plan.schedule[-1]
            if not still_clean.all():
                raise ValueError("the plan must keep the conditioning frames at the clean end of its schedule on "
                                 f"every step (frames {sorted(conditioning_frames)})")

    def encode_prompt(self, prompt: str | list[str] | None, batch_size: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """Text embeddings ``(batch_size, L, D)`` from the text encoder, or one zero token without one."""
        if self.text_encoder is None or self.tokenizer is None:
            if prompt:
                raise ValueError("this pipeline has no text encoder: pass prompt_embeds instead of prompt")
            text_dim = self.transformer.config.get("text_dim") or self.transformer.config.get("caption_channels")
            return torch.zeros(batch_size, 1, text_dim or 1, device=device, dtype=dtype)
        prompts = [prompt or ""] * batch_size if not isinstance(prompt, list) else prompt
        # As WanPipeline encodes (up to 512 tokens): the padding positions' embeddings are zero.
        tokens = self.tokenizer(prompts, padding="max_length", max_length=min(self.tokenizer.model_max_length, 512),
                                truncation=True, return_attention_mask=True, return_tensors="pt")
        mask = tokens.attention_mask.to(device)
        embeds = self.text_encoder(tokens.input_ids.to(device), attention_mask=mask)[0]
        return (embeds * mask[..., None]).to(dtype)

    def named_prompt_embeds(self, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                            num_videos_per_prompt: int, guidance_scale: float, device: torch.device,
                            dtype: torch.dtype) -> tuple[int, dict[str, torch.Tensor]]:
        """The batch size (prompts x videos per prompt) and the text embeddings by their callback names, the negative
        prompt's first under classifier-free guidance (``guidance_scale > 1``), the order the backbone's batch takes."""
        prompts = 1 if prompt_embeds is not None or not isinstance(prompt, list) else len(prompt)
        if prompt_embeds is not None:
            prompts = prompt_embeds.shape[0]
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, prompts, device, dtype)
        embeds = {"prompt_embeds": prompt_embeds.repeat_interleave(num_videos_per_prompt, dim=0).to(device)}
        if guidance_scale > 1:
            if negative_prompt_embeds is None:
                negative_prompt_embeds = self.encode_prompt(negative_prompt, prompts, device, dtype)
            embeds = {"negative_prompt_embeds": negative_prompt_embeds.repeat_interleave(num_videos_per_prompt, 0)
                      .to(device), **embeds}
        return prompts * num_videos_per_prompt, embeds

    def check_callback_tensor_inputs(self, names: Sequence[str]) -> list[str]:
        """``callback_on_step_end_tensor_inputs`` as a list; a ``ValueError`` for a name the loop does not have."""
        unknown = set(names) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got "
                             f"{sorted(unknown)}")
        return list(names)

    def _encode_frames(self, frames: Mapping[int, Any], height: int, width: int, batch_size: int,
                       like: torch.Tensor) -> dict[int, torch.Tensor]:
        """Each given frame as a clean latent frame ``(batch_size, C, h, w)``."""
        latents = {}
        for index, image in frames.items():
            size = image_size(image)
            if size != (height, width):
                raise ValueError(f"conditioning frame {index} is {size[0]}x{size[1]} pixels; the video is "
                                 f"{height}x{width}")
            pixels = self.video_processor.preprocess(image, height=height, width=width)[0]
            pixels = pixels.to(like)
            if self.vae is None:
                latent = pixels
            else:
                latent = self.vae.encode(pixels[None, :, None]).latent_dist.mode()
                mean, std, scale = latent_statistics(self.vae, latent)
                latent = ((latent - mean) * scale / std)[0, :, 0]
            if latent.shape[0] != like.shape[1]:
                raise ValueError(f"conditioning frame {index} has {latent.shape[0]} channels; the model takes "
                                 f"{like.shape[1]}")
            latents[index] = latent.expand(batch_size, *latent.shape)
        return latents

    def decode_latents(self, latents: torch.Tensor) -> torch.Tensor:
        """``(B, C, F, H, W)`` pixels in [-1, 1]."""
        if self.vae is None:
            return latents.clamp(-1, 1)
        mean, std, scale = latent_statistics(self.vae, latents)
        return self.vae.decode((latents * std / scale + mean).to(self.vae.dtype), return_dict=False)[0]

    # Sampling ---------------------------------------------------------------------------------------------------

    def _predict(self, latents: torch.Tensor, levels: torch.Tensor, embeds: torch.Tensor, guidance_scale: float,
                 backbone_kwargs: dict) -> torch.Tensor:
        return self._guided_prediction(per_frame_prediction, self.transformer, latents, levels, embeds,
                                       guidance_scale, backbone_kwargs)

    def _guided_prediction(self, predict: Callable[..., torch.Tensor], model: torch.nn.Module, latents: torch.Tensor,
                           levels: torch.Tensor, embeds: torch.Tensor, guidance_scale: float,
                           backbone_kwargs: dict) -> torch.Tensor:
        """``predict(model, latents, frame_timesteps, embeds)`` with classifier-free guidance over the stacked
        (negative, positive) embeddings when ``guidance_scale > 1``."""
        timesteps = self.scheduler.timesteps_from_noise_levels(levels).to(latents.device)
        batch = latents.shape[0]
        copies = 2 if guidance_scale > 1 else 1
        prediction = predict(model, torch.cat([latents] * copies).to(model.dtype),
                             timesteps.expand(batch * copies, -1), embeds, **backbone_kwargs)
        if copies == 2:
            unconditional, conditional = prediction.chunk(2)
            prediction = unconditional + guidance_scale * (conditional - unconditional)
        return prediction.to(latents.dtype)

    def _denoise_window(self, latents: torch.Tensor, plan: FrameTimestepPlan, embeds: torch.Tensor,
                        guidance_scale: float, eta: float, generator, backbone_kwargs: dict,
                        callback_on_step_end: Callable | None, callback_tensor_inputs: list[str],
                        prompt_embeds: dict[str, torch.Tensor]) -> torch.Tensor:
        self.scheduler.set_timesteps(plan.num_steps, device=latents.device)
        with self.progress_bar(total=plan.num_steps) as progress_bar:
            for k, (level, next_level) in enumerate(plan):
                prediction = self._predict(latents, level, embeds, guidance_scale, backbone_kwargs)
                latents = self.scheduler.step(prediction, level, latents, next_level, eta=eta,
                                              generator=generator).prev_sample
                if callback_on_step_end is not None:
                    values = {"latents": latents, **prompt_embeds}
                    outputs = callback_on_step_end(self, k, self.scheduler.timesteps_from_noise_levels(level),
                                                   {name: values[name] for name in callback_tensor_inputs})
                    latents = outputs.pop("latents", latents)
                    for name in list(prompt_embeds):
                        prompt_embeds[name] = outputs.pop(name, prompt_embeds[name])
                    embeds = torch.cat(list(prompt_embeds.values())) if guidance_scale > 1 \
                        else prompt_embeds["prompt_embeds"]
                progress_bar.update()
        return latents

    def _start(self, shape: tuple[int, ...], plan: FrameTimestepPlan, clean: dict[int, torch.Tensor],
               generator, latents: torch.Tensor | None, device: torch.device, dtype: torch.dtype) -> torch.Tensor:
        """Row 0 of ``plan``: given frames at their (clean) level, the rest noised from zero (pure noise at the top
        of the schedule)."""
        noise = randn_tensor(shape, generator=generator, device=device, dtype=dtype) if latents is None \
            else latents.to(device, dtype)
        if latents is not None and not clean:
            return noise
        x0 = torch.zeros(shape, device=device, dtype=dtype)
        for index, frame in clean.items():
            x0[:, :, index] = frame
        return self.scheduler.add_noise(x0, noise, plan.levels[0])

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        negative_prompt: str | list[str] | None = None,
        num_frames: int = 8,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        plan: FrameTimestepPlan | None = None,
        conditioning_frames: Mapping[int, Any] | None = None,
        window_frames: int | None = None,
        context_frames: int = 1,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        num_videos_per_prompt: int = 1,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "np",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: list[str] = ("latents",),
        backbone_kwargs: dict[str, Any] | None = None,
    ) -> FrameAwareVideoPipelineOutput | tuple:
        r"""
        Args:
            prompt, negative_prompt: text (needs a text encoder), or pass ``prompt_embeds`` /
                ``negative_prompt_embeds``.
            num_frames: pixel frames of the whole video (with a VAE of temporal compression ``r``,
                ``num_frames - 1`` must be a multiple of ``r``).
            height, width: frame size in pixels.
            num_inference_steps: steps of the default plans (the scheduler's grid of ``num_inference_steps + 1``
                levels).
            plan: your own ``FrameTimestepPlan`` for the first window (one column per latent frame of the window);
                default: ``standard``, ``image_to_video`` or ``interpolation`` on the scheduler's grid, depending on
                ``conditioning_frames``.
            conditioning_frames: ``{frame index: image}`` frames given clean (PIL images, or arrays ``(H, W, C)`` /
                tensors ``(C, H, W)`` in [0, 1], as diffusers' image processors take); with a temporally compressing
                VAE only frame 0.
            window_frames: latent frames per model call; fewer than the video's latent frames rolls a window over it.
            context_frames: latent frames each later window takes, clean, from the one before.
            guidance_scale: classifier-free guidance weight (1: none).
            eta: DDIM's stochasticity for the first-order step (0: deterministic).
            latents: the first window's starting latents ``(B, C, F, h, w)``: noise, into which
                ``conditioning_frames`` are placed; without ``conditioning_frames`` they are used as given (put the
                clean latent frames your plan keeps clean in place yourself).
            output_type: ``"np"``, ``"pil"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``callback(pipe, step, timesteps, tensors) -> dict`` after every step of every
                window, as in diffusers.
            backbone_kwargs: passed to the backbone (e.g. LTX-Video's ``rope_interpolation_scale``).
        """
        num_latent_frames = latent_frame_count(num_frames, self.temporal_compression)
        callback_tensor_inputs = self.check_callback_tensor_inputs(callback_on_step_end_tensor_inputs)
        self.check_inputs(num_latent_frames, plan, conditioning_frames, window_frames, context_frames, output_type,
                          guidance_scale)
        height, width = self._frame_size(height, width)
        window = window_frames or num_latent_frames
        device, dtype = self._execution_device, self.transformer.dtype

        batch, embeds = self.named_prompt_embeds(prompt, prompt_embeds, negative_prompt, negative_prompt_embeds,
                                                 num_videos_per_prompt, guidance_scale, device, dtype)
        stacked = torch.cat(list(embeds.values()))

        # The exact test oracle has no in_channels; it names the clip shape it takes.
        channels = self.transformer.config.get("in_channels") or self.transformer.sample_shape[0]
        shape = (batch, channels, window, height // self.spatial_compression, width // self.spatial_compression)
        clean = self._encode_frames(conditioning_frames or {}, height, width, batch,
                                    torch.empty(shape, device=device, dtype=dtype))
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        grid = self.scheduler.noise_levels
        if plan is None:
            plan = (FrameTimestepPlan.interpolation(grid, window, key_frames=sorted(clean)) if len(clean) > 1
                    else FrameTimestepPlan.image_to_video(grid, window, clean_frames=sorted(clean)) if clean
                    else FrameTimestepPlan.standard(grid, window))
        run = dict(guidance_scale=guidance_scale, eta=eta, generator=generator, backbone_kwargs=backbone_kwargs or {},
                   callback_on_step_end=callback_on_step_end, callback_tensor_inputs=callback_tensor_inputs,
                   prompt_embeds=embeds)
        video = self._denoise_window(self._start(shape, plan, clean, generator, latents, device, dtype), plan,
                                     stacked, **run)
        rolling = FrameTimestepPlan.image_to_video(grid, window, clean_frames=list(range(context_frames))) \
            if window < num_latent_frames else None
        while video.shape[2] < num_latent_frames:
            context = {f: video[:, :, video.shape[2] - context_frames + f] for f in range(context_frames)}
            new = self._denoise_window(self._start(shape, rolling, context, generator, None, device, dtype), rolling,
                                       stacked, **run)
            video = torch.cat([video, new[:, :, context_frames:]], dim=2)
        video = video[:, :, :num_latent_frames]

        if output_type == "latent":
            frames = video
        else:
            frames = self.video_processor.postprocess_video(self.decode_latents(video), output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return (frames, plan)
        return FrameAwareVideoPipelineOutput(frames=frames, plan=plan)
