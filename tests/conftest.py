"""Shared fixtures: tiny Keras models and a planted-motif image set."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import keras  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

from tests import _synthetic  # noqa: E402

tf.config.experimental.enable_tensor_float_32_execution(False)


@pytest.fixture
def rng():
    return np.random.default_rng(0)


@pytest.fixture(autouse=True)
def _seed_keras():
    keras.utils.set_random_seed(0)


@pytest.fixture(scope="session")
def tiny_model():
    """16×16×3 -> Conv(8, relu) -> GAP -> Dense(3)."""
    keras.utils.set_random_seed(1)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    return keras.Model(inputs, outputs, name="tiny")


@pytest.fixture(scope="session")
def motif_set():
    """Images with a red and/or a blue square motif, labels and motif boxes."""
    return _synthetic.make_motif_images(n_images=48, size=32, seed=0)


@pytest.fixture(scope="session")
def motif_model():
    """A fixed-weight CNN whose class-0 logit counts red and blue motifs."""
    return _synthetic.make_motif_model(size=32)
