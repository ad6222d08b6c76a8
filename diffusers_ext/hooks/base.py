"""What every speed hook shares: attaching to a stock pipeline and detaching without a trace, saving its settings, and
knowing which denoising step a denoiser call belongs to.

How a hook attaches (public diffusers APIs only):

- ``diffusers.hooks.ModelHook`` objects registered with ``HookRegistry`` on the denoiser or its sub-modules (the
  same machinery as diffusers' own caches); removed on ``detach``, and a registry the hook created is deleted with
  the instance ``forward`` it left, so the module is as it was;
- attention processors swapped with each attention module's ``set_processor`` and put back, the same objects, on
  ``detach``;
- a ``diffusers_ext.scheduler_proxy.SchedulerProxy`` stacked on ``pipe.scheduler`` where a method changes the sample
  between steps (Faster Diffusion's prior noise injection), taken out of the stack on ``detach``;
- nothing else: the pipeline's ``__call__``, the scheduler object and the model classes are untouched.

Stock SD / SDXL / SD3 pipelines do not tell a model which step it is at, so ``DenoisingClock`` counts denoiser calls:
a run starts when ``scheduler.set_timesteps`` has replaced ``scheduler.timesteps`` (every pipeline calls it once per
run), and calls are counted per stream, a stream being the model's cache context (Flux names its conditional and
unconditional calls) and the input's shape.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from diffusers.hooks import HookRegistry, ModelHook
from diffusers.hooks.hooks import BaseState, StateManager

from ..guidance.steering import DENOISER_NAMES
from ..method_settings import MethodSettingsMixin


def pipeline_denoiser(pipeline: Any, owner: str) -> tuple[str, torch.nn.Module]:
    """``(name, module)`` of the pipeline's denoiser (``unet`` or ``transformer``), or a ``ValueError``."""
    for name in DENOISER_NAMES:
        module = getattr(pipeline, name, None)
        if isinstance(module, torch.nn.Module):
            return name, module
    raise ValueError(f"{owner} needs a pipeline with a denoiser ({' or '.join(DENOISER_NAMES)}); "
                     f"{type(pipeline).__name__} has none")


def check_denoiser_type(denoiser: torch.nn.Module, supported: tuple[type, ...], owner: str) -> None:
    if not isinstance(denoiser, supported):
        names = ", ".join(cls.__name__ for cls in supported)
        raise ValueError(f"{owner} supports denoisers of type {names}; this pipeline's is {type(denoiser).__name__}")


def check_fraction(value: Any, name: str, *, include_zero: bool = True, include_one: bool = True) -> float:
    is_number = isinstance(value, int | float) and not isinstance(value, bool)
    low_ok = is_number and (value >= 0 if include_zero else value > 0)
    high_ok = is_number and (value <= 1 if include_one else value < 1)
    if not (low_ok and high_ok):
        interval = f"{'[' if include_zero else '('}0, 1{']' if include_one else ')'}"
        raise ValueError(f"{name} must be a number in {interval}, got {value!r}")
    return float(value)


def check_step_indices(values: Any, name: str) -> list[int]:
    if isinstance(values, str | bytes) or not hasattr(values, "__iter__"):
        raise ValueError(f"{name} must be a list of non-negative step indices, got {values!r}")
    values = list(values)
    if any(isinstance(v, bool) or not isinstance(v, int) or v < 0 for v in values):
        raise ValueError(f"{name} must be a list of non-negative step indices, got {values!r}")
    return sorted(set(values))


def scaled_step_indices(indices: list[int], reference_steps: int, num_steps: int | None) -> set[int]:
    """Step indices given for a run of ``reference_steps`` calls, placed on a run of ``num_steps`` calls at the same
    fraction of the run: ``round(i * num_steps / reference_steps)`` (themselves when the runs have the same length)."""
    if num_steps is None or num_steps == reference_steps:
        return set(indices)
    return {round(i * num_steps / reference_steps) for i in indices}


@dataclass(frozen=True)
class ClockReading:
    """Where a denoiser call sits.

    Attributes:
        run: the pipeline run's number (changes when ``set_timesteps`` starts a new run).
        index: the call's index among this stream's calls of the run (0 for the run's first call).
        num_calls: how many calls the run's schedule makes per stream (``len(timesteps)`` less the schedule's
            ``begin_index``, which img2img sets), ``None`` outside a pipeline run.
        schedule_index: the call's position in the scheduler's whole timestep list (``begin_index + index``).
        schedule_length: ``len(scheduler.timesteps)``, ``None`` outside a pipeline run.
    """

    run: int
    index: int
    num_calls: int | None
    schedule_index: int
    schedule_length: int | None


class DenoisingClock:
    """Counts a pipeline's denoiser calls per run and per stream (see the module docstring)."""

    def __init__(self, pipeline: Any):
        self.pipeline = pipeline
        self._timesteps = None
        self._run = 0
        self._calls: dict[Any, int] = {}

    def _sync_run(self) -> tuple[int | None, int]:
        scheduler = getattr(self.pipeline, "scheduler", None)
        timesteps = getattr(scheduler, "timesteps", None)
        if timesteps is not self._timesteps:
            self._timesteps, self._run = timesteps, self._run + 1
            self._calls.clear()
        if timesteps is None:
            return None, 0
        begin = getattr(scheduler, "begin_index", None) or 0
        return len(timesteps), int(begin)

    def read(self, stream: Any, advance: bool = True) -> ClockReading:
        """This call's reading; ``advance=False`` reads the stream's next call without counting one (a ControlNet
        called just before the denoiser, at the same step, asks this way)."""
        length, begin = self._sync_run()
        index = self._calls.get(stream, 0)
        if advance:
            self._calls[stream] = index + 1
        num_calls = None if length is None else length - begin
        return ClockReading(self._run, index, num_calls, begin + index, length)

    def timestep_at(self, schedule_index: int) -> torch.Tensor:
        """The timestep the pipeline passes at ``schedule_index`` of its current run."""
        return self.pipeline.scheduler.timesteps[schedule_index]

    def reset(self) -> None:
        self._timesteps = None
        self._calls.clear()


class _NoState(BaseState):
    def reset(self, *args, **kwargs) -> None:
        pass


class CallbackHook(ModelHook):
    """A ``ModelHook`` whose ``pre_forward`` / ``new_forward`` / ``post_forward`` are given functions. Stateful: diffusers
    hands the ``StateManager`` it holds the model's cache context (``model.cache_context("cond")`` in Flux and other
    CacheMixin pipelines; ``context_name`` reads it, ``None`` where the pipeline sets none, as SD, SDXL and SD3) and
    calls ``on_reset`` at the end of CacheMixin runs (``maybe_free_model_hooks``)."""

    _is_stateful = True

    def __init__(self, pre_forward=None, new_forward=None, post_forward=None, on_reset=None):
        super().__init__()
        self._pre, self._post, self._on_reset = pre_forward, post_forward, on_reset
        self.state_manager = StateManager(_NoState)
        if new_forward is not None:
            self._new = new_forward
            self.new_forward = self._call_new_forward

    def _call_new_forward(self, module, *args, **kwargs):
        return self._new(self.fn_ref.original_forward, module, *args, **kwargs)

    def pre_forward(self, module, *args, **kwargs):
        return self._pre(module, *args, **kwargs) if self._pre is not None else (args, kwargs)

    def post_forward(self, module, output):
        return self._post(module, output) if self._post is not None else output

    @property
    def context_name(self) -> str | None:
        try:
            return self.state_manager.context.name
        except ValueError:  # no cache context set
            return None

    def reset_state(self, module):
        if self._on_reset is not None:
            self._on_reset()
        return module


def map_tensors(function: Callable[[torch.Tensor], torch.Tensor], value: Any) -> Any:
    """``function`` applied to every tensor in nested tuples, lists and dicts (model outputs)."""
    if isinstance(value, torch.Tensor):
        return function(value)
    if isinstance(value, tuple):
        mapped = tuple(map_tensors(function, v) for v in value)
        return type(value)(*mapped) if hasattr(value, "_fields") else mapped
    if isinstance(value, list):
        return [map_tensors(function, v) for v in value]
    if isinstance(value, dict):
        return type(value)({k: map_tensors(function, v) for k, v in value.items()})
    return value


# Registries that speed hooks created (a module that had none before its first speed hook), so that the last hook's
# removal can delete them again.
CREATED_REGISTRIES: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def forget_empty_registry(module: torch.nn.Module, registry: HookRegistry) -> None:
    """Once ``module``'s hooks are all removed: drop the instance ``forward`` removal leaves behind when it is the
    module's own bound method, and the registry when a speed hook created it."""
    forward = vars(module).get("forward")
    if getattr(forward, "__self__", None) is module and getattr(forward, "__func__", None) is type(module).forward:
        del module.forward
    if CREATED_REGISTRIES.get(module) is registry and getattr(module, "_diffusers_hook", None) is registry:
        del module._diffusers_hook
        del CREATED_REGISTRIES[module]


def invalidate_registry_caches(pipeline: Any) -> None:
    """Make diffusers' hook registries re-read which sub-modules carry hooks (``_set_cache_context`` walks a cached
    list), after hooks were added to or removed from the pipeline's models."""
    components = getattr(pipeline, "components", None) or {}
    for component in components.values():
        if isinstance(component, torch.nn.Module) and hasattr(component, "_diffusers_hook"):
            component._diffusers_hook.invalidate_child_registries_cache()


class SpeedHook(MethodSettingsMixin):
    """Base class of the speed hooks: ``attach(pipe)`` / ``detach()`` / ``with hook.attached(pipe):``, settings saved
    as ``speed_hook_config.json``.

    Subclass ``__init__`` arguments are keyword-only numbers and names (models and callables, such as T-Stitch's
    small denoiser, are passed again when loading: ``Method.from_pretrained(folder, small=...)``). Subclasses
    implement ``_install(pipeline)`` with ``_register_hook`` / ``_set_processor`` / ``_on_detach``, which ``detach``
    undoes in reverse order.
    """

    config_name = "speed_hook_config.json"

    def __init__(self) -> None:
        self.pipeline = None
        self._undo: list[Callable[[], None]] = []

    # Attaching ------------------------------------------------------------------------------------------------------

    def attach(self, pipeline: Any) -> SpeedHook:
        """Speed up ``pipeline`` until ``detach()``; a ``ValueError`` (before anything is changed) for a pipeline the
        method cannot serve."""
        if self.pipeline is not None:
            raise ValueError(f"{type(self).__name__} is already attached to a pipeline; detach it first")
        self._undo = [lambda: invalidate_registry_caches(pipeline)]
        try:
            self._install(pipeline)
        except BaseException:
            self._uninstall()
            raise
        invalidate_registry_caches(pipeline)
        self.pipeline = pipeline
        return self

    def detach(self) -> None:
        """Remove every hook and processor this method installed; the pipeline is exactly as before ``attach``."""
        if self.pipeline is None:
            return
        self._uninstall()
        self.pipeline = None

    @contextmanager
    def attached(self, pipeline: Any) -> Iterator[SpeedHook]:
        """``with hook.attached(pipe): images = pipe(...).images``"""
        self.attach(pipeline)
        try:
            yield self
        finally:
            self.detach()

    def _install(self, pipeline: Any) -> None:
        raise NotImplementedError

    def _uninstall(self) -> None:
        while self._undo:
            self._undo.pop()()

    def _on_detach(self, undo: Callable[[], None]) -> None:
        self._undo.append(undo)

    @property
    def hook_name(self) -> str:
        return f"diffusers_ext.{type(self).__name__}"

    def _register_hook(self, module: torch.nn.Module, hook: ModelHook) -> None:
        """Register ``hook`` on ``module`` (outermost) until ``detach``."""
        if not hasattr(module, "_diffusers_hook"):
            CREATED_REGISTRIES[module] = HookRegistry.check_if_exists_or_initialize(module)
        registry = module._diffusers_hook
        if registry.get_hook(self.hook_name) is not None:
            raise ValueError(f"a {type(self).__name__} is already attached to this {type(module).__name__}; "
                             "detach it first")
        registry.register_hook(hook, self.hook_name)

        def remove() -> None:
            registry.remove_hook(self.hook_name, recurse=False)
            if not registry.hooks:
                forget_empty_registry(module, registry)

        self._on_detach(remove)

    def _set_processor(self, attention: torch.nn.Module, processor: Any) -> None:
        """Give one attention module ``processor`` until ``detach``, which puts the same original object back."""
        original = attention.get_processor()
        attention.set_processor(processor)
        self._on_detach(lambda: attention.set_processor(original))
