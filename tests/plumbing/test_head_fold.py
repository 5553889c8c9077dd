"""Folding a head's leading affine layers: what folds, what must not, and exactness."""

import keras
import numpy as np
import pytest
import tensorflow as tf

from tests import _synthetic
from xcraft.plumbing.head_fold import fold_head


def functional(shape, *layers):
    inputs = keras.Input(shape)
    x = inputs
    for layer in layers:
        x = layer(x)
    return keras.Model(inputs, x)


class ScaledDense(keras.layers.Dense):
    """A Dense subclass whose call is not affine in the way Dense's is."""

    def call(self, inputs, training=None):
        return super().call(inputs * inputs)


# name -> (builder, input shape, number of steps expected in the rest)
FOLDABLE = {
    "dense_relu": (lambda: functional((6,), keras.layers.Dense(8, activation="relu"),
                                      keras.layers.Dense(3)), (6,), 2),
    "dropout_dense_softmax": (lambda: functional((6,), keras.layers.Dropout(0.5),
                                                 keras.layers.Dense(3, activation="softmax")),
                              (6,), 1),
    "sequential_bn_gap_dense": (lambda: keras.Sequential([
        keras.Input((3, 3, 6)), _synthetic.trained_batch_norm((3, 3, 6), 0),
        keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(4, activation="relu"),
        keras.layers.Dropout(0.3), keras.layers.Dense(3)]), (3, 3, 6), 3),
    "functional_bn_gap_dense": (lambda: functional(
        (3, 3, 6), _synthetic.trained_batch_norm((3, 3, 6), 1),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(4)), (3, 3, 6), 0),
    "flatten_linear_dense_chain": (lambda: functional(
        (2, 2, 5), keras.layers.Flatten(), keras.layers.Dense(7), keras.layers.Activation(
            "linear"), keras.layers.Dense(6), keras.layers.ReLU(), keras.layers.Dense(3)),
        (2, 2, 5), 2),
    # Dense on a rank-4 input acts on the last axis; pooling and permutes stay linear.
    "avgpool_dense_spatial": (lambda: functional(
        (4, 4, 5), keras.layers.AveragePooling2D(2), keras.layers.Dense(6),
        keras.layers.Permute((2, 1, 3)), keras.layers.Reshape((24,)),
        keras.layers.Activation("tanh"), keras.layers.Dense(3)), (4, 4, 5), 2),
    "everything_linear": (lambda: functional(
        (3, 3, 4), keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)), (3, 3, 4), 0),
}


@pytest.mark.parametrize("name", sorted(FOLDABLE))
def test_folded_head_equals_head_and_prefix_is_affine(name, rng):
    build, shape, n_rest = FOLDABLE[name]
    head = build()
    folded = fold_head(head)
    assert folded is not None and len(folded.rest_steps) == n_rest
    x, y = (tf.constant(rng.uniform(0.0, 2.0, size=(5, *shape)), tf.float32) for _ in range(2))
    np.testing.assert_allclose(folded(x).numpy(), head(x).numpy(), rtol=1e-5, atol=1e-6)
    # L(x + 2y) - L(0) = (L(x) - L(0)) + 2 (L(y) - L(0)): the prefix is affine.
    zero = folded.prefix(tf.zeros_like(x))
    lhs = folded.prefix(x + 2.0 * y) - zero
    rhs = (folded.prefix(x) - zero) + 2.0 * (folded.prefix(y) - zero)
    np.testing.assert_allclose(lhs.numpy(), rhs.numpy(), rtol=1e-4, atol=1e-4)


def lora_head():
    head = functional((6,), keras.layers.Dense(8, activation="relu"), keras.layers.Dense(3))
    head.layers[1].enable_lora(2)
    return head


def branching_head():
    inputs = keras.Input((6,))
    added = keras.layers.Add()([keras.layers.Dense(3)(inputs), keras.layers.Dense(3)(inputs)])
    return keras.Model(inputs, added)


def training_fixed_head():
    inputs = keras.Input((6,))
    dropped = keras.layers.Dropout(0.5)(inputs, training=True)  # Monte-Carlo dropout
    return keras.Model(inputs, keras.layers.Dense(3)(dropped))


def two_output_head():
    inputs = keras.Input((6,))
    return keras.Model(inputs, [keras.layers.Dense(3)(inputs), keras.layers.Dense(2)(inputs)])


class Subclassed(keras.Model):
    def __init__(self):
        super().__init__()
        self.dense = keras.layers.Dense(3)

    def call(self, inputs):
        return self.dense(inputs)


NOT_FOLDABLE = {
    "conv_first": lambda: functional((3, 3, 6), keras.layers.Conv2D(4, 1),
                                     keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(3)),
    "relu_first": lambda: functional((6,), keras.layers.ReLU(), keras.layers.Dense(3)),
    "no_dense_in_prefix": lambda: functional((3, 3, 6), keras.layers.GlobalAveragePooling2D(),
                                             keras.layers.ReLU(), keras.layers.Dense(3)),
    "branching": branching_head,
    "dense_subclass": lambda: functional((6,), ScaledDense(3)),
    "lora": lora_head,
    "training_fixed_in_graph": training_fixed_head,
    "two_outputs": two_output_head,
    "subclassed_model": Subclassed,
    "nested_model_first": lambda: functional(
        (6,), functional((6,), keras.layers.Dense(4)), keras.layers.Dense(3)),
    "callable": lambda: (lambda a: a),
}


@pytest.mark.parametrize("name", sorted(NOT_FOLDABLE))
def test_not_foldable_heads_give_none(name):
    assert fold_head(NOT_FOLDABLE[name]()) is None
