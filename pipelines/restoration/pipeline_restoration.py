"""``RestorationPipeline``: the loop the four restoration pipelines (RDDM, ResShift, mean-reverting SDE, diffusion
bridge) share. A method's pipeline names its scheduler class and its defaults; the loop is this one."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np
import PIL.Image
import torch
from diffusers import DiffusionPipeline, ImagePipelineOutput
from diffusers.image_processor import VaeImageProcessor

from ...schedulers.restoration import RestorationScheduler

ImageInput = PIL.Image.Image | np.ndarray | torch.Tensor | list[PIL.Image.Image] | list[np.ndarray]
OUTPUT_TYPES = ("pil", "np", "pt", "latent")


def upscale_bicubic(lowres: torch.Tensor, factor: int) -> torch.Tensor:
    """Bicubic upsampling of ``(B, C, h, w)`` images in [-1, 1] by an integer factor, clipped to [-1, 1]: how a
    low-resolution input is brought into the clean image's space, here and in the training data
    (``training.restoration_data``), so that training sees what inference sees."""
    if lowres.ndim != 4:
        raise ValueError(f"upscale_bicubic takes a (B, C, H, W) batch, got shape {tuple(lowres.shape)}")
    if isinstance(factor, bool) or not isinstance(factor, int) or factor < 1:
        raise ValueError(f"factor must be a positive integer, got {factor!r}")
    if factor == 1:
        return lowres
    upscaled = torch.nn.functional.interpolate(lowres, scale_factor=factor, mode="bicubic", align_corners=False)
    return upscaled.clamp(-1, 1)


def encode_to_latents(vae, images: torch.Tensor) -> torch.Tensor:
    """The VAE's scaled latents of images in [-1, 1] (the distribution's mode: restoration wants no extra noise);
    the images themselves when there is no VAE."""
    if vae is None:
        return images
    latents = vae.encode(images.to(device=vae.device, dtype=vae.dtype)).latent_dist.mode()
    return (latents - (vae.config.shift_factor or 0.0)) * vae.config.scaling_factor


def decode_latents(vae, latents: torch.Tensor) -> torch.Tensor:
    if vae is None:
        return latents
    latents = latents / vae.config.scaling_factor + (vae.config.shift_factor or 0.0)
    return vae.decode(latents.to(vae.dtype)).sample


def _as_batch(image: ImageInput) -> list:
    return list(image) if isinstance(image, list) else [image]


def _channel_count(image: np.ndarray | torch.Tensor) -> int | None:
    """Channels of a numpy image ((H, W), (H, W, C), (B, H, W, C)) or a tensor ((C, H, W), (B, C, H, W))."""
    if isinstance(image, torch.Tensor):
        return image.shape[-3] if image.ndim in (3, 4) else None
    if image.ndim == 2:
        return 1
    return image.shape[-1] if image.ndim in (3, 4) else None


class RestorationPipeline(DiffusionPipeline):
    r"""Restore a degraded image with a restoration diffusion process (see ``schedulers.restoration``).

    Components:
        unet: a ``UNet2DModel`` taking the state and the degraded image stacked on the channel axis
            (``in_channels = 2 C``) and returning the scheduler's prediction (``out_channels = C``, or ``2 C`` for
            ``prediction_type="residual_and_noise"``), with ``C`` the image channels, or the latent channels when a
            ``vae`` is present.
        scheduler: the method's restoration scheduler; by default the method's scheduler class with its paper's
            settings (pass the one the model was trained with when they differ).
        vae: optional ``AutoencoderKL``; when given, the process runs on its latents (``y`` is the encoded degraded
            image; the result is decoded).
        upscale_factor: the input is upsampled bicubically by this factor before restoration (super-resolution);
            1 for same-size restoration.
        default_num_inference_steps: the step count a call uses when given none: the one this model samples best
            with (a training recipe measures it and saves it in the pipeline's config); ``None`` for the method's
            default.
    """

    model_cpu_offload_seq = "unet->vae"
    # scheduler: optional in the signature (the paper's by default), a component like any other when loading.
    _optional_components = ["vae", "scheduler"]
    _callback_tensor_inputs = ["latents", "degraded_latents"]
    scheduler_class: type[RestorationScheduler] = RestorationScheduler
    method_num_inference_steps = 20  # the method's default; a subclass sets its paper's

    def __init__(self, unet, scheduler: RestorationScheduler | None = None, vae=None, upscale_factor: int = 1,
                 default_num_inference_steps: int | None = None):
        super().__init__()
        if scheduler is None:  # the paper's process; a model trained on other settings needs its own scheduler
            scheduler = self.scheduler_class()
        if not isinstance(scheduler, self.scheduler_class):
            raise ValueError(f"{type(self).__name__} needs a {self.scheduler_class.__name__}, got "
                             f"{type(scheduler).__name__}")
        if isinstance(upscale_factor, bool) or not isinstance(upscale_factor, int) or upscale_factor < 1:
            raise ValueError(f"upscale_factor must be a positive integer, got {upscale_factor!r}")
        if default_num_inference_steps is not None and (isinstance(default_num_inference_steps, bool) or not isinstance(
                default_num_inference_steps, int) or default_num_inference_steps < 1):
            raise ValueError(f"default_num_inference_steps must be a positive integer or None, got "
                             f"{default_num_inference_steps!r}")
        self.register_modules(unet=unet, scheduler=scheduler, vae=vae)
        self.register_to_config(upscale_factor=upscale_factor, default_num_inference_steps=default_num_inference_steps)
        # No resizing: sizes the UNet cannot take are padded and cropped back (``_pad_to_multiple``).
        self.image_processor = VaeImageProcessor(do_resize=False, do_normalize=True)

    # Shapes the components fix -------------------------------------------------------------------------------
    @property
    def vae_scale_factor(self) -> int:
        vae = getattr(self, "vae", None)
        return 2 ** (len(vae.config.block_out_channels) - 1) if vae is not None else 1

    @property
    def image_channels(self) -> int:
        vae = getattr(self, "vae", None)
        return vae.config.in_channels if vae is not None else self.state_channels

    @property
    def state_channels(self) -> int:
        vae = getattr(self, "vae", None)
        return vae.config.latent_channels if vae is not None else self.unet.config.in_channels // 2

    @property
    def size_multiple(self) -> int:
        """Output sizes must be multiples of this: the UNet's total downsampling times the VAE's."""
        downsampling = 2 ** (len(self.unet.config.block_out_channels) - 1)
        return downsampling * self.vae_scale_factor

    def check_components(self) -> None:
        expected_in = 2 * self.state_channels
        expected_out = self.state_channels * self.scheduler.model_output_channels_factor
        if self.unet.config.in_channels != expected_in or self.unet.config.out_channels != expected_out:
            raise ValueError(
                f"the unet must take {expected_in} channels (state and degraded image) and return {expected_out} "
                f"(prediction_type={self.scheduler.config.prediction_type!r}); it has in_channels="
                f"{self.unet.config.in_channels}, out_channels={self.unet.config.out_channels}")

    # Input ------------------------------------------------------------------------------------------------------
    def preprocess(self, image: ImageInput) -> torch.Tensor:
        """PIL, numpy (H, W, C) in [0, 1] or torch (B, C, H, W) in [0, 1] to a (B, C, H, W) tensor in [-1, 1], with the
        checks a user needs to hear about."""
        images = _as_batch(image)
        if not images:
            raise ValueError("image is empty")
        channels = self.image_channels
        converted = []
        for item in images:
            if isinstance(item, PIL.Image.Image):
                item = item.convert("RGB" if channels == 3 else "L")
            elif isinstance(item, (np.ndarray, torch.Tensor)):
                found = _channel_count(item)
                if found != channels:
                    raise ValueError(f"the model restores {channels}-channel images; got an image of shape "
                                     f"{tuple(item.shape)} ({found} channels; numpy arrays are (H, W, C) or "
                                     f"(B, H, W, C), tensors (C, H, W) or (B, C, H, W))")
                values = item.detach().cpu().double() if isinstance(item, torch.Tensor) else torch.as_tensor(item)
                if not bool(torch.isfinite(values.double()).all()):
                    raise ValueError("the image contains NaN or infinite values")
                if isinstance(item, torch.Tensor) and item.ndim == 3:
                    item = item[None]
            else:
                raise ValueError(f"image must be a PIL image, a numpy array or a torch tensor, got {type(item)}")
            converted.append(item)
        tensors = [self.image_processor.preprocess(item) for item in converted]
        sizes = {tuple(t.shape[-2:]) for t in tensors}
        if len(sizes) > 1:
            raise ValueError(f"the images in a batch must share one size, got {sorted(sizes)}")
        return torch.cat(tensors)

    def _check_size(self, height: int, width: int, upscale_factor: int, output_size) -> tuple[int, int]:
        target = (height * upscale_factor, width * upscale_factor)
        if output_size is not None and tuple(output_size) != target:
            raise ValueError(f"a {height}x{width} input upscaled by {upscale_factor} is {target[0]}x{target[1]}, not "
                             f"the requested {tuple(output_size)}; pass upscale_factor="
                             f"{output_size[0] / height:g} or an input of size "
                             f"{output_size[0] / upscale_factor:g}x{output_size[1] / upscale_factor:g}")
        multiple = self.size_multiple
        if min(target) < multiple:
            raise ValueError(f"the image is too small for the model: the output would be {target[0]}x{target[1]}, "
                             f"the model needs at least {multiple}x{multiple}")
        return target

    # The loop ---------------------------------------------------------------------------------------------------
    @torch.no_grad()
    def __call__(
        self,
        image: ImageInput,
        num_inference_steps: int | None = None,
        upscale_factor: int | None = None,
        output_size: tuple[int, int] | None = None,
        generator: torch.Generator | list[torch.Generator] | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        callback_on_step_end: Callable[[DiffusionPipeline, int, torch.Tensor, dict], dict] | None = None,
        callback_on_step_end_tensor_inputs: list[str] | None = None,
    ) -> ImagePipelineOutput | tuple:
        """
        Args:
            image: the degraded image(s): PIL, numpy (H, W, C) in [0, 1], or torch (B, C, H, W) in [0, 1].
            num_inference_steps: the scheduler's steps; when omitted, ``config.default_num_inference_steps`` (the
                model's best, when its trainer recorded it), else the method's default.
            upscale_factor: bicubic upsampling of the input before restoration; the pipeline's ``upscale_factor``
                (4 for super-resolution models) when omitted.
            output_size: ``(height, width)`` the result must have; checked against the input and the factor.
            generator: for reproducible sampling.
            output_type: ``"pil"``, ``"np"``, ``"pt"`` or ``"latent"`` (the final state, before decoding).
            callback_on_step_end: ``callback(pipe, i, t, {name: tensor}) -> dict``; may replace ``latents``.
            callback_on_step_end_tensor_inputs: which of ``_callback_tensor_inputs`` the callback receives.

        Returns:
            ``ImagePipelineOutput(images=...)``, or ``(images,)`` when ``return_dict=False``.
        """
        if output_type not in OUTPUT_TYPES:
            raise ValueError(f"output_type must be one of {OUTPUT_TYPES}, got {output_type!r}")
        tensor_inputs = callback_on_step_end_tensor_inputs or ["latents"]
        unknown = set(tensor_inputs) - set(self._callback_tensor_inputs)
        if unknown:
            raise ValueError(f"callback_on_step_end_tensor_inputs may name {self._callback_tensor_inputs}, got "
                             f"{sorted(unknown)}")
        self.check_components()
        upscale_factor = self.config.upscale_factor if upscale_factor is None else upscale_factor
        if isinstance(upscale_factor, bool) or not isinstance(upscale_factor, int) or upscale_factor < 1:
            raise ValueError(f"upscale_factor must be a positive integer, got {upscale_factor!r}")

        degraded = self.preprocess(image)
        height, width = self._check_size(*degraded.shape[-2:], upscale_factor, output_size)
        device, dtype = self._execution_device, self.unet.dtype
        degraded = upscale_bicubic(degraded.to(device=device, dtype=torch.float32), upscale_factor)
        degraded = self._pad_to_multiple(degraded)
        degraded_latents = encode_to_latents(self.vae, degraded).to(dtype)

        if num_inference_steps is None:
            num_inference_steps = self.config.get("default_num_inference_steps") or self.method_num_inference_steps
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        latents = self.scheduler.initial_sample(degraded_latents, generator=generator)
        for i, t in enumerate(self.progress_bar(self.scheduler.timesteps)):
            model_input = torch.cat([self.scheduler.scale_model_input(latents, t), degraded_latents], dim=1)
            model_output = self.unet(model_input, t).sample
            latents = self.scheduler.step(model_output, t, latents, degraded_latents, generator=generator).prev_sample
            if callback_on_step_end is not None:
                available = {"latents": latents, "degraded_latents": degraded_latents}
                returned = callback_on_step_end(self, i, t, {name: available[name] for name in tensor_inputs})
                latents = returned.pop("latents", latents)

        if output_type == "latent":
            images = latents
        else:
            images = decode_latents(self.vae, latents)[..., :height, :width]
            images = self.image_processor.postprocess(images.float(), output_type=output_type)
        self.maybe_free_model_hooks()
        return ImagePipelineOutput(images=images) if return_dict else (images,)

    def _pad_to_multiple(self, images: torch.Tensor) -> torch.Tensor:
        """Reflect-pad on the bottom and right to the size the UNet (and VAE) can take; the result is cropped back."""
        multiple = self.size_multiple
        height, width = images.shape[-2:]
        pad_h, pad_w = -height % multiple, -width % multiple
        if pad_h == 0 and pad_w == 0:
            return images
        mode = "reflect" if pad_h < height and pad_w < width else "replicate"
        return torch.nn.functional.pad(images, (0, pad_w, 0, pad_h), mode=mode)
