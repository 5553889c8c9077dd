"""build_blocks on hand-built Keras models whose layer outputs are known in closed form."""

import keras
import numpy as np
import pytest

from tests.ops.test_coupled import _matched_cosines
from xcraft.coupled import CoupledNMF
from xcraft.coupled.blocks import Blocks, build_blocks, column_of, index_map
from xcraft.plumbing.split import split_model

HEIGHT, WIDTH, CHANNELS = 4, 5, 2
KERNEL = np.array([[1.0, 0.0, 0.5], [0.0, 1.0, 2.0]], np.float32)  # (in 2, out 3), >= 0


def _known_model():
    """Input (4, 5, 2) -> 1x1 conv by KERNEL (ReLU, no bias) -> avg pool 2 -> flatten -> dense.

    Every output is linear in the (non-negative) pixels with non-negative weights, so it is
    known exactly and the ReLUs never cut anything.
    """
    inputs = keras.Input((HEIGHT, WIDTH, CHANNELS))
    conv = keras.layers.Conv2D(3, 1, use_bias=False, activation="relu", name="conv")
    x = conv(inputs)
    x = keras.layers.AveragePooling2D(2, name="pool")(x)
    x = keras.layers.Flatten(name="flatten")(x)
    dense = keras.layers.Dense(4, use_bias=False, activation="relu", name="dense")
    outputs = dense(x)
    model = keras.Model(inputs, outputs, name="known")
    conv.set_weights([KERNEL[None, None]])
    dense.set_weights([np.abs(np.random.default_rng(5).normal(size=(12, 4))).astype("float32")])
    return model


@pytest.fixture(scope="module")
def known_model():
    return _known_model()


@pytest.fixture(scope="module")
def images():
    return np.random.default_rng(0).uniform(size=(7, HEIGHT, WIDTH, CHANNELS)).astype("float32")


def test_every_column_traces_back_to_its_channel_and_position(known_model, images):
    blocks = build_blocks(known_model, ["conv", "dense"], images, batch_size=3)
    assert list(blocks) == ["pixels_0", "pixels_1", "conv", "dense"]
    assert isinstance(blocks, dict) and isinstance(blocks, Blocks)
    conv = np.einsum("nyxi,io->nyxo", images, KERNEL)  # (n, h, w, 3): the conv's known output
    index = blocks.index_map("conv")
    assert blocks["conv"].shape == (7, HEIGHT * WIDTH * 3) and index.shape == (60, 3)
    # Column j of the block is conv[:, y_j, x_j, c_j], for every j at once.
    np.testing.assert_allclose(blocks["conv"], conv[:, index[:, 1], index[:, 2], index[:, 0]],
                               rtol=1e-6)
    # Channel-major: the first h * w columns are channel 0's whole map.
    np.testing.assert_allclose(blocks["conv"][:, :HEIGHT * WIDTH],
                               conv[..., 0].reshape(7, -1), rtol=1e-6)
    for c, name in enumerate(["pixels_0", "pixels_1"]):
        pixels = blocks.index_map(name)
        assert np.all(pixels[:, 0] == c)
        np.testing.assert_array_equal(blocks[name], images[:, pixels[:, 1], pixels[:, 2], c])
    assert blocks.shapes == {"pixels_0": (4, 5), "pixels_1": (4, 5), "conv": (4, 5, 3),
                             "dense": (4,)}
    assert blocks.index_map("dense").tolist() == [[c, -1, -1] for c in range(4)]


def test_batches_and_one_pass_agree(known_model, images):
    one = build_blocks(known_model, ["conv", "pool"], images, batch_size=64)
    batched = build_blocks(known_model, ["conv", "pool"], images, batch_size=2)
    assert list(one) == list(batched)
    for name in one:
        np.testing.assert_array_equal(one[name], batched[name])


def test_average_pooling_gives_channel_means(known_model, images):
    blocks = build_blocks(known_model, ["conv"], images, pool="avg", include_pixels=False)
    assert list(blocks) == ["conv"]
    expected = np.einsum("nyxi,io->no", images, KERNEL) / (HEIGHT * WIDTH)
    np.testing.assert_allclose(blocks["conv"], expected, rtol=1e-5)
    assert blocks.index_map("conv").tolist() == [[c, -1, -1] for c in range(3)]


@pytest.mark.parametrize("shape", [(3, 4, 5), (6,), (2, 7)])
def test_column_of_inverts_the_index_map(shape):
    channel = 1 if len(shape) == 2 else None
    index = index_map(shape, channel=channel)
    columns = column_of(shape, index[:, 0], index[:, 1], index[:, 2])
    np.testing.assert_array_equal(columns, np.arange(len(index)))


def test_rgb_pixel_blocks_are_named_by_colour():
    model = keras.Sequential([keras.Input((3, 3, 3)),
                              keras.layers.Conv2D(2, 1, activation="relu", name="c")])
    blocks = build_blocks(model, ["c"], np.ones((2, 3, 3, 3), "float32"))
    assert list(blocks) == ["pixels_r", "pixels_g", "pixels_b", "c"]
    assert [blocks.channels[k] for k in blocks] == [0, 1, 2, None]


def _nested_model():
    base = keras.Sequential([keras.Input((6, 6, 1)),
                             keras.layers.Conv2D(3, 3, activation="relu", name="c1"),
                             keras.layers.Conv2D(2, 3, activation="relu", name="c2")], name="base")
    inputs = keras.Input((6, 6, 1))
    x = keras.layers.Rescaling(2.0, name="scale")(inputs)  # the nested model is not first
    x = keras.layers.Flatten()(base(x))
    return keras.Model(inputs, keras.layers.Dense(2, name="logits")(x)), base


def test_layers_of_nested_models_come_from_the_same_pass():
    model, base = _nested_model()
    x = np.random.default_rng(1).uniform(size=(5, 6, 6, 1)).astype("float32")
    blocks = build_blocks(model, ["base/c1", "c2"], x, include_pixels=False)
    inner = keras.Model(base.inputs[0], [base.get_layer("c1").output, base.get_layer("c2").output])
    c1, c2 = (a.numpy() for a in inner(2.0 * x))
    np.testing.assert_allclose(blocks["base/c1"], np.moveaxis(c1, -1, 1).reshape(5, -1),
                               rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(blocks["c2"], np.moveaxis(c2, -1, 1).reshape(5, -1),
                               rtol=1e-5, atol=1e-6)
    # The user's model is untouched: still one call of each layer, so it still splits there.
    g, h = split_model(model, "base/c2")
    np.testing.assert_allclose(h(g(x)), model(x), rtol=1e-5, atol=1e-6)


def test_planted_factors_are_recovered_through_the_model():
    # Images X = F* P* (sparse, non-negative); every layer of the known model is linear in the
    # pixels with non-negative weights, so every block is F* times a non-negative matrix.
    rng = np.random.default_rng(2)
    n, d = 120, 3
    f = rng.uniform(size=(n, d)) * (rng.uniform(size=(n, d)) < 0.6)
    f[np.arange(4 * d), np.arange(4 * d) % d] = 1.0
    p = rng.uniform(size=(d, HEIGHT * WIDTH * CHANNELS)) * (rng.uniform(size=(d, 40)) < 0.5)
    p[np.arange(d), np.arange(d)] = 1.0
    images = (f @ p).reshape(n, HEIGHT, WIDTH, CHANNELS).astype("float32")
    blocks = build_blocks(_known_model(), ["conv", "dense"], images)
    # float64 fit: the blocks are exact up to float32 rounding (~1e-7), and a float32 fit stops
    # on its own round-off (and reports errors from float32 Gram products) near 1e-4.
    fitted = CoupledNMF(d, max_iter=2000, tol=1e-10, random_state=0).fit(
        {name: block.astype(np.float64) for name, block in blocks.items()})
    assert max(fitted.block_errors_.values()) < 1e-6
    assert np.min(_matched_cosines(fitted.examples_, f)) > 0.999


def test_negative_layer_is_refused_naming_it_and_post_relu_layers(images):
    inputs = keras.Input((HEIGHT, WIDTH, CHANNELS))
    x = keras.layers.Conv2D(3, 1, name="pre")(inputs)
    x = keras.layers.ReLU(name="post")(x)
    model = keras.Model(inputs, keras.layers.MaxPooling2D(name="pooled")(x))
    model.get_layer("pre").set_weights([-np.ones((1, 1, 2, 3), "float32"), np.zeros(3, "float32")])
    with pytest.raises(ValueError, match=r"The activations of layer 'pre' must be non-negative "
                                         r"for the coupled NMF, got a minimum of -[0-9.]+\. .*"
                                         r"Post-ReLU layers of the model: 'post', 'pooled'\."):
        build_blocks(model, ["pre"], images)


@pytest.mark.parametrize(("kwargs", "error", "message"), [
    ({"layers": ["nope"]}, ValueError,
     r"`layers` entry 'nope': `layer` must be one of the model's layers \(.*'conv'.*\)"),
    ({"layers": "conv", "pool": "max"}, ValueError, r"`pool` must be None or 'avg', got 'max'\."),
    ({"layers": [3]}, TypeError, r"`layers` must hold layer names \(str\), got int 3\."),
    ({"layers": ["conv", "conv"]}, ValueError, r"`layers` must not repeat a layer"),
    ({"layers": [], "include_pixels": False}, ValueError,
     r"`layers` must name at least one layer when `include_pixels` is False\."),
])
def test_bad_arguments(known_model, images, kwargs, error, message):
    kwargs = dict(kwargs)
    with pytest.raises(error, match=message):
        build_blocks(known_model, kwargs.pop("layers"), images, **kwargs)


def test_negative_images_cannot_be_pixel_blocks(known_model, images):
    signed = np.concatenate([images, -np.ones_like(images[:1])])
    with pytest.raises(ValueError, match=r"The pixels must be non-negative to form pixel blocks, "
                                         r"got a minimum of -1\. .*`include_pixels=False`\."):
        build_blocks(known_model, ["conv"], signed)
    # The [0, 1] pixels of signed model inputs can be given apart.
    blocks = build_blocks(known_model, [], signed, pixel_images=(signed + 1) / 2)
    np.testing.assert_allclose(blocks["pixels_1"][-1], 0.0)
