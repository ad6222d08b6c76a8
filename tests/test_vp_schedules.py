"""The VP schedulers' training schedule and inference grids: what diffusers' own scheduler tests expect of them."""

import json

import numpy as np
import pytest
import torch
from conftest import make_oracle
from diffusers import DDIMScheduler, DDPMScheduler, EulerDiscreteScheduler, PNDMScheduler
from diffusers.schedulers import AysSchedules
from tiny_pipelines import stable_diffusion_inputs, tiny_sdxl, tiny_stable_diffusion

from diffusers_ext.schedulers import ERSDESolverScheduler, TimeShiftScheduler
from diffusers_ext.schedulers.sampling_schedules import NAMED_SCHEDULES, default_schedule_name
from diffusers_ext.testing import GaussianMixtureSamplingPipeline
from diffusers_ext.testing.sampler_accuracy import SD_SCHEDULER_CONFIG

VP_SCHEDULERS = [ERSDESolverScheduler, TimeShiftScheduler]
# SDXL base 1.0's scheduler_config.json: the same training schedule as SD 1.x under another sampler.
SDXL_SCHEDULER_CONFIG = {
    "_class_name": "EulerDiscreteScheduler", "beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear",
    "interpolation_type": "linear", "num_train_timesteps": 1000, "prediction_type": "epsilon", "sample_max_value": 1.0,
    "set_alpha_to_one": False, "skip_prk_steps": True, "steps_offset": 1, "timestep_spacing": "leading",
    "trained_betas": None, "use_karras_sigmas": False,
}
SPACED_SD = {**SD_SCHEDULER_CONFIG, "sampling_schedule": None}  # grids from timestep_spacing, not a named schedule


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
def test_trained_betas_survive_save_and_load(scheduler_class, tmp_path):
    """diffusers' ``SchedulerCommonTest.test_trained_betas``: ``betas`` exist and round-trip through the config."""
    scheduler = scheduler_class(trained_betas=np.array([0.1, 0.3]))
    scheduler.save_pretrained(tmp_path)
    loaded = scheduler_class.from_pretrained(tmp_path)
    assert scheduler.betas.tolist() == loaded.betas.tolist() == pytest.approx([0.1, 0.3])


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
@pytest.mark.parametrize("config", [SD_SCHEDULER_CONFIG, {"rescale_betas_zero_snr": True}, {}])
def test_betas_and_alphas_are_ddims(scheduler_class, config):
    ours, stock = scheduler_class.from_config(config), DDIMScheduler.from_config(config)
    assert torch.equal(ours.betas, stock.betas)
    assert torch.equal(ours.alphas, stock.alphas)
    assert ours.betas.dtype == torch.float32


def _scheduler_classes_of_diffusers():
    import diffusers

    for name in dir(diffusers):
        candidate = getattr(diffusers, name)
        if isinstance(candidate, type) and issubclass(candidate, diffusers.SchedulerMixin):
            yield candidate


def test_no_diffusers_scheduler_uses_our_schedule_key():
    """``sampling_schedule`` travels through ``from_config`` to compatible schedulers: no diffusers scheduler may read
    it as something else (``sigma_schedule``, the old name, is a string in the EDM schedulers)."""
    import inspect

    users = [c.__name__ for c in _scheduler_classes_of_diffusers()
             if "sampling_schedule" in inspect.signature(c.__init__).parameters]
    assert users == []


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
def test_a_list_schedule_does_not_break_from_config_to_compatibles(scheduler_class):
    ours = scheduler_class.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=[10.0, 2.0, 0.5, 0.1])
    compatibles = [c for c in ours.compatibles if c.__name__ != "DPMSolverSDEScheduler"]  # needs torchsde
    assert {"EDMEulerScheduler", "DDIMScheduler"} <= {c.__name__ for c in compatibles}
    for compatible in compatibles:
        other = compatible.from_config(ours.config)
        assert scheduler_class.from_config(other.config).config.sampling_schedule == [10.0, 2.0, 0.5, 0.1]


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
@pytest.mark.parametrize("table", ["StableDiffusion", "StableDiffusionXL"])
def test_diffusers_ays_tables_are_accepted_as_they_are(scheduler_class, table):
    """diffusers' AYS tables round SD's largest noise level 14.6146 up to 14.615 and end with the final 0: both are
    accepted, as a config schedule and as ``sigmas=``, and land on AYS's own timesteps."""
    sigmas = AysSchedules[f"{table}Sigmas"]
    scheduler = scheduler_class.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=sigmas)
    scheduler.set_timesteps(10)
    np.testing.assert_allclose(scheduler.sigmas[1:-1].numpy(), sigmas[1:-1], rtol=1e-12)
    assert scheduler.sigmas[0].item() == pytest.approx(14.6146, abs=1e-4)
    np.testing.assert_allclose(scheduler.timesteps.numpy(), AysSchedules[f"{table}Timesteps"], atol=1.0)
    scheduler.set_timesteps(sigmas=sigmas[:-1])
    assert scheduler.num_inference_steps == 10
    named = scheduler_class.from_config(SD_SCHEDULER_CONFIG, sampling_schedule="ays" if table == "StableDiffusion"
                                        else "ays_sdxl")
    named.set_timesteps(10)
    torch.testing.assert_close(named.sigmas, scheduler.sigmas)


@pytest.mark.parametrize(
    ("config", "message"),
    [
        ({"sampling_schedule": [20.0, 1.0]}, r"range of noise levels \[0.02916\d*, 14.6146"),
        ({"sampling_schedule": [14.0, 0.02]}, r"range of noise levels"),
        ({"sampling_schedule": [1.0, 2.0]}, "strictly decreasing"),
        ({"sampling_schedule": [1.0]}, "at least two"),
        ({"sampling_schedule": "karras"}, "must be .auto., one of"),
        ({"sampling_schedule": "ays", "beta_schedule": "linear"}, "made for the training schedule"),
    ],
)
def test_bad_sampling_schedules_raise_at_construction(config, message):
    with pytest.raises(ValueError, match=message):
        ERSDESolverScheduler.from_config({**SD_SCHEDULER_CONFIG, **config})


def test_sigmas_out_of_range_raise():
    with pytest.raises(ValueError, match="range of noise levels"):
        ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG).set_timesteps(sigmas=[14.7, 1.0])


def test_config_saved_under_the_old_key_still_loads(tmp_path):
    """diffusers-ext 0.1 wrote a learned schedule as ``sigma_schedule``."""
    ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG).save_pretrained(tmp_path)
    path = tmp_path / "scheduler_config.json"
    saved = json.loads(path.read_text())
    del saved["sampling_schedule"]
    path.write_text(json.dumps({**saved, "sigma_schedule": [10.0, 1.0, 0.1]}))
    loaded = ERSDESolverScheduler.from_pretrained(tmp_path)
    loaded.set_timesteps(3)
    assert loaded.sigmas[:-1].tolist() == pytest.approx([10.0, 1.0, 0.1])


@pytest.mark.parametrize(
    "make",
    [
        lambda: ERSDESolverScheduler.from_config(SPACED_SD),
        lambda: ERSDESolverScheduler.from_config(SPACED_SD, timestep_spacing="leading"),
        lambda: TimeShiftScheduler.from_config(SPACED_SD, base_scheduler="dpmsolver++"),
        lambda: TimeShiftScheduler.from_config(SPACED_SD),
    ],
    ids=["er_sde_linspace", "er_sde_leading", "time_shift_dpm", "time_shift_ddim"],
)
def test_as_many_steps_as_training_timesteps_sample_every_timestep_without_nan(make):
    """At 1000 steps on a 1000-step schedule linspace rounds two grid points to one timestep, DPM-Solver's leading
    spacing puts all of them on one, and DDIM's leading one reaches timestep 1000: ER-SDE returned NaN."""
    scheduler = make()
    scheduler.set_timesteps(1000)
    assert scheduler.timesteps.tolist() == list(range(999, -1, -1))
    pipe = GaussianMixtureSamplingPipeline(unet=make_oracle(scheduler.config), scheduler=scheduler)
    pipe.set_progress_bar_config(disable=True)
    samples = pipe(batch_size=8, num_inference_steps=1000, generator=torch.Generator().manual_seed(0)).samples
    assert torch.isfinite(samples).all()


@pytest.mark.parametrize("scheduler_class", VP_SCHEDULERS)
@pytest.mark.parametrize("make_pipeline", [tiny_stable_diffusion, tiny_sdxl], ids=["sd", "sdxl"])
def test_the_default_schedule_is_chosen_from_the_pipelines_config_and_sampled(scheduler_class, make_pipeline):
    """Swapped into a stock pipeline whose config has Stable Diffusion's training schedule (SD 1.x's PNDM config,
    SDXL's Euler config), the scheduler samples the default named schedule: the UNet is called at its timesteps."""
    stock = PNDMScheduler.from_config(SD_SCHEDULER_CONFIG) if make_pipeline is tiny_stable_diffusion \
        else EulerDiscreteScheduler.from_config(SDXL_SCHEDULER_CONFIG)
    pipe = make_pipeline(stock)
    pipe.scheduler = scheduler_class.from_config(pipe.scheduler.config, window_size=0) \
        if scheduler_class is TimeShiftScheduler else scheduler_class.from_config(pipe.scheduler.config)
    calls = []
    pipe.unet.register_forward_pre_hook(lambda module, args: calls.append(float(args[1])))
    inputs = stable_diffusion_inputs(guidance_scale=1.0) if make_pipeline is tiny_stable_diffusion else \
        {"prompt": "a photo", "height": 16, "width": 16, "guidance_scale": 1.0, "output_type": "latent"}
    pipe(**inputs | {"num_inference_steps": 10})
    default = NAMED_SCHEDULES[default_schedule_name(pipe.scheduler.config)].noise_levels
    reference = ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=list(default))
    reference.set_timesteps(10)
    assert calls == pytest.approx(reference.timesteps.tolist(), abs=1e-3)
    assert default_schedule_name(DDPMScheduler().config) is None


def test_other_training_schedules_keep_the_spaced_grid():
    ours = ERSDESolverScheduler.from_config(DDPMScheduler().config)
    spaced = ERSDESolverScheduler.from_config(DDPMScheduler().config, sampling_schedule=None)
    ours.set_timesteps(10)
    spaced.set_timesteps(10)
    assert ours.timesteps.tolist() == spaced.timesteps.tolist()


@pytest.mark.parametrize("name", sorted(NAMED_SCHEDULES))
def test_named_schedules_are_sampled_as_stored(name):
    scheduler = ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, sampling_schedule=name)
    levels = NAMED_SCHEDULES[name].noise_levels
    scheduler.set_timesteps(len(levels))
    np.testing.assert_allclose(scheduler.sigmas[:-1].numpy(), levels, rtol=1e-4)
    assert (scheduler.timesteps[1:] < scheduler.timesteps[:-1]).all()
