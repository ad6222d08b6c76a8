r"""``MultiViewDiffusionPipeline``: text to ``N`` consistent views of an object around it (MVDream, "MVDream:
Multi-view Diffusion for 3D Generation", arXiv 2308.16512).

A batch is ``B`` objects of ``N`` views, views of one object consecutive (row ``b N + n`` is view ``n`` of object
``b``), all ``B N`` images denoised together by a multi-view denoiser: a ``UNet2DConditionModel`` made multi-view by
``multiview_attention.make_multiview`` (self-attention across each object's views, the camera embedding added to
the timestep embedding), or the exact oracle ``diffusers_ext.testing.multiview_oracle.MultiViewMixtureDenoiser``.
Every view of an object shares its prompt, its noise level and the sampler's step; view ``n`` is conditioned on
camera ``n``. With classifier-free guidance at scale ``w`` (as the authors sample, and as Stable Diffusion does)::

    eps_hat = eps(x_t, t, c_neg, cameras) + w (eps(x_t, t, c, cameras) - eps(x_t, t, c_neg, cameras))
    x_{t-1} = scheduler.step(eps_hat, t, x_t)

with any diffusers-API VP scheduler (DDIM, DDPM, DPM-Solver++, UniPC, Euler, ours). Without a VAE the denoiser
works on pixels in ``[-1, 1]``.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import PIL.Image
import torch
from diffusers import DiffusionPipeline
from diffusers.image_processor import VaeImageProcessor
from diffusers.loaders import StableDiffusionLoraLoaderMixin
from diffusers.utils import BaseOutput, make_image_grid
from diffusers.utils.torch_utils import randn_tensor

from .multiview_attention import CameraEmbedding, camera_embedding_of, make_multiview, multiview_num_views
from .rendering import check_cameras, orbit_cameras

OUTPUT_TYPES = ("pil", "np", "pt", "latent")
DEFAULT_ELEVATION = 15.0  # degrees: the authors' default orbit (get_camera(num_frames, elevation=15))


@dataclass
class MultiViewPipelineOutput(BaseOutput):
    """``images``: the ``B N`` views, views of one object consecutive (a list of PIL images, ``(B N, H, W, C)`` in
    [0, 1] for ``"np"``, ``(B N, C, H, W)`` for ``"pt"``, the latents for ``"latent"``); ``cameras``: the ``N``
    camera-to-world matrices ``(N, 4, 4)`` of each object's views."""

    images: Any
    cameras: torch.Tensor


def view_grid(images: Sequence[PIL.Image.Image], num_views: int) -> PIL.Image.Image:
    """One image of ``B`` rows (objects) by ``num_views`` columns (views) from a pipeline's PIL ``images``."""
    if num_views < 1 or not images or len(images) % num_views:
        raise ValueError(f"images must be whole view sets of {num_views} views, got {len(images)} images")
    return make_image_grid(list(images), rows=len(images) // num_views, cols=num_views)


def takes_cameras(denoiser: torch.nn.Module) -> bool:
    """Whether ``denoiser`` takes ``cameras=``: a UNet with an attached camera embedding, or a model whose forward
    names it (the oracle)."""
    return camera_embedding_of(denoiser) is not None or "cameras" in inspect.signature(denoiser.forward).parameters


class MultiViewDiffusionPipeline(DiffusionPipeline, StableDiffusionLoraLoaderMixin):
    r"""MVDream's multi-view text-to-image sampling (arXiv 2308.16512; module docstring).

    Args:
        unet: a ``UNet2DConditionModel`` (made multi-view here, in place, for ``num_views`` views with
            ``camera_embedding``, if it is not already: a pipeline sharing it, e.g. the Stable Diffusion pipeline it
            came from, then sees the multi-view UNet; ``remove_multiview(pipe.unet)`` gives the 2D UNet back) or a denoiser that takes ``(sample, timestep, encoder_hidden_states, cameras=)`` and
            has ``num_views`` in its config (the exact oracle).
        scheduler: a diffusers-API scheduler.
        camera_embedding: the ``CameraEmbedding`` the UNet's timestep embedding gets; not needed for a denoiser
            that takes cameras itself.
        vae: decodes latents (Stable Diffusion's ``AutoencoderKL``); ``None``: the denoiser works on pixels.
        text_encoder, tokenizer: encode prompts; ``None``: pass ``prompt_embeds`` (or nothing, for a zero
            embedding).
        num_views: the views per object ``N`` (the multi-view attention's view count); ``None``: the denoiser's.

    A multi-view LoRA saved by ``diffusers-ext train multiview`` loads with ``pipe.load_lora_weights(folder)``
    (Stable Diffusion's LoRA loader), its camera embedding with ``CameraEmbedding.from_pretrained(folder,
    subfolder="camera_embedding")``.
    """

    model_cpu_offload_seq = "text_encoder->unet->vae"
    _optional_components = ["camera_embedding", "vae", "text_encoder", "tokenizer"]
    _callback_tensor_inputs = ["latents"]

    def __init__(self, unet, scheduler, camera_embedding: CameraEmbedding | None = None, vae=None, text_encoder=None,
                 tokenizer=None, num_views: int | None = None):
        super().__init__()
        built_for = multiview_num_views(unet)
        if built_for is None:
            if num_views is None or camera_embedding is None:
                raise ValueError(f"{type(unet).__name__} is not multi-view yet: pass num_views and camera_embedding "
                                 "to make it so")
            make_multiview(unet, num_views, camera_embedding)
        elif num_views is not None and num_views != built_for:
            raise ValueError(f"num_views={num_views}, but the denoiser is built for {built_for} views per object")
        if camera_embedding is not None and camera_embedding_of(unet) is None and built_for is not None:
            raise ValueError("camera_embedding was given, but the multi-view UNet has none attached "
                             "(attach_camera_embedding)")
        if not takes_cameras(unet):
            raise ValueError(f"{type(unet).__name__} takes no cameras: attach a camera embedding "
                             "(multiview_attention.attach_camera_embedding)")
        self.register_modules(unet=unet, scheduler=scheduler, camera_embedding=camera_embedding, vae=vae,
                              text_encoder=text_encoder, tokenizer=tokenizer)
        self.register_to_config(num_views=multiview_num_views(unet))
        self.vae_scale_factor = 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1
        self.image_processor = VaeImageProcessor(vae_scale_factor=self.vae_scale_factor)

    @property
    def num_views(self) -> int:
        return self.config.num_views

    # Inputs -----------------------------------------------------------------------------------------------------

    def check_inputs(self, cameras: torch.Tensor | None, height: int, width: int, num_inference_steps: int,
                     guidance_scale: float, output_type: str, callback_tensor_inputs: Sequence[str],
                     prompt: Any, prompt_embeds: torch.Tensor | None, negative_prompt: Any,
                     negative_prompt_embeds: torch.Tensor | None) -> None:
        if cameras is not None:
            check_cameras(cameras)
            if cameras.shape[0] != self.num_views:
                raise ValueError(f"cameras must hold one camera per view, ({self.num_views}, 4, 4): this pipeline's "
                                 f"multi-view attention is built for {self.num_views} views; got "
                                 f"{tuple(cameras.shape)}")
        for name, value in (("height", height), ("width", width)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1 or value % self.vae_scale_factor:
                raise ValueError(f"{name} must be a positive multiple of {self.vae_scale_factor}, got {value!r}")
        steps = num_inference_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
            raise ValueError(f"num_inference_steps must be a positive integer, got {num_inference_steps!r}")
        if guidance_scale < 1:
            raise ValueError(f"guidance_scale must be >= 1 (1: no classifier-free guidance), got {guidance_scale}")
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        unknown = sorted(set(callback_tensor_inputs) - set(self._callback_tensor_inputs))
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs must be among {self._callback_tensor_inputs}, got "
                             f"{unknown}")
        if prompt is not None and prompt_embeds is not None:
            raise ValueError("pass prompt or prompt_embeds, not both")
        if negative_prompt is not None and (self.text_encoder is None or self.tokenizer is None):
            raise ValueError("this pipeline has no text encoder: pass negative_prompt_embeds instead of "
                             "negative_prompt")
        if prompt is not None and not isinstance(prompt, str | list):
            raise ValueError(f"prompt must be a string or a list of strings, got {type(prompt).__name__}")
        if prompt_embeds is not None and (not torch.is_tensor(prompt_embeds) or prompt_embeds.ndim != 3):
            raise ValueError("prompt_embeds must be a tensor (prompts, tokens, width)")
        if negative_prompt_embeds is not None and (prompt_embeds is None
                                                   or negative_prompt_embeds.shape != prompt_embeds.shape):
            raise ValueError("negative_prompt_embeds needs prompt_embeds of the same shape")

    def _text_width(self) -> int:
        config = self.unet.config
        return int(getattr(config, "cross_attention_dim", None) or 1)

    def encode_prompt(self, prompt: str | list[str] | None, num_prompts: int, device: torch.device,
                      dtype: torch.dtype) -> torch.Tensor:
        """Text embeddings ``(num_prompts, L, D)`` from the text encoder (Stable Diffusion's: padded to the
        tokenizer's maximum length), or a zero token without one and without a prompt."""
        if self.text_encoder is None or self.tokenizer is None:
            if prompt:
                raise ValueError("this pipeline has no text encoder: pass prompt_embeds instead of prompt")
            return torch.zeros(num_prompts, 1, self._text_width(), device=device, dtype=dtype)
        prompts = prompt if isinstance(prompt, list) else [prompt or ""] * num_prompts
        tokens = self.tokenizer(prompts, padding="max_length", max_length=self.tokenizer.model_max_length,
                                truncation=True, return_tensors="pt")
        return self.text_encoder(tokens.input_ids.to(device))[0].to(dtype)

    def prepare_latents(self, num_images: int, height: int, width: int, dtype: torch.dtype, device: torch.device,
                        generator: torch.Generator | list[torch.Generator] | None,
                        latents: torch.Tensor | None) -> torch.Tensor:
        channels = self.unet.config.in_channels
        shape = (num_images, channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
        if latents is None:
            latents = randn_tensor(shape, generator=generator, device=device, dtype=dtype)
        elif tuple(latents.shape) != shape:
            raise ValueError(f"latents must have shape {shape} (objects x views, channels, h, w), got "
                             f"{tuple(latents.shape)}")
        return latents.to(device=device, dtype=dtype) * self.scheduler.init_noise_sigma

    def _extra_step_kwargs(self, generator: Any, eta: float) -> dict[str, Any]:
        parameters = set(inspect.signature(self.scheduler.step).parameters)
        return {k: v for k, v in (("eta", eta), ("generator", generator)) if k in parameters}

    def _default_size(self) -> tuple[int, int]:
        size = getattr(self.unet.config, "sample_size", None) or 32
        height, width = (size, size) if isinstance(size, int) else tuple(size)
        return height * self.vae_scale_factor, width * self.vae_scale_factor

    # Sampling ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        cameras: torch.Tensor | None = None,
        elevation: float = DEFAULT_ELEVATION,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        negative_prompt: str | list[str] | None = None,
        num_objects_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable | None = None,
        callback_on_step_end_tensor_inputs: Sequence[str] = ("latents",),
    ) -> MultiViewPipelineOutput | tuple:
        r"""``N`` views of ``num_objects_per_prompt`` objects per prompt.

        Args:
            prompt: one prompt or a list (one object set per prompt); or ``prompt_embeds``.
            cameras: ``(N, 4, 4)`` camera-to-world matrices (OpenGL, ``rendering``'s convention), one per view, the
                same for every object; ``None``: ``N`` cameras evenly spaced in azimuth at ``elevation`` degrees
                (``rendering.orbit_cameras``).
            height, width: image size in pixels (the denoiser's ``sample_size`` by default).
            num_inference_steps, eta: the scheduler's steps (and DDIM's eta, where the scheduler takes it).
            guidance_scale: classifier-free guidance scale ``w`` (1: none).
            negative_prompt, negative_prompt_embeds: the unconditional branch (empty prompt / zeros by default).
            generator, latents: the initial noise ``(B N, C, h, w)`` (views of one object consecutive).
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"``.
            callback_on_step_end: ``callback(pipe, step, t, tensors) -> dict`` after every step; the returned
                tensors (among ``callback_on_step_end_tensor_inputs``) replace the loop's.

        Returns:
            ``MultiViewPipelineOutput(images, cameras)`` (a tuple without ``return_dict``).
        """
        default_height, default_width = self._default_size()
        height, width = height or default_height, width or default_width
        callback_tensor_inputs = list(callback_on_step_end_tensor_inputs)
        self.check_inputs(cameras, height, width, num_inference_steps, guidance_scale, output_type,
                          callback_tensor_inputs, prompt, prompt_embeds, negative_prompt, negative_prompt_embeds)
        if isinstance(num_objects_per_prompt, bool) or not isinstance(num_objects_per_prompt, int) \
                or num_objects_per_prompt < 1:
            raise ValueError(f"num_objects_per_prompt must be a positive integer, got {num_objects_per_prompt!r}")
        device, dtype = self._execution_device, self.unet.dtype
        num_views = self.num_views
        cameras = orbit_cameras(num_views, elevation=elevation) if cameras is None else cameras
        cameras = cameras.to(device=device, dtype=torch.float32)

        num_prompts = prompt_embeds.shape[0] if prompt_embeds is not None else (
            len(prompt) if isinstance(prompt, list) else 1)
        if prompt_embeds is None:
            prompt_embeds = self.encode_prompt(prompt, num_prompts, device, dtype)
        prompt_embeds = prompt_embeds.to(device=device, dtype=dtype)
        guided = guidance_scale > 1
        if guided and negative_prompt_embeds is None:
            negatives = negative_prompt if negative_prompt is not None else ("" if self.tokenizer else None)
            if isinstance(negatives, list) and len(negatives) != num_prompts:
                raise ValueError(f"negative_prompt must have one entry per prompt ({num_prompts}), got "
                                 f"{len(negatives)}")
            if isinstance(negatives, str):
                negatives = [negatives] * num_prompts
            negative_prompt_embeds = (self.encode_prompt(negatives, num_prompts, device, dtype)
                                      if self.tokenizer is not None and self.text_encoder is not None
                                      else torch.zeros_like(prompt_embeds))
        # One row per image: each prompt's embedding for each of its objects' views.
        images_per_prompt = num_objects_per_prompt * num_views
        embeds = prompt_embeds.repeat_interleave(images_per_prompt, dim=0)
        if guided:
            negative_prompt_embeds = negative_prompt_embeds.to(device=device, dtype=dtype)
            embeds = torch.cat([negative_prompt_embeds.repeat_interleave(images_per_prompt, dim=0), embeds])
        num_images = num_prompts * images_per_prompt
        row_cameras = cameras.repeat(embeds.shape[0] // num_views, 1, 1)

        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.prepare_latents(num_images, height, width, dtype, device, generator, latents)
        extra_step_kwargs = self._extra_step_kwargs(generator, eta)
        self._interrupt = False
        with self.progress_bar(total=len(self.scheduler.timesteps)) as progress_bar:
            for step, t in enumerate(self.scheduler.timesteps):
                if self._interrupt:
                    break
                model_input = torch.cat([latents, latents]) if guided else latents
                model_input = self.scheduler.scale_model_input(model_input, t)
                prediction = self.unet(model_input, t, encoder_hidden_states=embeds, cameras=row_cameras,
                                       return_dict=False)[0]
                if guided:
                    unconditional, conditional = prediction.chunk(2)
                    prediction = unconditional + guidance_scale * (conditional - unconditional)
                latents = self.scheduler.step(prediction, t, latents, **extra_step_kwargs, return_dict=False)[0]
                if callback_on_step_end is not None:
                    tensors = {"latents": latents} if callback_tensor_inputs else {}
                    outputs = callback_on_step_end(self, step, t, tensors)
                    latents = outputs.pop("latents", latents)
                progress_bar.update()

        if output_type == "latent":
            images = latents
        else:
            pixels = latents if self.vae is None else self.vae.decode(
                latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
            images = self.image_processor.postprocess(pixels.clamp(-1, 1), output_type=output_type)
        self.maybe_free_model_hooks()
        cameras = cameras.cpu()
        if not return_dict:
            return images, cameras
        return MultiViewPipelineOutput(images=images, cameras=cameras)
