"""AfI, "Attacking for Interpretability" (Wu et al., CVPR 2020): a class-wide feature occluder.

One perturbation δ learnt for all the images of a class removes what the model sees of the
class; the drop it causes in each layer's neurons ranks them (eq. 6-8), their weighted sum is a
meta-detector of the class (eq. 9), and the MMD between the meta-detector's responses to a
concept's probe images and to random images scores the concept (section 3.2, with permutation
p-values and random-set spreads added here).

- :class:`AfI` (``xcraft.afi.occluder``): the estimator;
- :mod:`xcraft.afi.transforms`: the differentiable rotation and noise of the occluder's t;
- :mod:`xcraft.afi.concepts`: MMD concept importance; :mod:`xcraft.afi.impression`: class
  impressions; :mod:`xcraft.afi.evaluation`: the distillation test and SSC/SDC curves;
- :mod:`xcraft.afi.io`: save / load (npz + JSON, never pickle);
- :func:`occluder_concept_importance`: the occluder's effect on any concept coefficients (what
  CRAFT's ``estimate_importance(method="afi")`` calls).
"""

import numpy as np

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

__all__ = ["AfI", "occluder_concept_importance"]


def __getattr__(name):
    if name == "AfI":
        from xcraft.afi.occluder import AfI

        globals()["AfI"] = AfI
        return AfI
    raise AttributeError(f"module 'xcraft.afi' has no attribute {name!r}")


def occluder_concept_importance(delta, images, coefficients_fn, *, input_range=None,
                                batch_size=64):
    """Rank concepts by the occluder's effect: max(mean_i U(x_i) − U(x_i − δ), 0).

    Parameters
    ----------
    delta : ndarray of shape (height, width, channels)
        An occluder, e.g. ``AfI(...).fit(images, class_id).delta_``.
    images : ndarray of shape (n_images, height, width, channels)
        Images of the class.
    coefficients_fn : callable
        Maps a batch of images (a float32 array of shape (b, height, width, channels)) to
        concept coefficients of shape (b, r), or (b, h, w, r) (summed over space, as eq. 8 sums
        a feature map).
    input_range : tuple of float, optional
        (low, high): occluded images are clipped into it (as the occluder was learnt).
    batch_size : int, default=64
        Images per call of ``coefficients_fn``.

    Returns
    -------
    ndarray of shape (r,), float64
        The mean drop of each concept's coefficient under the occluder, clipped at 0.

    Raises
    ------
    ValueError
        If ``delta`` does not have the images' shape, or ``coefficients_fn`` returns an array of
        another batch size or rank.

    Examples
    --------
    >>> import numpy as np
    >>> images = np.ones((2, 2, 2, 1), np.float32)
    >>> occluder_concept_importance(np.full((2, 2, 1), 0.5), images,
    ...                             lambda x: x.reshape(len(x), -1)[:, :2])
    array([0.5, 0.5])
    """
    from xcraft._validation import check_images, check_positive_int

    images = check_images(images)
    batch_size = check_positive_int(batch_size, "batch_size")
    delta = np.asarray(delta, np.float32)
    if delta.shape != images.shape[1:]:
        raise ValueError(
            f"`delta` must have the images' shape {images.shape[1:]}, got {delta.shape}."
        )
    if not callable(coefficients_fn):
        raise TypeError(
            f"`coefficients_fn` must be callable, got {type(coefficients_fn).__name__}."
        )
    occluded = images - delta
    if input_range is not None:
        occluded = np.clip(occluded, float(input_range[0]), float(input_range[1]))
    total = None
    for start in range(0, len(images), batch_size):
        stop = min(start + batch_size, len(images))
        clean = _coefficients(coefficients_fn, images[start:stop], stop - start)
        dropped = _coefficients(coefficients_fn, occluded[start:stop], stop - start)
        part = (clean - dropped).sum(axis=0)
        total = part if total is None else total + part
    return np.maximum(total / len(images), 0.0)


def _coefficients(coefficients_fn, batch, expected):
    values = coefficients_fn(batch)
    if hasattr(values, "numpy") and callable(values.numpy):
        values = values.numpy()
    values = np.asarray(values, np.float64)
    if values.ndim not in (2, 4) or len(values) != expected:
        raise ValueError(
            f"`coefficients_fn` must return coefficients of shape (batch, r) or (batch, h, w, "
            f"r), got shape {values.shape} for a batch of {expected} images."
        )
    return values.reshape(len(values), -1, values.shape[-1]).sum(axis=1)  # (b, r)
