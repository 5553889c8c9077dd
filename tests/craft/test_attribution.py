"""Concept models and concept attribution maps, through the implicit NNLS gradient."""

import gc
import weakref

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import _synthetic
from xcraft.craft import attribution
from xcraft.craft.attribution import build_concept_model, concept_attribution_maps
from xcraft.ops.nnls import solve_nnls


@pytest.fixture(scope="module")
def cnn():
    """A tiny functional feature extractor 16x16x3 -> (6, 6, 6) and a 4-concept bank."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(6, 3, strides=2, activation="relu", name="conv2")(x)
    bank = np.random.default_rng(3).uniform(size=(4, 6))
    return keras.Model(inputs, x, name="g"), bank


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(4).uniform(size=(5, 16, 16, 3)).astype(np.float32)


@pytest.mark.parametrize(
    "concept_id, spatial, shape",
    [(1, False, (5, 1)), ([2, 0], False, (5, 2)), (None, False, (5, 4)), (3, True, (5, 6, 6, 1)),
     (None, True, (5, 6, 6, 4))],
)
def test_concept_model_outputs(cnn, images, concept_id, spatial, shape):
    g, bank = cnn
    model = build_concept_model(g, bank, concept_id, spatial=spatial)
    output = model(images).numpy()
    assert output.shape == shape
    coefficients = solve_nnls(g(images), bank).numpy()  # (5, 6, 6, 4)
    ids = list(range(4)) if concept_id is None else np.atleast_1d(concept_id)
    expected = coefficients[..., ids]
    expected = expected if spatial else expected.mean(axis=(1, 2))
    np.testing.assert_allclose(output, expected, rtol=1e-5, atol=1e-7)


def test_concept_model_exposes_the_feature_extractor_layers(cnn):
    g, bank = cnn
    model = build_concept_model(g, bank, 0)
    assert model.get_layer("conv2") is g.get_layer("conv2")
    # Grad-CAM explainers rebuild a model from the conv layer's output: it must be connected.
    probe = keras.Model(model.input, [model.get_layer("conv2").output, model.output])
    assert probe(np.zeros((1, 16, 16, 3), np.float32))[1].shape == (1, 1)


def test_concept_model_of_sequential_and_subclassed_extractors(cnn, images):
    g, bank = cnn
    sequential = keras.Sequential([keras.Input((16, 16, 3)), g.get_layer("conv1"),
                                   g.get_layer("conv2")])
    model = build_concept_model(sequential, bank, [0, 1])
    assert model.get_layer("conv1") is g.get_layer("conv1")

    class Extractor(keras.Model):
        def call(self, x):
            return g(x)

    subclassed = Extractor()
    subclassed(images[:1])
    with pytest.raises(ValueError, match=r"`feature_extractor` must be a built Keras model"):
        build_concept_model(subclassed, bank)
    expected = build_concept_model(g, bank, [0, 1])(images).numpy()
    np.testing.assert_allclose(model(images).numpy(), expected, rtol=1e-6)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")  # Keras' own np.array(copy=False)
def test_concept_model_survives_save_and_load(cnn, images, tmp_path):
    g, bank = cnn
    model = build_concept_model(g, bank, [1, 2])
    model.save(tmp_path / "concepts.keras")
    loaded = keras.models.load_model(tmp_path / "concepts.keras")
    np.testing.assert_array_equal(loaded(images).numpy(), model(images).numpy())


def test_concept_model_gradient_matches_finite_differences():
    # float64 end to end: conv/relu -> per-location NNLS (implicit gradient) -> spatial mean.
    rng = np.random.default_rng(5)
    inputs = keras.Input((5, 5, 2), dtype="float64")
    conv = keras.layers.Conv2D(5, 3, activation="relu", dtype="float64", name="conv")
    g = keras.Model(inputs, conv(inputs))
    conv.set_weights([rng.normal(size=(3, 3, 2, 5)), np.full(5, 0.3)])
    bank = rng.uniform(size=(3, 5))
    x = tf.constant(rng.uniform(size=(1, 5, 5, 2)))
    # Precondition: strict complementarity at every location that is not entirely switched off
    # by the ReLU (those stay at zero under small perturbations), so the gradient is defined.
    activations = g(x).numpy().reshape(-1, 5)
    activations = activations[activations.max(axis=1) > 0]
    u = solve_nnls(activations, bank).numpy()
    multipliers = u @ bank @ bank.T - activations @ bank.T
    assert np.min(np.where(u > 0, u, multipliers)) > 1e-3
    kernel, bias = conv.get_weights()
    pre_activations = tf.nn.conv2d(x, kernel, 1, "VALID") + bias
    assert np.min(np.abs(pre_activations)) > 1e-4  # no ReLU kink within the finite differences
    model = tf.function(build_concept_model(g, bank))
    theoretical, numerical = tf.test.compute_gradient(model, [x], delta=1e-6)
    error = np.abs(theoretical[0] - numerical[0]).max() / np.abs(numerical[0]).max()
    assert error <= 1e-5


def test_gradcam_equals_the_tape_gradcam_of_the_concept_model(cnn, images):
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, concept_ids=[2, 0], method="gradcam")
    assert maps.shape == (5, 2, 16, 16)
    # The reference differentiates the concept model with a tape (the custom gradient), one
    # concept at a time; ours solves all concepts' cotangents in one batched solve.
    for column, expected in enumerate(_tape_gradcam(g, bank, [2, 0], "conv2", images)):
        np.testing.assert_allclose(maps[:, column], expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())


def _tape_gradcam(g, bank, ids, layer, images):
    """Grad-CAM of each concept's score at ``layer``, by a tape through the concept model."""
    model = build_concept_model(g, bank, ids)
    probe = keras.Model(model.input, [model.get_layer(layer).output, model.output])
    with tf.GradientTape(persistent=True) as tape:
        activations, scores = probe(images)
        per_concept = [tf.reduce_sum(scores[:, k]) for k in range(len(ids))]
    for score in per_concept:
        weights = tf.reduce_mean(tape.gradient(score, activations), axis=(1, 2), keepdims=True)
        cam = tf.nn.relu(tf.reduce_sum(weights * activations, axis=-1))[..., None]
        yield tf.image.resize(cam, images.shape[1:3])[..., 0].numpy()


def test_saliency_equals_the_input_gradient(cnn, images):
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, concept_ids=[1, 3], method="saliency",
                                     batch_size=2)
    model = build_concept_model(g, bank, [1, 3])
    x = tf.constant(images)
    for column in range(2):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(model(x)[:, column])
        expected = tf.reduce_max(tf.abs(tape.gradient(score, x)), axis=-1).numpy()
        np.testing.assert_allclose(maps[:, column], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())


def test_gradient_input_equals_the_input_times_its_gradient(cnn, images):
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, concept_ids=[3, 1],
                                     method="gradient_input", batch_size=3)
    model = build_concept_model(g, bank, [3, 1])
    x = tf.constant(images)
    for column in range(2):
        with tf.GradientTape() as tape:
            tape.watch(x)
            score = tf.reduce_sum(model(x)[:, column])
        expected = tf.nn.relu(tf.reduce_sum(tape.gradient(score, x) * x, axis=-1)).numpy()
        assert expected.max() > 0
        np.testing.assert_allclose(maps[:, column], expected, rtol=1e-4,
                                   atol=1e-5 * np.abs(expected).max())


def test_gradcam_at_an_earlier_layer_equals_the_tape_gradcam_there(cnn, images):
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, concept_ids=[0, 2], method="gradcam",
                                     gradcam_layer="conv1")
    # Reference: the concept model's score differentiated by a tape with respect to conv1's
    # output (a finer 14 x 14 grid than conv2's 6 x 6).
    for column, expected in enumerate(_tape_gradcam(g, bank, [0, 2], "conv1", images)):
        assert expected.max() > 0
        np.testing.assert_allclose(maps[:, column], expected, rtol=1e-4,
                                   atol=1e-4 * np.abs(expected).max())
    at_output = concept_attribution_maps(images, g, bank, concept_ids=[0, 2], method="gradcam")
    assert np.abs(maps - at_output).max() > 1e-3  # a different layer gives a different map


def test_gradcam_layer_errors_name_the_option(cnn, images):
    g, bank = cnn
    with pytest.raises(ValueError, match=r"`gradcam_layer` applies to `method='gradcam'` only"):
        concept_attribution_maps(images, g, bank, method="saliency", gradcam_layer="conv1")
    with pytest.raises(ValueError, match=r"`gradcam_layer='pool9'`: "):
        concept_attribution_maps(images, g, bank, method="gradcam", gradcam_layer="pool9")


def test_repeated_calls_reuse_one_trace_and_see_the_new_bank(cnn, images):
    # The traced step is cached per feature extractor; bank and ids are its arguments, so a
    # second bank must give its own maps (not the first one's) without tracing again.
    g, bank = cnn
    other = np.random.default_rng(8).uniform(size=bank.shape)
    first = concept_attribution_maps(images, g, bank, concept_ids=[0, 1], batch_size=5,
                                     method="gradcam")
    step = attribution._attribution_step(g, "gradcam", tf.float32, 16, 16)
    traces = step.experimental_get_tracing_count()
    second = concept_attribution_maps(images, g, other, concept_ids=[2, 3], batch_size=5,
                                     method="gradcam")
    assert step.experimental_get_tracing_count() == traces
    attribution._STEPS.clear()
    fresh = concept_attribution_maps(images, g, other, concept_ids=[2, 3], batch_size=5,
                                     method="gradcam")
    np.testing.assert_array_equal(second, fresh)
    assert np.abs(second - first).max() > 1e-3 * np.abs(first).max()


def test_saliency_is_the_default_and_bounds_its_jacobian_batches(cnn, images, monkeypatch):
    g, bank = cnn
    default = concept_attribution_maps(images, g, bank, concept_ids=[1])
    explicit = concept_attribution_maps(images, g, bank, concept_ids=[1], method="saliency")
    np.testing.assert_array_equal(default, explicit)
    # A budget of two backward passes: 2 images of 1 concept, or 1 image of 2 concepts at a
    # time (concepts in chunks of 2), and the same maps.
    seen = []
    real = attribution._map_batches
    monkeypatch.setattr(attribution, "_map_batches",
                        lambda step, x, size, **kw: seen.append(size) or real(step, x, size,
                                                                              **kw))
    per_gradient = 4 * 16 * 16 * 3 * attribution.GRADIENT_FACTOR
    monkeypatch.setattr(attribution, "JACOBIAN_BYTES", 2 * per_gradient)
    bounded = concept_attribution_maps(images, g, bank, concept_ids=[1], method="saliency")
    assert seen == [2]
    np.testing.assert_allclose(bounded, explicit, rtol=1e-5, atol=1e-7)
    seen.clear()
    three = concept_attribution_maps(images, g, bank, concept_ids=[3, 1, 0], method="saliency")
    assert seen == [1, 1]  # chunks [3, 1] and [0], one image at a time
    np.testing.assert_allclose(three[:, 1], explicit[:, 0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("method", ["gradcam", "rise"])
def test_calls_with_other_ranks_and_concept_counts_on_one_extractor(cnn, images, method):
    # The cached step sees banks of another rank and other numbers of concepts in turn: each
    # must give the maps of a fresh call (a shape-relaxed trace lost the static rank once).
    g, bank = cnn
    small = np.random.default_rng(9).uniform(size=(3, bank.shape[1]))
    calls = [(bank, [0]), (small, [0, 2]), (bank, [1, 2, 3])]
    options = {"n_masks": 16, "random_state": 0} if method == "rise" else {}
    first = [concept_attribution_maps(images[:n], g, w, concept_ids=ids, method=method,
                                      **options)
             for n, (w, ids) in zip((1, 3, 2), calls, strict=True)]
    attribution._STEPS.clear()
    for n, (w, ids), maps in zip((1, 3, 2), calls, first, strict=True):
        fresh = concept_attribution_maps(images[:n], g, w, concept_ids=ids, method=method,
                                         **options)
        np.testing.assert_allclose(maps, fresh, rtol=1e-5, atol=1e-7)
        assert maps.shape == (n, len(ids), 16, 16)


def test_the_step_cache_does_not_keep_models_alive(images):
    inputs = keras.Input((16, 16, 3))
    g = keras.Model(inputs, keras.layers.Conv2D(3, 3, activation="relu")(inputs))
    concept_attribution_maps(images, g, np.ones((2, 3)), batch_size=5)
    assert g in attribution._STEPS
    reference = weakref.ref(g)
    del g
    gc.collect()
    assert reference() is None


def test_coefficient_maps_are_the_upsampled_spatial_coefficients(cnn, images):
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, concept_ids=[3], method="coefficients")
    spatial = build_concept_model(g, bank, 3, spatial=True)(images)  # (5, 6, 6, 1)
    expected = tf.image.resize(spatial, (16, 16))[..., 0].numpy()
    np.testing.assert_allclose(maps[:, 0], expected, rtol=1e-5, atol=1e-6)


def test_rise_is_deterministic_under_random_state(cnn, images):
    g, bank = cnn
    kwargs = dict(concept_ids=[0, 1], method="rise", n_masks=20, batch_size=16)
    first = concept_attribution_maps(images[:2], g, bank, random_state=7, **kwargs)
    again = concept_attribution_maps(images[:2], g, bank, random_state=7, **kwargs)
    other = concept_attribution_maps(images[:2], g, bank, random_state=8, **kwargs)
    assert first.shape == (2, 2, 16, 16)
    np.testing.assert_array_equal(first, again)
    assert np.abs(first - other).max() > 1e-6


def test_rise_with_one_all_keeping_mask_is_the_concept_score(cnn, images):
    # keep_probability=1 keeps every cell: the map is U_i(x) everywhere.
    g, bank = cnn
    maps = concept_attribution_maps(images, g, bank, method="rise", n_masks=3,
                                     keep_probability=1.0, rise_estimator="petsiuk",
                                     random_state=0)
    scores = build_concept_model(g, bank)(images).numpy()  # (5, 4)
    np.testing.assert_allclose(maps, np.broadcast_to(scores[:, :, None, None], maps.shape),
                               rtol=1e-5)


def test_rise_contrast_gives_zero_where_pixels_do_not_matter():
    # g ignores its input (a constant activation map): every pixel's kept and dropped means are
    # the same score, so the contrast is 0 everywhere, where Petsiuk's estimator paints E[U_i].
    g = keras.Sequential([keras.Input((12, 12, 3)), keras.layers.Conv2D(
        3, 3, activation="relu", kernel_initializer="zeros", bias_initializer="ones")])
    bank = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 1.0]])
    images = np.random.default_rng(0).random((3, 12, 12, 3)).astype(np.float32)
    kwargs = dict(method="rise", n_masks=64, grid_size=4, random_state=0)
    contrast = concept_attribution_maps(images, g, bank, **kwargs)
    np.testing.assert_allclose(contrast, 0.0, atol=1e-5)
    petsiuk = concept_attribution_maps(images, g, bank, rise_estimator="petsiuk", **kwargs)
    assert petsiuk.mean() > 0.5


def test_rise_contrast_is_the_kept_minus_dropped_mean_of_an_additive_score():
    # U_0 is the mean of the red channel over the image: U(x * m) = mean(x_red * m), additive
    # in the pixels, so E[U | pixel kept] - E[U | pixel dropped] is positive only where the
    # red pixels are, and larger where they are brighter.
    red_only = keras.initializers.Constant([[1.0], [0.0], [0.0]])
    g = keras.Sequential([keras.Input((14, 14, 3)),
                          keras.layers.Conv2D(1, 1, use_bias=False, kernel_initializer=red_only)])
    images = np.zeros((2, 14, 14, 3), np.float32)
    images[:, 2:6, 2:6, 0] = 1.0  # bright red square, top left
    images[:, 9:13, 9:13, 0] = 0.3  # dim red square, bottom right
    maps = concept_attribution_maps(images, g, np.ones((1, 1)), method="rise", n_masks=2000,
                                    grid_size=7, random_state=0)[:, 0]
    bright, dim = maps[:, 3:5, 3:5].mean(), maps[:, 10:12, 10:12].mean()
    empty = np.abs(maps[:, 7:8, :]).mean()  # a row between the squares
    assert bright > 2.5 * dim > 0, (bright, dim)
    assert empty < 0.35 * dim, (empty, dim)


@pytest.fixture(scope="module")
def motif_problem():
    """Red/blue squares on gray noise, the planted CNN's feature layer and a 3-concept bank."""
    images, boxes = _synthetic.make_motif_images(n_images=12, size=32, seed=1)
    model = _synthetic.make_motif_model(size=32)
    g = keras.Model(model.inputs, model.get_layer(_synthetic.FEATURE_LAYER).output)
    n = _synthetic.N_PER_GROUP
    bank = np.zeros((3, 3 * n))
    bank[0, :n] = 1.0  # red
    bank[1, n:2 * n] = 1.0  # blue
    bank[2, 2 * n:] = 1.0  # gray background
    bank += 0.05  # concepts overlap a little, as NMF concepts do
    return images, boxes, g, bank


# Measured fractions (motif area 0.0625): gradcam ~0.79, saliency ~0.67, coefficients ~0.81,
# rise ~0.43 (256 masks).
@pytest.mark.parametrize("method, min_ratio", [
    ("gradcam", 8.0), ("saliency", 8.0), ("coefficients", 8.0),
    ("rise", 4.0),
])
def test_concept_maps_find_the_planted_motif(motif_problem, method, min_ratio):
    images, boxes, g, bank = motif_problem
    maps = concept_attribution_maps(images, g, bank, concept_ids=[0, 1], method=method,
                                    n_masks=256, batch_size=64, random_state=0)
    for column, motif in enumerate(("red", "blue")):
        inside = np.zeros(maps.shape[:1] + maps.shape[2:], bool)
        for i, (y, x, h, w) in enumerate(boxes[motif]):
            inside[i, y:y + h, x:x + w] = True
        # The positive mass itself, not above a median: RISE's contrast estimator has no
        # constant baseline (Petsiuk's paints E[U_i] everywhere and fails this).
        mass = np.clip(maps[:, column], 0.0, None)
        fraction = mass[inside].sum() / mass.sum()
        area = inside.mean()  # 64 / 1024 = 0.0625
        print(f"{method} {motif}: fraction of map mass in the motif {fraction:.3f}, "
              f"motif area fraction {area:.4f}")
        assert fraction >= min_ratio * area, (method, motif, fraction, area)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"method": "lime"}, ValueError,
         r"`method` must be one of 'gradcam', 'saliency', 'gradient_input', 'rise', "
         r"'coefficients', got 'lime'\."),
        ({"concept_ids": [0, 4]}, ValueError,
         r"`concept_ids` must be in \[0, 4\) for a bank of 4 concepts, got \[4\]\."),
        ({"concept_ids": -1}, ValueError, r"`concept_ids` must be in \[0, 4\)"),
        ({"concept_ids": "a"}, TypeError,
         r"`concept_ids` must be an int, a list of ints or None, got str 'a'\."),
        ({"concept_ids": [0.5]}, TypeError, r"`concept_ids` must be an int, a list of ints"),
        ({"concept_ids": []}, ValueError, r"`concept_ids` must name at least one concept"),
        ({"batch_size": 0}, ValueError, r"`batch_size` must be >= 1, got 0\."),
        ({"method": "rise", "keep_probability": 1.5}, ValueError,
         r"`keep_probability` must be in \(0\.0, 1\.0\], got 1\.5\."),
        ({"method": "rise", "keep_probability": 1.0}, ValueError,
         r"`rise_estimator='contrast'` compares masks .* must be below 1, got 1\.0\."),
        ({"method": "rise", "rise_estimator": "mean"}, ValueError,
         r"`rise_estimator` must be one of 'contrast', 'petsiuk', got 'mean'\."),
    ],
)
def test_bad_options_raise_clear_errors(cnn, images, kwargs, error, match):
    g, bank = cnn
    with pytest.raises(error, match=match):
        concept_attribution_maps(images, g, bank, **kwargs)


def test_bad_shapes_raise_clear_errors(cnn, images):
    g, bank = cnn
    with pytest.raises(ValueError, match=r"For a single image pass `images\[None\]`\."):
        concept_attribution_maps(images[0], g, bank)
    with pytest.raises(ValueError, match=r"`images` must have shape \(batch, 16, 16, 3\) to match "
                                         r"`feature_extractor`, got shape \(5, 16, 16, 1\)\."):
        concept_attribution_maps(images[..., :1], g, bank)
    with pytest.raises(ValueError, match=r"`concept_bank` must have as many columns as "
                                         r"`feature_extractor` outputs channels \(6\)"):
        concept_attribution_maps(images, g, bank[:, :5])
    with pytest.raises(ValueError, match=r"`concept_bank` must be finite"):
        build_concept_model(g, bank * np.nan)
    with pytest.raises(TypeError, match=r"`feature_extractor` must be a keras.Model, got function"):
        build_concept_model(lambda x: x, bank)
    with pytest.raises(ValueError, match=r"`concept_id` must be in \[0, 4\)"):
        build_concept_model(g, bank, 9)


def test_methods_needing_spatial_activations_refuse_pooled_ones(cnn, images):
    g, bank = cnn
    pooled = keras.Model(g.inputs, keras.layers.GlobalAveragePooling2D()(g.outputs[0]))
    with pytest.raises(ValueError, match=r"`method='gradcam'` needs 4-D activations"):
        concept_attribution_maps(images, pooled, bank, method="gradcam")
    with pytest.raises(ValueError, match=r"`spatial=True` needs 4-D activations"):
        build_concept_model(pooled, bank, spatial=True)
    maps = concept_attribution_maps(images, pooled, bank, method="saliency", concept_ids=0)
    assert maps.shape == (5, 1, 16, 16) and np.all(np.isfinite(maps))


# ---------------------------------------------------------------------------- Xplique explainers


@pytest.fixture(scope="module")
def xplique_attributions():
    return pytest.importorskip("xplique.attributions")


@pytest.mark.parametrize(
    "name, kwargs",
    [("Saliency", {}), ("GradCAM", {"conv_layer": "conv2"}), ("GradCAM", {}),
     ("IntegratedGradients", {"steps": 8}), ("Rise", {"nb_samples": 32}),
     ("Occlusion", {"patch_size": 4, "patch_stride": 4}),
     ("SobolAttributionMethod", {"grid_size": 4, "nb_design": 8})],
)
def test_xplique_explainers_run_on_the_concept_model(xplique_attributions, cnn, images, name,
                                                      kwargs):
    g, bank = cnn
    explainer = getattr(xplique_attributions, name)(build_concept_model(g, bank, 1), **kwargs)
    explanation = np.asarray(explainer(images, np.ones((5, 1), np.float32)))
    assert explanation.shape[:3] == (5, 16, 16)
    assert np.all(np.isfinite(explanation)) and np.abs(explanation).max() > 0


def test_xplique_saliency_and_gradcam_equal_ours(xplique_attributions, images):
    # A stride-1 'same' conv keeps 16x16 maps, so Xplique's bicubic resize is the identity.
    keras.utils.set_random_seed(6)
    inputs = keras.Input((16, 16, 3))
    features = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv")(inputs)
    g = keras.Model(inputs, features)
    bank = np.random.default_rng(6).uniform(size=(3, 6))
    model = build_concept_model(g, bank, 2)
    targets = np.ones((5, 1), np.float32)
    for explainer, method in [(xplique_attributions.Saliency(model), "saliency"),
                              (xplique_attributions.GradCAM(model, conv_layer="conv"), "gradcam")]:
        theirs = np.asarray(explainer(images, targets))[..., 0]
        ours = concept_attribution_maps(images, g, bank, concept_ids=2, method=method)[:, 0]
        np.testing.assert_allclose(ours, theirs, rtol=1e-4, atol=1e-5 * np.abs(theirs).max())


# ---------------------------------------------------------------------------------------- plots


@pytest.mark.parametrize("n_maps", [3, 25])
def test_plot_concept_attribution_maps_draws_one_colour_per_concept(rng, n_maps):
    plots = pytest.importorskip("xcraft.viz.plots")
    import matplotlib

    matplotlib.use("Agg")
    image = rng.uniform(size=(16, 16, 3))
    maps = rng.uniform(size=(n_maps, 16, 16))
    figure = plots.plot_concept_attribution_maps(image, maps, concept_ids=np.arange(n_maps) + 10,
                                                 importances=rng.uniform(size=n_maps))
    legend = figure.axes[0].get_legend()
    assert len(legend.get_texts()) == n_maps
    colours = {tuple(np.round(h.get_facecolor(), 6)) for h in legend.legend_handles}
    assert len(colours) == n_maps
    matplotlib.pyplot.close(figure)


def test_plot_image_concepts_draws_the_most_important_panels(rng):
    plots = pytest.importorskip("xcraft.viz.plots")
    import matplotlib

    matplotlib.use("Agg")
    importances = np.array([0.1, 0.5, 0.2, 0.05])
    crops = [rng.uniform(size=(3, 8, 8, 3)) for _ in range(4)]
    figure = plots.plot_image_concepts(rng.uniform(size=(16, 16, 3)),
                                       rng.uniform(size=(4, 16, 16)), importances, n_concepts=2,
                                       concept_ids=[7, 8, 9, 10], crops=crops)
    titles = [ax.get_title() for ax in figure.axes]
    assert titles[0] == "image"
    assert titles[1] == "concept 8\nimportance 0.5"  # the most important first
    assert "concept 9\nimportance 0.2" in titles and "concept 7\nimportance 0.1" not in titles
    assert titles.count("crops") == 2
    with pytest.raises(ValueError, match=r"`maps` must have shape \(n_concepts, 16, 16\)"):
        plots.plot_image_concepts(np.zeros((16, 16, 3)), np.zeros((2, 8, 8)))
    matplotlib.pyplot.close(figure)


def test_other_image_counts_reuse_the_traced_map_step(tiny_model):
    # Tracing the NNLS and its gradient dominates a first call on a real network: 4 images
    # then 7 (a short last batch included) must not trace again.
    from xcraft.craft import attribution
    from xcraft.plumbing.split import split_model

    g, _ = split_model(tiny_model, "conv")
    rng = np.random.default_rng(0)
    bank = np.abs(rng.normal(size=(3, 8))).astype(np.float32)
    images = rng.uniform(size=(7, 16, 16, 3)).astype(np.float32)
    first = attribution.concept_attribution_maps(images[:4], g, bank, method="saliency")
    again = attribution.concept_attribution_maps(images, g, bank, method="saliency",
                                                 batch_size=3)
    step = attribution._attribution_step(g, "saliency", tf.float32, 16, 16)
    assert len(step.traced) == 1
    np.testing.assert_allclose(again[:4], first, rtol=1e-5, atol=1e-7)
