"""Differentiable random transforms for AfI: small rotations and uniform noise, as TF ops.

The occluder of Wu et al. (CVPR 2020) must survive a random transform t of the occluded image,
so that it removes the class's features rather than exploiting one pixel-exact adversarial
pattern. Both transforms are written with ``tf.gather`` and arithmetic only, so the gradient of a
loss on t(x − δ) reaches δ through them.
"""

import math

import tensorflow as tf

__all__ = ["rotate_images", "random_transform"]

_INTERPOLATIONS = ("bilinear", "nearest")


def _gather_pixels(flat, rows, cols, width):
    """Pixels at integer (rows, cols) of images flattened to (n, h·w, c): (n, h, w, c)."""
    index = rows * width + cols  # (n, h, w)
    return tf.gather(flat, index, batch_dims=1)


def rotate_images(images, angles, *, interpolation="bilinear"):
    """Rotate each image counter-clockwise about its centre, differentiably in the pixels.

    Parameters
    ----------
    images : tf.Tensor of shape (n, height, width, channels)
    angles : tf.Tensor of shape (n,)
        Angles in radians, counter-clockwise as the image is displayed (row 0 on top).
    interpolation : {"bilinear", "nearest"}, default="bilinear"

    Returns
    -------
    tf.Tensor of shape (n, height, width, channels)
        Output pixel (r, c) samples the input at the inverse rotation of (r, c); points that
        fall outside the image take the nearest border pixel (edge replication). A 90° turn of
        a square image with nearest interpolation equals ``tf.image.rot90``.

    Examples
    --------
    >>> import numpy as np
    >>> x = tf.constant(np.arange(4.0).reshape(1, 2, 2, 1))
    >>> rotate_images(x, tf.constant([0.0], tf.float64))[0, ..., 0].numpy()
    array([[0., 1.],
           [2., 3.]])
    """
    if interpolation not in _INTERPOLATIONS:
        listed = ", ".join(repr(i) for i in _INTERPOLATIONS)
        raise ValueError(f"`interpolation` must be one of {listed}, got {interpolation!r}.")
    images = tf.convert_to_tensor(images)
    dtype = images.dtype
    shape = tf.shape(images)
    n, height, width, channels = shape[0], shape[1], shape[2], shape[3]
    angles = tf.cast(tf.reshape(angles, [-1]), dtype)
    rows_f = tf.cast(tf.range(height), dtype)
    cols_f = tf.cast(tf.range(width), dtype)
    centre_r = (tf.cast(height, dtype) - 1.0) / 2.0
    centre_c = (tf.cast(width, dtype) - 1.0) / 2.0
    # Display coordinates with the y axis up: u to the right, v upwards, origin at the centre.
    u = (cols_f - centre_c)[None, None, :]  # (1, 1, w)
    v = -(rows_f - centre_r)[None, :, None]  # (1, h, 1)
    cos = tf.cos(angles)[:, None, None]  # (n, 1, 1)
    sin = tf.sin(angles)[:, None, None]
    # The source of an output point is the output point turned back by −θ.
    u_src = cos * u + sin * v  # (n, h, w)
    v_src = -sin * u + cos * v
    src_c = centre_c + u_src
    src_r = centre_r - v_src
    flat = tf.reshape(images, tf.stack([n, height * width, channels]))
    max_r, max_c = height - 1, width - 1
    if interpolation == "nearest":
        rows = tf.clip_by_value(tf.cast(tf.round(src_r), tf.int32), 0, max_r)
        cols = tf.clip_by_value(tf.cast(tf.round(src_c), tf.int32), 0, max_c)
        return _gather_pixels(flat, rows, cols, width)
    src_r = tf.clip_by_value(src_r, 0.0, tf.cast(max_r, dtype))
    src_c = tf.clip_by_value(src_c, 0.0, tf.cast(max_c, dtype))
    r0f, c0f = tf.floor(src_r), tf.floor(src_c)
    wr = (src_r - r0f)[..., None]  # (n, h, w, 1): weight of the lower neighbour row
    wc = (src_c - c0f)[..., None]
    r0 = tf.cast(r0f, tf.int32)
    c0 = tf.cast(c0f, tf.int32)
    r1 = tf.minimum(r0 + 1, max_r)
    c1 = tf.minimum(c0 + 1, max_c)
    top = (1.0 - wc) * _gather_pixels(flat, r0, c0, width) + wc * _gather_pixels(
        flat, r0, c1, width
    )
    bottom = (1.0 - wc) * _gather_pixels(flat, r1, c0, width) + wc * _gather_pixels(
        flat, r1, c1, width
    )
    return (1.0 - wr) * top + wr * bottom


def random_transform(images, seed, *, noise, max_rotation, input_range,
                     interpolation="bilinear"):
    """Rotate each image by a random angle in ±``max_rotation`` degrees, then add uniform noise.

    Parameters
    ----------
    images : tf.Tensor of shape (n, height, width, channels)
    seed : tf.Tensor of shape (2,), int
        Seed of ``tf.random.stateless_uniform``: the same seed draws the same transform.
    noise : float
        Half-width of the uniform pixel noise, as a fraction of the input range's width.
    max_rotation : float
        Largest rotation, in degrees.
    input_range : tuple of float
        (low, high): the result is clipped into it.
    interpolation : {"bilinear", "nearest"}, default="bilinear"

    Returns
    -------
    tf.Tensor of shape (n, height, width, channels)
    """
    images = tf.convert_to_tensor(images)
    dtype = images.dtype
    low, high = float(input_range[0]), float(input_range[1])
    seed = tf.cast(seed, tf.int64)
    angle_seed = tf.random.experimental.stateless_fold_in(seed, 0)
    noise_seed = tf.random.experimental.stateless_fold_in(seed, 1)
    out = images
    if max_rotation > 0:
        limit = math.radians(float(max_rotation))
        angles = tf.random.stateless_uniform(
            tf.shape(images)[:1], angle_seed, -limit, limit, dtype=dtype
        )
        out = rotate_images(out, angles, interpolation=interpolation)
    if noise > 0:
        half_width = float(noise) * (high - low)
        out = out + tf.random.stateless_uniform(
            tf.shape(images), noise_seed, -half_width, half_width, dtype=dtype
        )
    return tf.clip_by_value(out, low, high)
