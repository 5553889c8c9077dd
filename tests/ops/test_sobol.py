"""Total Sobol' indices against closed forms (Ishigami, additive models) and explicit formulas."""

import warnings

import numpy as np
import pytest
import tensorflow as tf
from scipy.stats import qmc

from xcraft.ops.sobol import (
    SobolIndices,
    sobol_design,
    total_indices_from_outputs,
    total_sobol_indices,
)

ISHIGAMI_A, ISHIGAMI_B = 7.0, 0.1


def ishigami(x):
    """Ishigami function of inputs on [0, 1] mapped to [-pi, pi]."""
    x = -np.pi + 2.0 * np.pi * np.asarray(x, np.float64)
    return (np.sin(x[:, 0]) + ISHIGAMI_A * np.sin(x[:, 1]) ** 2
            + ISHIGAMI_B * x[:, 2] ** 4 * np.sin(x[:, 0]))


def ishigami_total_indices():
    """Closed form: V1 = (1 + b pi^4 / 5)^2 / 2, V2 = a^2 / 8, V13 = b^2 pi^8 (1/18 - 1/50)."""
    a, b = ISHIGAMI_A, ISHIGAMI_B
    v1 = 0.5 * (1.0 + b * np.pi**4 / 5.0) ** 2
    v2 = a**2 / 8.0
    v13 = b**2 * np.pi**8 * (1.0 / 18.0 - 1.0 / 50.0)
    total = v1 + v2 + v13
    return np.array([(v1 + v13) / total, v2 / total, v13 / total])


def test_ishigami_closed_form_values():
    np.testing.assert_allclose(ishigami_total_indices(), [0.558, 0.442, 0.244], atol=1e-3)


# Sobol' (scrambled or Xplique's unscrambled) and Halton converge at the QMC rate: 2^12 designs
# are within 0.01 (measured <= 0.0097 over 10 seeds). LHS and i.i.d. sampling converge at the
# Monte Carlo rate: at 2^12 their error reaches 0.07 on some seeds, so they get 2^14 designs
# (error <= 0.025 on 39 of 40 seeds) and 0.03.
SAMPLER_SETTINGS = {
    "sobol": (2**12, 0.01),
    "xplique": (2**12, 0.01),
    "halton": (2**12, 0.03),
    "lhs": (2**14, 0.03),
    "random": (2**14, 0.03),
}


@pytest.mark.parametrize("estimator", ["jansen", "saltelli", "homma"])
@pytest.mark.parametrize("sampler", list(SAMPLER_SETTINGS))
def test_ishigami_total_indices(sampler, estimator):
    nb_design, atol = SAMPLER_SETTINGS[sampler]
    st = total_sobol_indices(ishigami, 3, nb_design=nb_design, sampler=sampler,
                             estimator=estimator, random_state=0, dtype="float64")
    np.testing.assert_allclose(st, ishigami_total_indices(), atol=atol)


@pytest.mark.parametrize("estimator", ["jansen", "saltelli", "homma"])
def test_additive_model_total_indices(estimator):
    # f = sum_i c_i x_i, x_i uniform on [lo_i, hi_i]: ST_i = c_i^2 Var(x_i) / sum_j c_j^2 Var(x_j)
    coef = np.array([1.0, -2.0, 0.0, 3.0])
    low, high = np.array([0.0, -1.0, 0.0, 2.0]), np.array([1.0, 0.5, 4.0, 2.5])
    var_x = (high - low) ** 2 / 12.0
    expected = coef**2 * var_x / np.sum(coef**2 * var_x)

    def f(m):
        return (low + (high - low) * m) @ coef + 10.0  # a large mean tests the centring

    st = total_sobol_indices(f, 4, nb_design=2**12, estimator=estimator, random_state=1,
                             dtype="float64")
    np.testing.assert_allclose(st, expected, atol=0.01)


def test_design_layout():
    dim, n = 3, 8
    masks = sobol_design(dim, n, random_state=0)
    assert masks.shape == (n * (dim + 2), dim) and masks.dtype == np.float32
    assert masks.min() >= 0.0 and masks.max() <= 1.0
    a, b, c = masks[:n], masks[n : 2 * n], masks[2 * n :].reshape(dim, n, dim)
    for i in range(dim):
        np.testing.assert_array_equal(c[i][:, i], b[:, i])
        np.testing.assert_array_equal(np.delete(c[i], i, axis=1), np.delete(a, i, axis=1))


@pytest.mark.parametrize("sampler", ["sobol", "halton", "lhs", "random"])
def test_design_is_seeded(sampler):
    first = sobol_design(4, 16, sampler, random_state=3)
    np.testing.assert_array_equal(first, sobol_design(4, 16, sampler, np.random.default_rng(3)))
    assert not np.allclose(first, sobol_design(4, 16, sampler, random_state=4))


def test_xplique_design_is_unscrambled_sobol():
    dim, n = 5, 32
    masks = sobol_design(dim, n, "xplique", random_state=0)
    np.testing.assert_array_equal(masks, sobol_design(dim, n, "xplique", random_state=1))
    points = qmc.Sobol(2 * dim, scramble=False).random(n)
    np.testing.assert_array_equal(masks[:n], points[:, :dim].astype(np.float32))
    np.testing.assert_array_equal(masks[n : 2 * n], points[:, dim:].astype(np.float32))
    # The unscrambled sequence starts at the origin: design point 0 is zero in A, B and every C_i.
    np.testing.assert_array_equal(masks.reshape(dim + 2, n, dim)[:, 0], 0.0)


def _numpy_reference(y, dim, estimator, variance):
    """Explicit formulas on one output vector laid out as [A; B; C_1; ...; C_dim]."""
    y = y.reshape(dim + 2, -1)
    f_a, f_b, f_c = y[0], y[1], y[2:]
    if variance == "pooled":
        var = np.var(np.concatenate([f_a, f_b]), ddof=1)
    else:
        var = np.var(f_a, ddof=1)
    m = np.mean(np.concatenate([f_a, f_b]))
    a0, c0 = f_a - m, f_c - m
    if estimator == "jansen":
        return np.sum((f_a - f_c) ** 2, axis=1) / (2 * len(f_a) * var)
    if estimator == "saltelli":
        return np.mean(a0 * (a0 - c0), axis=1) / var
    return 1.0 - (np.mean(a0 * c0, axis=1) - np.mean(a0) ** 2) / var


@pytest.mark.parametrize("variance", ["pooled", "a"])
@pytest.mark.parametrize("estimator", ["jansen", "saltelli", "homma"])
def test_estimators_match_explicit_formulas_batched(rng, estimator, variance):
    dim, n = 4, 16
    outputs = rng.normal(size=(2, 3, n * (dim + 2))) * 3.0 + 5.0  # two leading batch axes
    st = total_indices_from_outputs(outputs, dim, estimator, variance=variance)
    assert isinstance(st, tf.Tensor) and st.shape == (2, 3, dim) and st.dtype == tf.float64
    expected = np.stack([[_numpy_reference(y, dim, estimator, variance) for y in row]
                         for row in outputs])
    np.testing.assert_allclose(st.numpy(), expected, rtol=1e-10)


def test_xplique_jansen_formula(rng):
    # Xplique: sum_j (f(A)_j - f(C_i)_j)^2 / (2 N var), var the ddof=1 variance of f(A) alone.
    dim, n = 3, 32
    y = rng.normal(size=n * (dim + 2))
    f_a, f_c = y[:n], y[2 * n :].reshape(dim, n)
    var = np.sum((f_a - f_a.mean()) ** 2) / (n - 1)
    expected = np.sum((f_a - f_c) ** 2, axis=1) / (2 * n * var)
    st = total_indices_from_outputs(y, dim, "jansen", variance="a").numpy()
    np.testing.assert_allclose(st, expected, rtol=1e-12)


def test_float32_by_default_float64_kept(rng):
    y = rng.normal(size=8 * 4)
    assert total_indices_from_outputs(y.astype(np.float32), 2).dtype == tf.float32
    assert total_indices_from_outputs(y, 2).dtype == tf.float64
    assert total_indices_from_outputs(np.arange(32), 2).dtype == tf.float32


def test_constant_output_gives_zero_and_warns(rng):
    outputs = rng.normal(size=(3, 8 * 5))
    outputs[1] = 2.5
    with pytest.warns(UserWarning, match=r"1 of 3 outputs did not vary over the design"):
        st = total_indices_from_outputs(outputs, 3).numpy()
    np.testing.assert_array_equal(st[1], 0.0)
    assert np.all(st[[0, 2]] > 0)
    with pytest.warns(UserWarning, match=r"The output did not vary over the design"):
        st = total_sobol_indices(lambda x: np.full(len(x), 3.0), 2, nb_design=8, random_state=0)
    np.testing.assert_array_equal(st, 0.0)


def test_no_warning_for_small_but_varying_outputs():
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        st = total_sobol_indices(lambda x: 1e-20 * x[:, 0], 2, nb_design=64, random_state=0,
                                 dtype="float64")
    np.testing.assert_allclose(st, [1.0, 0.0], atol=0.02)  # Monte Carlo error of 64 designs


def test_f_batches_and_tensor_outputs_agree():
    def f(x):
        return tf.reduce_sum(tf.sin(3.0 * x) * tf.range(1.0, 4.0), axis=1)

    whole = total_sobol_indices(f, 3, nb_design=64, random_state=0)
    batched = total_sobol_indices(f, 3, nb_design=64, random_state=0, batch_size=37)
    np.testing.assert_allclose(whole, batched, rtol=1e-6)


def test_bootstrap_intervals():
    result = total_sobol_indices(ishigami, 3, nb_design=2**10, random_state=0, n_bootstrap=300,
                                 confidence=0.99, dtype="float64")
    assert isinstance(result, SobolIndices) and result.confidence == 0.99
    assert np.all(result.low <= result.indices) and np.all(result.indices <= result.high)
    truth = ishigami_total_indices()
    assert np.all(result.low <= truth) and np.all(truth <= result.high)
    larger = total_sobol_indices(ishigami, 3, nb_design=2**13, random_state=0, n_bootstrap=300,
                                 confidence=0.99, dtype="float64")
    # The width shrinks like 1/sqrt(N) under resampling: 8x the points, ~1/2.8 the width.
    assert np.all(larger.high - larger.low < 0.6 * (result.high - result.low))


def test_bootstrap_is_seeded():
    first = total_sobol_indices(ishigami, 3, nb_design=64, random_state=5, n_bootstrap=50)
    second = total_sobol_indices(ishigami, 3, nb_design=64, random_state=5, n_bootstrap=50)
    for x, y in zip(first, second, strict=True):
        np.testing.assert_array_equal(x, y)


def test_non_power_of_two_warns():
    with pytest.warns(UserWarning, match=r"`nb_design` should be a power of 2 .* got 10\."):
        sobol_design(2, 10, "sobol", random_state=0)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"dim": 0}, ValueError, r"^`dim` must be >= 1, got 0\.$"),
        ({"dim": 2.0}, TypeError, r"^`dim` must be an int, got float 2\.0\.$"),
        ({"nb_design": 1}, ValueError, r"^`nb_design` must be >= 2 .*, got 1\.$"),
        ({"sampler": "owen"}, ValueError, r"^`sampler` must be one of 'sobol', .*got 'owen'\.$"),
        ({"estimator": "glen"}, ValueError, r"^`estimator` must be one of .*got 'glen'\.$"),
        ({"n_bootstrap": -1}, ValueError, r"^`n_bootstrap` must be >= 0, got -1\.$"),
        ({"confidence": 1.0}, ValueError, r"^`confidence` must be in \(0, 1\), got 1\.0\.$"),
        ({"random_state": "a"}, TypeError, r"^`random_state` must be None, an int or"),
        ({"f": 3}, TypeError, r"^`f` must be callable, got int\.$"),
        ({"f": lambda x: x}, ValueError, r"^`f` must return one value per point, shape \(20,\)"),
    ],
)
def test_bad_inputs(kwargs, error, match):
    arguments = {"f": lambda x: x[:, 0], "dim": 3, "nb_design": 4, **kwargs}
    with pytest.raises(error, match=match):
        total_sobol_indices(**arguments)


@pytest.mark.parametrize(
    ("outputs", "error", "match"),
    [
        (np.zeros(21), ValueError, r"^`outputs` must have a last axis of nb_design \* \(dim"),
        (np.zeros(5), ValueError, r"with nb_design >= 2, got shape \(5,\)\.$"),
        (np.array(["a"] * 10), TypeError, r"^`outputs` must hold real numbers, got dtype <U1\.$"),
    ],
)
def test_bad_outputs(outputs, error, match):
    with pytest.raises(error, match=match):
        total_indices_from_outputs(outputs, 3)
