from diffusers_ext.pipelines import DiffusionMBIRPipeline  # noqa: F401
