"""Frame-timestep plans: the constructors lay out what they say (Diffusion Forcing's pyramid as SkyReels-V2's
``generate_timestep_matrix`` does), and invalid plans or frame counts raise ValueError naming the frame and step."""

import pytest
import torch

from diffusers_ext.pipelines.video import FrameTimestepPlan, latent_frame_count

SCHEDULE = torch.tensor([1.0, 0.8, 0.55, 0.3, 0.1, 0.0], dtype=torch.float64)
GRID_STEPS = SCHEDULE.numel() - 1


def test_standard_walks_the_schedule_with_every_frame():
    plan = FrameTimestepPlan.standard(SCHEDULE, 4)
    assert (plan.num_steps, plan.num_frames, len(plan)) == (GRID_STEPS, 4, GRID_STEPS)
    assert torch.equal(plan.levels, SCHEDULE[:, None].expand(-1, 4))
    assert plan.active.all()
    rows = list(plan)
    assert len(rows) == GRID_STEPS
    assert torch.equal(rows[2][0], plan.levels[2]) and torch.equal(rows[2][1], plan.levels[3])


def test_image_to_video_and_interpolation_hold_their_frames_clean():
    plan = FrameTimestepPlan.image_to_video(SCHEDULE, 5, clean_frames=(0, 2))
    assert (plan.levels[:, [0, 2]] == 0).all() and not plan.active[:, [0, 2]].any()
    assert torch.equal(plan.levels[:, [1, 3, 4]], SCHEDULE[:, None].expand(-1, 3)) and plan.active[:, [1, 3, 4]].all()

    plan = FrameTimestepPlan.interpolation(SCHEDULE, 7)
    assert torch.equal(torch.nonzero(~plan.active.any(0)).flatten(), torch.tensor([0, 6]))
    plan = FrameTimestepPlan.interpolation(SCHEDULE, 7, key_frames=(1, -3, 6))
    assert torch.equal(torch.nonzero(~plan.active.any(0)).flatten(), torch.tensor([1, 4, 6]))


@pytest.mark.parametrize(("frame_offset", "block_size", "num_clean_frames"),
                         [(1, 1, 0), (2, 1, 0), (3, 3, 0), (GRID_STEPS, 1, 0), (2, 1, 2), (1, 3, 3)])
def test_diffusion_forcing_is_skyreels_timestep_matrix(frame_offset, block_size, num_clean_frames):
    """SkyReels-V2's ``generate_timestep_matrix`` (the facts, run: row ``r``'s timesteps and update mask) against the
    plan's ``levels[r]`` and ``active[r]``; SkyReels lists the timesteps the model is evaluated at, without the final
    clean level, on a 0..1000 scale. (SkyReels drops a last block shorter than ``causal_block_size``; the plan keeps
    it as a shorter block, so the frame counts here fill whole blocks.)"""
    from diffusers import SkyReelsV2DiffusionForcingPipeline

    num_frames = 9
    template = (SCHEDULE[:-1] * 1000).round()
    timesteps, _, update_mask, _ = SkyReelsV2DiffusionForcingPipeline.generate_timestep_matrix(
        None, num_frames, template, base_num_latent_frames=num_frames, ar_step=frame_offset,
        num_pre_ready=num_clean_frames, causal_block_size=block_size,
    )
    plan = FrameTimestepPlan.diffusion_forcing(SCHEDULE, num_frames, frame_offset, block_size, num_clean_frames)
    assert plan.num_steps == update_mask.shape[0]
    assert torch.equal(plan.active, update_mask)
    assert torch.equal((plan.levels[:-1] * 1000).round().long()[plan.active], timesteps[update_mask])
    assert (plan.levels[-1] == 0).all()


def test_diffusion_forcing_lags_each_block_by_the_offset():
    plan = FrameTimestepPlan.diffusion_forcing(SCHEDULE, 4, frame_offset=2)
    assert plan.num_steps == GRID_STEPS + 2 * 3
    for frame in range(4):
        start = 2 * frame
        assert torch.equal(plan.levels[start : start + GRID_STEPS + 1, frame], SCHEDULE)
        assert (plan.levels[:start, frame] == 1).all() and (plan.levels[start + GRID_STEPS :, frame] == 0).all()
    assert torch.equal(FrameTimestepPlan.diffusion_forcing(SCHEDULE, 4, frame_offset=0).levels,
                       FrameTimestepPlan.standard(SCHEDULE, 4).levels)


def test_from_matrix_accepts_nested_lists_and_paused_frames():
    plan = FrameTimestepPlan.from_matrix([[1.0, 0.0], [0.8, 0.0], [0.8, 0.0], [0.0, 0.0]], SCHEDULE)
    assert plan.levels.dtype == torch.float64
    assert plan.active.tolist() == [[True, False], [False, False], [True, False]]
    assert "num_steps=3, num_frames=2" in repr(plan)


def test_invalid_plans_name_the_frame_and_step():
    with pytest.raises(ValueError, match=r"frame 1 rises from 0\.3 at step 1 to 0\.55 at step 2"):
        FrameTimestepPlan.from_matrix([[1.0, 1.0], [0.8, 0.3], [0.5, 0.55]], SCHEDULE)
    with pytest.raises(ValueError, match=r"within the schedule's range \[0, 1\]: frame 0 at step 2 is -0.1"):
        FrameTimestepPlan.from_matrix([[1.0, 1.0], [0.8, 0.3], [-0.1, 0.1]], SCHEDULE)
    with pytest.raises(ValueError, match=r"range \[0.1, 0.8\]: frame 1 at step 0 is 1"):
        FrameTimestepPlan.from_matrix([[0.8, 1.0], [0.1, 0.1]], SCHEDULE[1:5])
    with pytest.raises(ValueError, match=r"levels must have shape \(num_steps \+ 1, num_frames\).*got \(3,\)"):
        FrameTimestepPlan.from_matrix([1.0, 0.5, 0.0], SCHEDULE)
    with pytest.raises(ValueError, match=r"got \(1, 2\)"):
        FrameTimestepPlan.from_matrix([[1.0, 0.5]], SCHEDULE)
    with pytest.raises(ValueError, match="frame 1 at step 1 is nan"):
        FrameTimestepPlan.from_matrix([[1.0, 1.0], [0.0, float("nan")]], SCHEDULE)
    with pytest.raises(ValueError, match="schedule must be strictly decreasing"):
        FrameTimestepPlan.standard([1.0, 0.5, 0.5, 0.0], 3)
    with pytest.raises(ValueError, match="schedule must be a 1-D grid"):
        FrameTimestepPlan.standard(SCHEDULE[:, None], 3)
    with pytest.raises(ValueError, match=r"schedule's noise levels must lie in \[0, 1\]"):
        FrameTimestepPlan.standard([2.0, 1.0, 0.0], 3)


def test_invalid_constructor_arguments_name_the_argument():
    with pytest.raises(ValueError, match="clean_frames must hold frame indices in"):
        FrameTimestepPlan.image_to_video(SCHEDULE, 4, clean_frames=(4,))
    with pytest.raises(ValueError, match="clean_frames must name at least 1 and fewer than num_frames=2"):
        FrameTimestepPlan.image_to_video(SCHEDULE, 2, clean_frames=(0, 1))
    with pytest.raises(ValueError, match="key_frames must name at least 2"):
        FrameTimestepPlan.interpolation(SCHEDULE, 5, key_frames=(0, 0))
    with pytest.raises(ValueError, match=r"frame_offset must be an int in \[0, 5\], got 6"):
        FrameTimestepPlan.diffusion_forcing(SCHEDULE, 4, frame_offset=6)
    with pytest.raises(ValueError, match="block_size must be an int"):
        FrameTimestepPlan.diffusion_forcing(SCHEDULE, 4, block_size=0)
    with pytest.raises(ValueError, match="num_clean_frames must be an int"):
        FrameTimestepPlan.diffusion_forcing(SCHEDULE, 4, num_clean_frames=4)
    with pytest.raises(ValueError, match="num_frames must be a positive int"):
        FrameTimestepPlan.standard(SCHEDULE, 0)


def test_frame_counts_after_the_vae():
    assert latent_frame_count(81, 4) == 21  # Wan 2.1: 81 frames -> 21 latent frames
    assert latent_frame_count(1, 4) == 1
    assert latent_frame_count(121, 8) == 16  # LTX-Video
    assert latent_frame_count(7, 1) == 7
    with pytest.raises(ValueError, match=r"num_frames=80 cannot be encoded .* temporal compression 4.*e.g. 77 or 81"):
        latent_frame_count(80, 4)
    with pytest.raises(ValueError, match="temporal_compression_ratio must be a positive int"):
        latent_frame_count(81, 0)
    plan = FrameTimestepPlan.standard(SCHEDULE, latent_frame_count(17, 4))
    plan.check_frames(5)
    with pytest.raises(ValueError, match="the plan has 5 frames but the latents have 4 latent frames"):
        plan.check_frames(4)
