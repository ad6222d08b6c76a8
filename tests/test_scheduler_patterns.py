"""diffusers' own scheduler test patterns (``SchedulerCommonTest`` and the per-scheduler tests), written for ours:
partial runs in every img2img-style pipeline start where the stock scheduler starts, ``from_config`` to and from every
listed compatible keeps our settings, a mid-run save / load or copy continues identically, trained betas, half
precision samples and repeated timesteps."""

import copy
import inspect
import itertools

import numpy as np
import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    FluxControlNetImg2ImgPipeline,
    FluxControlNetModel,
    FluxImg2ImgPipeline,
    FluxInpaintPipeline,
    StableDiffusion3Img2ImgPipeline,
    StableDiffusion3InpaintPipeline,
    StableDiffusionImg2ImgPipeline,
    StableDiffusionXLImg2ImgPipeline,
)
from tiny_pipelines import (
    TEXT_DIM,
    flux_inputs,
    sd3_inputs,
    stable_diffusion_inputs,
    tiny_flux,
    tiny_sd3,
    tiny_sdxl,
    tiny_stable_diffusion,
)

from diffusers_ext.schedulers import ERSDESolverScheduler, RFSolverScheduler, TimeShiftScheduler
from diffusers_ext.schedulers.scheduling_bridge import BridgeScheduler
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG, SD_SCHEDULER_CONFIG

STRENGTHS = (0.3, 0.5, 0.6, 0.8, 0.9)

# Each of ours next to the stock scheduler whose grid it shares, built from the same config; sampling on the stock
# spacing (sampling_schedule=None) rather than the default named schedule, so that the grids agree.
VP_PAIRS = {
    "er_sde": (ERSDESolverScheduler, DPMSolverMultistepScheduler, {"sampling_schedule": None}),
    "time_shift_ddim": (TimeShiftScheduler, DDIMScheduler,
                        {"base_scheduler": "ddim", "window_size": 40, "sampling_schedule": None}),
    "time_shift_dpm": (TimeShiftScheduler, DPMSolverMultistepScheduler,
                       {"base_scheduler": "dpmsolver++", "sampling_schedule": None}),
}


def denoiser_timesteps(pipe, run) -> list[float]:
    """The timesteps the pipeline's denoiser is called at during ``run()``."""
    model = pipe.unet if hasattr(pipe, "unet") else pipe.transformer
    calls = []
    handle = model.register_forward_pre_hook(
        lambda module, args, kwargs: calls.append(float(torch.as_tensor(
            kwargs["timestep"] if "timestep" in kwargs else args[1]).flatten()[0])), with_kwargs=True)
    try:
        run()
    finally:
        handle.remove()
    return calls


def assert_starts_like_the_stock_scheduler(ours: list[float], stock: list[float], calls_per_stock_call: int):
    """Same first noise level; ``calls_per_stock_call`` times the stock calls (RF-Solver may lose one when it re-lays
    a run that would start at a midpoint, see its docstring)."""
    assert ours[0] == pytest.approx(stock[0], rel=1e-6)
    assert calls_per_stock_call * len(stock) - (calls_per_stock_call - 1) <= len(ours) <= calls_per_stock_call * len(stock)


# Partial runs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VP_PAIRS))
def test_vp_img2img_starts_where_the_stock_scheduler_starts(name):
    ours_class, stock_class, settings = VP_PAIRS[name]
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_stable_diffusion(DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)))
    for strength in STRENGTHS:
        inputs = stable_diffusion_inputs(image=torch.rand(1, 3, 8, 8), strength=strength, num_inference_steps=7)
        del inputs["height"], inputs["width"]
        calls = {}
        ours = ours_class.from_config(SD_SCHEDULER_CONFIG, **settings)
        # Explicit, because from_config does not carry values a config holds by default (diffusers' gotcha).
        stock = stock_class.from_config(ours.config, timestep_spacing=ours.config.timestep_spacing)
        for scheduler in (stock, ours):
            pipe.scheduler = scheduler
            calls[type(scheduler)] = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
        stock, ours = calls[stock_class], calls[ours_class]
        assert_starts_like_the_stock_scheduler(ours, stock, 1)
        assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps)


@pytest.mark.parametrize("scheduler_class", [ERSDESolverScheduler, TimeShiftScheduler])
def test_img2img_on_the_default_schedule_starts_where_diffusers_get_timesteps_points(scheduler_class):
    """With its default (a named schedule on SD's config) the run starts at the grid entry SD img2img's
    ``get_timesteps`` picks, ``n - int(n * strength)``, and takes the steps after it."""
    pipe = StableDiffusionImg2ImgPipeline.from_pipe(tiny_stable_diffusion(scheduler_class.from_config(SD_SCHEDULER_CONFIG)))
    for strength in STRENGTHS:
        inputs = stable_diffusion_inputs(image=torch.rand(1, 3, 8, 8), strength=strength, num_inference_steps=7)
        del inputs["height"], inputs["width"]
        calls = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
        begin = 7 - int(7 * strength)
        assert calls[0] == float(pipe.scheduler.timesteps[begin]) and len(calls) == 7 - begin


def test_er_sde_in_sdxl_img2img_starts_where_dpm_solver_starts():
    pipe = StableDiffusionXLImg2ImgPipeline.from_pipe(tiny_sdxl(DDIMScheduler.from_config(SD_SCHEDULER_CONFIG)))
    for strength in STRENGTHS:
        inputs = dict(prompt="a cat", image=torch.rand(1, 3, 8, 8), strength=strength, num_inference_steps=6,
                      output_type="np", generator=torch.Generator().manual_seed(0))
        pipe.scheduler = DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
        stock = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
        pipe.scheduler = ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=None)
        ours = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
        assert_starts_like_the_stock_scheduler(ours, stock, 1)


def tiny_flux_controlnet() -> FluxControlNetModel:
    torch.manual_seed(1)
    return FluxControlNetModel(patch_size=1, in_channels=16, num_layers=1, num_single_layers=1, attention_head_dim=8,
                               num_attention_heads=2, joint_attention_dim=TEXT_DIM, pooled_projection_dim=TEXT_DIM,
                               axes_dims_rope=[2, 2, 4]).eval()


FLOW_PARTIAL_RUNS = {
    "flux_img2img": lambda: (FluxImg2ImgPipeline.from_pipe(tiny_flux()), flux_inputs, {}),
    "flux_inpaint": lambda: (FluxInpaintPipeline.from_pipe(tiny_flux()), flux_inputs,
                             {"mask_image": torch.ones(1, 1, 16, 16).tril()}),
    "flux_controlnet_img2img": lambda: (
        FluxControlNetImg2ImgPipeline.from_pipe(tiny_flux(), controlnet=tiny_flux_controlnet()), flux_inputs,
        {"control_image": torch.rand(1, 3, 16, 16)}),
    "sd3_img2img": lambda: (StableDiffusion3Img2ImgPipeline.from_pipe(tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(
        SD3_SCHEDULER_CONFIG))), sd3_inputs, {}),
    "sd3_inpaint": lambda: (StableDiffusion3InpaintPipeline.from_pipe(tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(
        SD3_SCHEDULER_CONFIG), latent_channels=16)), sd3_inputs, {"mask_image": torch.ones(1, 1, 8, 8).tril()}),
}


@pytest.mark.parametrize("name", sorted(FLOW_PARTIAL_RUNS))
def test_rf_solver_partial_runs_start_where_flow_match_euler_starts(name):
    """Flux passes ``sigmas`` (so ``retrieve_timesteps`` counts every call as a step), SD3 does not: at every strength
    RF-Solver starts at FlowMatchEuler's noise level and makes twice its calls (one fewer where it re-lays a run that
    would start at a midpoint), ending on the terminal level."""
    pipe, make_inputs, extra = FLOW_PARTIAL_RUNS[name]()
    pipe.set_progress_bar_config(disable=True)
    size = 16 if name.startswith("flux") else 8
    config = pipe.scheduler.config
    for steps in (4, 7):
        for strength in STRENGTHS:
            inputs = make_inputs(image=torch.rand(1, 3, size, size), strength=strength, num_inference_steps=steps) | extra
            pipe.scheduler = FlowMatchEulerDiscreteScheduler.from_config(config)
            stock = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
            pipe.scheduler = RFSolverScheduler.from_config(config)
            images = []
            ours = denoiser_timesteps(pipe, lambda: images.append(pipe(**inputs).images))  # noqa: B023
            assert_starts_like_the_stock_scheduler(ours, stock, 2)
            assert pipe.scheduler.step_index == len(pipe.scheduler.timesteps) and np.isfinite(images[0]).all()


def test_rf_solver_counts_one_step_per_call_when_the_grid_comes_from_sigmas():
    """What ``retrieve_timesteps`` assumes: ``len(timesteps) == num_inference_steps * order`` for the count it
    returns (``num_inference_steps`` as given, or ``len(timesteps)`` for custom grids)."""
    scheduler = RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)
    scheduler.set_timesteps(5)
    assert len(scheduler.timesteps) == 5 * scheduler.order == 10
    scheduler.set_timesteps(sigmas=np.linspace(1.0, 0.2, 5))
    assert len(scheduler.timesteps) == 10 and scheduler.order == 1
    assert RFSolverScheduler.order == 2


def test_a_partial_rf_solver_run_from_a_midpoint_is_re_laid_from_the_steps_start():
    scheduler = RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG)
    scheduler.set_timesteps(sigmas=[1.0, 0.75, 0.5, 0.25])
    levels = scheduler.step_levels.clone()
    view = scheduler.timesteps[3:]  # what a pipeline slices before it calls set_begin_index(3)
    scheduler.set_begin_index(3)
    expected = torch.stack([levels[1], (levels[1] + levels[2]) / 2, levels[2], (levels[2] + levels[3]) / 2, levels[3]])
    torch.testing.assert_close(view, expected * 1000)
    torch.testing.assert_close(scheduler.sigmas[3:], torch.cat([view / 1000, levels[-1:]]))
    # Both the midpoint rule and Euler are exact for a constant velocity: the run must cover levels[1] -> 0 in full.
    sample, velocity = torch.zeros(1), torch.ones(1)
    for t in view:
        sample = scheduler.step(velocity, t, sample).prev_sample
    assert scheduler.step_index == len(scheduler.timesteps)
    torch.testing.assert_close(sample, -levels[1:2].float())


def test_bridge_partial_run_without_set_begin_index_starts_a_heun_step():
    """DDBM's grid repeats each interior time (a Heun corrector, then the next predictor); like diffusers' Heun
    schedulers, a run entering at such a time starts the step there instead of finishing one."""
    scheduler = BridgeScheduler(solver="ddbm")
    scheduler.set_timesteps(4)
    timesteps = scheduler.timesteps
    repeated = next(i for i in range(1, len(timesteps)) if timesteps[i] == timesteps[i - 1])
    sample = degraded = torch.zeros(1, 2)
    for t in timesteps[repeated:]:
        sample = scheduler.step(torch.zeros(1, 2), t, sample, degraded).prev_sample
    assert scheduler.step_index == len(timesteps)


def noise_generator(scheduler, seed: int = 1) -> dict:
    """``generator=`` for schedulers whose step draws noise."""
    takes_generator = "generator" in inspect.signature(scheduler.step).parameters
    return {"generator": torch.Generator().manual_seed(seed)} if takes_generator else {}


# Configs -----------------------------------------------------------------------------------------------------------
def our_schedulers():
    return {
        "er_sde": ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, solver_order=2),
        "time_shift": TimeShiftScheduler.from_config(SD_SCHEDULER_CONFIG, base_scheduler="dpmsolver++", window_size=20),
        "rf_solver": RFSolverScheduler.from_config(SD3_SCHEDULER_CONFIG),
    }


@pytest.mark.parametrize("name", sorted(our_schedulers()))
def test_from_config_to_every_compatible_and_back_keeps_our_settings(name):
    ours = our_schedulers()[name]
    compatibles = [c for c in ours.compatibles if c is not type(ours)]
    assert compatibles
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    for compatible in compatibles:
        try:
            other = compatible.from_config(ours.config)
        except ImportError:  # an optional dependency of that scheduler (DPMSolverSDEScheduler needs torchsde)
            continue
        other.set_timesteps(4)
        back = type(ours).from_config(other.config)
        assert public(back.config) == public(ours.config), compatible.__name__


@pytest.mark.parametrize("name", sorted(our_schedulers()))
def test_a_copy_or_a_reload_mid_run_continues_identically(name, tmp_path):
    ours = our_schedulers()[name]
    ours.set_timesteps(6)
    generator = torch.Generator().manual_seed(0)
    sample = torch.randn(2, 3, 4, 4, generator=generator)
    outputs = [torch.randn(2, 3, 4, 4, generator=generator) for _ in ours.timesteps]
    timesteps = ours.timesteps.clone()
    middle = len(timesteps) // 2
    for i, (t, output) in enumerate(zip(timesteps[:middle], outputs[:middle], strict=True)):
        sample = ours.step(output, t, sample, **noise_generator(ours, seed=i)).prev_sample
    ours.save_pretrained(tmp_path)
    copied = copy.deepcopy(ours)
    reloaded = type(ours).from_pretrained(tmp_path)
    reloaded.set_timesteps(6)
    replay = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(0))
    for i, (t, output) in enumerate(zip(timesteps[:middle], outputs[:middle], strict=True)):
        replay = reloaded.step(output, t, replay, **noise_generator(reloaded, seed=i)).prev_sample
    results = {"original": sample, "copy": sample.clone(), "reloaded": replay}
    for key, scheduler in (("original", ours), ("copy", copied), ("reloaded", reloaded)):
        for i, (t, output) in enumerate(zip(timesteps[middle:], outputs[middle:], strict=True), start=middle):
            results[key] = scheduler.step(output, t, results[key], **noise_generator(scheduler, seed=i)).prev_sample
    torch.testing.assert_close(results["copy"], results["original"], rtol=0, atol=0)
    torch.testing.assert_close(results["reloaded"], results["original"], rtol=0, atol=0)


@pytest.mark.parametrize("scheduler_class", [ERSDESolverScheduler, TimeShiftScheduler])
def test_trained_betas_are_the_schedule(scheduler_class):
    betas = np.linspace(1e-4, 2e-2, 1000) ** 0.9
    ours = scheduler_class(trained_betas=betas.tolist())
    stock = DDIMScheduler(trained_betas=betas.tolist())
    torch.testing.assert_close(ours.betas, stock.betas)
    torch.testing.assert_close(ours.alphas, stock.alphas)
    torch.testing.assert_close(ours.alphas_cumprod.to(stock.alphas_cumprod.dtype), stock.alphas_cumprod)


@pytest.mark.parametrize("name", sorted(our_schedulers()))
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_half_precision_samples_stay_in_their_dtype_and_near_float32(name, dtype):
    results = {}
    for run_dtype in (torch.float32, dtype):
        scheduler = our_schedulers()[name]
        scheduler.set_timesteps(5)
        generator = torch.Generator().manual_seed(0)
        sample = torch.randn(2, 4, 8, 8, generator=generator).to(run_dtype)
        for t in scheduler.timesteps:
            output = (0.5 * sample.float() + 0.1 * torch.randn(sample.shape, generator=generator)).to(run_dtype)
            sample = scheduler.step(output, t, sample, **noise_generator(scheduler)).prev_sample
            assert sample.dtype == run_dtype
        results[run_dtype] = sample.float()
    scale = results[torch.float32].abs().max()
    tolerance = 20 * torch.finfo(dtype).eps * scale  # a few roundings per step, over five steps
    assert (results[dtype] - results[torch.float32]).abs().max() <= tolerance


# Custom grids through the pipeline's own arguments -------------------------------------------------------------------
@pytest.mark.parametrize("name", sorted(VP_PAIRS))
def test_custom_timesteps_reach_the_model_through_a_stock_pipeline(name):
    ours_class, _, settings = VP_PAIRS[name]
    if ours_class is TimeShiftScheduler:
        settings = settings | {"window_size": 0}  # no shifting: the model is called at the grid itself
    pipe = tiny_stable_diffusion(ours_class.from_config(SD_SCHEDULER_CONFIG, **settings))
    timesteps = [961, 700, 420, 150, 20]
    inputs = stable_diffusion_inputs(timesteps=timesteps)
    del inputs["num_inference_steps"]
    assert denoiser_timesteps(pipe, lambda: pipe(**inputs)) == timesteps


def test_custom_sigmas_reach_the_transformer_through_flux_and_sd3():
    sigmas = [1.0, 0.7, 0.45, 0.2]
    # Flux hands the transformer timestep / 1000, SD3 the timestep.
    for pipe, make_inputs, timestep_scale in (
            (tiny_flux(), flux_inputs, 1),
            (tiny_sd3(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG)), sd3_inputs, 1000)):
        pipe.scheduler = RFSolverScheduler.from_config(pipe.scheduler.config, use_dynamic_shifting=False, shift=1.0)
        inputs = make_inputs(sigmas=sigmas)
        del inputs["num_inference_steps"]
        calls = denoiser_timesteps(pipe, lambda: pipe(**inputs))  # noqa: B023
        levels = [*sigmas, 0.0]
        expected = [value for high, low in itertools.pairwise(levels) for value in (high, (high + low) / 2)]
        np.testing.assert_allclose(np.array(calls) / timestep_scale, expected, rtol=1e-6)
