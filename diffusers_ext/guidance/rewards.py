"""Rewards, verifiers and measurement operators that need no downloaded weights.

A reward is any callable ``reward(x) -> (B,)`` tensor, higher is better, where ``x`` is a batch of images in
``[0, 1]`` (``B, 3, H, W``) decoded by the pipeline's VAE, or of samples / latents with ``reward_space="sample"``.
A CLIP or aesthetic scorer plugs in the same way::

    def clip_reward(images):                      # images: (B, 3, H, W) in [0, 1]
        inputs = processor(text=[prompt], images=list(images), return_tensors="pt", do_rescale=False)
        return clip(**inputs).logits_per_image[:, 0]
"""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

LinearOperator = Callable[[torch.Tensor], torch.Tensor]


def jpeg_compressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """Minus the JPEG size in kilobytes of each image (DDPO's compressibility reward; not differentiable)."""
    if images.ndim != 4 or images.shape[1] not in (1, 3):
        raise ValueError(f"jpeg_compressibility takes images (B, 1|3, H, W) in [0, 1], got {tuple(images.shape)}")
    pixels = (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu().numpy()
    sizes = []
    for array in pixels:
        buffer = io.BytesIO()
        Image.fromarray(array.squeeze(-1) if array.shape[-1] == 1 else array).save(buffer, format="JPEG", quality=quality)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(np.array(sizes), dtype=torch.float32, device=images.device)


def jpeg_incompressibility(images: torch.Tensor, quality: int = 95) -> torch.Tensor:
    """The JPEG size in kilobytes of each image."""
    return -jpeg_compressibility(images, quality)


class ClassifierLogProbability:
    """``log p(class | x)`` under a user's classifier ``torch.nn.Module`` returning logits ``(B, num_classes)``;
    differentiable, so it serves gradient guidance as well as particle methods."""

    def __init__(self, classifier: torch.nn.Module, target_class: int):
        self.classifier = classifier
        self.target_class = target_class

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        logits = self.classifier(x)
        if logits.ndim != 2 or not 0 <= self.target_class < logits.shape[1]:
            raise ValueError(
                f"the classifier must return logits (B, num_classes) with class {self.target_class} in range, "
                f"got shape {tuple(logits.shape)}"
            )
        return logits.log_softmax(-1)[:, self.target_class]


class MeasurementConsistency:
    """For a linear inverse problem ``y = A x + n``: ``loss(x) = ||A x - y||^2 / (2 noise_std^2)`` per sample (the
    negative Gaussian log-likelihood up to a constant), and as a reward its negative."""

    def __init__(self, operator: LinearOperator, measurement: torch.Tensor, noise_std: float = 1.0):
        if noise_std <= 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        self.operator = operator
        self.measurement = measurement
        self.noise_std = noise_std

    def loss(self, x: torch.Tensor) -> torch.Tensor:
        residual = self.operator(x) - self.measurement.to(x)
        if residual.shape[0] != x.shape[0] and self.measurement.shape[0] == 1:
            raise ValueError("the operator must keep the batch dimension")
        return residual.reshape(x.shape[0], -1).pow(2).sum(-1) / (2 * self.noise_std**2)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return -self.loss(x)


def matrix_operator(matrix: torch.Tensor) -> LinearOperator:
    """``x -> x_flat @ A^T`` for samples flattened to vectors (``A`` is ``M x D``)."""

    def apply(x: torch.Tensor) -> torch.Tensor:
        return x.reshape(x.shape[0], -1) @ matrix.to(x).T

    return apply


def inpainting_operator(mask: torch.Tensor) -> LinearOperator:
    """Keep the pixels where ``mask`` is 1 (broadcast over the batch)."""
    return lambda x: x * mask.to(x)


def downsampling_operator(factor: int) -> LinearOperator:
    """Average-pool by ``factor`` (super-resolution's degradation)."""
    return lambda x: F.avg_pool2d(x, factor)


def blur_operator(kernel_size: int = 9, std: float = 2.0) -> LinearOperator:
    """A Gaussian blur per channel (deblurring's degradation)."""
    offsets = torch.arange(kernel_size, dtype=torch.float32) - (kernel_size - 1) / 2
    taps = torch.exp(-(offsets**2) / (2 * std**2))
    kernel = (taps[:, None] * taps[None, :]) / taps.sum() ** 2

    def apply(x: torch.Tensor) -> torch.Tensor:
        weight = kernel.to(x)[None, None].expand(x.shape[1], 1, -1, -1)
        return F.conv2d(x, weight, padding=kernel_size // 2, groups=x.shape[1])

    return apply
