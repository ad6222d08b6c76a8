import pytest
import torch
from conftest import seeded

from diffusers_ext.testing import (
    GaussianMixture,
    SlicedWasserstein2,
    distance_to_reference,
    mixture_weight_error,
    sliced_wasserstein2,
)


def test_sliced_w2_of_a_shift_is_its_norm_over_sqrt_dim():
    """W2 between a set and its copy shifted by c, along direction theta, is |<c, theta>|; E[<c, theta>^2] = |c|^2/D."""
    x = torch.randn(500, 8, generator=seeded(0), dtype=torch.float64)
    shift = torch.linspace(-1, 1, 8, dtype=torch.float64)
    value = sliced_wasserstein2(x + shift, x, num_projections=20_000)
    assert value == pytest.approx(float(shift.norm()) / 8**0.5, rel=0.02)
    assert sliced_wasserstein2(x, x) == 0.0


def test_sliced_w2_against_a_larger_reference_uses_its_quantiles():
    reference = torch.arange(1000, dtype=torch.float64)[:, None]
    # Quantiles of 0..999 at levels (i + 1/2) / 10 are 49.95 + 99.9 i.
    samples = (49.95 + 99.9 * torch.arange(10, dtype=torch.float64))[:, None]
    assert SlicedWasserstein2(reference, 10, num_projections=4)(samples) == pytest.approx(0.0, abs=1e-9)


def test_sliced_w2_bad_inputs():
    with pytest.raises(ValueError, match="at least num_samples"):
        SlicedWasserstein2(torch.zeros(5, 2), 10)
    with pytest.raises(ValueError, match="differ in dimension"):
        sliced_wasserstein2(torch.zeros(5, 2), torch.zeros(5, 3))
    with pytest.raises(ValueError, match="expected 5 samples"):
        SlicedWasserstein2(torch.zeros(5, 2), 5)(torch.zeros(4, 2))


def test_mixture_weight_error_is_the_total_variation_of_assignments():
    law = GaussianMixture([[-5.0, 0.0], [5.0, 0.0]], [0.1, 0.1], [0.5, 0.5])
    samples = torch.tensor([[-5.0, 0.0]] * 7 + [[5.0, 0.0]] * 3)
    assert mixture_weight_error(samples, law) == pytest.approx(0.2)


def test_distance_to_reference_is_the_mean_per_sample_rms():
    reference = torch.zeros(2, 4)
    samples = torch.tensor([[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 2.0]])
    assert distance_to_reference(samples, reference) == pytest.approx((1.0 + 1.0) / 2)
    with pytest.raises(ValueError, match="shapes differ"):
        distance_to_reference(samples, torch.zeros(3, 4))
