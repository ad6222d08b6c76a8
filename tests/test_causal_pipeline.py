"""``CausalVideoPipeline`` (Ca2-VDM arXiv 2411.16375, ViD-GPT arXiv 2406.10981): the cached run gives the uncached
causal model's video (max abs diff <= 1e-5 in float32) with and without a cache bound, block-causal attention,
guidance and an image or a clip as context; the context reaches later chunks and later chunks do not reach earlier
ones; the bound keeps the cache flat; the transformer comes back as it was; stock conventions (output types,
callbacks, seeds, save / load, a Wan VAE); bad inputs raise one clear error before any model call."""

import numpy as np
import pytest
import torch
from tiny_video import TEXT_DIM, ltx, wan

from diffusers_ext.pipelines.video.causal_attention import enable_causal_attention, is_causal_attention_enabled
from diffusers_ext.pipelines.video.pipeline_causal import CausalVideoPipeline
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler

EXACT = dict(rtol=0, atol=1e-5)


def text(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def pixel_pipeline() -> CausalVideoPipeline:
    pipe = CausalVideoPipeline(wan(in_channels=3, out_channels=3), FrameAwareFlowMatchScheduler(shift=3.0))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_call(seed: int = 0, **overrides) -> dict:
    return dict(prompt_embeds=text(), num_frames=7, chunk_frames=2, height=8, width=8, num_inference_steps=3,
                output_type="latent", generator=torch.Generator().manual_seed(seed)) | overrides


def tiny_wan_vae():
    from diffusers import AutoencoderKLWan

    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def frames_image(seed: int) -> torch.Tensor:
    return torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(seed))


CASES = {
    "frame-causal": dict(),
    "block-causal": dict(frames_per_block=2),
    "bounded": dict(max_cache_frames=3),
    "guidance": dict(guidance_scale=3.0, negative_prompt_embeds=text(1)),
    "image": dict(image=frames_image(3), max_cache_frames=2),
    "cyclic": dict(max_cache_frames=2, position_period=4),
}


@pytest.mark.parametrize("case", list(CASES))
def test_cached_video_is_the_uncached_causal_models_video(case):
    pipe = pixel_pipeline()
    cached = pipe(**pixel_call(**CASES[case]))
    uncached = pipe(**pixel_call(use_cache=False, **CASES[case]))
    torch.testing.assert_close(cached.frames, uncached.frames, **EXACT)
    bound = CASES[case].get("max_cache_frames")
    assert max(cached.cache_frames) == (bound or 6 - ("image" in CASES[case]))  # 7 frames, the last chunk reads 6
    assert uncached.cache_frames == []


def test_a_bounded_cache_stays_flat_and_drops_the_oldest_context():
    pipe = pixel_pipeline()
    bounded = pipe(**pixel_call(num_frames=9, chunk_frames=1, max_cache_frames=3))
    assert bounded.cache_frames == [0, 1, 2, 3, 3, 3, 3, 3, 3]
    unbounded = pipe(**pixel_call(num_frames=9, chunk_frames=1))
    assert unbounded.cache_frames == list(range(9))
    torch.testing.assert_close(bounded.frames[:, :, :4], unbounded.frames[:, :, :4], **EXACT)  # no frame dropped yet
    assert (bounded.frames[:, :, 4:] - unbounded.frames[:, :, 4:]).abs().max() > 1e-3  # frame 0 dropped


def test_generation_is_autoregressive_the_context_reaches_later_chunks_only():
    pipe = pixel_pipeline()
    long = pipe(**pixel_call(image=frames_image(3))).frames
    short = pipe(**pixel_call(image=frames_image(3), num_frames=3)).frames
    torch.testing.assert_close(long[:, :, :3], short, **EXACT)  # later chunks do not reach earlier frames
    other_image = pipe(**pixel_call(image=frames_image(4))).frames
    assert (other_image[:, :, 1:] - long[:, :, 1:]).abs().amax(dim=(0, 1, 3, 4)).min() > 1e-3


def test_the_transformer_comes_back_as_it_was():
    pipe = pixel_pipeline()
    processors = dict(pipe.transformer.attn_processors)
    pipe(**pixel_call())
    assert not is_causal_attention_enabled(pipe.transformer)
    assert all(pipe.transformer.attn_processors[name] is processor for name, processor in processors.items())
    enable_causal_attention(pipe.transformer, frames_per_block=2)  # a model made causal by its owner stays causal
    torch.testing.assert_close(pipe(**pixel_call()).frames, pipe(**pixel_call(frames_per_block=2)).frames,
                               rtol=0, atol=0)  # and its blocks are the default
    assert is_causal_attention_enabled(pipe.transformer)
    with pytest.raises(ValueError, match="already causal with frames_per_block=2"):
        pipe(**pixel_call(frames_per_block=1))


def test_output_types_callbacks_and_same_seed_same_output():
    pipe = pixel_pipeline()
    frames = pipe(**pixel_call(output_type="np")).frames
    assert frames.shape == (1, 7, 8, 8, 3) and frames.min() >= 0 and frames.max() <= 1
    np.testing.assert_array_equal(pipe(**pixel_call(output_type="np")).frames, frames)
    assert not np.array_equal(pipe(**pixel_call(seed=1, output_type="np")).frames, frames)
    pil = pipe(**pixel_call(output_type="pil", num_frames=3)).frames
    assert len(pil) == 1 and len(pil[0]) == 3 and pil[0][0].size == (8, 8)
    seen = []

    def record(pipeline, step, timesteps, tensors):
        seen.append((step, tensors["latents"].shape[2]))
        return {}

    pipe(**pixel_call(callback_on_step_end=record))
    assert seen == [(k, frames) for frames in (2, 2, 2, 1) for k in range(3)]  # 3 steps per chunk, the last short


def test_save_and_load_round_trip_gives_the_same_video(tmp_path):
    pipe = pixel_pipeline()
    expected = pipe(**pixel_call()).frames
    pipe.save_pretrained(tmp_path)
    loaded = CausalVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FrameAwareFlowMatchScheduler) and loaded.vae is None
    torch.testing.assert_close(loaded(**pixel_call()).frames, expected, rtol=0, atol=0)


def test_through_a_wan_vae_a_clip_is_extended_chunk_by_chunk():
    pipe = CausalVideoPipeline(wan(), FrameAwareFlowMatchScheduler(shift=3.0), vae=tiny_wan_vae())
    pipe.set_progress_bar_config(disable=True)
    clip = torch.rand(5, 3, 16, 16, generator=torch.Generator().manual_seed(0))  # 5 frames: 2 latent frames
    def call(**overrides):  # a fresh generator for each call
        return dict(prompt_embeds=text(), video=clip, num_frames=13, chunk_frames=4, height=16, width=16,
                    num_inference_steps=2, generator=torch.Generator().manual_seed(0)) | overrides

    latents = pipe(**call(output_type="latent"))
    assert latents.frames.shape == (1, 4, 4, 2, 2) and latents.cache_frames == [2, 3]
    torch.testing.assert_close(latents.frames[:, :, :2], pipe.encode_video(clip, 16, 16, 1, latents.frames), **EXACT)
    uncached = pipe(**call(output_type="latent", use_cache=False)).frames
    torch.testing.assert_close(latents.frames, uncached, **EXACT)
    assert pipe(**call()).frames.shape == (1, 13, 16, 16, 3)
    with pytest.raises(ValueError, match="chunk_frames must be a positive multiple of the VAE's temporal compressio"):
        pipe(**call(chunk_frames=3))
    with pytest.raises(ValueError, match="num_frames=6 cannot be encoded"):
        pipe(**call(num_frames=6))
    with pytest.raises(ValueError, match="num_frames=4 cannot be encoded"):
        pipe(**call(video=clip[:4]))


def test_a_context_longer_than_the_bound_needs_a_policy():
    pipe = pixel_pipeline()
    clip = torch.rand(4, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with pytest.raises(ValueError, match="context_policy='drop_oldest'"):
        pipe(**pixel_call(video=clip, max_cache_frames=2))
    kept = pipe(**pixel_call(video=clip, max_cache_frames=2, context_policy="drop_oldest"))
    assert kept.frames.shape[2] == 7 and kept.cache_frames == [2, 2]
    torch.testing.assert_close(kept.frames[:, :, :4], clip.permute(1, 0, 2, 3)[None] * 2 - 1, **EXACT)
    uncached = pipe(**pixel_call(video=clip, max_cache_frames=2, context_policy="drop_oldest", use_cache=False))
    torch.testing.assert_close(kept.frames, uncached.frames, **EXACT)


@pytest.mark.parametrize("overrides, message", [
    (dict(output_type="tensor"), "output_type"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(chunk_frames=0), "chunk_frames"),
    (dict(num_frames=0), "num_frames"),
    (dict(max_cache_frames=0), "max_cache_frames"),
    (dict(frames_per_block=0), "frames_per_block"),
    (dict(context_policy="keep"), "context_policy"),
    (dict(image=frames_image(0), video=[frames_image(0).permute(1, 2, 0).numpy()]), "not both"),
    (dict(callback_on_step_end_tensor_inputs=["noise_pred"]), "callback_on_step_end_tensor_inputs"),
    (dict(height=7), "height"),
    (dict(image=torch.rand(3, 16, 16)), "16x16 pixels"),
    (dict(video=torch.rand(7, 3, 8, 8)), "nothing left to generate"),
])
def test_bad_inputs_raise_one_clear_error(overrides, message):
    pipe = pixel_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append(1))
    with pytest.raises(ValueError, match=message):
        pipe(**pixel_call(**overrides))
    assert not calls and not is_causal_attention_enabled(pipe.transformer)


def test_a_backbone_other_than_wan_is_refused():
    with pytest.raises(ValueError, match="needs a WanTransformer3DModel"):
        CausalVideoPipeline(ltx(), FrameAwareFlowMatchScheduler())


def test_save_for_hub_then_stock_from_pretrained_makes_the_same_video(tmp_path):
    from diffusers import DiffusionPipeline

    from diffusers_ext.hub import save_for_hub

    pipe = pixel_pipeline()
    expected = pipe(**pixel_call(image=frames_image(3))).frames
    save_for_hub(pipe, tmp_path, card_template="causal_video")
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded).__name__ == "CausalVideoPipeline"
    torch.testing.assert_close(loaded(**pixel_call(image=frames_image(3))).frames, expected, rtol=0, atol=0)
    card = (tmp_path / "README.md").read_text()
    assert "arxiv:2411.16375" in card and "max_cache_frames" in card


def test_the_exact_oracle_is_taken_uncached():
    """``VideoGaussianMixtureDenoiser`` conditions on the frames it is given (causal by construction; the chunked
    law is tested in test_causal_video_oracle.py): no attention, so no cache."""
    from tiny_video import FRAMES, oracle

    pipe = CausalVideoPipeline(oracle(), FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    call = dict(num_frames=FRAMES, chunk_frames=FRAMES, height=8, width=8, num_inference_steps=3, output_type="latent")
    with pytest.raises(ValueError, match="pass use_cache=False"):
        pipe(**call)
    assert pipe(**call, use_cache=False).frames.shape == (1, 4, FRAMES, 8, 8)
