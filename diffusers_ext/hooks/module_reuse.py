"""Reusing sub-module outputs across denoising steps: the machinery Faster Diffusion (encoder propagation) and
feature inheritance share.

At a *compute* call every hooked sub-module runs and its output is stored (a copy, per stream); at a *reuse* call the
hooked sub-modules do not run and return their stored output instead, while the rest of the denoiser runs as usual
on the current inputs. A call reuses only when every hooked module has an output stored in the current run for the
same stream (same cache context and input shape), so the first call of a run always computes.
"""

from __future__ import annotations

from collections.abc import Callable
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


class ModuleReuse:
    """Hooks on ``denoiser`` (which decides, per call, compute or reuse) and on its sub-modules ``names`` (which run
    or return their stored output).

    Args:
        owner: the speed hook whose ``detach`` removes the hooks.
        denoiser: the model the pipeline calls.
        names: sub-module names (``denoiser.get_submodule(name)``), each called once per denoiser call.
        clock: counts the pipeline's denoiser calls.
        compute_at: ``reading -> bool``, whether the call at this clock reading computes.
    """

    def __init__(self, owner: SpeedHook, denoiser: torch.nn.Module, names: list[str], clock: DenoisingClock,
                 compute_at: Callable[[ClockReading], bool]):
        self.modules = {name: get_submodule(denoiser, name, type(owner).__name__) for name in names}
        self.clock, self.compute_at = clock, compute_at
        self.run = None
        self.outputs: dict[tuple, dict[str, Any]] = {}
        self.current: dict[str, Any] = {}
        self.reusing = False
        self.calls = {"compute": 0, "reuse": 0}
        self._root = CallbackHook(pre_forward=self._begin_call, on_reset=self.reset)
        owner._register_hook(denoiser, self._root)
        for name, module in self.modules.items():
            owner._register_hook(module, CallbackHook(new_forward=self._module_forward(name)))

    def reset(self) -> None:
        self.run, self.reusing = None, False
        self.outputs.clear()

    def _begin_call(self, module, *args, **kwargs):
        stream = stream_key(self._root.context_name, denoiser_sample(args, kwargs))
        reading = self.clock.read(stream)
        if reading.run != self.run:
            self.outputs.clear()
            self.run = reading.run
        self.current = self.outputs.setdefault(stream, {})
        self.reusing = not self.compute_at(reading) and self.current.keys() == self.modules.keys()
        self.calls["reuse" if self.reusing else "compute"] += 1
        return args, kwargs

    def _module_forward(self, name: str):
        def forward(original, module, *args, **kwargs):
            if self.reusing:
                return stored_copy(self.current[name])
            output = original(*args, **kwargs)
            self.current[name] = stored_copy(output)
            return output

        return forward
