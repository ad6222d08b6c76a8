"""MultiViewDiffusionPipeline (MVDream, arXiv 2308.16512) on a tiny random UNet: views of each object come out
consecutive with their cameras (an orbit by default), output types agree, the same seed gives the same views, a
saved pipeline loads (and through stock diffusers with trust_remote_code) and samples the same, guidance and cameras
change the views, the callback sees and replaces the latents, other schedulers and a VAE plug in, and bad inputs raise
one clear error before any sampling."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, DPMSolverMultistepScheduler, UNet2DConditionModel
from PIL import Image

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.three_d import CameraEmbedding, MultiViewDiffusionPipeline, view_grid
from diffusers_ext.pipelines.three_d.rendering import orbit_cameras
from diffusers_ext.testing import tiny_clip_text_encoder, tiny_clip_tokenizer
from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH

NUM_VIEWS = 4


def tiny_pipeline(in_channels: int = 3, vae: AutoencoderKL | None = None,
                  text_encoder: bool = False) -> MultiViewDiffusionPipeline:
    torch.manual_seed(0)
    unet = UNet2DConditionModel(
        block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=in_channels,
        out_channels=in_channels, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=TINY_TEXT_WIDTH,
        attention_head_dim=4, norm_num_groups=4).eval()
    camera_embedding = CameraEmbedding(unet.time_embedding.linear_2.out_features)
    # A random (not zero) output layer, so that cameras matter in these tests.
    torch.nn.init.normal_(camera_embedding.linear_2.weight, std=0.5)
    pipe = MultiViewDiffusionPipeline(
        unet=unet, scheduler=DPMSolverMultistepScheduler(), camera_embedding=camera_embedding.eval(), vae=vae,
        text_encoder=tiny_clip_text_encoder() if text_encoder else None,
        tokenizer=tiny_clip_tokenizer() if text_encoder else None, num_views=NUM_VIEWS)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def run(pipe: MultiViewDiffusionPipeline, seed: int = 0, **overrides):
    embeds = torch.randn(1, 3, TINY_TEXT_WIDTH, generator=torch.Generator().manual_seed(7))
    inputs = dict(prompt_embeds=embeds, num_objects_per_prompt=2, num_inference_steps=2, guidance_scale=3.0,
                  output_type="pt", generator=torch.Generator().manual_seed(seed))
    return pipe(**inputs | overrides)


@pytest.fixture(scope="module")
def pipe() -> MultiViewDiffusionPipeline:
    return tiny_pipeline()


def test_views_cameras_output_types_and_seeds(pipe):
    out = run(pipe)
    assert out.images.shape == (2 * NUM_VIEWS, 3, 8, 8)
    torch.testing.assert_close(out.cameras, orbit_cameras(NUM_VIEWS, elevation=15.0))
    torch.testing.assert_close(run(pipe).images, out.images, rtol=0, atol=0)
    # Differences are measured before clipping: the random tiny UNet's clipped views are almost all 0 or 1.
    unclipped = run(pipe, output_type="latent").images
    assert (run(pipe, seed=1, output_type="latent").images - unclipped).abs().max() > 1e-3
    as_np = run(pipe, output_type="np").images
    np.testing.assert_allclose(as_np, out.images.permute(0, 2, 3, 1).numpy(), atol=1e-6)
    pil = run(pipe, output_type="pil").images
    assert len(pil) == 2 * NUM_VIEWS and view_grid(pil, NUM_VIEWS).size == (NUM_VIEWS * 8, 2 * 8)
    assert run(pipe, output_type="latent").images.shape == (2 * NUM_VIEWS, 3, 8, 8)

    turned = orbit_cameras(NUM_VIEWS, elevation=40.0, start_azimuth=30.0)
    other_cameras = run(pipe, cameras=turned)
    torch.testing.assert_close(other_cameras.cameras, turned)
    assert (run(pipe, cameras=turned, output_type="latent").images - unclipped).abs().max() > 1e-3
    assert (run(pipe, guidance_scale=1.0, output_type="latent").images - unclipped).abs().max() > 1e-3

    seen = []

    def callback(pipeline, step, timestep, tensors):
        seen.append((step, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])}

    zeroed = run(pipe, num_inference_steps=3, callback_on_step_end=callback)
    assert seen == [(0, (8, 3, 8, 8)), (1, (8, 3, 8, 8)), (2, (8, 3, 8, 8))]
    assert zeroed.images.sub(0.5).abs().max() == 0  # the last step's latents replaced by zeros: mid-grey


def test_save_and_load_give_the_same_views(pipe, tmp_path):
    expected = run(pipe, output_type="latent").images  # unclipped (see above)
    pipe.save_pretrained(tmp_path / "plain")
    loaded = MultiViewDiffusionPipeline.from_pretrained(tmp_path / "plain")
    loaded.set_progress_bar_config(disable=True)
    torch.testing.assert_close(run(loaded, output_type="latent").images, expected, rtol=0, atol=0)
    save_for_hub(pipe, tmp_path / "hub", card_template="multiview")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "hub", trust_remote_code=True)
    stock.set_progress_bar_config(disable=True)
    assert isinstance(stock, MultiViewDiffusionPipeline) and stock.num_views == NUM_VIEWS
    torch.testing.assert_close(run(stock, output_type="latent").images, expected, rtol=0, atol=0)


def test_prompts_and_a_vae():
    vae = AutoencoderKL(block_out_channels=(8,), in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",),
                        up_block_types=("UpDecoderBlock2D",), latent_channels=4, norm_num_groups=4, sample_size=8)
    pipe = tiny_pipeline(in_channels=4, vae=vae.eval(), text_encoder=True)
    out = pipe(["a red cube", "a blue ball"], num_inference_steps=2, output_type="pil",
               generator=torch.Generator().manual_seed(0))
    assert len(out.images) == 2 * NUM_VIEWS and all(isinstance(image, Image.Image) for image in out.images)
    assert out.images[0].size == (8, 8)


def test_bad_inputs_raise_one_clear_error(pipe):
    with pytest.raises(ValueError, match=r"one camera per view, \(4, 4, 4\): this pipeline's multi-view attention is "
                                         r"built for 4 views; got \(3, 4, 4\)"):
        run(pipe, cameras=orbit_cameras(3))
    with pytest.raises(ValueError, match=r"shape \(N, 4, 4\)"):
        run(pipe, cameras=torch.zeros(4, 3, 4))
    with pytest.raises(ValueError, match="output_type must be one of"):
        run(pipe, output_type="mp4")
    with pytest.raises(ValueError, match="guidance_scale must be >= 1"):
        run(pipe, guidance_scale=0.5)
    with pytest.raises(ValueError, match="no text encoder: pass prompt_embeds"):
        pipe("a cube", num_inference_steps=1)
    with pytest.raises(ValueError, match="no text encoder: pass negative_prompt_embeds"):
        run(pipe, negative_prompt="blurry")
    with pytest.raises(ValueError, match="num_views=2, but the denoiser is built for 4"):
        MultiViewDiffusionPipeline(unet=pipe.unet, scheduler=pipe.scheduler, num_views=2)
    unet = UNet2DConditionModel(block_out_channels=(8, 16), layers_per_block=1, sample_size=8, in_channels=3,
                                out_channels=3, down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                                up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"), cross_attention_dim=8,
                                attention_head_dim=4, norm_num_groups=4)
    with pytest.raises(ValueError, match="not multi-view yet: pass num_views and camera_embedding"):
        MultiViewDiffusionPipeline(unet=unet, scheduler=pipe.scheduler)
