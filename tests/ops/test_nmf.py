"""Tests of xcraft.ops.nmf against scikit-learn, scipy and planted structure."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import linear_sum_assignment, nnls
from sklearn.decomposition import NMF as SklearnNMF
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.estimator_checks import parametrize_with_checks

from xcraft.ops.nmf import NMF, factorize, initialize, solve_coefficients


def low_rank(seed, n=120, p=40, rank=5, noise=0.05, dtype=np.float64):
    """A non-negative rank-``rank`` matrix plus uniform noise."""
    rng = np.random.default_rng(seed)
    a = rng.uniform(size=(n, rank)) @ rng.uniform(size=(rank, p))  # (n, p)
    return (a + noise * rng.uniform(size=(n, p))).astype(dtype)


def planted(seed, n=200, p=40, rank=4, noise=0.0):
    """An exactly rank-``rank`` matrix with sparse U and W rows on disjoint channel blocks.

    Its factorization is unique up to permutation and scaling of the components. Returns A
    (plus ``noise`` times uniform noise) and the planted W.
    """
    rng = np.random.default_rng(seed)
    blocks = np.kron(np.eye(rank), np.ones(p // rank))  # (rank, p), disjoint supports
    w = blocks * rng.uniform(0.5, 1.5, size=(rank, p))
    u = rng.uniform(size=(n, rank)) * (rng.uniform(size=(n, rank)) < 0.5)
    return u @ w + noise * rng.uniform(size=(n, p)), w


def relative_error(a, u, w):
    return np.linalg.norm(a - u @ w) / np.linalg.norm(a)


def fit_quietly(model, a):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_transform(a)


def fit_quietly_custom(model, a, u0, w0):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        return model.fit_transform(a, W=u0.copy(), H=w0.copy())


# ---------------------------------------------------------------------------------------------
# Objective, recovery, monotonicity
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "solver, sklearn_solver, init",
    [
        ("hals", "cd", "nndsvd"),
        ("hals", "cd", "nndsvda"),
        ("hals", "cd", "nndsvdar"),
        ("mu", "mu", "nndsvda"),
    ],
)
def test_objective_matches_or_beats_sklearn(solver, sklearn_solver, init):
    a = low_rank(0)
    params = dict(init=init, tol=1e-4, max_iter=300, random_state=0)
    ours = NMF(5, solver=solver, **params)
    theirs = SklearnNMF(5, solver=sklearn_solver, **params)
    u = fit_quietly(ours, a)
    u_sk = fit_quietly(theirs, a)
    ours_err = relative_error(a, u, ours.components_)
    assert ours_err <= 1.01 * relative_error(a, u_sk, theirs.components_)
    np.testing.assert_allclose(
        ours.reconstruction_err_, np.linalg.norm(a - u @ ours.components_), rtol=1e-10
    )


@pytest.mark.parametrize("solver, sklearn_solver", [("hals", "cd"), ("mu", "mu")])
def test_objective_from_the_same_start_as_sklearn(solver, sklearn_solver):
    # Our start handed to scikit-learn as init="custom": only the iterations differ. From one
    # start HALS is scikit-learn's coordinate descent plus extra inner passes, and "mu" is the
    # same multiplicative update.
    a = tf.constant(low_rank(1))
    u0, w0 = initialize(a, 5, init="random", seed=(3, 4))
    u, w, _, _ = factorize(
        a, 5, solver=solver, init="random", seed=(3, 4), tol=1e-6, max_iter=1000
    )
    theirs = SklearnNMF(5, init="custom", solver=sklearn_solver, tol=1e-6, max_iter=1000)
    u_sk = fit_quietly_custom(theirs, a.numpy(), u0.numpy(), w0.numpy())
    ours_err = relative_error(a.numpy(), u.numpy(), w.numpy())
    assert ours_err <= 1.01 * relative_error(a.numpy(), u_sk, theirs.components_)


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_recovers_planted_factors(solver):
    a, w_true = planted(2)
    model = NMF(4, solver=solver, init="nndsvda", tol=1e-10, max_iter=2000, random_state=0)
    fit_quietly(model, a)
    w = model.components_
    cosine = (w / np.linalg.norm(w, axis=1, keepdims=True)) @ (
        w_true / np.linalg.norm(w_true, axis=1, keepdims=True)
    ).T  # (4, 4)
    rows, cols = linear_sum_assignment(-cosine)
    assert np.all(cosine[rows, cols] > 0.99)
    assert model.reconstruction_err_ / np.linalg.norm(a) < 1e-2


@pytest.mark.parametrize("solver", ["hals", "mu"])
@pytest.mark.parametrize("dtype, atol", [(np.float64, 1e-12), (np.float32, 1e-5)])
def test_history_is_non_increasing(solver, dtype, atol):
    # atol: the history comes from Gram products, whose float32 round-off is ~1e-7 ‖A‖².
    a = low_rank(3, dtype=dtype)
    model = NMF(5, solver=solver, init="nndsvda", tol=0.0, max_iter=60, random_state=0)
    fit_quietly(model, a)
    history = model.history_
    assert history.shape == (model.n_iter_,) == (60,)
    assert np.all(np.diff(history) <= atol)
    np.testing.assert_allclose(
        history[-1], model.reconstruction_err_ / np.linalg.norm(a.astype(np.float64)),
        rtol=1e-3 if dtype == np.float32 else 1e-8,
    )


def test_stops_when_relative_decrease_below_tol():
    a = low_rank(4)
    model = NMF(5, tol=1e-3, max_iter=500, random_state=0).fit(a)
    assert model.n_iter_ < 500
    history = model.history_
    # The stopping sweep is the first whose relative decrease fell below tol.
    decrease = -np.diff(history) / history[:-1]
    assert decrease[-1] < 1e-3
    assert np.all(decrease[:-1] >= 1e-3)


def test_convergence_warning_points_at_caller():
    a = low_rank(5)
    with pytest.warns(ConvergenceWarning, match="NMF did not converge in max_iter=2") as record:
        NMF(5, max_iter=2, tol=1e-12, random_state=0).fit(a)
    assert record[0].filename == __file__


def test_zero_matrix_gives_finite_zero_factors():
    a = np.zeros((20, 6))
    a[:, 0] = 1.0  # one non-zero channel; every other channel is a zero column
    model = NMF(3, init="nndsvd", random_state=0)
    u = fit_quietly(model, a)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(model.components_))
    assert model.reconstruction_err_ == pytest.approx(0.0, abs=1e-12)


# ---------------------------------------------------------------------------------------------
# Initialisation
# ---------------------------------------------------------------------------------------------


def reference_nndsvd(a, rank):
    """NNDSVD (Boutsidis & Gallopoulos, 2008) from an exact NumPy SVD, written plainly."""
    left, s, right_t = np.linalg.svd(a, full_matrices=False)
    x, y, s = left[:, :rank], right_t[:rank].T, s[:rank]  # (n, r), (p, r), (r,)
    x[:, 0], y[:, 0] = np.abs(x[:, 0]), np.abs(y[:, 0])  # Perron pair: single-signed
    xp, xn, yp, yn = np.maximum(x, 0), np.maximum(-x, 0), np.maximum(y, 0), np.maximum(-y, 0)
    mp = np.linalg.norm(xp, axis=0) * np.linalg.norm(yp, axis=0)  # (r,)
    mn = np.linalg.norm(xn, axis=0) * np.linalg.norm(yn, axis=0)
    keep_pos = mp > mn
    x, y = np.where(keep_pos, xp, xn), np.where(keep_pos, yp, yn)
    scale = np.sqrt(s * np.where(keep_pos, mp, mn))
    u = scale * x / np.linalg.norm(x, axis=0)
    w = (scale * y / np.linalg.norm(y, axis=0)).T
    return u, w


@pytest.mark.parametrize("shape", [(30, 12), (12, 30)])
def test_nndsvd_matches_exact_reference(shape):
    # rank + 10 >= min(shape), so the randomized SVD spans the whole range and is exact.
    a = low_rank(6, n=shape[0], p=shape[1], rank=3)
    u, w = initialize(tf.constant(a), 3, init="nndsvd", seed=(1, 2))
    u_ref, w_ref = reference_nndsvd(a, 3)
    np.testing.assert_allclose(u.numpy(), u_ref, atol=1e-10)
    np.testing.assert_allclose(w.numpy(), w_ref, atol=1e-10)


def test_nndsvd_randomized_svd_close_to_exact_on_low_rank_matrix():
    # min(shape) > rank + 10: the sketch is used; with a clear spectral gap it is accurate.
    a = low_rank(7, n=300, p=80, rank=4, noise=1e-3)
    u, w = initialize(tf.constant(a), 4, init="nndsvd", seed=(1, 2))
    u_ref, w_ref = reference_nndsvd(a, 4)
    np.testing.assert_allclose(u.numpy() @ w.numpy(), u_ref @ w_ref, atol=1e-6)


@pytest.mark.parametrize("init", ["nndsvda", "nndsvdar"])
def test_nndsvd_variants_fill_only_the_zeros(init):
    a = low_rank(8, n=30, p=12, rank=3)
    u0, w0 = (x.numpy() for x in initialize(tf.constant(a), 3, init="nndsvd", seed=(1, 2)))
    u, w = (x.numpy() for x in initialize(tf.constant(a), 3, init=init, seed=(1, 2)))
    assert np.any(u0 == 0) and np.all(u > 0) and np.all(w > 0)
    np.testing.assert_array_equal(u[u0 > 0], u0[u0 > 0])
    if init == "nndsvda":
        np.testing.assert_allclose(u[u0 == 0], a.mean(), rtol=1e-12)
    else:
        assert np.max(u[u0 == 0]) < a.mean()  # |N(0, 1)| * mean / 100


def test_random_init_scale():
    a = low_rank(9, n=400, p=300, rank=3)
    u, w = (x.numpy() for x in initialize(tf.constant(a), 10, init="random", seed=(1, 2)))
    # E|N(0, 1)| = sqrt(2 / pi); entries are that times sqrt(mean(A) / r).
    expected = np.sqrt(2 / np.pi) * np.sqrt(a.mean() / 10)
    np.testing.assert_allclose([u.mean(), w.mean()], expected, rtol=0.05)  # Monte Carlo


# ---------------------------------------------------------------------------------------------
# Estimator behaviour
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("init", ["nndsvdar", "random"])
def test_same_random_state_gives_identical_components(init):
    a, _ = planted(10, noise=0.01)
    first = NMF(4, init=init, max_iter=20, random_state=7)
    second = NMF(4, init=init, max_iter=20, random_state=7)
    other = NMF(4, init=init, max_iter=20, random_state=8)
    fit_quietly(first, a), fit_quietly(second, a), fit_quietly(other, a)
    np.testing.assert_array_equal(first.components_, second.components_)
    assert not np.array_equal(first.components_, other.components_)


def test_generator_random_state_is_accepted():
    a, _ = planted(11, noise=0.01)
    first = fit_quietly(NMF(4, init="random", random_state=np.random.default_rng(3)), a)
    second = fit_quietly(NMF(4, init="random", random_state=np.random.default_rng(3)), a)
    np.testing.assert_array_equal(first, second)


@pytest.mark.parametrize(
    "dtype, expected", [(np.float64, np.float64), (np.float32, np.float32), (np.int64, np.float32)]
)
def test_dtype_policy(dtype, expected):
    a = (10 * planted(12, noise=0.01)[0]).astype(dtype)
    model = NMF(4, max_iter=5, random_state=0)
    u = fit_quietly(model, a)
    assert u.dtype == expected
    assert model.components_.dtype == expected
    assert model.transform(a).dtype == expected


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_transform_of_training_matrix_matches_fit_transform(solver):
    a, _ = planted(3, noise=0.01)
    model = NMF(4, solver=solver, tol=1e-6, max_iter=3000, random_state=0)
    u_fit = fit_quietly(model, a)
    u = model.transform(a)
    w = model.components_
    # Both approximate the NNLS solution for the final W. HALS is exact coordinate descent on
    # a strictly convex problem and gets there entrywise (up to the fit's last U being solved
    # against the previous W, ~1e-5 here). The multiplicative updates approach zero entries
    # only slowly; with W fixed they get at least as close as the fit did.
    if solver == "hals":
        np.testing.assert_allclose(u, u_fit, atol=1e-4)
    assert np.linalg.norm(a - u @ w) <= 1.001 * np.linalg.norm(a - u_fit @ w)


def test_solve_coefficients_matches_scipy_nnls():
    rng = np.random.default_rng(14)
    w = rng.uniform(size=(6, 30))
    a = np.maximum(rng.uniform(size=(50, 6)) @ w - 0.5, 0.0)  # (50, 30), many zero coefficients
    u = solve_coefficients(tf.constant(a), tf.constant(w), tol=1e-12, max_iter=5000).numpy()
    expected = np.stack([nnls(w.T, row)[0] for row in a])  # the oracle, row by row
    np.testing.assert_allclose(u, expected, atol=1e-8)


def test_factorize_returns_tensors_consistent_with_history():
    a = tf.constant(low_rank(15, dtype=np.float32))
    u, w, history, n_iter = factorize(a, 5, max_iter=30, tol=0.0, seed=(0, 1))
    assert isinstance(u, tf.Tensor) and u.shape == (120, 5) and w.shape == (5, 40)
    assert u.dtype == tf.float32 and int(n_iter) == 30 and history.shape == (30,)
    assert np.all(u.numpy() >= 0) and np.all(w.numpy() >= 0)
    np.testing.assert_allclose(
        history[-1], relative_error(a.numpy(), u.numpy(), w.numpy()), rtol=1e-3
    )


def test_inverse_transform_reconstructs():
    a, _ = planted(16, noise=0.01)
    model = NMF(4, random_state=0)
    u = fit_quietly(model, a)
    np.testing.assert_allclose(model.inverse_transform(u), u @ model.components_)
    np.testing.assert_allclose(
        np.linalg.norm(a - model.inverse_transform(u)), model.reconstruction_err_, rtol=1e-10
    )


def test_fitted_attributes():
    a, _ = planted(17, noise=0.01)
    model = NMF(4, random_state=0)
    fit_quietly(model, a)
    assert model.components_.shape == (4, 40)
    assert model.n_features_in_ == 40
    assert isinstance(model.n_iter_, int) and 1 <= model.n_iter_ <= 200


def test_transform_before_fit_raises():
    with pytest.raises(NotFittedError, match="This NMF instance is not fitted yet"):
        NMF(3).transform(np.ones((4, 5)))


# ---------------------------------------------------------------------------------------------
# Validation
# ---------------------------------------------------------------------------------------------

GOOD = np.abs(np.random.default_rng(18).normal(size=(10, 6)))
NEGATIVE = GOOD - 1.0
WITH_NAN = GOOD.copy()
WITH_NAN[2, 3] = np.nan


@pytest.mark.parametrize(
    "params, data, error, match",
    [
        ({}, NEGATIVE, ValueError,
         rf"`activations` must be non-negative, got a minimum of {NEGATIVE.min():.4g}\."),
        ({}, WITH_NAN, ValueError, r"`activations` must be finite, got 1 NaN or infinite values\."),
        ({}, GOOD[0], ValueError, r"`activations` must be 2-D \(n_samples, n_features\), got "
         r"shape \(6,\)\. Reshape your data: for a single sample pass `activations\[None\]`\."),
        ({}, GOOD[None], ValueError, r"`activations` must be 2-D .* got shape \(1, 10, 6\)\."),
        ({"n_components": 0}, GOOD, ValueError, r"`n_components` must be >= 1, got 0\."),
        ({"n_components": 2.5}, GOOD, TypeError, r"`n_components` must be an int, got float 2.5\."),
        ({"n_components": 7}, GOOD, ValueError,
         r"`n_components` must be <= min\(n_samples, n_features\) = 6 for init='nndsvda', "
         r"got 7\. Use init='random' for more components\."),
        ({"solver": "cd"}, GOOD, ValueError, r"`solver` must be one of 'hals', 'mu', got 'cd'\."),
        ({"init": "svd"}, GOOD, ValueError,
         r"`init` must be one of 'nndsvd', 'nndsvda', 'nndsvdar', 'random', got 'svd'\."),
        ({"max_iter": 0}, GOOD, ValueError, r"`max_iter` must be >= 1, got 0\."),
        ({"tol": -1.0}, GOOD, ValueError, r"`tol` must be a finite float >= 0, got -1.0\."),
        ({"random_state": "seed"}, GOOD, TypeError, r"`random_state` must be None, an int or"),
        ({}, np.array([["a", "b"]]), TypeError, r"`activations` must hold real numbers, got "
         r"dtype <U1\."),
    ],
)
def test_bad_input_raises(params, data, error, match):
    with pytest.raises(error, match=match):
        NMF(**{"n_components": 3, **params}).fit(data)


def test_random_init_allows_more_components_than_min_shape():
    model = NMF(8, init="random", max_iter=5, random_state=0)
    u = fit_quietly(model, GOOD)
    assert u.shape == (10, 8)


def test_transform_with_wrong_number_of_features_raises():
    model = NMF(3, max_iter=5, random_state=0)
    fit_quietly(model, GOOD)
    with pytest.raises(ValueError, match=r"`activations` must have 6 features as in fit, got "
                                         r"shape \(10, 5\)"):
        model.transform(GOOD[:, :5])


def test_sparse_input_raises():
    from scipy import sparse

    with pytest.raises(TypeError, match=r"`activations` must be a dense array, got a sparse "):
        NMF(3).fit(sparse.csr_matrix(GOOD))


# ---------------------------------------------------------------------------------------------
# scikit-learn's estimator checks
# ---------------------------------------------------------------------------------------------


@parametrize_with_checks([NMF(n_components=2, random_state=0)])
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)
