"""Deletion / insertion curves: endpoints, exact curves of a linear head, order quality."""

import keras
import numpy as np
import pytest

from xcraft.craft.fidelity import FidelityCurves, concept_deletion_insertion
from xcraft.craft.importance import concept_importance

N_CONCEPTS, N_CHANNELS = 5, 7


def softmax(logits):
    z = np.exp(logits - logits.max(axis=-1, keepdims=True))
    return z / z.sum(axis=-1, keepdims=True)


@pytest.fixture(scope="module")
def mlp_head():
    keras.utils.set_random_seed(4)
    inputs = keras.Input((N_CHANNELS,))
    hidden = keras.layers.Dense(8, activation="relu")(inputs)
    return keras.Model(inputs, keras.layers.Dense(3)(hidden))


@pytest.fixture(scope="module")
def spatial_head():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((2, 2, N_CHANNELS))
    x = keras.layers.Conv2D(4, 1, activation="relu")(inputs)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(3)(x))


@pytest.fixture
def linear_setting(rng):
    """A linear head whose per-concept contributions u_i (W_i . w_c) are known and distinct."""
    u = rng.uniform(0.5, 1.5, size=(6, N_CONCEPTS))
    w = np.eye(N_CONCEPTS, N_CHANNELS)  # concept i is channel i
    w_class = np.array([0.2, 3.0, -1.0, 1.5, 0.6, 0.0, 0.0])
    kernel = np.stack([w_class, -w_class], axis=1)  # (p, 2)
    bias = np.array([0.5, 0.0])
    inputs = keras.Input((N_CHANNELS,))
    dense = keras.layers.Dense(2)
    head = keras.Model(inputs, dense(inputs))
    dense.set_weights([kernel, bias])
    contributions = (u * (w @ w_class)).mean(axis=0)  # (r,): mean over images
    return u, w, head, bias[0], contributions


@pytest.mark.parametrize("spatial", [False, True])
def test_curve_endpoints(rng, mlp_head, spatial_head, spatial):
    shape = (4, 2, 2, N_CONCEPTS) if spatial else (4, N_CONCEPTS)
    u = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
    w = rng.uniform(0.0, 1.0, size=(N_CONCEPTS, N_CHANNELS)).astype(np.float32)
    head = spatial_head if spatial else mlp_head
    result = concept_deletion_insertion(u, w, head, 1, {"given": np.arange(N_CONCEPTS)},
                                        n_random=3, random_state=0)
    full = head(u @ w).numpy()  # (n, 3)
    empty = head(np.zeros_like(u @ w)).numpy()
    for name in ("given", "random"):
        for kind, first, last in [("deletion", full, empty), ("insertion", empty, full)]:
            np.testing.assert_allclose(result.curves[kind][name][0], first[:, 1].mean(),
                                       rtol=1e-5)
            np.testing.assert_allclose(result.curves[kind][name][-1], last[:, 1].mean(),
                                       rtol=1e-5)
            np.testing.assert_allclose(result.curves[kind + "_proba"][name][[0, -1]],
                                       [softmax(first)[:, 1].mean(), softmax(last)[:, 1].mean()],
                                       rtol=1e-5)
    np.testing.assert_allclose(result.fractions, np.linspace(0.0, 1.0, N_CONCEPTS + 1))


def test_linear_head_exact_curves(linear_setting):
    # Deleting the set S leaves b + sum_{i not in S} c_i; inserting it gives b + sum_{i in S} c_i.
    u, w, head, bias, contributions = linear_setting
    order = np.array([3, 0, 4, 1, 2])
    result = concept_deletion_insertion(u, w, head, 0, {"order": order}, n_random=0)
    kept_after_deletion = np.array([contributions[order[k:]].sum() for k in range(6)])
    inserted = np.array([contributions[order[:k]].sum() for k in range(6)])
    np.testing.assert_allclose(result.curves["deletion"]["order"], bias + kept_after_deletion,
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(result.curves["insertion"]["order"], bias + inserted,
                               rtol=1e-5, atol=1e-6)
    expected_auc = np.sum((kept_after_deletion[1:] + kept_after_deletion[:-1]) / 2) / 5 + bias
    np.testing.assert_allclose(result.aucs["deletion"]["order"], expected_auc, rtol=1e-5)
    assert result.random_std == {} and "random" not in result.curves["deletion"]


def test_true_contribution_order_is_best_and_sobol_beats_random(linear_setting):
    u, w, head, _, contributions = linear_setting
    sobol = concept_importance(u, w, head, 0, nb_design=64, random_state=0)
    tcav = concept_importance(u, w, head, 0, method="tcav")
    orders = {
        "truth": contributions,  # importances: sorted in decreasing order
        "sobol": sobol,
        "tcav": tcav,
        "reversed": np.argsort(contributions).astype(int),
        "index": np.arange(N_CONCEPTS),
    }
    result = concept_deletion_insertion(u, w, head, 0, orders, n_random=20, random_state=0)
    deletion, insertion = result.aucs["deletion"], result.aucs["insertion"]
    # Removing the largest contributions first minimises every partial sum: the lowest curve.
    assert deletion["truth"] == min(deletion.values())
    assert insertion["truth"] == max(insertion.values())
    assert deletion["sobol"] <= deletion["random"]
    assert insertion["sobol"] >= insertion["random"]
    assert deletion["reversed"] == max(deletion.values())
    assert result.orders["random"].shape == (20, N_CONCEPTS)
    np.testing.assert_array_equal(result.orders["truth"], np.argsort(-contributions))


def test_importances_and_permutations_agree(linear_setting):
    u, w, head, _, _ = linear_setting
    importances = np.array([0.1, 0.5, 0.05, 0.3, 0.2])
    result = concept_deletion_insertion(
        u, w, head, 0, {"importances": importances, "indices": np.array([1, 3, 4, 0, 2])},
        n_random=0)
    for kind in result.curves:
        np.testing.assert_array_equal(result.curves[kind]["importances"],
                                      result.curves[kind]["indices"])


def test_random_orders_are_seeded(linear_setting):
    u, w, head, _, _ = linear_setting
    first = concept_deletion_insertion(u, w, head, 0, {}, n_random=4, random_state=1)
    second = concept_deletion_insertion(u, w, head, 0, {}, n_random=4,
                                        random_state=np.random.default_rng(1))
    assert isinstance(first, FidelityCurves)
    np.testing.assert_array_equal(first.orders["random"], second.orders["random"])
    np.testing.assert_array_equal(first.curves["deletion"]["random"],
                                  second.curves["deletion"]["random"])
    assert first.random_std["deletion"].shape == (N_CONCEPTS + 1,)


def test_batch_size_invariance(linear_setting):
    u, w, head, _, _ = linear_setting
    whole = concept_deletion_insertion(u, w, head, 1, {"a": np.arange(5)}, n_random=2,
                                       random_state=0)
    chunked = concept_deletion_insertion(u, w, head, 1, {"a": np.arange(5)}, n_random=2,
                                         random_state=0, batch_size=7)
    for kind in whole.curves:
        for name in whole.curves[kind]:
            np.testing.assert_allclose(chunked.curves[kind][name], whole.curves[kind][name],
                                       rtol=1e-6)


@pytest.mark.parametrize(
    ("orders", "kwargs", "error", "match"),
    [
        ([0, 1, 2, 3, 4], {}, TypeError, r"^`orders` must be a dict mapping names"),
        ({}, {"n_random": 0}, ValueError,
         r"^`orders` must hold at least one order when `n_random` is 0, got an empty dict\.$"),
        ({"a": [0, 1, 2]}, {}, ValueError,
         r"^`orders\['a'\]` must have shape \(5,\) \(one entry per concept\), got shape \(3,\)\.$"),
        ({"a": [0, 1, 1, 3, 4]}, {}, ValueError,
         r"^`orders\['a'\]` must be a permutation of the concept indices 0 \.\. 4"),
        ({"random": [0, 1, 2, 3, 4]}, {}, ValueError,
         r"^`orders` must not use the name 'random', reserved for the 10 random orders"),
        ({"a": ["x"] * 5}, {}, TypeError, r"^`orders\['a'\]` must hold concept indices"),
        ({"a": [0.1, np.nan, 0, 0, 0]}, {}, ValueError, r"^`orders\['a'\]` must be finite"),
        ({1: [0, 1, 2, 3, 4]}, {}, TypeError, r"^`orders` keys must be str, got int 1\.$"),
        ({"a": [0, 1, 2, 3, 4]}, {"n_random": -1}, ValueError,
         r"^`n_random` must be >= 0, got -1\.$"),
        ({"a": [0, 1, 2, 3, 4]}, {"class_id": 2}, ValueError, r"^`class_id` must index a column"),
    ],
)
def test_bad_inputs(linear_setting, orders, kwargs, error, match):
    u, w, head, _, _ = linear_setting
    arguments = {"class_id": 0, **kwargs}
    with pytest.raises(error, match=match):
        concept_deletion_insertion(u, w, head, orders=orders, **arguments)


def test_plot_fidelity_curves(linear_setting):
    import matplotlib.pyplot as plt

    from xcraft.viz.plots import plot_fidelity_curves

    u, w, head, _, _ = linear_setting
    result = concept_deletion_insertion(u, w, head, 0, {"a": np.arange(5)}, n_random=3,
                                        random_state=0)
    figure = plot_fidelity_curves(result)
    assert len(figure.axes) == 2
    deletion_lines = figure.axes[0].get_lines()
    np.testing.assert_allclose(deletion_lines[0].get_ydata(), result.curves["deletion"]["a"])
    assert "AUC" in figure.axes[0].get_legend().get_texts()[0].get_text()
    figure = plot_fidelity_curves(result, score="proba", kinds="insertion", names=["a"])
    assert len(figure.axes) == 1
    with pytest.raises(ValueError, match=r"^`score` must be one of 'logit', 'proba', got 'x'\.$"):
        plot_fidelity_curves(result, score="x")
    plt.close("all")
