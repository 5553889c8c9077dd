"""Contracts a careful user relies on: refused input is refused early, nothing silently wrong."""

import keras
import numpy as np
import pytest

from tests import _synthetic
from xcraft.craft.estimator import CraftTf
from xcraft.plumbing.split import logits_model, split_model


def _pre_relu_model():
    """A linear 1×1 conv whose map has negatives that its spatial mean hides."""
    inputs = keras.Input((8, 8, 1))
    conv = keras.layers.Conv2D(3, 1, name="pre_relu")
    x = conv(inputs)
    dense = keras.layers.Dense(2, name="logits")
    outputs = dense(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    conv.set_weights([np.array([[[[1.0, 0.5, 2.0]]]], np.float32), np.zeros(3, np.float32)])
    dense.set_weights([np.ones((3, 2), np.float32), np.zeros(2, np.float32)])
    return model


def _images_with_hidden_negatives(n=12, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.uniform(0.2, 1.0, size=(n, 8, 8, 1)).astype(np.float32)
    images[:, 0, 0, 0] = -0.6  # one negative pixel per image: every crop mean stays positive
    return images


def test_negative_raw_activations_are_refused_even_when_crop_means_are_positive():
    craft = CraftTf.from_model(_pre_relu_model(), "pre_relu", number_of_concepts=2,
                               patch_size=8, crops="grid", verbose=False)
    with pytest.raises(ValueError, match=r"The activations of layer 'pre_relu' must be "
                                         r"non-negative for NMF, got a minimum of -1\.2"):
        craft.fit(_images_with_hidden_negatives(), class_id=0)


@pytest.fixture(scope="module")
def fitted(motif_set_module):
    images, _ = motif_set_module
    model = _synthetic.make_motif_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=3,
                               patch_size=16, random_state=0, verbose=False)
    craft.fit(images[:16], class_id=0)
    return craft, images, model


@pytest.fixture(scope="module")
def motif_set_module():
    return _synthetic.make_motif_images(n_images=24, size=32, seed=0)


@pytest.mark.parametrize(("value", "message"), [
    (np.nan, r"`activations` must be finite, got NaN or infinite values\."),
    (-0.5, r"`activations` must be non-negative \(outputs of the split layer, post-ReLU\), got "
           r"a minimum of -0\.5\."),
])
def test_transform_checks_given_activations(fitted, value, message):
    craft, _, _ = fitted
    activations = np.ones((2, craft.concept_bank_w.shape[1]), np.float32)
    activations[0, 0] = value
    with pytest.raises(ValueError, match=message):
        craft.transform(None, activations=activations)


def test_multi_output_models_are_refused_at_the_split():
    inputs = keras.Input((4,))
    hidden = keras.layers.Dense(3, activation="relu", name="hidden")(inputs)
    model = keras.Model(inputs, [keras.layers.Dense(2)(hidden), keras.layers.Dense(5)(hidden)])
    with pytest.raises(ValueError, match=r"`model` must have a single output \(the logits\), got "
                                         r"2 outputs\. Pick one: `keras.Model\(model.inputs, "
                                         r"model.outputs\[k\]\)`\."):
        split_model(model, "hidden")


def test_the_output_layer_is_not_a_split():
    model = _synthetic.make_motif_model()
    with pytest.raises(ValueError, match=r"`layer` must come before the model's output, got its "
                                         r"output layer 'logits'"):
        split_model(model, "logits")


def test_constant_images_warn_that_concepts_are_arbitrary():
    model = _synthetic.make_motif_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=3,
                               patch_size=16, random_state=0, verbose=False)
    images = np.full((8, 32, 32, 3), 0.5, np.float32)
    with pytest.warns(UserWarning, match=r"numerical rank 1, below `number_of_concepts` = 3"):
        craft.fit(images, class_id=0)


def test_huge_pixels_are_refused_not_factorised_into_nan():
    model = _synthetic.make_motif_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                               patch_size=16, random_state=0, verbose=False)
    images, _ = _synthetic.make_motif_images(n_images=8, size=32, seed=0)
    with pytest.raises(ValueError, match=r"(must be finite|diverged).*preprocessed as"):
        craft.fit(images * 1e20, class_id=0)


def test_more_concepts_than_channels_is_refused_before_any_forward_pass(monkeypatch):
    model = _synthetic.make_motif_model()  # 12 channels at the feature layer
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=13,
                               patch_size=8, verbose=False)
    from xcraft.craft import estimator

    def no_forward_pass(*args, **kwargs):
        raise AssertionError("activations computed before the check")

    monkeypatch.setattr(estimator, "pooled_crop_activations", no_forward_pass)
    images, _ = _synthetic.make_motif_images(n_images=8, size=32, seed=0)
    with pytest.raises(ValueError, match=r"`number_of_concepts` must be <= the 12 channels of the "
                                         r"split layer, got 13\."):
        craft.fit(images, class_id=0)


def test_negative_random_state_names_the_argument():
    model = _synthetic.make_motif_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, random_state=-1, verbose=False,
                               number_of_concepts=2, patch_size=16)
    images, _ = _synthetic.make_motif_images(n_images=4, size=32, seed=0)
    with pytest.raises(ValueError, match=r"`random_state` must be a non-negative int, got -1\."):
        craft.fit(images, class_id=0)


def test_decompose_refuses_a_later_layer_for_an_estimator_built_from_g_and_h():
    model = _synthetic.make_parts_model()
    g, h = split_model(model, _synthetic.PARTS_LAYER)
    craft = CraftTf(g, h, number_of_concepts=2, patch_size=16, random_state=0, verbose=False)
    images, _ = _synthetic.make_motif_images(16, motifs=("red", "green"), seed=2)
    craft.fit(images, class_id=0)
    with pytest.raises(ValueError, match=r"`layer` must come before the parent's split layer "
                                         r"'parts', got 'features'"):
        craft.decompose(0, _synthetic.FEATURE_LAYER, model=model, number_of_concepts=2,
                        percentile=50)


def test_rise_maps_follow_the_estimators_seed(fitted):
    craft, images, _ = fitted
    first = craft.concept_attribution_maps(images[:2], [0], method="rise", n_masks=16)
    second = craft.concept_attribution_maps(images[:2], [0], method="rise", n_masks=16)
    np.testing.assert_array_equal(first, second)
    other = craft.concept_attribution_maps(images[:2], [0], method="rise", n_masks=16,
                                           random_state=123)
    assert not np.array_equal(first, other)


def _softmax_models():
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    dense_softmax = keras.Model(
        inputs, keras.layers.Dense(3, activation="softmax", name="probs")(hidden))
    logits = keras.layers.Dense(3, name="logits")(hidden)
    layer_softmax = keras.Model(inputs, keras.layers.Softmax(name="softmax")(logits))
    return {"dense": dense_softmax, "layer": layer_softmax}


@pytest.mark.parametrize("kind", ["dense", "layer"])
def test_a_final_softmax_is_removed_and_said(kind, rng):
    model = _softmax_models()[kind]
    stripped, removed = logits_model(model)
    assert removed is not None and "softmax" in removed.lower()
    x = rng.normal(size=(5, 6)).astype(np.float32)
    logits = np.asarray(stripped(x))
    probabilities = np.asarray(model(x))
    # The stripped model gives the logits: their softmax is the original's output, and they are
    # not the probabilities themselves.
    softmax = np.exp(logits - logits.max(1, keepdims=True))
    np.testing.assert_allclose(softmax / softmax.sum(1, keepdims=True), probabilities, atol=1e-6)
    assert not np.allclose(logits, probabilities, atol=1e-3)
    with pytest.warns(UserWarning, match=r"`model` ends in a softmax or sigmoid: xcraft explains"):
        craft = CraftTf.from_model(model, "hidden", number_of_concepts=2)
    np.testing.assert_allclose(
        np.asarray(craft.latent_to_logit_model(craft.input_to_latent_model(x))), logits,
        atol=1e-5)


@pytest.mark.parametrize("kind", ["dense", "activation"])
def test_a_final_sigmoid_is_removed_and_said(kind, rng):
    # FaceMasque's VGG16 head is Dense(2, activation="sigmoid"): its logits are the pre-activation.
    inputs = keras.Input((6,))
    hidden = keras.layers.Dense(4, activation="relu", name="hidden")(inputs)
    if kind == "dense":
        outputs = keras.layers.Dense(2, activation="sigmoid", name="probs")(hidden)
    else:
        outputs = keras.layers.Activation("sigmoid")(keras.layers.Dense(2, name="logits")(hidden))
    model = keras.Model(inputs, outputs)
    stripped, removed = logits_model(model)
    assert "sigmoid" in removed
    x = rng.normal(size=(5, 6)).astype(np.float32)
    logits = np.asarray(stripped(x))
    np.testing.assert_allclose(1.0 / (1.0 + np.exp(-logits)), np.asarray(model(x)), atol=1e-6)


def test_a_model_returning_logits_is_left_alone():
    model = _synthetic.make_motif_model()
    same, removed = logits_model(model)
    assert same is model and removed is None


def test_images_outside_the_declared_range_warn_once():
    model = _synthetic.make_motif_model()
    images, _ = _synthetic.make_motif_images(n_images=8, size=32, seed=0)
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                               patch_size=16, random_state=0, verbose=False,
                               input_range=(0, 1))
    with pytest.warns(UserWarning, match=r"`inputs` range from 0 to 255, outside the declared "
                                         r"`input_range` \(0, 1\)"):
        craft.fit(images * 255.0, class_id=0)
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        craft.transform(images * 255.0)  # said once per estimator
        CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                           patch_size=16, random_state=0, verbose=False,
                           input_range=(0, 1)).fit(images, class_id=0)


@pytest.mark.parametrize(("value", "error", "message"), [
    ((1, 0), ValueError, r"`input_range` must have finite low < high, got \(1, 0\)\."),
    ("0-1", TypeError, r"`input_range` must be a pair \(low, high\) of numbers or None"),
])
def test_bad_input_range(value, error, message):
    model = _synthetic.make_motif_model()
    images, _ = _synthetic.make_motif_images(n_images=4, size=32, seed=0)
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, input_range=value, verbose=False)
    with pytest.raises(error, match=message):
        craft.fit(images, class_id=0)


def _signed_motif_model():
    """The motif CNN with its conv's ReLU removed: the split layer's activations are signed."""
    model = _synthetic.make_motif_model()
    inputs = keras.Input((32, 32, 3))
    conv = model.get_layer("conv")
    linear = keras.layers.Conv2D(conv.filters, 3, padding="same", name="pre_act")
    x = linear(inputs)
    x = keras.layers.AveragePooling2D(2, name="signed_features")(x)
    x = keras.layers.ReLU()(x)
    outputs = model.get_layer("logits")(keras.layers.GlobalAveragePooling2D()(x))
    signed = keras.Model(inputs, outputs)
    linear.set_weights(conv.get_weights())
    return signed


def test_signed_layers_are_refused_by_nmf_and_factorised_by_semi_nmf():
    model = _signed_motif_model()
    images, _ = _synthetic.make_motif_images(n_images=24, size=32, seed=0)
    kwargs = dict(number_of_concepts=3, patch_size=16, random_state=0, verbose=False)
    with pytest.raises(ValueError, match=r"must be non-negative for NMF.*use "
                                         r"solver='semi-nmf' \(or 'auto'\)"):
        CraftTf.from_model(model, "signed_features", **kwargs).fit(images, class_id=0)
    craft = CraftTf.from_model(model, "signed_features", solver="auto", **kwargs)
    with pytest.warns(UserWarning, match=r"are signed \(minimum -[0-9.]+\): solver='auto' "
                                         r"factorises them by semi-NMF"):
        craft.fit(images, class_id=0)
    assert craft.solver_ == "semi-nmf" and craft.concept_bank_w.min() < 0
    u = craft.transform(images[:4])
    assert u.shape == (4, 16, 16, 3) and u.min() >= 0
    # The crops' activations are reconstructed by the signed bank as well as NMF would on
    # the rectified layer: the planted groups are separable at this layer.
    a = craft.crop_activations_
    error = np.linalg.norm(a - craft.crops_u @ craft.concept_bank_w) / np.linalg.norm(a)
    assert error < 0.2
    importances = craft.estimate_importance(nb_design=8)
    assert np.all((importances >= 0) & (importances <= 1)) and importances.max() > 0.1
    maps = craft.concept_attribution_maps(images[:2])
    assert maps.shape == (2, 3, 32, 32) and np.all(np.isfinite(maps))


def test_a_semi_nmf_result_saves_and_loads(tmp_path):
    model = _signed_motif_model()
    images, _ = _synthetic.make_motif_images(n_images=16, size=32, seed=0)
    craft = CraftTf.from_model(model, "signed_features", number_of_concepts=3, patch_size=16,
                               random_state=0, verbose=False, solver="semi-nmf")
    craft.fit(images, class_id=0)
    craft.save(tmp_path / "r")
    loaded = CraftTf.load(tmp_path / "r", craft.input_to_latent_model,
                          craft.latent_to_logit_model)
    assert loaded.solver_ == "semi-nmf"
    np.testing.assert_array_equal(loaded.transform(images[:3]), craft.transform(images[:3]))


def test_afi_ranks_craft_concepts_by_the_occluders_effect():
    # Class 0's logit reads the red group with weight 20 and the blue one with weight 1, so the
    # occluder removes red first, and the concept that carries red loses the most.
    model = _synthetic.make_motif_model(red_weight=20.0)
    images, _ = _synthetic.make_motif_images(n_images=24, size=32, seed=0,
                                             motifs=("red", "blue"))
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=3,
                               patch_size=16, random_state=0, verbose=False, input_range=(0, 1))
    craft.fit(images, class_id=0)
    scores = craft.estimate_importance(method="afi",
                                       afi_options={"max_steps": 150, "learning_rate": 0.05})
    assert scores.shape == (3,) and np.all(scores >= 0)
    assert craft.sensitivity.method == "afi" and craft.afi_.delta_.shape == (32, 32, 3)
    red_concept = int(np.argmax(craft.concept_bank_w[:, :_synthetic.N_PER_GROUP].sum(1)
                                / craft.concept_bank_w.sum(1)))
    assert int(np.argmax(scores)) == red_concept
    # By hand: the mean drop of each coefficient under the learnt occluder, clipped at 0.
    occluded = np.clip(craft.images_ - craft.afi_.delta_, 0, 1)
    drop = craft.transform(craft.images_).sum((1, 2)).mean(0) - \
        craft.transform(occluded).sum((1, 2)).mean(0)
    np.testing.assert_allclose(scores, np.maximum(drop, 0), rtol=1e-4, atol=1e-6)
