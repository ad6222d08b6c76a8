from diffusers_ext.pipelines import ResShiftPipeline  # noqa: F401
