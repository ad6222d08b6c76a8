"""Reusing sub-module outputs across denoising steps: the machinery Faster Diffusion (encoder propagation) and
feature inheritance share.

At a *compute* call every hooked sub-module runs and its output is stored (a copy, per stream); at a *reuse* call the
hooked sub-modules do not run and return their stored output instead, while the rest of the denoiser runs as usual
on the current inputs. A call reuses only when every hooked module has an output stored in the current run for the
same stream (same cache context and input shape), so the first call of a run always computes.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from .base import CallbackHook, ClockReading, DenoisingClock, SpeedHook, map_tensors

SAMPLE_ARGUMENTS = ("sample", "hidden_states")


def denoiser_sample(args: tuple, kwargs: dict) -> torch.Tensor | None:
    """The noisy input of a denoiser call (first positional argument, or ``sample`` / ``hidden_states``)."""
    for key in SAMPLE_ARGUMENTS:
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def stream_key(context: str | None, sample: torch.Tensor | None) -> tuple:
    return context, None if sample is None else tuple(sample.shape)


def stored_copy(value: Any) -> Any:
    """A copy a later in-place update of the output cannot reach (UNet2DConditionModel adds T2I-Adapter residuals to
    down-block outputs in place)."""
    return map_tensors(lambda t: t.detach().clone(), value)


def get_submodule(model: torch.nn.Module, name: str, owner: str) -> torch.nn.Module:
    try:
        return model.get_submodule(name)
    except AttributeError:
        children = [n for n, _ in model.named_children()]
        raise ValueError(f"{owner}: {type(model).__name__} has no sub-module {name!r} (its children: {children})") from None


@dataclass
class DecodedAhead:
    """A reuse call's output computed in advance, and the call it answers: the timestep and every other argument
    (compared by value) of the compute call it was batched after."""

    timestep: torch.Tensor
    arguments: dict[str, Any]
    output: Any

    def answers(self, timestep: Any, arguments: dict[str, Any]) -> bool:
        called = torch.as_tensor(timestep).detach().flatten()
        return bool((called.to(self.timestep.device) == self.timestep).all()) and same_values(arguments, self.arguments)


def same_values(a: Any, b: Any) -> bool:
    """Equal tensors (same shape and values), containers of them, or equal plain values."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and (a is b or torch.equal(a, b)))
    if isinstance(a, tuple | list):
        return type(a) is type(b) and len(a) == len(b) and all(same_values(x, y) for x, y in zip(a, b, strict=True))
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(same_values(a[k], b[k]) for k in a)
    return a is b or a == b


class ModuleReuse:
    """Hooks on ``denoiser`` (which decides, per call, compute or reuse) and on its sub-modules ``names`` (which run
    or return their stored output).

    With ``decode_ahead``, a compute call is followed at once by one batched call that computes the outputs of the
    reuse calls named by ``decode_ahead(reading)`` (call indices of the same run): the stored features repeated once
    per call, the scheduler's timesteps for those calls, the other arguments repeated. That is only right when a
    reuse call's output does not depend on its sample (Faster Diffusion: the sample enters the UNet only through
    the reused encoder). A reuse call then returns its precomputed output if its timestep and other arguments are
    those the batch was computed with, and runs as usual otherwise.

    Args:
        owner: the speed hook whose ``detach`` removes the hooks.
        denoiser: the model the pipeline calls.
        names: sub-module names (``denoiser.get_submodule(name)``), each called once per denoiser call.
        clock: counts the pipeline's denoiser calls.
        compute_at: ``reading -> bool``, whether the call at this clock reading computes.
        decode_ahead: ``reading -> [call index, ...]`` for a compute call, the following reuse calls to batch.
    """

    def __init__(self, owner: SpeedHook, denoiser: torch.nn.Module, names: list[str], clock: DenoisingClock,
                 compute_at: Callable[[ClockReading], bool],
                 decode_ahead: Callable[[ClockReading], list[int]] | None = None):
        self.modules = {name: get_submodule(denoiser, name, type(owner).__name__) for name in names}
        self.clock, self.compute_at, self.decode_ahead = clock, compute_at, decode_ahead
        self.signature = inspect.signature(denoiser.forward)
        self.run = None
        self.outputs: dict[tuple, dict[str, Any]] = {}
        self.ahead: dict[tuple, DecodedAhead] = {}
        self.current: dict[str, Any] = {}
        self.reusing = False
        self.repeats = 1
        self.calls = {"compute": 0, "reuse": 0}
        self.decoded_ahead = 0
        self._root = CallbackHook(new_forward=self._forward, on_reset=self.reset)
        owner._register_hook(denoiser, self._root)
        for name, module in self.modules.items():
            owner._register_hook(module, CallbackHook(new_forward=self._module_forward(name)))

    def reset(self) -> None:
        self.run, self.reusing, self.repeats = None, False, 1
        self.outputs.clear()
        self.ahead.clear()

    def _forward(self, original, module, *args, **kwargs):
        sample = denoiser_sample(args, kwargs)
        stream = stream_key(self._root.context_name, sample)
        reading = self.clock.read(stream)
        if reading.run != self.run:
            self.reset()
            self.run = reading.run
        self.current = self.outputs.setdefault(stream, {})
        self.reusing = not self.compute_at(reading) and self.current.keys() == self.modules.keys()
        self.calls["reuse" if self.reusing else "compute"] += 1
        if self.decode_ahead is None:
            return original(*args, **kwargs)
        bound = self.signature.bind(*args, **kwargs)
        timestep = bound.arguments.pop("timestep", None)
        bound.arguments.pop(next(iter(self.signature.parameters)))  # the sample
        # A copy of the containers, taken before the call: the UNet pops T2I-Adapter residuals off their list.
        arguments = map_tensors(lambda t: t, dict(bound.arguments))
        if self.reusing:
            ahead = self.ahead.pop((stream, reading.index), None)
            if ahead is not None and ahead.answers(timestep, arguments):
                self.decoded_ahead += 1
                return ahead.output
            return original(*args, **kwargs)
        output = original(*args, **kwargs)
        following = self.decode_ahead(reading)
        if following and sample is not None:
            self._decode(original, reading, stream, sample, timestep, arguments, following)
        return output

    def _decode(self, original, reading: ClockReading, stream: tuple, sample: torch.Tensor, timestep: Any,
                arguments: dict[str, Any], following: list[int]) -> None:
        batch, repeats = sample.shape[0], len(following)
        steps = [self.clock.timestep_at(reading.schedule_index + index - reading.index) for index in following]
        like = timestep if isinstance(timestep, torch.Tensor) else steps[0]
        timesteps = torch.stack([torch.as_tensor(t) for t in steps]).to(like.device, like.dtype)

        def repeated(t: torch.Tensor) -> torch.Tensor:
            return torch.cat([t] * repeats) if t.ndim and t.shape[0] == batch else t

        self.reusing, self.repeats = True, repeats
        try:
            output = original(repeated(sample), timesteps.repeat_interleave(batch), **map_tensors(repeated, arguments))
        finally:
            self.reusing, self.repeats = False, 1
        for position, (index, step) in enumerate(zip(following, timesteps, strict=True)):
            rows = slice(position * batch, (position + 1) * batch)
            self.ahead[(stream, index)] = DecodedAhead(step, arguments, map_tensors(lambda t, rows=rows: t[rows], output))

    def _module_forward(self, name: str):
        def forward(original, module, *args, **kwargs):
            if self.reusing:
                stored = self.current[name]
                if self.repeats > 1:
                    return map_tensors(lambda t: torch.cat([t] * self.repeats), stored)
                return stored_copy(stored)
            output = original(*args, **kwargs)
            self.current[name] = stored_copy(output)
            return output

        return forward
