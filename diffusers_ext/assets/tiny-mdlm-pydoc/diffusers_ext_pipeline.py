from diffusers_ext.pipelines import MaskedDiffusionLMPipeline  # noqa: F401
