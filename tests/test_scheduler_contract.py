"""What every diffusers-ext scheduler owes a diffusers user: it runs inside stock pipelines via from_config, survives
save_pretrained / from_pretrained, repeats itself for a seed, and answers bad settings with a clear ValueError."""

import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    FlowMatchEulerDiscreteScheduler,
    PNDMScheduler,
    StableDiffusion3Pipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionPipeline,
)
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from tiny_pipelines import sd3_inputs, stable_diffusion_inputs, tiny_sd3, tiny_stable_diffusion

import diffusers_ext
from diffusers_ext.schedulers import ERSDESolverScheduler, RFSolverScheduler, TimeShiftScheduler
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG, SD_SCHEDULER_CONFIG

VP_SCHEDULERS = {
    "er_sde": lambda config: ERSDESolverScheduler.from_config(config),
    "er_sde_ode_2": lambda config: ERSDESolverScheduler.from_config(config, noise_scale="ode", solver_order=2),
    "time_shift_ddim": lambda config: TimeShiftScheduler.from_config(config, window_size=40),
    "time_shift_dpm": lambda config: TimeShiftScheduler.from_config(config, base_scheduler="dpmsolver++"),
}


def test_exported_from_the_package():
    assert diffusers_ext.ERSDESolverScheduler is ERSDESolverScheduler
    assert diffusers_ext.RFSolverScheduler is RFSolverScheduler
    assert diffusers_ext.TimeShiftScheduler is TimeShiftScheduler


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_vp_scheduler_in_stable_diffusion_round_trip_and_seed(name, tmp_path):
    pipe = tiny_stable_diffusion(PNDMScheduler.from_config(SD_SCHEDULER_CONFIG))
    pipe.scheduler = VP_SCHEDULERS[name](pipe.scheduler.config)
    first = pipe(**stable_diffusion_inputs()).images
    assert np.isfinite(first).all() and first.std() > 0
    np.testing.assert_array_equal(first, pipe(**stable_diffusion_inputs()).images)
    assert not np.array_equal(first, pipe(**stable_diffusion_inputs(num_inference_steps=6)).images)

    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path, text_encoder=None, tokenizer=None)
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is type(pipe.scheduler)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.scheduler.config) == public(pipe.scheduler.config)
    np.testing.assert_allclose(loaded(**stable_diffusion_inputs()).images, first, atol=1e-6)


@pytest.mark.parametrize("name", sorted(VP_SCHEDULERS))
def test_vp_scheduler_in_img2img(name):
    pipe = tiny_stable_diffusion(VP_SCHEDULERS[name](SD_SCHEDULER_CONFIG))
    img2img = StableDiffusionImg2ImgPipeline.from_pipe(pipe)
    inputs = stable_diffusion_inputs(image=torch.rand(1, 3, 8, 8), strength=0.6, num_inference_steps=5)
    del inputs["height"], inputs["width"]
    images = img2img(**inputs).images
    assert np.isfinite(images).all()
    assert img2img.scheduler.step_index == img2img.scheduler.num_inference_steps


def test_time_shift_reaches_the_model_in_a_stock_pipeline():
    """The UNet of a stock StableDiffusionPipeline is called at the shifted timesteps, which stay in their window."""
    pipe = tiny_stable_diffusion(TimeShiftScheduler.from_config(SD_SCHEDULER_CONFIG, window_size=200, cutoff_timestep=0))
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(int(args[1])))
    pipe(**stable_diffusion_inputs(num_inference_steps=5))
    scheduled = pipe.scheduler.scheduled_timesteps.tolist()
    assert calls == pipe.scheduler.timesteps.tolist() != scheduled
    assert calls[0] == scheduled[0]
    assert all(abs(c - s) <= 100 for c, s in zip(calls, scheduled, strict=True))


def test_rf_solver_in_sd3_round_trip_and_seed(tmp_path):
    pipe = tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG))
    pipe.scheduler = RFSolverScheduler.from_config(pipe.scheduler.config)
    first = pipe(**sd3_inputs()).images
    assert np.isfinite(first).all()
    np.testing.assert_array_equal(first, pipe(**sd3_inputs()).images)
    pipe.save_pretrained(tmp_path)
    loaded = StableDiffusion3Pipeline.from_pretrained(
        tmp_path, **{f"{kind}{suffix}": None for kind in ("text_encoder", "tokenizer") for suffix in ("", "_2", "_3")}
    )
    loaded.set_progress_bar_config(disable=True)
    assert type(loaded.scheduler) is RFSolverScheduler
    np.testing.assert_allclose(loaded(**sd3_inputs()).images, first, atol=1e-6)


def _all_schedulers():
    yield from (make(SD_SCHEDULER_CONFIG) for make in VP_SCHEDULERS.values())
    yield RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)


@pytest.mark.parametrize("scheduler", list(_all_schedulers()), ids=[*sorted(VP_SCHEDULERS), "rf_solver"])
@settings(max_examples=40, deadline=None, derandomize=True, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(steps=st.one_of(st.integers(-5, 1200), st.floats(-2, 2000), st.none(), st.booleans()))
def test_fuzzed_step_counts_work_or_raise_value_error(scheduler, steps):
    try:
        scheduler.set_timesteps(steps)
    except ValueError:
        assert not (isinstance(steps, int) and not isinstance(steps, bool) and 1 <= steps <= 1000)
        return
    assert isinstance(steps, int) and 1 <= steps <= 1000
    assert len(scheduler.timesteps) == steps * scheduler.order
    assert (scheduler.timesteps[1:] <= scheduler.timesteps[:-1]).all()


@pytest.mark.parametrize("make", [ERSDESolverScheduler, lambda: RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)])
@settings(max_examples=60, deadline=None, derandomize=True)
@given(values=st.lists(st.one_of(st.floats(-10, 1100), st.just(float("nan"))), min_size=0, max_size=6),
       kind=st.sampled_from(["timesteps", "sigmas"]), declared=st.one_of(st.none(), st.integers(1, 8)))
@example(values=[6.847395295754923e-68], kind="timesteps", declared=None)  # positive, but 0 in float32
@example(values=[5e-324, 0.0], kind="timesteps", declared=None)  # decreasing in float64, not in float32
def test_fuzzed_custom_grids_work_or_raise_value_error(make, values, kind, declared):
    scheduler = make()
    if isinstance(scheduler, RFSolverScheduler) and kind == "sigmas":
        values = [v / 1000 for v in values]
    try:
        scheduler.set_timesteps(declared, **{kind: values})
    except ValueError:
        return
    decreasing = all(b < a for a, b in itertools.pairwise(values))
    assert values and decreasing and all(np.isfinite(values)) and declared in (None, len(values))
    assert (scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all()


@pytest.mark.parametrize("make", [lambda **kw: ERSDESolverScheduler(**kw), lambda **kw: TimeShiftScheduler(**kw)])
def test_unknown_prediction_type_raises(make):
    with pytest.raises(ValueError, match="prediction_type"):
        make(prediction_type="velocity")


def test_sigmas_of_the_wrong_length_raise():
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        ERSDESolverScheduler().set_timesteps(3, sigmas=[10.0, 1.0])
    with pytest.raises(ValueError, match="num_inference_steps=3"):
        RFSolverScheduler().set_timesteps(3, sigmas=[1.0, 0.5])
    with pytest.raises(ValueError, match="strictly decreasing"):
        ERSDESolverScheduler().set_timesteps(timesteps=[500, 700, 100])
