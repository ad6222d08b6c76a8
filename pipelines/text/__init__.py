"""Discrete (text) diffusion pipelines."""

from .pipeline_masked_diffusion_lm import MaskedDiffusionLMPipeline, MaskedDiffusionLMPipelineOutput

__all__ = ["MaskedDiffusionLMPipeline", "MaskedDiffusionLMPipelineOutput"]
