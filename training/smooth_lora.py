"""Smooth-LoRA: a LoRA fine-tune of a text-to-image UNet with the step-wise variation regularisation, and the
interpolation standard deviation (ISTD) that measures how smooth the resulting latent space is.

Paper: "Smooth Diffusion: Crafting Smooth Latent Spaces in Diffusion Models", Jiayi Guo, Xingqian Xu, Yifan Pu,
Zanlin Ni, Chaofei Wang, Manushree Vasu, Shiji Song, Gao Huang, Humphrey Shi (CVPR 2024, arXiv 2312.04410); the
official code is github.com/SHI-Labs/Smooth-Diffusion (``train_smooth_diffusion.py``), whose loss this follows.

Training (one step, per sample ``i`` of a batch of latents ``x0`` with prompt embeddings ``c``):

    t ~ U{0, ..., T - 1},  eps ~ N(0, I),  x_t = alpha_t x0 + sigma_t eps
    L_denoise   = mean || f_theta(x_t, t, c) - target(x0, eps, t) ||^2          (the usual LoRA loss; target = eps
                                                                                 for epsilon prediction)
    x0_hat(eps) = (x_t - sigma_t eps_theta(x_t, t, c)) / alpha_t                 (the one-step x0 prediction, read
                                                                                 through ``x0_and_eps_from_prediction``)
    y           = sigma_t u / sqrt(D),   u ~ N(0, I),  D = C H W                  (a random output direction)
    g_i         = J_i^T y_i = d <x0_hat_i, y_i> / d eps_i,   J = d x0_hat / d eps  (double back-propagation)
    v_i         = || g_i ||_2                                                     (the step's variation ratio)
    a          <- a + beta (mean_i v_i - a)                                       (running target, a = 0 at start)
    L_reg       = mean_i (v_i - a)^2
    L           = L_denoise + lambda L_reg

Because ``E_u ||J^T u||^2 = ||J||_F^2``, ``v_i`` estimates ``sigma_t sqrt(||J||_F^2 / D)``: the root-mean-square of
``||Delta x0_hat|| / ||Delta eps||`` over directions of a small input variation ``Delta eps``, weighted by
``sigma_t``. Pulling it towards one shared running value ``a`` makes that ratio the same constant for every sample,
timestep and direction: the "single-step snapshot" of the paper's constraint that the output's variation be
proportional to the input latent's. The official defaults: ``lambda = 1`` (``--lambda_reg``), ``beta = 0.01``, LoRA
rank 8, learning rate 1e-4; like the official code, the penalty uses the freshly updated ``a`` (so ``beta`` of its
gradient flows through the batch mean), and ``a`` is shared state of the objective (``state_dict``).

ISTD: slerp two initial noises ``z_a, z_b`` at ``N`` evenly spaced weights, generate ``N`` images ``I_k`` from them
with the same prompt, and take the standard deviation of the ``N - 1`` distances ``d(I_k, I_{k+1})`` between
neighbours: a smooth latent space moves by even steps along the path. The paper's ``d`` is LPIPS, whose network
weights cannot be fetched offline; the default here is the root-mean-square pixel difference
(``pixel_rms_distance``), and any ``distance`` callable (LPIPS included) can be passed instead.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from accelerate.utils import extract_model_from_parallel
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils.data import Dataset

from ..diffusion_math import (
    alpha_sigma_function,
    default_prediction_type,
    noise_path_from_scheduler_config,
    per_sample,
    prediction_from_x0_and_eps,
    x0_and_eps_from_prediction,
)
from .lora import unet_swapped

Distance = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# Below this angle between the two noises slerp is numerically lerp; the official interpolation code's threshold.
SLERP_DOT_THRESHOLD = 0.9995
# The pipeline arguments interpolation_images sets itself.
RESERVED_PIPELINE_ARGUMENTS = ("prompt_embeds", "latents", "num_images_per_prompt", "output_type", "return_dict")
# Stable Diffusion's noise schedule (DDPMScheduler / DDIMScheduler arguments): the one the paper fine-tunes under.
STABLE_DIFFUSION_SCHEDULE = {"beta_schedule": "scaled_linear", "beta_start": 0.00085, "beta_end": 0.012}
TOY_LATENT_SHAPE, TOY_TEXT_SHAPE = (4, 8, 8), (4, 32)


class SmoothLoRAObjective:
    """The Smooth Diffusion loss for the shared ``Trainer``: ``L_denoise + lambda * L_reg`` (see the module
    docstring) on batches ``{"latents": x0 (B, C, H, W), "prompt_embeds": c (B, L, E)}`` of precomputed VAE latents
    and text embeddings. ``regularization_weight=0`` is plain LoRA fine-tuning (and skips the double backward).

    Args:
        scheduler: the model's training scheduler (a VP one, e.g. ``DDPMScheduler``): its schedule gives
            ``alpha_t, sigma_t`` and its ``prediction_type`` the network's target.
        regularization_weight: ``lambda``, >= 0.
        variation_decay: ``beta``, the running target's update rate, in (0, 1].
        validation: what ``validate`` measures (``ISTDValidation``); ``None`` for a run without validation.

    ``state_dict()`` holds the running target ``a``; ``last_terms`` the last call's denoising loss, regulariser,
    mean variation and ``a`` before its update, for logging.
    """

    name = "smooth-lora"

    def __init__(self, scheduler: Any, regularization_weight: float = 1.0, variation_decay: float = 0.01,
                 validation: ISTDValidation | None = None):
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping) or noise_path_from_scheduler_config(config) != "vp":
            raise ValueError(f"Smooth-LoRA needs a VP (DDPM-family) training scheduler, got {type(scheduler).__name__}")
        if not regularization_weight >= 0:
            raise ValueError(f"regularization_weight (lambda) must be >= 0, got {regularization_weight!r}")
        if not 0 < variation_decay <= 1:
            raise ValueError(f"variation_decay must lie in (0, 1], got {variation_decay!r}")
        self.num_train_timesteps = int(config["num_train_timesteps"])
        self.alpha_sigma = alpha_sigma_function(config)
        self.prediction_type = default_prediction_type(config)
        self.regularization_weight, self.variation_decay = float(regularization_weight), float(variation_decay)
        self.validation = validation
        self.variation_mean = torch.zeros(())  # a
        self.last_terms: dict[str, float] = {}

    def state_dict(self) -> dict[str, torch.Tensor]:
        return {"variation_mean": self.variation_mean.clone()}

    def load_state_dict(self, state: Mapping[str, torch.Tensor]) -> None:
        self.variation_mean = state["variation_mean"].detach().clone()

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], generator: torch.Generator
             ) -> torch.Tensor:
        latents, prompt_embeds = batch["latents"], batch["prompt_embeds"]
        device, dtype = latents.device, latents.dtype
        batch_size = latents.shape[0]
        timesteps = torch.randint(0, self.num_train_timesteps, (batch_size,), generator=generator).to(device)
        noise = torch.randn(latents.shape, generator=generator, dtype=dtype).to(device)
        regularize = self.regularization_weight > 0
        if regularize and getattr(extract_model_from_parallel(model), "is_gradient_checkpointing", False):
            # The recomputation in the trainer's backward would run outside the math-attention context below.
            raise ValueError("the step-wise variation regulariser (regularization_weight > 0) does not support "
                             "gradient_checkpointing: turn it off")
        noise.requires_grad_(regularize)
        alpha, sigma = (per_sample(s, latents, torch.float32) for s in self.alpha_sigma(timesteps.cpu()))
        noisy = (alpha * latents.float() + sigma * noise.float()).to(dtype)
        # PyTorch's fused attention kernels have no double backward; the math kernel computes the same function.
        with sdpa_kernel(SDPBackend.MATH) if regularize else nullcontext():
            prediction = model(noisy, timesteps, encoder_hidden_states=prompt_embeds).sample.float()
        target = prediction_from_x0_and_eps(latents.float(), noise.detach().float(), alpha, sigma,
                                            self.prediction_type)
        denoising_loss = torch.nn.functional.mse_loss(prediction, target)
        self.last_terms = {"denoising_loss": float(denoising_loss.detach())}
        if not regularize:
            return denoising_loss
        x0_prediction, _ = x0_and_eps_from_prediction(prediction, noisy.float(), alpha, sigma, self.prediction_type)
        sample_size = math.prod(latents.shape[1:])
        direction = torch.randn(latents.shape, generator=generator).to(device) * sigma / math.sqrt(sample_size)
        (vector_jacobian,) = torch.autograd.grad((x0_prediction * direction).sum(), noise, create_graph=True)
        variations = vector_jacobian.float().flatten(1).norm(dim=1)
        previous = self.variation_mean.to(device)
        updated = previous + self.variation_decay * (variations.mean() - previous)
        regularization = (variations - updated).pow(2).mean()
        self.variation_mean = updated.detach().cpu()
        self.last_terms |= {"regularization": float(regularization.detach()),
                            "variation": float(variations.mean().detach()), "variation_mean": float(previous)}
        return denoising_loss + self.regularization_weight * regularization

    def validate(self, model: torch.nn.Module, step: int, output_dir: Path) -> dict[str, float]:
        if self.validation is None:
            raise ValueError("this SmoothLoRAObjective was built without validation=ISTDValidation(...)")
        return self.validation(model)


@dataclass
class ISTDValidation:
    """The mean ISTD over fixed noise pairs, and the mean distance between neighbouring images, with the trained UNet
    swapped into ``pipeline`` (put back afterwards).

    Attributes:
        pipeline: a text-to-image pipeline with a deterministic sampler (DDIM, ``eta = 0``), on the model's device.
        prompt_embeds: one prompt's embeddings, ``(1, L, E)``.
        noise_pairs: the held-out ``(noise_a, noise_b)`` pairs, each ``(C, H, W)`` or ``(1, C, H, W)``.
        num_points: images along each path.
        pipeline_kwargs: further pipeline arguments (``num_inference_steps``, ``guidance_scale``,
            ``negative_prompt_embeds``, ``height``, ``width``, ...).
    """

    pipeline: Any
    prompt_embeds: torch.Tensor
    noise_pairs: Sequence[tuple[torch.Tensor, torch.Tensor]]
    num_points: int = 7
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.noise_pairs:
            raise ValueError("ISTDValidation needs at least one noise pair")
        _check_num_points(self.num_points)

    def __call__(self, unet: torch.nn.Module) -> dict[str, float]:
        with unet_swapped(self.pipeline, unet) as pipeline:
            distances = [interpolation_distances(pipeline, self.prompt_embeds, a, b, self.num_points,
                                                 **self.pipeline_kwargs) for a, b in self.noise_pairs]
        # The mean step tells a smoother path from one that merely moves less.
        return {"istd": sum(float(d.std(correction=0)) for d in distances) / len(distances),
                "mean_distance": sum(float(d.mean()) for d in distances) / len(distances)}


def _check_num_points(num_points: int) -> None:
    if isinstance(num_points, bool) or not isinstance(num_points, int) or num_points < 3:
        raise ValueError(f"num_points must be an integer >= 3 (a standard deviation needs at least two distances "
                         f"between neighbours), got {num_points!r}")


def slerp(noise_a: torch.Tensor, noise_b: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Spherical interpolation ``(sin((1 - w) theta) z_a + sin(w theta) z_b) / sin(theta)``, ``theta`` the angle
    between the flattened noises, for each weight ``w``: shape ``(len(weights), *noise_a.shape)``. Nearly parallel
    noises (``cos theta > 0.9995``) are interpolated linearly, as in the official code."""
    if noise_a.shape != noise_b.shape:
        raise ValueError(f"the two noises must have the same shape, got {tuple(noise_a.shape)} and "
                         f"{tuple(noise_b.shape)}")
    a, b = noise_a.double().flatten(), noise_b.double().flatten()
    w = weights.double().to(a.device).view(-1, 1)
    cosine = torch.dot(a / a.norm(), b / b.norm())
    if cosine.abs() > SLERP_DOT_THRESHOLD:
        mixed = (1 - w) * a + w * b
    else:
        theta = torch.arccos(cosine)
        mixed = (torch.sin((1 - w) * theta) * a + torch.sin(w * theta) * b) / torch.sin(theta)
    return mixed.view(len(weights), *noise_a.shape).to(noise_a.dtype)


def pixel_rms_distance(images_a: torch.Tensor, images_b: torch.Tensor) -> torch.Tensor:
    """``sqrt(mean (I_a - I_b)^2)`` per image, shape ``(N,)``: the offline stand-in for LPIPS."""
    return (images_a.float() - images_b.float()).flatten(1).pow(2).mean(dim=1).sqrt()


def interpolation_images(pipe: Any, prompt_embeds: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
                         num_points: int, *, batch_size: int | None = None, **pipeline_kwargs: Any) -> torch.Tensor:
    """The ``num_points`` images ``pipe`` generates from ``slerp(noise_a, noise_b, linspace(0, 1, num_points))``
    with one prompt, ``(num_points, 3, H, W)`` in ``[0, 1]``; ``batch_size`` images per pipeline call (``None``:
    all at once). See ``interpolation_std`` for the arguments."""
    _check_num_points(num_points)
    if noise_a.shape != noise_b.shape:
        raise ValueError(f"noise_a and noise_b must have the same shape, got {tuple(noise_a.shape)} and "
                         f"{tuple(noise_b.shape)}")
    if noise_a.dim() == 4 and noise_a.shape[0] == 1:
        noise_a, noise_b = noise_a[0], noise_b[0]
    if noise_a.dim() != 3:
        raise ValueError(f"each noise must be one initial latent, (C, H, W) or (1, C, H, W), got "
                         f"{tuple(noise_a.shape)}")
    if prompt_embeds.dim() != 3 or prompt_embeds.shape[0] != 1:
        raise ValueError(f"prompt_embeds must be one prompt's embeddings, (1, L, E), got {tuple(prompt_embeds.shape)}")
    reserved = sorted(set(pipeline_kwargs) & set(RESERVED_PIPELINE_ARGUMENTS))
    if reserved:
        raise ValueError(f"interpolation_images sets {reserved} itself; do not pass them")
    if batch_size is not None and batch_size < 1:
        raise ValueError(f"batch_size must be a positive integer (or None), got {batch_size!r}")
    latents = slerp(noise_a, noise_b, torch.linspace(0, 1, num_points))
    chunk = batch_size or num_points
    images = [pipe(prompt_embeds=prompt_embeds, latents=part, num_images_per_prompt=len(part), output_type="pt",
                   **pipeline_kwargs).images for part in latents.split(chunk)]
    return torch.cat(images)


def interpolation_std(pipe: Any, prompt_embeds: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
                      num_points: int, *, distance: Distance = pixel_rms_distance, batch_size: int | None = None,
                      **pipeline_kwargs: Any) -> float:
    """ISTD of one noise pair: the (population) standard deviation of ``distance(I_k, I_{k+1})``, ``k = 0 ...
    num_points - 2``, over the images ``I_k`` of ``interpolation_images``. Lower is smoother; the paper averages it
    over many prompts and pairs.

    Args:
        pipe: a text-to-image pipeline taking ``prompt_embeds``, ``latents``, ``num_images_per_prompt`` and
            ``output_type="pt"`` (Stable Diffusion's and its relatives'); its sampler should be deterministic
            (DDIM, as the paper uses), or the path measures sampling noise too.
        prompt_embeds: one prompt's embeddings, ``(1, L, E)``.
        noise_a, noise_b: the two initial latents ``x_T``, same shape, ``(C, H, W)`` or ``(1, C, H, W)``.
        num_points: images along the path, >= 3.
        distance: ``distance(images_a, images_b) -> (N,)`` on images in ``[0, 1]``; ``pixel_rms_distance`` by
            default (the paper's is LPIPS).
        batch_size: images per pipeline call (``None``: all at once).
        pipeline_kwargs: the pipeline's other arguments (``num_inference_steps``, ``guidance_scale``,
            ``negative_prompt_embeds``, ``height``, ``width``, ...).
    """
    distances = interpolation_distances(pipe, prompt_embeds, noise_a, noise_b, num_points, distance=distance,
                                        batch_size=batch_size, **pipeline_kwargs)
    return float(distances.std(correction=0))


def interpolation_distances(pipe: Any, prompt_embeds: torch.Tensor, noise_a: torch.Tensor, noise_b: torch.Tensor,
                            num_points: int, *, distance: Distance = pixel_rms_distance, batch_size: int | None = None,
                            **pipeline_kwargs: Any) -> torch.Tensor:
    """The ``num_points - 1`` distances ``distance(I_k, I_{k+1})`` between neighbouring images of
    ``interpolation_images``, float64; ``interpolation_std`` is their standard deviation."""
    images = interpolation_images(pipe, prompt_embeds, noise_a, noise_b, num_points, batch_size=batch_size,
                                  **pipeline_kwargs)
    return distance(images[:-1], images[1:]).double()


class PrototypeLatents(Dataset):
    """A toy text-to-image data set of precomputed latents: ``num_prompts`` prompt embeddings, each with
    ``prototypes_per_prompt`` fixed latent prototypes, items ``prototype + jitter * noise``. A multimodal law, so
    that a denoiser fitted to it maps the noise space onto a few modes with sharp borders between them: the
    non-smoothness Smooth Diffusion targets."""

    def __init__(self, size: int, latent_shape: Sequence[int], text_shape: Sequence[int], num_prompts: int = 2,
                 prototypes_per_prompt: int = 2, jitter: float = 0.1, seed: int = 0):
        generator = torch.Generator().manual_seed(seed)
        self.prompt_embeds = torch.randn(num_prompts, *text_shape, generator=generator)
        self.prototypes = torch.randn(num_prompts, prototypes_per_prompt, *latent_shape, generator=generator)
        prompts = torch.randint(0, num_prompts, (size,), generator=generator)
        modes = torch.randint(0, prototypes_per_prompt, (size,), generator=generator)
        jitters = jitter * torch.randn(size, *latent_shape, generator=generator)
        self.items = [{"latents": self.prototypes[p, m] + j, "prompt_embeds": self.prompt_embeds[p]}
                      for p, m, j in zip(prompts.tolist(), modes.tolist(), jitters, strict=True)]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return self.items[index]


def toy_unet(seed: int = 0) -> Any:
    """A tiny random ``UNet2DConditionModel`` (4 x 8 x 8 latents, 32-wide text embeddings, one cross-attention
    level), the same for the same ``seed``: the base model of ``toy_run``."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=TOY_LATENT_SHAPE[-1],
        in_channels=TOY_LATENT_SHAPE[0], out_channels=TOY_LATENT_SHAPE[0],
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
        cross_attention_dim=TOY_TEXT_SHAPE[-1], attention_head_dim=4, norm_num_groups=4,
    )


def toy_run(config: Any, args: Any = None) -> tuple[SmoothLoRAObjective, torch.nn.Module, Dataset]:
    """``diffusers-ext train smooth-lora``: the Smooth Diffusion loss (``lambda = 1``, ``beta = 0.01``, Stable
    Diffusion's noise schedule) on ``toy_unet(config.seed)`` over 512 ``PrototypeLatents`` items (2 prompts x 2
    prototypes). The command trains a LoRA of the official rank 8 by default (``training.cli.TRAINING_METHODS``);
    with ``lora_rank`` unset it trains the whole toy UNet."""
    from diffusers import DDPMScheduler

    dataset = PrototypeLatents(512, TOY_LATENT_SHAPE, TOY_TEXT_SHAPE, seed=config.seed)
    method = SmoothLoRAObjective(DDPMScheduler(**STABLE_DIFFUSION_SCHEDULE))
    return method, toy_unet(config.seed).train(), dataset
