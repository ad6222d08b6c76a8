"""``RDDMPipeline``: restoration (deraining, deblurring, denoising, ...) or generation with a residual denoising
diffusion model.

"Residual Denoising Diffusion Models" (Liu et al.; arXiv 2308.13712). The state moves from the image toward the
degraded input by the residual ``I_res = y - x0`` while noise is added; sampling removes both. For generation, pass a
black image (``y = 0``: the residual is ``-x0`` and the chain starts from pure noise). The update is
``RDDMScheduler``'s.
"""

from __future__ import annotations

from ...schedulers.scheduling_rddm import RDDMScheduler
from .pipeline_restoration import RestorationPipeline


class RDDMPipeline(RestorationPipeline):
    r"""Restore an image with an RDDM model (residual, noise, or residual-and-noise prediction). See
    ``RestorationPipeline`` for the components and the call's arguments."""

    scheduler_class = RDDMScheduler
    method_num_inference_steps = 10
