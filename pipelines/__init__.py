"""Pipelines diffusers lacks (restoration, text, video, 3D), each a ``DiffusionPipeline`` subclass."""

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from .restoration import BridgePipeline, MeanRevertingPipeline, RDDMPipeline, ResShiftPipeline, RestorationPipeline
from .text import MaskedDiffusionLMPipeline, MaskedDiffusionLMPipelineOutput
from .video import FrameAwareVideoPipeline, FrameAwareVideoPipelineOutput, FrameTimestepPlan, latent_frame_count

__all__ = ["BridgePipeline", "DiffusionPipeline", "FrameAwareVideoPipeline", "FrameAwareVideoPipelineOutput",
           "FrameTimestepPlan", "MaskedDiffusionLMPipeline", "MaskedDiffusionLMPipelineOutput",
           "MeanRevertingPipeline", "ModelMixin", "RDDMPipeline", "ResShiftPipeline", "RestorationPipeline",
           "SchedulerMixin", "latent_frame_count"]

# model_index.json records a pipeline's module; record the public one.
for _pipeline in (BridgePipeline, FrameAwareVideoPipeline, MaskedDiffusionLMPipeline, MeanRevertingPipeline,
                  RDDMPipeline, ResShiftPipeline):
    _pipeline.__module__ = __name__
