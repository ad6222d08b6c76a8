"""DiffusionMBIRPipeline on tiny components: slice batching and axes, outputs, reproducibility, save / load (plain and
through the Hub layout with stock ``DiffusionPipeline.from_pretrained``), the callback, the z-TV effect on an exact
slice law, and bad inputs refused before the UNet runs."""

import numpy as np
import PIL.Image
import pytest
import torch
from diffusers import DDIMScheduler, DDPMScheduler, DiffusionPipeline, EulerDiscreteScheduler, UNet2DModel

from diffusers_ext.hub import save_for_hub
from diffusers_ext.pipelines.three_d.pipeline_diffusion_mbir import DiffusionMBIRPipeline, default_admm_settings
from diffusers_ext.pipelines.three_d.volume_demo import TASKS
from diffusers_ext.pipelines.three_d.volume_operators import (
    ParallelBeamProjection,
    ThroughPlaneDownsampling,
    VolumeMask,
    sparse_view_angles,
)
from diffusers_ext.testing.volume_oracle import SliceMixtureVolumeLaw

VOLUME_SHAPE = (4, 8, 6)


def tiny_unet(in_channels: int = 1) -> UNet2DModel:
    torch.manual_seed(0)
    return UNet2DModel(sample_size=8, in_channels=in_channels, out_channels=in_channels, layers_per_block=1,
                       block_out_channels=(8, 8), norm_num_groups=4, down_block_types=("DownBlock2D",) * 2,
                       up_block_types=("UpBlock2D",) * 2).eval()


def tiny_pipeline(scheduler=None, unet=None) -> DiffusionMBIRPipeline:
    pipe = DiffusionMBIRPipeline(unet=unet or tiny_unet(), scheduler=scheduler or DDPMScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def masked_problem(shape=VOLUME_SHAPE):
    generator = torch.Generator().manual_seed(0)
    operator = VolumeMask(torch.rand(shape, generator=generator) < 0.5)
    return operator.forward(torch.rand(shape, generator=generator)), operator


def run(pipe, shape=VOLUME_SHAPE, seed=0, **kwargs):
    measurement, operator = masked_problem(shape)
    kwargs = {"num_inference_steps": 3, "generator": torch.Generator().manual_seed(seed), **kwargs}
    return pipe(measurement, operator, shape, **kwargs).volume


def recorded_unet_inputs(pipe) -> list[tuple[int, ...]]:
    shapes = []
    pipe.unet.register_forward_pre_hook(lambda module, args: shapes.append(tuple(args[0].shape)))
    return shapes


def test_slices_are_denoised_in_batches_along_the_chosen_axes():
    pipe = tiny_pipeline()
    shapes = recorded_unet_inputs(pipe)
    run(pipe, slice_batch_size=3, num_inference_steps=2)
    assert shapes == [(3, 1, 8, 6), (1, 1, 8, 6)] * 2
    shapes.clear()
    run(pipe, slice_batch_size=8, axis=2, num_inference_steps=1)
    assert shapes == [(6, 1, 4, 8)]
    shapes.clear()
    run(pipe, slice_batch_size=8, alternate_axes=(1, 0), num_inference_steps=3)
    assert shapes == [(8, 1, 4, 6), (4, 1, 8, 6), (8, 1, 4, 6)]


def test_outputs_and_reproducibility():
    pipe = tiny_pipeline()
    volume = run(pipe)
    assert isinstance(volume, np.ndarray) and volume.shape == VOLUME_SHAPE and volume.dtype == np.float32
    np.testing.assert_array_equal(run(pipe), volume)
    assert not np.allclose(run(pipe, seed=1), volume)
    tensor = run(pipe, output_type="pt")
    assert isinstance(tensor, torch.Tensor)
    np.testing.assert_array_equal(tensor.numpy(), volume)
    montage = run(pipe, output_type="montage")
    assert isinstance(montage, PIL.Image.Image) and montage.size == (2 * 6, 2 * 8)
    measurement, operator = masked_problem()
    (as_tuple,) = pipe(measurement, operator, VOLUME_SHAPE, num_inference_steps=3, return_dict=False,
                       generator=torch.Generator().manual_seed(0))
    np.testing.assert_array_equal(as_tuple, volume)


def test_sparse_view_ct_with_z_tv_runs_with_another_scheduler():
    size = 8
    operator = ParallelBeamProjection(sparse_view_angles(4), size)
    volume = torch.rand(3, size, size, generator=torch.Generator().manual_seed(0))
    pipe = tiny_pipeline(DDIMScheduler())
    result = pipe(operator.forward(volume), operator, (3, size, size), num_inference_steps=3, lambda_tv=0.04,
                  admm_iterations=2, cg_iterations=2, generator=torch.Generator().manual_seed(0)).volume
    assert result.shape == (3, size, size) and np.isfinite(result).all()


def test_save_and_load_round_trips_give_the_same_volume(tmp_path):
    pipe = tiny_pipeline()
    expected = run(pipe)
    pipe.save_pretrained(tmp_path / "plain")
    reloaded = DiffusionMBIRPipeline.from_pretrained(tmp_path / "plain")
    reloaded.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(reloaded), expected)
    save_for_hub(pipe, tmp_path / "hub", repo_id="me/tiny-mbir", title="tiny")
    stock = DiffusionPipeline.from_pretrained(tmp_path / "hub", trust_remote_code=True)
    assert type(stock).__name__ == "DiffusionMBIRPipeline"
    stock.set_progress_bar_config(disable=True)
    np.testing.assert_array_equal(run(stock), expected)
    assert "DiffusionMBIR" in (tmp_path / "hub" / "README.md").read_text()


def test_callback_sees_every_step_and_may_replace_the_state():
    pipe = tiny_pipeline()
    seen = []

    def callback(pipe, i, t, tensors):
        seen.append((i, tuple(tensors["latents"].shape)))
        return {"latents": torch.zeros_like(tensors["latents"])} if i == 2 else {}

    volume = run(pipe, callback_on_step_end=callback)
    assert seen == [(i, (4, 1, 8, 6)) for i in range(3)]
    np.testing.assert_array_equal(volume, np.full(VOLUME_SHAPE, 0.5, dtype=np.float32))


@pytest.mark.effect
def test_z_tv_makes_independent_slices_agree():
    """Slices drawn independently (an exact slice law) and measured in one pixel each: the TV across slices shrinks
    the slice-to-slice differences that slice-wise reconstruction leaves, and keeps the measured pixel."""
    law = SliceMixtureVolumeLaw([[0.4, 0.5, 0.5, 0.6]], [0.02], slice_shape=(2, 2))
    scheduler = DDPMScheduler(clip_sample=False)
    pipe = tiny_pipeline(scheduler, law.denoiser(scheduler.config).double())
    shape = (64, 2, 2)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[:, 0, 0] = True
    operator = VolumeMask(mask)
    measurement = operator.forward(law.sample(64, torch.Generator().manual_seed(0)))
    roughness = {}
    for lambda_tv in (0.0, 0.01):
        volume = pipe(measurement, operator, shape, num_inference_steps=50, rho=0.1, lambda_tv=lambda_tv,
                      slice_batch_size=64, generator=torch.Generator().manual_seed(1), output_type="pt").volume
        roughness[lambda_tv] = float((volume[1:, 1:] - volume[:-1, 1:]).abs().mean())
        assert float((volume - measurement)[mask].abs().max()) < 0.1
    print(f"\nmean |z difference| of the unmeasured pixels: slice-wise {roughness[0.0]:.4f}, z-TV {roughness[0.01]:.4f}")
    assert roughness[0.01] < 0.6 * roughness[0.0]


class NoAdjoint:
    def forward(self, volume):
        return volume

    def check_measurement(self, measurement, volume_shape):
        pass


class UnknownKind(NoAdjoint):
    def adjoint(self, measurement):
        return measurement


def test_default_admm_settings_follow_the_operator_kind():
    ct = ParallelBeamProjection(sparse_view_angles(8), size=8)
    assert default_admm_settings(ct) == (10.0, 1.0)  # 8-view CT's (volume_demo.TASKS)
    assert default_admm_settings(ThroughPlaneDownsampling(2)) == (0.1, 0.01)
    assert default_admm_settings(VolumeMask(torch.ones(2, 8, 8, dtype=torch.bool))) == (0.1, 0.01)
    assert (TASKS["sparse-view"].rho, TASKS["sparse-view"].lambda_tv) == default_admm_settings(ct)
    assert (TASKS["sr"].rho, TASKS["sr"].lambda_tv) == default_admm_settings(ThroughPlaneDownsampling(2))


BAD_CALLS = [
    ({"shape": (4, 7, 6)}, ValueError, "slices of 7x6 along axis 0; this UNet takes slices whose sides are multiples"),
    ({"axis": 1, "shape": (3, 8, 6)}, ValueError, "slices of 3x6 along axis 1"),
    ({"measurement": torch.zeros(4, 8, 5)}, ValueError, "must have shape"),
    ({"measurement": torch.full(VOLUME_SHAPE, float("nan"))}, ValueError, "NaN"),
    ({"operator": NoAdjoint(), "rho": 1.0, "lambda_tv": 0.1}, TypeError, "has no adjoint"),
    ({"operator": UnknownKind()}, ValueError, "no default rho / lambda_tv for a UnknownKind"),
    ({"volume_shape": (4, 8)}, ValueError, "volume_shape must be three positive integers"),
    ({"num_inference_steps": 0}, ValueError, "num_inference_steps must be an integer >= 1"),
    ({"rho": 0.0}, ValueError, "rho must be a finite number > 0"),
    ({"lambda_tv": -0.1}, ValueError, "lambda_tv must be a finite number >= 0"),
    ({"admm_iterations": 0}, ValueError, "admm_iterations must be an integer >= 1"),
    ({"cg_iterations": 1.5}, ValueError, "cg_iterations must be an integer >= 1"),
    ({"slice_batch_size": 0}, ValueError, "slice_batch_size must be an integer >= 1"),
    ({"axis": 3}, ValueError, "axis must be one of 0, 1, 2"),
    ({"alternate_axes": ()}, ValueError, "alternate_axes must be a non-empty sequence of 0, 1, 2"),
    ({"output_type": "pil"}, ValueError, "output_type must be one of"),
    ({"callback_on_step_end_tensor_inputs": ["noise_pred"]}, ValueError, "callback_on_step_end_tensor_inputs"),
]


@pytest.mark.parametrize("change, error, message", BAD_CALLS)
def test_bad_inputs_raise_before_any_work(change, error, message):
    pipe = tiny_pipeline()
    shapes = recorded_unet_inputs(pipe)
    shape = change.pop("shape", VOLUME_SHAPE)
    measurement, operator = masked_problem(shape)
    kwargs = {"measurement": measurement, "operator": operator, "volume_shape": shape, "num_inference_steps": 2,
              **change}
    with pytest.raises(error, match=message):
        pipe(**kwargs)
    assert shapes == []


@pytest.mark.parametrize("pipe, message", [
    (lambda: tiny_pipeline(EulerDiscreteScheduler()), "variance-exploding scale"),
    (lambda: tiny_pipeline(unet=tiny_unet(in_channels=3)), "one-channel slices"),
])
def test_components_the_method_cannot_use_are_refused(pipe, message):
    with pytest.raises(ValueError, match=message):
        run(pipe())


def test_the_shipped_slice_prior_loads_through_stock_diffusers_and_its_held_out_loss_reproduces():
    import json

    from diffusers_ext.shipped import shipped_model_path
    from diffusers_ext.training.recipes.tiny_slice_prior import held_out_denoising_loss, held_out_slices

    folder = shipped_model_path("tiny-slice-prior")
    assert sum(path.stat().st_size for path in folder.rglob("*") if path.is_file()) < 10 * 2**20
    pipe = DiffusionPipeline.from_pretrained(folder, trust_remote_code=True)
    assert isinstance(pipe, DiffusionMBIRPipeline)
    report = json.loads((folder / "training_report.json").read_text())["held_out_epsilon_mse"]
    measured = held_out_denoising_loss(pipe.unet, held_out_slices(count_per_kind=1), pipe.scheduler)
    print(f"\nheld-out epsilon MSE on 2 volumes {measured['mean']:.4f} (report, 8 volumes: {report['trained (EMA)']['mean']:.4f},"
          f" untrained {report['untrained']['mean']:.4f})")
    assert measured["mean"] < 0.5 * report["untrained"]["mean"]
    assert abs(measured["mean"] - report["trained (EMA)"]["mean"]) < 0.25 * report["trained (EMA)"]["mean"]
