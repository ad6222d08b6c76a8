"""Standing in for a pipeline's scheduler: how steering methods and speed hooks act between denoising steps without
touching the pipeline's ``__call__``.

A ``SchedulerProxy`` forwards every attribute to the scheduler it wraps and wraps ``set_timesteps`` (a run starts)
and ``step``, keeping their signatures: pipelines inspect ``step``'s parameters to decide whether to pass ``eta`` and
``generator``. Proxies stack (each wraps whatever ``pipe.scheduler`` is when it is installed), and
``remove_scheduler_proxy`` takes one out of the chain wherever it sits, so the methods that installed them can detach
in any order. ``pipe.scheduler = ...`` goes through ``DiffusionPipeline.__setattr__``, which keeps ``model_index``
naming the scheduler's class, so the pipeline is exactly as before once the last proxy is removed.
"""

from __future__ import annotations

import copy
import functools
from collections.abc import Callable
from typing import Any


class SchedulerProxy:
    """A pipeline's scheduler with ``set_timesteps`` and ``step`` wrapped; subclasses override ``begin_run`` and
    ``wrapped_step``, and name the attributes they keep on the proxy itself in ``own_attributes`` (every other
    attribute set on a proxy is set on the scheduler, as pipelines expect). A deep copy is a copy of the plain
    scheduler underneath (the proxy's work belongs to the pipeline it is installed on)."""

    own_attributes: frozenset[str] = frozenset({"scheduler", "set_timesteps", "step"})

    def __init__(self, scheduler: Any):
        self.scheduler = scheduler

        def set_timesteps(*args, **kwargs):
            self.scheduler.set_timesteps(*args, **kwargs)
            self.begin_run()

        def step(*args, **kwargs):
            return self.wrapped_step(*args, **kwargs)

        self.set_timesteps = functools.wraps(scheduler.set_timesteps)(set_timesteps)
        self.step = functools.wraps(scheduler.step)(step)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "scheduler"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        if name in self.own_attributes:
            object.__setattr__(self, name, value)
        else:
            setattr(self.scheduler, name, value)

    def __deepcopy__(self, memo: dict) -> Any:
        return copy.deepcopy(self.scheduler, memo)

    def begin_run(self) -> None:
        """``set_timesteps`` has started a pipeline run."""

    def wrapped_step(self, *args, **kwargs):
        return self.scheduler.step(*args, **kwargs)


def proxies_of(scheduler: Any) -> list[SchedulerProxy]:
    """The proxies stacked on a scheduler, outermost first."""
    chain = []
    while isinstance(scheduler, SchedulerProxy):
        chain.append(scheduler)
        scheduler = scheduler.scheduler
    return chain


def plain_scheduler(scheduler: Any) -> Any:
    """The scheduler under every proxy."""
    chain = proxies_of(scheduler)
    return chain[-1].scheduler if chain else scheduler


def install_scheduler_proxy(pipeline: Any, make_proxy: Callable[[Any], SchedulerProxy]) -> SchedulerProxy:
    """``pipeline.scheduler = make_proxy(pipeline.scheduler)``; returns the proxy."""
    proxy = make_proxy(pipeline.scheduler)
    pipeline.scheduler = proxy
    return proxy


def remove_scheduler_proxy(pipeline: Any, proxy: SchedulerProxy) -> None:
    """Take ``proxy`` out of the pipeline's scheduler chain wherever it sits (nothing, if the user has since given the
    pipeline another scheduler)."""
    if pipeline.scheduler is proxy:
        pipeline.scheduler = proxy.scheduler
        return
    for outer in proxies_of(pipeline.scheduler):
        if outer.scheduler is proxy:
            outer.scheduler = proxy.scheduler
            return


def with_prev_sample(step_output: Any, prev_sample: Any) -> Any:
    """A scheduler step's output (a tuple or a ``BaseOutput``) with ``prev_sample`` replaced."""
    if isinstance(step_output, tuple):
        return (prev_sample, *step_output[1:])
    step_output.prev_sample = prev_sample
    return step_output
