"""Tests of the shipped demo data and model (xcraft.datasets) and of their maker (_train_demo)."""

import gzip
import pathlib
import struct

import keras
import numpy as np
import pytest

from xcraft import _train_demo, datasets
from xcraft.datasets import (
    DEMO_EARLY_LAYER,
    DEMO_LAYER,
    load_demo_data,
    load_demo_metadata,
    load_demo_model,
)

FASHION_MNIST_DIR = pathlib.Path("/usr/share/datasets/fashion-mnist")
MIN_ACCURACY = 0.88
ACCURACY_SLACK = 0.005  # CPU kernels may round differently from the machine that trained it


@pytest.fixture(scope="module")
def demo_data():
    return load_demo_data()


@pytest.fixture(scope="module")
def metadata():
    return load_demo_metadata()


@pytest.fixture(scope="module")
def model():
    return load_demo_model()


@pytest.fixture(scope="module")
def logits(model, demo_data):
    images, _, _ = demo_data
    return model.predict(images, batch_size=500, verbose=0)


def test_data_shape_dtype_and_range(demo_data, metadata):
    images, labels, class_names = demo_data
    n_images = metadata["subset"]["n_images"]
    assert images.shape == (n_images, 28, 28, 1)
    assert images.dtype == np.float32
    assert labels.shape == (n_images,)
    assert labels.dtype == np.int64
    assert 0.0 <= images.min() and images.max() <= 1.0
    # Real photos of clothes use the whole gray range, not a constant or a rescaled sliver.
    assert images.min() == 0.0 and images.max() == 1.0
    assert class_names == list(_train_demo.CLASS_NAMES) == metadata["class_names"]


def test_data_is_stratified(demo_data, metadata):
    _, labels, class_names = demo_data
    n_per_class = metadata["subset"]["n_per_class"]
    np.testing.assert_array_equal(np.bincount(labels, minlength=len(class_names)),
                                  np.full(len(class_names), n_per_class))
    # Sorted by class, as documented.
    assert np.all(np.diff(labels) >= 0)


def test_data_images_are_distinct(demo_data):
    images, _, _ = demo_data
    flat = images.reshape(images.shape[0], -1)  # (n, 784)
    assert np.unique(flat, axis=0).shape[0] == images.shape[0]


@pytest.mark.skipif(not FASHION_MNIST_DIR.exists(), reason="dataset-fashion-mnist not installed")
def test_data_matches_the_fashion_mnist_test_split():
    test_images, test_labels = _train_demo.load_fashion_mnist(FASHION_MNIST_DIR, "test")
    resource = datasets._resource(datasets._SUBSET_FILE)
    with resource.open("rb") as handle, np.load(handle) as archive:
        indices = archive["source_indices"].astype(np.int64)
        np.testing.assert_array_equal(archive["images"], test_images[indices])
        np.testing.assert_array_equal(archive["labels"], test_labels[indices])


def test_load_demo_data_rejects_unknown_split():
    with pytest.raises(ValueError, match="`split` must be one of 'test', got 'train'."):
        load_demo_data("train")


@pytest.mark.parametrize(
    ("attribute", "loader"),
    [("_SUBSET_FILE", load_demo_data), ("_MODEL_FILE", load_demo_model),
     ("_METADATA_FILE", load_demo_metadata)],
)
def test_missing_file_gives_a_clear_error(monkeypatch, attribute, loader):
    monkeypatch.setattr(datasets, attribute, "no_such_file.bin")
    with pytest.raises(FileNotFoundError,
                       match=r"The xcraft demo file `data/no_such_file.bin` is missing"):
        loader()


def test_model_is_functional_with_logits(model):
    assert isinstance(model, keras.Model)
    assert tuple(model.input_shape) == (None, 28, 28, 1)
    assert tuple(model.output_shape) == (None, 10)
    # No softmax at the end: CRAFT explains logits.
    assert model.get_layer("logits").activation is keras.activations.linear


def test_model_outputs_logits_not_probabilities(logits):
    assert np.any(logits < 0.0) and np.any(logits > 1.0)


def test_model_accuracy_on_shipped_subset(logits, demo_data, metadata):
    _, labels, _ = demo_data
    accuracy = np.mean(np.argmax(logits, axis=1) == labels)
    assert accuracy >= metadata["subset"]["accuracy"] - ACCURACY_SLACK
    assert accuracy >= MIN_ACCURACY


@pytest.mark.parametrize(
    ("layer", "shape"), [(DEMO_LAYER, (7, 7, 64)), (DEMO_EARLY_LAYER, (14, 14, 32))]
)
def test_split_layer_activations_are_nonnegative(model, demo_data, layer, shape):
    images, _, _ = demo_data
    extractor = keras.Model(model.input, model.get_layer(layer).output)
    activations = extractor.predict(images[::10], batch_size=200, verbose=0)
    assert activations.shape == (images[::10].shape[0], *shape)
    assert activations.min() >= 0.0
    # Not a dead layer: NMF needs some signal.
    assert np.mean(activations > 0.0) > 0.05


def test_head_after_demo_layer_needs_only_its_activations(model, demo_data, logits):
    images, _, _ = demo_data
    layer_names = [layer.name for layer in model.layers]
    head_layers = model.layers[layer_names.index(DEMO_LAYER) + 1:]
    activations = keras.Model(model.input, model.get_layer(DEMO_LAYER).output)(images[:64])
    outputs = activations
    for layer in head_layers:  # a chain: each head layer takes the previous one's output only
        outputs = layer(outputs, training=False)
    np.testing.assert_allclose(np.asarray(outputs), logits[:64], rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path, compress):
    array = np.random.default_rng(0).integers(0, 256, size=(3, 4, 5), dtype=np.uint8)
    payload = struct.pack(">HBB3I", 0, 0x08, 3, *array.shape) + array.tobytes()
    path = tmp_path / ("x-idx3-ubyte.gz" if compress else "x-idx3-ubyte")
    path.write_bytes(gzip.compress(payload) if compress else payload)
    result = _train_demo.read_idx(path)
    assert result.dtype == np.uint8
    np.testing.assert_array_equal(result, array)


def test_read_idx_rejects_non_uint8(tmp_path):
    path = tmp_path / "floats-idx1"
    path.write_bytes(struct.pack(">HBBI", 0, 0x0D, 1, 2) + np.zeros(2, ">f4").tobytes())
    with pytest.raises(ValueError, match=r"`path` must be an idx file of uint8"):
        _train_demo.read_idx(path)


def test_read_idx_rejects_truncated_data(tmp_path):
    path = tmp_path / "short-idx1"
    path.write_bytes(struct.pack(">HBBI", 0, 0x08, 1, 5) + bytes(3))
    with pytest.raises(ValueError, match=r"`path` must hold 5 values for shape \(5,\), got 3"):
        _train_demo.read_idx(path)


def test_stratified_indices_draws_each_class_equally():
    labels = np.repeat(np.arange(4), [5, 7, 9, 11])
    indices = _train_demo.stratified_indices(labels, 3, np.random.default_rng(0))
    np.testing.assert_array_equal(np.bincount(labels[indices]), [3, 3, 3, 3])
    assert np.unique(indices).size == indices.size


def test_stratified_indices_rejects_too_many_per_class():
    labels = np.repeat(np.arange(2), [5, 2])
    with pytest.raises(ValueError, match=r"`n_per_class` must be <= 2 \(members of class 1\)"):
        _train_demo.stratified_indices(labels, 3, np.random.default_rng(0))
