"""RAS: region-adaptive sampling for diffusion transformers (SD3, Flux)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
from diffusers import FluxTransformer2DModel, SD3Transformer2DModel
from diffusers.configuration_utils import register_to_config
from diffusers.models.attention_processor import JointAttnProcessor2_0
from diffusers.models.transformers.transformer_flux import FluxAttnProcessor

from ..guidance.steering import check_non_negative, check_positive_int
from .attention import flux_attention, joint_attention
from .base import (
    CallbackHook,
    ClockReading,
    DenoisingClock,
    SpeedHook,
    check_denoiser_type,
    check_fraction,
    check_step_indices,
    pipeline_denoiser,
    scaled_step_indices,
)
from .module_reuse import denoiser_sample, stream_key

CONTROLNET_ARGUMENTS = ("block_controlnet_hidden_states", "controlnet_block_samples", "controlnet_single_block_samples")


@dataclass
class StreamState:
    """One stream's caches: the last full model output (token layout), each attention layer's image keys and values,
    the per-token metric of the last output, and how often each token was left out."""

    output: torch.Tensor | None = None
    key_values: dict[str, tuple[torch.Tensor, torch.Tensor]] = field(default_factory=dict)
    metric: torch.Tensor | None = None
    drop_count: torch.Tensor | None = None


def token_metric(output: torch.Tensor, channels_last: bool, channels: int) -> torch.Tensor:
    """RAS's region score per token, ``(N,)``: the standard deviation over channels of the model output at each latent
    pixel, averaged over the token's pixels and over the batch. ``output`` is the token layout ``(B, N, F)`` with
    ``F = pixels * channels``, channels last (SD3's ``(p, p, C)``) or first (Flux's packed ``(C, 2, 2)``)."""
    batch, tokens, features = output.shape
    if channels_last:
        per_pixel = output.reshape(batch, tokens, features // channels, channels).float().std(dim=-1)
    else:
        per_pixel = output.reshape(batch, tokens, channels, features // channels).float().std(dim=-2)
    return per_pixel.mean(dim=(0, 2))


def kept_tokens(metric: torch.Tensor, drop_count: torch.Tensor, sample_ratio: float, starvation_scale: float,
                high_ratio: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(kept, dropped)`` token indices (``kept`` sorted): the scores ``metric * exp(starvation_scale *
    drop_count)`` are sorted; of the ``(1 - sample_ratio) N`` tokens left out, a ``high_ratio`` share comes from the
    top of the order and the rest from the bottom, as in the official RAS scheduler."""
    num_tokens = metric.numel()
    num_dropped = int((1 - sample_ratio) * num_tokens)
    order = torch.argsort(metric * torch.exp(starvation_scale * drop_count))
    from_top = int(num_dropped * high_ratio)
    from_bottom = num_dropped - from_top
    dropped = torch.cat([order[:from_bottom], order[num_tokens - from_top:]])
    kept = order[from_bottom:num_tokens - from_top].sort().values
    return kept, dropped


class RegionAdaptiveSampling(SpeedHook):
    r"""RAS for SD3 and Flux pipelines: at most steps, only the image tokens of the regions the model focuses on go
    through the transformer; the other tokens keep their previous output.

    Paper: *Region-Adaptive Sampling for Diffusion Transformers*, Liu et al., arXiv 2502.10389.

    After each step every image token gets a score from the model output ``o`` (its noise or velocity prediction),
    ``s_i = mean over the token's pixels of std_c(o)``, times ``exp(starvation_scale * d_i)`` where ``d_i`` counts the
    steps token ``i`` was left out (so no region starves). At a RAS step the ``(1 - sample_ratio) N`` tokens to leave
    out are taken from the two ends of the score order (a ``high_ratio`` share from the top), the others run through
    every block, attending to all image tokens: the left-out tokens' keys and values are those cached at their last
    computation. Their output is their last output:

        o_t[kept]    = transformer(x_t[kept]; K, V of all tokens)
        o_t[dropped] = o_{t-1}[dropped]

    The first ``start_step`` calls and the ``error_reset_steps`` compute every token (and refresh all caches). Steps
    are indices of a run of ``reference_steps`` calls, moved to the same fraction of other runs; the defaults are the
    official SD3 script's (28 steps, start 4, resets 12 and 20, ratio 0.5, starvation 1, high ratio 0.3). One token
    selection serves the whole batch; the score is read on the transformer's raw output (both halves of a
    classifier-free-guidance batch), not the guided one. With ``sample_ratio=1`` every token is computed and the output
    is the stock output bit for bit. Calls with ControlNet residuals compute every token.

    Args:
        sample_ratio: share of image tokens computed at RAS steps, in ``(0, 1]``.
        start_step: calls before the first RAS step.
        error_reset_steps: calls that compute every token.
        reference_steps: the run length ``start_step`` and ``error_reset_steps`` are written for.
        starvation_scale: ``>= 0``; larger spreads the updates more evenly over the image.
        high_ratio: in ``[0, 1]``, the share of left-out tokens taken from the highest scores.
    """

    supported_denoisers = (SD3Transformer2DModel, FluxTransformer2DModel)

    @register_to_config
    def __init__(self, *, sample_ratio: float = 0.5, start_step: int = 4, error_reset_steps: list[int] = (12, 20),
                 reference_steps: int = 28, starvation_scale: float = 1.0, high_ratio: float = 0.3):
        super().__init__()
        check_fraction(sample_ratio, "sample_ratio", include_zero=False)
        if isinstance(start_step, bool) or not isinstance(start_step, int) or start_step < 1:
            raise ValueError(f"start_step must be an integer >= 1 (the first call computes every token), got "
                             f"{start_step!r}")
        self.error_reset_steps = check_step_indices(error_reset_steps, "error_reset_steps")
        check_positive_int(reference_steps, "reference_steps")
        check_non_negative(starvation_scale, "starvation_scale")
        check_fraction(high_ratio, "high_ratio")
        self.calls = {"full": 0, "partial": 0}
        self.computed_tokens = 0  # image tokens through the transformer, summed over calls (per batch row)

    def is_partial_step(self, reading: ClockReading) -> bool:
        config = self.config
        if config.sample_ratio >= 1:
            return False
        start = min(scaled_step_indices([config.start_step], config.reference_steps, reading.num_calls))
        resets = scaled_step_indices(self.error_reset_steps, config.reference_steps, reading.num_calls)
        return reading.index >= max(start, 1) and reading.index not in resets

    # Installing -----------------------------------------------------------------------------------------------------

    def _install(self, pipeline: Any) -> None:
        name = type(self).__name__
        _, model = pipeline_denoiser(pipeline, name)
        check_denoiser_type(model, self.supported_denoisers, name)
        if getattr(pipeline, "controlnet", None) is not None:
            raise ValueError(f"{name} does not support ControlNet pipelines (the residuals cover every token)")
        self.is_flux = isinstance(model, FluxTransformer2DModel)
        stock = FluxAttnProcessor if self.is_flux else JointAttnProcessor2_0
        attentions = {n: m for n, m in model.named_modules() if hasattr(m, "set_processor")}
        for attention_name, attention in attentions.items():
            if type(attention.get_processor()) is not stock:
                raise ValueError(f"{name} replaces the stock {stock.__name__}; {attention_name} uses "
                                 f"{type(attention.get_processor()).__name__}")
        self.clock = DenoisingClock(pipeline)
        self.streams: dict[tuple, StreamState] = {}
        self.run = None
        self.state: StreamState | None = None
        self.kept: torch.Tensor | None = None
        self.text_length = 0
        if self.is_flux:
            self.output_channels, self.channels_last = model.out_channels // 4, False
        else:
            self.output_channels, self.channels_last = model.out_channels, True

        self._root = CallbackHook(pre_forward=self._begin_call, on_reset=self._reset)
        self._register_hook(model, self._root)
        gather = CallbackHook(post_forward=self._keep_tokens)
        self._register_hook(model.x_embedder if self.is_flux else model.pos_embed, gather)
        if self.is_flux:
            self._register_hook(model.pos_embed, CallbackHook(post_forward=self._keep_rotary_rows))
        self._register_hook(model.proj_out, CallbackHook(post_forward=self._complete_output))
        for attention_name, attention in attentions.items():
            single_stream = self.is_flux and attention_name.startswith("single_transformer_blocks")
            self._set_processor(attention, self._processor(attention_name, attention.get_processor(), single_stream))

    def _processor(self, layer: str, original: Any, single_stream: bool):
        complete = self._key_value_completion(layer)
        if not self.is_flux:
            class RASJointAttnProcessor:
                def __call__(processor, attn, hidden_states, encoder_hidden_states=None, attention_mask=None):
                    return joint_attention(attn, hidden_states, encoder_hidden_states, complete_image_kv=complete)

            return RASJointAttnProcessor()

        class RASFluxAttnProcessor:
            _attention_backend = getattr(original, "_attention_backend", None)
            _parallel_config = getattr(original, "_parallel_config", None)

            def __call__(processor, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                         image_rotary_emb=None):
                text_length = self.text_length if single_stream else 0
                return flux_attention(attn, hidden_states, encoder_hidden_states, attention_mask, image_rotary_emb,
                                      text_length=text_length, complete_image_kv=complete)

        return RASFluxAttnProcessor()

    # One call ---------------------------------------------------------------------------------------------------------

    def _reset(self) -> None:
        self.streams.clear()
        self.run, self.state, self.kept = None, None, None

    def _begin_call(self, module, *args, **kwargs):
        sample = denoiser_sample(args, kwargs)
        stream = stream_key(self._root.context_name, sample)
        reading = self.clock.read(stream)
        if reading.run != self.run:
            self.streams.clear()
            self.run = reading.run
        self.state = self.streams.setdefault(stream, StreamState())
        encoder_hidden_states = kwargs.get("encoder_hidden_states")
        self.text_length = encoder_hidden_states.shape[1] if isinstance(encoder_hidden_states, torch.Tensor) else 0
        partial = (self.is_partial_step(reading) and self.state.metric is not None
                   and not any(kwargs.get(k) is not None for k in CONTROLNET_ARGUMENTS))
        self.kept = None
        if partial:
            self.kept, dropped = kept_tokens(self.state.metric, self.state.drop_count, self.config.sample_ratio,
                                             self.config.starvation_scale, self.config.high_ratio)
            self.state.drop_count[dropped] += 1
        self.calls["partial" if partial else "full"] += 1
        return args, kwargs

    def _keep_tokens(self, module, tokens: torch.Tensor) -> torch.Tensor:
        if self.kept is None:
            self.computed_tokens += tokens.shape[1]
            return tokens
        self.computed_tokens += self.kept.numel()
        return tokens[:, self.kept.to(tokens.device)]

    def _keep_rotary_rows(self, module, rotary: tuple[torch.Tensor, torch.Tensor]):
        if self.kept is None:
            return rotary
        rows = torch.cat([torch.arange(self.text_length), self.text_length + self.kept]).to(rotary[0].device)
        return tuple(r[rows] for r in rotary)

    def _key_value_completion(self, layer: str):
        token_dim = 1 if self.is_flux else 2

        def complete(key: torch.Tensor, value: torch.Tensor):
            if self.kept is None:
                self.state.key_values[layer] = (key.clone(), value.clone())
                return key, value
            full_key, full_value = self.state.key_values[layer]
            kept = self.kept.to(key.device)
            full_key.index_copy_(token_dim, kept, key)
            full_value.index_copy_(token_dim, kept, value)
            return full_key, full_value

        return complete

    def _complete_output(self, module, output: torch.Tensor) -> torch.Tensor:
        state = self.state
        if self.kept is None:
            state.output = output.clone()
        else:
            state.output.index_copy_(1, self.kept.to(output.device), output)
            output = state.output.clone()
        state.metric = token_metric(state.output, self.channels_last, self.output_channels)
        if state.drop_count is None:
            state.drop_count = torch.zeros_like(state.metric)
        return output
