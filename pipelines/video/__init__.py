"""Video pipelines with per-frame (vectorized) timesteps, and the frame-timestep plans they walk."""

from .backbones import PER_FRAME_BACKBONES, check_per_frame_backbone, per_frame_prediction
from .frame_plan import FrameTimestepPlan, latent_frame_count
from .pipeline_frame_aware import FrameAwareVideoPipeline, FrameAwareVideoPipelineOutput

__all__ = [
    "PER_FRAME_BACKBONES",
    "FrameAwareVideoPipeline",
    "FrameAwareVideoPipelineOutput",
    "FrameTimestepPlan",
    "check_per_frame_backbone",
    "latent_frame_count",
    "per_frame_prediction",
]
