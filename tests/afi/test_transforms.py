"""The occluder's transforms: exact rotations, gradients that reach the pixels, seeded noise."""

import math

import numpy as np
import pytest
import tensorflow as tf

from xcraft.afi.transforms import random_transform, rotate_images


@pytest.mark.parametrize("interpolation", ["bilinear", "nearest"])
def test_zero_degrees_is_the_identity(rng, interpolation):
    images = tf.constant(rng.normal(size=(2, 5, 7, 3)))
    rotated = rotate_images(images, tf.zeros(2, tf.float64), interpolation=interpolation)
    np.testing.assert_allclose(rotated.numpy(), images.numpy(), atol=1e-12)


@pytest.mark.parametrize("quarter_turns", [1, 2, 3])
def test_right_angles_with_nearest_equal_rot90(rng, quarter_turns):
    images = tf.constant(rng.normal(size=(3, 6, 6, 2)))
    angles = tf.fill([3], tf.constant(quarter_turns * math.pi / 2, tf.float64))
    rotated = rotate_images(images, angles, interpolation="nearest")
    np.testing.assert_array_equal(rotated.numpy(), tf.image.rot90(images, quarter_turns).numpy())


def test_bilinear_quarter_turn_is_rot90_up_to_round_off(rng):
    images = tf.constant(rng.normal(size=(1, 5, 5, 1)))
    rotated = rotate_images(images, tf.constant([math.pi / 2], tf.float64))
    np.testing.assert_allclose(rotated.numpy(), tf.image.rot90(images).numpy(), atol=1e-9)


def test_rotation_gradient_matches_finite_differences(rng):
    images = tf.constant(rng.normal(size=(1, 5, 6, 2)))
    angles = tf.constant([0.3], tf.float64)  # a generic angle: no sample on a pixel boundary
    theoretical, numerical = tf.test.compute_gradient(
        lambda x: rotate_images(x, angles), [images], delta=1e-5)
    np.testing.assert_allclose(theoretical[0], numerical[0], atol=1e-6)
    assert np.abs(theoretical[0]).sum() > 0


def test_random_transform_is_seeded_bounded_and_differentiable(rng):
    images = tf.constant(rng.uniform(size=(4, 8, 8, 3)), tf.float32)
    kwargs = {"noise": 0.04, "max_rotation": 5.0, "input_range": (0.0, 1.0)}
    first = random_transform(images, tf.constant([1, 2]), **kwargs)
    np.testing.assert_array_equal(first, random_transform(images, tf.constant([1, 2]), **kwargs))
    assert not np.array_equal(first, random_transform(images, tf.constant([1, 3]), **kwargs))
    assert first.numpy().min() >= 0.0 and first.numpy().max() <= 1.0
    delta = tf.Variable(tf.zeros((8, 8, 3)))
    with tf.GradientTape() as tape:
        value = tf.reduce_sum(random_transform(0.5 * images + 0.25 - delta, tf.constant([1, 2]),
                                               **kwargs) ** 2)
    assert np.abs(tape.gradient(value, delta).numpy()).sum() > 0


def test_noise_half_width_is_a_fraction_of_the_range(rng):
    images = tf.constant(np.full((1, 16, 16, 1), 100.0), tf.float32)
    out = random_transform(images, tf.constant([0, 0]), noise=0.04, max_rotation=0.0,
                           input_range=(0.0, 255.0))
    assert np.abs(out.numpy() - 100.0).max() <= 0.04 * 255 + 1e-4
    assert np.abs(out.numpy() - 100.0).max() > 0.5 * 0.04 * 255


def test_unknown_interpolation_is_refused():
    with pytest.raises(ValueError, match=r"`interpolation` must be one of 'bilinear', 'nearest'"):
        rotate_images(tf.zeros((1, 2, 2, 1)), tf.zeros(1), interpolation="cubic")
