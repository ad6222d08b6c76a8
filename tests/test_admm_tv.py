"""DiffusionMBIR's ADMM-TV step (issue 18): it solves min_x 1/2 ||y - A x||^2 + lambda ||D_z x||_1 (checked against an
exact solve of the dual by scipy's bounded-variable least squares), reduces to least squares at lambda = 0, carries
its state across calls, and its pieces (D_z and its adjoint, soft thresholding, CG) are exact."""

from __future__ import annotations

import numpy as np
import pytest
import scipy.linalg
import scipy.optimize
import torch

from diffusers_ext.pipelines.three_d.admm_tv import (
    ADMMTVState,
    admm_tv_update,
    conjugate_gradient,
    finite_difference_z,
    finite_difference_z_adjoint,
    soft_threshold,
)
from diffusers_ext.pipelines.three_d.volume_operators import (
    ParallelBeamProjection,
    ThroughPlaneDownsampling,
    VolumeMask,
    sparse_view_angles,
)

# 3x3 slices at 8 views: the smallest projection whose A^T A is well conditioned (eigenvalues 0.43 to 22.6), so the
# minimiser is unique and an exact reference is cheap.
SHAPE = (5, 3, 3)
TV_WEIGHT = 0.5


def problem():
    operator = ParallelBeamProjection(sparse_view_angles(8), 3)
    generator = torch.Generator().manual_seed(0)
    truth = torch.zeros(SHAPE, dtype=torch.float64)
    truth[1:4, :2] = 1.0
    noise = torch.randn(operator.measurement_shape(SHAPE), generator=generator, dtype=torch.float64)
    return operator, operator.forward(truth) + 0.3 * noise


def dense_matrix(function, input_shape) -> np.ndarray:
    basis = torch.eye(int(np.prod(input_shape)), dtype=torch.float64)
    return torch.stack([function(e.reshape(input_shape)).flatten() for e in basis], dim=1).numpy()


def reference_solution(operator, measurement, tv_weight) -> torch.Tensor:
    """The exact minimiser by another method: with M = A^T A = R^T R positive definite and b = A^T y, the dual of the
    problem is min_{|w| <= lambda} 1/2 ||R^-T (b - D_z^T w)||^2, a bounded least-squares problem that scipy's BVLS
    (an active-set method) solves exactly; then x = M^-1 (b - D_z^T w)."""
    forward = dense_matrix(operator.forward, SHAPE)
    difference = dense_matrix(finite_difference_z, SHAPE)
    normal, rhs = forward.T @ forward, forward.T @ measurement.flatten().numpy()
    upper = np.linalg.cholesky(normal).T
    dual = scipy.optimize.lsq_linear(scipy.linalg.solve_triangular(upper, difference.T, trans="T"),
                                     scipy.linalg.solve_triangular(upper, rhs, trans="T"),
                                     bounds=(-tv_weight, tv_weight), method="bvls", tol=1e-14).x
    return torch.tensor(np.linalg.solve(normal, rhs - difference.T @ dual)).reshape(SHAPE)


@pytest.mark.parametrize("num_admm_iterations, num_cg_iterations", [(150, 3), (800, 1)])
def test_admm_solves_the_convex_problem(num_admm_iterations, num_cg_iterations):
    operator, measurement = problem()
    reference = reference_solution(operator, measurement, TV_WEIGHT)
    estimate, _ = admm_tv_update(torch.zeros(SHAPE, dtype=torch.float64), measurement, operator, rho=2.0,
                                 tv_weight=TV_WEIGHT, num_admm_iterations=num_admm_iterations,
                                 num_cg_iterations=num_cg_iterations)
    # ADMM converges linearly on this strongly convex problem: measured relative distance 1e-9 / 1e-13 after 100 / 150
    # iterations of 3 CG steps, 4e-5 / 3e-10 / 2e-11 / 1e-12 after 300 / 700 / 800 / 900 of one (the paper's setting).
    # 1e-9 leaves a factor 50 or more; a wrong threshold, dual sign or adjoint stays >= 1e-2.
    assert (estimate - reference).norm() <= 1e-9 * reference.norm()
    # The TV term matters here: the least-squares solution is far from the TV solution.
    least_squares, _ = admm_tv_update(torch.zeros(SHAPE, dtype=torch.float64), measurement, operator, rho=1.0,
                                      tv_weight=0.0, num_admm_iterations=300, num_cg_iterations=3)
    assert (least_squares - reference).norm() > 0.05 * reference.norm()


def test_without_tv_it_is_least_squares():
    operator, measurement = problem()
    forward = dense_matrix(operator.forward, SHAPE)
    least_squares = np.linalg.lstsq(forward, measurement.flatten().numpy(), rcond=None)[0]
    estimate, state = admm_tv_update(torch.zeros(SHAPE, dtype=torch.float64), measurement, operator, rho=1.0,
                                     tv_weight=0.0, num_admm_iterations=200, num_cg_iterations=3)
    torch.testing.assert_close(estimate, torch.tensor(least_squares).reshape(SHAPE), rtol=1e-9, atol=1e-9)
    assert state.scaled_dual.abs().max() < 1e-9  # no threshold: z = D_z x, so the dual never moves


def test_state_carries_the_iterations_across_calls():
    operator, measurement = problem()
    start = torch.rand(SHAPE, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    original = start.clone()
    at_once, state_at_once = admm_tv_update(start, measurement, operator, rho=2.0, tv_weight=TV_WEIGHT,
                                            num_admm_iterations=3, num_cg_iterations=2)
    volume, state = start, None
    for _ in range(3):
        volume, state = admm_tv_update(volume, measurement, operator, rho=2.0, tv_weight=TV_WEIGHT, state=state,
                                       num_cg_iterations=2)
    torch.testing.assert_close(volume, at_once, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.split, state_at_once.split, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(state.scaled_dual, state_at_once.scaled_dual, rtol=1e-12, atol=1e-12)
    assert torch.equal(start, original)
    # Restarting the state at every call is a different algorithm, and gives a different volume.
    restarted = start
    for _ in range(3):
        restarted, _ = admm_tv_update(restarted, measurement, operator, rho=2.0, tv_weight=TV_WEIGHT,
                                      num_cg_iterations=2)
    assert (restarted - at_once).abs().max() > 1e-3


@pytest.mark.parametrize("operator", [ThroughPlaneDownsampling(2), VolumeMask(torch.ones(4, 6, 6)),
                                      ParallelBeamProjection(sparse_view_angles(8), 6)],
                         ids=["through_plane", "mask", "projection"])
def test_every_operator_plugs_in_and_the_objective_falls(operator):
    volume = torch.rand(4, 6, 6, generator=torch.Generator().manual_seed(2))
    measurement = operator.forward(volume)

    def objective(x):
        return 0.5 * (operator.forward(x) - measurement).pow(2).sum() + 0.1 * finite_difference_z(x).abs().sum()

    start = torch.zeros_like(volume)
    estimate, state = admm_tv_update(start, measurement, operator, rho=1.0, tv_weight=0.1, num_admm_iterations=20,
                                     num_cg_iterations=3)
    assert estimate.dtype == torch.float32 and state.split.shape == (3, 6, 6)
    assert objective(estimate) < 0.5 * objective(start)


@pytest.mark.parametrize("dtype, tolerance", [(torch.float64, 1e-12), (torch.float32, 1e-5)])
def test_difference_adjoint_is_exact(dtype, tolerance):
    generator = torch.Generator().manual_seed(3)
    volume = torch.randn(7, 5, 4, generator=generator, dtype=torch.float64).to(dtype)
    differences = torch.randn(6, 5, 4, generator=generator, dtype=torch.float64).to(dtype)
    left = (finite_difference_z(volume) * differences).sum().double()
    right = (volume * finite_difference_z_adjoint(differences)).sum().double()
    assert abs(left - right) <= tolerance * float(volume.double().norm() * differences.double().norm())
    ramp = torch.arange(4.0)[:, None, None].expand(4, 2, 2)
    torch.testing.assert_close(finite_difference_z(ramp), torch.ones(3, 2, 2))


def test_soft_threshold():
    values = torch.tensor([-3.0, -0.5, 0.0, 0.2, 2.0])
    torch.testing.assert_close(soft_threshold(values, 1.0), torch.tensor([-2.0, 0.0, 0.0, 0.0, 1.0]))
    torch.testing.assert_close(soft_threshold(values, 0.0), values)


def test_conjugate_gradient_solves_in_n_steps_and_stops_at_the_solution():
    generator = torch.Generator().manual_seed(4)
    factor = torch.randn(6, 6, generator=generator, dtype=torch.float64)
    matrix = factor @ factor.T + torch.eye(6, dtype=torch.float64)
    rhs = torch.randn(6, generator=generator, dtype=torch.float64)
    solution = conjugate_gradient(lambda x: matrix @ x, rhs, torch.zeros(6, dtype=torch.float64), 6)
    torch.testing.assert_close(solution, torch.linalg.solve(matrix, rhs), rtol=1e-9, atol=1e-9)
    # Started at the solution it stays there (no 0 / 0).
    again = conjugate_gradient(lambda x: matrix @ x, rhs, solution, 5)
    assert torch.isfinite(again).all() and (again - solution).abs().max() < 1e-9


@pytest.mark.parametrize("change, match", [
    (dict(rho=0.0), "rho"),
    (dict(rho=float("nan")), "rho"),
    (dict(tv_weight=-1.0), "tv_weight"),
    (dict(num_admm_iterations=0), "num_admm_iterations"),
    (dict(num_cg_iterations=1.5), "num_cg_iterations"),
    (dict(volume=torch.zeros(1, 3, 3, dtype=torch.float64)), "two slices"),
    (dict(volume=torch.zeros(5, 9)), r"\(D, H, W\)"),
    (dict(measurement=torch.zeros(5, 8, 6, dtype=torch.float64)), "shape"),
    (dict(measurement=torch.full((5, 8, 7), float("nan"), dtype=torch.float64)), "NaN"),
    (dict(state=ADMMTVState(torch.zeros(5, 3, 3), torch.zeros(5, 3, 3))), "state"),
])
def test_bad_arguments_raise_one_clear_error(change, match):
    operator, measurement = problem()
    arguments = dict(volume=torch.zeros(SHAPE, dtype=torch.float64), measurement=measurement, operator=operator,
                     rho=1.0, tv_weight=0.1)
    arguments.update(change)
    with pytest.raises(ValueError, match=match):
        admm_tv_update(**arguments)


def test_bad_helper_arguments_raise():
    with pytest.raises(ValueError, match="threshold"):
        soft_threshold(torch.zeros(3), -0.1)
    with pytest.raises(ValueError, match="num_iterations"):
        conjugate_gradient(lambda x: x, torch.zeros(3), torch.zeros(3), -1)
    with pytest.raises(ValueError, match="same shape"):
        conjugate_gradient(lambda x: x, torch.zeros(3), torch.zeros(4), 1)
