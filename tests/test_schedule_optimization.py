import pytest
import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler
from test_er_sde import SMOOTH_LAW

from diffusers_ext.schedulers import ERSDESolverScheduler, optimize_timesteps
from diffusers_ext.testing.sampler_accuracy import SD3_SCHEDULER_CONFIG, SD_SCHEDULER_CONFIG, oracle_for


def _setup(scheduler):
    oracle = oracle_for(SMOOTH_LAW, scheduler.config).double()
    return oracle, (lambda x, t: oracle(x, t).sample)


def _teacher_gap(scheduler, model, noise, steps):
    """Mean squared distance of a ``steps``-step run to a 400-step run from the same noise (held-out noise)."""
    def run(n):
        scheduler.set_timesteps(n)
        x = noise.clone()
        for t in scheduler.timesteps:
            x = scheduler.step(model(x, t.expand(len(x))), t, x).prev_sample
        return x
    return float((run(steps) - run(400)).pow(2).mean())


@pytest.mark.parametrize("method", ["ld3", "ays"])
def test_learned_schedule_beats_the_default_on_held_out_noise_and_round_trips(method, tmp_path):
    scheduler = ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG, noise_scale="ode", solver_order=2)
    oracle, model = _setup(scheduler)
    generator = torch.Generator().manual_seed(7)
    held_out = torch.randn(256, *oracle.sample_shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64)
    before = _teacher_gap(scheduler, model, held_out, 6)
    inputs = ({"noise": torch.randn(64, *oracle.sample_shape, generator=generator, dtype=torch.float64)} if method == "ld3"
              else {"data": SMOOTH_LAW.sample(64, generator).view(64, *oracle.sample_shape)})
    result = optimize_timesteps(scheduler, model, 6, method=method, progress=False, max_sweeps=4, **inputs)
    assert result.objective[-1] < result.objective[0]
    assert scheduler.config.sampling_schedule == result.sigmas and len(result.sigmas) == 6
    after = _teacher_gap(scheduler, model, held_out, 6)
    # LD3 minimises this gap itself; AYS minimises a KL bound and helps it less (measured: 0.023 -> 0.014).
    assert after < before * (0.5 if method == "ld3" else 0.8), (before, after)

    scheduler.save_pretrained(tmp_path)
    reloaded = ERSDESolverScheduler.from_pretrained(tmp_path)
    reloaded.set_timesteps(6)
    assert torch.allclose(reloaded.sigmas[:-1], torch.tensor(result.sigmas, dtype=torch.float64))


def test_stock_scheduler_gets_integer_timesteps_stored_in_its_config(tmp_path):
    scheduler = DPMSolverMultistepScheduler.from_config(SD_SCHEDULER_CONFIG)
    oracle, model = _setup(scheduler)
    noise = torch.randn(32, *oracle.sample_shape, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    result = optimize_timesteps(scheduler, model, 5, method="ld3", noise=noise, progress=False, max_sweeps=2,
                                teacher_steps=100)
    assert all(a > b for a, b in zip(result.timesteps, result.timesteps[1:], strict=False))
    scheduler.save_pretrained(tmp_path)
    assert DPMSolverMultistepScheduler.from_pretrained(tmp_path).config.sampling_schedule == result.sigmas


def test_bad_inputs_raise():
    scheduler = ERSDESolverScheduler.from_config(SD_SCHEDULER_CONFIG)
    _, model = _setup(scheduler)
    with pytest.raises(ValueError, match="method"):
        optimize_timesteps(scheduler, model, 5, method="gits")
    with pytest.raises(ValueError, match="needs `data`"):
        optimize_timesteps(scheduler, model, 5, method="ays")
    with pytest.raises(ValueError, match="num_inference_steps"):
        optimize_timesteps(scheduler, model, 0, method="ld3", noise=torch.zeros(1, 2, 1, 1))
    with pytest.raises(ValueError, match="accepts neither"):
        optimize_timesteps(DDIMScheduler.from_config(SD_SCHEDULER_CONFIG), model, 5, method="ld3", noise=torch.zeros(1))
    with pytest.raises(ValueError, match="flow-matching"):
        optimize_timesteps(FlowMatchEulerDiscreteScheduler.from_config(SD3_SCHEDULER_CONFIG), model, 5, noise=torch.zeros(1))
