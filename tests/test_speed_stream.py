"""StreamPipeline: the stream batch reproduces stock img2img on a still frame, residual CFG costs one UNet batch per
frame, and the similarity filter skips near-identical frames."""

import numpy as np
import pytest
import torch
from diffusers import DDIMScheduler, LCMScheduler, StableDiffusionImg2ImgPipeline
from tiny_pipelines import STABLE_DIFFUSION_DDIM, TEXT_DIM, tiny_stable_diffusion

from diffusers_ext.hooks import StreamPipeline
from diffusers_ext.hooks.stream_diffusion import skip_probability

EMBEDS = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(123))
NEGATIVE = torch.zeros_like(EMBEDS)


def img2img(scheduler) -> StableDiffusionImg2ImgPipeline:
    pipe = StableDiffusionImg2ImgPipeline(**tiny_stable_diffusion(scheduler).components)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def frame_latents(seed: int = 5) -> torch.Tensor:
    return torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("scheduler_class", [LCMScheduler, DDIMScheduler])
@pytest.mark.parametrize(("guidance", "scale"), [("none", 1.0), ("full", 2.0)])
def test_stream_batch_output_is_the_stock_img2img_output(scheduler_class, guidance, scale):
    """A still frame fed n times (n = 3 steps): the frame leaving the stream went through every slot of the batched
    UNet calls, and must equal the stock pipeline's img2img of it with the generator the stream's noise comes from."""
    pipe = img2img(scheduler_class(**STABLE_DIFFUSION_DDIM))
    latents = frame_latents()
    stock = pipe(prompt_embeds=EMBEDS, negative_prompt_embeds=NEGATIVE, image=latents, strength=0.5,
                 num_inference_steps=6, guidance_scale=scale, generator=torch.Generator().manual_seed(7),
                 output_type="np").images
    stream = StreamPipeline(num_inference_steps=6, strength=0.5, guidance=guidance, guidance_scale=scale, seed=7)
    with stream.attached(pipe):
        stream.prepare(prompt_embeds=EMBEDS, negative_prompt_embeds=NEGATIVE)
        outputs = [stream(latents, output_type="np") for _ in range(3)]
    assert stream.unet_calls == 3
    np.testing.assert_allclose(outputs[-1], stock, rtol=0, atol=1e-5)
    # The first outputs come from slots filled by noising the first frame straight to their level: not the same.
    assert np.abs(outputs[0] - stock).max() > 1e-3


def test_frames_come_out_in_order_after_n_minus_one_calls():
    """Distinct frames through a 2-step stream equal the per-frame stock results, one call late."""
    pipe = img2img(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    frames = [frame_latents(seed) for seed in range(4)]
    stock = [pipe(prompt_embeds=EMBEDS, image=frame, strength=0.5, num_inference_steps=4, guidance_scale=1.0,
                  generator=torch.Generator().manual_seed(0), output_type="latent").images for frame in frames]
    with StreamPipeline(num_inference_steps=4, strength=0.5, guidance="none", seed=0).attached(pipe) as stream:
        stream.prepare(prompt_embeds=EMBEDS)
        outputs = [stream(frame, output_type="latent") for frame in frames]
    for index in range(1, 4):
        torch.testing.assert_close(outputs[index], stock[index - 1], rtol=0, atol=1e-5)


@pytest.mark.parametrize(("guidance", "batch"), [("none", 3), ("self", 3), ("initialize", 4), ("full", 6)])
def test_residual_cfg_runs_one_unet_batch_per_frame(guidance, batch):
    pipe = img2img(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    batches = []
    pipe.unet.register_forward_pre_hook(lambda module, args: batches.append(args[0].shape[0]))
    stream = StreamPipeline(num_inference_steps=6, strength=0.5, guidance=guidance, guidance_scale=1.5)
    with stream.attached(pipe):
        stream.prepare(prompt_embeds=EMBEDS, negative_prompt_embeds=NEGATIVE)
        outputs = [stream(frame_latents(seed), output_type="latent") for seed in range(3)]
    assert batches == [batch] * 3
    assert all(torch.isfinite(o).all() for o in outputs)


def test_self_negative_guidance_pushes_away_from_the_input_frame():
    """Self-negative RCFG's negative is the noise that leads back to the input frame, so guidance scales the change
    the model makes: a larger scale moves the output further from the input."""
    pipe = img2img(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    latents = frame_latents()
    distances = []
    for scale in (1.0, 1.5, 2.0):
        with StreamPipeline(num_inference_steps=4, strength=0.5, guidance="self",
                            guidance_scale=scale).attached(pipe) as stream:
            stream.prepare(prompt_embeds=EMBEDS)
            output = [stream(latents, output_type="latent") for _ in range(2)][-1]
        distances.append(float((output - latents).norm()))
    assert distances[0] < distances[1] < distances[2], distances


def test_similarity_filter_skips_identical_frames_up_to_the_limit():
    assert skip_probability(1.0, 0.98) == 1.0 and skip_probability(0.98, 0.98) == 0.0
    assert skip_probability(0.99, 0.98) == pytest.approx(0.5) and skip_probability(0.5, 1.0) == 0.0
    pipe = img2img(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    stream = StreamPipeline(num_inference_steps=4, strength=0.5, guidance="none", similarity_threshold=0.9,
                            max_skipped_frames=2)
    frame = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    with stream.attached(pipe):
        stream.prepare(prompt_embeds=EMBEDS)
        outputs = [stream(frame, output_type="latent") for _ in range(7)]
        assert stream.unet_calls == 3 and stream.skipped_frames == 4  # computed, 2 skipped, computed, 2 skipped
        torch.testing.assert_close(outputs[1], outputs[0], rtol=0, atol=0)
        # A different frame (similarity far below the threshold) is always processed.
        stream(1 - frame, output_type="latent")
        assert stream.unet_calls == 4


def test_stream_needs_prepare_and_one_frame_at_a_time():
    pipe = img2img(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    stream = StreamPipeline()
    with pytest.raises(ValueError, match="attach"):
        stream.prepare(prompt_embeds=EMBEDS)
    with stream.attached(pipe):
        with pytest.raises(ValueError, match="prepare"):
            stream(frame_latents())
        stream.prepare(prompt_embeds=EMBEDS)
        with pytest.raises(ValueError, match="one frame per call"):
            stream(torch.randn(2, 4, 8, 8))
        with pytest.raises(ValueError, match="one prompt"):
            stream.prepare(prompt_embeds=EMBEDS.repeat(2, 1, 1))
