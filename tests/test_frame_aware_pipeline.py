"""``FrameAwareVideoPipeline``: on the exact video oracle, the standard, image-to-video and interpolation plans
reproduce the law or its conditional law and the rolling window its frame statistics far past the window; the
standard plan on a Wan backbone is the stock ``WanPipeline``; every backbone family runs; interop and bad inputs."""

import numpy as np
import pytest
import torch
from diffusers import AutoencoderKLWan, FlowMatchEulerDiscreteScheduler, WanPipeline
from tiny_video import TEXT_DIM, ltx, skyreels, wan

from diffusers_ext.pipelines.video import FrameAwareVideoPipeline, FrameTimestepPlan
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.testing import VideoGaussianMixtureDenoiser
from diffusers_ext.testing.metrics import SlicedWasserstein2, sliced_wasserstein2_noise_floor

# A two-component law of 4-frame clips of 1 x 2 x 2 pixels, AR(1) in time with correlations 0.9 and 0.5.
LAW = dict(frame_means=[[1.0, -1.0, 0.5, 0.0], [-1.0, 0.5, -0.5, 1.0]], scales=[0.5, 0.3], correlations=[0.9, 0.5],
           frame_shape=(1, 2, 2))
NUM_SAMPLES = 2000


def oracle_pipeline(num_frames: int = 4) -> FrameAwareVideoPipeline:
    scheduler = FrameAwareFlowMatchScheduler()
    model = VideoGaussianMixtureDenoiser(**LAW, num_frames=num_frames, scheduler_config=scheduler.config)
    pipe = FrameAwareVideoPipeline(model, scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def oracle_samples(pipe, steps: int, seed: int = 0, num_samples: int = NUM_SAMPLES, **call) -> torch.Tensor:
    return pipe(height=2, width=2, num_inference_steps=steps, num_videos_per_prompt=num_samples,
                generator=torch.Generator().manual_seed(seed), output_type="latent", **call).frames.double()


def within_floor(samples: torch.Tensor, reference: torch.Tensor, law) -> tuple[float, float]:
    """Sliced W2 of ``samples`` to ``reference`` and the floor (mean + 3 std) exact samples reach."""
    distance = SlicedWasserstein2(reference, NUM_SAMPLES)
    floor = sliced_wasserstein2_noise_floor(law, distance)
    return distance(samples), floor.mean + 3 * floor.std


def test_standard_plan_reproduces_the_law_and_its_error_falls_with_steps():
    pipe = oracle_pipeline()
    law = pipe.transformer.law
    reference = law.sample(16 * NUM_SAMPLES, torch.Generator().manual_seed(1))
    coarse, floor = within_floor(oracle_samples(pipe, 5, num_frames=4), reference, law)
    fine, _ = within_floor(oracle_samples(pipe, 50, num_frames=4), reference, law)
    assert fine < floor < coarse, (fine, floor, coarse)


@pytest.mark.parametrize("clean_frames", [(0,), (0, 3)], ids=["image-to-video", "interpolation"])
def test_conditioning_plans_reproduce_the_conditional_law(clean_frames):
    """The given frames sit in the starting latents at the clean end of the plan; the rest must follow the exact
    conditional law given them. The conditional law is narrow (its sliced-W2 floor is a third of the joint's), so
    Euler's bias needs 200 steps to fall within it (measured: 0.058, 0.017, 0.013, 0.012 at 10, 50, 200, 800 steps
    against a floor of 0.012 + 3 x 0.001 for image-to-video)."""
    pipe, samples = oracle_pipeline(), 1000
    law = pipe.transformer.law
    given = {f: law.sample(1, torch.Generator().manual_seed(10 + f))[0, :, f] for f in clean_frames}
    pipe.scheduler.set_timesteps(200)
    plan = FrameTimestepPlan.interpolation(pipe.scheduler.noise_levels, 4, key_frames=clean_frames) \
        if len(clean_frames) > 1 else FrameTimestepPlan.image_to_video(pipe.scheduler.noise_levels, 4, clean_frames)
    noise = torch.randn(samples, 1, 4, 2, 2, generator=torch.Generator().manual_seed(2))
    for f, frame in given.items():
        noise[:, :, f] = frame.float()
    video = oracle_samples(pipe, 200, num_samples=samples, num_frames=4, plan=plan, latents=noise)
    for f, frame in given.items():
        assert torch.equal(video[:, :, f], frame.float().double().expand_as(video[:, :, f]))  # kept exactly
    conditional = law.sample_conditional(given, 16 * samples, torch.Generator().manual_seed(3))
    free = [f for f in range(4) if f not in clean_frames]
    distance = SlicedWasserstein2(conditional[:, :, free], samples)
    floor = [distance(law.sample_conditional(given, samples, torch.Generator().manual_seed(20 + r))[:, :, free])
             for r in range(8)]
    observed = distance(video[:, :, free])
    assert observed < np.mean(floor) + 3 * np.std(floor), (observed, floor)
    unconditional = distance(law.sample(samples, torch.Generator().manual_seed(4))[:, :, free])
    assert unconditional > np.mean(floor) + 6 * np.std(floor)  # not vacuous: conditioning changes the law


def test_rolling_window_keeps_the_laws_frame_statistics_far_past_the_window():
    """A 4-frame model rolled over 16 frames with one context frame: every new window is drawn given the last frame,
    so each frame and each pair of neighbouring frames keeps the stationary law's statistics (a Markov chain with the
    law's own two-frame marginal)."""
    pipe = oracle_pipeline()
    video = oracle_samples(pipe, 50, num_frames=16, window_frames=4, context_frames=1)
    assert video.shape == (NUM_SAMPLES, 1, 16, 2, 2)
    law = pipe.transformer.law
    late = video[:, :, 10:]  # frames 10-15: three windows past the first
    mean, variance, lag_one = law.frame_mean()[:, 0], law.frame_covariance(0)[:, 0], law.frame_covariance(1)[:, 0]
    centred = late - mean[:, None]
    measured = {"mean": late.mean(0), "variance": centred.pow(2).mean(0),
                "lag-1 covariance": (centred[:, :, 1:] * centred[:, :, :-1]).mean(0)}
    exact = {"mean": mean, "variance": variance, "lag-1 covariance": lag_one}
    for name, value in measured.items():
        error = (value - exact[name][:, None]).abs().max()
        # Standard errors of these averages over 2000 clips are below 0.03 for this law (per-pixel variance <= 1.3).
        assert error < 0.12, (name, float(error))
    # The seam itself (the context frame 3 and the first new frame 4 of the second window) keeps it too.
    seam = video[:, :, 3:5] - mean[:, None]
    assert (seam[:, :, 1] * seam[:, :, 0]).mean(0).sub(lag_one).abs().max() < 0.12


def test_conditioning_on_a_frame_from_another_window_breaks_the_lag_one_statistics():
    """The check above can fail: two windows drawn independently (no context) have no covariance across the seam."""
    pipe = oracle_pipeline()
    law = pipe.transformer.law
    first = oracle_samples(pipe, 50, seed=0, num_frames=4)
    second = oracle_samples(pipe, 50, seed=1, num_frames=4)
    mean, lag_one = law.frame_mean()[:, 0], law.frame_covariance(1)[:, 0]
    seam = ((first[:, :, 3] - mean) * (second[:, :, 0] - mean)).mean(0)
    assert (seam - lag_one).abs().max() > 0.3


# A tiny Wan transformer (4 channels) with Wan's tiny VAE, or on pixels -------------------------------------------


def tiny_wan_vae() -> AutoencoderKLWan:
    torch.manual_seed(0)
    return AutoencoderKLWan(base_dim=3, z_dim=4, dim_mult=[1, 1, 1, 1], num_res_blocks=1,
                            temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                            latents_std=[1.0] * 4).eval()


def text(seed: int = 0) -> torch.Tensor:
    return torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(seed))


def test_standard_plan_on_wan_is_the_stock_wan_pipeline():
    transformer, vae = wan(), tiny_wan_vae()
    stock = WanPipeline(tokenizer=None, text_encoder=None, transformer=transformer, vae=vae,
                        scheduler=FlowMatchEulerDiscreteScheduler(shift=3.0))
    ours = FrameAwareVideoPipeline(transformer, FrameAwareFlowMatchScheduler(shift=3.0), vae=vae)
    for pipe in (stock, ours):
        pipe.set_progress_bar_config(disable=True)
    latents = torch.randn(1, 4, 2, 8, 8, generator=torch.Generator().manual_seed(0))
    call = dict(prompt_embeds=text(), num_frames=5, height=64, width=64, num_inference_steps=6, guidance_scale=1.0,
                latents=latents, output_type="np")
    expected = stock(**call).frames
    frames = ours(**call).frames
    assert frames.shape == expected.shape == (1, 5, 64, 64, 3)
    np.testing.assert_allclose(frames, expected, rtol=0, atol=1e-5)
    # With classifier-free guidance both combine the same two predictions.
    call |= dict(guidance_scale=3.0, negative_prompt_embeds=text(1))
    np.testing.assert_allclose(ours(**call).frames, stock(**call).frames, rtol=0, atol=1e-5)


def test_image_to_video_through_a_vae_keeps_the_encoded_first_frame():
    vae = tiny_wan_vae()
    pipe = FrameAwareVideoPipeline(wan(), FrameAwareFlowMatchScheduler(shift=3.0), vae=vae)
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 64, 64, generator=torch.Generator().manual_seed(0))
    latents = pipe(prompt_embeds=text(), num_frames=5, height=64, width=64, num_inference_steps=3,
                   conditioning_frames={0: image}, output_type="latent").frames
    encoded = vae.encode((2 * image - 1)[None, :, None]).latent_dist.mode()[:, :, 0]  # latents_mean 0, std 1
    assert latents.shape == (1, 4, 2, 8, 8)
    torch.testing.assert_close(latents[:, :, 0], encoded, rtol=0, atol=1e-6)


@pytest.mark.parametrize("make_backbone", [wan, skyreels, ltx], ids=["wan", "skyreels-v2", "ltx-video"])
def test_every_backbone_family_runs_image_to_video_in_pixel_space(make_backbone):
    pipe = FrameAwareVideoPipeline(make_backbone(in_channels=3, out_channels=3), FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    image = torch.rand(3, 8, 8, generator=torch.Generator().manual_seed(0))  # (C, H, W) in [0, 1]
    output = pipe(prompt_embeds=text(), num_frames=4, height=8, width=8, num_inference_steps=3,
                  conditioning_frames={0: image}, generator=torch.Generator().manual_seed(0), output_type="pt")
    assert output.frames.shape == (1, 4, 3, 8, 8)
    torch.testing.assert_close(output.frames[0, 0], image, rtol=0, atol=1e-6)  # the given frame, unchanged
    assert not torch.equal(output.plan.levels[:, 0], output.plan.levels[:, 1])


def pixel_pipeline() -> FrameAwareVideoPipeline:
    pipe = FrameAwareVideoPipeline(wan(in_channels=3, out_channels=3), FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_call(seed: int = 0, **overrides) -> dict:
    return dict(prompt_embeds=text(), num_frames=4, height=8, width=8, num_inference_steps=3,
                generator=torch.Generator().manual_seed(seed)) | overrides


def test_output_types_callbacks_and_same_seed_same_output():
    pipe = pixel_pipeline()
    frames = pipe(**pixel_call()).frames
    assert frames.shape == (1, 4, 8, 8, 3) and frames.min() >= 0 and frames.max() <= 1
    np.testing.assert_array_equal(pipe(**pixel_call()).frames, frames)
    assert not np.array_equal(pipe(**pixel_call(seed=1)).frames, frames)
    assert pipe(**pixel_call(output_type="latent")).frames.shape == (1, 3, 4, 8, 8)
    pil = pipe(**pixel_call(output_type="pil")).frames
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (8, 8)
    seen = []

    def record(pipeline, step, timesteps, tensors):
        seen.append((step, tuple(timesteps.shape), tensors["latents"].shape))
        return {"latents": tensors["latents"] * 0}

    zeroed = pipe(**pixel_call(callback_on_step_end=record, output_type="latent")).frames
    assert seen == [(k, (4,), (1, 3, 4, 8, 8)) for k in range(3)] and torch.equal(zeroed, torch.zeros_like(zeroed))


def test_save_and_load_round_trip_gives_the_same_video(tmp_path):
    pipe = pixel_pipeline()
    expected = pipe(**pixel_call()).frames
    pipe.save_pretrained(tmp_path)
    loaded = FrameAwareVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FrameAwareFlowMatchScheduler) and loaded.vae is None
    np.testing.assert_array_equal(loaded(**pixel_call()).frames, expected)


def test_rolling_window_cost_is_constant_per_new_frame():
    pipe = pixel_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda module, args: calls.append(1))
    video = pipe(**pixel_call(num_frames=10, window_frames=4, context_frames=2, output_type="latent")).frames
    # Windows of 4 latent frames: the first makes 4, each later one 2 new frames -> 1 + 3 windows of 3 steps.
    assert video.shape == (1, 3, 10, 8, 8) and len(calls) == 4 * 3


@pytest.mark.parametrize("call, message", [
    (dict(output_type="gif"), "output_type"),
    (dict(plan=FrameTimestepPlan.standard([1.0, 0.5, 0.0], 3)), "the plan has 3 frames"),
    (dict(plan=[[1.0] * 4, [0.0] * 4]), "plan must be a FrameTimestepPlan"),
    (dict(window_frames=5), "window_frames"),
    (dict(num_frames=8, window_frames=4, context_frames=4), "context_frames"),
    (dict(conditioning_frames={4: torch.rand(3, 8, 8)}), "conditioning_frames keys"),
    (dict(conditioning_frames={0: torch.rand(3, 16, 16)}), "conditioning frame 0 is 16x16 pixels"),
    (dict(conditioning_frames={1: torch.rand(3, 8, 8)}, plan=FrameTimestepPlan.standard([1.0, 0.0], 4)),
     "keep the conditioning frames"),
    (dict(guidance_scale=0.5), "guidance_scale"),
    (dict(callback_on_step_end_tensor_inputs=["noise"]), "callback_on_step_end_tensor_inputs"),
    (dict(height=9), "height must be a positive multiple of 2"),
])
def test_bad_inputs_raise_before_any_model_call(call, message):
    pipe = pixel_pipeline()
    pipe.transformer.register_forward_pre_hook(lambda *_: pytest.fail("the model ran"))
    with pytest.raises(ValueError, match=message):
        pipe(**pixel_call(**call))


def test_frame_counts_a_vae_cannot_take_and_unsupported_components_raise():
    vae = tiny_wan_vae()
    pipe = FrameAwareVideoPipeline(wan(), FrameAwareFlowMatchScheduler(), vae=vae)
    with pytest.raises(ValueError, match="num_frames=6 cannot be encoded"):
        pipe(prompt_embeds=text(), num_frames=6, height=64, width=64)
    with pytest.raises(ValueError, match="only frame 0 can be given"):
        pipe(prompt_embeds=text(), num_frames=9, height=64, width=64, conditioning_frames={1: torch.rand(3, 64, 64)})
    with pytest.raises(ValueError, match="frame-aware scheduler"):
        FrameAwareVideoPipeline(wan(), FlowMatchEulerDiscreteScheduler())
    with pytest.raises(ValueError, match="WanTransformer3DModel"):
        FrameAwareVideoPipeline(torch.nn.Linear(2, 2), FrameAwareFlowMatchScheduler())


def test_prompts_are_encoded_with_zero_embeddings_at_padding_as_wan_does():
    from diffusers_ext.testing import tiny_clip_text_encoder, tiny_clip_tokenizer
    from diffusers_ext.testing.tiny_text import TINY_TEXT_WIDTH

    pipe = FrameAwareVideoPipeline(wan(text_dim=TINY_TEXT_WIDTH), FrameAwareFlowMatchScheduler(),
                                   text_encoder=tiny_clip_text_encoder(), tokenizer=tiny_clip_tokenizer())
    embeds = pipe.encode_prompt("a cat", 1, torch.device("cpu"), torch.float32)
    length = int(pipe.tokenizer("a cat", return_tensors="pt").attention_mask.sum())
    assert embeds.shape == (1, pipe.tokenizer.model_max_length, TINY_TEXT_WIDTH)
    assert embeds[:, :length].abs().min() > 0 and torch.equal(embeds[:, length:], torch.zeros_like(embeds[:, length:]))
    with pytest.raises(ValueError, match="no text encoder: pass prompt_embeds"):
        pixel_pipeline()(**pixel_call(prompt="a cat", prompt_embeds=None))
