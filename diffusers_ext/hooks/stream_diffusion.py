"""StreamDiffusion: stream batch, residual classifier-free guidance and the stochastic similarity filter, for img2img
streams on a stock Stable Diffusion pipeline."""

from __future__ import annotations

import copy
from typing import Any

import torch
from diffusers import LCMScheduler, UNet2DConditionModel
from diffusers.configuration_utils import register_to_config
from diffusers.pipelines.stable_diffusion.pipeline_stable_diffusion_img2img import retrieve_latents
from diffusers.utils.torch_utils import randn_tensor

from ..diffusion_math import (
    alpha_sigma_function,
    default_prediction_type,
    noise_path_from_scheduler_config,
    per_sample,
    prediction_from_x0_and_eps,
    vp_alpha_sigma,
    x0_and_eps_from_prediction,
)
from ..guidance.steering import check_positive_int
from .base import SpeedHook, check_fraction

GUIDANCE_TYPES = ("none", "full", "self", "initialize")


def skip_probability(similarity: float, threshold: float) -> float:
    """The stochastic similarity filter's chance of skipping a frame: ``max(0, 1 - (1 - s) / (1 - threshold))`` for
    cosine similarity ``s`` to the last processed frame (0 when ``threshold >= 1``)."""
    if threshold >= 1:
        return 0.0
    return max(0.0, 1.0 - (1.0 - similarity) / (1.0 - threshold))


def img2img_timesteps(scheduler: Any, num_inference_steps: int, strength: float) -> torch.Tensor:
    """The timesteps a stock img2img pipeline denoises at: the last ``int(num_inference_steps * strength)`` of the
    scheduler's schedule (``StableDiffusionImg2ImgPipeline.get_timesteps``)."""
    scheduler.set_timesteps(num_inference_steps)
    count = min(int(num_inference_steps * strength), num_inference_steps)
    start = max(num_inference_steps - count, 0)
    return scheduler.timesteps[start * scheduler.order:]


class StreamPipeline(SpeedHook):
    r"""Real-time img2img streams on a stock Stable Diffusion 1.x / 2.x pipeline (text-to-image or img2img: it uses
    their UNet, VAE, text encoder and image processor, and changes none of them).

    Paper: *StreamDiffusion: A Pipeline-level Solution for Real-time Interactive Generation*, Kodaira et al.,
    arXiv 2312.12491.

    ``stream = StreamPipeline(...).attach(pipe); stream.prepare(prompt); out = stream(frame)`` per frame. With ``n``
    denoising steps (the img2img steps of ``num_inference_steps`` and ``strength``, timesteps ``t_0 > ... > t_{n-1}``):

    - **Stream batch**: the UNet sees one batch holding the newest frame at ``t_0`` and the ``n - 1`` earlier frames
      one step further each; every call advances all of them one step and the frame leaving the last slot is decoded.
      One UNet call of batch ``n`` per frame instead of ``n`` calls; each frame comes out ``n - 1`` calls after it
      went in (the first frame fills the empty slots, noised straight to their levels).
    - **Residual CFG** (``guidance``): ``"full"`` is classifier-free guidance with a negative prompt (batch ``2n``);
      ``"self"`` (self-negative) takes as negative the *virtual residual noise* that leads back to the input frame's
      latent ``z``, ``eps_bar = (x_t - alpha_t z) / sigma_t``, with no extra UNet work; ``"initialize"``
      (one-time negative) computes the negative-prompt prediction once, at the frame's first step, and uses
      ``eps_bar`` toward its x0 estimate ``z_neg`` afterwards (batch ``n + 1``). Then, with ``delta`` the paper's
      magnitude moderation and ``gamma = guidance_scale``,

          eps_cfg = delta * eps_bar + gamma * (eps_cond - delta * eps_bar)

      ``"none"`` uses the conditional prediction alone.
    - **Stochastic similarity filter** (``similarity_threshold``): a frame whose cosine similarity ``s`` to the last
      processed input is high is skipped (the last output is returned, nothing runs) with probability
      ``max(0, 1 - (1 - s) / (1 - threshold))``, at most ``max_skipped_frames`` times in a row.

    Steps: with ``LCMScheduler`` (LCM-LoRA, our LCM trainer's output) the consistency step ``denoised = c_out x0 +
    c_skip x_t``, re-noised to the next level with a noise fixed per slot (the stream's temporal consistency), the
    last slot's ``denoised`` being the output; with any other VP scheduler, DDIM's deterministic step with DDIM's
    own next-timestep rule. The slot noises are ``n`` draws of ``randn_tensor`` from ``torch.Generator().manual_seed(
    seed)``: those a stock img2img call makes with that generator when given the frame's latents as ``image``, so
    for a still frame and ``guidance`` ``"none"`` / ``"full"`` the stream's output is the stock img2img output.
    Frames are encoded with the VAE posterior's mode.

    Args:
        num_inference_steps, strength: as in the img2img pipeline; ``n = int(num_inference_steps * strength)``.
        guidance: one of ``"none"``, ``"full"``, ``"self"``, ``"initialize"``.
        guidance_scale: ``gamma``; ``<= 1`` turns guidance off.
        delta: the residual noise's weight.
        similarity_threshold: ``None`` (no filter) or a cosine similarity in ``[0, 1]``.
        max_skipped_frames: consecutive frames the filter may skip.
        seed: for the slot noises and the filter's draws.
    """

    @register_to_config
    def __init__(self, *, num_inference_steps: int = 4, strength: float = 0.5, guidance: str = "self",
                 guidance_scale: float = 1.2, delta: float = 1.0, similarity_threshold: float | None = None,
                 max_skipped_frames: int = 10, seed: int = 0):
        super().__init__()
        check_positive_int(num_inference_steps, "num_inference_steps")
        check_fraction(strength, "strength", include_zero=False)
        if int(num_inference_steps * strength) < 1:
            raise ValueError(f"num_inference_steps * strength must be at least 1 step, got {num_inference_steps} * "
                             f"{strength}")
        if guidance not in GUIDANCE_TYPES:
            raise ValueError(f"guidance must be one of {GUIDANCE_TYPES}, got {guidance!r}")
        for name, value in (("guidance_scale", guidance_scale), ("delta", delta)):
            if isinstance(value, bool) or not isinstance(value, int | float):
                raise ValueError(f"{name} must be a number, got {value!r}")
        if similarity_threshold is not None:
            check_fraction(similarity_threshold, "similarity_threshold")
        if isinstance(max_skipped_frames, bool) or not isinstance(max_skipped_frames, int) or max_skipped_frames < 0:
            raise ValueError(f"max_skipped_frames must be a non-negative integer, got {max_skipped_frames!r}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an integer, got {seed!r}")
        self.prompt_embeds = None
        self.unet_calls = 0
        self.skipped_frames = 0

    @property
    def guided(self) -> bool:
        return self.config.guidance != "none" and self.config.guidance_scale > 1

    # Attaching ------------------------------------------------------------------------------------------------------

    def _install(self, pipeline: Any) -> None:
        name = type(self).__name__
        unet = getattr(pipeline, "unet", None)
        if not isinstance(unet, UNet2DConditionModel) or unet.config.addition_embed_type is not None:
            raise ValueError(f"{name} supports Stable Diffusion 1.x / 2.x pipelines (a UNet2DConditionModel without "
                             f"added conditioning, as StableDiffusionPipeline / StableDiffusionImg2ImgPipeline have); "
                             f"got {type(pipeline).__name__}")
        missing = [a for a in ("vae", "scheduler", "encode_prompt", "image_processor") if getattr(pipeline, a, None)
                   is None]
        if missing:
            raise ValueError(f"{name} needs the pipeline's {missing}; {type(pipeline).__name__} has none")
        scheduler = copy.deepcopy(pipeline.scheduler)  # the pipeline's own scheduler is left alone
        if noise_path_from_scheduler_config(scheduler.config) != "vp" or float(scheduler.init_noise_sigma) != 1.0:
            raise ValueError(f"{name} needs a VP scheduler on the unit sample scale (DDIM, LCM, DDPM, DPM-Solver, ...);"
                             f" got {type(scheduler).__name__}")
        self.is_lcm = isinstance(scheduler, LCMScheduler)
        self.scheduler = scheduler
        self.timesteps = img2img_timesteps(scheduler, self.config.num_inference_steps, self.config.strength)
        alpha_sigma = alpha_sigma_function(scheduler.config)
        self.levels = alpha_sigma(self.timesteps.cpu())
        self.next_levels = self._next_levels()
        self.prediction_type = default_prediction_type(scheduler.config)
        self._on_detach(self._clear)
        self._clear()

    def _next_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha, sigma)`` each slot steps to: LCM's next timestep in the list (the last slot's output is its
        ``denoised``); DDIM's ``t - num_train_timesteps // num_inference_steps``, or its final level."""
        if self.is_lcm:
            alpha, sigma = self.levels
            return torch.cat([alpha[1:], torch.ones(1, dtype=alpha.dtype)]), torch.cat([sigma[1:], sigma.new_zeros(1)])
        scheduler = self.scheduler
        step = scheduler.config.num_train_timesteps // scheduler.num_inference_steps
        previous = self.timesteps.cpu() - step
        final = torch.as_tensor(getattr(scheduler, "final_alpha_cumprod", scheduler.alphas_cumprod[0]),
                                dtype=torch.float64)
        alpha, sigma = vp_alpha_sigma(previous.clamp(min=0), scheduler.alphas_cumprod)
        before_start = previous < 0
        alpha = torch.where(before_start, final.sqrt(), alpha)
        sigma = torch.where(before_start, (1 - final).sqrt(), sigma)
        return alpha, sigma

    def _clear(self) -> None:
        self.slots = None  # (latents, input latents, negative x0 estimates) of the n - 1 frames in flight
        self.noise = None
        self.reference_input = None
        self.last_output = None
        self.consecutive_skips = 0
        self.generator = torch.Generator().manual_seed(self.config.seed + 1)  # the filter's draws

    # Per stream ---------------------------------------------------------------------------------------------------

    @torch.no_grad()
    def prepare(self, prompt: str | None = None, negative_prompt: str | None = None,
                prompt_embeds: torch.Tensor | None = None, negative_prompt_embeds: torch.Tensor | None = None) -> None:
        """Encode the prompt once for the whole stream (a negative prompt is used by ``"full"`` and
        ``"initialize"`` guidance; empty by default) and empty the stream."""
        if self.pipeline is None:
            raise ValueError("attach the StreamPipeline to a pipeline before prepare(...)")
        pipe = self.pipeline
        needs_negative = self.guided and self.config.guidance in ("full", "initialize")
        positive, negative = pipe.encode_prompt(
            prompt, pipe._execution_device, 1, needs_negative, negative_prompt if needs_negative else None,
            prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
        )
        if positive.shape[0] != 1:
            raise ValueError(f"a stream takes one prompt, got {positive.shape[0]}")
        self.prompt_embeds, self.negative_prompt_embeds = positive, negative
        self._clear()

    def _encode(self, image: Any) -> tuple[torch.Tensor, torch.Tensor]:
        """The preprocessed frame (for the filter) and its scaled latents (4-channel input is taken as latents, as in
        img2img)."""
        pipe = self.pipeline
        vae = pipe.vae
        pixels = pipe.image_processor.preprocess(image).to(device=pipe._execution_device, dtype=vae.dtype)
        if pixels.shape[0] != 1:
            raise ValueError(f"a stream takes one frame per call, got a batch of {pixels.shape[0]}")
        if pixels.shape[1] == pipe.unet.config.in_channels:
            return pixels, pixels
        latents = retrieve_latents(vae.encode(pixels), sample_mode="argmax") * vae.config.scaling_factor
        return pixels, latents

    def _skip(self, pixels: torch.Tensor) -> bool:
        threshold = self.config.similarity_threshold
        if threshold is None or self.reference_input is None or self.last_output is None:
            return False
        if self.consecutive_skips >= self.config.max_skipped_frames:
            return False
        similarity = torch.nn.functional.cosine_similarity(self.reference_input.flatten().double(),
                                                           pixels.flatten().double(), dim=0, eps=1e-6)
        draw = torch.rand((), generator=self.generator).item()
        return draw < skip_probability(float(similarity), threshold)

    @torch.no_grad()
    def __call__(self, image: Any, output_type: str = "pil") -> Any:
        """Feed one frame (PIL image, array or tensor as the img2img pipeline takes them, or 4-channel latents);
        returns the frame that leaves the stream, post-processed like the pipeline's output (``"pil"``, ``"np"``,
        ``"pt"`` or ``"latent"``)."""
        if self.pipeline is None or self.prompt_embeds is None:
            raise ValueError("attach the StreamPipeline and call prepare(prompt) before feeding frames")
        pixels, latents = self._encode(image)
        if self._skip(pixels):
            self.skipped_frames += 1
            self.consecutive_skips += 1
            return self._postprocess(self.last_output, output_type)
        self.consecutive_skips = 0
        self.reference_input = pixels
        output = self._advance(latents)
        self.last_output = output
        return self._postprocess(output, output_type)

    def _slot_levels(self, like: torch.Tensor):
        return [per_sample(v, like) for v in (*self.levels, *self.next_levels)]

    def _advance(self, latents: torch.Tensor) -> torch.Tensor:
        """One stream step: the new frame enters slot 0, every slot advances, the last slot's result is returned."""
        pipe, count = self.pipeline, len(self.timesteps)
        unet = pipe.unet
        if self.noise is None or self.noise.shape[1:] != latents.shape[1:]:
            generator = torch.Generator().manual_seed(self.config.seed)
            self.noise = torch.cat([randn_tensor(tuple(latents.shape), generator=generator, device=latents.device,
                                                 dtype=latents.dtype) for _ in range(count)])
            self.slots = None
        alpha, sigma, alpha_next, sigma_next = self._slot_levels(self.noise)
        if self.slots is None:  # the first frame fills the slots, noised straight to their levels
            inputs = latents.expand(count, -1, -1, -1)
            self.slots = (alpha[1:] * inputs[1:] + sigma[1:] * self.noise[1:], inputs[1:], inputs[1:])
        noisy = torch.cat([alpha[:1] * latents + sigma[:1] * self.noise[:1], self.slots[0]])
        inputs = torch.cat([latents, self.slots[1]])
        timesteps = self.timesteps.to(latents.device)

        guidance = self.config.guidance if self.guided else "none"
        embeds = self.prompt_embeds.expand(count, -1, -1)
        model_input, model_timesteps = noisy, timesteps
        if guidance == "full":
            embeds = torch.cat([self.negative_prompt_embeds.expand(count, -1, -1), embeds])
            model_input, model_timesteps = torch.cat([noisy, noisy]), torch.cat([timesteps, timesteps])
        elif guidance == "initialize":
            embeds = torch.cat([self.negative_prompt_embeds, embeds])
            model_input, model_timesteps = torch.cat([noisy[:1], noisy]), torch.cat([timesteps[:1], timesteps])
        prediction = unet(model_input.to(unet.dtype), model_timesteps, encoder_hidden_states=embeds.to(unet.dtype),
                          return_dict=False)[0].to(noisy.dtype)
        self.unet_calls += 1

        negative_x0 = torch.cat([latents, self.slots[2]])
        if guidance == "full":
            negative, prediction = prediction.chunk(2)
        elif guidance == "initialize":
            first_negative, prediction = prediction[:1], prediction[1:]
            negative_x0[:1] = x0_and_eps_from_prediction(first_negative, noisy[:1], alpha[:1], sigma[:1],
                                                         self.prediction_type)[0]
        if guidance in ("self", "initialize"):
            # The virtual residual noise toward the negative x0 (the input frame, or the negative prompt's estimate),
            # weighted by delta, as the prediction it stands for.
            residual = self.config.delta * (noisy - alpha * (inputs if guidance == "self" else negative_x0)) / sigma
            x0_of_residual = x0_and_eps_from_prediction(residual, noisy, alpha, sigma, "epsilon")[0]
            negative = prediction_from_x0_and_eps(x0_of_residual, residual, alpha, sigma, self.prediction_type)
        if guidance != "none":
            prediction = negative + self.config.guidance_scale * (prediction - negative)

        x0, eps = x0_and_eps_from_prediction(prediction, noisy, alpha, sigma, self.prediction_type)
        if self.is_lcm:
            c_skip, c_out = zip(*(self.scheduler.get_scalings_for_boundary_condition_discrete(t) for t in timesteps),
                                strict=True)
            denoised = per_sample(torch.stack(c_out), x0) * x0 + per_sample(torch.stack(c_skip), x0) * noisy
            advanced = alpha_next * denoised + sigma_next * torch.cat([self.noise[1:], self.noise[:1]])
            output = denoised[-1:]
        else:
            advanced = alpha_next * x0 + sigma_next * eps
            output = advanced[-1:]
        self.slots = (advanced[:-1], inputs[:-1], negative_x0[:-1])
        return output

    def _postprocess(self, latents: torch.Tensor, output_type: str) -> Any:
        pipe = self.pipeline
        if output_type == "latent":
            return latents
        vae = pipe.vae
        image = vae.decode(latents.to(vae.dtype) / vae.config.scaling_factor, return_dict=False)[0]
        return pipe.image_processor.postprocess(image, output_type=output_type)
