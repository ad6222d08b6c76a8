"""Attention as diffusers' stock processors compute it, with the two changes the speed hooks need: a multiplier on the
attention logits (``logit_scale``, for attention entropy scaling) and a function that completes the image tokens' keys
and values (``complete_image_kv``, for region-adaptive sampling, whose partial steps compute only some image tokens).

Each function follows its stock processor operation for operation, so with ``logit_scale=None`` and no
``complete_image_kv`` it returns the stock processor's output bit for bit:

- ``self_attention``: ``AttnProcessor2_0`` (UNet and ``UNet2DModel`` attention);
- ``joint_attention``: ``JointAttnProcessor2_0`` (SD3: image tokens first, then text tokens);
- ``flux_attention``: ``FluxAttnProcessor`` (Flux: text tokens first, then image tokens).

``complete_image_kv(key, value) -> (key, value)`` receives the image tokens' keys and values, ``(B, H, N, D)``
(``flux_attention``: ``(B, N, H, D)``, after the rotary embedding), and returns them for all image tokens.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
import torch.nn.functional as F
from diffusers.models.attention_dispatch import dispatch_attention_fn
from diffusers.models.embeddings import apply_rotary_emb

KeyValueCompletion = Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]]


def softmax_scale(logit_scale: float | None, head_dim: int) -> float | None:
    """SDPA's ``scale``: ``logit_scale / sqrt(head_dim)``, or ``None`` (SDPA's own default) when unscaled."""
    return None if logit_scale is None else logit_scale / math.sqrt(head_dim)


def split_heads(batch_size: int, heads: int, head_dim: int, *projections: torch.Tensor) -> list[torch.Tensor]:
    """``(B, N, heads * head_dim)`` projections as ``(B, heads, N, head_dim)``."""
    return [p.view(batch_size, -1, heads, head_dim).transpose(1, 2) for p in projections]


def normalized_heads(attn, batch_size: int, query: torch.Tensor, key: torch.Tensor, value: torch.Tensor):
    """The projections split into heads, with the layer's query / key norms applied; and the head dimension."""
    head_dim = key.shape[-1] // attn.heads
    query, key, value = split_heads(batch_size, attn.heads, head_dim, query, key, value)
    if attn.norm_q is not None:
        query = attn.norm_q(query)
    if attn.norm_k is not None:
        key = attn.norm_k(key)
    return query, key, value, head_dim


def self_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None,
                   logit_scale: float | None = None) -> torch.Tensor:
    residual = hidden_states
    if attn.spatial_norm is not None:
        hidden_states = attn.spatial_norm(hidden_states, temb)
    input_ndim = hidden_states.ndim
    if input_ndim == 4:
        batch_size, channel, height, width = hidden_states.shape
        hidden_states = hidden_states.view(batch_size, channel, height * width).transpose(1, 2)
    batch_size, sequence_length, _ = (
        hidden_states.shape if encoder_hidden_states is None else encoder_hidden_states.shape
    )
    if attention_mask is not None:
        attention_mask = attn.prepare_attention_mask(attention_mask, sequence_length, batch_size)
        attention_mask = attention_mask.view(batch_size, attn.heads, -1, attention_mask.shape[-1])
    if attn.group_norm is not None:
        hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)

    query = attn.to_q(hidden_states)
    if encoder_hidden_states is None:
        encoder_hidden_states = hidden_states
    elif attn.norm_cross:
        encoder_hidden_states = attn.norm_encoder_hidden_states(encoder_hidden_states)
    key = attn.to_k(encoder_hidden_states)
    value = attn.to_v(encoder_hidden_states)

    query, key, value, head_dim = normalized_heads(attn, batch_size, query, key, value)

    hidden_states = F.scaled_dot_product_attention(query, key, value, attn_mask=attention_mask, dropout_p=0.0,
                                                   is_causal=False, scale=softmax_scale(logit_scale, head_dim))
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if input_ndim == 4:
        hidden_states = hidden_states.transpose(-1, -2).reshape(batch_size, channel, height, width)
    if attn.residual_connection:
        hidden_states = hidden_states + residual
    return hidden_states / attn.rescale_output_factor


def joint_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                    logit_scale: float | None = None, complete_image_kv: KeyValueCompletion | None = None):
    residual = hidden_states
    batch_size = hidden_states.shape[0]
    query = attn.to_q(hidden_states)
    key = attn.to_k(hidden_states)
    value = attn.to_v(hidden_states)
    query, key, value, head_dim = normalized_heads(attn, batch_size, query, key, value)
    if complete_image_kv is not None:
        key, value = complete_image_kv(key, value)

    if encoder_hidden_states is not None:
        context_query = attn.add_q_proj(encoder_hidden_states)
        context_key = attn.add_k_proj(encoder_hidden_states)
        context_value = attn.add_v_proj(encoder_hidden_states)
        context_query, context_key, context_value = split_heads(batch_size, attn.heads, head_dim, context_query,
                                                                context_key, context_value)
        if attn.norm_added_q is not None:
            context_query = attn.norm_added_q(context_query)
        if attn.norm_added_k is not None:
            context_key = attn.norm_added_k(context_key)
        query = torch.cat([query, context_query], dim=2)
        key = torch.cat([key, context_key], dim=2)
        value = torch.cat([value, context_value], dim=2)

    hidden_states = F.scaled_dot_product_attention(query, key, value, dropout_p=0.0, is_causal=False,
                                                   scale=softmax_scale(logit_scale, head_dim))
    hidden_states = hidden_states.transpose(1, 2).reshape(batch_size, -1, attn.heads * head_dim)
    hidden_states = hidden_states.to(query.dtype)

    if encoder_hidden_states is not None:
        hidden_states, encoder_hidden_states = (
            hidden_states[:, : residual.shape[1]],
            hidden_states[:, residual.shape[1]:],
        )
        if not attn.context_pre_only:
            encoder_hidden_states = attn.to_add_out(encoder_hidden_states)
    hidden_states = attn.to_out[0](hidden_states)
    hidden_states = attn.to_out[1](hidden_states)
    if encoder_hidden_states is not None:
        return hidden_states, encoder_hidden_states
    return hidden_states


def flux_attention(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                   attention_mask: torch.Tensor | None = None, image_rotary_emb=None, text_length: int = 0,
                   logit_scale: float | None = None, complete_image_kv: KeyValueCompletion | None = None):
    """``text_length``: how many leading tokens of ``hidden_states`` are text (Flux's single-stream blocks attend
    over ``[text; image]`` without ``encoder_hidden_states``); the double-stream blocks' text comes in
    ``encoder_hidden_states``."""
    if attn.fused_projections:
        query, key, value = attn.to_qkv(hidden_states).chunk(3, dim=-1)
    else:
        query, key, value = attn.to_q(hidden_states), attn.to_k(hidden_states), attn.to_v(hidden_states)
    query = query.unflatten(-1, (-1, attn.head_dim))
    key = key.unflatten(-1, (-1, attn.head_dim))
    value = value.unflatten(-1, (-1, attn.head_dim))
    query = attn.norm_q(query)
    key = attn.norm_k(key)

    if encoder_hidden_states is not None and attn.added_kv_proj_dim is not None:
        if attn.fused_projections:
            context_query, context_key, context_value = attn.to_added_qkv(encoder_hidden_states).chunk(3, dim=-1)
        else:
            context_query = attn.add_q_proj(encoder_hidden_states)
            context_key = attn.add_k_proj(encoder_hidden_states)
            context_value = attn.add_v_proj(encoder_hidden_states)
        context_query = attn.norm_added_q(context_query.unflatten(-1, (-1, attn.head_dim)))
        context_key = attn.norm_added_k(context_key.unflatten(-1, (-1, attn.head_dim)))
        context_value = context_value.unflatten(-1, (-1, attn.head_dim))
        text_length = encoder_hidden_states.shape[1]
        query = torch.cat([context_query, query], dim=1)
        key = torch.cat([context_key, key], dim=1)
        value = torch.cat([context_value, value], dim=1)

    if image_rotary_emb is not None:
        query = apply_rotary_emb(query, image_rotary_emb, sequence_dim=1)
        key = apply_rotary_emb(key, image_rotary_emb, sequence_dim=1)
    if complete_image_kv is not None:
        image_key, image_value = complete_image_kv(key[:, text_length:], value[:, text_length:])
        key = torch.cat([key[:, :text_length], image_key], dim=1)
        value = torch.cat([value[:, :text_length], image_value], dim=1)

    scale = softmax_scale(logit_scale, attn.head_dim)
    hidden_states = dispatch_attention_fn(query, key, value, attn_mask=attention_mask, scale=scale,
                                          backend=getattr(attn.processor, "_attention_backend", None),
                                          parallel_config=getattr(attn.processor, "_parallel_config", None))
    hidden_states = hidden_states.flatten(2, 3)
    hidden_states = hidden_states.to(query.dtype)

    if encoder_hidden_states is not None:
        encoder_hidden_states, hidden_states = hidden_states.split_with_sizes(
            [encoder_hidden_states.shape[1], hidden_states.shape[1] - encoder_hidden_states.shape[1]], dim=1
        )
        hidden_states = attn.to_out[0](hidden_states.contiguous())
        hidden_states = attn.to_out[1](hidden_states)
        encoder_hidden_states = attn.to_add_out(encoder_hidden_states.contiguous())
        return hidden_states, encoder_hidden_states
    return hidden_states
