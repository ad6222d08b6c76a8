"""Steering hooks for any diffusers pipeline: attach a method, run the pipeline as usual, detach.

    steering = FKSteering(reward=jpeg_compressibility, num_particles=4)
    with steering.attached(pipe):
        images = pipe(prompt, num_images_per_prompt=4).images
"""

from .fk_steering import FKSteering
from .flowchef import FlowChef
from .loss_guidance import LossGuidance
from .minority_guidance import MinorityGuidance, euclidean_distance
from .noise_search import NoiseSearch, NoiseSearchOutput
from .rewards import (
    ClassifierLogProbability,
    MeasurementConsistency,
    blur_operator,
    downsampling_operator,
    inpainting_operator,
    jpeg_compressibility,
    jpeg_incompressibility,
    matrix_operator,
)
from .rollover_budget_forcing import RolloverBudgetForcing
from .steering import DenoisingStep, SteeredScheduler, SteeringMethod

__all__ = [
    "ClassifierLogProbability",
    "DenoisingStep",
    "FKSteering",
    "FlowChef",
    "LossGuidance",
    "MeasurementConsistency",
    "MinorityGuidance",
    "NoiseSearch",
    "NoiseSearchOutput",
    "RolloverBudgetForcing",
    "SteeredScheduler",
    "SteeringMethod",
    "blur_operator",
    "downsampling_operator",
    "euclidean_distance",
    "inpainting_operator",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "matrix_operator",
]
