"""Exact oracles and metrics: the ground truth every diffusers-ext component is measured against."""

from .gaussian_mixture import GaussianMixture
from .metrics import (
    NoiseFloor,
    SlicedWasserstein2,
    distance_to_reference,
    mixture_weight_error,
    random_directions,
    sliced_wasserstein2,
    sliced_wasserstein2_noise_floor,
)
from .multiview_oracle import MultiViewMixtureDenoiser, nearest_shapes, one_shape_fraction
from .oracle import GaussianMixtureDenoiser, GaussianMixtureDenoiserOutput
from .pipeline_gaussian_mixture import GaussianMixtureSamplingPipeline, GaussianMixtureSamplingPipelineOutput
from .reference import probability_flow_ode_solution
from .restoration import ExactRestorationDenoiser, PairedGaussianLaw
from .tiny_text import tiny_clip_text_encoder, tiny_clip_tokenizer
from .video_oracle import VideoGaussianMixture, VideoGaussianMixtureDenoiser, autoregressive_video_mixture
from .view_oracle import ViewConditionedGaussianPrior
from .volume_oracle import SliceMixtureVolumeLaw, slice_operator_matrix

__all__ = [
    "ExactRestorationDenoiser",
    "GaussianMixture",
    "GaussianMixtureDenoiser",
    "GaussianMixtureDenoiserOutput",
    "GaussianMixtureSamplingPipeline",
    "GaussianMixtureSamplingPipelineOutput",
    "MultiViewMixtureDenoiser",
    "NoiseFloor",
    "PairedGaussianLaw",
    "SliceMixtureVolumeLaw",
    "SlicedWasserstein2",
    "VideoGaussianMixture",
    "VideoGaussianMixtureDenoiser",
    "ViewConditionedGaussianPrior",
    "autoregressive_video_mixture",
    "distance_to_reference",
    "mixture_weight_error",
    "nearest_shapes",
    "one_shape_fraction",
    "probability_flow_ode_solution",
    "random_directions",
    "slice_operator_matrix",
    "sliced_wasserstein2",
    "sliced_wasserstein2_noise_floor",
    "tiny_clip_text_encoder",
    "tiny_clip_tokenizer",
]
