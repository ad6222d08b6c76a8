"""The step counter diffusers schedulers keep, shared by diffusers-ext's scheduler bases: ``step_index`` (the index
of the next ``step`` in ``self.timesteps``) and ``begin_index``, which img2img-style partial runs set."""

from __future__ import annotations

import torch


class StepCounterMixin:
    _step_index: int | None = None
    _begin_index: int | None = None

    @property
    def step_index(self) -> int | None:
        """The index of the next ``step`` in ``self.timesteps``."""
        return self._step_index

    @property
    def begin_index(self) -> int | None:
        return self._begin_index

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where sampling starts in ``self.timesteps`` (img2img and inpainting skip the first steps)."""
        self._begin_index = begin_index

    def _reset_step_index(self) -> None:
        self._step_index = None
        self._begin_index = None

    def _init_step_index(self, timestep) -> None:
        """Start counting at ``begin_index``, or else where ``timestep`` occurs (0 if absent). A timestep listed twice
        (the end of one multi-call step and the start of the next, as in Heun-type grids) starts at its second
        occurrence, as diffusers' schedulers do, so that a partial run begins a step instead of finishing one."""
        if self._begin_index is not None:
            self._step_index = self._begin_index
            return
        matches = (self.timesteps == torch.as_tensor(timestep, device=self.timesteps.device)).nonzero().flatten()
        self._step_index = int(matches[1 if len(matches) > 1 else 0]) if len(matches) else 0
