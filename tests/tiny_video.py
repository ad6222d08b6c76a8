"""Tiny video backbones (random weights, built in well under a second) and the exact video oracle, for the video
tests."""

import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    LTXVideoTransformer3DModel,
    SkyReelsV2Transformer3DModel,
    WanTransformer3DModel,
)

from diffusers_ext.testing import VideoGaussianMixtureDenoiser

BATCH, CHANNELS, FRAMES, HEIGHT, WIDTH, TEXT_DIM = 2, 4, 4, 8, 8, 16
# float32 transformers: the per-token path runs the same arithmetic on differently shaped matmuls (measured 4e-7).
FLOAT32_TOLERANCE = dict(rtol=1e-5, atol=1e-5)
WAN_CONFIG = dict(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=12, in_channels=CHANNELS,
                  out_channels=CHANNELS, text_dim=TEXT_DIM, freq_dim=32, ffn_dim=32, rope_max_seq_len=32)


def wan(num_layers: int = 2, seed: int = 0, **config) -> WanTransformer3DModel:
    torch.manual_seed(seed)
    return WanTransformer3DModel(**{**WAN_CONFIG, **config}, num_layers=num_layers).eval()


def skyreels(num_layers: int = 2, seed: int = 0, **config) -> SkyReelsV2Transformer3DModel:
    torch.manual_seed(seed)
    return SkyReelsV2Transformer3DModel(**{**WAN_CONFIG, **config}, num_layers=num_layers).eval()


def ltx(num_layers: int = 1, seed: int = 0, **config) -> LTXVideoTransformer3DModel:
    torch.manual_seed(seed)
    config = dict(in_channels=CHANNELS, out_channels=CHANNELS, patch_size=1, patch_size_t=1, num_attention_heads=2,
                  attention_head_dim=8, cross_attention_dim=16, caption_channels=TEXT_DIM) | config
    return LTXVideoTransformer3DModel(**config, num_layers=num_layers).eval()


def oracle() -> VideoGaussianMixtureDenoiser:
    generator = torch.Generator().manual_seed(5)
    frame_means = torch.randn(2, CHANNELS, HEIGHT, WIDTH, generator=generator)
    return VideoGaussianMixtureDenoiser(frame_means.tolist(), [0.5, 0.3], [0.8, -0.4], FRAMES,
                                        scheduler_config=FlowMatchEulerDiscreteScheduler().config)
