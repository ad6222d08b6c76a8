from diffusers_ext.pipelines.three_d.multiview_attention import CameraEmbedding  # noqa: F401
