"""Attention entropy scaling: the stock output at the training size, sqrt(log N / log N_train) on the logits of every
self-attention layer at other sizes, and what that does to attention entropy."""

import math

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import Attention
from tiny_pipelines import sd_pipeline, stable_diffusion_inputs

from diffusers_ext.hooks import AttentionEntropyScaling
from diffusers_ext.hooks.attention import self_attention
from diffusers_ext.hooks.attention_scaling import entropy_logit_scale


def test_logit_scale_formula():
    assert entropy_logit_scale(4096, 4096) is None
    assert entropy_logit_scale(16384, 4096) == pytest.approx(math.sqrt(math.log(16384) / math.log(4096)))
    assert entropy_logit_scale(1024, 4096) == pytest.approx(math.sqrt(5 / 6))


def test_each_self_attention_layer_gets_the_scale_of_its_own_token_count():
    """At twice the training side every self-attention layer sees 4x its training tokens: its logits are scaled by
    sqrt(log N / log(N / 4)), cross-attention keeps its scale."""
    pipe = sd_pipeline()
    scales = []
    hook = AttentionEntropyScaling()
    original = hook.logit_scale
    hook.logit_scale = lambda image, text=0: scales.append((image, text, original(image, text))) or scales[-1][2]
    with hook.attached(pipe):
        pipe(**stable_diffusion_inputs(height=16, width=16, num_inference_steps=1, guidance_scale=1.0))
    # The tiny UNet attends at its second level only (8 x 8 tokens at 16 px): down, mid and up blocks.
    self_attentions = [m for m in pipe.unet.modules() if isinstance(m, Attention) and not m.is_cross_attention]
    assert len(self_attentions) == 4
    assert scales == [(64, 0, math.sqrt(math.log(64) / math.log(16)))] * 4


@torch.no_grad()
def test_scaled_attention_is_softmax_of_scaled_logits():
    torch.manual_seed(0)
    attn = Attention(query_dim=16, heads=2, dim_head=8).eval()
    tokens = torch.randn(2, 10, 16)
    scaled = self_attention(attn, tokens, logit_scale=1.7)
    query, key, value = (attn.to_q(tokens), attn.to_k(tokens), attn.to_v(tokens))
    split = lambda x: x.view(2, 10, 2, 8).transpose(1, 2)  # noqa: E731
    weights = torch.softmax(1.7 * split(query) @ split(key).transpose(-1, -2) / math.sqrt(8), dim=-1)
    expected = attn.to_out[0]((weights @ split(value)).transpose(1, 2).reshape(2, 10, 16))
    torch.testing.assert_close(scaled, expected, rtol=1e-5, atol=1e-6)


def attention_entropy(query: torch.Tensor, key: torch.Tensor, logit_scale: float = 1.0) -> float:
    weights = torch.softmax(logit_scale * query @ key.transpose(-1, -2) / math.sqrt(query.shape[-1]), dim=-1)
    return float(-(weights * weights.clamp_min(1e-30).log()).sum(-1).mean())


@pytest.mark.effect
def test_scaling_reduces_the_growth_of_attention_entropy_with_the_token_count():
    """Independent Gaussian queries and keys (logit variance 2, attention moderately peaked: entropy 3.8 nats at 256
    tokens, log 256 = 5.5). At 4x and 16x the tokens the unscaled entropy grows by about 0.9 log 4 and 0.9 log 16;
    scaled, it grows about a third less (measured: +1.29 -> +0.90 nats at 4x, +2.59 -> +1.75 at 16x). The
    paper's rule narrows the gap to the training entropy; it does not close it for attention this diffuse."""
    generator = torch.Generator().manual_seed(0)

    def tokens(count):
        return math.sqrt(2.0) * torch.randn(count, 32, generator=generator)

    training = attention_entropy(tokens(256), tokens(256))
    for count in (1024, 4096):
        query, key = tokens(count), tokens(count)
        unscaled = attention_entropy(query, key)
        scaled = attention_entropy(query, key, entropy_logit_scale(count, 256))
        assert training < scaled < unscaled, (count, training, scaled, unscaled)
        assert scaled - training < 0.8 * (unscaled - training), (count, training, scaled, unscaled)


def test_at_the_training_size_the_stock_output_is_returned_and_elsewhere_it_changes():
    pipe = sd_pipeline()
    for size, same in ((8, True), (16, False)):
        stock = pipe(**stable_diffusion_inputs(height=size, width=size)).images
        with AttentionEntropyScaling().attached(pipe):
            scaled = pipe(**stable_diffusion_inputs(height=size, width=size)).images
        assert np.array_equal(scaled, stock) == same
    with AttentionEntropyScaling(train_latent_size=16).attached(pipe):
        at_16 = pipe(**stable_diffusion_inputs(height=16, width=16)).images
    np.testing.assert_array_equal(at_16, stock)
