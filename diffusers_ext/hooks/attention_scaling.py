"""Attention entropy scaling for sampling at resolutions other than the training one."""

from __future__ import annotations

import math
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel, UNet2DConditionModel, UNet2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import AttnProcessor2_0, JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..guidance.steering import check_positive_int
from .attention import flux_attention, joint_attention, self_attention
from .base import CallbackHook, SpeedHook, check_denoiser_type, pipeline_denoiser
from .module_reuse import denoiser_sample


def entropy_logit_scale(num_keys: float, num_keys_at_training: float) -> float | None:
    """``sqrt(log N / log N_train)``: the factor on attention logits that keeps the attention entropy of ``N`` keys at
    its value for the ``N_train`` keys seen in training; ``None`` when they are equal (no change)."""
    if num_keys == num_keys_at_training or num_keys < 2 or num_keys_at_training < 2:
        return None
    return math.sqrt(math.log(num_keys) / math.log(num_keys_at_training))


class AttentionEntropyScaling(SpeedHook):
    r"""Training-free adaptation to other image sizes: the self-attention logits are scaled so that the attention
    entropy stays what it was at the training resolution (UNet self-attention, SD3 joint attention, Flux attention).

    Paper: *Training-free Diffusion Model Adaptation for Variable-Sized Text-to-Image Synthesis*, Jin et al.,
    arXiv 2306.08645.

    The entropy of attention over ``N`` keys grows like ``log N``; at a resolution with ``N`` image tokens instead of
    the ``N_train`` of training (per layer: ``N_train = N * A_train / A`` for latent areas ``A``), the logits are
    multiplied by ``lambda = sqrt(log N / log N_train)``:

        Attention(Q, K, V) = softmax(lambda Q K^T / sqrt(d)) V

    Text tokens in joint attention (SD3, Flux) count in both ``N`` and ``N_train``. At the training size
    ``lambda = 1`` and the stock processor's output is returned bit for bit. (diffusers' Lumina processor applies the
    same rule internally; this makes it available to UNet, SD3 and Flux pipelines.) Cross-attention, whose keys are
    text tokens, is unchanged. This is not a speed-up: it serves sampling below or above the training size, the
    cheap (small) or the large side of the speed trade.

    Args:
        train_latent_size: the training latent side (64 for SD 1.5, 96 for SD 2 768-v, 128 for SDXL, SD3 and Flux at
            1024 px); default: the denoiser config's ``sample_size`` (Flux's config has none: pass it).
    """

    @register_to_config
    def __init__(self, *, train_latent_size: int | None = None):
        super().__init__()
        if train_latent_size is not None:
            check_positive_int(train_latent_size, "train_latent_size")
        self.area_ratio = 1.0  # training latent area / this call's
        self.text_length = 0

    def _install(self, pipeline: Any) -> None:
        name = type(self).__name__
        _, model = pipeline_denoiser(pipeline, name)
        check_denoiser_type(model, (UNet2DConditionModel, UNet2DModel, SD3Transformer2DModel, FluxTransformer2DModel),
                            name)
        size = self.config.train_latent_size or getattr(model.config, "sample_size", None)
        if size is None:
            raise ValueError(f"{type(model).__name__}'s config has no sample_size; pass train_latent_size (the latent "
                             "side at the training resolution, 128 for FLUX.1 at 1024 px)")
        side = size if isinstance(size, int) else None
        train_area = side * side if side is not None else size[0] * size[1]
        is_flux = isinstance(model, FluxTransformer2DModel)

        def measure(module, *args, **kwargs):
            sample = denoiser_sample(args, kwargs)
            # Flux's input is packed: one token per 2 x 2 latent pixels.
            area = sample.shape[1] * 4 if is_flux else sample.shape[-2] * sample.shape[-1]
            self.area_ratio = train_area / area
            encoder_hidden_states = kwargs.get("encoder_hidden_states")
            self.text_length = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 0
            return args, kwargs

        stock, make = {
            UNet2DConditionModel: (AttnProcessor2_0, self._unet_processor),
            UNet2DModel: (AttnProcessor2_0, self._unet_processor),
            SD3Transformer2DModel: (JointAttnProcessor2_0, self._joint_processor),
            FluxTransformer2DModel: (FluxAttnProcessor, self._flux_processor),
        }[type(model)]
        self._register_hook(model, CallbackHook(pre_forward=measure))
        selected = {}
        for module_name, attention in model.named_modules():
            if not hasattr(attention, "set_processor") or getattr(attention, "is_cross_attention", False):
                continue
            if type(attention.get_processor()) is not stock:
                raise ValueError(f"{name} replaces the stock {stock.__name__}; {module_name} uses "
                                 f"{type(attention.get_processor()).__name__}")
            selected[module_name] = attention
        for module_name, attention in selected.items():
            single_stream = is_flux and module_name.startswith("single_transformer_blocks")
            self._set_processor(attention, make(attention.get_processor(), single_stream))

    def logit_scale(self, image_tokens: int, text_tokens: int = 0) -> float | None:
        return entropy_logit_scale(image_tokens + text_tokens, image_tokens * self.area_ratio + text_tokens)

    def _unet_processor(self, original: Any, single_stream: bool):
        hook = self

        class EntropyScaledAttnProcessor:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None):
                tokens = hidden_states.shape[1] if hidden_states.ndim == 3 else math.prod(hidden_states.shape[2:])
                return self_attention(attn, hidden_states, encoder_hidden_states, attention_mask, temb,
                                      logit_scale=hook.logit_scale(tokens))

        return EntropyScaledAttnProcessor()

    def _joint_processor(self, original: Any, single_stream: bool):
        hook = self

        class EntropyScaledJointAttnProcessor:
            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
                return joint_attention(attn, hidden_states, encoder_hidden_states,
                                       logit_scale=hook.logit_scale(hidden_states.shape[1], text))

        return EntropyScaledJointAttnProcessor()

    def _flux_processor(self, original: Any, single_stream: bool):
        hook = self

        class EntropyScaledFluxAttnProcessor:
            _attention_backend = getattr(original, "_attention_backend", None)
            _parallel_config = getattr(original, "_parallel_config", None)

            def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         image_rotary_emb=None):
                if single_stream:
                    text = hook.text_length
                    image = hidden_states.shape[1] - text
                else:
                    text = 0 if encoder_hidden_states is None else encoder_hidden_states.shape[1]
                    image = hidden_states.shape[1]
                return flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                      logit_scale=hook.logit_scale(image, text))

        return EntropyScaledFluxAttnProcessor()
