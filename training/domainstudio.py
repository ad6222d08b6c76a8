"""DomainStudio: few-shot fine-tuning of a text-to-image UNet that keeps the relative distances between adapted
samples and learns high-frequency details, so that the adapted model does not collapse onto the few training images.

Paper: "DomainStudio: Fine-Tuning Diffusion Models for Domain-Driven Image Generation using Limited Data", Jingyuan
Zhu, Huimin Ma, Jiansheng Chen, Jian Yuan (arXiv 2306.14153); official code github.com/bbzhu-jy16/DomainStudio
(``Text-to-Image/train_domainstudio.py``, a DreamBooth script with the extra terms), whose defaults this follows.

One step on a batch of few-shot latents ``x0`` (B, C, H, W) with the target prompt ``c_tar`` ("a [V] dog") and, for
prior preservation, source-domain latents ``x0_pr`` with the source prompt ``c_sou`` ("a dog"):

    t ~ U{0, ..., T - 1} per sample,  eps ~ N(0, I),  x_t = alpha_t x0 + sigma_t eps
    L_simple = mean || f_ada(x_t, t, c_tar) - target(x0, eps, t) ||^2            (target = eps for epsilon models)
    L_pr     = the same on (x0_pr, c_sou)                                          (DreamBooth's prior preservation)

    s ~ U{0, ..., T - 1} shared by the batch,  z_s = alpha_s x0 + sigma_s eps'    (one noisy batch for both models)
    y_ada    = x0_hat(f_ada(z_s, s, c_tar)),   y_sou = x0_hat(f_sou(z_s, s, c_sou))  (one-step denoised predictions;
                                                                                  f_sou is the frozen source model)
    p_i(y)   = softmax_j ( cos(y_i, y_j) ),  j != i                                (each sample's similarity law)
    KLrel(a, b) = mean_{i, j != i} p_ij(b) (log p_ij(b) - log p_ij(a))            (KL(p(b) || p(a)), averaged over
                                                                                  the B (B - 1) entries)
    L_rd     = KLrel(y_ada, y_sou)                                                 (relative distances)
    hf(y)    = LH(y) + HL(y) + HH(y)                                               (one-level orthonormal Haar)
    L_hf     = KLrel(hf(y_ada), hf(y_sou))                                         (relative distances of details)
    L_hfmse  = mean || hf(y_ada) - hf(x0) ||^2                                     (details of the training data)

    L = L_simple + lambda_pr L_pr + lambda_rd L_rd + lambda_hf L_hf + lambda_hfmse L_hfmse

The official defaults: ``lambda_pr = 1``, ``lambda_rd = 100``, ``lambda_hf = 100``, ``lambda_hfmse = 0.1``. With
``lambda_rd = lambda_hf = lambda_hfmse = 0`` the objective is plain (DreamBooth) fine-tuning. The official script
decodes ``y`` and ``x0`` through the VAE and applies the three terms to images; pass ``vae=`` for that, or leave it
``None`` to apply them to the latents themselves (cheaper; the Haar transform needs an even latent size either way).

Where this differs from the official script: ``y_sou`` comes from the frozen source model under ``c_sou`` on the
same noisy batch as ``y_ada``, as the paper's relative-distance loss compares source and adapted samples (the script
compares the adapted model's own predictions of the prior images instead, and loads a source UNet it never calls); ``L_hfmse`` compares each
prediction with its own training latent (the script draws a second, unrelated batch); and ``vae=`` divides by the
VAE's ``scaling_factor`` before decoding (the script decodes the scaled latents). The paper evaluates diversity with
intra-cluster LPIPS, whose network weights cannot be fetched offline; ``pairwise_diversity`` is the mean pairwise
root-mean-square distance instead.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple

import torch
import torch.nn.functional as F
from torch.utils.data import Dataset

from ..diffusion_math import (
    alpha_sigma_function,
    default_prediction_type,
    noise_path_from_scheduler_config,
    per_sample,
    prediction_from_x0_and_eps,
    x0_and_eps_from_prediction,
)
from .lora import adapters_disabled, sample_images, unet_swapped
from .smooth_lora import STABLE_DIFFUSION_SCHEDULE, TOY_LATENT_SHAPE, TOY_TEXT_SHAPE, pixel_rms_distance, toy_unet

SOURCE_MODEL_USE = ("the relative-distance terms need the frozen source model: with a LoRA adapter it is the model "
                    "with the adapter turned off, and full fine-tuning must pass source_model= a frozen copy of the "
                    "model")
# The official script's weights (--prior_loss_weight, --image_loss_weight, --hf_loss_weight, --hfmse_loss_weight).
DEFAULT_WEIGHTS = {"prior_weight": 1.0, "relative_distance_weight": 100.0, "hf_relative_distance_weight": 100.0,
                   "hf_mse_weight": 0.1}


class NoisyBatch(NamedTuple):
    """One noised batch: ``x0``, its prompt embeddings, ``t``, ``eps``, ``x_t = alpha_t x0 + sigma_t eps``,
    ``alpha_t`` and ``sigma_t`` (broadcastable to ``x0``)."""

    latents: torch.Tensor
    prompt_embeds: torch.Tensor
    timesteps: torch.Tensor
    noise: torch.Tensor
    noisy: torch.Tensor
    alpha: torch.Tensor
    sigma: torch.Tensor


def haar_decomposition(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """One level of the orthonormal 2-D Haar transform of ``x`` (..., H, W), H and W even: ``(LL, LH, HL, HH)``,
    each (..., H / 2, W / 2). On each 2 x 2 block ``[[a, b], [c, d]]``: ``LL = (a + b + c + d) / 2``,
    ``LH = (-a + b - c + d) / 2``, ``HL = (-a - b + c + d) / 2``, ``HH = (a - b - c + d) / 2`` (the official
    code's filters)."""
    if x.dim() < 2 or x.shape[-1] % 2 or x.shape[-2] % 2:
        raise ValueError(f"the Haar transform needs an even height and width, got shape {tuple(x.shape)}")
    a, b = x[..., 0::2, 0::2], x[..., 0::2, 1::2]
    c, d = x[..., 1::2, 0::2], x[..., 1::2, 1::2]
    return (a + b + c + d) / 2, (-a + b - c + d) / 2, (-a - b + c + d) / 2, (a - b - c + d) / 2


def high_frequency(x: torch.Tensor) -> torch.Tensor:
    """``LH + HL + HH`` of ``haar_decomposition``: the paper's high-frequency component."""
    _, lh, hl, hh = haar_decomposition(x)
    return lh + hl + hh


def similarity_log_distributions(samples: torch.Tensor) -> torch.Tensor:
    """``log p_i``, (B, B - 1): row ``i`` is the log-softmax over ``j != i`` (in order) of the cosine similarity
    between the flattened samples ``i`` and ``j``."""
    if samples.shape[0] < 2:
        raise ValueError(f"pairwise similarities need a batch of at least 2 samples, got {samples.shape[0]}")
    flat = samples.flatten(1).float()
    cosine = F.cosine_similarity(flat[:, None], flat[None, :], dim=-1)
    size = flat.shape[0]
    off_diagonal = cosine[~torch.eye(size, dtype=torch.bool, device=cosine.device)].view(size, size - 1)
    return off_diagonal.log_softmax(dim=1)


def relative_distance_loss(adapted: torch.Tensor, source: torch.Tensor) -> torch.Tensor:
    """``KL(p(source) || p(adapted))`` of ``similarity_log_distributions``, averaged over the B (B - 1) entries (torch's
    ``KLDivLoss`` "mean" reduction, as the official code, so that its weights apply). ``source`` carries no
    gradient of interest: the adapted samples move to match the source's relative distances."""
    if adapted.shape != source.shape:
        raise ValueError(f"adapted and source samples must have the same shape, got {tuple(adapted.shape)} and "
                         f"{tuple(source.shape)}")
    log_adapted, log_source = similarity_log_distributions(adapted), similarity_log_distributions(source)
    return (log_source.exp() * (log_source - log_adapted)).mean()


class DomainStudioObjective:
    """The DomainStudio loss for the shared ``Trainer`` (see the module docstring) on batches
    ``{"latents": x0, "prompt_embeds": c_tar, "class_latents": x0_pr, "class_prompt_embeds": c_sou}`` of
    precomputed VAE latents (B, C, H, W) and text embeddings (B, L, E); ``class_latents`` is needed only with
    ``prior_weight > 0``, ``class_prompt_embeds`` with it or with a relative-distance term.

    Args:
        scheduler: the model's training scheduler (a VP one, e.g. ``DDPMScheduler``).
        prior_weight, relative_distance_weight, hf_relative_distance_weight, hf_mse_weight: ``lambda_pr``,
            ``lambda_rd``, ``lambda_hf``, ``lambda_hfmse`` (>= 0; 0 turns a term off).
        source_model: the frozen source UNet ``f_sou``. ``None`` (for a LoRA run) uses the trained model with its
            adapters disabled; full fine-tuning must pass a frozen copy of the model before training.
        vae: apply the relative-distance and high-frequency terms to ``vae.decode(y / scaling_factor)`` (the
            official script's pixel space); ``None``: to the latents. ``source_model`` and ``vae`` may be built on
            the CPU: the first batch moves them to its device.

    The trained model's predictions for all terms (instance, prior, and ``y_ada``'s) come from one forward pass on
    the concatenated inputs, as DreamBooth's script batches instance and prior images.
        validation: what ``validate`` generates (``DomainStudioValidation``); ``None`` for a run without validation.

    ``last_terms`` holds the last call's terms, for logging.
    """

    name = "domainstudio"

    def __init__(self, scheduler: Any, *, prior_weight: float = DEFAULT_WEIGHTS["prior_weight"],
                 relative_distance_weight: float = DEFAULT_WEIGHTS["relative_distance_weight"],
                 hf_relative_distance_weight: float = DEFAULT_WEIGHTS["hf_relative_distance_weight"],
                 hf_mse_weight: float = DEFAULT_WEIGHTS["hf_mse_weight"], source_model: torch.nn.Module | None = None,
                 vae: torch.nn.Module | None = None, validation: DomainStudioValidation | None = None):
        config = getattr(scheduler, "config", None)
        if not isinstance(config, Mapping) or noise_path_from_scheduler_config(config) != "vp":
            raise ValueError(f"DomainStudio needs a VP (DDPM-family) training scheduler, got {type(scheduler).__name__}")
        weights = {"prior_weight": prior_weight, "relative_distance_weight": relative_distance_weight,
                   "hf_relative_distance_weight": hf_relative_distance_weight, "hf_mse_weight": hf_mse_weight}
        for weight_name, value in weights.items():
            if isinstance(value, bool) or not isinstance(value, int | float) or not value >= 0:
                raise ValueError(f"{weight_name} must be a number >= 0 (0 turns the term off), got {value!r}")
        self.prior_weight, self.relative_distance_weight = float(prior_weight), float(relative_distance_weight)
        self.hf_relative_distance_weight, self.hf_mse_weight = float(hf_relative_distance_weight), float(hf_mse_weight)
        self.num_train_timesteps = int(config["num_train_timesteps"])
        self.alpha_sigma = alpha_sigma_function(config)
        self.prediction_type = default_prediction_type(config)
        self.source_model = source_model.eval().requires_grad_(False) if source_model is not None else None
        self.vae = vae.eval().requires_grad_(False) if vae is not None else None
        self.validation = validation
        self.last_terms: dict[str, float] = {}

    def _coefficients(self, timesteps: torch.Tensor, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return tuple(per_sample(s, like, torch.float32) for s in self.alpha_sigma(timesteps.cpu()))

    def _noised(self, latents: torch.Tensor, prompt_embeds: torch.Tensor, timesteps: torch.Tensor,
                generator: torch.Generator) -> NoisyBatch:
        noise = torch.randn(latents.shape, generator=generator).to(latents.device, torch.float32)
        alpha, sigma = self._coefficients(timesteps, latents)
        noisy = (alpha * latents.float() + sigma * noise).to(latents.dtype)
        return NoisyBatch(latents, prompt_embeds, timesteps.to(latents.device), noise, noisy, alpha, sigma)

    def _frozen_models_to(self, device: torch.device) -> None:
        """Put the source model and the VAE on the batch's device: they are built on the CPU, and the trainer moves
        only the trained model (a no-op after the first step)."""
        for frozen in (self.source_model, self.vae):
            if frozen is not None and next(frozen.parameters()).device != device:
                frozen.to(device)

    def _x0(self, prediction: torch.Tensor, noisy: NoisyBatch) -> torch.Tensor:
        x0, _ = x0_and_eps_from_prediction(prediction.float(), noisy.noisy.float(), noisy.alpha, noisy.sigma,
                                           self.prediction_type)
        return x0

    def _source_denoised(self, model: torch.nn.Module, noisy: NoisyBatch, source_embeds: torch.Tensor
                         ) -> torch.Tensor:
        if self.source_model is not None:
            prediction = self.source_model(noisy.noisy, noisy.timesteps, encoder_hidden_states=source_embeds).sample
            return self._x0(prediction, noisy)
        with adapters_disabled(model, SOURCE_MODEL_USE) as source:
            prediction = source(noisy.noisy, noisy.timesteps, encoder_hidden_states=source_embeds).sample
        return self._x0(prediction, noisy)

    def _view(self, latents: torch.Tensor) -> torch.Tensor:
        """What the relative-distance and high-frequency terms compare: the latents, or their VAE decoding."""
        if self.vae is None:
            return latents
        return self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor).sample.float()

    def _check_batch(self, batch: Mapping[str, torch.Tensor], pairwise: bool) -> None:
        for key, needed in (("class_latents", self.prior_weight > 0),
                            ("class_prompt_embeds", self.prior_weight > 0 or pairwise)):
            if needed and key not in batch:
                raise ValueError(f"the batch has no {key!r}, which prior_weight > 0 or a relative-distance term needs; "
                                 f"set that weight to 0 or add it to the data set (keys: {sorted(batch)})")
        if pairwise and batch["latents"].shape[0] < 2:
            raise ValueError(f"the relative-distance terms compare samples pairwise: batch_size must be >= 2, got "
                             f"{batch['latents'].shape[0]}")
        if self.prior_weight > 0 and batch["class_prompt_embeds"].shape[1:] != batch["prompt_embeds"].shape[1:]:
            raise ValueError("the instance and prior predictions run in one forward pass: prompt_embeds and "
                             f"class_prompt_embeds need one (L, E) shape, got {tuple(batch['prompt_embeds'].shape)} "
                             f"and {tuple(batch['class_prompt_embeds'].shape)}")

    def loss(self, model: torch.nn.Module, batch: Mapping[str, torch.Tensor], generator: torch.Generator
             ) -> torch.Tensor:
        latents, prompt_embeds = batch["latents"], batch["prompt_embeds"]
        pairwise = self.relative_distance_weight > 0 or self.hf_relative_distance_weight > 0
        self._check_batch(batch, pairwise)
        self._frozen_models_to(latents.device)
        size = latents.shape[0]
        # Random draws, in order: instance timesteps and noise, prior ones, the shared timestep and its noise.
        parts = {"denoising_loss": self._noised(latents, prompt_embeds, self._timesteps(size, generator), generator)}
        if self.prior_weight > 0:
            class_latents = batch["class_latents"]
            parts["prior_loss"] = self._noised(class_latents, batch["class_prompt_embeds"],
                                               self._timesteps(class_latents.shape[0], generator), generator)
        if pairwise or self.hf_mse_weight > 0:
            shared = torch.randint(0, self.num_train_timesteps, (1,), generator=generator).expand(size)
            parts["shared"] = self._noised(latents, prompt_embeds, shared, generator)
        # One forward pass of the trained model for every term, as DreamBooth's script batches instance and prior
        # images: one pass through the distributed wrapper per step.
        predictions = dict(zip(parts, model(
            torch.cat([p.noisy for p in parts.values()]), torch.cat([p.timesteps for p in parts.values()]),
            encoder_hidden_states=torch.cat([p.prompt_embeds for p in parts.values()]),
        ).sample.float().split([p.noisy.shape[0] for p in parts.values()]), strict=True))

        loss, self.last_terms = 0.0, {}
        for name, weight in (("denoising_loss", 1.0), ("prior_loss", self.prior_weight)):
            if name in parts:
                noisy = parts[name]
                target = prediction_from_x0_and_eps(noisy.latents.float(), noisy.noise, noisy.alpha, noisy.sigma,
                                                    self.prediction_type)
                term = F.mse_loss(predictions[name], target)
                loss = loss + weight * term
                self.last_terms[name] = float(term.detach())
        if "shared" not in parts:
            return loss

        adapted = self._view(self._x0(predictions["shared"], parts["shared"]))
        adapted_details = high_frequency(adapted)
        if pairwise:
            with torch.no_grad():  # the VAE decoding of the source too
                source = self._view(self._source_denoised(model, parts["shared"], batch["class_prompt_embeds"]))
            relative = relative_distance_loss(adapted, source)
            details = relative_distance_loss(adapted_details, high_frequency(source))
            loss = loss + self.relative_distance_weight * relative + self.hf_relative_distance_weight * details
            self.last_terms |= {"relative_distance": float(relative.detach()),
                                "hf_relative_distance": float(details.detach())}
        if self.hf_mse_weight > 0:
            with torch.no_grad():
                data_details = high_frequency(self._view(latents.float()))
            hf_mse = F.mse_loss(adapted_details, data_details)
            loss = loss + self.hf_mse_weight * hf_mse
            self.last_terms["hf_mse"] = float(hf_mse.detach())
        return loss

    def _timesteps(self, size: int, generator: torch.Generator) -> torch.Tensor:
        return torch.randint(0, self.num_train_timesteps, (size,), generator=generator)

    def validate(self, model: torch.nn.Module, step: int, output_dir: Path) -> list[Any]:
        if self.validation is None:
            raise ValueError("this DomainStudioObjective was built without validation=DomainStudioValidation(...)")
        return self.validation(model)


def pairwise_diversity(images: torch.Tensor) -> float:
    """The mean over pairs ``i < j`` of ``sqrt(mean (I_i - I_j)^2)`` (``smooth_lora.pixel_rms_distance``, in float64):
    intra-set diversity (the offline stand-in for the paper's intra-cluster LPIPS)."""
    if images.shape[0] < 2:
        raise ValueError(f"pairwise diversity needs at least 2 images, got {images.shape[0]}")
    first, second = torch.triu_indices(len(images), len(images), offset=1)
    return float(pixel_rms_distance(images[first].double(), images[second].double()).mean())


@dataclass
class DomainStudioValidation:
    """Images from fixed seeds with the trained UNet swapped into ``pipeline`` (put back afterwards).

    Attributes:
        pipeline: a text-to-image pipeline with a deterministic sampler (DDIM), on the model's device.
        prompt_embeds: the target prompt's embeddings, (1, L, E).
        seeds: one image per seed.
        pipeline_kwargs: further pipeline arguments (``num_inference_steps``, ``guidance_scale``, ...).
    """

    pipeline: Any
    prompt_embeds: torch.Tensor
    seeds: Sequence[int] = (0, 1, 2, 3)
    pipeline_kwargs: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self):
        if not self.seeds:
            raise ValueError("DomainStudioValidation needs at least one seed")

    def __call__(self, unet: torch.nn.Module) -> list[Any]:
        with unet_swapped(self.pipeline, unet) as pipeline:
            return sample_images(pipeline, self.prompt_embeds, self.seeds, output_type="pil", **self.pipeline_kwargs)


class FewShotDomainLatents(Dataset):
    """A toy few-shot domain of precomputed latents: ``num_shots`` target latents ``prototype + jitter * noise``
    (a narrow domain with one prompt, ``c_tar``), each item paired, DreamBooth-style, with one of ``num_class``
    standard-normal source-domain latents under the source prompt ``c_sou`` (the diverse prior a pretrained model
    would sample). Its length is ``max(num_shots, num_class)``; target latents repeat."""

    def __init__(self, target_prompt_embeds: torch.Tensor, source_prompt_embeds: torch.Tensor, *, num_shots: int = 4,
                 num_class: int = 8, latent_shape: Sequence[int] = TOY_LATENT_SHAPE, jitter: float = 0.1,
                 seed: int = 0):
        if num_shots < 1 or num_class < 1:
            raise ValueError(f"num_shots and num_class must be positive, got {num_shots} and {num_class}")
        generator = torch.Generator().manual_seed(seed)
        prototype = torch.randn(*latent_shape, generator=generator)
        self.latents = prototype + jitter * torch.randn(num_shots, *latent_shape, generator=generator)
        self.class_latents = torch.randn(num_class, *latent_shape, generator=generator)
        self.target_prompt_embeds, self.source_prompt_embeds = target_prompt_embeds.detach(), source_prompt_embeds.detach()

    def __len__(self) -> int:
        return max(len(self.latents), len(self.class_latents))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {"latents": self.latents[index % len(self.latents)], "prompt_embeds": self.target_prompt_embeds,
                "class_latents": self.class_latents[index % len(self.class_latents)],
                "class_prompt_embeds": self.source_prompt_embeds}


def toy_run(config: Any, args: Any = None) -> tuple[DomainStudioObjective, torch.nn.Module, Dataset]:
    """``diffusers-ext train domainstudio``: the DomainStudio loss (official weights, Stable Diffusion's noise
    schedule, terms on latents) on ``toy_unet(config.seed)`` over a ``FewShotDomainLatents`` set (4 shots, 8
    source latents, random prompt embeddings). With ``lora_rank`` set the source model is the UNet with adapters
    disabled; without it (full fine-tuning, as the paper) a frozen copy of the initial UNet."""
    from diffusers import DDPMScheduler

    generator = torch.Generator().manual_seed(config.seed)
    target_embeds, source_embeds = torch.randn(2, *TOY_TEXT_SHAPE, generator=generator)
    dataset = FewShotDomainLatents(target_embeds, source_embeds, seed=config.seed)
    unet = toy_unet(config.seed).train()
    source = None if config.lora_rank is not None else copy.deepcopy(unet)
    method = DomainStudioObjective(DDPMScheduler(**STABLE_DIFFUSION_SCHEDULE), source_model=source)
    return method, unet, dataset
