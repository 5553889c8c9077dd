"""Class impressions: the image a class's meta-detector responds to most (Wu et al., 3.3).

Activation maximisation of the meta-detector of a layer, mean_{h,w} Σ_c w_c A_c(x), with a
total-variation penalty and no other image prior, by Adam from a seeded noise image, the image
clipped into the input range after every step.
"""

import numpy as np
import tensorflow as tf

from xcraft._validation import check_fraction, check_nonnegative_int, check_random_state

__all__ = ["class_impression", "total_variation"]


def total_variation(images):
    """Mean absolute difference of neighbouring pixels, per image: (n,)."""
    down = tf.reduce_mean(tf.abs(images[:, 1:] - images[:, :-1]), axis=[1, 2, 3])
    right = tf.reduce_mean(tf.abs(images[:, :, 1:] - images[:, :, :-1]), axis=[1, 2, 3])
    return down + right


def class_impression(afi, layer, *, n_steps=200, learning_rate=0.05, tv_weight=0.1,
                     random_state=None):
    """Return the image that maximises the meta-detector of ``layer`` minus a TV penalty.

    Parameters
    ----------
    afi : AfI
        A fitted estimator with ``layer`` among its analysed layers.
    layer : str
    n_steps : int, default=200
        Adam steps.
    learning_rate : float, default=0.05
        Adam's step, as a fraction of the input range's width.
    tv_weight : float, default=0.1
        Weight of the total variation, relative to the meta-detector's mean response on the
        starting image (so that one weight works across layers and models).
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the starting noise image.

    Returns
    -------
    ndarray of shape (height, width, channels), float32
        In the input range.
    """
    layer = afi._check_fitted_layer(layer)
    n_steps = check_nonnegative_int(n_steps, "n_steps")
    learning_rate = check_fraction(learning_rate, "learning_rate", high=np.inf)
    tv_weight = check_fraction(tv_weight, "tv_weight", high=np.inf, inclusive_low=True)
    rng = check_random_state(random_state)
    seed = rng.integers(2**31 - 1, size=2)
    low, high = (float(v) for v in afi.input_range)
    width = high - low
    detector = afi.meta_detector(layer)
    shape = (1, *afi.delta_.shape)
    start = low + width * (0.5 + 0.1 * tf.random.stateless_uniform(shape, seed, -1.0, 1.0))
    image = tf.Variable(start)
    scale = float(tf.reduce_mean(tf.abs(detector(start, training=False)))) + 1e-6
    # A fresh optimiser per call: its slots belong to this image only.
    import keras

    optimizer = keras.optimizers.Adam(learning_rate=learning_rate * width)

    @tf.function
    def step():
        with tf.GradientTape() as tape:
            response = tf.reduce_mean(detector(image, training=False))
            objective = response / scale - tv_weight * total_variation(image)[0] / width
            loss = -objective
        optimizer.apply_gradients([(tape.gradient(loss, image), image)])
        image.assign(tf.clip_by_value(image, low, high))

    for _ in range(n_steps):
        step()
    return image.numpy()[0]
