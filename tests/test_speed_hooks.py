"""What every speed hook promises: attached it changes the run, detached the pipeline is exactly as before (same output
for the same seed, same scheduler and processor objects, no hook left), its settings round-trip as a small JSON, and
bad settings or pipelines it cannot serve get a clear ValueError at construction or attach."""

import json

import numpy as np
import pytest
import torch
from diffusers import FlowMatchEulerDiscreteScheduler, LCMScheduler, StableDiffusionImg2ImgPipeline
from tiny_pipelines import (
    STABLE_DIFFUSION_DDIM,
    TEXT_DIM,
    flux_inputs,
    hook_state,
    sd3_inputs,
    sd_pipeline,
    stable_diffusion_inputs,
    tiny_flux,
    tiny_sd3,
    tiny_stable_diffusion,
)

import diffusers_ext.hooks as hooks
from diffusers_ext.hooks import (
    AttentionEntropyScaling,
    FasterDiffusion,
    FeatureInheritance,
    RegionAdaptiveSampling,
    SpeedHook,
    StreamPipeline,
    TStitch,
)
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG


def sd3_pipeline():
    return tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))


def small_unet():
    """Another denoiser for the same latents: the tiny UNet with perturbed weights."""
    unet = sd_pipeline().unet
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for parameter in unet.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return unet


# (pipeline factory, inputs, hook factory) for each hook on a pipeline it serves, with settings that change the run.
CASES = {
    "faster-diffusion": (sd_pipeline, stable_diffusion_inputs, lambda: FasterDiffusion(key_steps=[0, 2])),
    "feature-inheritance": (sd_pipeline, stable_diffusion_inputs,
                            lambda: FeatureInheritance(modules=["mid_block", "up_blocks.0"])),
    "ras-sd3": (sd3_pipeline, sd3_inputs, lambda: RegionAdaptiveSampling(start_step=1, reference_steps=4,
                                                                          error_reset_steps=[])),
    "ras-flux": (tiny_flux, flux_inputs, lambda: RegionAdaptiveSampling(start_step=1, reference_steps=4,
                                                                         error_reset_steps=[])),
    "t-stitch": (sd_pipeline, stable_diffusion_inputs, lambda: TStitch(small=small_unet(), fraction=0.5)),
    "attention-scaling-sd": (sd_pipeline, lambda **k: stable_diffusion_inputs(height=16, width=16, **k),
                             lambda: AttentionEntropyScaling()),
    "attention-scaling-sd3": (sd3_pipeline, lambda **k: sd3_inputs(height=16, width=16, **k),
                              lambda: AttentionEntropyScaling()),
    "attention-scaling-flux": (tiny_flux, lambda **k: flux_inputs(height=32, width=32, **k),
                               lambda: AttentionEntropyScaling(train_latent_size=8)),
}


@pytest.mark.parametrize("case", CASES)
def test_attached_hook_changes_the_run_and_detached_pipeline_is_exactly_as_before(case):
    make_pipe, inputs, make_hook = CASES[case]
    pipe = make_pipe()
    stock = pipe(**inputs()).images
    before = hook_state(pipe)
    hook = make_hook()
    with hook.attached(pipe) as attached:
        assert attached is hook and hook.pipeline is pipe
        accelerated = pipe(**inputs()).images
        again = pipe(**inputs()).images
    assert hook.pipeline is None
    np.testing.assert_array_equal(accelerated, again)  # per-run state is reset between runs
    assert not np.array_equal(accelerated, stock)
    assert hook_state(pipe) == before
    np.testing.assert_array_equal(pipe(**inputs()).images, stock)
    # Attaching again after a detach works the same.
    with hook.attached(pipe):
        np.testing.assert_array_equal(pipe(**inputs()).images, accelerated)


def test_stream_pipeline_leaves_the_pipeline_untouched():
    pipe = tiny_stable_diffusion(LCMScheduler(**STABLE_DIFFUSION_DDIM))
    img2img = StableDiffusionImg2ImgPipeline(**pipe.components)
    before, timesteps = hook_state(img2img), img2img.scheduler.timesteps
    embeds = torch.randn(1, 4, TEXT_DIM, generator=torch.Generator().manual_seed(0))
    with StreamPipeline(guidance="self", guidance_scale=1.5).attached(img2img) as stream:
        stream.prepare(prompt_embeds=embeds)
        frame = stream(torch.rand(1, 3, 8, 8, generator=torch.Generator().manual_seed(1)), output_type="np")
    assert frame.shape == (1, 8, 8, 3) and np.isfinite(frame).all()
    assert hook_state(img2img) == before and img2img.scheduler.timesteps is timesteps


SAVED = [
    FasterDiffusion(key_steps=[0, 1, 4], reference_steps=10, reuse_controlnet=False),
    FeatureInheritance(modules=["mid_block"], interval=3, warmup_steps=2),
    RegionAdaptiveSampling(sample_ratio=0.25, start_step=2, error_reset_steps=[5], reference_steps=10,
                           starvation_scale=0.5, high_ratio=0.0),
    AttentionEntropyScaling(train_latent_size=96),
    StreamPipeline(num_inference_steps=8, strength=0.5, guidance="initialize", guidance_scale=1.5, delta=0.8,
                   similarity_threshold=0.95, max_skipped_frames=3, seed=4),
]


@pytest.mark.parametrize("hook", SAVED, ids=lambda h: type(h).__name__)
def test_settings_round_trip_as_a_small_json(hook, tmp_path):
    hook.save_pretrained(tmp_path)
    (saved,) = tmp_path.iterdir()
    assert saved.name == "speed_hook_config.json" and saved.stat().st_size < 1024
    assert json.loads(saved.read_text())["_class_name"] == type(hook).__name__
    loaded = type(hook).from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(hook.config)


def test_t_stitch_settings_save_without_the_model(tmp_path):
    small = small_unet()
    TStitch(small=small, fraction=0.3).save_pretrained(tmp_path)
    saved = json.loads((tmp_path / "speed_hook_config.json").read_text())
    assert saved["fraction"] == 0.3 and "small" not in saved
    loaded = TStitch.from_pretrained(tmp_path, small=small)
    assert loaded.small is small and loaded.config.fraction == 0.3
    with pytest.raises(ValueError, match="needs the small denoiser"):
        TStitch.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="unexpected arguments"):
        TStitch.from_pretrained(tmp_path, small=small, fractoin=0.5)


@pytest.mark.parametrize(("make", "message"), [
    (lambda: FasterDiffusion(key_steps=[0, -1]), "key_steps"),
    (lambda: FasterDiffusion(key_steps="0,1"), "key_steps"),
    (lambda: FasterDiffusion(reference_steps=0), "reference_steps"),
    (lambda: FasterDiffusion(reuse_controlnet="yes"), "reuse_controlnet"),
    (lambda: FeatureInheritance(), "modules"),
    (lambda: FeatureInheritance(modules="mid_block"), "modules"),
    (lambda: FeatureInheritance(modules=["mid_block"], interval=0), "interval"),
    (lambda: RegionAdaptiveSampling(sample_ratio=0.0), "sample_ratio"),
    (lambda: RegionAdaptiveSampling(sample_ratio=1.5), "sample_ratio"),
    (lambda: RegionAdaptiveSampling(start_step=0), "start_step"),
    (lambda: RegionAdaptiveSampling(starvation_scale=-1), "starvation_scale"),
    (lambda: RegionAdaptiveSampling(high_ratio=2), "high_ratio"),
    (lambda: TStitch(small=None), "small denoiser"),
    (lambda: TStitch(small=small_unet(), fraction=1.2), "fraction"),
    (lambda: TStitch(small=small_unet(), small_inputs="map"), "small_inputs"),
    (lambda: AttentionEntropyScaling(train_latent_size=0), "train_latent_size"),
    (lambda: StreamPipeline(guidance="residual"), "guidance"),
    (lambda: StreamPipeline(num_inference_steps=4, strength=0.1), "at least 1 step"),
    (lambda: StreamPipeline(strength=0), "strength"),
    (lambda: StreamPipeline(similarity_threshold=1.5), "similarity_threshold"),
    (lambda: StreamPipeline(max_skipped_frames=-1), "max_skipped_frames"),
])
def test_bad_settings_are_refused_when_the_hook_is_made(make, message):
    with pytest.raises(ValueError, match=message):
        make()


@pytest.mark.parametrize(("make_hook", "make_pipe", "message"), [
    (FasterDiffusion, sd3_pipeline, "UNet2DConditionModel, UNet2DModel"),
    (lambda: RegionAdaptiveSampling(), sd_pipeline, "SD3Transformer2DModel, FluxTransformer2DModel"),
    (lambda: StreamPipeline(), sd3_pipeline, "Stable Diffusion 1.x / 2.x"),
    (lambda: AttentionEntropyScaling(), tiny_flux, "pass train_latent_size"),
    (lambda: FeatureInheritance(modules=["mid_blok"]), sd_pipeline, "no sub-module 'mid_blok'"),
    (lambda: TStitch(small=lambda sample: sample), sd3_pipeline, "small_inputs"),
    (FasterDiffusion, lambda: object(), "needs a pipeline with a denoiser"),
])
def test_pipelines_a_hook_cannot_serve_are_refused_at_attach_and_left_untouched(make_hook, make_pipe, message):
    pipe = make_pipe()
    before = hook_state(pipe) if hasattr(pipe, "components") else None
    hook = make_hook()
    with pytest.raises(ValueError, match=message):
        hook.attach(pipe)
    assert hook.pipeline is None
    if before is not None:
        assert hook_state(pipe) == before


def test_a_hook_attaches_to_one_pipeline_at_a_time():
    pipe = sd_pipeline()
    before = hook_state(pipe)
    hook = FasterDiffusion()
    with hook.attached(pipe):
        with pytest.raises(ValueError, match="already attached to a pipeline"):
            hook.attach(sd_pipeline())
        with pytest.raises(ValueError, match="already attached to this UNet2DConditionModel"):
            FasterDiffusion().attach(pipe)
    assert hook_state(pipe) == before


def test_processors_replaced_by_the_user_are_refused_not_overwritten():
    from diffusers.models.attention_processor import AttnProcessor

    pipe = sd3_pipeline()
    pipe.transformer.transformer_blocks[0].attn.set_processor(AttnProcessor())
    with pytest.raises(ValueError, match="uses AttnProcessor"):
        RegionAdaptiveSampling().attach(pipe)
    with pytest.raises(ValueError, match="uses AttnProcessor"):
        AttentionEntropyScaling().attach(pipe)


def test_every_hook_is_exported():
    exported = {name for name in hooks.__all__ if isinstance(getattr(hooks, name), type)}
    subclasses = {cls.__name__ for cls in SpeedHook.__subclasses__()}
    assert subclasses <= exported
