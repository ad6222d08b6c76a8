"""Frame-timestep plans: which noise level every video frame is at, step by step.

FVDM ("Redefining Temporal Modeling in Video Diffusion: The Vectorized Timestep Approach", Liu et al., arXiv
2410.03160) gives every frame its own timestep, so that one model does standard generation, image-to-video,
interpolation and long video by the choice of per-frame timesteps at sampling time. Diffusion Forcing ("Diffusion
Forcing: Next-token Prediction Meets Full-Sequence Diffusion", Chen et al., arXiv 2407.01392) samples long sequences
with noise rising with frame index (its "pyramid" schedule), which lets a window roll forward as the first frames
come clean. A ``FrameTimestepPlan`` is the matrix such a sampler walks: ``levels[k, f]`` is frame ``f``'s noise level
before step ``k``; row 0 is where sampling starts and row ``num_steps`` where it ends.

**Noise levels, not timesteps.** A level is ``sigma`` in ``x = alpha x0 + sigma eps``: 0 is clean, 1 pure noise, on
flow-matching paths (``alpha = 1 - sigma``, the ``sigmas`` of ``FlowMatchEulerDiscreteScheduler``) and VP paths
(``alpha = sqrt(1 - sigma^2)``) alike. Timesteps cannot say "clean" on a VP path (DDIM's last step goes to
``alphas_cumprod = 1``, which no training timestep has), and a level compares across schedules and shifts; the
frame-aware schedulers (``diffusers_ext.schedulers.FrameAwareFlowMatchScheduler`` / ``FrameAwareVPScheduler``)
convert levels to the timesteps their model takes (``timesteps_from_noise_levels``) and back.

A plan knows the schedule it indexes: ``schedule`` is the 1-D descending grid of levels its constructors lay out (a
scheduler's ``noise_levels`` after ``set_timesteps``), and every level of the plan lies within the grid's range.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

LevelsLike = torch.Tensor | Sequence


def latent_frame_count(num_frames: int, temporal_compression_ratio: int) -> int:
    """The number of latent frames a causal video VAE makes of ``num_frames`` pixel frames: the first frame is encoded
    alone and every ``temporal_compression_ratio`` frames after it into one latent frame, so ``(num_frames - 1)`` must
    be a multiple of the ratio (Wan, CogVideoX: 4, e.g. 81 frames -> 21; LTX-Video: 8)."""
    for name, value in (("num_frames", num_frames), ("temporal_compression_ratio", temporal_compression_ratio)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name} must be a positive int, got {value!r}")
    if (num_frames - 1) % temporal_compression_ratio:
        below = (num_frames - 1) // temporal_compression_ratio * temporal_compression_ratio + 1
        raise ValueError(
            f"num_frames={num_frames} cannot be encoded by a VAE with temporal compression "
            f"{temporal_compression_ratio}: it needs num_frames - 1 divisible by {temporal_compression_ratio} "
            f"(e.g. {below} or {below + temporal_compression_ratio})"
        )
    return (num_frames - 1) // temporal_compression_ratio + 1


def _as_levels(values: LevelsLike, name: str) -> torch.Tensor:
    if isinstance(values, torch.Tensor):
        return values.detach().to("cpu", torch.float64)
    try:
        return torch.as_tensor(values, dtype=torch.float64)
    except (TypeError, ValueError) as error:
        raise ValueError(f"{name} must be a tensor or a (nested) sequence of numbers: {error}") from error


def _check_schedule(schedule: torch.Tensor) -> None:
    if schedule.ndim != 1 or schedule.numel() < 2:
        raise ValueError(f"schedule must be a 1-D grid of at least 2 noise levels, got shape {tuple(schedule.shape)}")
    if not torch.isfinite(schedule).all():
        raise ValueError(f"schedule must be finite, got {schedule.tolist()}")
    if not (schedule[1:] < schedule[:-1]).all():
        raise ValueError(f"schedule must be strictly decreasing (noise to clean), got {schedule.tolist()}")
    if schedule[-1] < 0 or schedule[0] > 1:
        raise ValueError(f"schedule's noise levels must lie in [0, 1], got {schedule.tolist()}")


def _frame_indices(frames: Sequence[int], num_frames: int, name: str) -> list[int]:
    """Distinct frame indices in ``[0, num_frames)``, negative ones counted from the end (as Python indexes)."""
    indices = []
    for frame in frames:
        if isinstance(frame, bool) or not isinstance(frame, int) or not -num_frames <= frame < num_frames:
            raise ValueError(f"{name} must hold frame indices in [-{num_frames}, {num_frames}), got {list(frames)}")
        indices.append(frame % num_frames)
    return sorted(set(indices))


def _check_num_frames(num_frames: int) -> None:
    if isinstance(num_frames, bool) or not isinstance(num_frames, int) or num_frames < 1:
        raise ValueError(f"num_frames must be a positive int, got {num_frames!r}")


@dataclass(frozen=True, eq=False)
class FrameTimestepPlan:
    """A ``(num_steps + 1, num_frames)`` matrix of per-frame noise levels for vectorized-timestep video sampling
    (FVDM, arXiv 2410.03160; Diffusion Forcing, arXiv 2407.01392). See the module docstring for what a level is.

    Sampling runs ``for k in range(plan.num_steps)``: the model sees every frame at ``levels[k]`` (as timesteps
    ``scheduler.timesteps_from_noise_levels(levels[k])``) and the frame-aware scheduler's ``step`` takes each frame
    from ``levels[k, f]`` to ``levels[k + 1, f]``. A frame whose level does not change in a step (``active[k, f]``
    False: a clean conditioning frame, a frame waiting for its turn) is left as it is.

    Build one with ``standard``, ``image_to_video``, ``interpolation``, ``diffusion_forcing`` or ``from_matrix``
    (the constructor itself validates the same way). Invalid plans raise ``ValueError`` naming the frame and step:
    a frame's level may never rise, and every level lies within ``[schedule[-1], schedule[0]]``.

    Attributes:
        levels: ``(num_steps + 1, num_frames)`` float64 on the CPU.
        schedule: the 1-D strictly decreasing grid of levels (noise to clean) the plan is laid on.
    """

    levels: torch.Tensor
    schedule: torch.Tensor

    def __post_init__(self):
        levels, schedule = _as_levels(self.levels, "levels"), _as_levels(self.schedule, "schedule")
        _check_schedule(schedule)
        if levels.ndim != 2 or levels.shape[0] < 2 or levels.shape[1] < 1:
            raise ValueError(
                f"levels must have shape (num_steps + 1, num_frames) with num_steps >= 1, got {tuple(levels.shape)}"
            )
        if not torch.isfinite(levels).all():
            step, frame = torch.nonzero(~torch.isfinite(levels))[0].tolist()
            raise ValueError(f"levels must be finite: frame {frame} at step {step} is {levels[step, frame].item()}")
        outside = (levels > schedule[0]) | (levels < schedule[-1])
        if outside.any():
            step, frame = torch.nonzero(outside)[0].tolist()
            raise ValueError(
                f"levels must lie within the schedule's range [{schedule[-1].item():.6g}, {schedule[0].item():.6g}]: "
                f"frame {frame} at step {step} is {levels[step, frame].item():.6g}"
            )
        rising = levels[1:] > levels[:-1]
        if rising.any():
            step, frame = torch.nonzero(rising)[0].tolist()
            raise ValueError(
                f"levels must be non-increasing along the steps for every frame: frame {frame} rises from "
                f"{levels[step, frame].item():.6g} at step {step} to {levels[step + 1, frame].item():.6g} at step "
                f"{step + 1}"
            )
        object.__setattr__(self, "levels", levels)
        object.__setattr__(self, "schedule", schedule)

    @property
    def num_steps(self) -> int:
        return self.levels.shape[0] - 1

    @property
    def num_frames(self) -> int:
        return self.levels.shape[1]

    @property
    def active(self) -> torch.Tensor:
        """``(num_steps, num_frames)`` bool: whether frame ``f`` moves at step ``k`` (its level drops)."""
        return self.levels[1:] < self.levels[:-1]

    def __len__(self) -> int:
        return self.num_steps

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """``(noise_level, next_noise_level)`` per step, each ``(num_frames,)``: the arguments of the scheduler's
        ``step``."""
        return iter(zip(self.levels[:-1], self.levels[1:], strict=True))

    def check_frames(self, num_latent_frames: int) -> None:
        """Raise ``ValueError`` unless the plan has one column per latent frame (after the VAE's temporal
        compression: ``latent_frame_count``)."""
        if num_latent_frames != self.num_frames:
            raise ValueError(
                f"the plan has {self.num_frames} frames but the latents have {num_latent_frames} latent frames "
                "(pixel frames become latent_frame_count(num_frames, temporal_compression_ratio) latent frames)"
            )

    def __repr__(self) -> str:
        return (f"FrameTimestepPlan(num_steps={self.num_steps}, num_frames={self.num_frames}, "
                f"schedule=[{self.schedule[0].item():.4g} .. {self.schedule[-1].item():.4g}] "
                f"({self.schedule.numel()} levels))")

    @classmethod
    def from_matrix(cls, levels: LevelsLike, schedule: LevelsLike) -> FrameTimestepPlan:
        """A plan from your own ``(num_steps + 1, num_frames)`` matrix of noise levels (a tensor, array or nested
        list), validated against ``schedule``. To start from model timesteps, convert them first with the
        scheduler's ``noise_levels_from_timesteps``."""
        return cls(levels=_as_levels(levels, "levels"), schedule=_as_levels(schedule, "schedule"))

    @classmethod
    def standard(cls, schedule: LevelsLike, num_frames: int) -> FrameTimestepPlan:
        """Every frame walks the whole ``schedule`` together: ordinary video generation, ``len(schedule) - 1``
        steps."""
        return cls.diffusion_forcing(schedule, num_frames, frame_offset=0)

    @classmethod
    def image_to_video(
        cls, schedule: LevelsLike, num_frames: int, clean_frames: Sequence[int] = (0,)
    ) -> FrameTimestepPlan:
        """The frames in ``clean_frames`` (given images, encoded) stay at the clean end of the schedule; the others
        walk the schedule together."""
        return cls._with_clean_frames(schedule, num_frames, clean_frames, "clean_frames", minimum=1)

    @classmethod
    def interpolation(
        cls, schedule: LevelsLike, num_frames: int, key_frames: Sequence[int] = (0, -1)
    ) -> FrameTimestepPlan:
        """Key frames at any indices (by default the first and the last) stay clean; the frames around and between
        them walk the schedule together."""
        return cls._with_clean_frames(schedule, num_frames, key_frames, "key_frames", minimum=2)

    @classmethod
    def _with_clean_frames(cls, schedule, num_frames, frames, name, minimum) -> FrameTimestepPlan:
        _check_num_frames(num_frames)
        indices = _frame_indices(frames, num_frames, name)
        if not minimum <= len(indices) < num_frames:
            raise ValueError(
                f"{name} must name at least {minimum} and fewer than num_frames={num_frames} distinct frames, "
                f"got {list(frames)}"
            )
        plan = cls.standard(schedule, num_frames)
        levels = plan.levels.clone()
        levels[:, indices] = plan.schedule[-1]
        return cls(levels=levels, schedule=plan.schedule)

    @classmethod
    def diffusion_forcing(
        cls,
        schedule: LevelsLike,
        num_frames: int,
        frame_offset: int = 1,
        block_size: int = 1,
        num_clean_frames: int = 0,
    ) -> FrameTimestepPlan:
        """Diffusion Forcing's pyramid: noise rising with frame index. The first ``num_clean_frames`` frames are
        given and stay clean (the context of a rolling window, or a video to extend); the others are cut into blocks
        of ``block_size`` frames, and block ``b`` starts ``b * frame_offset`` steps after block 0, then walks the
        schedule one grid level per step:

            levels[k, f] = schedule[clamp(k - b(f) * frame_offset, 0, n)],
            b(f) = (f - num_clean_frames) // block_size

        with ``n = len(schedule) - 1``, over ``n + frame_offset * (num_blocks - 1)`` steps. ``frame_offset = 0`` is
        ``standard``; ``frame_offset = n`` finishes each block before the next starts (frame-by-frame
        autoregression). A last block shorter than ``block_size`` is kept as a shorter block. With whole blocks this
        is the matrix SkyReels-V2's ``generate_timestep_matrix`` builds with ``ar_step = frame_offset``,
        ``causal_block_size = block_size``, ``num_pre_ready = num_clean_frames`` (which drops a partial last block).
        """
        schedule = _as_levels(schedule, "schedule")
        _check_schedule(schedule)
        _check_num_frames(num_frames)
        grid_steps = schedule.numel() - 1
        checks = (("frame_offset", frame_offset, 0, grid_steps), ("block_size", block_size, 1, num_frames),
                  ("num_clean_frames", num_clean_frames, 0, num_frames - 1))
        for name, value, low, high in checks:
            if isinstance(value, bool) or not isinstance(value, int) or not low <= value <= high:
                raise ValueError(f"{name} must be an int in [{low}, {high}], got {value!r}")
        block = torch.clamp(torch.arange(num_frames) - num_clean_frames, min=0) // block_size
        num_steps = grid_steps + frame_offset * int(block[-1])
        grid_index = (torch.arange(num_steps + 1)[:, None] - block[None, :] * frame_offset).clamp(0, grid_steps)
        grid_index[:, :num_clean_frames] = grid_steps
        return cls(levels=schedule[grid_index], schedule=schedule)
