"""Pipelines diffusers lacks (restoration, text, video, 3D), each a ``DiffusionPipeline`` subclass."""
