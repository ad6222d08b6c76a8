"""Distances between a sampler's output and the oracle's truth."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .gaussian_mixture import GaussianMixture


def _flat64(samples: torch.Tensor) -> torch.Tensor:
    return samples.reshape(samples.shape[0], -1).to(device="cpu", dtype=torch.float64)


def random_directions(dim: int, num_projections: int, seed: int = 0) -> torch.Tensor:
    """``num_projections`` unit vectors in ``dim`` dimensions, the same for the same seed."""
    generator = torch.Generator().manual_seed(seed)
    directions = torch.randn(num_projections, dim, generator=generator, dtype=torch.float64)
    return directions / directions.norm(dim=1, keepdim=True)


def sliced_wasserstein2(x: torch.Tensor, y: torch.Tensor, num_projections: int = 256, seed: int = 0) -> float:
    """Sliced Wasserstein-2 distance ``sqrt(E_theta W2^2(<theta, x>, <theta, y>))`` over random unit directions.

    Each 1-D ``W2`` is exact by sorting. When ``y`` is larger than ``x`` (a big exact sample standing in for the law),
    ``x``'s sorted projections are compared with ``y``'s quantiles at levels ``(i + 1/2) / n``, which removes most of
    the reference's own sampling noise.
    """
    x, y = _flat64(x), _flat64(y)
    if x.shape[1] != y.shape[1] or y.shape[0] < x.shape[0]:
        raise ValueError(
            f"sliced_wasserstein2 needs sample sets of one dimension with y at least as large as x, "
            f"got {tuple(x.shape)} and {tuple(y.shape)}"
        )
    directions = random_directions(x.shape[1], num_projections, seed)
    projected_x = (x @ directions.T).sort(dim=0).values
    projected_y = (y @ directions.T).sort(dim=0).values
    if y.shape[0] != x.shape[0]:
        levels = (torch.arange(x.shape[0], dtype=torch.float64) + 0.5) / x.shape[0]
        projected_y = torch.quantile(projected_y, levels, dim=0)
    return float(((projected_x - projected_y) ** 2).mean().sqrt())


@dataclass
class NoiseFloor:
    """Sliced W2 between two independent exact draws of the same size: what a perfect sampler scores."""

    mean: float
    std: float


def sliced_wasserstein2_noise_floor(
    law: GaussianMixture, reference: torch.Tensor, num_samples: int, repeats: int = 8, num_projections: int = 256,
    seed: int = 0,
) -> NoiseFloor:
    """What ``sliced_wasserstein2(exact_samples, reference)`` gives for exact samples of size ``num_samples``: the
    score of a perfect sampler (mean and spread over ``repeats`` draws)."""
    generator = torch.Generator().manual_seed(seed)
    values = torch.tensor([
        sliced_wasserstein2(law.sample(num_samples, generator), reference, num_projections) for _ in range(repeats)
    ])
    return NoiseFloor(mean=float(values.mean()), std=float(values.std()))


def mixture_weight_error(samples: torch.Tensor, law: GaussianMixture) -> float:
    """Total-variation distance between the law's weights and the fraction of samples each component claims
    (each sample assigned to its most probable component)."""
    assignments = law.responsibilities(_flat64(samples)).argmax(dim=1)
    fractions = torch.bincount(assignments, minlength=law.num_components).to(torch.float64) / samples.shape[0]
    return float(0.5 * (fractions - law.weights.cpu()).abs().sum())


def distance_to_reference(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """Mean over samples of the per-coordinate RMS distance to the reference ODE endpoints of the same noise.

    The mean of per-sample distances, rather than one global RMS, keeps the rare trajectories that a coarse solver
    sends into another mixture component from swamping the convergence slope; they still count, linearly."""
    samples, reference = _flat64(samples), _flat64(reference)
    if samples.shape != reference.shape:
        raise ValueError(f"shapes differ: {tuple(samples.shape)} vs {tuple(reference.shape)}")
    return float(((samples - reference) ** 2).mean(dim=1).sqrt().mean())
