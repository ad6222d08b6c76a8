"""Samplers from recent research, each a drop-in ``SchedulerMixin, ConfigMixin`` subclass (one file per method)."""

from diffusers import SchedulerMixin  # noqa: F401  (diffusers' loader looks the base class up in this module)

from .scheduling_er_sde import ERSDESolverScheduler
from .scheduling_rf_solver import RFSolverScheduler
from .scheduling_time_shift import TimeShiftScheduler

__all__ = ["ERSDESolverScheduler", "RFSolverScheduler", "TimeShiftScheduler"]
