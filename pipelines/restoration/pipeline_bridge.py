"""``BridgePipeline``: image-to-image restoration with a denoising diffusion bridge, sampled with DBIM.

"Denoising Diffusion Bridge Models" (Zhou, Lou, Khanna, Ermon; arXiv 2309.16948) bridges the degraded image and the clean
one with a diffusion pinned at both ends; "Diffusion Bridge Implicit Models" (Zheng et al.; arXiv 2405.15885)
samples it in about 10 steps, from stochastic to deterministic. The update is ``BridgeScheduler``'s.
"""

from __future__ import annotations

from ...schedulers.scheduling_bridge import BridgeScheduler
from .pipeline_restoration import RestorationPipeline


class BridgePipeline(RestorationPipeline):
    r"""Restore an image with a diffusion-bridge model (x0 prediction). See ``RestorationPipeline`` for the components
    and the call's arguments."""

    scheduler_class = BridgeScheduler
    method_num_inference_steps = 10
