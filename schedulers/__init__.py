"""Samplers from recent research, each a drop-in ``SchedulerMixin, ConfigMixin`` subclass (one file per method)."""

from diffusers import SchedulerMixin

from .restoration import RestorationScheduler, RestorationSchedulerOutput
from .schedule_optimization import optimize_timesteps
from .scheduling_bridge import BridgeScheduler
from .scheduling_er_sde import ERSDESolverScheduler
from .scheduling_frame_aware import FrameAwareFlowMatchScheduler, FrameAwareSchedulerOutput, FrameAwareVPScheduler
from .scheduling_masked_diffusion import MaskedDiffusionScheduler
from .scheduling_mean_reverting import MeanRevertingScheduler
from .scheduling_rddm import RDDMScheduler
from .scheduling_resshift import ResShiftScheduler
from .scheduling_rf_solver import RFSolverScheduler
from .scheduling_time_shift import TimeShiftScheduler

__all__ = [
    "BridgeScheduler",
    "ERSDESolverScheduler",
    "FrameAwareFlowMatchScheduler",
    "FrameAwareSchedulerOutput",
    "FrameAwareVPScheduler",
    "MaskedDiffusionScheduler",
    "MeanRevertingScheduler",
    "RDDMScheduler",
    "RFSolverScheduler",
    "ResShiftScheduler",
    "RestorationScheduler",
    "RestorationSchedulerOutput",
    "SchedulerMixin",
    "TimeShiftScheduler",
    "optimize_timesteps",
]

# `pipe.save_pretrained` records a component's module in model_index.json, and `from_pretrained` looks the base class
# (`SchedulerMixin`) up in that module: record the public module, which has both.
for _scheduler in (BridgeScheduler, ERSDESolverScheduler, MaskedDiffusionScheduler, MeanRevertingScheduler,
                   FrameAwareFlowMatchScheduler, FrameAwareVPScheduler,
                   RDDMScheduler, RFSolverScheduler, ResShiftScheduler, TimeShiftScheduler):
    _scheduler.__module__ = __name__
