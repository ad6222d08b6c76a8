"""``MeanRevertingPipeline``: restoration with a mean-reverting SDE (IR-SDE), sampled fast with the MR Sampler.

"Image Restoration with Mean-Reverting Stochastic Differential Equations" (Luo et al.; arXiv 2301.11699) defines the
process, which drifts from the image toward the degraded input ``mu`` with stationary noise; "MRS: A Fast Sampler for
Mean Reverting Diffusion based on ODE and SDE Solvers" (Li et al.; arXiv 2502.07856) solves its reverse in 10 to 20
model calls instead of IR-SDE's hundreds. The update is ``MeanRevertingScheduler``'s.
"""

from __future__ import annotations

from ...schedulers.scheduling_mean_reverting import MeanRevertingScheduler
from .pipeline_restoration import RestorationPipeline


class MeanRevertingPipeline(RestorationPipeline):
    r"""Restore an image with a mean-reverting SDE model (noise, data or velocity prediction). See
    ``RestorationPipeline`` for the components and the call's arguments."""

    scheduler_class = MeanRevertingScheduler
    method_num_inference_steps = 20
