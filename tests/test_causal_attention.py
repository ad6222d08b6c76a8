"""Causal attention over frames (Ca2-VDM arXiv 2411.16375, ViD-GPT arXiv 2406.10981) on stock Wan and UNet3D: a
later frame does not reach an earlier frame's output, blocks see themselves whole, detaching restores the model bit
for bit; the KV cache of clean context frames gives the uncached causal model's output, also with a bound (the
window mask of the frames kept); positions are relative under Wan's rotary embedding, cyclic on request."""

import pytest
import torch
from diffusers import CogVideoXTransformer3DModel, UNet3DConditionModel
from diffusers.hooks import HookRegistry
from tiny_video import CHANNELS, FLOAT32_TOLERANCE, HEIGHT, TEXT_DIM, WIDTH, ltx, wan

from diffusers_ext.pipelines.video.backbones import per_frame_prediction
from diffusers_ext.pipelines.video.causal_attention import (
    FrameKVCache,
    FrameLayout,
    causal_attention_context,
    disable_causal_attention,
    enable_causal_attention,
    wan_rotary_embedding,
)

FRAMES = 5
CONTEXT = 2  # clean frames at timestep 0 before the chunk being denoised


def inputs(seed: int = 1, frames: int = FRAMES):
    generator = torch.Generator().manual_seed(seed)
    latents = torch.randn(2, CHANNELS, frames, HEIGHT, WIDTH, generator=generator)
    timesteps = torch.cat([torch.zeros(2, CONTEXT), torch.full((2, frames - CONTEXT), 700.0)], dim=1)
    return latents, timesteps, torch.randn(2, 3, TEXT_DIM, generator=generator)


def tiny_unet3d() -> UNet3DConditionModel:
    torch.manual_seed(0)
    return UNet3DConditionModel(block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4, sample_size=8,
                                in_channels=4, out_channels=4,
                                down_block_types=("CrossAttnDownBlock3D", "DownBlock3D"),
                                up_block_types=("UpBlock3D", "CrossAttnUpBlock3D"), cross_attention_dim=16,
                                attention_head_dim=4).eval()


def frame_change(model, latents, timesteps, text, changed_from: int) -> torch.Tensor:
    """Per frame, the largest change of the output when frames ``changed_from..`` of the input change."""
    moved = latents.clone()
    moved[:, :, changed_from:] += torch.randn_like(moved[:, :, changed_from:])
    difference = per_frame_prediction(model, moved, timesteps, text) - per_frame_prediction(model, latents,
                                                                                              timesteps, text)
    return difference.abs().amax(dim=(0, 1, 3, 4))


@pytest.mark.parametrize("changed_from", [1, 3, 4])
def test_a_later_frame_does_not_reach_an_earlier_frames_output(changed_from):
    model, (latents, timesteps, text) = wan(), inputs()
    enable_causal_attention(model)
    change = frame_change(model, latents, timesteps, text, changed_from)
    assert change[:changed_from].max() <= 1e-6
    assert change[changed_from:].min() > 1e-2


def test_without_the_mask_a_later_frame_does_reach_earlier_frames():
    model, (latents, timesteps, text) = wan(), inputs()
    assert frame_change(model, latents, timesteps, text, 3)[:3].min() > 1e-3


def test_block_causal_frames_see_their_whole_block_and_earlier_blocks_only():
    model, (latents, timesteps, text) = wan(), inputs()
    enable_causal_attention(model, frames_per_block=2)  # blocks {0, 1}, {2, 3}, {4}
    change = frame_change(model, latents, timesteps, text, 3)
    assert change[:2].max() <= 1e-6
    assert change[2] > 1e-2  # frame 3 is in frame 2's block


def test_one_block_over_all_frames_is_the_stock_attention():
    model, (latents, timesteps, text) = wan(), inputs()
    stock = per_frame_prediction(model, latents, timesteps, text)
    enable_causal_attention(model, frames_per_block=FRAMES)
    torch.testing.assert_close(per_frame_prediction(model, latents, timesteps, text), stock, **FLOAT32_TOLERANCE)


@pytest.mark.parametrize("build", [wan, tiny_unet3d], ids=["wan", "unet3d"])
def test_disable_restores_the_model_bit_for_bit(build):
    model = build()
    latents, timesteps, text = inputs()
    run = (lambda: per_frame_prediction(model, latents, timesteps, text)) if build is wan \
        else (lambda: model(latents, 10, text).sample)
    before, processors = run(), dict(model.attn_processors)
    enable_causal_attention(model)
    assert not torch.equal(run(), before)
    disable_causal_attention(model)
    assert all(model.attn_processors[name] is processor for name, processor in processors.items())
    assert not hasattr(model, "_causal_attention_state")
    if build is wan:
        assert HookRegistry.check_if_exists_or_initialize(model.rope).get_hook("causal_rotary_positions") is None
    assert torch.equal(run(), before)
    enable_causal_attention(model)  # and it can be enabled again


def test_unet3d_temporal_attention_is_frame_causal():
    """The mask is on UNet3D's attention over frames; its temporal convolutions and the GroupNorm of its temporal
    transformer still mix frames both ways, so the attention modules are tested, not the whole UNet."""
    model = tiny_unet3d()
    enable_causal_attention(model)
    for name in ("transformer_in.transformer_blocks.0.attn1",
                 "down_blocks.0.temp_attentions.0.transformer_blocks.0.attn2"):
        attention = model.get_submodule(name)
        frames = torch.randn(6, 4, attention.to_q.in_features, generator=torch.Generator().manual_seed(2))
        moved = frames.clone()
        moved[:, 2:] += 1
        change = (attention(moved) - attention(frames)).abs().amax(dim=(0, 2))
        assert change[:2].max() <= 1e-6 and change[2:].min() > 1e-3


def test_rotary_embedding_at_given_positions_is_the_models_table_and_goes_beyond_it():
    model, (latents, _, _) = wan(), inputs()
    for own, computed in zip(model.rope(latents), wan_rotary_embedding(model.rope, latents.shape,
                                                                       torch.arange(FRAMES)), strict=True):
        assert torch.equal(own, computed)
    beyond = wan_rotary_embedding(model.rope, latents.shape, torch.arange(40, 40 + FRAMES))  # table: 32 positions
    assert beyond[0].shape == model.rope(latents)[0].shape


@pytest.mark.parametrize("first_position", [7, 40])
def test_shifting_every_frame_keeps_the_output_rotary_attention_is_relative(first_position):
    model, (latents, timesteps, text) = wan(), inputs()
    enable_causal_attention(model)
    at_zero = per_frame_prediction(model, latents, timesteps, text)
    with causal_attention_context(model, FrameLayout.block_causal(FRAMES, first_position=first_position)):
        shifted = per_frame_prediction(model, latents, timesteps, text)
    torch.testing.assert_close(shifted, at_zero, **FLOAT32_TOLERANCE)


def test_cyclic_positions_take_the_position_modulo_the_period():
    model, (latents, timesteps, text) = wan(), inputs()
    enable_causal_attention(model)
    layout = FrameLayout.block_causal(FRAMES, first_position=9)
    with causal_attention_context(model, layout, position_period=8):  # positions 1..5
        cyclic = per_frame_prediction(model, latents, timesteps, text)
    with causal_attention_context(model, FrameLayout.block_causal(FRAMES, first_position=1)):
        assert torch.equal(per_frame_prediction(model, latents, timesteps, text), cyclic)


@pytest.mark.parametrize("frames_per_block", [1, 2])  # the context ends at a block boundary
def test_cached_context_gives_the_uncached_causal_output_at_every_denoising_step(frames_per_block):
    model, (latents, _, text) = wan(), inputs()
    enable_causal_attention(model, frames_per_block=frames_per_block)
    cache = FrameKVCache()
    layout = FrameLayout.block_causal(FRAMES, frames_per_block)
    context, chunk = latents[:, :, :CONTEXT], latents[:, :, CONTEXT:]
    # The context as Ca2-VDM writes it: one write pass at timestep 0 per block (here: per frame or all at once).
    with causal_attention_context(model, FrameLayout(*(field[:CONTEXT] for field in
                                                       (layout.positions, layout.blocks, layout.window_starts))),
                                  cache, "write"):
        per_frame_prediction(model, context, 0.0, text)
    memory = cache.memory_bytes()
    assert cache.num_frames == CONTEXT and memory > 0
    chunk_layout = FrameLayout(layout.positions[CONTEXT:], layout.blocks[CONTEXT:], layout.window_starts[CONTEXT:])
    for step, level in enumerate([900.0, 500.0, 100.0]):  # denoising steps of one chunk share the cache
        noisy = chunk + step * 0.3 * torch.randn_like(chunk)
        every_frame = torch.cat([context, noisy], dim=2)
        frame_timesteps = torch.cat([torch.zeros(2, CONTEXT), torch.full((2, FRAMES - CONTEXT), level)], dim=1)
        uncached = per_frame_prediction(model, every_frame, frame_timesteps, text)[:, :, CONTEXT:]
        with causal_attention_context(model, chunk_layout, cache, "read"):
            cached = per_frame_prediction(model, noisy, level, text)
        torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)
        assert cache.num_frames == CONTEXT and cache.memory_bytes() == memory  # reads leave the cache alone


def test_a_bounded_cache_keeps_the_newest_frames_and_equals_the_window_mask():
    model, (latents, _, text) = wan(), inputs()
    enable_causal_attention(model)
    cache = FrameKVCache(max_frames=2)
    sizes = []
    for frame in range(3):  # frames 0, 1, 2 written one at a time: frame 0 is dropped after frame 2 is written
        with causal_attention_context(model, cache=cache, cache_mode="write"):
            per_frame_prediction(model, latents[:, :, frame:frame + 1], 0.0, text)
        sizes.append(cache.memory_bytes())
    assert cache.positions.tolist() == [1, 2] and sizes[2] == sizes[1] == 2 * sizes[0]
    with causal_attention_context(model, cache=cache, cache_mode="read"):
        cached = per_frame_prediction(model, latents[:, :, 3:], 600.0, text)
    # Uncached: the whole video, each frame attending back to the oldest frame the cache held when it was made.
    window = FrameLayout(torch.arange(FRAMES), torch.arange(FRAMES), torch.tensor([0, 0, 0, 1, 1]))
    frame_timesteps = torch.tensor([[0.0, 0.0, 0.0, 600.0, 600.0]]).expand(2, -1)
    with causal_attention_context(model, window):
        uncached = per_frame_prediction(model, latents, frame_timesteps, text)[:, :, 3:]
    torch.testing.assert_close(cached, uncached, rtol=0, atol=1e-5)
    # Without the bound frame 0 is still seen: the bound changes the output.
    with causal_attention_context(model, FrameLayout.block_causal(FRAMES)):
        unbounded = per_frame_prediction(model, latents, frame_timesteps, text)[:, :, 3:]
    assert (unbounded - cached).abs().max() > 1e-3


def test_bad_inputs_raise_one_clear_error():
    with pytest.raises(ValueError, match="WanTransformer3DModel, UNet3DConditionModel"):
        enable_causal_attention(ltx())
    torch.manual_seed(0)
    with pytest.raises(ValueError, match="no attention over frames"):
        enable_causal_attention(CogVideoXTransformer3DModel(num_attention_heads=2, attention_head_dim=8,
                                                            in_channels=4, out_channels=4, time_embed_dim=8,
                                                            text_embed_dim=16, num_layers=1, sample_width=8,
                                                            sample_height=8, sample_frames=9, patch_size=2,
                                                            temporal_compression_ratio=4, max_text_seq_length=5))
    model, (latents, timesteps, text) = wan(), inputs()
    for bad in (0, 1.5, True):
        with pytest.raises(ValueError, match="frames_per_block"):
            enable_causal_attention(model, frames_per_block=bad)
    with pytest.raises(ValueError, match="not enabled"):
        disable_causal_attention(model)
    enable_causal_attention(model)
    with pytest.raises(ValueError, match="already enabled"):
        enable_causal_attention(model)
    with pytest.raises(ValueError, match="max_frames"):
        FrameKVCache(max_frames=0)
    with pytest.raises(ValueError, match="together"), causal_attention_context(model, cache_mode="read"):
        pass
    with pytest.raises(ValueError, match="layout has 3 frames"), \
            causal_attention_context(model, FrameLayout.block_causal(3)):
        per_frame_prediction(model, latents, timesteps, text)
    cache = FrameKVCache()
    with causal_attention_context(model, cache=cache, cache_mode="write"):
        per_frame_prediction(model, latents[:, :, :1], 0.0, text)
    with pytest.raises(ValueError, match="batch of 2"), \
            causal_attention_context(model, cache=cache, cache_mode="read"):
        per_frame_prediction(model, latents[:1, :, 1:], 0.0, text[:1])
    with pytest.raises(ValueError, match="nothing to write"), \
            causal_attention_context(model, cache=FrameKVCache(), cache_mode="write"):
        pass
    unet = tiny_unet3d()
    enable_causal_attention(unet)
    with pytest.raises(ValueError, match="one timestep per clip"), \
            causal_attention_context(unet, cache=FrameKVCache(), cache_mode="read"):
        pass
