"""Batched NNLS: values against scipy, KKT, implicit gradient against finite differences."""

import numpy as np
import pytest
import tensorflow as tf
from scipy.optimize import nnls as scipy_nnls

from xcraft.ops import nnls
from xcraft.ops.nnls import nnls_vjp, solve_nnls


def _scipy_rows(activations, concept_bank):
    """Reference NNLS of every row with scipy (float64)."""
    rows = np.asarray(activations, np.float64).reshape(-1, concept_bank.shape[1])
    bank = np.asarray(concept_bank, np.float64)
    return np.stack([scipy_nnls(bank.T, row)[0] for row in rows])


def _planted_problem(rng, n_rows, n_concepts, n_channels, margin=0.5):
    """Activations whose NNLS solution u and multipliers are planted with strict complementarity.

    Returns a, W and u with u_j >= margin on the active set and gradient (u G - a W^T)_j >= margin
    off it, so the active set cannot change under a small perturbation of a.
    """
    w = rng.uniform(size=(n_concepts, n_channels))
    gram = w @ w.T
    active = rng.uniform(size=(n_rows, n_concepts)) < 0.6
    u = np.where(active, rng.uniform(margin, 1.0 + margin, size=active.shape), 0.0)
    lam = np.where(active, 0.0, rng.uniform(margin, 1.0 + margin, size=active.shape))
    # a W^T = u G - lam gives the KKT point; add a component orthogonal to the rows of W.
    a = u @ w - lam @ np.linalg.solve(gram, w)
    noise = rng.normal(size=a.shape)
    a += noise - noise @ w.T @ np.linalg.solve(gram, w)
    return a, w, u


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-5), (np.float32, 1e-3)])
@pytest.mark.parametrize("shape", [(200, 5, 20), (300, 25, 64), (150, 12, 8), (50, 30, 10)])
def test_matches_scipy_row_by_row(rng, dtype, rtol, shape):
    n_rows, n_concepts, n_channels = shape
    w = rng.uniform(size=(n_concepts, n_channels))
    a = 2.0 * rng.uniform(size=(n_rows, n_channels))
    u = solve_nnls(a.astype(dtype), w)
    assert u.dtype == tf.as_dtype(dtype)
    reference = _scipy_rows(a, w)
    error = np.max(np.abs(u.numpy() - reference), axis=1)
    np.testing.assert_array_less(error, rtol * np.linalg.norm(reference, axis=1) + 1e-12)


@pytest.mark.parametrize("dtype, rtol", [(np.float64, 1e-5), (np.float32, 1e-3)])
def test_spatial_activations_match_scipy(rng, dtype, rtol):
    w = rng.uniform(size=(6, 16))
    a = rng.uniform(size=(3, 5, 4, 16)).astype(dtype)
    u = solve_nnls(a, w).numpy()
    assert u.shape == (3, 5, 4, 6)
    reference = _scipy_rows(a, w).reshape(3, 5, 4, 6)
    np.testing.assert_allclose(u, reference, rtol=0, atol=rtol * np.abs(reference).max())


def test_kkt_conditions_hold_to_float_precision(rng):
    w = rng.uniform(size=(20, 40))
    a = rng.uniform(size=(500, 40))
    u = solve_nnls(a, w).numpy()
    gradient = u @ w @ w.T - a @ w.T  # (n, r): KKT multipliers
    scale = np.abs(a @ w.T).max()
    assert u.min() >= 0.0
    assert gradient.min() >= -1e-12 * scale
    np.testing.assert_allclose(u * gradient, 0.0, atol=1e-12 * scale * u.max())


def test_integer_activations_are_solved_in_float32():
    u = solve_nnls(np.array([[2, 0, 2]]), np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]]))
    assert u.dtype == tf.float32
    np.testing.assert_allclose(u.numpy(), [[2.0, 0.0]], atol=1e-6)


def test_gradient_matches_finite_differences(rng):
    a, w, _ = _planted_problem(rng, n_rows=4, n_concepts=5, n_channels=12)
    a = tf.constant(a)  # float64
    theoretical, numerical = tf.test.compute_gradient(lambda x: solve_nnls(x, w), [a], delta=1e-6)
    error = np.abs(theoretical[0] - numerical[0]).max() / np.abs(numerical[0]).max()
    assert error <= 1e-5


def test_gradient_of_spatial_activations_matches_finite_differences(rng):
    a, w, _ = _planted_problem(rng, n_rows=6, n_concepts=4, n_channels=7)
    a = tf.constant(a.reshape(1, 2, 3, 7))
    theoretical, numerical = tf.test.compute_gradient(lambda x: solve_nnls(x, w), [a], delta=1e-6)
    error = np.abs(theoretical[0] - numerical[0]).max() / np.abs(numerical[0]).max()
    assert error <= 1e-5


def test_gradient_is_the_same_under_tf_function(rng):
    a, w, _ = _planted_problem(rng, n_rows=8, n_concepts=5, n_channels=12)
    a = tf.constant(a)
    weights = tf.constant(rng.normal(size=(8, 5)))

    def loss_gradient(x):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(weights * solve_nnls(x, w))
        return tape.gradient(loss, x)

    np.testing.assert_allclose(
        tf.function(loss_gradient)(a).numpy(), loss_gradient(a).numpy(), rtol=1e-12, atol=1e-12
    )


def test_gradient_is_the_active_set_formula(rng):
    # d(u_S)/da = G_SS^{-1} W_S: check the VJP of every row against the closed form.
    a, w, u = _planted_problem(rng, n_rows=5, n_concepts=6, n_channels=10)
    upstream = rng.normal(size=u.shape)
    with tf.GradientTape() as tape:
        x = tf.constant(a)
        tape.watch(x)
        loss = tf.reduce_sum(upstream * solve_nnls(x, w))
    gradient = tape.gradient(loss, x).numpy()
    for row in range(5):
        s = u[row] > 0
        expected = upstream[row, s] @ np.linalg.solve(w[s] @ w[s].T, w[s])
        np.testing.assert_allclose(gradient[row], expected, rtol=1e-10, atol=1e-12)


def test_vjp_with_several_cotangents_matches_the_tape(rng):
    a, w, _ = _planted_problem(rng, n_rows=6, n_concepts=5, n_channels=9)
    u = solve_nnls(a, w)
    cotangents = tf.constant(rng.normal(size=(6, 3, 5)))
    batched = nnls_vjp(u, cotangents, tf.constant(w)).numpy()  # (6, 3, 9)
    unprojected = nnls_vjp(u, cotangents, tf.constant(w), project=False).numpy()  # (6, 3, 5)
    np.testing.assert_allclose(unprojected @ w, batched, rtol=1e-12, atol=1e-12)
    x = tf.constant(a)
    for k in range(3):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(cotangents[:, k] * solve_nnls(x, w))
        np.testing.assert_allclose(batched[:, k], tape.gradient(loss, x).numpy(), rtol=1e-10,
                                   atol=1e-12)


def test_gradient_ignores_the_number_of_solver_iterations(rng):
    # The VJP depends on the solution only, not on the path: never backprop through iterations.
    a, w, _ = _planted_problem(rng, n_rows=6, n_concepts=5, n_channels=9)
    x = tf.constant(a)
    gradients = []
    for max_iter in (1, 500):
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(solve_nnls(x, w, max_iter=max_iter) ** 2)
        gradients.append(tape.gradient(loss, x).numpy())
    np.testing.assert_allclose(gradients[0], gradients[1], rtol=1e-10, atol=1e-12)


def _value_and_gradient(a, w):
    x = tf.constant(a)
    with tf.GradientTape() as tape:
        tape.watch(x)
        u = solve_nnls(x, w)
        loss = tf.reduce_sum(u * np.arange(1.0, u.shape[-1] + 1.0))
    return u.numpy(), tape.gradient(loss, x).numpy()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_all_zero_activations_give_zero_and_finite_gradients(rng, dtype):
    u, gradient = _value_and_gradient(np.zeros((4, 2, 2, 6), dtype), rng.uniform(size=(3, 6)))
    np.testing.assert_array_equal(u, 0.0)
    assert np.all(np.isfinite(gradient))


def test_concept_never_active_gives_zero_column(rng):
    # Concept 2 lives on channels that the activations never use.
    w = np.zeros((3, 8))
    w[0, :3], w[1, 3:6], w[2, 6:] = 1.0, 1.0, 1.0
    a = rng.uniform(size=(20, 8)) * np.r_[np.ones(6), np.zeros(2)]
    u, gradient = _value_and_gradient(a, w)
    np.testing.assert_array_equal(u[:, 2], 0.0)
    assert np.all(np.isfinite(gradient))
    np.testing.assert_allclose(u, _scipy_rows(a, w), atol=1e-10)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_duplicated_concepts_give_finite_values_and_gradients(rng, dtype):
    # A repeated row of W makes the Gram matrix singular: the minimiser is not unique, but the
    # minimum is, and the solver must stay finite.
    w = rng.uniform(size=(4, 10))
    w = np.concatenate([w, w[:2]])  # (6, 10), concepts 4 and 5 duplicate 0 and 1
    a = rng.uniform(size=(30, 10)).astype(dtype)
    u, gradient = _value_and_gradient(a, w)
    assert np.all(np.isfinite(u)) and np.all(np.isfinite(gradient))
    assert u.min() >= 0.0
    residual = np.linalg.norm(a - u @ w, axis=1)
    reference = np.linalg.norm(a - _scipy_rows(a, w) @ w, axis=1)
    np.testing.assert_allclose(residual, reference, rtol=1e-3 if dtype == np.float32 else 1e-8)


def test_concept_bank_may_be_a_tensor_inside_tf_function(rng):
    w = rng.uniform(size=(4, 6))
    a = rng.uniform(size=(10, 6))
    solve = tf.function(lambda x, bank: solve_nnls(x, bank))
    np.testing.assert_allclose(solve(tf.constant(a), tf.constant(w)).numpy(), _scipy_rows(a, w),
                               atol=1e-10)


@pytest.mark.parametrize(
    "activations, bank, error, match",
    [
        (np.ones((2, 3, 4)), np.ones((2, 4)), ValueError,
         r"`activations` must be 2-D \(n, channels\) or 4-D \(n, height, width, channels\), "
         r"got shape \(2, 3, 4\)\."),
        (np.ones(4), np.ones((2, 4)), ValueError, r"`activations` must be 2-D"),
        (np.ones((2, 5)), np.ones((2, 4)), ValueError,
         r"`concept_bank` must have as many columns as `activations` has channels \(5\), "
         r"got shape \(2, 4\)\."),
        (np.ones((2, 4)), np.full((2, 4), np.nan), ValueError,
         r"`concept_bank` must be finite, got NaN or infinite values\."),
        (np.ones((2, 4)), np.ones(4), ValueError,
         r"`concept_bank` must be 2-D, got shape \(4,\)\."),
        (np.array([["a", "b"]]), np.ones((2, 2)), TypeError,
         r"`activations` must hold real numbers, got dtype <U1\."),
    ],
)
def test_bad_inputs_raise_clear_errors(activations, bank, error, match):
    with pytest.raises(error, match=match):
        solve_nnls(activations, bank)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"max_iter": 0}, ValueError, r"`max_iter` must be >= 1, got 0\."),
        ({"max_iter": 1.5}, TypeError, r"`max_iter` must be an int, got float 1\.5\."),
        ({"tol": -1.0}, ValueError, r"`tol` must be a finite float >= 0, got -1\.0\."),
        ({"tol": float("nan")}, ValueError, r"`tol` must be a finite float >= 0, got nan\."),
        ({"tol": "small"}, TypeError, r"`tol` must be a float, got str 'small'\."),
        ({"max_active_set_iter": 0}, ValueError, r"`max_active_set_iter` must be >= 1, got 0\."),
    ],
)
def test_bad_options_raise_clear_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        solve_nnls(np.ones((2, 3)), np.ones((2, 3)), **kwargs)


@pytest.mark.slow
def test_kkt_property():
    hypothesis = pytest.importorskip("hypothesis")
    strategies = hypothesis.strategies

    @hypothesis.settings(deadline=None, max_examples=40)
    @hypothesis.given(
        n_concepts=strategies.integers(1, 30),
        n_channels=strategies.integers(1, 40),
        seed=strategies.integers(0, 2**31 - 1),
        sparsity=strategies.sampled_from([0.0, 0.5, 0.9]),
    )
    def check(n_concepts, n_channels, seed, sparsity):
        rng = np.random.default_rng(seed)
        w = rng.uniform(size=(n_concepts, n_channels)) * (rng.uniform(
            size=(n_concepts, n_channels)) >= sparsity)
        a = rng.uniform(size=(16, n_channels))
        u = solve_nnls(a, w).numpy()
        gradient = u @ w @ w.T - a @ w.T  # KKT multipliers
        scale = max(np.abs(a @ w.T).max(), 1e-300)
        assert np.all(np.isfinite(u))
        assert u.min() >= 0.0  # primal feasibility
        assert gradient.min() >= -1e-9 * scale  # dual feasibility
        assert np.abs(u * gradient).max() <= 1e-9 * scale * max(u.max(), 1.0)  # complementarity
        # The minimum is unique even where the minimiser is not (dependent concepts).
        residual = np.linalg.norm(a - u @ w, axis=1)
        reference = np.linalg.norm(a - _scipy_rows(a, w) @ w, axis=1)
        np.testing.assert_allclose(residual, reference, rtol=1e-7, atol=1e-10)

    check()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_empty_batch_gives_empty_values_and_gradients(rng, dtype):
    u, gradient = _value_and_gradient(np.zeros((0, 2, 2, 6), dtype), rng.uniform(size=(3, 6)))
    assert u.shape == (0, 2, 2, 3) and gradient.shape == (0, 2, 2, 6)


def test_finish_and_vjp_by_chunks_match_one_chunk(rng, monkeypatch):
    # A budget of a few rows cuts 37 rows into several chunks and a shorter last one: values and
    # gradients must not depend on where the cuts fall.
    a, w, _ = _planted_problem(rng, n_rows=37, n_concepts=6, n_channels=11)
    whole = _value_and_gradient(a, w)
    row_bytes = 8 * (a.shape[1] + nnls._FACTOR_COPIES * w.shape[0] ** 2)
    monkeypatch.setattr(nnls, "_FINISH_BYTES", 5 * row_bytes)
    chunked = _value_and_gradient(a, w)
    np.testing.assert_allclose(chunked[0], whole[0], rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(chunked[1], whole[1], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(chunked[0], _scipy_rows(a, w), rtol=1e-8, atol=1e-10)


def test_batch_jacobian_through_several_chunks(rng, monkeypatch):
    # pfor vectorises the VJP's chunk loop: 37 rows in chunks of 5 (the last one padded) must give
    # each row's Jacobian, equal to the one-chunk result and to the active-set formula.
    a, w, u_true = _planted_problem(rng, n_rows=37, n_concepts=6, n_channels=11)
    x = tf.constant(a)

    def jacobian():
        with tf.GradientTape() as tape:
            tape.watch(x)
            u = solve_nnls(x, w)
        return tape.batch_jacobian(u, x).numpy()  # (N, r, p)

    whole = jacobian()
    row_bytes = 8 * (a.shape[1] + nnls._FACTOR_COPIES * w.shape[0] ** 2)
    monkeypatch.setattr(nnls, "_FINISH_BYTES", 5 * row_bytes)
    np.testing.assert_allclose(jacobian(), whole, rtol=1e-10, atol=1e-12)
    for row in range(0, 37, 9):
        active = u_true[row] > 0
        expected = np.zeros((w.shape[0], w.shape[1]))
        expected[active] = np.linalg.solve(w[active] @ w[active].T, w[active])
        np.testing.assert_allclose(whole[row], expected, rtol=1e-8, atol=1e-10)


def _ill_conditioned_bank(rng, n_concepts, n_channels, condition):
    """A non-negative bank whose Gram matrix has condition number about ``condition``."""
    base = rng.uniform(size=(n_concepts, n_channels))
    u_, _, vt = np.linalg.svd(base, full_matrices=False)
    singular = np.logspace(0, -0.5 * np.log10(condition), n_concepts)
    w = (u_ * singular) @ vt
    return w - min(w.min(), 0.0)  # a shift by a constant keeps most of the spread


@pytest.mark.parametrize("grouped", [True, False])
def test_masked_solve_by_pattern_and_by_row_match_numpy(rng, monkeypatch, grouped):
    # _masked_solve inverts G_SS once per distinct active set (explicit inverse + refinement) or
    # factorises per row: both must equal a direct solve, even on an ill-conditioned G.
    w = _ill_conditioned_bank(rng, n_concepts=7, n_channels=30, condition=1e7)
    gram = w @ w.T
    assert np.linalg.cond(gram) > 1e5
    patterns = rng.uniform(size=(6, 7)) < 0.6
    mask = patterns[rng.integers(0, 6, size=80)].astype(np.float64)  # repeated active sets
    mask[-1] = 0.0  # and an empty one
    rhs = rng.normal(size=(80, 7, 2))
    monkeypatch.setattr(nnls, "_GROUPED_SOLVE_RATIO", 10**6 if grouped else 0)
    z, singular = nnls._masked_solve(tf.constant(gram), tf.constant(mask), tf.constant(rhs))
    assert not np.any(singular.numpy())
    z = z.numpy()
    for row in range(80):
        active = mask[row] > 0
        expected = np.zeros((7, 2))
        expected[active] = np.linalg.solve(gram[np.ix_(active, active)], rhs[row][active])
        scale = max(np.abs(expected).max(), 1.0)
        np.testing.assert_allclose(z[row], expected, rtol=0, atol=1e-7 * scale)


def test_masked_solve_flags_singular_sets_without_a_per_row_fallback(rng):
    # singular="flag" (block pivoting): rows whose set holds a duplicated concept are flagged
    # (the rescue takes them), the other rows are still solved exactly by the grouped inverse.
    w = rng.uniform(size=(5, 12))
    w = np.concatenate([w, w[:1]])  # concept 5 duplicates concept 0
    gram = w @ w.T
    mask = (rng.uniform(size=(40, 6)) < 0.6).astype(np.float64)
    rhs = rng.normal(size=(40, 6, 1))
    z, singular = nnls._masked_solve(tf.constant(gram), tf.constant(mask), tf.constant(rhs),
                                     singular="flag")
    expected_singular = (mask[:, 0] > 0) & (mask[:, 5] > 0)
    np.testing.assert_array_equal(singular.numpy(), expected_singular)
    z = z.numpy()
    for row in np.flatnonzero(~expected_singular):
        active = mask[row] > 0
        expected = np.zeros((6, 1))
        expected[active] = np.linalg.solve(gram[np.ix_(active, active)], rhs[row][active])
        np.testing.assert_allclose(z[row], expected, rtol=0, atol=1e-9 * max(
            np.abs(expected).max(), 1.0))


def test_ill_conditioned_bank_matches_scipy(rng):
    # Repeated rows make the finish and the VJP take the per-active-set path.
    w = _ill_conditioned_bank(rng, n_concepts=8, n_channels=40, condition=1e6)
    a = rng.uniform(size=(12, 40))[rng.integers(0, 12, size=200)]
    u = solve_nnls(a, w).numpy()
    reference = _scipy_rows(a, w)
    error = np.max(np.abs(u - reference), axis=1)
    np.testing.assert_array_less(error, 1e-7 * np.linalg.norm(reference, axis=1) + 1e-12)


def _assert_kkt(u, a, w, tol=1e-9):
    gradient = u @ w @ w.T - a @ w.T  # KKT multipliers
    scale = np.abs(a @ w.T).max()
    assert u.min() >= 0.0
    assert gradient.min() >= -tol * scale
    assert np.abs(u * gradient).max() <= tol * scale * max(u.max(), 1.0)


@pytest.mark.parametrize("seed", [1, 151])
def test_more_concepts_than_channels_meet_kkt(seed):
    # W of rank 7 with 19 sparse concepts: block pivoting cycles on some of these rows (a
    # singular G is not a P-matrix); the Lawson-Hanson fallback must still reach the optimum.
    rng = np.random.default_rng(seed)
    w = rng.uniform(size=(19, 7)) * (rng.uniform(size=(19, 7)) >= 0.5)
    a = rng.uniform(size=(16, 7))
    u = solve_nnls(a, w).numpy()
    _assert_kkt(u, a, w)
    residual = np.linalg.norm(a - u @ w, axis=1)
    reference = np.linalg.norm(a - _scipy_rows(a, w) @ w, axis=1)
    np.testing.assert_allclose(residual, reference, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("shape", [(40, 6, 15), (40, 12, 5)])
def test_lawson_hanson_fallback_matches_scipy(rng, shape):
    n_rows, n_concepts, n_channels = shape
    w = rng.uniform(size=(n_concepts, n_channels))
    a = rng.uniform(size=(n_rows, n_channels))
    gram = w @ w.T
    kkt_tol = nnls._KKT_EPS * np.finfo(np.float64).eps * n_concepts
    u, done = nnls._lawson_hanson(tf.constant(gram), tf.constant(a @ w.T), 100, kkt_tol)
    assert np.all(done.numpy())
    _assert_kkt(u.numpy(), a, w)
    residual = np.linalg.norm(a - u.numpy() @ w, axis=1)
    reference = np.linalg.norm(a - _scipy_rows(a, w) @ w, axis=1)
    np.testing.assert_allclose(residual, reference, rtol=1e-9, atol=1e-10)


def test_rows_left_unfinished_keep_the_better_feasible_point(rng, monkeypatch):
    # When a row is still unfinished after the passes and the fallback (iteration caps), the
    # solve must return a feasible point no worse than its warm start. A fallback that gives
    # up at once, with an infeasible iterate, leaves unfinished every row that one pass from a
    # wrong support (all variables positive) does not solve.
    a, w, u_true = _planted_problem(rng, n_rows=30, n_concepts=6, n_channels=11)
    gram, b = w @ w.T, a @ w.T
    warm = u_true + 1e-3  # near-optimal but with a wrong support wherever u_true has zeros

    def give_up(gram, b, max_iter, kkt_tol):
        return -tf.ones_like(b), tf.zeros(tf.shape(b)[:1], tf.bool)

    monkeypatch.setattr(nnls, "_lawson_hanson", give_up)
    # Two passes finish some rows and leave the others to the rescue.
    x, done = nnls._block_pivoting(tf.constant(gram), tf.constant(b), tf.constant(warm),
                                   tf.constant(2))
    done = done.numpy()
    assert 0 < done.sum() < len(done)
    start = np.where(done[:, None], x.numpy(), warm)  # what the main solve hands on
    x = nnls._rescue_unfinished(
        tf.constant(a), tf.constant(start), tf.constant(~done), tf.constant(w), tf.constant(2),
        tf.constant(nnls._FINISH_BYTES)).numpy()

    def objective(u):
        return np.sum(u * (0.5 * u @ gram - b), axis=1)

    finished = np.all(np.isclose(x, u_true, rtol=0, atol=1e-9), axis=1)
    assert np.all(finished[done]) and not np.all(finished)
    assert x.min() >= 0.0
    np.testing.assert_array_equal(x[~finished], warm[~finished])  # beats the clipped iterate 0
    assert np.all(objective(x) <= objective(warm) + 1e-12)


def test_rescue_graph_runs_only_when_rows_are_left(rng, monkeypatch):
    # Eager solves trace and run the Lawson-Hanson rescue as a separate graph, only when block
    # pivoting leaves rows (here: a singular G); a well-posed solve never touches it.
    class Untouchable:
        def get_concrete_function(self, *args):
            raise AssertionError("the rescue ran on a well-posed problem")

    rescue = nnls._rescue_graph
    monkeypatch.setattr(nnls, "_rescue_graph", Untouchable())
    a, w, u_true = _planted_problem(rng, n_rows=20, n_concepts=5, n_channels=12)
    np.testing.assert_allclose(solve_nnls(a, w).numpy(), u_true, rtol=1e-9, atol=1e-9)
    monkeypatch.setattr(nnls, "_rescue_graph", rescue)
    calls, trace = [], rescue.get_concrete_function

    def spy(*args):
        calls.append(args[0])
        return trace(*args)

    monkeypatch.setattr(rescue, "get_concrete_function", spy)
    w = rng.uniform(size=(19, 7)) * (rng.uniform(size=(19, 7)) >= 0.5)  # rank 7, 19 concepts
    a = rng.uniform(size=(16, 7))
    u = solve_nnls(a, w).numpy()
    assert len(calls) == 1
    _assert_kkt(u, a, w)
    # Inside a tf.function the rescue is inlined under a tf.cond: same solution.
    inline = tf.function(lambda x: solve_nnls(x, w))(tf.constant(a)).numpy()
    np.testing.assert_allclose(inline, u, rtol=1e-12, atol=1e-12)


def test_a_new_batch_size_reuses_the_traced_graphs(rng):
    # Eager solves trace their graphs for a free number of rows: a second batch size, value or
    # gradient, traces nothing again.
    w = rng.uniform(size=(4, 9))

    def solve(n_rows):
        x = tf.constant(rng.uniform(size=(n_rows, 9)))
        with tf.GradientTape() as tape:
            tape.watch(x)
            loss = tf.reduce_sum(solve_nnls(x, w))
        return tape.gradient(loss, x)

    solve(13)
    traces = nnls._main_graph.experimental_get_tracing_count()
    vjp_traces = nnls._vjp_graph.experimental_get_tracing_count()
    assert solve(21).shape == (21, 9)
    assert nnls._main_graph.experimental_get_tracing_count() == traces
    assert nnls._vjp_graph.experimental_get_tracing_count() == vjp_traces


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_signed_concept_banks_match_scipy(rng, dtype):
    # Semi-NMF gives a W of any sign; the projection is still the exact NNLS.
    w = rng.normal(size=(6, 15))
    a = rng.normal(size=(40, 15))
    u = solve_nnls(a.astype(dtype), w.astype(dtype)).numpy()
    reference = np.stack([scipy_nnls(w.T, row)[0] for row in a])
    tolerance = 1e-9 if dtype == np.float64 else 2e-4
    np.testing.assert_allclose(u, reference, atol=tolerance, rtol=0)


def test_signed_bank_gradient_matches_finite_differences(rng):
    w = rng.normal(size=(3, 9))
    u_true = rng.uniform(0.5, 1.0, size=(2, 3)) * [1.0, 0.0, 1.0]
    a = tf.constant(u_true @ w + 0.01 * rng.normal(size=(2, 9)))
    theoretical, numerical = tf.test.compute_gradient(lambda x: solve_nnls(x, w), [a], delta=1e-5)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-5)
