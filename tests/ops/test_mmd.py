"""The unbiased MMD² and its permutation test, against NumPy, closed forms and the null's law."""

import numpy as np
import pytest
from scipy import stats

from xcraft.ops.mmd import (
    gaussian_kernel,
    median_bandwidth,
    mmd2_unbiased,
    mmd_permutation_test,
)


def _numpy_mmd2(x, y, sigma):
    def k(a, b):
        d2 = ((a[:, None, :] - b[None, :, :]) ** 2).sum(-1)
        return np.exp(-d2 / (2 * sigma**2))

    m, n = len(x), len(y)
    kxx, kyy, kxy = k(x, x), k(y, y), k(x, y)
    within_x = (kxx.sum() - np.trace(kxx)) / (m * (m - 1))
    within_y = (kyy.sum() - np.trace(kyy)) / (n * (n - 1))
    return within_x + within_y - 2 * kxy.mean()


def test_kernel_matches_numpy(rng):
    a, b = rng.normal(size=(5, 3)), rng.normal(size=(4, 3))
    expected = np.exp(-((a[:, None] - b[None]) ** 2).sum(-1) / (2 * 0.7**2))
    np.testing.assert_allclose(gaussian_kernel(a, b, 0.7).numpy(), expected, rtol=1e-12)


@pytest.mark.parametrize("m, n, d", [(2, 2, 1), (7, 11, 3), (20, 5, 8)])
def test_statistic_matches_numpy_reference(rng, m, n, d):
    x, y = rng.normal(size=(m, d)), rng.normal(0.5, 1.2, size=(n, d))
    sigma = median_bandwidth(x, y)
    np.testing.assert_allclose(float(mmd2_unbiased(x, y)), _numpy_mmd2(x, y, sigma), rtol=1e-10)
    result = mmd_permutation_test(x, y, n_permutations=5, random_state=0)
    np.testing.assert_allclose(result.statistic, _numpy_mmd2(x, y, sigma), rtol=1e-10)


def test_median_bandwidth_is_the_median_pairwise_distance():
    # Distances among 0, 1, 3 on a line: 1, 3, 2 -> median 2.
    assert median_bandwidth(np.array([[0.0], [1.0]]), np.array([[3.0]])) == 2.0
    assert median_bandwidth(np.zeros((4, 2))) == 1.0  # degenerate sample: the documented 1


def test_mean_matches_closed_form_for_two_gaussians(rng):
    # x ~ N(0, s² I), y ~ N(mu, s² I): E MMD²_u = 2 c (1 − exp(−‖mu‖² / (2(σ² + 2s²)))),
    # c = (σ² / (σ² + 2 s²))^(d/2); the estimator is unbiased at a fixed bandwidth.
    d, s, sigma, n_rep = 2, 1.0, 1.5, 4000
    mu = np.array([1.0, -0.5])
    x = rng.normal(0.0, s, size=(n_rep, 10, d))
    y = mu + rng.normal(0.0, s, size=(n_rep, 12, d))
    estimates = mmd2_unbiased(x, y, bandwidth=sigma).numpy()
    c = (sigma**2 / (sigma**2 + 2 * s**2)) ** (d / 2)
    expected = 2 * c * (1 - np.exp(-mu @ mu / (2 * (sigma**2 + 2 * s**2))))
    standard_error = estimates.std() / np.sqrt(n_rep)
    assert abs(estimates.mean() - expected) < 4 * standard_error


def test_p_value_formula_counts_ties_and_uses_b_plus_one(rng):
    x, y = rng.normal(size=(6, 2)), rng.normal(size=(6, 2))
    result = mmd_permutation_test(x, y, n_permutations=50, random_state=3)
    n_extreme = np.sum(result.null >= result.statistic - 1e-12 * max(1, abs(result.statistic)))
    assert result.p_value == (1 + n_extreme) / 51
    assert 1 / 51 <= result.p_value <= 1.0


def test_null_p_values_are_uniform(rng):
    p_values = [
        mmd_permutation_test(rng.normal(size=(12, 3)), rng.normal(size=(15, 3)),
                             n_permutations=199, random_state=seed).p_value
        for seed in range(150)
    ]
    # Discrete on a grid of 1/200: the KS test against U(0, 1) is conservative enough here.
    assert stats.kstest(p_values, "uniform").pvalue > 0.01


def test_power_grows_to_one_with_the_shift(rng):
    def rejection_rate(shift):
        return np.mean([
            mmd_permutation_test(rng.normal(size=(15, 2)), rng.normal(shift, 1, size=(15, 2)),
                                 n_permutations=99, random_state=seed).p_value <= 0.05
            for seed in range(40)
        ])

    rates = [rejection_rate(shift) for shift in (0.0, 0.75, 2.5)]
    assert rates[0] < 0.15  # about the level 0.05
    assert rates[0] < rates[1] < rates[2]
    assert rates[2] == 1.0


def test_several_feature_sets_sum_and_share_permutations(rng):
    x1, y1 = rng.normal(size=(8, 3)), rng.normal(1, 1, size=(9, 3))
    x2, y2 = rng.normal(size=(8, 2, 2)), rng.normal(size=(9, 2, 2))  # flattened to 4 features
    joint = mmd_permutation_test([x1, x2], [y1, y2], n_permutations=30, random_state=0)
    first = mmd_permutation_test(x1, y1, n_permutations=30, random_state=0)
    second = mmd_permutation_test(x2, y2, n_permutations=30, random_state=0)
    np.testing.assert_allclose(joint.per_set, [first.statistic, second.statistic], rtol=1e-12)
    np.testing.assert_allclose(joint.null, first.null + second.null, rtol=1e-10, atol=1e-14)


def test_same_seed_same_null(rng):
    x, y = rng.normal(size=(10, 2)), rng.normal(size=(10, 2))
    a = mmd_permutation_test(x, y, n_permutations=40, random_state=7)
    b = mmd_permutation_test(x, y, n_permutations=40, random_state=7)
    np.testing.assert_array_equal(a.null, b.null)


@pytest.mark.parametrize("x, y, error, match", [
    (np.zeros((1, 2)), np.zeros((4, 2)), ValueError, r"`x` must hold at least 2 samples"),
    (np.zeros((3, 2)), np.zeros((4, 3)), ValueError, r"same number of features in feature set 0"),
    (np.full((3, 2), np.nan), np.zeros((4, 2)), ValueError, r"`x` must be finite"),
    (np.array([["a", "b"]] * 3), np.zeros((4, 2)), TypeError, r"`x` must hold real numbers"),
])
def test_bad_input_is_refused(x, y, error, match):
    with pytest.raises(error, match=match):
        mmd_permutation_test(x, y, n_permutations=5)


def test_bad_bandwidth_is_refused(rng):
    with pytest.raises(ValueError, match=r"`bandwidth` must be positive, got -1.0"):
        mmd_permutation_test(rng.normal(size=(3, 2)), rng.normal(size=(3, 2)), bandwidth=-1.0)


@pytest.mark.slow
@pytest.mark.parametrize("m, n, d", [(5, 5, 1), (30, 10, 4)])
def test_null_p_values_are_uniform_at_level_alpha(m, n, d):
    rng = np.random.default_rng(1)
    p_values = np.array([
        mmd_permutation_test(rng.normal(size=(m, d)), rng.normal(size=(n, d)),
                             n_permutations=99, random_state=seed).p_value
        for seed in range(600)
    ])
    # Valid at every level: P(p <= α) <= α, up to the binomial error of 600 draws.
    for alpha in (0.05, 0.1, 0.5):
        assert np.mean(p_values <= alpha) <= alpha + 3 * np.sqrt(alpha * (1 - alpha) / 600)
    assert stats.kstest(p_values, "uniform").pvalue > 0.001
