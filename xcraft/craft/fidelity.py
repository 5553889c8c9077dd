"""Concept deletion and insertion curves: does an importance order find the concepts that matter?

Given an order of the concepts (most important first), deletion removes the top-k concepts from
the coefficients ``u`` (sets them to 0) and insertion keeps only the top-k, for k = 0 .. r; the
activations ``u W`` are rebuilt and the head's class score is read. A faithful order makes the
deletion curve fall fast (low area) and the insertion curve rise fast (high area) (Fel et al.,
CVPR 2023, Fig. 6).

Every curve point is a mask on ``u`` shared by all images, so all orders, all k and all images go
through the batched engine of :mod:`xcraft.craft.importance` in a few head calls.
"""

import dataclasses

import numpy as np

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import tensorflow as tf

from xcraft._validation import check_nonnegative_int, check_random_state
from xcraft.craft.importance import _check_budget, _check_coefficients, _check_head, _masked_scores

__all__ = ["FidelityCurves", "concept_deletion_insertion"]

RANDOM = "random"
KINDS = ("deletion", "insertion", "deletion_proba", "insertion_proba")


@dataclasses.dataclass(frozen=True)
class FidelityCurves:
    """Deletion and insertion curves of the class score, averaged over images.

    Attributes
    ----------
    fractions : ndarray of shape (n_concepts + 1,)
        ``k / n_concepts`` for k = 0 .. n_concepts, the x-axis of every curve.
    curves : dict of str to dict of str to ndarray of shape (n_concepts + 1,)
        ``curves[kind][order]``, with ``kind`` one of ``"deletion"`` and ``"insertion"`` (the
        class logit) and ``"deletion_proba"`` and ``"insertion_proba"`` (its softmax
        probability), and ``order`` a name given in ``orders`` or ``"random"`` (the mean over
        the random orders).
    aucs : dict of str to dict of str to float
        ``aucs[kind][order]``: trapezoidal area under the curve against ``fractions`` (so over
        [0, 1]); for ``"random"`` the mean of the random orders' areas. Lower is better for
        deletion, higher for insertion.
    random_std : dict of str to ndarray of shape (n_concepts + 1,)
        ``random_std[kind]``: standard deviation of the random orders' curves (empty without
        random orders).
    orders : dict of str to ndarray
        The concept orders used, most important first: shape (n_concepts,) per name, and
        (n_random, n_concepts) for ``"random"``.
    """

    fractions: np.ndarray
    curves: dict
    aucs: dict
    random_std: dict
    orders: dict


def _area(curve, fractions):
    """Trapezoidal area of ``curve`` (..., k) over ``fractions`` (k,)."""
    widths = np.diff(fractions)  # (k - 1,)
    return np.sum(0.5 * (curve[..., 1:] + curve[..., :-1]) * widths, axis=-1)


def _check_orders(orders, n_concepts, n_random):
    """Turn ``orders`` (names to permutations or importances) into int permutations."""
    if not isinstance(orders, dict):
        raise TypeError(
            f"`orders` must be a dict mapping names to concept orders or importances, "
            f"got {type(orders).__name__}."
        )
    if not orders and n_random == 0:
        raise ValueError(
            "`orders` must hold at least one order when `n_random` is 0, got an empty dict."
        )
    checked = {}
    for name, value in orders.items():
        if not isinstance(name, str):
            raise TypeError(f"`orders` keys must be str, got {type(name).__name__} {name!r}.")
        if name == RANDOM and n_random:
            raise ValueError(
                f"`orders` must not use the name {RANDOM!r}, reserved for the {n_random} random "
                f"orders; rename it or pass n_random=0."
            )
        array = np.asarray(value.numpy() if hasattr(value, "numpy") else value)
        if array.shape != (n_concepts,):
            raise ValueError(
                f"`orders[{name!r}]` must have shape ({n_concepts},) (one entry per concept), "
                f"got shape {array.shape}."
            )
        if np.issubdtype(array.dtype, np.integer):
            if not np.array_equal(np.sort(array), np.arange(n_concepts)):
                raise ValueError(
                    f"`orders[{name!r}]` must be a permutation of the concept indices 0 .. "
                    f"{n_concepts - 1} (most important first), got {array.tolist()}."
                )
            checked[name] = array.astype(np.int64)
        elif np.issubdtype(array.dtype, np.floating):
            if not np.all(np.isfinite(array)):
                raise ValueError(f"`orders[{name!r}]` must be finite, got {array.tolist()}.")
            # Importances: the most important concept first; ties keep the concept order.
            checked[name] = np.argsort(-array, kind="stable").astype(np.int64)
        else:
            raise TypeError(
                f"`orders[{name!r}]` must hold concept indices (int) or importances (float), "
                f"got dtype {array.dtype}."
            )
    return checked


def _curve_masks(permutations):
    """Deletion and insertion masks of each order: (n_orders, 2, r + 1, r).

    ``[o, 0, k]`` zeroes the first ``k`` concepts of order ``o``; ``[o, 1, k]`` keeps only them.
    """
    n_orders, r = permutations.shape
    ranks = np.empty_like(permutations)
    np.put_along_axis(ranks, permutations, np.arange(r)[None, :], axis=1)  # rank of each concept
    ks = np.arange(r + 1)
    deletion = ranks[:, None, :] >= ks[None, :, None]  # (n_orders, r + 1, r)
    return np.stack([deletion, ~deletion], axis=1)  # (n_orders, 2, r + 1, r)


def concept_deletion_insertion(u, concept_bank, head, class_id, orders, *, n_random=10,
                               random_state=None, batch_size=None, max_batch_bytes=2**28,
                               verbose=False):
    """Compute concept deletion and insertion curves of the class score for concept orders.

    Parameters
    ----------
    u : array-like of shape (n, n_concepts) or (n, height, width, n_concepts)
        Concept coefficients of ``n`` images (pooled or spatial).
    concept_bank : array-like of shape (n_concepts, n_channels)
        The concept bank ``W``.
    head : callable
        Activations (batch, [height, width,] n_channels) to logits (batch, n_classes).
    class_id : int
        Column of the logits explained.
    orders : dict of str to array-like of shape (n_concepts,)
        Each value is either a permutation of the concept indices (int dtype, most important
        first) or importances (float dtype, sorted in decreasing order, ties by index), e.g.
        ``{"sobol": sobol_importances, "tcav": tcav_importances}``.
    n_random : int, default=10
        Number of random orders, averaged into the ``"random"`` curve (0 for none).
    random_state : None, int or numpy.random.Generator, default=None
        Seeds the random orders.
    batch_size : int, default=None
        Perturbed activations per head call; ``None`` derives it from ``max_batch_bytes``.
    max_batch_bytes : int, default=2**28
        Memory budget of one head call (see :func:`xcraft.craft.importance.concept_importance`).
    verbose : bool, default=False
        Show a progress bar over head calls.

    Returns
    -------
    result : FidelityCurves
        Curves of the class logit and probability against ``k / n_concepts``, their areas and
        the orders used. ``curves["deletion"][name][0]`` is the mean score of ``u W`` and
        ``curves["deletion"][name][-1]`` that of the zero activation.

    Raises
    ------
    TypeError, ValueError
        On invalid arguments or orders.

    Notes
    -----
    The head must return logits: the probabilities are their softmax. The masks shared by
    several orders (k = 0 and k = n_concepts of every order, say) are evaluated once.

    Examples
    --------
    >>> import keras
    >>> head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> result = concept_deletion_insertion(np.ones((4, 2)), np.eye(2, 3), head, 0,
    ...                                     {"first": [0, 1]}, n_random=2, random_state=0)
    >>> sorted(result.aucs["deletion"])
    ['first', 'random']
    """
    u, w = _check_coefficients(u, concept_bank)
    head = _check_head(head)
    class_id = check_nonnegative_int(class_id, "class_id")
    n_random = check_nonnegative_int(n_random, "n_random")
    max_batch_bytes, batch_size = _check_budget(max_batch_bytes, batch_size)
    r = int(u.shape[-1])
    named = _check_orders(orders, r, n_random)
    rng = check_random_state(random_state)
    random_orders = np.stack([rng.permutation(r) for _ in range(n_random)]) if n_random else \
        np.zeros((0, r), np.int64)

    permutations = np.concatenate([np.stack(list(named.values())) if named else
                                   np.zeros((0, r), np.int64), random_orders])  # (n_orders, r)
    masks = _curve_masks(permutations)  # (n_orders, 2, r + 1, r)
    # Shared masks (k = 0, k = r, identical prefixes) are evaluated once.
    unique, inverse = np.unique(masks.reshape(-1, r), axis=0, return_inverse=True)
    scores = _masked_scores(u, w, head, class_id, unique.astype(u.dtype.as_numpy_dtype),
                            max_batch_bytes=max_batch_bytes, batch_size=batch_size,
                            probability=True, verbose=verbose, desc="fidelity")  # (n, m, 2)
    mean_scores = tf.reduce_mean(scores, axis=0).numpy()  # (m, 2): logit, probability
    # (n_orders, 2 [deletion, insertion], r + 1, 2 [logit, probability])
    values = mean_scores[inverse.reshape(-1)].reshape(len(permutations), 2, r + 1, 2)

    fractions = np.arange(r + 1) / r
    curves, aucs, random_std = {}, {}, {}
    for kind in KINDS:
        direction = 0 if kind.startswith("deletion") else 1
        score = 1 if kind.endswith("proba") else 0
        kind_values = values[:, direction, :, score]  # (n_orders, r + 1)
        areas = _area(kind_values, fractions)  # (n_orders,)
        curves[kind] = {name: kind_values[i] for i, name in enumerate(named)}
        aucs[kind] = {name: float(areas[i]) for i, name in enumerate(named)}
        if n_random:
            random_values = kind_values[len(named):]  # (n_random, r + 1)
            curves[kind][RANDOM] = random_values.mean(axis=0)
            aucs[kind][RANDOM] = float(areas[len(named):].mean())
            random_std[kind] = random_values.std(axis=0)
    used = dict(named)
    if n_random:
        used[RANDOM] = random_orders
    return FidelityCurves(fractions, curves, aucs, random_std, used)
