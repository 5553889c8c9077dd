"""The AfI occluder and importances on models whose answers are known by construction."""

import keras
import numpy as np
import pytest

from xcraft.afi import AfI

# A linear "image" model Z = (w·x, −1): class 0 while w·x > −1.
W = np.array([0.1, -0.3, 1.2, -2.0, 0.45, -0.6, 1.5, 0.05] * 2, np.float32)


@pytest.fixture(scope="module")
def linear_model():
    model = keras.Sequential([keras.Input((4, 4, 1)), keras.layers.Flatten(),
                              keras.layers.Dense(2, name="logits")])
    model.layers[-1].set_weights([np.stack([W, np.zeros_like(W)], 1),
                                  np.array([0.0, -1.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def linear_images():
    return (0.1 * np.random.default_rng(0).normal(size=(5, 4, 4, 1))).astype(np.float32)


@pytest.mark.parametrize("use_transform, gradient_factor", [(False, 1.0), (True, 2.0)])
def test_proximal_support_is_where_the_gradient_beats_lambda(
    linear_model, linear_images, use_transform, gradient_factor
):
    # The loss gradient is −c·w (c = 1 clean term, 2 with an identity transform), constant, so
    # Adam's normalised step is η·sign and its metric |c·w_j|: the soft-threshold ηλ/|c·w_j|
    # keeps coordinate j iff |c·w_j| > λ, and it moves by η(1 − λ/|c·w_j|) per step.
    lam, learning_rate, width = 1.0, 0.001, 20.0
    afi = AfI(linear_model, input_range=(-10, 10), l1_penalty=lam, proximal=True,
              use_transform=use_transform, noise=0.0, max_rotation=0.0,
              learning_rate=learning_rate, max_steps=500).fit(linear_images, 0)
    g = gradient_factor * np.abs(W)
    support = np.flatnonzero(g > lam)
    delta = afi.delta_.ravel()
    np.testing.assert_array_equal(np.flatnonzero(delta), support)
    eta = learning_rate * width
    expected = afi.n_steps_ * eta * np.maximum(1 - lam / g, 0) * np.sign(W)
    np.testing.assert_allclose(delta, expected, atol=1e-5)
    # It stopped at the first step where every image flipped, not before.
    assert afi.flip_rate_["clean"] == 1.0 and afi.history_["flip_rate"][-2] < 1.0
    assert afi.n_steps_ < 500
    margins = (linear_images.reshape(5, -1) - delta) @ W
    assert np.all(margins < -1.0)
    assert afi.history_["l1"][-1] == pytest.approx(np.abs(delta).sum(), rel=1e-6)


def _colour_model(size=8):
    """Class 0 iff the red channel is bright: logit_0 = 4·mean(relu(R)) − 2, logit_1 = 0."""
    inputs = keras.Input((size, size, 3))
    conv = keras.layers.Conv2D(3, 1, activation="relu", name="colours")
    x = conv(inputs)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(2, name="logits")
    model = keras.Model(inputs, dense(pooled))
    conv.set_weights([np.eye(3, dtype=np.float32)[None, None], np.zeros(3, np.float32)])
    dense.set_weights([np.array([[4.0, 0.0], [0.0, 0.0], [0.0, 0.0]], np.float32),
                       np.array([-2.0, 0.0], np.float32)])
    return model


@pytest.fixture(scope="module")
def colour_model():
    return _colour_model()


@pytest.fixture(scope="module")
def red_images():
    rng = np.random.default_rng(1)
    images = rng.uniform(0.0, 1.0, size=(6, 8, 8, 3)).astype(np.float32)
    images[..., 0] = rng.uniform(0.8, 1.0, size=(6, 8, 8))
    return images


@pytest.fixture(scope="module")
def fitted_colour(colour_model, red_images):
    return AfI(colour_model, layers=["colours", "gap"], l1_penalty=0.01, proximal=True,
               learning_rate=0.05, max_steps=200, random_state=0).fit(red_images, 0)


def test_occluder_only_touches_the_class_channel(fitted_colour):
    afi = fitted_colour
    assert afi.flip_rate_ == {"clean": 1.0, "transformed": 1.0}
    np.testing.assert_array_equal(afi.delta_[..., 1:], 0.0)
    assert np.all(afi.delta_[..., 0] >= 0) and afi.delta_[..., 0].max() > 0


@pytest.mark.parametrize("layer", ["colours", "gap"])
def test_channel_importance_of_detector_is_one_and_of_unused_channels_zero(fitted_colour, layer):
    channel = fitted_colour.channel_importance_[layer]
    np.testing.assert_array_equal(channel, [1.0, 0.0, 0.0])


def test_neuron_importance_shapes_and_eq_6(fitted_colour, red_images):
    afi = fitted_colour
    assert afi.neuron_importance_["colours"].shape == (8, 8, 3)
    assert afi.neuron_importance_["gap"].shape == (3,)
    occluded = np.clip(red_images - afi.delta_, 0, 1)
    expected = np.maximum((red_images - occluded).mean(axis=0), 0)  # the 1×1 identity conv
    np.testing.assert_allclose(afi.neuron_importance_["colours"], expected, atol=1e-6)
    np.testing.assert_allclose(afi.neuron_importance_["gap"], expected.mean(axis=(0, 1)),
                               atol=1e-6)


def test_meta_detector_is_the_weighted_channel_sum(fitted_colour, red_images):
    detector = fitted_colour.meta_detector("colours")
    response = detector(red_images).numpy()
    np.testing.assert_allclose(response, np.maximum(red_images[..., 0], 0), rtol=1e-6)
    assert fitted_colour.meta_detector("colours") is detector  # built once


def test_same_seed_same_delta_bit_for_bit(colour_model, red_images):
    kwargs = {"l1_penalty": 0.01, "learning_rate": 0.05, "max_steps": 30}
    first = AfI(colour_model, random_state=3, **kwargs).fit(red_images, 0).delta_
    second = AfI(colour_model, random_state=3, **kwargs).fit(red_images, 0).delta_
    np.testing.assert_array_equal(first, second)


def test_nothing_flipped_warns_and_gives_zeros(colour_model, red_images):
    afi = AfI(colour_model, layers=["colours"], max_steps=0, random_state=0)
    with pytest.warns(UserWarning, match=r"flipped none of the 6 images"):
        afi.fit(red_images, 0)
    assert afi.flip_rate_["clean"] == 0.0
    np.testing.assert_array_equal(afi.channel_importance_["colours"], 0.0)
    assert not np.isnan(afi.neuron_importance_["colours"]).any()


def test_margin_loss_and_normalised_penalty_flip_too(colour_model, red_images):
    afi = AfI(colour_model, loss="margin", normalize_penalty=True, l1_penalty=0.5,
              learning_rate=0.05, max_steps=200, random_state=0).fit(red_images, 0)
    assert afi.flip_rate_["clean"] == 1.0


def test_lambda_search_finds_the_largest_flipping_lambda(linear_model, linear_images):
    # With c = 1 the coordinates move iff |w_j| > λ: the occluder can flip while λ < 2
    # (max |w|), so the search must end between its last success and failure around 2.
    afi = AfI(linear_model, input_range=(-10, 10), l1_penalty=0.1, proximal=True,
              use_transform=False, learning_rate=0.01, max_steps=300, lambda_search=True,
              n_search_steps=4).fit(linear_images, 0)
    assert afi.flip_rate_["clean"] == 1.0
    tried = afi.lambda_search_
    failures = [t["lambda"] for t in tried if t["flip_rate"] < 1.0]
    assert afi.lambda_ == max(t["lambda"] for t in tried if t["flip_rate"] == 1.0)
    assert all(f > afi.lambda_ for f in failures)
    assert 0.5 < afi.lambda_ < 2.0 <= min(failures) * 1.0001


def test_transform_that_flips_a_clean_image_is_excluded(colour_model):
    rng = np.random.default_rng(2)
    images = rng.uniform(0.0, 1.0, size=(8, 8, 8, 3)).astype(np.float32)
    images[:6, ..., 0] = 0.5001  # logit_0 = 4e-4: the transform's noise flips about half
    images[6:, ..., 0] = 0.9  # logit_0 = 1.6: no noise of ±0.2 flips these
    with pytest.warns(UserWarning, match=r"transform alone changes the prediction of"):
        afi = AfI(colour_model, noise=0.2, max_rotation=0.0, max_steps=5,
                  random_state=0).fit(images, 0)
    assert len(afi.transform_excluded_) > 0
    assert set(afi.transform_excluded_) <= set(range(6))


@pytest.mark.parametrize("kwargs, images_slice, class_id, error, match", [
    ({}, slice(0, 1), 0, ValueError, r"`images` must hold at least 2 images, got 1"),
    ({"input_range": (-1, 0)}, slice(None), 0, ValueError,
     r"`images` must lie in `input_range` \[-1, 0\], got values in"),
    ({}, slice(None), 1, ValueError,
     r"`class_id` must be predicted by the model on at least one image, got class 1"),
    ({}, slice(None), 5, ValueError, r"`class_id` must be in \[0, 1\] \(the model has 2"),
    ({"layers": ["nope"]}, slice(None), 0, ValueError,
     r"`layers` must be one of the model's layers \(.*'colours'.*\), got 'nope'"),
    ({"loss": "hinge"}, slice(None), 0, ValueError, r"`loss` must be one of 'logit', 'margin'"),
    ({"l1_penalty": -1.0}, slice(None), 0, ValueError, r"`l1_penalty` must be a finite number"),
])
def test_bad_input_is_refused(colour_model, red_images, kwargs, images_slice, class_id, error,
                              match):
    with pytest.raises(error, match=match):
        AfI(colour_model, max_steps=1, **kwargs).fit(red_images[images_slice], class_id)


def test_unknown_meta_detector_layer_is_refused(fitted_colour):
    with pytest.raises(ValueError, match=r"`layer` must be one of the analysed layers"):
        fitted_colour.meta_detector("logits")


def test_model_runs_in_inference_mode(red_images):
    from tests._synthetic import trained_batch_norm

    base = _colour_model()
    inputs = keras.Input((8, 8, 3))
    norm = trained_batch_norm((8, 8, 3), seed=0)
    x = keras.layers.Dropout(0.5)(norm(inputs))
    model = keras.Model(inputs, base(x))
    before = [w.numpy().copy() for w in norm.weights]
    logits = model(red_images, training=False).numpy()
    class_id = int(np.bincount(np.argmax(logits, axis=1)).argmax())
    kwargs = {"layers": [model.layers[1].name], "max_steps": 5, "random_state": 0,
              "input_range": (0, 1)}
    first = AfI(model, **kwargs).fit(red_images, class_id)
    second = AfI(model, **kwargs).fit(red_images, class_id)
    for old, weight in zip(before, norm.weights, strict=True):
        np.testing.assert_array_equal(weight.numpy(), old)  # moving statistics untouched
    np.testing.assert_array_equal(first.delta_, second.delta_)  # no dropout noise
