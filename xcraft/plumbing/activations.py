"""Streamed forward passes of the feature extractor g.

The activations of many crops at a wide layer do not fit in memory (100 000 crops × 14 × 14 × 2048
floats is 160 GB), but their spatial means do (0.8 GB). So crops are cut, resized, pushed through
g and pooled one fixed-shape batch at a time inside one ``tf.function``; only the pooled
(n_crops × channels) matrix is kept. The last batch is padded to the same shape so the function
traces once.
"""

import weakref

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import keras
import numpy as np
import tensorflow as tf

from xcraft._validation import check_positive_int
from xcraft.ops._memory import aligned_empty
from xcraft.ops.distribute import run_sharded
from xcraft.plumbing.crops import normalized_boxes

__all__ = ["pooled_crop_activations", "batched_activations", "check_nonnegative", "call_model"]

NEGATIVE_TOLERANCE = 1e-6  # float round-off of a post-ReLU layer; anything below is a real sign


def _progress(total, desc, verbose):
    if not verbose:
        return None
    # Plain text bars: tqdm.auto would pick notebook widgets, which warn ("IProgress not
    # found") wherever ipywidgets is missing, and text bars render in notebooks too.
    from tqdm import tqdm

    return tqdm(total=total, desc=desc, unit="img", leave=False)


def _pool(activations, tokens=None):
    """Spatially average (n, h, w, c) activations, or (n, tokens, c) ones over ``tokens``.

    ``tokens`` is the :class:`xcraft.plumbing.tokens.TokenLayout` of a token layer: which
    tokens enter the mean (the patch tokens, and the leading ones when kept). (n, c) is left
    alone.
    """
    rank = activations.shape.rank
    if rank == 4:
        return tf.reduce_mean(activations, axis=[1, 2])
    if rank == 2:
        return activations
    if rank == 3 and tokens is not None:
        return tokens.pool(activations)  # (n, c)
    raise ValueError(
        "`input_to_latent_model` must return activations of shape (batch, channels), "
        f"(batch, tokens, channels) or (batch, height, width, channels), got rank {rank}."
    )


def check_nonnegative(min_value, layer_name):
    """Raise a ``ValueError`` when the activations' minimum shows the layer is not post-ReLU."""
    if min_value < -NEGATIVE_TOLERANCE:
        raise ValueError(
            f"The activations of layer {layer_name!r} must be non-negative for NMF, got a minimum "
            f"of {min_value:.4g}. Split the model after a ReLU (or ReLU6, or a pooling of one), "
            f"e.g. the output of a residual block rather than its pre-activation sum, or use "
            f"solver='semi-nmf' (or 'auto'), which factorises signed activations."
        )


def call_model(model, inputs):
    """Call a Keras model in inference mode, or any other callable as it is."""
    if isinstance(model, keras.layers.Layer):
        return tf.convert_to_tensor(model(inputs, training=False))
    return tf.convert_to_tensor(model(inputs))


# One compiled function per (model, kind): tracing g costs seconds on real networks, and `fit`,
# `transform` and the importance all push batches through the same g. Keyed weakly so that a
# model the user drops is not kept alive by the cache; the functions reach the model through a
# weak reference for the same reason.
_COMPILED = weakref.WeakKeyDictionary()


def _compiled(model, key, build):
    try:
        per_model = _COMPILED.setdefault(model, {})
        model_ref = weakref.ref(model)
    except TypeError:  # not weak-referenceable: compile without caching
        return build(lambda: model)
    if key not in per_model:
        per_model[key] = build(model_ref)
    return per_model[key]


def _crop_embedder(model, crop_size, image_shape, tokens=None):
    # A free batch axis: one trace serves every batch size, so the last batch runs at its own
    # size instead of being padded to a full one (up to batch_size - 1 wasted forward passes).
    signature = [tf.TensorSpec((None, *image_shape), tf.float32),
                 tf.TensorSpec((None, 4), tf.float32)]

    def build(model_ref):
        @tf.function(input_signature=signature, autograph=False)
        def crop_and_embed(batch_images, batch_coords):
            index = tf.range(tf.shape(batch_images)[0])
            crops = tf.image.crop_and_resize(batch_images, batch_coords, index, crop_size)
            raw = call_model(model_ref(), crops)
            pooled = _pool(raw, tokens)
            # The minimum of the raw map, not of its mean: a pre-ReLU layer whose negatives
            # average out would otherwise pass, and its spatial maps would use them.
            return pooled, tf.reduce_min(raw), tf.reduce_all(tf.math.is_finite(raw))

        return crop_and_embed

    return _compiled(model, ("crops", crop_size, image_shape, tokens), build)


def _embedder(model, pool, image_shape, tokens=None):
    signature = [tf.TensorSpec((None, *image_shape), tf.float32)]  # see _crop_embedder

    def build(model_ref):
        @tf.function(input_signature=signature, autograph=False)
        def embed(batch):
            activations = call_model(model_ref(), batch)
            return _pool(activations, tokens) if pool else activations

        return embed

    return _compiled(model, ("images", pool, image_shape, tokens), build)


def _layer_name(feature_extractor):
    try:
        return feature_extractor.layers[-1].name
    except (AttributeError, IndexError):
        return getattr(feature_extractor, "name", type(feature_extractor).__name__)


def pooled_crop_activations(
    feature_extractor, images, boxes, output_size, *, batch_size=64, verbose=True,
    allow_negative=False, return_min=False, tokens=None,
):
    """Return the spatially averaged activations of g on every crop, streamed.

    Parameters
    ----------
    feature_extractor : callable
        g: a Keras model (or callable) from images to activations.
    images : ndarray of shape (n_images, height, width, channels), float32
    boxes : ndarray of shape (n_crops, 4)
        ``(image_index, y, x, size)`` rows from :func:`xcraft.plumbing.crops.sample_crop_boxes`.
    output_size : tuple of int
        Size the crops are resized to (the model's input size).
    batch_size : int, default=64
        Crops per forward pass.
    verbose : bool, default=True
        Show a progress bar.
    allow_negative : bool, default=False
        Accept signed activations (for semi-NMF) instead of refusing them.
    return_min : bool, default=False
        Also return the minimum of the raw (unpooled) activations.
    tokens : xcraft.plumbing.tokens.TokenLayout, default=None
        For a token layer (n, tokens, channels): which tokens are pooled. The minimum and the
        finiteness check cover every token, pooled or not, since the head receives them all.

    Returns
    -------
    activations : ndarray of shape (n_crops, channels), float32
        Pooled activations (non-negative unless ``allow_negative``).
    raw_min : float
        Only with ``return_min``.

    Raises
    ------
    ValueError
        If any raw activation is negative (the layer is not post-ReLU) or not finite.
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    images = np.asarray(images, np.float32)
    boxes = np.asarray(boxes)
    coords = normalized_boxes(boxes, images.shape[1:3])
    crop_embedder = _crop_embedder(feature_extractor, tuple(int(s) for s in output_size),
                                   tuple(int(s) for s in images.shape[1:]), tokens)

    n_crops = len(boxes)
    batch_size = min(batch_size, n_crops)
    pooled_all = None
    min_value, finite = np.inf, True
    bar = _progress(n_crops, "activations", verbose)
    for start in range(0, n_crops, batch_size):
        stop = min(start + batch_size, n_crops)
        # Each crop's own image goes in with it, so the function's inputs do not depend on the
        # number of images (no retracing, no image set captured in the graph).
        # Under a multi-device tf.distribute strategy each device takes a shard of the batch.
        parts = run_sharded(crop_embedder, tf.constant(images[boxes[start:stop, 0]]),
                            tf.constant(coords[start:stop], tf.float32))
        pooled = np.concatenate([part[0].numpy() for part in parts])
        batch_min = min(float(part[1]) for part in parts)
        batch_finite = all(bool(part[2]) for part in parts)
        if pooled_all is None:
            # Aligned so that the NMF can hand it to TensorFlow without a copy.
            pooled_all = aligned_empty((n_crops, pooled.shape[1]), np.float32)
        pooled_all[start:stop] = pooled
        min_value = min(min_value, float(batch_min))
        finite = finite and bool(batch_finite)
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    layer = _layer_name(feature_extractor)
    if not finite:
        raise ValueError(
            f"The activations of layer {layer!r} must be finite, got NaN or infinite values on "
            f"some crops (images up to |{float(np.abs(images).max()):.3g}|). Check that the "
            f"images are preprocessed as the model expects."
        )
    if allow_negative:
        return (pooled_all, min_value) if return_min else pooled_all
    check_nonnegative(min_value, layer)
    np.maximum(pooled_all, 0.0, out=pooled_all)  # round-off negatives, in place
    return (pooled_all, min_value) if return_min else pooled_all


def batched_activations(feature_extractor, images, *, batch_size=64, verbose=False, pool=False,
                        tokens=None):
    """Return g(images) computed batch by batch (optionally spatially averaged).

    Parameters
    ----------
    feature_extractor : callable
        g: images to activations.
    images : ndarray of shape (n_images, height, width, channels)
    batch_size : int, default=64
    verbose : bool, default=False
        Show a progress bar.
    pool : bool, default=False
        Average 4-D activations over space (token activations over the pooled tokens).
    tokens : xcraft.plumbing.tokens.TokenLayout, default=None
        The layout of a token layer, needed to pool one.

    Returns
    -------
    ndarray of shape (n_images, ..., channels), float32
    """
    batch_size = check_positive_int(batch_size, "batch_size")
    images = np.asarray(images, np.float32)
    n_images = len(images)
    batch_size = min(batch_size, n_images)
    embed = _embedder(feature_extractor, bool(pool), tuple(int(s) for s in images.shape[1:]),
                      tokens)

    outputs = None
    bar = _progress(n_images, "activations", verbose)
    for start in range(0, n_images, batch_size):
        stop = min(start + batch_size, n_images)
        batch = np.concatenate([part.numpy() for part in run_sharded(
            embed, tf.constant(images[start:stop]))])
        if outputs is None:
            outputs = np.empty((n_images, *batch.shape[1:]), np.float32)
        outputs[start:stop] = batch
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    return outputs
