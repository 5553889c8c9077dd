import json
import os

import h5py
import keras
import numpy as np
import pytest

from xcraft.plumbing.loading import clean_legacy_config, load_model


def _model():
    inputs = keras.Input((8, 8, 3))
    conv = keras.layers.Conv2D(4, 3, name="conv")(inputs)
    normed = keras.layers.BatchNormalization(name="bn")(conv)
    pooled = keras.layers.GlobalAveragePooling2D()(keras.layers.ReLU(6.0)(normed))
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(pooled))


def _as_keras2_file(model, path):
    """Save ``model`` as HDF5 and give its initializers the ``dtype`` Keras 2.2–2.4 wrote."""
    model.save(str(path) + ".h5")
    os.replace(str(path) + ".h5", path)
    with h5py.File(path, "r+") as file:
        config = json.loads(file.attrs["model_config"])
        added = 0
        for layer in config["config"]["layers"]:
            for key, value in layer["config"].items():
                if key.endswith("initializer") and isinstance(value, dict):
                    value["config"]["dtype"] = "float32"
                    added += 1
        file.attrs["model_config"] = json.dumps(config)
    return added


def test_hdf5_under_any_suffix_loads_and_computes_the_same(tmp_path, rng):
    model = _model()
    path = tmp_path / "detector.model"
    model.save(str(tmp_path / "plain.h5"))
    os.replace(tmp_path / "plain.h5", path)
    loaded, changes = load_model(path)
    assert changes == []
    x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))


def test_a_keras2_file_is_refused_with_the_option_then_cleaned_exactly(tmp_path, rng):
    model = _model()
    path = tmp_path / "legacy.model"
    added = _as_keras2_file(model, path)
    before = path.read_bytes()
    with pytest.raises(ValueError, match=r"clean_legacy_config=True.*--clean-legacy-config"):
        load_model(path)
    loaded, changes = load_model(path, clean_legacy_config=True)
    assert len(changes) == added > 0
    assert "conv.kernel_initializer: dropped dtype" in changes
    x = rng.uniform(-1, 1, (3, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert path.read_bytes() == before  # the user's file is never rewritten


def test_clean_legacy_config_touches_initializers_only():
    config = {"class_name": "Dense", "config": {
        "name": "d", "dtype": "float32", "units": 3,
        "kernel_initializer": {"class_name": "GlorotUniform",
                               "config": {"seed": None, "dtype": "float32"}},
        "bias_initializer": {"class_name": "Zeros", "config": {}}}}
    cleaned, changes = clean_legacy_config(config)
    assert changes == ["d.kernel_initializer: dropped dtype"]
    assert cleaned["config"]["dtype"] == "float32"  # the layer's own dtype stays
    assert cleaned["config"]["kernel_initializer"]["config"] == {"seed": None}
    assert config["config"]["kernel_initializer"]["config"]["dtype"] == "float32"  # a copy


def test_keras_archive_loads(tmp_path, rng):
    model = _model()
    model.save(tmp_path / "m.keras")
    loaded, changes = load_model(tmp_path / "m.keras", clean_legacy_config=True)
    x = rng.uniform(-1, 1, (2, 8, 8, 3)).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(loaded(x)), np.asarray(model(x)))
    assert changes == []


def test_what_is_not_a_model_is_said(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_model(tmp_path / "missing.h5")
    (tmp_path / "notes.h5").write_text("hello")
    with pytest.raises(ValueError, match=r"neither a `.keras` archive nor an HDF5 file"):
        load_model(tmp_path / "notes.h5")
    (tmp_path / "saved").mkdir()
    (tmp_path / "saved" / "saved_model.pb").write_bytes(b"")
    with pytest.raises(ValueError, match="TensorFlow SavedModel.*TFSMLayer"):
        load_model(tmp_path / "saved")
