"""The coupled NMF's analyses on planted factors and labels, with known answers."""

import numpy as np
import pytest

from tests.ops.test_coupled import _planted
from xcraft.coupled import analysis as an
from xcraft.coupled.blocks import Blocks, build_blocks, index_map


@pytest.fixture
def planted():
    """60 examples of 3 classes; example i uses factor labels[i] only, with strength 1..2."""
    rng = np.random.default_rng(0)
    labels = np.repeat(np.arange(3), 20)
    f = np.zeros((60, 3))
    f[np.arange(60), labels] = rng.uniform(1.0, 2.0, size=60)
    return f, labels


def test_planted_factors_are_pure(planted):
    f, labels = planted
    np.testing.assert_allclose(an.class_mass(f, labels), np.eye(3))
    np.testing.assert_allclose(an.factor_purity(f, labels), 1.0)
    classes, shares = an.top_classes(f, labels, k=2)
    np.testing.assert_array_equal(classes[:, 0], [0, 1, 2])
    np.testing.assert_allclose(shares, [[1, 0]] * 3)


def test_class_mass_of_a_spread_factor_and_the_balanced_option():
    f = np.array([[1.0], [1.0], [1.0], [1.0]])
    labels = np.array([0, 0, 0, 1])
    np.testing.assert_allclose(an.class_mass(f, labels, balanced=False), [[0.75, 0.25]])
    np.testing.assert_allclose(an.class_mass(f, labels), [[0.5, 0.5]])  # per-class means
    np.testing.assert_allclose(an.factor_purity(f, labels, n_classes=4), [0.5])


def test_top_examples_rank_by_value_or_by_share():
    f = np.array([[5.0, 5.0], [1.0, 0.0], [0.0, 2.0], [3.0, 0.1]])
    np.testing.assert_array_equal(an.top_examples(f, k=2), [[0, 3], [0, 2]])
    np.testing.assert_array_equal(an.top_examples(f, k=2, relative=True), [[1, 3], [2, 0]])


def test_pixel_maps_fold_the_pixel_components_back_into_the_image():
    maps = np.random.default_rng(1).uniform(size=(4, 3, 5, 2))  # (d, H, W, C)
    blocks = Blocks(shapes={"pixels_0": (3, 5), "pixels_1": (3, 5), "conv": (2, 2, 3)},
                    sources={"pixels_0": "pixels", "pixels_1": "pixels", "conv": "conv"},
                    channels={"pixels_0": 0, "pixels_1": 1, "conv": None}, pool=None)
    index = blocks.index_map("pixels_1")
    components = {"pixels_0": maps[..., 0].reshape(4, 15), "conv": np.ones((4, 12)),
                  # built column by column from the index map, not by the same reshape
                  "pixels_1": maps[:, index[:, 1], index[:, 2], 1]}
    np.testing.assert_array_equal(an.pixel_maps(components, blocks), maps)
    masks = an.pixel_masks(maps, quantile=0.8)
    assert masks.shape == (4, 3, 5)
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), [3, 3, 3, 3])  # 20 % of 15 pixels
    summed = maps.sum(axis=-1)
    assert np.all(summed[masks].min() >= 0) and all(
        summed[j][masks[j]].min() > summed[j][~masks[j]].max() for j in range(4))


def test_cosine_similarity_and_eigenvalues_match_numpy():
    rng = np.random.default_rng(2)
    w = rng.uniform(size=(5, 30))
    unit = w / np.linalg.norm(w, axis=1, keepdims=True)
    np.testing.assert_allclose(an.cosine_similarity(w), unit @ unit.T, rtol=1e-12)
    disjoint = np.kron(np.eye(5), np.ones((1, 6)))  # factors on disjoint neurons
    values = an.cosine_eigenvalues({"deep": disjoint, "shallow": np.ones((5, 30)), "w": w})
    np.testing.assert_allclose(values["deep"], np.ones(5), atol=1e-12)
    np.testing.assert_allclose(values["shallow"], [5, 0, 0, 0, 0], atol=1e-12)
    np.testing.assert_allclose(values["w"], np.sort(np.linalg.eigvalsh(unit @ unit.T))[::-1],
                               rtol=1e-10, atol=1e-12)
    assert list(an.cosine_eigenvalues({"a": w, "b": w}, names=["b"])) == ["b"]


def test_top_neurons_trace_back_to_channel_and_position():
    shape = (2, 3, 4)  # (h, w, c)
    index = index_map(shape)
    w = np.zeros((2, 24))
    w[0, 13], w[0, 2], w[1, 23] = 3.0, 2.0, 1.0
    columns, where, weights = an.top_neurons(w, index, k=2)
    np.testing.assert_array_equal(columns[0], [13, 2])
    np.testing.assert_array_equal(where[0], [[2, 0, 1], [0, 0, 2]])  # 13 = 2 * 6 + 0 * 3 + 1
    np.testing.assert_array_equal(where[1, 0], [3, 1, 2])
    np.testing.assert_allclose(weights[0], [3.0, 2.0])
    shared = np.array([[1.0, 0.5, 0.0], [1.0, 0.0, 0.2]])
    columns, _, _ = an.top_neurons(shared, index_map((3,)), k=1, by="share")
    np.testing.assert_array_equal(columns[:, 0], [1, 2])  # column 0 serves both factors


def test_neighbours_of_planted_clusters_share_their_label():
    rng = np.random.default_rng(3)
    labels = np.repeat(np.arange(4), 25)
    f = 0.05 * rng.uniform(size=(100, 4))
    f[np.arange(100), labels] += 1.0
    agreement, chance = an.knn_label_agreement(f, labels, k=5)
    assert agreement == 1.0
    np.testing.assert_allclose(chance, 4 * 25 * 24 / (100 * 99))
    shuffled, _ = an.knn_label_agreement(f, rng.permutation(labels), k=5)
    assert shuffled < 0.5
    indices, distances = an.nearest_neighbours(f, k=3, queries=np.array([0, 50]))
    assert indices.shape == (2, 3) and not np.any(indices == np.array([[0], [50]]))
    assert np.all(labels[indices] == labels[[0, 50]][:, None])
    assert np.all(np.diff(distances, axis=1) >= 0)


@pytest.mark.parametrize("metric", ["cosine", "euclidean"])
def test_nearest_neighbours_match_brute_force(metric):
    f = np.random.default_rng(4).uniform(size=(40, 3))
    indices, distances = an.nearest_neighbours(f, k=4, metric=metric)
    if metric == "cosine":
        unit = f / np.linalg.norm(f, axis=1, keepdims=True)
        full = 1 - unit @ unit.T
    else:
        full = np.linalg.norm(f[:, None] - f[None], axis=-1)
    np.fill_diagonal(full, np.inf)
    np.testing.assert_array_equal(indices, np.argsort(full, axis=1, kind="stable")[:, :4])
    np.testing.assert_allclose(distances, np.sort(full, axis=1)[:, :4], atol=1e-7)


def test_neighbour_factor_distribution_and_entropy():
    f = np.array([[2.0, 0.0], [0.0, 3.0], [1.0, 1.0], [4.0, 0.0]])
    distribution, entropy = an.neighbour_factors(f, np.array([[0, 3], [0, 1]]))
    np.testing.assert_allclose(distribution, [[1.0, 0.0], [0.5, 0.5]])
    np.testing.assert_allclose(entropy, [0.0, np.log(2)])


def test_rank_curve_falls_to_zero_at_the_planted_rank():
    _, _, xs = _planted(np.random.default_rng(5), n=60, d=3, sizes=(12, 8), scales=(1.0, 1.0))
    blocks = {"a": xs[0], "b": xs[1]}
    curve = an.rank_curve(blocks, [1, 2, 3], max_iter=2000, tol=1e-12, random_state=0)
    assert curve["error"].shape == (3,) and set(curve["block_errors"]) == {"a", "b"}
    assert curve["error"][0] > curve["error"][1] > 0.01 > 1e-5 > curve["error"][2]
    assert max(curve["block_errors"]["a"][2], curve["block_errors"]["b"][2]) < 1e-5
    assert an.suggest_rank({"ranks": [*curve["ranks"], 4], "error": [*curve["error"], 0.0]}) == 3
    assert an.suggest_rank({"ranks": [1, 2], "error": [0.5, 0.2]}) == 2


def test_on_the_demo_model_factors_follow_the_classes():
    """Pixels + pool2 + fc1 of the embedded CNN, 500 images: purity and kNN agreement.

    Measured (d = 10, seed 0): mean purity 0.67 (chance 0.1), kNN-in-F agreement 0.76
    (chance 0.098).
    """
    from xcraft.coupled import CoupledNMF
    from xcraft.datasets import load_demo_data, load_demo_model

    images, labels, _ = load_demo_data()
    subset = np.arange(0, 2000, 4)
    blocks = build_blocks(load_demo_model(), ["pool2", "fc1"], images[subset])
    fitted = CoupledNMF(10, random_state=0).fit(blocks)
    purity = an.factor_purity(fitted.examples_, labels[subset])
    agreement, chance = an.knn_label_agreement(fitted.examples_, labels[subset], k=10)
    assert purity.mean() > 0.5 and np.sum(purity > 0.6) >= 6  # chance: 0.1
    assert agreement > 0.65 and agreement > 6 * chance


@pytest.mark.parametrize(("call", "error", "message"), [
    (lambda: an.class_mass(np.ones((3, 2)), np.array([0, 1])), ValueError,
     r"`labels` must have shape \(3,\), one per example, got shape \(2,\)\."),
    (lambda: an.class_mass(np.ones((2, 2)), np.array([0.5, 1.0])), TypeError,
     r"`labels` must hold integer class indices, got dtype float64\."),
    (lambda: an.class_mass(-np.ones((2, 2)), np.array([0, 1])), ValueError,
     r"`examples` must be non-negative"),
    (lambda: an.top_examples(np.ones((3, 2)), k=4), ValueError, r"`k` must be <= 3, got 4\."),
    (lambda: an.nearest_neighbours(np.ones((3, 2)), k=1, metric="l1"), ValueError,
     r"`metric` must be one of 'cosine', 'euclidean', got 'l1'\."),
    (lambda: an.top_neurons(np.ones((2, 4)), np.zeros((3, 3)), k=1), ValueError,
     r"`index_map` must have shape \(4, 3\), one \(channel, y, x\) row per column"),
    (lambda: an.pixel_maps({}, {"a": 1}), TypeError,
     r"`blocks` must be the Blocks returned by build_blocks"),
    (lambda: an.rank_curve({"a": np.ones((3, 3))}, [2, 1]), ValueError,
     r"`ranks` must be increasing without repeats, got \[2, 1\]\."),
])
def test_bad_arguments(call, error, message):
    with pytest.raises(error, match=message):
        call()
