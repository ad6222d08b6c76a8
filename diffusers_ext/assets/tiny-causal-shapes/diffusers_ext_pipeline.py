from diffusers_ext.pipelines import CausalVideoPipeline  # noqa: F401
