"""Restoration pipelines: a degraded image in, the restored image out."""

from .pipeline_bridge import BridgePipeline
from .pipeline_mean_reverting import MeanRevertingPipeline
from .pipeline_rddm import RDDMPipeline
from .pipeline_resshift import ResShiftPipeline
from .pipeline_restoration import RestorationPipeline

__all__ = ["BridgePipeline", "MeanRevertingPipeline", "RDDMPipeline", "ResShiftPipeline", "RestorationPipeline"]
