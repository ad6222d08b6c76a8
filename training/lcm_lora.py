"""Latent consistency distillation into a LoRA adapter (LCM-LoRA), as a loss for the shared ``Trainer``.

Papers: *Latent Consistency Models: Synthesizing High-Resolution Images with Few-Step Inference* (Simian Luo, Yiqin
Tan, Longbo Huang, Jian Li, Hang Zhao; arXiv 2310.04378) and *LCM-LoRA: A Universal Stable-Diffusion Acceleration
Module* (Simian Luo, Yiqin Tan, Suraj Patil, Daniel Gu, Patrick von Platen, Apolinário Passos, Longbo Huang, Jian Li,
Hang Zhao; arXiv 2311.05556). The recipe follows diffusers' ``train_lcm_distill_lora_sd_wds.py``.

One UNet plays three parts: with its LoRA adapter disabled it is the frozen teacher, with the adapter on it is the
student, and the same student without gradient gives the target (LCM-LoRA keeps no EMA target network). With
``T = num_train_timesteps``, ``N = num_ddim_timesteps`` and the skipping step ``k = T / N``, one loss evaluation is

    tau_j = (j + 1) k - 1, j = 0..N-1                           (the DDIM solver's grid, LCMScheduler's too)
    j ~ U{0..N-1},  s = tau_j (t_{n+k}),  t = max(s - k, 0) (t_n)
    x_s = alpha_s x0 + sigma_s eps,  eps ~ N(0, I)              (x0: the batch's latents)
    w ~ U[w_min, w_max]                                         (diffusers' guidance scale; no w-embedding)
    teacher, adapter off:  x0_w = x0_u + w (x0_c - x0_u),  eps_w = eps_u + w (eps_c - eps_u)
                           (c: prompt, u: negative prompt; each from the UNet's prediction at (x_s, s))
    x_t = alpha_t x0_w + sigma_t eps_w                          (one DDIM / PF-ODE step, ``ddim_step`` with eta 0)
    f_theta(x, r) = c_skip(r) x + c_out(r) x0_theta(x, r)       (x0_theta: the student's prediction, prompt only)
    c_skip(r) = sigma_data^2 / ((q r)^2 + sigma_data^2),  c_out(r) = q r / sqrt((q r)^2 + sigma_data^2)
                                                                (q = timestep_scaling = 10, sigma_data = 0.5)
    loss = mean d(f_theta(x_s, s), stopgrad f_theta(x_t, t))
    d(a, b) = (a - b)^2  ("l2"),  or  sqrt((a - b)^2 + c^2) - c  ("huber", pseudo-Huber with c = huber_c)

(``alpha_t`` at ``t = 0`` is ``sqrt(alphas_cumprod[0])``, and ``c_skip(0) = 1, c_out(0) = 0``: the boundary condition
``f(x, 0) = x``.) The reference script writes its teacher as ``x0_c + w' (x0_c - x0_u)`` with ``w' ~ U[5, 15]``; that
is this ``w = w' + 1``, so its defaults are ``w_min = 6, w_max = 16`` here, and ``w`` here is the ``guidance_scale``
of the teacher pipeline the student imitates. The student bakes the guidance in: sample it with
``LCMScheduler`` (``original_inference_steps = num_ddim_timesteps``, ``timestep_scaling`` as here) at
``guidance_scale = 1`` in 1 to 8 steps, 4 typically (``lcm_lora_pipeline``, ``lcm_lora_sample``).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

import torch

from ..diffusion_math import (
    ddim_step,
    noise_path_from_scheduler_config,
    per_sample,
    vp_alpha_sigma,
    vp_alphas_cumprod,
    x0_and_eps_from_prediction,
)

# The reference script's LoRA targets (``diffusers-ext train lcm-lora``'s default ``lora_target_modules``; the
# TrainingConfig default wraps the attention alone).
from .config import LCM_LORA_TARGET_MODULES as LCM_LORA_TARGET_MODULES
from .lora import adapters_disabled, lora_base_model, sample_images
from .trainer import process_state

if TYPE_CHECKING:
    from PIL import Image

LOSS_TYPES = ("l2", "huber")
# LCMScheduler supports these three parameterisations, so a student trained on any other could not be sampled.
LCM_PREDICTION_TYPES = ("epsilon", "sample", "v_prediction")
TEACHER_USE = ("the lcm-lora method distils into a LoRA adapter of a diffusers model and uses the model without it as "
               "the teacher")


def lcm_boundary_scalings(timesteps: torch.Tensor, sigma_data: float = 0.5,
                          timestep_scaling: float = 10.0) -> tuple[torch.Tensor, torch.Tensor]:
    """``(c_skip, c_out)`` of LCM's consistency function at integer training timesteps, as
    ``LCMScheduler.get_scalings_for_boundary_condition_discrete`` computes them."""
    scaled = timestep_scaling * timesteps.to(torch.float64)
    c_skip = sigma_data**2 / (scaled**2 + sigma_data**2)
    c_out = scaled / (scaled**2 + sigma_data**2).sqrt()
    return c_skip, c_out


def ddim_solver_timesteps(num_train_timesteps: int, num_ddim_timesteps: int) -> torch.Tensor:
    """The grid ``tau_j = (j + 1) k - 1`` (``k = num_train_timesteps / num_ddim_timesteps``) that the distillation
    steps along and ``LCMScheduler`` samples on."""
    if not 1 <= num_ddim_timesteps <= num_train_timesteps or num_train_timesteps % num_ddim_timesteps:
        raise ValueError(f"num_ddim_timesteps must divide num_train_timesteps ({num_train_timesteps}), so that the "
                         f"solver grid ends at timestep {num_train_timesteps - 1} as LCMScheduler's does; got "
                         f"{num_ddim_timesteps}")
    skipping_step = num_train_timesteps // num_ddim_timesteps
    return torch.arange(1, num_ddim_timesteps + 1) * skipping_step - 1


def lcm_lora_pipeline(pipeline: Any, unet: torch.nn.Module | None = None, **lcm_options: Any) -> Any:
    """``pipeline``'s components (sharing their weights) with diffusers' ``LCMScheduler`` made from its scheduler's
    config (``lcm_options`` override it, e.g. ``original_inference_steps``), and with ``unet`` instead of its own
    if one is given: how an LCM-LoRA student is sampled (at ``guidance_scale=1``)."""
    from diffusers import LCMScheduler

    scheduler = LCMScheduler.from_config(pipeline.scheduler.config, **lcm_options)
    components = {"scheduler": scheduler} | ({"unet": unet} if unet is not None else {})
    lcm = type(pipeline).from_pipe(pipeline, **components)
    lcm.set_progress_bar_config(disable=True)
    return lcm


class LCMLoRADistillation:
    """Latent consistency distillation of a diffusers ``UNet2DConditionModel`` (epsilon, sample or v-prediction, VP
    noise schedule) into its LoRA adapter: train it with ``TrainingConfig(lora_rank=...)``. See the module docstring
    for the loss.

    Batches are dicts of ``latents`` (B, C, h, w) (already scaled by the VAE's ``scaling_factor``),
    ``prompt_embeds`` (B, L, D) and ``negative_prompt_embeds`` (B, L, D) (the unconditional embeddings of
    classifier-free guidance; not needed when ``w_min == w_max == 1``).

    Args:
        scheduler_config: the base model's noise scheduler config (its ``alphas_cumprod`` and ``prediction_type``).
        num_ddim_timesteps: ``N``, the teacher solver's number of steps over the ``num_train_timesteps``; it must
            divide them. Sample with ``LCMScheduler(original_inference_steps=N)`` (50, its default, here too).
        w_min, w_max: the teacher's guidance scale is drawn uniformly from ``[w_min, w_max]`` per sample (diffusers'
            convention: 1 is the conditional prediction alone); equal values fix it.
        loss_type: ``"l2"`` (the reference script's default) or ``"huber"`` (pseudo-Huber with ``huber_c``).
        sigma_data, timestep_scaling: the boundary-condition scalings; ``LCMScheduler`` uses 0.5 and its config's
            ``timestep_scaling`` (10), and sampling must match training.
        validation_pipeline, validation_prompt_embeds, validation_seeds, validation_steps: with a pipeline (for its
            VAE; its UNet is replaced by the one trained) and prompt embeddings (1, L, D), ``validate`` returns the
            student's images for these seeds, sampled with ``lcm_lora_pipeline`` at ``guidance_scale=1``.
    """

    name = "lcm-lora"

    def __init__(self, scheduler_config: Mapping[str, Any], *, num_ddim_timesteps: int = 50, w_min: float = 6.0,
                 w_max: float = 16.0, loss_type: str = "l2", huber_c: float = 0.001, sigma_data: float = 0.5,
                 timestep_scaling: float = 10.0, validation_pipeline: Any = None,
                 validation_prompt_embeds: torch.Tensor | None = None, validation_seeds: Sequence[int] = (0, 1, 2, 3),
                 validation_steps: int = 4):
        if noise_path_from_scheduler_config(scheduler_config) != "vp":
            raise ValueError("LCM distillation needs a VP (DDPM-family) noise schedule, as LCMScheduler samples one; "
                             f"got a flow-matching scheduler config ({scheduler_config.get('_class_name')})")
        self.prediction_type = scheduler_config.get("prediction_type", "epsilon")
        if self.prediction_type not in LCM_PREDICTION_TYPES:
            raise ValueError(f"prediction_type must be one of {LCM_PREDICTION_TYPES} (LCMScheduler's), got "
                             f"{self.prediction_type!r}")
        self.alphas_cumprod = vp_alphas_cumprod(scheduler_config)
        if self.prediction_type == "epsilon" and self.alphas_cumprod[-1] == 0:
            raise ValueError("an epsilon-prediction model on a zero-terminal-SNR schedule has no x0 estimate at the "
                             "last timestep; LCM distillation needs one")
        self.solver_timesteps = ddim_solver_timesteps(self.alphas_cumprod.numel(), num_ddim_timesteps)
        self.skipping_step = self.alphas_cumprod.numel() // num_ddim_timesteps
        if not 0 < w_min <= w_max:
            raise ValueError(f"the guidance range needs 0 < w_min <= w_max, got w_min={w_min}, w_max={w_max}")
        if loss_type not in LOSS_TYPES:
            raise ValueError(f"loss_type must be one of {LOSS_TYPES}, got {loss_type!r}")
        if not huber_c > 0:
            raise ValueError(f"huber_c must be positive, got {huber_c}")
        if not (sigma_data > 0 and timestep_scaling > 0):
            raise ValueError(f"sigma_data and timestep_scaling must be positive, got {sigma_data}, {timestep_scaling}")
        if (validation_pipeline is None) != (validation_prompt_embeds is None):
            raise ValueError("validation needs both validation_pipeline and validation_prompt_embeds (or neither)")
        if validation_prompt_embeds is not None and (validation_prompt_embeds.ndim != 3
                                                     or validation_prompt_embeds.shape[0] != 1):
            raise ValueError(f"validation_prompt_embeds must be one prompt's (1, L, D) embeddings, got shape "
                             f"{tuple(validation_prompt_embeds.shape)}")
        if validation_pipeline is not None and not validation_seeds:
            raise ValueError("validation_seeds must name at least one seed")
        self.num_ddim_timesteps, self.w_min, self.w_max = num_ddim_timesteps, float(w_min), float(w_max)
        self.loss_type, self.huber_c = loss_type, huber_c
        self.sigma_data, self.timestep_scaling = sigma_data, timestep_scaling
        self.validation_pipeline, self.validation_prompt_embeds = validation_pipeline, validation_prompt_embeds
        self.validation_seeds, self.validation_steps = tuple(validation_seeds), validation_steps

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor],
             generator: torch.Generator) -> torch.Tensor:
        unet = lora_base_model(model, TEACHER_USE)
        x0 = batch["latents"]
        prompt_embeds = batch["prompt_embeds"]
        size, device = x0.shape[0], x0.device
        guided = not self.w_min == self.w_max == 1
        if guided and "negative_prompt_embeds" not in batch:
            raise ValueError("a guided teacher (w_max > 1 or w_min < 1) needs the batch's negative_prompt_embeds")

        # Draws come from the trainer's CPU generator, so a run is reproducible on any device and resumes exactly.
        index = torch.randint(0, self.num_ddim_timesteps, (size,), generator=generator)
        start = self.solver_timesteps[index]
        end = (start - self.skipping_step).clamp(min=0)
        noise = torch.randn(x0.shape, generator=generator).to(device, x0.dtype)
        guidance = self.w_min + (self.w_max - self.w_min) * torch.rand(size, generator=generator)

        alpha_start, sigma_start = self._alpha_sigma(start, x0)
        alpha_end, sigma_end = self._alpha_sigma(end, x0)
        noisy = alpha_start * x0 + sigma_start * noise
        start, end = start.to(device), end.to(device)

        with torch.no_grad():
            with adapters_disabled(unet, TEACHER_USE) as base:
                if guided:
                    teacher = base(torch.cat([noisy, noisy]), torch.cat([start, start]),
                                   encoder_hidden_states=torch.cat([prompt_embeds, batch["negative_prompt_embeds"]])
                                   ).sample.to(x0.dtype)
                    conditional, unconditional = teacher.chunk(2)
                    w = per_sample(guidance, x0)
                    # x0 and eps are affine in the prediction and guidance is an affine combination (weights
                    # summing to 1), so guiding the prediction guides x0 and eps alike.
                    teacher = unconditional + w * (conditional - unconditional)
                else:
                    teacher = base(noisy, start, encoder_hidden_states=prompt_embeds).sample.to(x0.dtype)
            teacher_x0, teacher_eps = x0_and_eps_from_prediction(teacher, noisy, alpha_start, sigma_start,
                                                                 self.prediction_type)
            previous = ddim_step(teacher_x0, teacher_eps, alpha_start, sigma_start, alpha_end, sigma_end, eta=0)
            target = self._consistency_function(unet, previous, end, prompt_embeds, alpha_end, sigma_end)
        # The online student through ``model`` (the trainer's, possibly distributed, wrapper) so gradients sync.
        student = self._consistency_function(model, noisy, start, prompt_embeds, alpha_start, sigma_start)
        difference = student.float() - target.float()
        if self.loss_type == "l2":
            return difference.pow(2).mean()
        return ((difference.pow(2) + self.huber_c**2).sqrt() - self.huber_c).mean()

    def _alpha_sigma(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        alpha, sigma = vp_alpha_sigma(timesteps, self.alphas_cumprod)
        return per_sample(alpha, like), per_sample(sigma, like)

    def _consistency_function(self, unet: torch.nn.Module, sample: torch.Tensor, timesteps: torch.Tensor,
                              prompt_embeds: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """``f_theta(x, r) = c_skip(r) x + c_out(r) x0_theta(x, r)``."""
        prediction = unet(sample, timesteps, encoder_hidden_states=prompt_embeds).sample.to(sample.dtype)
        x0, _ = x0_and_eps_from_prediction(prediction, sample, alpha, sigma, self.prediction_type)
        c_skip, c_out = lcm_boundary_scalings(timesteps, self.sigma_data, self.timestep_scaling)
        c_skip, c_out = per_sample(c_skip, sample), per_sample(c_out, sample)
        return c_skip * sample + c_out * x0

    def validate(self, model: torch.nn.Module, step: int, folder: Any) -> list[Image.Image]:
        """The student's images for ``validation_seeds`` (``lcm_lora_sample``); the trainer saves them in
        ``folder``."""
        if self.validation_pipeline is None:
            raise ValueError("the lcm-lora method validates only with validation_pipeline and "
                             "validation_prompt_embeds")
        pipeline = lcm_lora_pipeline(self.validation_pipeline, unet=lora_base_model(model, TEACHER_USE),
                                     original_inference_steps=self.num_ddim_timesteps,
                                     timestep_scaling=self.timestep_scaling)
        return lcm_lora_sample(pipeline, self.validation_prompt_embeds, self.validation_seeds,
                               num_inference_steps=self.validation_steps)


def lcm_lora_sample(pipeline: Any, prompt_embeds: torch.Tensor, seeds: Sequence[int], num_inference_steps: int = 4,
                    output_type: str = "pil") -> Any:
    """One image per seed (each from its own ``torch.Generator().manual_seed(seed)``, ``lora.sample_images``) of one
    prompt at ``guidance_scale=1``, in one batch: ``validate``'s call, for reproducing it with a stock pipeline that
    ``load_lora_weights`` the saved adapter (and has ``LCMScheduler``)."""
    return sample_images(pipeline, prompt_embeds, seeds, output_type=output_type,
                         num_inference_steps=num_inference_steps, guidance_scale=1.0)


@torch.no_grad()
def teacher_samples(unet: torch.nn.Module, scheduler_config: Mapping[str, Any], prompt_embeds: torch.Tensor,
                    negative_prompt_embeds: torch.Tensor, *, count: int, latent_shape: Sequence[int],
                    guidance_scale: float, generator: torch.Generator, num_inference_steps: int = 50,
                    batch_size: int = 64) -> torch.Tensor:
    """``count`` latents sampled from ``unet`` (the base model) for one prompt (``(1, L, D)`` embeddings) by DDIM
    with classifier-free guidance, as ``StableDiffusionPipeline`` samples them: distillation data when no data the
    base model was trained on is at hand (a randomly initialised base models nothing but its own samples)."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_config(scheduler_config)
    scheduler.set_timesteps(num_inference_steps)
    device = next(unet.parameters()).device
    samples = []
    for noise in torch.randn(count, *latent_shape, generator=generator).split(batch_size):
        latents = noise.to(device) * scheduler.init_noise_sigma
        embeds = torch.cat([prompt_embeds.expand(len(noise), -1, -1),
                            negative_prompt_embeds.expand(len(noise), -1, -1)]).to(device)
        for t in scheduler.timesteps:
            conditional, unconditional = unet(torch.cat([latents, latents]), t,
                                              encoder_hidden_states=embeds).sample.chunk(2)
            guided = unconditional + guidance_scale * (conditional - unconditional)
            latents = scheduler.step(guided, t, latents).prev_sample
        samples.append(latents.cpu())
    return torch.cat(samples)


def toy_run(config: Any, args: Any = None) -> tuple[LCMLoRADistillation, torch.nn.Module, list[dict]]:
    """``diffusers-ext train lcm-lora``: LCM-LoRA on a tiny randomly initialised Stable Diffusion UNet (8x8 latents,
    SD 1.5's noise schedule; saved to ``output_dir/base_unet``, without which the adapter is useless), distilled on
    256 of its own 50-step samples at guidance scale 2 (a random teacher models no other data). It needs
    ``lora_rank``: the command's defaults (``training.cli.TRAINING_METHODS``) are rank 8 on the reference script's
    ``LCM_LORA_TARGET_MODULES``."""
    from pathlib import Path

    from diffusers import DDIMScheduler, UNet2DConditionModel

    torch.manual_seed(config.seed)
    unet = UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                layers_per_block=1, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=32,
                                attention_head_dim=4, norm_num_groups=4)
    if process_state().is_main_process:
        unet.save_pretrained(Path(config.output_dir) / "base_unet")
    scheduler = DDIMScheduler(beta_start=0.00085, beta_end=0.012, beta_schedule="scaled_linear", clip_sample=False,
                              set_alpha_to_one=False, steps_offset=1)
    generator = torch.Generator().manual_seed(config.seed)
    prompt = torch.randn(1, 4, 32, generator=generator)
    negative = torch.zeros_like(prompt)
    latents = teacher_samples(unet, scheduler.config, prompt, negative, count=256, latent_shape=(4, 8, 8),
                              guidance_scale=2.0, generator=generator)
    dataset = [{"latents": x0, "prompt_embeds": prompt[0], "negative_prompt_embeds": negative[0]} for x0 in latents]
    return LCMLoRADistillation(scheduler.config, w_min=2.0, w_max=2.0), unet.train(), dataset
