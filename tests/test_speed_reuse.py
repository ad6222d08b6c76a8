"""Faster Diffusion (encoder propagation) and feature inheritance: exact when every step computes, exact when the
reused features are the current ones, the paper's key-step schedule, ControlNet, img2img and UNet2DModel pipelines."""

import numpy as np
import pytest
import torch
from diffusers import StableDiffusionImg2ImgPipeline
from tiny_pipelines import (
    TEXT_DIM,
    control_image,
    sd_pipeline,
    sd_scheduler,
    stable_diffusion_inputs,
    tiny_controlnet_stable_diffusion,
    tiny_sdxl,
)

from diffusers_ext import load_shipped_pipeline
from diffusers_ext.hooks import FasterDiffusion, FeatureInheritance
from diffusers_ext.hooks.base import ClockReading, scaled_step_indices
from diffusers_ext.hooks.faster_diffusion import PAPER_KEY_STEPS
from diffusers_ext.pipelines.restoration.demo import super_resolve_held_out
from diffusers_ext.training.restoration_data import psnr


def test_every_step_a_key_step_is_the_stock_pipeline_bit_for_bit():
    pipe = sd_pipeline()
    stock = pipe(**stable_diffusion_inputs(num_inference_steps=10)).images
    faster = FasterDiffusion(key_steps=list(range(10)), reference_steps=10, prior_noise_injection=0)
    with faster.attached(pipe):
        np.testing.assert_array_equal(pipe(**stable_diffusion_inputs(num_inference_steps=10)).images, stock)
    assert faster.encoder.calls == {"compute": 10, "reuse": 0}
    inheritance = FeatureInheritance(modules=["down_blocks.1", "mid_block", "up_blocks.0"], interval=1)
    with inheritance.attached(pipe):
        np.testing.assert_array_equal(pipe(**stable_diffusion_inputs(num_inference_steps=10)).images, stock)


def unet_arguments(seed: int = 0) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return dict(sample=torch.randn(2, 4, 8, 8, generator=generator), timestep=torch.tensor(500),
                encoder_hidden_states=torch.randn(2, 4, TEXT_DIM, generator=generator))


@pytest.mark.parametrize("make_hook", [
    lambda: FasterDiffusion(key_steps=[0], reference_steps=1000),
    lambda: FeatureInheritance(modules=["down_blocks.0", "mid_block", "up_blocks.0"], interval=1000),
], ids=["faster-diffusion", "feature-inheritance"])
@torch.no_grad()
def test_reusing_features_of_the_same_input_gives_the_stock_output(make_hook):
    """The second call on the same input runs only the modules that are not reused, on stored features that are
    the current ones: the output must be the stock output exactly (the same operations on the same numbers)."""
    pipe = sd_pipeline()
    arguments = unet_arguments()
    stock = pipe.unet(**arguments).sample
    hook = make_hook()
    with hook.attached(pipe):
        first = pipe.unet(**arguments).sample
        second = pipe.unet(**arguments).sample
        moved = pipe.unet(**unet_arguments(seed=1)).sample
    reuse = hook.encoder if isinstance(hook, FasterDiffusion) else hook.blocks
    assert reuse.calls == {"compute": 1, "reuse": 2}
    torch.testing.assert_close(first, stock, rtol=0, atol=0)
    torch.testing.assert_close(second, stock, rtol=0, atol=0)
    # Not vacuous: a reused call on another input is neither the stale output nor that input's stock output.
    assert (moved - stock).abs().max() > 1e-3 and (moved - pipe.unet(**unet_arguments(seed=1)).sample).abs().max() > 1e-3


def test_key_steps_follow_the_paper_schedule_moved_to_the_run_length():
    faster = FasterDiffusion()
    assert faster.key_steps == list(PAPER_KEY_STEPS)
    keys = [i for i in range(50) if faster.is_key_step(ClockReading(1, i, 50, i, 50))]
    assert keys == list(PAPER_KEY_STEPS)
    assert scaled_step_indices([0, 1, 2, 3, 5, 10, 15, 25, 35], 50, 20) == {0, 1, 2, 4, 6, 10, 14}
    pipe = sd_pipeline()
    with faster.attached(pipe):
        pipe(**stable_diffusion_inputs(num_inference_steps=20))
    assert faster.encoder.calls == {"compute": 7, "reuse": 13}


def test_reused_encoder_stays_close_to_the_stock_run_and_resets_each_run():
    pipe = sd_pipeline()
    stock = pipe(**stable_diffusion_inputs(num_inference_steps=20, output_type="latent")).images
    faster = FasterDiffusion()
    with faster.attached(pipe):
        first = pipe(**stable_diffusion_inputs(num_inference_steps=20, output_type="latent")).images
        other_seed = pipe(**stable_diffusion_inputs(seed=1, num_inference_steps=20, output_type="latent")).images
    relative = (first - stock).norm() / stock.norm()
    assert 0 < relative < 0.05, relative
    # A run does not reuse the previous run's features: the second run equals a fresh attach's.
    with FasterDiffusion().attached(pipe):
        fresh = pipe(**stable_diffusion_inputs(seed=1, num_inference_steps=20, output_type="latent")).images
    torch.testing.assert_close(other_seed, fresh, rtol=0, atol=0)


def test_controlnet_residuals_follow_the_current_call_or_are_reused_at_non_key_steps():
    pipe = tiny_controlnet_stable_diffusion(sd_scheduler())
    inputs = lambda **k: stable_diffusion_inputs(image=control_image(), num_inference_steps=10, **k)  # noqa: E731
    stock = pipe(**inputs()).images
    without_control = pipe(**inputs(controlnet_conditioning_scale=0.0)).images
    assert np.abs(stock - without_control).max() > 1e-2  # the residuals matter
    for reuse_controlnet in (True, False):
        faster = FasterDiffusion(reuse_controlnet=reuse_controlnet)
        with faster.attached(pipe):
            accelerated = pipe(**inputs()).images
        assert faster.encoder.calls == {"compute": 6, "reuse": 4}
        # Reused, the ControlNet runs at the 6 key steps only; otherwise it runs at every step, unhooked.
        assert faster.controlnet_calls == ({"compute": 6, "reuse": 4} if reuse_controlnet else {"compute": 0, "reuse": 0})
        assert 0 < np.abs(accelerated - stock).max() < 0.5 * np.abs(stock - without_control).max()
    with FasterDiffusion(key_steps=list(range(10)), reference_steps=10, prior_noise_injection=0).attached(pipe):
        np.testing.assert_array_equal(pipe(**inputs()).images, stock)


def test_img2img_runs_count_from_their_first_step():
    pipe = StableDiffusionImg2ImgPipeline(**sd_pipeline().components)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    inputs = lambda: stable_diffusion_inputs(image=image, strength=0.5, num_inference_steps=20)  # noqa: E731
    stock = pipe(**inputs()).images
    faster = FasterDiffusion(key_steps=[0, 4], reference_steps=10)
    with faster.attached(pipe):
        accelerated = pipe(**inputs()).images
    # 10 calls (strength 0.5 of 20 steps): the run's first call and call 4 compute the encoder.
    assert faster.encoder.calls == {"compute": 2, "reuse": 8}
    assert 0 < np.abs(accelerated - stock).max() < 0.05


def test_sdxl_unet_with_added_conditioning():
    pipe = tiny_sdxl(sd_scheduler())
    inputs = dict(prompt="a cat", num_inference_steps=10, height=8, width=8, output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    stock = pipe(**inputs).images
    with FasterDiffusion(key_steps=[0, 3, 6], reference_steps=10).attached(pipe) as faster:
        accelerated = pipe(**inputs | {"generator": torch.Generator().manual_seed(0)}).images
    assert faster.encoder.calls == {"compute": 3, "reuse": 7}
    # Random weights: a loose bound (misplaced or stale-by-a-run features land far off); the exact check is below.
    relative = (accelerated - stock).norm() / stock.norm()
    assert 0 < relative < 0.25, relative
    with FasterDiffusion(key_steps=list(range(10)), reference_steps=10, prior_noise_injection=0).attached(pipe):
        every_key = pipe(**inputs | {"generator": torch.Generator().manual_seed(0)}).images
    torch.testing.assert_close(every_key, stock, rtol=0, atol=0)


def test_trained_unet2d_model_keeps_30_db_to_its_stock_output():
    """The shipped super-resolution model (a trained UNet2DModel, ResShift, 15 steps): with the paper's schedule 8 of
    15 calls reuse the encoder, and the result stays within 30 dB PSNR of the stock result (35.8 dB measured on a
    64 px crop)."""
    pipe = load_shipped_pipeline("tiny-resshift-sr4")
    pipe.set_progress_bar_config(disable=True)
    stock = super_resolve_held_out(pipe, crop=64, num_inference_steps=15)
    with FasterDiffusion().attached(pipe) as faster:
        accelerated = super_resolve_held_out(pipe, crop=64, num_inference_steps=15)
    assert faster.encoder.calls == {"compute": 7, "reuse": 8}
    fidelity = psnr(accelerated["restored"], stock["restored"]).mean()
    print(f"\nFaster Diffusion on the shipped model: {float(fidelity):.1f} dB to the stock output")
    assert 30 <= fidelity < float("inf"), fidelity


def close_to(actual: torch.Tensor, expected: torch.Tensor) -> bool:
    """Equal up to float32 rounding of batched against single convolutions (relative to the largest value)."""
    return float((actual - expected).abs().max()) <= 1e-5 * float(expected.abs().max()) + 1e-6


@pytest.mark.parametrize("make_pipe", [sd_pipeline, lambda: tiny_sdxl(sd_scheduler()),
                                       lambda: tiny_controlnet_stable_diffusion(sd_scheduler())],
                         ids=["sd", "sdxl", "controlnet"])
def test_parallel_decoding_gives_the_sequential_run(make_pipe):
    pipe = make_pipe()
    inputs = stable_diffusion_inputs(num_inference_steps=10, output_type="latent")
    if hasattr(pipe, "controlnet"):
        inputs["image"] = control_image()
    if hasattr(pipe, "text_encoder_2"):
        inputs = dict(prompt="a cat", num_inference_steps=10, height=8, width=8, output_type="latent")
    run = lambda: pipe(**inputs | {"generator": torch.Generator().manual_seed(0)}).images  # noqa: E731
    stock = run()
    with FasterDiffusion(key_steps=[0, 3, 6], reference_steps=10).attached(pipe):
        sequential = run()
    with FasterDiffusion(key_steps=[0, 3, 6], reference_steps=10, parallel_decoding=True).attached(pipe) as faster:
        parallel = run()
    # Key steps 0, 3, 6: the 7 other steps come from three batched decoder calls (2, 2 and 3 steps).
    assert faster.encoder.calls == {"compute": 3, "reuse": 7} and faster.encoder.decoded_ahead == 7
    assert close_to(parallel, sequential)
    assert not close_to(parallel, stock)  # not vacuous: the non-key steps do reuse the encoder


def test_parallel_decoding_recomputes_a_step_whose_conditioning_changed():
    """A callback that changes the prompt embeddings after step 1: steps 2 onwards are called with other
    conditioning than the batch after key step 0 was computed with, so they run their own decoder."""
    pipe = sd_pipeline()

    def louder_prompt(pipeline, i, t, callback_kwargs):
        return {"prompt_embeds": callback_kwargs["prompt_embeds"] * 1.5} if i == 1 else {}

    inputs = lambda: stable_diffusion_inputs(num_inference_steps=10, output_type="latent",  # noqa: E731
                                             callback_on_step_end=louder_prompt,
                                             callback_on_step_end_tensor_inputs=["prompt_embeds"])
    with FasterDiffusion(key_steps=[0, 6], reference_steps=10).attached(pipe):
        sequential = pipe(**inputs()).images
    with FasterDiffusion(key_steps=[0, 6], reference_steps=10, parallel_decoding=True).attached(pipe) as faster:
        parallel = pipe(**inputs()).images
    # Steps 1-5 were batched after key step 0; only step 1 still had the conditioning they were batched with.
    # Steps 7-9 were batched after key step 6, with the new conditioning.
    assert faster.encoder.decoded_ahead == 1 + 3
    assert close_to(parallel, sequential)


def test_parallel_decoding_needs_the_key_steps_controlnet_residuals():
    pipe = tiny_controlnet_stable_diffusion(sd_scheduler())
    with pytest.raises(ValueError, match="parallel_decoding needs reuse_controlnet=True"):
        FasterDiffusion(parallel_decoding=True, reuse_controlnet=False).attach(pipe)
    assert not hasattr(pipe.unet, "_diffusers_hook") and not hasattr(pipe.controlnet, "_diffusers_hook")
    with pytest.raises(ValueError, match="parallel_decoding must be True or False"):
        FasterDiffusion(parallel_decoding="yes")
