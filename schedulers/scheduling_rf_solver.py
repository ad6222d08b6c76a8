"""RF-Solver: "Taming Rectified Flow for Inversion and Editing" (Wang et al., arXiv 2411.04746), second order.

A rectified-flow model predicts the velocity ``v(x, s) = dx/ds`` along ``x_s = (1 - s) x0 + s eps``. RF-Solver-2
expands the exact solution ``x_{s'} = x_s + int_s^{s'} v(x_u, u) du`` to second order in ``h = s' - s`` and
estimates the derivative of ``v`` with one extra call at the midpoint ``m = s + h / 2``:

    v_s   = v(x_s, s)
    x_m   = x_s + (h / 2) v_s
    v'_s ~= (v(x_m, m) - v_s) / (h / 2)
    x_s'  = x_s + h v_s + (h^2 / 2) v'_s        (= x_s + h v(x_m, m): the explicit midpoint rule)

**Cost: two model calls per step**, so ``num_inference_steps=n`` costs ``2 n`` NFE; compare it with a first-order
sampler at ``2 n`` steps. The scheduler lists both calls in ``self.timesteps`` (``[s_0, m_0, s_1, m_1, ...]``),
so stock pipelines (``StableDiffusion3Pipeline``, ``FluxPipeline``, their img2img, inpainting and ControlNet
variants) run it unchanged. ``order`` tells a pipeline how many entries of ``timesteps`` make one of its steps: 2 when
the grid was set by ``num_inference_steps`` (like diffusers' Heun schedulers), 1 when it was set by custom ``sigmas``
or ``timesteps``, because diffusers' ``retrieve_timesteps`` then counts every entry as a step (Flux always passes
``sigmas``). An img2img run therefore starts at the noise level ``FlowMatchEulerDiscreteScheduler`` starts at, with
twice its model calls, except that when the run's first entry would be a midpoint (strength puts FlowMatchEuler's
start at an odd entry of the doubled table), the remaining entries are re-laid from the step's start and the last step
becomes one Euler call, ``x_0 = x_{s_{n-1}} - s_{n-1} v``.

Inversion (image -> noise) runs the same scheme upwards over the same grid (``invert``): since each direction is
second order, invert-then-regenerate returns the input up to ``O(h^2)``, where the usual flow-matching Euler
inversion leaves ``O(h)``.

It is a ``FlowMatchEulerDiscreteScheduler`` in everything but the update: the same config, the same
``set_timesteps(num_inference_steps, sigmas=..., mu=...)`` contract and shift handling (static ``shift`` or dynamic
shifting with ``mu``), the same ``scale_noise`` for img2img.
"""

from __future__ import annotations

import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch
from diffusers import FlowMatchEulerDiscreteScheduler
from diffusers.utils import BaseOutput
from tqdm.auto import tqdm

from .vp_discrete import check_num_inference_steps, check_strictly_decreasing


def call_levels(step_levels: torch.Tensor, final_euler_step: bool) -> tuple[torch.Tensor, list[bool]]:
    """The noise level of every model call over steps ``s_0 > ... > s_{n-1}`` and the terminal level (the last entry
    of ``step_levels``): ``[s_0, m_0, s_1, m_1, ..., terminal]`` with midpoints ``m_i = (s_i + s_{i+1}) / 2``, the
    last step a single Euler call when ``final_euler_step``; and, per call, whether it is a midpoint."""
    starts, ends = step_levels[:-1], step_levels[1:]
    two_call_steps = len(starts) - 1 if final_euler_step else len(starts)
    midpoints = (starts[:two_call_steps] + ends[:two_call_steps]) / 2
    interleaved = torch.stack([starts[:two_call_steps], midpoints], dim=1).flatten()
    levels = torch.cat([interleaved, starts[two_call_steps:], step_levels[-1:]])
    return levels, [False, True] * two_call_steps + [False] * (len(starts) - two_call_steps)


@dataclass
class RFSolverSchedulerOutput(BaseOutput):
    """``prev_sample``: the sample at the next entry of ``timesteps`` (a midpoint after a first call)."""

    prev_sample: torch.Tensor


class RFSolverScheduler(FlowMatchEulerDiscreteScheduler):
    """Second-order RF-Solver for flow-matching pipelines (SD3, Flux):
    ``pipe.scheduler = RFSolverScheduler.from_config(pipe.scheduler.config)``. Two model calls per step."""

    order = 2
    _compatibles = ["FlowMatchEulerDiscreteScheduler", "FlowMatchHeunDiscreteScheduler"]

    def set_timesteps(
        self,
        num_inference_steps: int | None = None,
        device: str | torch.device | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        timesteps: Sequence[float] | None = None,
    ) -> None:
        """As ``FlowMatchEulerDiscreteScheduler.set_timesteps`` (shift and ``mu`` included), then a midpoint call is
        inserted after each step's first call."""
        num_train = self.config.num_train_timesteps
        if self.config.stochastic_sampling:
            raise ValueError("RFSolverScheduler is a deterministic solver; stochastic_sampling must be False")
        if num_inference_steps is not None:
            check_num_inference_steps(num_inference_steps, num_train)
        elif sigmas is None and timesteps is None:
            raise ValueError("pass num_inference_steps, sigmas or timesteps")
        for name, values, upper in (("sigmas", sigmas, 1.0), ("timesteps", timesteps, float(num_train))):
            if values is None:
                continue
            values = torch.as_tensor(values, dtype=torch.float64).flatten()
            check_strictly_decreasing(values, name)
            if values[-1] <= 0 or values[0] > upper:
                raise ValueError(f"{name} must lie in (0, {upper:g}], got {values.tolist()}")
            if num_inference_steps is not None and values.numel() != num_inference_steps:
                raise ValueError(f"{name} has {values.numel()} entries but num_inference_steps={num_inference_steps}")
        super().set_timesteps(num_inference_steps, device=device, sigmas=sigmas, mu=mu, timesteps=timesteps)
        self.order = 2 if num_inference_steps is not None else 1
        self.step_levels = self.sigmas  # s_0 > ... > s_{n-1} > terminal
        self.sigmas, self._is_midpoint = call_levels(self.step_levels, final_euler_step=False)
        self.timesteps = self.sigmas[:-1] * num_train
        if not bool((self.timesteps[1:] < self.timesteps[:-1]).all() and self.timesteps[-1] > 0):
            raise ValueError(
                f"the grid with its midpoints is not strictly decreasing and positive in the scheduler's float32 "
                f"precision: {self.timesteps.tolist()}; pass noise levels further apart"
            )
        self._step_start: torch.Tensor | None = None

    def set_begin_index(self, begin_index: int = 0) -> None:
        """Where a partial run (img2img, inpainting) starts in ``timesteps``. A run that starts at a midpoint entry
        is re-laid, in place (the pipeline already holds a view of ``timesteps``), from the start of that step."""
        if begin_index < len(getattr(self, "_is_midpoint", ())) and self._is_midpoint[begin_index]:
            tail_levels, tail_is_midpoint = call_levels(self.step_levels[begin_index // 2 :], final_euler_step=True)
            self.sigmas[begin_index:] = tail_levels
            self.timesteps[begin_index:] = tail_levels[:-1] * self.config.num_train_timesteps
            self._is_midpoint[begin_index:] = tail_is_midpoint
        super().set_begin_index(begin_index)

    def step(
        self,
        model_output: torch.Tensor,
        timestep: float | torch.Tensor,
        sample: torch.Tensor,
        generator: torch.Generator | None = None,
        return_dict: bool = True,
        **unused,
    ) -> RFSolverSchedulerOutput | tuple:
        """First call of a step: move to the midpoint with ``v_s`` (or, for a final Euler step, to the next level).
        Second call: take the whole step with the midpoint velocity from the step's start."""
        if getattr(self, "num_inference_steps", None) is None:
            raise ValueError("call set_timesteps before step")
        if self.step_index is None:
            self._init_step_index(timestep)
        k = self.step_index
        if not self._is_midpoint[k]:
            self._step_start = sample
            to_next_entry = self.sigmas[k + 1] - self.sigmas[k]
            prev_sample = sample + to_next_entry.to(sample.dtype) * model_output
        else:
            if self._step_start is None:
                raise ValueError("RFSolverScheduler: a step started at its midpoint; start at a step's first entry")
            whole = self.sigmas[k + 1] - self.sigmas[k - 1]
            prev_sample = self._step_start + whole.to(sample.dtype) * model_output
            self._step_start = None
        self._step_index += 1
        return RFSolverSchedulerOutput(prev_sample=prev_sample) if return_dict else (prev_sample,)

    def invert(
        self,
        velocity: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        sample: torch.Tensor,
        num_inference_steps: int | None = None,
        sigmas: Sequence[float] | None = None,
        mu: float | None = None,
        progress: bool = True,
    ) -> torch.Tensor:
        """Map a clean latent ``sample`` to the noise that regenerates it: RF-Solver-2 run from ``s = 0`` up the
        grid that ``set_timesteps`` with the same arguments gives (so generation retraces it).

        ``velocity(x, timestep)`` is the model's prediction at a timestep on the ``0 .. num_train_timesteps``
        scale, e.g. ``lambda x, t: pipe.transformer(x, timestep=t.expand(len(x)), ...).sample`` with the prompt
        embeddings of the regeneration. Costs two calls per step."""
        self.set_timesteps(num_inference_steps, device=sample.device, sigmas=sigmas, mu=mu)
        levels = self.step_levels.flip(0)  # terminal, s_{n-1}, ..., s_0
        num_train = self.config.num_train_timesteps
        intervals = list(itertools.pairwise(levels))
        with torch.no_grad():
            for low, high in tqdm(intervals, desc="RF-Solver inversion", disable=not progress):
                start_velocity = velocity(sample, low * num_train)
                midpoint = sample + ((high - low) / 2).to(sample.dtype) * start_velocity
                sample = sample + (high - low).to(sample.dtype) * velocity(midpoint, (low + high) / 2 * num_train)
        self._step_index = None
        return sample
