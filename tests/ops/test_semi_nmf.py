"""Semi-NMF (U >= 0, W of any sign) against planted factors and a NumPy ALS of our own."""

import numpy as np
import pytest
from scipy.optimize import nnls as scipy_nnls

from xcraft.ops.semi_nmf import SemiNMF, semi_factorize


def _planted(rng, n=200, p=30, r=4):
    u = rng.uniform(size=(n, r)) * (rng.uniform(size=(n, r)) < 0.5)  # sparse, >= 0
    # Rows that hold one concept alone make the factorisation unique (up to scale and order):
    # without them U Q, Q⁻¹ W would fit as well for some mixing Q.
    pure = np.arange(5 * r)
    u[pure] = 0.0
    u[pure, pure % r] = rng.uniform(0.5, 1.5, size=len(pure))
    w = rng.normal(size=(r, p))  # signed
    return u, w, u @ w


def _objective(a, u, w):
    return np.linalg.norm(a - u @ w) / np.linalg.norm(a)


def _numpy_als(a, r, n_iter, rng):
    """Alternate exact NNLS rows of U (scipy) and least-squares W: the slow reference."""
    u = np.abs(rng.normal(size=(a.shape[0], r)))
    for _ in range(n_iter):
        w = np.linalg.lstsq(u, a, rcond=None)[0]
        u = np.stack([scipy_nnls(w.T, row)[0] for row in a])
    w = np.linalg.lstsq(u, a, rcond=None)[0]
    return u, w


@pytest.mark.parametrize("solver", ["als", "mu"])
def test_objective_never_increases(rng, solver):
    a = rng.normal(size=(120, 20))
    _, _, history, n_iter, _ = semi_factorize(a, 5, solver=solver, max_iter=80, tol=0.0)
    history = history.numpy()
    assert int(n_iter) == 80
    assert np.all(np.diff(history) <= 1e-7 * history[:-1])  # float32 round-off only


def test_planted_signed_factors_are_recovered_up_to_their_span(rng):
    u_true, w_true, a = _planted(rng)
    model = SemiNMF(4, max_iter=2000, tol=1e-12, random_state=0)
    u = model.fit_transform(a)
    assert np.min(u) >= 0 and np.min(model.components_) < 0
    assert _objective(a, u, model.components_) < 1e-4
    # An exact semi-NMF is unique only up to U Q, Q⁻¹ W for any mixing Q >= 0 that keeps U Q
    # non-negative (Q = I + ε E_ij always does): what is identifiable is the span of W, which
    # must be the planted one (every principal angle ~0).
    q_found = np.linalg.qr(model.components_.T.astype(np.float64))[0]
    q_true = np.linalg.qr(w_true.T)[0]
    cosines = np.linalg.svd(q_found.T @ q_true, compute_uv=False)
    assert np.min(cosines) > 1 - 1e-6


def test_at_least_as_good_as_a_numpy_als(rng):
    a = rng.normal(size=(80, 16)) + 0.5
    ours = SemiNMF(4, max_iter=500, tol=1e-9, random_state=0)
    u = ours.fit_transform(a)
    u_ref, w_ref = _numpy_als(a, 4, 100, np.random.default_rng(1))
    assert _objective(a, u, ours.components_) <= _objective(a, u_ref, w_ref) * (1 + 1e-3)


def test_transform_is_the_exact_projection_of_the_fitted_rows(rng):
    _, _, a = _planted(rng)
    model = SemiNMF(4, max_iter=2000, tol=1e-12, random_state=0)
    u = model.fit_transform(a)
    np.testing.assert_allclose(model.transform(a), u, atol=1e-3)


def test_same_seed_same_factors(rng):
    a = rng.normal(size=(60, 10))
    first = SemiNMF(3, random_state=4).fit(a).components_
    second = SemiNMF(3, random_state=4).fit(a).components_
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(("data", "kwargs", "error", "message"), [
    (np.full((5, 4), np.nan), {}, ValueError, r"`activations` must be finite"),
    (np.ones((5, 4)), {"n_components": 9}, ValueError,
     r"`n_components` must be <= min\(n_samples, n_features\) = 4, got 9\."),
    (np.ones(4), {}, ValueError, r"`activations` must be a non-empty 2-D array"),
    (np.ones((5, 4)), {"solver": "hals"}, ValueError, r"`solver` must be one of"),
])
def test_bad_input(data, kwargs, error, message):
    params = {"n_components": 2, **kwargs}
    with pytest.raises(error, match=message):
        SemiNMF(**params).fit(data)
