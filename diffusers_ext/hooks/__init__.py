"""Speed hooks for stock diffusers pipelines: attach a method, run the pipeline as usual, detach.

    faster = FasterDiffusion()
    with faster.attached(pipe):
        images = pipe(prompt).images

Each hook's settings save as ``speed_hook_config.json`` (``hook.save_pretrained(folder)``,
``Method.from_pretrained(folder)``); detached, the pipeline is exactly as it was.
"""

from .attention_scaling import AttentionEntropyScaling
from .base import SpeedHook
from .faster_diffusion import FasterDiffusion
from .feature_inheritance import FeatureInheritance
from .region_adaptive_sampling import RegionAdaptiveSampling
from .stream_diffusion import StreamPipeline
from .t_stitch import TStitch, coarsened_mixture

__all__ = [
    "AttentionEntropyScaling",
    "FasterDiffusion",
    "FeatureInheritance",
    "RegionAdaptiveSampling",
    "SpeedHook",
    "StreamPipeline",
    "TStitch",
    "coarsened_mixture",
]
