"""Video pipelines with per-frame (vectorized) timesteps, and the frame-timestep plans they walk."""

from .backbones import PER_FRAME_BACKBONES, check_per_frame_backbone, per_frame_prediction
from .causal_attention import (
    FrameKVCache,
    FrameLayout,
    causal_attention_context,
    disable_causal_attention,
    enable_causal_attention,
    is_causal_attention_enabled,
)
from .frame_plan import FrameTimestepPlan, latent_frame_count
from .pipeline_causal import CausalVideoPipeline, CausalVideoPipelineOutput
from .pipeline_frame_aware import FrameAwareVideoPipeline, FrameAwareVideoPipelineOutput
from .pipeline_joint_image_video import JointImageVideoPipeline, JointImageVideoPipelineOutput, denoiser_schedule

__all__ = [
    "PER_FRAME_BACKBONES",
    "CausalVideoPipeline",
    "CausalVideoPipelineOutput",
    "FrameAwareVideoPipeline",
    "FrameAwareVideoPipelineOutput",
    "FrameKVCache",
    "FrameLayout",
    "FrameTimestepPlan",
    "JointImageVideoPipeline",
    "JointImageVideoPipelineOutput",
    "causal_attention_context",
    "check_per_frame_backbone",
    "denoiser_schedule",
    "disable_causal_attention",
    "enable_causal_attention",
    "is_causal_attention_enabled",
    "latent_frame_count",
    "per_frame_prediction",
]
