"""CoupledNMF: the estimator around xcraft.ops.coupled (planted blocks, contracts, errors)."""

import numpy as np
import pytest

from tests.ops.test_coupled import _matched_cosines, _planted
from xcraft.coupled import CoupledNMF


@pytest.fixture(scope="module")
def planted_blocks():
    rng = np.random.default_rng(0)
    f, _, xs = _planted(rng)
    return f, {"pixels": xs[0], "conv4": xs[1], "conv5": xs[2]}


def test_fit_recovers_the_shared_examples(planted_blocks):
    f_true, blocks = planted_blocks
    model = CoupledNMF(4, max_iter=3000, tol=1e-12, random_state=0).fit(blocks)
    assert model.examples_.shape == (len(f_true), 4)
    assert set(model.components_) == set(blocks)
    assert all(error < 1e-5 for error in model.block_errors_.values())
    assert np.min(_matched_cosines(model.examples_, f_true)) > 0.999
    np.testing.assert_allclose(sum(model.weights_[k] * np.sum(b**2) for k, b in blocks.items()),
                               3.0)  # Frobenius weights: every block counts 1


def test_transform_reproduces_the_examples_and_takes_a_subset(planted_blocks):
    _, blocks = planted_blocks
    model = CoupledNMF(4, max_iter=3000, tol=1e-12, random_state=0).fit(blocks)
    np.testing.assert_allclose(model.transform(blocks), model.examples_, atol=1e-4)
    subset = model.transform({"conv5": blocks["conv5"]})
    assert np.min(_matched_cosines(subset, model.examples_)) > 0.99


def test_permuting_examples_permutes_f_and_same_seed_same_factors(planted_blocks):
    _, blocks = planted_blocks
    order = np.random.default_rng(3).permutation(len(blocks["pixels"]))
    first = CoupledNMF(4, max_iter=200, random_state=1).fit(blocks)
    again = CoupledNMF(4, max_iter=200, random_state=1).fit(blocks)
    np.testing.assert_array_equal(first.examples_, again.examples_)
    permuted = CoupledNMF(4, max_iter=3000, tol=1e-12, random_state=1).fit(
        {k: b[order] for k, b in blocks.items()})
    reference = CoupledNMF(4, max_iter=3000, tol=1e-12, random_state=1).fit(blocks)
    assert np.min(_matched_cosines(permuted.examples_, reference.examples_[order])) > 0.999


@pytest.mark.parametrize(("blocks", "error", "message"), [
    ({}, ValueError, r"`blocks` must hold at least one block, got an empty dict\."),
    ([np.ones((3, 3))], TypeError, r"`blocks` must be a dict of block name"),
    ({"a": np.ones((4, 3)), "b": np.ones((5, 3))}, ValueError,
     r"Every block must have the same 4 examples \(rows\), got \{'b': 5\}\."),
    ({"a": -np.ones((4, 3))}, ValueError, r"Block 'a' must be non-negative, got a minimum of -1"),
    ({"a": np.ones(4)}, ValueError, r"Block 'a' must be a non-empty 2-D array"),
])
def test_bad_blocks(blocks, error, message):
    with pytest.raises(error, match=message):
        CoupledNMF(2).fit(blocks)


def test_transform_refuses_unknown_blocks(planted_blocks):
    _, blocks = planted_blocks
    model = CoupledNMF(4, max_iter=20, random_state=0).fit(blocks)
    with pytest.raises(ValueError, match=r"must be among the fitted blocks .*unknown \['fc'\]"):
        model.transform({"fc": blocks["pixels"]})
