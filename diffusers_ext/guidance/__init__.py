"""Steering hooks for any diffusers pipeline: attach a method, run the pipeline as usual, detach.

    steering = FKSteering(reward=jpeg_compressibility, num_particles=4)
    with steering.attached(pipe):
        images = pipe(prompt, num_images_per_prompt=4).images
"""

from .fk_steering import FKSteering
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
from .steering import DenoisingStep, SteeredScheduler, SteeringMethod

__all__ = [
    "ClassifierLogProbability",
    "DenoisingStep",
    "FKSteering",
    "MeasurementConsistency",
    "SteeredScheduler",
    "SteeringMethod",
    "blur_operator",
    "downsampling_operator",
    "inpainting_operator",
    "jpeg_compressibility",
    "jpeg_incompressibility",
    "matrix_operator",
]
