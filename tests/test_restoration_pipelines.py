"""The four restoration pipelines from tiny random components: interop (output types, save / load, the Hub helper
through stock ``DiffusionPipeline.from_pretrained``), determinism, latent space, callbacks, and bad inputs."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import AutoencoderKL, DiffusionPipeline, UNet2DModel

from diffusers_ext.pipelines.restoration import (
    BridgePipeline,
    MeanRevertingPipeline,
    RDDMPipeline,
    ResShiftPipeline,
    RestorationPipeline,
)
from diffusers_ext.schedulers.scheduling_bridge import BridgeScheduler
from diffusers_ext.schedulers.scheduling_mean_reverting import MeanRevertingScheduler
from diffusers_ext.schedulers.scheduling_rddm import RDDMScheduler
from diffusers_ext.schedulers.scheduling_resshift import ResShiftScheduler

METHODS = {
    "rddm": (RDDMPipeline, lambda: RDDMScheduler(prediction_type="residual_and_noise"), 4),
    "resshift": (ResShiftPipeline, ResShiftScheduler, 4),
    "mean_reverting": (MeanRevertingPipeline, MeanRevertingScheduler, 4),
    "bridge": (BridgePipeline, BridgeScheduler, 4),
}


def tiny_unet(state_channels: int = 3, output_factor: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=16, in_channels=2 * state_channels, out_channels=output_factor * state_channels,
                       block_out_channels=(8, 16), layers_per_block=1, norm_num_groups=4,
                       down_block_types=("DownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "UpBlock2D"))


def tiny_vae() -> AutoencoderKL:
    torch.manual_seed(0)
    return AutoencoderKL(block_out_channels=(8, 8), in_channels=3, out_channels=3, latent_channels=4,
                         down_block_types=("DownEncoderBlock2D",) * 2, up_block_types=("UpDecoderBlock2D",) * 2,
                         norm_num_groups=4, sample_size=16).eval()


def make_pipeline(method: str, vae=None, upscale_factor: int = 1) -> RestorationPipeline:
    pipeline_class, make_scheduler, _ = METHODS[method]
    scheduler = make_scheduler()
    unet = tiny_unet(4 if vae is not None else 3, scheduler.model_output_channels_factor)
    pipe = pipeline_class(unet=unet.eval(), scheduler=scheduler, vae=vae, upscale_factor=upscale_factor)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def degraded_image(size=(16, 16), batch: int = 1) -> torch.Tensor:
    return torch.rand(batch, 3, *size, generator=torch.Generator().manual_seed(7))


def run(pipe, image=None, seed: int = 0, **kwargs):
    image = degraded_image() if image is None else image
    kwargs.setdefault("num_inference_steps", METHODS_STEPS.get(type(pipe), 4))
    kwargs.setdefault("output_type", "np")
    return pipe(image, generator=torch.Generator().manual_seed(seed), **kwargs).images


METHODS_STEPS = {pipeline_class: steps for pipeline_class, _, steps in METHODS.values()}


@pytest.mark.parametrize("method", METHODS)
def test_output_types_shapes_and_determinism(method):
    pipe = make_pipeline(method)
    first = run(pipe)
    assert first.shape == (1, 16, 16, 3) and np.isfinite(first).all()
    assert first.min() >= 0 and first.max() <= 1
    np.testing.assert_array_equal(first, run(pipe))
    assert isinstance(run(pipe, output_type="pil")[0], PIL.Image.Image)
    assert run(pipe, output_type="pt").shape == (1, 3, 16, 16)
    assert run(pipe, output_type="latent").shape == (1, 3, 16, 16)


@pytest.mark.parametrize("method", METHODS)
def test_save_pretrained_round_trip_and_hub_helper(method, tmp_path):
    from diffusers_ext.hub import save_for_hub

    pipe = make_pipeline(method)
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "plain")
    loaded = type(pipe).from_pretrained(tmp_path / "plain")
    loaded.set_progress_bar_config(disable=True)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    np.testing.assert_allclose(run(loaded), expected, atol=1e-4)

    save_for_hub(pipe, tmp_path / "hub", card_template="restoration", repo_id="me/tiny-restoration",
                 pipeline_tag="image-to-image")
    with pytest.raises(ValueError, match="trust_remote_code"):
        DiffusionPipeline.from_pretrained(tmp_path / "hub")
    from_hub = DiffusionPipeline.from_pretrained(tmp_path / "hub", trust_remote_code=True)
    from_hub.set_progress_bar_config(disable=True)
    assert type(from_hub) is type(pipe)
    np.testing.assert_allclose(run(from_hub), expected, atol=1e-4)
    card = (tmp_path / "hub" / "README.md").read_text()
    assert "image-to-image" in card and type(pipe.scheduler).__name__ in card


def test_stochastic_samplers_depend_on_the_seed():
    pipe = make_pipeline("resshift")
    assert np.abs(run(pipe, seed=0) - run(pipe, seed=1)).max() > 1e-3


def test_super_resolution_sizes_padding_and_pil_numpy_inputs():
    pipe = make_pipeline("resshift", upscale_factor=4)
    assert run(pipe, degraded_image((4, 4))).shape == (1, 16, 16, 3)
    # 13 x 9 upscaled is 52 x 36, not a multiple of the UNet's 2: padded for the model, cropped back.
    assert run(pipe, degraded_image((13, 9))).shape == (1, 52, 36, 3)
    array = np.random.default_rng(0).random((5, 6, 3))
    assert run(pipe, array).shape == (1, 20, 24, 3)
    image = PIL.Image.fromarray((array * 255).astype(np.uint8))
    assert run(pipe, [image, image]).shape == (2, 20, 24, 3)
    assert run(pipe, degraded_image((4, 4)), upscale_factor=1, output_size=(4, 4)).shape == (1, 4, 4, 3)


@pytest.mark.parametrize("method", ["resshift", "bridge"])
def test_latent_space_with_an_autoencoder(method, tmp_path):
    pipe = make_pipeline(method, vae=tiny_vae())
    images = run(pipe, degraded_image((16, 16)))
    assert images.shape == (1, 16, 16, 3)
    assert run(pipe, output_type="latent").shape == (1, 4, 8, 8)
    pipe.save_pretrained(tmp_path)
    loaded = type(pipe).from_pretrained(tmp_path)
    loaded.set_progress_bar_config(disable=True)
    np.testing.assert_allclose(run(loaded), images, atol=1e-5)


def test_callback_on_step_end_sees_and_replaces_the_state():
    pipe = make_pipeline("rddm")
    seen = []

    def callback(pipeline, i, t, tensors):
        seen.append((i, tuple(tensors)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 3 else {}

    result = run(pipe, output_type="pt", callback_on_step_end=callback,
                 callback_on_step_end_tensor_inputs=["latents", "degraded_latents"])
    assert [i for i, _ in seen] == [0, 1, 2, 3]
    assert seen[0][1] == ("latents", "degraded_latents")
    assert torch.allclose(result, torch.full_like(result, 0.5))  # the zero state, decoded from [-1, 1]


@pytest.mark.parametrize("method", METHODS)
def test_progress_bar_counts_the_steps(method, capsys):
    pipe = make_pipeline(method)
    pipe.set_progress_bar_config(disable=False)
    run(pipe)
    assert "4/4" in capsys.readouterr().err


def test_bad_inputs_give_clear_errors():
    pipe = make_pipeline("resshift", upscale_factor=4)
    with pytest.raises(ValueError, match="3-channel"):
        pipe(torch.rand(1, 4, 8, 8))
    with pytest.raises(ValueError, match="3-channel"):
        pipe(np.random.default_rng(0).random((8, 8)))
    with pytest.raises(ValueError, match="NaN"):
        pipe(torch.full((1, 3, 8, 8), float("nan")))
    with pytest.raises(ValueError, match="too small"):
        pipe(torch.rand(1, 3, 1, 1), upscale_factor=1)
    with pytest.raises(ValueError, match="requested"):
        pipe(torch.rand(1, 3, 8, 8), output_size=(64, 64))
    with pytest.raises(ValueError, match="upscale_factor"):
        pipe(torch.rand(1, 3, 8, 8), upscale_factor=0)
    with pytest.raises(ValueError, match="output_type"):
        pipe(torch.rand(1, 3, 8, 8), output_type="jpeg")
    with pytest.raises(ValueError, match="callback_on_step_end_tensor_inputs"):
        pipe(torch.rand(1, 3, 8, 8), callback_on_step_end=lambda *a: {}, callback_on_step_end_tensor_inputs=["x"])
    with pytest.raises(ValueError, match="share one size"):
        pipe([np.zeros((4, 4, 3)), np.zeros((8, 8, 3))])
    with pytest.raises(ValueError, match="PIL image"):
        pipe("degraded.png")


def test_mismatched_components_give_clear_errors():
    with pytest.raises(ValueError, match="needs a ResShiftScheduler"):
        ResShiftPipeline(unet=tiny_unet(), scheduler=RDDMScheduler())
    pipe = RDDMPipeline(unet=tiny_unet(), scheduler=RDDMScheduler(prediction_type="residual_and_noise"))
    with pytest.raises(ValueError, match="return 6"):
        pipe(degraded_image())


@pytest.mark.parametrize("method", sorted(METHODS))
def test_a_pipeline_built_from_a_unet_alone_samples_with_its_papers_scheduler(method):
    pipeline_class, _, _ = METHODS[method]
    default = pipeline_class.scheduler_class()
    pipe = pipeline_class(unet=tiny_unet(3, default.model_output_channels_factor).eval())
    pipe.set_progress_bar_config(disable=True)
    assert type(pipe.scheduler) is pipeline_class.scheduler_class and pipe.scheduler.config == default.config
    assert np.isfinite(run(pipe)).all()
