"""Video pipelines with per-frame (vectorized) timesteps, and the frame-timestep plans they walk."""

from .frame_plan import FrameTimestepPlan, latent_frame_count

__all__ = ["FrameTimestepPlan", "latent_frame_count"]
