"""Pipelines diffusers lacks (restoration, text, video, 3D), each a ``DiffusionPipeline`` subclass."""

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from .restoration import BridgePipeline, MeanRevertingPipeline, RDDMPipeline, ResShiftPipeline, RestorationPipeline
from .text import MaskedDiffusionLMPipeline, MaskedDiffusionLMPipelineOutput
from .three_d import (
    DiffusionMBIRPipeline,
    DiffusionMBIRPipelineOutput,
    MultiViewDiffusionPipeline,
    MultiViewPipelineOutput,
)
from .video import (
    CausalVideoPipeline,
    CausalVideoPipelineOutput,
    FrameAwareVideoPipeline,
    FrameAwareVideoPipelineOutput,
    FrameTimestepPlan,
    JointImageVideoPipeline,
    JointImageVideoPipelineOutput,
    latent_frame_count,
)

__all__ = ["BridgePipeline", "CausalVideoPipeline", "CausalVideoPipelineOutput", "DiffusionMBIRPipeline",
           "DiffusionMBIRPipelineOutput", "DiffusionPipeline",
           "FrameAwareVideoPipeline", "FrameAwareVideoPipelineOutput",
           "FrameTimestepPlan", "JointImageVideoPipeline", "JointImageVideoPipelineOutput",
           "MaskedDiffusionLMPipeline", "MaskedDiffusionLMPipelineOutput",
           "MeanRevertingPipeline", "ModelMixin", "MultiViewDiffusionPipeline", "MultiViewPipelineOutput",
           "RDDMPipeline", "ResShiftPipeline", "RestorationPipeline", "SchedulerMixin", "latent_frame_count"]

# model_index.json records a pipeline's module; record the public one.
for _pipeline in (BridgePipeline, CausalVideoPipeline, DiffusionMBIRPipeline, FrameAwareVideoPipeline, JointImageVideoPipeline,
                  MaskedDiffusionLMPipeline, MeanRevertingPipeline, MultiViewDiffusionPipeline, RDDMPipeline,
                  ResShiftPipeline):
    _pipeline.__module__ = __name__
