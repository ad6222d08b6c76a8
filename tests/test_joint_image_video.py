"""JointImageVideoPipeline (JVID, arXiv 2409.14149): an image model and a video model taking turns on one video."""

import json

import numpy as np
import pytest
import torch
from diffusers import DiffusionPipeline, UNet2DModel
from huggingface_hub import ModelCard
from tiny_video import TEXT_DIM, wan

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.video import FrameAwareVideoPipeline, JointImageVideoPipeline, denoiser_schedule
from diffusers_ext.pipelines.video.pipeline_joint_image_video import image_prediction
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler
from diffusers_ext.testing import VideoGaussianMixtureDenoiser
from diffusers_ext.testing.metrics import SlicedWasserstein2
from diffusers_ext.testing.video_oracle import (
    JVID_ORACLE_LAW,
    autoregressive_video_mixture,
    consecutive_frame_pairs,
    frame_marginal_denoiser,
    frame_samples,
    lag_one_correlation,
    moment_matched_video_denoiser,
    single_mode_clip_share,
    with_mirror_images,
)

FRAMES, CLIPS, STEPS = 8, 500, 20
LAW = autoregressive_video_mixture(**JVID_ORACLE_LAW, num_frames=FRAMES)


def oracle_pipeline(video: str = "broad") -> JointImageVideoPipeline:
    """The exact image model of the law's frame marginal with a coarse video model: ``"broad"``, the right modes and
    correlation with twice the spread within a mode; ``"gaussian"``, the moment-matched one-component law."""
    scheduler = FrameAwareFlowMatchScheduler()
    if video == "broad":
        model = VideoGaussianMixtureDenoiser(**(JVID_ORACLE_LAW | {"scales": [0.6, 0.6]}), num_frames=FRAMES,
                                             scheduler_config=scheduler.config)
    else:
        model = moment_matched_video_denoiser(**JVID_ORACLE_LAW, num_frames=FRAMES, scheduler_config=scheduler.config)
    pipe = JointImageVideoPipeline(model, frame_marginal_denoiser(**JVID_ORACLE_LAW, scheduler_config=scheduler.config),
                                   scheduler)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def oracle_clips(pipe, schedule, steps: int = STEPS, seed: int = 0, clips: int = CLIPS) -> torch.Tensor:
    return pipe(num_frames=FRAMES, height=2, width=2, num_inference_steps=steps, num_videos_per_prompt=clips,
                generator=torch.Generator().manual_seed(seed), output_type="latent",
                denoiser_schedule=schedule).frames.double()


def test_image_steps_alone_denoise_every_frame_as_a_one_frame_clip():
    """Image steps alone are the frame-aware pipeline run on the image oracle (the exact denoiser of the law's frame
    marginal) with every frame as its own 1-frame clip, from the same noise: frames drawn independently from the
    exact marginal (the marginal oracle's sampling accuracy is test_frame_aware_pipeline's), with no temporal link."""
    pipe = oracle_pipeline()
    noise = torch.randn(CLIPS, 1, FRAMES, 2, 2, generator=torch.Generator().manual_seed(0))
    clips = pipe(num_frames=FRAMES, height=2, width=2, num_inference_steps=10, latents=noise, output_type="latent",
                 denoiser_schedule="image").frames
    frames = FrameAwareVideoPipeline(pipe.image_transformer, pipe.scheduler)
    frames.set_progress_bar_config(disable=True)
    one_frame_clips = noise.transpose(1, 2).reshape(CLIPS * FRAMES, 1, 1, 2, 2)
    expected = frames(num_frames=1, height=2, width=2, num_inference_steps=10, latents=one_frame_clips,
                      output_type="latent").frames.reshape(CLIPS, FRAMES, 1, 2, 2).transpose(1, 2)
    torch.testing.assert_close(clips, expected, rtol=1e-6, atol=1e-6)
    assert abs(lag_one_correlation(clips)) < 0.05 and single_mode_clip_share(clips, LAW) < 0.05


def test_video_steps_alone_are_the_frame_aware_pipeline():
    pipe = oracle_pipeline()
    alone = FrameAwareVideoPipeline(pipe.transformer, pipe.scheduler)
    alone.set_progress_bar_config(disable=True)
    call = dict(num_frames=FRAMES, height=2, width=2, num_inference_steps=5, num_videos_per_prompt=4,
                output_type="latent")
    expected = alone(generator=torch.Generator().manual_seed(0), **call).frames
    output = pipe(generator=torch.Generator().manual_seed(0), denoiser_schedule="video", **call)
    assert torch.equal(output.frames, expected) and output.denoisers == [["video"] * 5]


@pytest.fixture(scope="module")
def distances():
    """Sliced W2 of ``CLIPS`` clips' frames and neighbouring-frame pairs, with their mirror images, to a larger
    exact sample of the law with its mirror images (``with_mirror_images``: exact samples score 0.012 to 0.021)."""
    reference = with_mirror_images(LAW.sample(4 * CLIPS, torch.Generator().manual_seed(1)))
    return (SlicedWasserstein2(frame_samples(reference), 2 * CLIPS * FRAMES),
            SlicedWasserstein2(consecutive_frame_pairs(reference), 2 * CLIPS * (FRAMES - 1)))


def figures(clips: torch.Tensor, distances) -> dict[str, float]:
    frame_distance, pair_distance = distances
    clips = with_mirror_images(clips)
    true_lag_one = float(LAW.frame_correlation(1).mean())
    return {"frame": frame_distance(frame_samples(clips)), "pair": pair_distance(consecutive_frame_pairs(clips)),
            "lag-1 error": abs(lag_one_correlation(clips) - true_lag_one)}


def test_video_then_image_beats_both_models_alone_with_a_broad_video_model(distances):
    """Measured effect (benchmarks/joint_image_video.py prints the table): with the video model right about modes
    and correlation but twice too broad within a mode, the video model for the first 12 of 20 steps and the image
    model after gives neighbouring-frame pairs much closer to the law than either model alone (measured over three
    seeds 0.076-0.090 against 0.24-0.25 and 0.48-0.49), frames nearly as good as the image model's (0.05 against
    0.03; video 0.25) and a lag-1 error of 0.08 (video 0.02, image 0.99)."""
    pipe = oracle_pipeline("broad")
    video, image, joint = (figures(oracle_clips(pipe, schedule), distances)
                           for schedule in ("video", "image", ["video"] * 12 + ["image"] * 8))
    assert joint["pair"] < 0.5 * min(video["pair"], image["pair"]), (joint, video, image)
    assert joint["frame"] < 0.5 * video["frame"] and joint["lag-1 error"] < 0.2 * image["lag-1 error"]


def test_alternating_trades_one_models_strength_for_the_others_with_a_gaussian_video_model(distances):
    """With the moment-matched Gaussian video model (no modes at all), JVID's alternation lands between the two
    models: better frames than the video model's, a far better lag-1 correlation than the image model's, each worse
    than the other model's (measured over three seeds at 20 steps: frame SW2 0.51-0.53 against video 0.63-0.65 and
    image 0.03-0.04; lag-1 error 0.20-0.21 against 0.00 and 0.99-1.02)."""
    pipe = oracle_pipeline("gaussian")
    video, image, joint = (figures(oracle_clips(pipe, schedule), distances)
                           for schedule in ("video", "image", "alternate"))
    assert image["frame"] < joint["frame"] < video["frame"] - 0.05, (joint, video, image)
    assert video["lag-1 error"] < joint["lag-1 error"] < image["lag-1 error"] - 0.5, (joint, video, image)


def test_schedules_pick_the_model_of_every_step_and_restart_with_every_window():
    assert denoiser_schedule("alternate", 5) == ["video", "image", "video", "image", "video"]
    assert denoiser_schedule("random", 6, video_probability=0.0) == ["image"] * 6
    assert denoiser_schedule("random", 6, video_probability=1.0) == ["video"] * 6
    draws = [denoiser_schedule("random", 400, torch.Generator().manual_seed(seed), 0.25) for seed in (0, 0, 1)]
    assert draws[0] == draws[1] != draws[2] and 0.18 < draws[0].count("video") / 400 < 0.32
    pipe = oracle_pipeline()
    calls = []
    pipe.transformer.register_forward_pre_hook(lambda *_: calls.append("video"))
    pipe.image_transformer.register_forward_pre_hook(lambda *_: calls.append("image"))
    output = pipe(num_frames=12, height=2, width=2, num_inference_steps=4, window_frames=FRAMES, context_frames=4,
                  denoiser_schedule=["image", "video", "video", "image"], output_type="latent",
                  generator=torch.Generator().manual_seed(0))
    assert output.denoisers == [["image", "video", "video", "image"]] * 2 and calls == ["image", "video", "video", "image"] * 2
    random = pipe(num_frames=FRAMES, height=2, width=2, num_inference_steps=30, denoiser_schedule="random",
                  generator=torch.Generator().manual_seed(3), output_type="latent")
    assert 0 < random.denoisers[0].count("video") < 30


# Tiny random Wan transformers on pixels (3 channels), the image one called on single frames ------------------------

def pixel_pipeline(image_model=None) -> JointImageVideoPipeline:
    pipe = JointImageVideoPipeline(wan(in_channels=3, out_channels=3),
                                   image_model or wan(in_channels=3, out_channels=3, seed=1),
                                   FrameAwareFlowMatchScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def pixel_call(seed: int = 0, **overrides) -> dict:
    return dict(prompt_embeds=torch.randn(1, 5, TEXT_DIM, generator=torch.Generator().manual_seed(9)), num_frames=4,
                height=8, width=8, num_inference_steps=3, generator=torch.Generator().manual_seed(seed)) | overrides


def test_output_types_callbacks_guidance_and_same_seed_same_output():
    pipe = pixel_pipeline()
    frames = pipe(**pixel_call()).frames
    assert frames.shape == (1, 4, 8, 8, 3) and frames.min() >= 0 and frames.max() <= 1
    np.testing.assert_array_equal(pipe(**pixel_call()).frames, frames)
    assert not np.array_equal(pipe(**pixel_call(seed=1)).frames, frames)
    assert not np.array_equal(pipe(**pixel_call(denoiser_schedule="video")).frames, frames)
    pil = pipe(**pixel_call(output_type="pil")).frames
    assert len(pil) == 1 and len(pil[0]) == 4 and pil[0][0].size == (8, 8)
    guided = pipe(**pixel_call(guidance_scale=3.0, negative_prompt_embeds=torch.zeros(1, 5, TEXT_DIM)))
    assert not np.array_equal(guided.frames, frames)
    seen = []

    def record(pipeline, step, timesteps, tensors):
        seen.append(step)
        return {"latents": tensors["latents"] * 0}

    zeroed, plan, denoisers = pipe(**pixel_call(callback_on_step_end=record, output_type="latent", return_dict=False))
    assert seen == [0, 1, 2] and torch.equal(zeroed, torch.zeros_like(zeroed))
    assert plan.num_steps == 3 and denoisers == [["video", "image", "video"]]


def test_save_and_load_round_trip_gives_the_same_video(tmp_path):
    pipe = pixel_pipeline()
    expected = pipe(**pixel_call()).frames
    pipe.save_pretrained(tmp_path)
    loaded = JointImageVideoPipeline.from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    assert isinstance(loaded.scheduler, FrameAwareFlowMatchScheduler) and loaded.vae is None
    np.testing.assert_array_equal(loaded(**pixel_call()).frames, expected)


def test_save_for_hub_then_stock_from_pretrained_makes_the_same_video(tmp_path):
    pipe = pixel_pipeline()
    expected = pipe(**pixel_call(denoiser_schedule=["video", "image", "image"])).frames
    save_for_hub(pipe, tmp_path, card_template="joint_video", repo_id="me/tiny-jvid", title="tiny JVID")
    index = json.loads((tmp_path / "model_index.json").read_text())
    assert index["_class_name"] == ["diffusers_ext_pipeline", "JointImageVideoPipeline"]
    assert index["image_transformer"] == index["transformer"] == ["diffusers", "WanTransformer3DModel"]
    card = ModelCard.load(tmp_path / "README.md")
    assert 'DiffusionPipeline.from_pretrained("me/tiny-jvid", trust_remote_code=True)' in card.text
    assert {"joint-image-video-pipeline", "arxiv:2409.14149"} <= set(card.data.tags)
    loaded = DiffusionPipeline.from_pretrained(tmp_path, trust_remote_code=True)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded) is JointImageVideoPipeline
    np.testing.assert_array_equal(loaded(**pixel_call(denoiser_schedule=["video", "image", "image"])).frames,
                                  expected)


def tiny_unet(channels: int = 3) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=channels, out_channels=channels, layers_per_block=1,
                       block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).eval()


def test_a_2d_unet_denoises_every_frame_on_its_own():
    unet = tiny_unet()
    latents = torch.randn(2, 3, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    timesteps = torch.tensor([[900.0, 700.0, 500.0, 0.0], [100.0, 200.0, 300.0, 400.0]])
    with torch.no_grad():
        batched = image_prediction(unet, latents, timesteps)
        one_by_one = torch.stack([torch.stack([unet(latents[b:b + 1, :, f], timesteps[b, f:f + 1]).sample[0]
                                               for f in range(4)], dim=1) for b in range(2)])
    torch.testing.assert_close(batched, one_by_one, rtol=1e-5, atol=1e-5)
    assert pixel_pipeline(image_model=unet)(**pixel_call(output_type="latent")).frames.shape == (1, 3, 4, 8, 8)


@pytest.mark.parametrize("call, message", [
    (dict(denoiser_schedule="sometimes"), "denoiser_schedule must be one of"),
    (dict(denoiser_schedule=["video", "audio", "image"]), "denoiser_schedule must be one of"),
    (dict(denoiser_schedule=["video", "image"]), "denoiser_schedule has 2 entries; every window walks 3 steps"),
    (dict(num_frames=8, window_frames=4, context_frames=2, num_inference_steps=2,
          denoiser_schedule=["video", "image", "video"]), "every window walks 2 steps"),
    (dict(denoiser_schedule="random", video_probability=1.5), "video_probability"),
    (dict(output_type="gif"), "output_type"),
])
def test_bad_inputs_raise_before_any_model_call(call, message):
    pipe = pixel_pipeline()
    for model in (pipe.transformer, pipe.image_transformer):
        model.register_forward_pre_hook(lambda *_: pytest.fail("a model ran"))
    with pytest.raises(ValueError, match=message):
        pipe(**pixel_call(**call))


def test_image_models_outside_the_video_models_latent_space_are_refused():
    scheduler = FrameAwareFlowMatchScheduler()
    video = wan(in_channels=3, out_channels=3)
    with pytest.raises(ValueError, match="share one latent space: the image model takes / returns"):
        JointImageVideoPipeline(video, wan(in_channels=4, out_channels=4), scheduler)
    with pytest.raises(ValueError, match="share one latent space"):
        JointImageVideoPipeline(video, tiny_unet(channels=4), scheduler)
    with pytest.raises(ValueError, match="image_transformer must be one of UNet2DModel"):
        JointImageVideoPipeline(video, torch.nn.Linear(3, 3), scheduler)
    config = dict(scheduler_config=scheduler.config)
    oracle_video = VideoGaussianMixtureDenoiser(**JVID_ORACLE_LAW, num_frames=FRAMES, **config)
    with pytest.raises(ValueError, match="1-frame clips"):
        JointImageVideoPipeline(oracle_video, VideoGaussianMixtureDenoiser(**JVID_ORACLE_LAW, num_frames=2, **config),
                                scheduler)
    wide = JVID_ORACLE_LAW | {"frame_shape": (1, 1, 4)}
    with pytest.raises(ValueError, match=r"frames \(1, 1, 4\) vs \(1, 2, 2\)"):
        JointImageVideoPipeline(oracle_video, frame_marginal_denoiser(**wide, **config), scheduler)
    with pytest.raises(ValueError, match="predict the same target"):
        JointImageVideoPipeline(oracle_video, frame_marginal_denoiser(**JVID_ORACLE_LAW, prediction_type="sample",
                                                                      **config), scheduler)
