from diffusers_ext.pipelines import FrameAwareVideoPipeline  # noqa: F401
