"""Concept importance: the batched engine against per-image loops, closed forms, planted heads."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import _synthetic
from xcraft.craft import importance
from xcraft.craft.importance import _head_functions, _masked_scores, _row_bytes, concept_importance
from xcraft.ops.sobol import SobolIndices, sobol_design

N_CONCEPTS, N_CHANNELS, N_CLASSES = 4, 6, 3


@pytest.fixture(scope="module")
def pooled_head():
    """(batch, 6) -> Dense(8, relu) -> Dense(3)."""
    keras.utils.set_random_seed(2)
    inputs = keras.Input((N_CHANNELS,))
    hidden = keras.layers.Dense(8, activation="relu", name="hidden")(inputs)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, name="logits")(hidden))


@pytest.fixture(scope="module")
def spatial_head():
    """(batch, 3, 3, 6) -> Conv1x1(5, relu) -> GAP -> Dense(3)."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((3, 3, N_CHANNELS))
    x = keras.layers.Conv2D(5, 1, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES, name="logits")(x))


def numpy_head(head, activations):
    """The fixtures' heads in float64 NumPy, written from their weights."""
    if activations.ndim == 2:
        (k1, b1), (k2, b2) = head.get_layer("hidden").get_weights(), head.get_layer(
            "logits").get_weights()
        return np.maximum(activations @ k1 + b1, 0.0) @ k2 + b2
    (k1, b1), (k2, b2) = head.get_layer("conv").get_weights(), head.get_layer(
        "logits").get_weights()
    hidden = np.maximum(activations @ k1[0, 0] + b1, 0.0)  # (n, 3, 3, 5)
    return hidden.mean(axis=(1, 2)) @ k2 + b2


def jansen_reference(y, dim, variance="pooled"):
    """Jansen's estimator for one image, with the pooled variance of [f(A), f(B)] or, as
    Xplique, the variance of f(A) alone."""
    y = y.reshape(dim + 2, -1)
    var = np.var(np.concatenate([y[0], y[1]]) if variance == "pooled" else y[0], ddof=1)
    return np.mean((y[0] - y[2:]) ** 2, axis=1) / (2.0 * var)


@pytest.fixture
def coefficients(rng):
    u = rng.uniform(0.0, 2.0, size=(5, N_CONCEPTS))
    w = rng.uniform(0.0, 1.0, size=(N_CONCEPTS, N_CHANNELS))
    u_spatial = rng.uniform(0.0, 2.0, size=(5, 3, 3, N_CONCEPTS))
    return u, w, u_spatial


# ("xplique", "a") is Xplique's CRAFT procedure: unscrambled Sobol' masks, variance of f(A).
@pytest.mark.parametrize(("sampler", "variance"), [("sobol", "pooled"), ("xplique", "a")])
@pytest.mark.parametrize("spatial", [False, True])
def test_engine_matches_per_image_loop(coefficients, pooled_head, spatial_head, spatial, sampler,
                                       variance):
    u, w, u_spatial = coefficients
    head, u = (spatial_head, u_spatial) if spatial else (pooled_head, u)
    nb_design, class_id = 16, 1
    masks = sobol_design(N_CONCEPTS, nb_design, sampler, random_state=0, dtype="float64")
    expected = []
    for coefficient in u:  # the reference loops over images, as Xplique does
        expand = (slice(None), None, None, slice(None)) if spatial else (slice(None),)
        perturbed = coefficient[None] * masks[expand]  # (m, [3, 3,] r)
        scores = numpy_head(head, perturbed @ w)[:, class_id]
        expected.append(jansen_reference(scores, N_CONCEPTS, variance))
    expected = np.array(expected)

    options = {"nb_design": nb_design, "sampler": sampler, "variance": variance,
               "random_state": 0}
    per_image = concept_importance(u, w, head, class_id, reduce=None, **options)
    assert per_image.shape == (5, N_CONCEPTS) and per_image.dtype == np.float64
    # The head runs in float32: indices agree to float32 rounding of the scores.
    np.testing.assert_allclose(per_image, expected, rtol=1e-4, atol=1e-6)
    mean = concept_importance(u, w, head, class_id, **options)
    np.testing.assert_allclose(mean, expected.mean(axis=0), rtol=1e-4, atol=1e-6)


def linear_head(w_head, bias):
    inputs = keras.Input((len(w_head),))
    dense = keras.layers.Dense(w_head.shape[1])
    outputs = dense(inputs)
    dense.set_weights([w_head, bias])
    return keras.Model(inputs, outputs)


def test_linear_head_closed_form(rng):
    # s(M) = b + sum_i M_i u_i beta_i with beta = W w_c and M_i ~ U[0, 1] independent:
    # Var s = sum_i (u_i beta_i)^2 / 12 and removing all but M_i leaves (u_i beta_i)^2 / 12, so
    # ST_i = (u_i beta_i)^2 / sum_j (u_j beta_j)^2 for each image.
    u = rng.uniform(0.5, 2.0, size=(4, N_CONCEPTS))
    w = rng.uniform(0.0, 1.0, size=(N_CONCEPTS, N_CHANNELS))
    w_head = rng.normal(size=(N_CHANNELS, 2))
    head = linear_head(w_head, np.array([0.3, -5.0]))
    contributions = (u * (w @ w_head[:, 1])) ** 2  # (n, r)
    expected = contributions / contributions.sum(axis=1, keepdims=True)
    st = concept_importance(u, w, head, 1, nb_design=2**10, reduce=None, random_state=0)
    np.testing.assert_allclose(st, expected, atol=0.01)  # QMC error of 2^10 designs


def test_spatial_linear_head_closed_form(rng):
    # With GAP then Dense, s(M) = b + sum_i M_i mean_loc(u_i) beta_i: the same closed form with
    # spatially averaged coefficients (the mask of concept i scales u_i at every location).
    u = rng.uniform(0.5, 2.0, size=(3, 2, 2, N_CONCEPTS))
    w = rng.uniform(0.0, 1.0, size=(N_CONCEPTS, N_CHANNELS))
    w_head = rng.normal(size=(N_CHANNELS, 1))
    inputs = keras.Input((2, 2, N_CHANNELS))
    dense = keras.layers.Dense(1)
    head = keras.Model(inputs, dense(keras.layers.GlobalAveragePooling2D()(inputs)))
    dense.set_weights([w_head, np.zeros(1)])
    contributions = (u.mean(axis=(1, 2)) * (w @ w_head[:, 0])) ** 2
    expected = contributions / contributions.sum(axis=1, keepdims=True)
    st = concept_importance(u, w, head, 0, nb_design=2**10, reduce=None, random_state=0)
    np.testing.assert_allclose(st, expected, atol=0.01)


def test_planted_head_uses_only_concept_zero(rng):
    # Concepts are channel directions; the head reads channel 0 (non-linearly) and a little of
    # channel 2, never channel 1.
    w = np.eye(3, N_CHANNELS)
    u = rng.uniform(0.5, 1.5, size=(8, 3))
    inputs = keras.Input((N_CHANNELS,))
    outputs = keras.layers.Lambda(
        lambda a: tf.stack([tf.tanh(3.0 * a[:, 0]) + 0.1 * a[:, 2], -a[:, 0]], axis=-1))(inputs)
    head = keras.Model(inputs, outputs)
    st = concept_importance(u, w, head, 0, nb_design=64, random_state=0)
    assert np.argmax(st) == 0 and st[0] > 0.9
    assert abs(st[1]) < 1e-6  # f(A) == f(C_1) exactly: the numerator is 0
    assert 0.0 < st[2] < 0.1


# A spatial row holds ~200 float32 values (coefficients, activations, head layers): 4000 bytes
# make chunks of 5 rows, which do not divide the 5 * 48 rows, so the last chunk is padded.
@pytest.mark.parametrize("budget", [{"batch_size": 7}, {"max_batch_bytes": 4000}])
def test_chunking_invariance(coefficients, spatial_head, budget):
    _, w, u = coefficients
    u = u.astype(np.float32)
    big = concept_importance(u, w, spatial_head, 2, nb_design=8, reduce=None, random_state=1)
    small = concept_importance(u, w, spatial_head, 2, nb_design=8, reduce=None, random_state=1,
                               **budget)
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-7)


def test_row_bytes_count_keras_layers_or_fall_back(spatial_head):
    u, w = tf.zeros((2, 3, 3, N_CONCEPTS)), tf.zeros((N_CONCEPTS, N_CHANNELS))
    # coefficients 9 * 4 + activations 9 * 6 + layers: input 54, conv 45, GAP 5, dense 3
    assert _row_bytes(u, w, spatial_head) == 4 * (36 + 54 + 54 + 45 + 5 + 3)
    assert _row_bytes(u, w, lambda a: a) == 4 * (36 + 54 + 16 * 54)
    assert _row_bytes(u, w, spatial_head, backward=True) == 3 * 4 * 197


def test_same_head_is_traced_once_per_chunk_size(coefficients, pooled_head):
    u, w, _ = coefficients
    concept_importance(u, w, pooled_head, 0, nb_design=8, batch_size=11, random_state=0)
    count = _head_functions(pooled_head).tracing_count()
    # A new class, new images and new masks reuse the same graph.
    concept_importance(u[:3], w, pooled_head, 2, nb_design=8, batch_size=11, random_state=5)
    concept_importance(u[1:], w, pooled_head, 1, nb_design=8, batch_size=11, random_state=6)
    assert _head_functions(pooled_head).tracing_count() == count


def test_determinism(coefficients, pooled_head):
    u, w, _ = coefficients
    first = concept_importance(u, w, pooled_head, 0, nb_design=8, random_state=3)
    np.testing.assert_array_equal(
        first, concept_importance(u, w, pooled_head, 0, nb_design=8,
                                  random_state=np.random.default_rng(3)))
    assert not np.allclose(first, concept_importance(u, w, pooled_head, 0, nb_design=8,
                                                     random_state=4))


def test_float32_by_default(coefficients, pooled_head):
    u, w, _ = coefficients
    st = concept_importance(u.astype(np.float32), w, pooled_head, 0, nb_design=8, random_state=0)
    assert st.dtype == np.float32 and st.shape == (N_CONCEPTS,)


def test_bootstrap_intervals(coefficients, pooled_head):
    u, w, _ = coefficients
    result = concept_importance(u, w, pooled_head, 0, nb_design=32, random_state=0,
                                n_bootstrap=200)
    assert isinstance(result, SobolIndices) and result.low.shape == (N_CONCEPTS,)
    assert np.all(result.low <= result.indices + 1e-12)
    assert np.all(result.indices <= result.high + 1e-12)
    np.testing.assert_array_equal(
        result.indices, concept_importance(u, w, pooled_head, 0, nb_design=32, random_state=0))
    per_image = concept_importance(u, w, pooled_head, 0, nb_design=32, random_state=0,
                                   n_bootstrap=20, reduce=None)
    assert per_image.low.shape == (5, N_CONCEPTS)


def test_constant_score_warns(coefficients, pooled_head):
    u, w, _ = coefficients
    u = u.copy()
    u[2] = 0.0  # every mask gives the activation 0: a constant score
    with pytest.warns(UserWarning, match=r"^The class score of 1 of 5 images did not vary"):
        st = concept_importance(u, w, pooled_head, 0, nb_design=8, reduce=None, random_state=0)
    np.testing.assert_array_equal(st[2], 0.0)


@pytest.mark.parametrize("spatial", [False, True])
def test_tcav_matches_finite_differences(coefficients, pooled_head, spatial_head, spatial):
    u, w, u_spatial = coefficients
    head, u = (spatial_head, u_spatial) if spatial else (pooled_head, u)
    derivatives = concept_importance(u, w, head, 2, method="tcav", reduce=None, batch_size=2)
    assert derivatives.shape == (5, N_CONCEPTS)
    # The direction W_i / ||W_i|| is added at every location of the reconstructed activations.
    step = 1e-4
    a = u @ w  # (n, [3, 3,] p)
    directions = w / np.linalg.norm(w, axis=1, keepdims=True)
    expected = np.stack([
        (numpy_head(head, a + step * d)[:, 2] - numpy_head(head, a - step * d)[:, 2]) / (2 * step)
        for d in directions], axis=1)
    np.testing.assert_allclose(derivatives, expected, rtol=1e-3, atol=1e-4)
    mean = concept_importance(u, w, head, 2, method="tcav")
    np.testing.assert_allclose(mean, expected.mean(axis=0), rtol=1e-3, atol=1e-4)


@pytest.mark.parametrize("spatial", [False, True])
def test_occlusion_matches_per_image_loop(coefficients, pooled_head, spatial_head, spatial):
    u, w, u_spatial = coefficients
    head, u = (spatial_head, u_spatial) if spatial else (pooled_head, u)
    base = numpy_head(head, u @ w)[:, 0]
    expected = np.stack([base - numpy_head(head, (u * (np.arange(N_CONCEPTS) != i)) @ w)[:, 0]
                         for i in range(N_CONCEPTS)], axis=1)
    drops = concept_importance(u, w, head, 0, method="occlusion", reduce=None, batch_size=3)
    np.testing.assert_allclose(drops, expected, rtol=1e-4, atol=1e-5)


def test_verbose_shows_progress(coefficients, pooled_head, capsys):
    u, w, _ = coefficients
    concept_importance(u, w, pooled_head, 0, nb_design=8, batch_size=50, verbose=True,
                       random_state=0)
    assert "sobol" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"u": np.ones((2, 3, 4, 5, 6))}, ValueError,
         r"^`u` must have shape \(n, n_concepts\), \(n, tokens, n_concepts\) or \(n, height, "
         r"width, n_concepts\), got shape \(2, 3, 4, 5, 6\)\.$"),
        ({"u": np.ones((2, 3))}, ValueError,
         r"^`concept_bank` must have shape \(n_concepts, n_channels\) with n_concepts = 3 \(the "
         r"last axis of `u`\), got shape \(4, 6\)\.$"),
        ({"u": np.full((2, 4), np.nan)}, ValueError, r"^`u` must be finite"),
        ({"class_id": 3}, ValueError,
         r"^`class_id` must index a column of the head's logits \(0 <= class_id < n_classes\), "
         r"got 3\.$"),
        ({"class_id": -1}, ValueError, r"^`class_id` must be >= 0, got -1\.$"),
        ({"method": "lime"}, ValueError, r"^`method` must be one of 'sobol', 'tcav', 'occlusion'"),
        ({"reduce": "sum"}, ValueError, r"^`reduce` must be 'mean' or None, got 'sum'\.$"),
        ({"nb_design": 1}, ValueError, r"^`nb_design` must be >= 2"),
        ({"sampler": "grid"}, ValueError, r"^`sampler` must be one of"),
        ({"max_batch_bytes": 0}, ValueError, r"^`max_batch_bytes` must be >= 1, got 0\.$"),
        ({"method": "tcav", "n_bootstrap": 5}, ValueError,
         r"^`n_bootstrap` must be 0 unless method='sobol', got 5 with method='tcav'\.$"),
        ({"head": "model"}, TypeError, r"^`head` must be a callable .*, got str\.$"),
        ({"head": lambda a: tf.reduce_sum(a, axis=1)}, ValueError,
         r"^`head` must return logits of shape \(batch, n_classes\), got shape \(\d+,\)\.$"),
    ],
)
def test_bad_inputs(coefficients, pooled_head, kwargs, error, match):
    u, w, _ = coefficients
    arguments = {"u": u, "concept_bank": w, "head": pooled_head, "class_id": 0, "nb_design": 4,
                 **kwargs}
    with pytest.raises(error, match=match):
        concept_importance(**arguments)


def test_plot_concepts_importances(coefficients, pooled_head):
    import matplotlib.pyplot as plt

    from xcraft.viz.plots import plot_concepts_importances

    u, w, _ = coefficients
    result = concept_importance(u, w, pooled_head, 0, nb_design=16, random_state=0,
                                n_bootstrap=20)
    figure = plot_concepts_importances(result, concept_names=list("abcd"), top_k=3)
    ax = figure.axes[0]
    top_down = np.argsort(-ax.get_yticks())  # the most important bar is drawn at the top
    labels = [ax.get_yticklabels()[i].get_text() for i in top_down]
    assert labels == [list("abcd")[i] for i in np.argsort(-result.indices)[:3]]
    widths = sorted(patch.get_width() for patch in ax.patches)
    np.testing.assert_allclose(widths, np.sort(result.indices)[-3:], rtol=1e-6)
    with pytest.raises(ValueError, match=r"^`intervals` must have shape \(2, 4\)"):
        plot_concepts_importances(result.indices, intervals=np.zeros((4,)))
    with pytest.raises(ValueError, match=r"^`concept_names` must have one name per concept"):
        plot_concepts_importances(result.indices, concept_names=["a"])
    plt.close("all")


# ---------------------------------------------------------------------------------------------
# Folding the head's leading affine layers
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def folding_heads(pooled_head):
    """Heads whose leading affine layers fold: name -> (head, spatial)."""
    keras.utils.set_random_seed(4)
    inputs = keras.Input((3, 3, N_CHANNELS))
    x = _synthetic.trained_batch_norm((3, 3, N_CHANNELS), 1)(inputs)
    x = keras.layers.GlobalAveragePooling2D()(x)
    x = keras.layers.Dense(8, activation="relu")(x)
    x = keras.layers.Dropout(0.5)(x)
    bn_gap = keras.Model(inputs, keras.layers.Dense(N_CLASSES)(x))
    flatten = keras.Sequential([
        keras.Input((3, 3, N_CHANNELS)), keras.layers.Flatten(),
        keras.layers.Dense(8, activation="relu"), keras.layers.Dense(N_CLASSES)])
    softmax = keras.Sequential([
        keras.Input((N_CHANNELS,)), keras.layers.Dropout(0.2),
        keras.layers.Dense(N_CLASSES, activation="softmax")])
    return {"pooled_functional_relu": (pooled_head, False),
            "pooled_sequential_softmax": (softmax, False),
            "spatial_bn_gap": (bn_gap, True),
            "spatial_sequential_flatten": (flatten, True)}


def reference_scores(head, u, w, masks, class_id):
    """Logit and probability of ``class_id`` for every (image, mask), by calling the head on
    the rebuilt activations (n m, [h, w,] p) at once."""
    expand = masks[None, :, None, None, :] if u.ndim == 4 else masks[None]
    activations = (u[:, None] * expand) @ w  # (n, m, [h, w,] p)
    logits = np.asarray(head(activations.reshape(-1, *activations.shape[2:]).astype(np.float32)),
                        np.float64).reshape(len(u), len(masks), -1)  # (n, m, classes)
    proba = np.exp(logits - logits.max(-1, keepdims=True))
    proba /= proba.sum(-1, keepdims=True)
    return np.stack([logits[..., class_id], proba[..., class_id]], axis=-1)  # (n, m, 2)


def was_folded(head):
    return any(key[0] == "folded_scores" for key in _head_functions(head)._compiled)


@pytest.fixture
def fold_calls(monkeypatch):
    """The number of calls that took the folded path, counted as they happen."""
    calls = []
    folded = importance._folded_masked_scores

    def counted(*args, **kwargs):
        calls.append(1)
        return folded(*args, **kwargs)

    monkeypatch.setattr(importance, "_folded_masked_scores", counted)
    return calls


@pytest.mark.parametrize("probability", [False, True])
@pytest.mark.parametrize("name", ["pooled_functional_relu", "pooled_sequential_softmax",
                                  "spatial_bn_gap", "spatial_sequential_flatten"])
def test_folded_scores_match_plain_and_reference(coefficients, folding_heads, name, probability,
                                                fold_calls):
    u, w, u_spatial = coefficients  # float64 coefficients, float32 heads
    head, spatial = folding_heads[name]
    u = u_spatial if spatial else u
    masks = sobol_design(N_CONCEPTS, 8, "sobol", random_state=0, dtype="float64")  # (48, r)
    expected = reference_scores(head, u, w, masks, 1)
    options = {"max_batch_bytes": 2**28, "batch_size": None, "probability": probability}
    u_tensor, w_tensor = tf.constant(u), tf.constant(w)
    plain = _masked_scores(u_tensor, w_tensor, head, 1, masks, fold_head=False, **options)
    assert not fold_calls
    folded = _masked_scores(u_tensor, w_tensor, head, 1, masks, **options)
    assert len(fold_calls) == 1
    assert folded.dtype == tf.float64 and folded.shape == plain.shape
    expected = expected if probability else expected[..., 0]
    # float32 heads: both engines agree with the float32 reference to rounding.
    np.testing.assert_allclose(plain.numpy(), expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(folded.numpy(), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["sobol", "occlusion"])
@pytest.mark.parametrize("name", ["pooled_sequential_softmax", "spatial_bn_gap"])
def test_folded_importance_matches_plain(coefficients, folding_heads, name, method, fold_calls):
    u, w, u_spatial = coefficients
    head, spatial = folding_heads[name]
    u = (u_spatial if spatial else u).astype(np.float32)
    options = {"method": method, "nb_design": 16, "reduce": None, "random_state": 0}
    plain = concept_importance(u, w, head, 2, fold_head=False, **options)
    assert not fold_calls
    folded = concept_importance(u, w, head, 2, **options)
    assert len(fold_calls) == 1 and folded.dtype == np.float32
    np.testing.assert_allclose(folded, plain, rtol=1e-4, atol=1e-5)


# 48 masks: batch_size 7 gives blocks of 1 image x 7 masks (the last padded); 101 gives 2 images
# x 48 masks (5 images: the last block padded); 300 bytes give image blocks of 2 (3 blocks) and
# one-row basis chunks.
@pytest.mark.parametrize("budget", [{"batch_size": 7}, {"batch_size": 101},
                                    {"max_batch_bytes": 300}])
def test_folded_chunking_invariance(coefficients, folding_heads, budget, fold_calls):
    _, w, u = coefficients
    head, _ = folding_heads["spatial_bn_gap"]
    u = u.astype(np.float32)
    big = concept_importance(u, w, head, 0, nb_design=8, reduce=None, random_state=1)
    small = concept_importance(u, w, head, 0, nb_design=8, reduce=None, random_state=1,
                               **budget)
    assert len(fold_calls) == 2
    np.testing.assert_allclose(small, big, rtol=1e-5, atol=1e-7)


def test_folded_path_traces_once_across_classes(coefficients, folding_heads, fold_calls):
    _, w, u = coefficients
    head, _ = folding_heads["spatial_sequential_flatten"]
    concept_importance(u, w, head, 0, nb_design=8, random_state=0)
    count = _head_functions(head).tracing_count()
    # A new class, new coefficients and new masks (as many) reuse the same graphs.
    concept_importance(u * 0.5, w, head, 2, nb_design=8, random_state=5)
    concept_importance(u, w * 2.0, head, 1, nb_design=8, random_state=6)
    assert _head_functions(head).tracing_count() == count and len(fold_calls) == 3


def branching_head():
    keras.utils.set_random_seed(5)
    inputs = keras.Input((N_CHANNELS,))
    hidden = keras.layers.Add()([keras.layers.Dense(4)(inputs), keras.layers.Dense(4)(inputs)])
    return keras.Model(inputs, keras.layers.Dense(N_CLASSES)(keras.layers.ReLU()(hidden)))


class SquaringDense(keras.layers.Dense):
    """Not affine: a fold that treated it as a Dense would be wrong."""

    def call(self, inputs, training=None):
        return super().call(inputs * inputs)


def subclass_head():
    keras.utils.set_random_seed(6)
    return keras.Sequential([keras.Input((N_CHANNELS,)), SquaringDense(N_CLASSES)])


def callable_head():
    kernel = tf.constant(np.random.default_rng(7).normal(size=(N_CHANNELS, N_CLASSES)),
                         tf.float32)
    return lambda a: tf.tanh(tf.matmul(tf.cast(a, tf.float32), kernel))


@pytest.mark.parametrize("name", ["conv_first", "branching", "dense_subclass", "callable"])
def test_heads_that_do_not_fold_use_the_plain_engine(coefficients, spatial_head, name,
                                                     fold_calls):
    u, w, u_spatial = coefficients
    head = {"conv_first": lambda: spatial_head, "branching": branching_head,
            "dense_subclass": subclass_head, "callable": callable_head}[name]()
    u = u_spatial if name == "conv_first" else u
    masks = sobol_design(N_CONCEPTS, 8, "sobol", random_state=0, dtype="float64")
    scores = _masked_scores(tf.constant(u), tf.constant(w), head, 2, masks,
                            max_batch_bytes=2**28, batch_size=None, probability=True)
    assert _head_functions(head).folded() is None and not fold_calls
    np.testing.assert_allclose(scores.numpy(), reference_scores(head, u, w, masks, 2),
                               rtol=1e-5, atol=1e-5)


def test_folded_head_with_bad_logits_raises(coefficients):
    _, w, u = coefficients
    head = keras.Sequential([keras.Input((3, 3, N_CHANNELS)), keras.layers.Dense(N_CLASSES)])
    with pytest.raises(ValueError, match=r"^`head` must return logits of shape \(batch, "
                                         r"n_classes\), got shape \(\d+, 3, 3, 3\)\.$"):
        concept_importance(u, w, head, 0, nb_design=4)
    assert _head_functions(head).folded() is not None
    with pytest.raises(ValueError, match=r"^`head` must return logits of shape"):
        concept_importance(u, w, head, 0, nb_design=4, fold_head=False)


def test_folded_head_is_released(coefficients):
    import gc
    import weakref

    u, w, _ = coefficients
    inputs = keras.Input((N_CHANNELS,))
    head = keras.Model(inputs, keras.layers.Dense(N_CLASSES)(inputs))
    concept_importance(u, w, head, 0, nb_design=4, random_state=0)
    assert was_folded(head)
    reference = weakref.ref(head)
    del head
    gc.collect()
    assert reference() is None  # the cache keeps neither the head nor its layers' owner alive


def test_total_indices_above_one_are_clipped_with_a_warning():
    from xcraft.craft.importance import clip_total_indices

    raw = np.array([1.02, 0.3, -0.0])
    intervals = np.array([[0.95, 0.2, -0.01], [1.1, 0.4, 0.02]])
    with pytest.warns(UserWarning, match=r"1 total Sobol index estimate\(s\) exceed 1 \(up to "
                                         r"1\.020\): estimator noise.*designs \(more than 16\)"):
        clipped, bounds = clip_total_indices(raw, intervals, 16)
    np.testing.assert_array_equal(clipped, [1.0, 0.3, 0.0])
    # The interval keeps its width above 1 (clipped, [1.0, 1.0] claimed a certainty); only
    # the impossible negative side is clipped.
    np.testing.assert_array_equal(bounds, [[0.95, 0.2, 0.0], [1.1, 0.4, 0.02]])


def test_an_interval_wholly_above_one_keeps_its_width():
    from xcraft.craft.importance import clip_total_indices

    with pytest.warns(UserWarning, match="interval, if any, as estimated"):
        clipped, bounds = clip_total_indices(np.array([1.2, 0.1]),
                                             np.array([[1.05, 0.05], [1.3, 0.2]]))
    np.testing.assert_array_equal(clipped, [1.0, 0.1])
    assert bounds[1, 0] - bounds[0, 0] == pytest.approx(0.25)


def test_total_indices_within_bounds_pass_unchanged():
    import warnings

    from xcraft.craft.importance import clip_total_indices

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        clipped, bounds = clip_total_indices(np.array([0.9, 0.1]), None)
    np.testing.assert_array_equal(clipped, [0.9, 0.1]) and bounds is None
