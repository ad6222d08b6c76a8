"""A Gaussian-mixture data law with its exact noisy marginals and posterior means.

For ``p(x0) = sum_k w_k N(x0; mu_k, Sigma_k)`` and ``x = alpha x0 + sigma eps`` the noisy marginal and the
posterior are again Gaussian per component. With ``Sigma_k = U_k diag(lambda_k) U_k^T``:

    p(x)            = sum_k w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)
    r_k(x)          = w_k N(x; alpha mu_k, ...) / p(x)                               (responsibilities)
    E[x0 | x, k]    = mu_k + U_k diag(alpha lambda_k / (alpha^2 lambda_k + sigma^2)) U_k^T (x - alpha mu_k)
    E[x0 | x]       = sum_k r_k(x) E[x0 | x, k]

Everything is computed in float64.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch


def _as_batch_scalar(value: float | torch.Tensor, batch: int, device: torch.device) -> torch.Tensor:
    value = torch.as_tensor(value, dtype=torch.float64, device=device)
    return value.expand(batch) if value.ndim == 0 else value.reshape(batch)


def mixture_weights(weights: Sequence | torch.Tensor | None, num_components: int) -> torch.Tensor:
    """``K = num_components`` mixture weights as float64, checked to be non-negative and sum to one; uniform when
    ``weights`` is None."""
    if weights is None:
        return torch.full((num_components,), 1.0 / num_components, dtype=torch.float64)
    weights = torch.as_tensor(weights, dtype=torch.float64)
    if weights.shape != (num_components,):
        raise ValueError(f"weights must have shape ({num_components},) to match means, got {tuple(weights.shape)}")
    if bool((weights < 0).any()) or abs(float(weights.sum()) - 1) > 1e-6:
        raise ValueError(f"weights must be non-negative and sum to 1, got {weights.tolist()}")
    return weights


class GaussianMixture:
    """The law ``sum_k w_k N(mu_k, Sigma_k)`` in ``D`` dimensions.

    Args:
        means: ``K x D``.
        covariances: per component an isotropic variance (``K``), a diagonal (``K x D``) or a full symmetric positive
            definite matrix (``K x D x D``).
        weights: ``K`` non-negative weights summing to one; uniform when omitted.
    """

    def __init__(
        self,
        means: Sequence | torch.Tensor,
        covariances: Sequence | torch.Tensor,
        weights: Sequence | torch.Tensor | None = None,
    ):
        means = torch.as_tensor(means, dtype=torch.float64)
        if means.ndim != 2 or means.numel() == 0:
            raise ValueError(f"means must be a non-empty K x D array, got shape {tuple(means.shape)}")
        num_components, dim = means.shape
        covariances = torch.as_tensor(covariances, dtype=torch.float64)
        if covariances.shape == (num_components,):
            covariances = covariances[:, None, None] * torch.eye(dim, dtype=torch.float64)
        elif covariances.shape == (num_components, dim):
            covariances = torch.diag_embed(covariances)
        elif covariances.shape != (num_components, dim, dim):
            raise ValueError(
                f"covariances must have shape ({num_components},), ({num_components}, {dim}) or "
                f"({num_components}, {dim}, {dim}) to match means of shape {tuple(means.shape)}; "
                f"got {tuple(covariances.shape)}"
            )
        if not torch.allclose(covariances, covariances.transpose(1, 2), atol=1e-10):
            raise ValueError("covariances must be symmetric")
        # Diagonal covariances (the common case in benchmarks) skip the rotations: identity eigenvectors.
        self.is_diagonal = bool((covariances == torch.diag_embed(torch.diagonal(covariances, dim1=1, dim2=2))).all())
        if self.is_diagonal:
            eigenvalues = torch.diagonal(covariances, dim1=1, dim2=2).clone()
            eigenvectors = torch.eye(dim, dtype=torch.float64).expand(num_components, dim, dim)
        else:
            eigenvalues, eigenvectors = torch.linalg.eigh(covariances)
        if not bool((eigenvalues > 0).all()):
            raise ValueError(f"covariances must be positive definite; smallest eigenvalue {eigenvalues.min():.3g}")

        weights = mixture_weights(weights, num_components)

        self.means = means
        self.covariances = covariances
        self.weights = weights
        self.eigenvalues = eigenvalues
        self.eigenvectors = eigenvectors

    @property
    def num_components(self) -> int:
        return self.means.shape[0]

    @property
    def dim(self) -> int:
        return self.means.shape[1]

    def to(self, device: torch.device | str) -> GaussianMixture:
        moved = object.__new__(GaussianMixture)
        moved.is_diagonal = self.is_diagonal
        for name in ("means", "covariances", "weights", "eigenvalues", "eigenvectors"):
            setattr(moved, name, getattr(self, name).to(device))
        return moved

    def sample(
        self, num_samples: int, generator: torch.Generator | None = None, return_components: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
        """``num_samples x D`` draws from the law (and, if asked, the component each came from)."""
        device = self.means.device
        components = torch.multinomial(self.weights, num_samples, replacement=True, generator=generator)
        white = torch.randn(num_samples, self.dim, generator=generator, dtype=torch.float64, device=device)
        scaled = white * self.eigenvalues[components].sqrt()
        if not self.is_diagonal:
            scaled = torch.einsum("nde,ne->nd", self.eigenvectors[components], scaled)
        samples = self.means[components] + scaled
        return (samples, components) if return_components else samples

    def _to_eigenbasis(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors if self.is_diagonal else torch.einsum("kde,bkd->bke", self.eigenvectors, vectors)

    def _from_eigenbasis(self, vectors: torch.Tensor) -> torch.Tensor:
        return vectors if self.is_diagonal else torch.einsum("kde,bke->bkd", self.eigenvectors, vectors)

    def _per_component(self, x: torch.Tensor, alpha: torch.Tensor, sigma: torch.Tensor):
        """Log of ``w_k N(x; alpha mu_k, alpha^2 Sigma_k + sigma^2 I)`` and the eigenbasis quantities reused by the
        posterior mean; shapes ``(B, K)``, ``(B, K, D)``, ``(B, K, D)``."""
        alpha, sigma = alpha[:, None, None], sigma[:, None, None]
        residual = x[:, None, :] - alpha * self.means[None]
        rotated = self._to_eigenbasis(residual)
        variance = alpha**2 * self.eigenvalues[None] + sigma**2
        log_density = -0.5 * ((rotated**2 / variance).sum(-1) + variance.log().sum(-1) + self.dim * math.log(2 * math.pi))
        return self.weights.log()[None] + log_density, rotated, variance

    def _prepare(self, x, alpha, sigma):
        x = x.to(torch.float64).reshape(x.shape[0], -1)
        if x.shape[1] != self.dim:
            raise ValueError(f"samples have {x.shape[1]} dimensions, the mixture has {self.dim}")
        batch = x.shape[0]
        return x, _as_batch_scalar(alpha, batch, x.device), _as_batch_scalar(sigma, batch, x.device)

    def log_prob(self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0):
        """Log-density of ``alpha x0 + sigma eps`` at ``x`` (the data law itself by default)."""
        x, alpha, sigma = self._prepare(x, alpha, sigma)
        return torch.logsumexp(self._per_component(x, alpha, sigma)[0], dim=1)

    def responsibilities(self, x: torch.Tensor, alpha: float | torch.Tensor = 1.0, sigma: float | torch.Tensor = 0.0):
        """``P(component k | alpha x0 + sigma eps = x)``, shape ``(B, K)``."""
        x, alpha, sigma = self._prepare(x, alpha, sigma)
        return torch.softmax(self._per_component(x, alpha, sigma)[0], dim=1)

    def posterior_mean(self, x: torch.Tensor, alpha: float | torch.Tensor, sigma: float | torch.Tensor):
        """The exact denoiser ``E[x0 | alpha x0 + sigma eps = x]``, shape ``(B, D)``."""
        x, alpha, sigma = self._prepare(x, alpha, sigma)
        log_joint, rotated, variance = self._per_component(x, alpha, sigma)
        shrunk = alpha[:, None, None] * self.eigenvalues[None] / variance * rotated
        component_means = self.means[None] + self._from_eigenbasis(shrunk)
        return torch.einsum("bk,bkd->bd", torch.softmax(log_joint, dim=1), component_means)

    def exponentially_tilted(self, direction: Sequence | torch.Tensor) -> GaussianMixture:
        """The law ``p(x) exp(a . x) / Z`` for ``a = direction``, again a mixture: each component's mean moves by
        ``Sigma_k a`` and its weight is multiplied by ``exp(a . mu_k + a . Sigma_k a / 2)``."""
        direction = torch.as_tensor(direction, dtype=torch.float64, device=self.means.device)
        if direction.shape != (self.dim,):
            raise ValueError(f"direction must have shape ({self.dim},), got {tuple(direction.shape)}")
        log_weights = self.weights.log() + self.means @ direction + 0.5 * direction @ self.covariances @ direction
        return GaussianMixture(self.means + self.covariances @ direction, self.covariances, torch.softmax(log_weights, 0))

    def posterior_given_linear_measurement(
        self, matrix: Sequence | torch.Tensor, measurement: Sequence | torch.Tensor, noise_std: float
    ) -> GaussianMixture:
        """The exact law of ``x0`` given one measurement ``y = A x0 + n``, ``n ~ N(0, noise_std^2 I)``: again a mixture.

        Per component, with ``S_k = A Sigma_k A^T + noise_std^2 I`` and the gain ``G_k = Sigma_k A^T S_k^{-1}``:

            mu_k'    = mu_k + G_k (y - A mu_k)
            Sigma_k' = Sigma_k - G_k A Sigma_k
            w_k'     proportional to  w_k N(y; A mu_k, S_k)

        Args:
            matrix: ``A``, ``M x D``.
            measurement: ``y``, ``M`` values (a ``1 x M`` row is accepted).
            noise_std: the measurement noise's standard deviation, positive.
        """
        device = self.means.device
        matrix = torch.as_tensor(matrix, dtype=torch.float64, device=device)
        if matrix.ndim != 2 or matrix.shape[1] != self.dim:
            raise ValueError(f"the operator must be an M x {self.dim} matrix, got shape {tuple(matrix.shape)}")
        measurement = torch.as_tensor(measurement, dtype=torch.float64, device=device)
        if measurement.shape not in ((matrix.shape[0],), (1, matrix.shape[0])):
            raise ValueError(
                f"the measurement must be one vector of {matrix.shape[0]} values (A is {tuple(matrix.shape)}), "
                f"got shape {tuple(measurement.shape)}"
            )
        if not noise_std > 0:
            raise ValueError(f"noise_std must be positive, got {noise_std}")
        measurement = measurement.reshape(-1)
        num_measurements = matrix.shape[0]
        cross = self.covariances @ matrix.T  # Sigma_k A^T, K x D x M
        innovation = matrix @ cross + noise_std**2 * torch.eye(num_measurements, dtype=torch.float64, device=device)
        cholesky = torch.linalg.cholesky(innovation)
        residual = measurement[None] - self.means @ matrix.T  # y - A mu_k, K x M
        gain = torch.linalg.solve(innovation, cross.transpose(1, 2)).transpose(1, 2)  # K x D x M
        means = self.means + torch.einsum("kdm,km->kd", gain, residual)
        covariances = self.covariances - gain @ cross.transpose(1, 2)
        covariances = (covariances + covariances.transpose(1, 2)) / 2
        whitened = torch.linalg.solve_triangular(cholesky, residual[..., None], upper=False)[..., 0]
        log_evidence = -0.5 * (whitened**2).sum(-1) - torch.diagonal(cholesky, dim1=1, dim2=2).log().sum(-1)
        log_evidence = log_evidence - 0.5 * num_measurements * math.log(2 * math.pi)
        weights = torch.softmax(self.weights.log() + log_evidence, dim=0)
        return GaussianMixture(means, covariances, weights)
