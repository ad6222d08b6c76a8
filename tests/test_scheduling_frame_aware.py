"""The frame-aware schedulers' vectorized step: with one level for all frames it is the stock diffusers scheduler's
step; with per-frame levels it is a deep copy of the stock scheduler per frame (how SkyReels-V2's pipeline steps);
frames whose level does not change come out bit-identical; bad inputs raise ValueError.

Tolerances. Every comparison is of float32 latents of size ~2 after a whole run (10 steps, or a mixed plan of ~20).
Our step rounds its per-frame coefficients, computed in float64, once to float32; the stock schedulers compute theirs
in float32 and in another order (x0 first, then the step), so each step differs by a few float32 ulps (1.2e-7
relative), and on the VP path with epsilon prediction the step from the top of the schedule amplifies x0's rounding by
1 / sqrt(alphas_cumprod) (61 at t = 900, DDIM's first timestep here) before scaling it back down. Measured largest
gaps: 2.5e-7 (flow Euler), 6e-7 (DDIM), 4.8e-7 / 1.2e-6 (DPM-Solver++(2M) flow / VP); the bound
``atol = rtol = 2e-5`` is over 10x that and far below what dropping the 2M history at pauses changes (0.14, measured in
``test_the_second_order_correction_is_used_and_kept_across_pauses``).
"""

import copy
import math

import pytest
import torch
from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    FlowMatchEulerDiscreteScheduler,
    UniPCMultistepScheduler,
)

from diffusers_ext.diffusion_math import prediction_from_x0_and_eps
from diffusers_ext.pipelines.video import FrameTimestepPlan
from diffusers_ext.schedulers import FrameAwareFlowMatchScheduler, FrameAwareVPScheduler

TOLERANCE = {"atol": 2e-5, "rtol": 2e-5}
SHAPE = (2, 3, 6, 4, 4)  # (B, C, F, H, W)
NUM_STEPS = 10


def path_alpha_sigma(levels: torch.Tensor, path: str) -> tuple[torch.Tensor, torch.Tensor]:
    return (1 - levels, levels) if path == "flow" else ((1 - levels**2).sqrt(), levels)


def gaussian_model(path: str, prediction_type: str):
    """The exact denoiser of a Gaussian data law (mean ``MEAN``, std 0.5 per element), evaluated per frame at the
    frame's level (``(F,)`` levels, frames on axis 2): a model whose predictions have the scale of real ones."""
    mean = torch.linspace(-1, 1, math.prod(SHAPE[1:])).reshape(1, *SHAPE[1:])

    def model(x: torch.Tensor, levels: torch.Tensor) -> torch.Tensor:
        alpha, sigma = (v.to(torch.float32).reshape(1, 1, -1, 1, 1) for v in path_alpha_sigma(levels, path))
        x0 = mean + alpha * 0.25 * (x - alpha * mean) / (alpha**2 * 0.25 + sigma**2)
        eps = (x - alpha * x0) / sigma.clamp(min=1e-3)
        return prediction_from_x0_and_eps(x0, eps, alpha, sigma, prediction_type)

    return model


def start_latents(seed: int = 0) -> torch.Tensor:
    return torch.randn(SHAPE, generator=torch.Generator().manual_seed(seed))


def vp_case(prediction_type="epsilon", solver_order=1):
    if solver_order == 1:
        stock = DDIMScheduler(clip_sample=False, prediction_type=prediction_type)
    else:
        stock = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2,
                                            prediction_type=prediction_type)
    ours = FrameAwareVPScheduler(prediction_type=prediction_type, solver_order=solver_order)
    stock.set_timesteps(NUM_STEPS)
    # Both end clean: DDIM at alphas_cumprod = 1 (set_alpha_to_one), DPM-Solver at sigma = 0 (final_sigmas_type).
    schedule = torch.cat([ours.noise_levels_from_timesteps(stock.timesteps), torch.zeros(1, dtype=torch.float64)])
    return stock, ours, schedule, gaussian_model("vp", prediction_type)


def flow_case(solver_order=1):
    if solver_order == 1:
        stock = FlowMatchEulerDiscreteScheduler(shift=3.0)
    else:
        stock = DPMSolverMultistepScheduler(algorithm_type="dpmsolver++", solver_order=2, use_flow_sigmas=True,
                                            prediction_type="flow_prediction", flow_shift=3.0)
    stock.set_timesteps(NUM_STEPS)
    ours = FrameAwareFlowMatchScheduler(shift=3.0, solver_order=solver_order)
    return stock, ours, stock.sigmas.double(), gaussian_model("flow", "flow_prediction")


CASES = {
    "ddim_epsilon": lambda: vp_case("epsilon"),
    "ddim_v": lambda: vp_case("v_prediction"),
    "ddim_sample": lambda: vp_case("sample"),
    "flow_euler": lambda: flow_case(),
    "dpmsolver++2m_vp": lambda: vp_case("epsilon", solver_order=2),
    "dpmsolver++2m_flow": lambda: flow_case(solver_order=2),
}


def stock_step(stock, output, timestep, sample, eta, noise):
    kwargs = {"eta": eta, "variance_noise": noise} if isinstance(stock, DDIMScheduler) else {}
    return stock.step(output, timestep, sample, **kwargs).prev_sample


STOCHASTIC_CASES = [(name, 0.0) for name in sorted(CASES)] + [(name, 0.7) for name in sorted(CASES) if "ddim" in name]


@pytest.mark.parametrize(("name", "eta"), STOCHASTIC_CASES)
def test_shared_level_equals_the_stock_scheduler_over_a_run(name, eta):
    stock, ours, schedule, model = CASES[name]()
    plan = FrameTimestepPlan.standard(schedule, SHAPE[2])
    expected = actual = start_latents()
    noises = torch.randn((NUM_STEPS, *SHAPE), generator=torch.Generator().manual_seed(1))
    for k, (level, next_level) in enumerate(plan):
        expected = stock_step(stock, model(expected, level), stock.timesteps[k], expected, eta, noises[k])
        actual = ours.step(model(actual, level), level, actual, next_level, eta=eta,
                           variance_noise=noises[k]).prev_sample
    assert expected.abs().max() > 0.1
    torch.testing.assert_close(actual, expected, **TOLERANCE)


def mixed_plan(schedule: torch.Tensor, seed: int) -> FrameTimestepPlan:
    """Frames 0 and 4 clean throughout; the others advance one grid level per step with probability 0.6, so they
    start late, pause mid-run and finish at different steps."""
    generator = torch.Generator().manual_seed(seed)
    grid_steps = schedule.numel() - 1
    index = torch.zeros(SHAPE[2], dtype=torch.long)
    index[[0, 4]] = grid_steps
    rows = [index.clone()]
    while (index < grid_steps).any():
        advance = (torch.rand(SHAPE[2], generator=generator) < 0.6) & (index < grid_steps)
        index = index + advance.long()
        rows.append(index.clone())
    return FrameTimestepPlan.from_matrix(schedule[torch.stack(rows)], schedule)


def per_frame_reference(stock, plan, model, start, eta, noises):
    """One deep copy of the stock scheduler per frame, each stepped on its frame's slice when the frame moves."""
    schedulers = [copy.deepcopy(stock) for _ in range(plan.num_frames)]
    moves = [0] * plan.num_frames
    sample = start
    for k, (level, _) in enumerate(plan):
        output, updated = model(sample, level), sample.clone()
        for frame in torch.nonzero(plan.active[k]).flatten().tolist():
            updated[:, :, frame] = stock_step(
                schedulers[frame], output[:, :, frame], stock.timesteps[moves[frame]], sample[:, :, frame], eta,
                noises[k][:, :, frame],
            )
            moves[frame] += 1
        sample = updated
    return sample


@pytest.mark.parametrize(("name", "eta"), [(name, 0.0) for name in sorted(CASES)] + [("ddim_epsilon", 0.7)])
def test_per_frame_levels_equal_a_stock_scheduler_per_frame(name, eta):
    stock, ours, schedule, model = CASES[name]()
    plan = mixed_plan(schedule, seed=3)
    assert (plan.active.sum(0)[[1, 2, 3, 5]] == NUM_STEPS).all() and plan.num_steps > NUM_STEPS + 3
    paused_mid_run = [(~plan.active[1:-1, f] & plan.active[:-2, f]).any() for f in (1, 2, 3, 5)]
    assert any(paused_mid_run)
    noises = torch.randn((plan.num_steps, *SHAPE), generator=torch.Generator().manual_seed(1))
    start = start_latents()
    expected = per_frame_reference(stock, plan, model, start, eta, noises)

    sample = start
    for k, (level, next_level) in enumerate(plan):
        previous = sample
        sample = ours.step(model(sample, level), level, sample, next_level, eta=eta,
                           variance_noise=noises[k]).prev_sample
        still = ~plan.active[k]
        assert torch.equal(sample[:, :, still], previous[:, :, still])
    torch.testing.assert_close(sample, expected, **TOLERANCE)
    assert torch.equal(sample[:, :, [0, 4]], start[:, :, [0, 4]])


def test_the_second_order_correction_is_used_and_kept_across_pauses():
    """Not a vacuous pass: the 2M run differs from the first-order one, and so does a 2M run whose history is dropped
    at every pause (the per-frame reference above keeps it)."""
    _, ours, schedule, model = CASES["dpmsolver++2m_flow"]()
    plan = mixed_plan(schedule, seed=3)

    def run(scheduler, forget_at_pauses=False):
        sample = start_latents()
        for k, (level, next_level) in enumerate(plan):
            if forget_at_pauses and k > 0 and (plan.active[k - 1] & ~plan.active[k]).any():
                scheduler.set_timesteps(NUM_STEPS)  # clears the history
            sample = scheduler.step(model(sample, level), level, sample, next_level).prev_sample
        return sample

    second_order = run(ours)  # measured gaps to the runs below: 0.146 and 0.142
    assert (second_order - run(FrameAwareFlowMatchScheduler(shift=3.0))).abs().max() > 0.02
    assert (second_order - run(FrameAwareFlowMatchScheduler(shift=3.0, solver_order=2), True)).abs().max() > 0.02
    # A new run without set_timesteps starts first order again (its start level is not where any frame landed).
    torch.testing.assert_close(run(ours), second_order, atol=0, rtol=0)


@pytest.mark.parametrize("solver_order", [1, 2])
def test_batch_rows_with_their_own_plans_equal_separate_runs(solver_order):
    ours = FrameAwareFlowMatchScheduler(shift=3.0, solver_order=solver_order)
    ours.set_timesteps(NUM_STEPS)
    schedule = ours.noise_levels
    plans = [FrameTimestepPlan.diffusion_forcing(schedule, SHAPE[2], frame_offset=2),
             FrameTimestepPlan.interpolation(schedule, SHAPE[2])]
    plans[1] = FrameTimestepPlan.from_matrix(torch.cat([plans[1].levels, plans[1].levels[-1:].expand(
        plans[0].num_steps - plans[1].num_steps, -1)]), schedule)
    model = gaussian_model("flow", "flow_prediction")
    start = start_latents()

    def run(sample, level_rows):
        for k in range(plans[0].num_steps):
            level, next_level = level_rows[k], level_rows[k + 1]
            output = torch.cat([model(sample[i : i + 1], level[i]) for i in range(sample.shape[0])])
            sample = ours.step(output, level, sample, next_level).prev_sample
        return sample

    together = run(start, torch.stack([plans[0].levels, plans[1].levels], dim=1))
    for row, plan in enumerate(plans):
        ours.set_timesteps(NUM_STEPS)
        alone = run(start[row : row + 1], plan.levels[:, None])
        torch.testing.assert_close(together[row : row + 1], alone, atol=1e-6, rtol=1e-6)


def test_frame_dim_selects_the_frame_axis():
    model = gaussian_model("flow", "flow_prediction")
    channels_first = FrameAwareFlowMatchScheduler(solver_order=2)
    frames_first = FrameAwareFlowMatchScheduler(solver_order=2, frame_dim=1)
    channels_first.set_timesteps(NUM_STEPS)
    plan = FrameTimestepPlan.diffusion_forcing(channels_first.noise_levels, SHAPE[2], frame_offset=3)
    a = start_latents()
    b = a.transpose(1, 2).contiguous()
    for level, next_level in plan:
        output = model(a, level)
        a = channels_first.step(output, level, a, next_level).prev_sample
        b = frames_first.step(output.transpose(1, 2), level, b, next_level).prev_sample
    torch.testing.assert_close(b, a.transpose(1, 2), atol=1e-6, rtol=1e-6)


def test_bfloat16_latents_are_stepped_in_float32_and_still_frames_kept():
    ours = FrameAwareFlowMatchScheduler()
    sample = start_latents().to(torch.bfloat16)
    output = torch.randn(SHAPE, generator=torch.Generator().manual_seed(2)).to(torch.bfloat16)
    level = torch.tensor([0.0, 0.5, 0.5, 0.9, 1.0, 1.0], dtype=torch.float64)
    next_level = torch.tensor([0.0, 0.5, 0.4, 0.8, 0.95, 1.0], dtype=torch.float64)
    prev = ours.step(output, level, sample, next_level).prev_sample
    assert prev.dtype == torch.bfloat16
    assert torch.equal(prev[:, :, [0, 1, 5]], sample[:, :, [0, 1, 5]])
    expected = sample.float() + (next_level - level).float().reshape(1, 1, -1, 1, 1) * output.float()
    # One bfloat16 rounding of the float32 result (addcmul may fuse what the reference rounds twice).
    torch.testing.assert_close(prev[:, :, 2:5].float(), expected[:, :, 2:5], atol=1e-2, rtol=8e-3)


def test_predicted_clean_latents_and_a_step_where_nothing_moves():
    ours = FrameAwareFlowMatchScheduler(solver_order=2)
    sample, output = start_latents(0), start_latents(1)
    level = torch.tensor([0.0, 0.3, 0.6, 0.6, 1.0, 1.0], dtype=torch.float64)
    x0 = ours.predict_original_sample(output, level, sample)
    torch.testing.assert_close(x0, sample - level.float().reshape(1, 1, -1, 1, 1) * output)  # x0 = x - sigma u
    assert torch.equal(x0[:, :, 0], sample[:, :, 0])
    step = ours.step(output, level, sample, level * 0.5)
    torch.testing.assert_close(step.pred_original_sample, x0, atol=0, rtol=0)

    prev_sample, pred_original_sample = ours.step(output, level, sample, level, return_dict=False)
    assert torch.equal(prev_sample, sample) and prev_sample is not sample and pred_original_sample is None


def test_grids_are_the_stock_schedulers():
    ours = FrameAwareFlowMatchScheduler(shift=5.0)
    stock = FlowMatchEulerDiscreteScheduler(shift=5.0)
    ours.set_timesteps(7)
    stock.set_timesteps(7)
    assert torch.equal(ours.timesteps, stock.timesteps)
    assert torch.equal(ours.noise_levels, stock.sigmas.double())
    torch.testing.assert_close(ours.timesteps_from_noise_levels(ours.noise_levels[:-1]), stock.timesteps,
                               atol=0, rtol=0)

    vp = FrameAwareVPScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    ddim = DDIMScheduler(timestep_spacing="trailing", set_alpha_to_one=False)
    vp.set_timesteps(8)
    ddim.set_timesteps(8)
    assert torch.equal(vp.timesteps, ddim.timesteps)
    torch.testing.assert_close(vp.noise_levels[:-1], (1 - ddim.alphas_cumprod[ddim.timesteps].double()).sqrt())
    assert vp.noise_levels[-1] == (1 - ddim.alphas_cumprod[0].double()).sqrt()
    assert torch.equal(vp.timesteps_from_noise_levels(vp.noise_levels[:-1]), ddim.timesteps.float())
    assert vp.timesteps_from_noise_levels(torch.tensor([0.0])).item() == 0.0


def test_add_noise_per_frame():
    ours = FrameAwareVPScheduler()
    x0, noise = start_latents(0), start_latents(1)
    levels = torch.tensor([[0.0, 0.3, 0.6, 0.9, 0.99, 0.5], [0.1, 0.2, 0.3, 0.4, 0.5, 0.6]], dtype=torch.float64)
    noisy = ours.add_noise(x0, noise, levels)
    alpha, sigma = (1 - levels**2).sqrt(), levels
    view = (2, 1, 6, 1, 1)
    expected = alpha.float().reshape(view) * x0 + sigma.float().reshape(view) * noise
    torch.testing.assert_close(noisy, expected)
    assert torch.equal(noisy[0, :, 0], x0[0, :, 0])


def test_from_config_reads_a_wan_unipc_config_and_round_trips(tmp_path):
    wan = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=5.0)
    ours = FrameAwareFlowMatchScheduler.from_config(wan.config, solver_order=2)
    assert ours.config.shift == 5.0 and ours.config.solver_order == 2
    ours.save_pretrained(tmp_path)
    loaded = FrameAwareFlowMatchScheduler.from_pretrained(tmp_path)
    public = lambda config: {k: v for k, v in config.items() if not k.startswith("_")}  # noqa: E731
    assert public(loaded.config) == public(ours.config)
    ddim = DDIMScheduler(beta_schedule="scaled_linear", prediction_type="v_prediction")
    vp = FrameAwareVPScheduler.from_config(ddim.config)
    assert vp.config.beta_schedule == "scaled_linear" and vp.config.prediction_type == "v_prediction"


def test_bad_inputs_raise_value_errors_naming_the_argument():
    ours = FrameAwareFlowMatchScheduler()
    sample = start_latents()
    output = torch.zeros_like(sample)
    level = torch.full((SHAPE[2],), 0.5, dtype=torch.float64)
    with pytest.raises(ValueError, match=r"next_noise_level must not exceed noise_level: frame 3 \(batch row 0\)"):
        ours.step(output, level, sample, torch.tensor([0.4, 0.4, 0.4, 0.6, 0.4, 0.4]))
    with pytest.raises(ValueError, match=r"noise_level must be one level, \(6,\) or \(2, 6\)"):
        ours.step(output, level[:5], sample, level[:5])
    with pytest.raises(ValueError, match=r"next_noise_level must be one level, \(6,\) or \(2, 6\)"):
        ours.step(output, level, sample, torch.zeros(3, 6))
    with pytest.raises(ValueError, match=r"noise_level must be noise levels in \[0, 1\]"):
        ours.step(output, level + 0.6, sample, level)
    with pytest.raises(ValueError, match="model_output has shape"):
        ours.step(output[:, :, :5], level, sample, level)
    with pytest.raises(ValueError, match="frame_dim=2 needs at least 3"):
        ours.step(output[:, 0, 0, 0], 0.5, sample[:, 0, 0, 0], 0.4)
    with pytest.raises(ValueError, match="eta must be >= 0"):
        ours.step(output, level, sample, level, eta=-1.0)
    with pytest.raises(ValueError, match="eta > 0 needs solver_order=1"):
        FrameAwareFlowMatchScheduler(solver_order=2).step(output, level, sample, level, eta=0.5)
    with pytest.raises(ValueError, match="variance_noise must have the sample's shape"):
        ours.step(output, level, sample, level * 0.9, eta=0.5, variance_noise=output[:1])
    with pytest.raises(ValueError, match="noise_levels must not exceed"):
        FrameAwareVPScheduler().timesteps_from_noise_levels(torch.tensor([1.0]))
    for bad in ({"solver_order": 3}, {"frame_dim": 0}, {"prediction_type": "x0"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            FrameAwareFlowMatchScheduler(**bad)
