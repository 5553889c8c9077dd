"""The coupled NMF solver (xcraft.ops.coupled) on planted blocks with known answers."""

import numpy as np
import pytest
from scipy.optimize import linear_sum_assignment

from xcraft.ops.coupled import (
    block_weights,
    fit_coupled,
    initialize_coupled,
    solve_examples,
)
from xcraft.ops.nmf import factorize


def _planted(rng, n=120, d=4, sizes=(30, 20, 50), scales=(1.0, 1.0, 1.0)):
    f = rng.uniform(size=(n, d)) * (rng.uniform(size=(n, d)) < 0.6)
    f[np.arange(4 * d), np.arange(4 * d) % d] = 1.0  # pure rows make the factors unique
    ws = [s * rng.uniform(size=(d, p)) * (rng.uniform(size=(d, p)) < 0.5)
          for p, s in zip(sizes, scales, strict=True)]
    for w in ws:
        w[np.arange(d), np.arange(d)] = 1.0
    return f, ws, [f @ w for w in ws]


def _matched_cosines(found, planted):
    def unit(a):
        return a / np.maximum(np.linalg.norm(a, axis=0, keepdims=True), 1e-300)

    cosine = unit(np.asarray(found, np.float64)).T @ unit(planted)
    rows, cols = linear_sum_assignment(-cosine)
    return cosine[rows, cols]


def _fit(xs, d, weights="frobenius", **kwargs):
    alphas = block_weights([np.sum(np.square(x)) for x in xs], weights)
    f0, ws0 = initialize_coupled(xs, alphas, d, seed=(0, 1))
    return alphas, fit_coupled(xs, alphas, f0, ws0, **kwargs)


def test_planted_factors_are_recovered(rng):
    f_true, _, xs = _planted(rng)
    _, (f, ws, history, errors, n_iter, converged) = _fit(xs, 4, max_iter=3000, tol=1e-12)
    assert np.max(errors[-1]) < 1e-6
    assert np.min(_matched_cosines(f, f_true)) > 0.999


def test_without_normalisation_it_is_the_nmf_of_the_weighted_stack(rng):
    _, _, xs = _planted(rng)
    alphas, (f, ws, *_rest) = _fit(xs, 4, normalization="none", max_iter=50, tol=0.0)
    stacked = np.concatenate([np.sqrt(a) * x for a, x in zip(alphas, xs, strict=True)], axis=1)
    u, w, _, _ = factorize(stacked, 4, max_iter=50, tol=0.0, seed=(0, 1))
    np.testing.assert_allclose(f, u, rtol=1e-6, atol=1e-8)
    w_coupled = np.concatenate([np.sqrt(a) * np.asarray(w_b) for a, w_b in
                                zip(alphas, ws, strict=True)], axis=1)
    np.testing.assert_allclose(w_coupled, w, rtol=1e-6, atol=1e-8)


@pytest.mark.parametrize("solver", ["hals", "mu"])
def test_objective_never_increases_with_the_joint_normalisation(rng, solver):
    _, _, xs = _planted(rng)
    xs = [x + 0.05 * rng.uniform(size=x.shape) for x in xs]  # no exact fit
    _, (_, _, history, *_rest) = _fit(xs, 4, solver=solver, max_iter=60, tol=0.0)
    history = np.asarray(history)
    assert np.all(np.diff(history) <= 1e-9 * history[:-1])


def test_frobenius_weights_keep_a_small_block_that_uniform_weights_drown(rng):
    # Block 0 carries the structure at scale 1; block 1 is 1e4 times larger and of rank 1.
    f_true, ws_true, _ = _planted(rng, sizes=(40, 40), scales=(1.0, 1.0))
    big = 1e4 * np.outer(rng.uniform(size=len(f_true)), rng.uniform(size=40))
    xs = [f_true @ ws_true[0], big]
    errors = {}
    for weights in ("frobenius", "uniform"):
        _, (_, _, _, err, _, _) = _fit(xs, 5, weights=weights, max_iter=500, tol=1e-10)
        errors[weights] = np.asarray(err[-1])
    assert errors["frobenius"][0] < 0.05  # the small block is still explained
    assert errors["uniform"][0] > 2 * errors["frobenius"][0]


def test_streaming_gives_the_in_memory_fit(rng):
    _, _, xs = _planted(rng)
    alphas = block_weights([np.sum(np.square(x)) for x in xs])
    f0, ws0 = initialize_coupled(xs, alphas, 4, seed=(0, 1))
    full = fit_coupled(xs, alphas, f0, ws0, max_iter=30, tol=0.0)
    streamed = fit_coupled(xs, alphas, f0, ws0, max_iter=30, tol=0.0, batch_size=32)
    np.testing.assert_allclose(streamed[0], full[0], rtol=1e-4, atol=1e-6)


def test_solving_the_examples_again_reproduces_them_from_any_blocks(rng):
    f_true, _, xs = _planted(rng)
    alphas, (f, ws, *_rest) = _fit(xs, 4, max_iter=3000, tol=1e-12)
    again = solve_examples(xs, alphas, ws)
    np.testing.assert_allclose(again, f, atol=1e-4)
    subset = solve_examples(xs[1:], alphas[1:], ws[1:])
    assert np.min(_matched_cosines(subset, np.asarray(f))) > 0.99


def test_one_block_is_our_nmf_and_reaches_sklearns_objective(rng):
    # A noisy rank-6 matrix fitted at rank 4: no exact solution, so the objectives compare
    # two local optima of the same problem.
    from sklearn.decomposition import NMF as SklearnNMF

    x = rng.uniform(size=(90, 6)) @ rng.uniform(size=(6, 40)) + 0.05 * rng.uniform(size=(90, 40))
    alphas, (f, ws, *_rest) = _fit([x], 4, normalization="none", max_iter=300, tol=0.0)
    u, w, _, _ = factorize(np.sqrt(alphas[0]) * x, 4, max_iter=300, tol=0.0, seed=(0, 1))
    np.testing.assert_allclose(f, u, rtol=1e-6, atol=1e-8)
    ours = np.linalg.norm(x - np.asarray(f) @ np.asarray(ws[0])) ** 2
    reference = SklearnNMF(4, init="nndsvda", solver="cd", max_iter=2000, tol=1e-8,
                           random_state=0)
    theirs = np.linalg.norm(x - reference.fit_transform(x) @ reference.components_) ** 2
    assert ours <= 1.01 * theirs, (ours, theirs)
