r"""An exact oracle for 3D inverse problems solved with a 2D slice prior (DiffusionMBIR, "Solving 3D Inverse Problems
using Pre-trained 2D Diffusion Models", Chung et al., arXiv 2211.10655).

The law (``SliceMixtureVolumeLaw``). A volume ``v`` is ``(D, H, W)`` in data units (``[0, 1]`` for real volumes); its
slices ``v[d]`` along dim 0 are independent draws of one Gaussian mixture over the ``P = H W`` pixels of a slice,

    v[d] ~ sum_k w_k N(mu_k, Sigma_k)           (i.i.d. over d)

so a 2D prior that models one slice is the exact prior of the whole volume.

The measurement. A linear operator that acts slice by slice (parallel-beam projection, a mask that is the same on
every slice) is one ``M x P`` matrix ``A_s`` per slice (``slice_operator_matrix`` reads it off the operator), and
``y[d] = A_s v[d] + n``, ``n ~ N(0, s^2 I)``. The posterior then factorises over slices and each factor is again a
mixture (``GaussianMixture.posterior_given_linear_measurement``):

    p(v | y) = prod_d p(v[d] | y[d]),     p(v[d] | y[d]) = sum_k w_k' N(mu_k', Sigma_k')

The denoiser. Pipelines denoise slices in the model's space ``x = 2 v - 1`` (diffusers' ``[-1, 1]`` convention), so
the model-space law has means ``2 mu_k - 1`` and covariances ``4 Sigma_k``; ``SliceMixtureVolumeLaw.denoiser`` is the
exact ``GaussianMixtureDenoiser`` of that law, usable as a pipeline's ``unet`` on ``(B, 1, H, W)`` slices.

Giving every slice the same measurement ``y[d] = y_s`` makes the ``D`` slices of one reconstruction ``D`` draws from
one exact posterior: a sampler's per-slice law is then measured against it with ``SlicedWasserstein2``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch

from .gaussian_mixture import GaussianMixture
from .oracle import GaussianMixtureDenoiser


def slice_operator_matrix(operator: Any, volume_shape: Sequence[int], slice_index: int = 0) -> torch.Tensor:
    """The ``M x P`` matrix (float64) by which a slice-wise operator measures slice ``slice_index`` of a volume of
    ``volume_shape``: column ``j`` is the measurement of that slice, flattened, for the volume that is 1 at pixel ``j``
    of that slice and 0 elsewhere. A ``ValueError`` if the operator's measurement of that volume reaches other
    slices (it is not slice-wise)."""
    depth, height, width = (int(n) for n in volume_shape)
    if not 0 <= slice_index < depth:
        raise ValueError(f"slice_index must lie in [0, {depth}), got {slice_index}")
    pixels = height * width
    columns = []
    for pixel in range(pixels):
        basis = torch.zeros(depth, pixels, dtype=torch.float64)
        basis[slice_index, pixel] = 1.0
        measurement = operator.forward(basis.reshape(depth, height, width))
        if measurement.shape[0] != depth or bool(measurement[torch.arange(depth) != slice_index].any()):
            raise ValueError(f"{operator!r} does not act slice by slice: a pixel of slice {slice_index} reaches "
                             "other slices of the measurement")
        columns.append(measurement[slice_index].reshape(-1))
    return torch.stack(columns, dim=1)


class SliceMixtureVolumeLaw:
    """Volumes ``(D, H, W)`` whose slices along dim 0 are i.i.d. draws of a Gaussian mixture over their ``H W`` pixels
    (module docstring), in data units.

    Args:
        means: ``K x P`` component means of one slice (``P = H W``, row-major pixels).
        covariances: ``K`` isotropic variances, ``K x P`` diagonals or ``K x P x P`` matrices.
        weights: ``K`` mixture weights (uniform when omitted).
        slice_shape: ``(H, W)`` with ``H W = P``.
    """

    def __init__(self, means: Sequence | torch.Tensor, covariances: Sequence | torch.Tensor,
                 weights: Sequence | torch.Tensor | None = None, slice_shape: Sequence[int] = (1, 1)):
        self.slice_law = GaussianMixture(means, covariances, weights)
        height, width = (int(n) for n in slice_shape)
        if height * width != self.slice_law.dim:
            raise ValueError(f"slice_shape {tuple(slice_shape)} has {height * width} pixels; the mixture has "
                             f"{self.slice_law.dim} dimensions")
        self.slice_shape = (height, width)

    def sample(self, depth: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One volume ``(depth, H, W)``, float64."""
        return self.slice_law.sample(depth, generator).reshape(depth, *self.slice_shape)

    def model_space_law(self) -> GaussianMixture:
        """The law of a slice in the model's space ``x = 2 v - 1``."""
        law = self.slice_law
        return GaussianMixture(2 * law.means - 1, 4 * law.covariances, law.weights)

    def denoiser(self, scheduler_config: Mapping[str, Any] | None = None,
                 prediction_type: str | None = None) -> GaussianMixtureDenoiser:
        """The exact denoiser of one slice in model space, on ``(B, 1, H, W)`` inputs, for the noise path of
        ``scheduler_config`` (float64: call ``.double()`` or not, it computes in float64 either way)."""
        law = self.model_space_law()
        return GaussianMixtureDenoiser(law.means.tolist(), law.covariances.tolist(), law.weights.tolist(),
                                       scheduler_config=scheduler_config, prediction_type=prediction_type,
                                       sample_size=list(self.slice_shape), in_channels=1)

    def slice_posterior(self, operator_matrix: torch.Tensor, slice_measurement: torch.Tensor,
                        noise_std: float) -> GaussianMixture:
        """The exact law of one slice (data units, flattened) given ``y_s = A_s v + n``, ``n ~ N(0, noise_std^2 I)``
        (``A_s`` from ``slice_operator_matrix``)."""
        return self.slice_law.posterior_given_linear_measurement(operator_matrix, slice_measurement.reshape(-1),
                                                                 noise_std)
