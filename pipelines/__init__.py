"""Pipelines diffusers lacks (restoration, text, video, 3D), each a ``DiffusionPipeline`` subclass."""

from diffusers import DiffusionPipeline, ModelMixin, SchedulerMixin

from .text import MaskedDiffusionLMPipeline, MaskedDiffusionLMPipelineOutput

__all__ = ["DiffusionPipeline", "MaskedDiffusionLMPipeline", "MaskedDiffusionLMPipelineOutput", "ModelMixin",
           "SchedulerMixin"]

# model_index.json records a pipeline's module; record the public one.
MaskedDiffusionLMPipeline.__module__ = __name__
