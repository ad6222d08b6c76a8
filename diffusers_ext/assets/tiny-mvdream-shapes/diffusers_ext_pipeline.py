from diffusers_ext.pipelines import MultiViewDiffusionPipeline  # noqa: F401
