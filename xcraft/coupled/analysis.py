"""The analyses of Saini & Papalexakis on a fitted coupled NMF: functions in, arrays out.

With X_b ≈ F W_b (F: examples × factors, W_b: factors × columns of block b):

- **classes of a factor**: how the mass of column k of F splits over the labels
  (:func:`class_mass`, :func:`top_classes`, :func:`factor_purity`);
- **images of a factor**: the examples with the largest F[:, k] (:func:`top_examples`);
- **pixels of a factor**: the pixel blocks' W_b rows reshaped to the image
  (:func:`pixel_maps`), thresholded (:func:`pixel_masks`);
- **how specialised a layer is**: the cosine similarity of the factors' rows of W_b and its
  eigenvalues (:func:`cosine_similarity`, :func:`cosine_eigenvalues`). Factors that use
  disjoint neurons give the identity (every eigenvalue 1); factors that use the same neurons
  give one large eigenvalue and the rest near 0. The paper reads the trend across layers;
- **neurons of a factor**: the columns of W_b most tied to it, traced back to (channel, y, x)
  (:func:`top_neurons`);
- **neighbourhoods in F**: the k nearest examples, the factor distribution of the neighbours
  and its entropy (:func:`nearest_neighbours`, :func:`neighbour_factors`), and how often the
  neighbours share the label (:func:`knn_label_agreement`);
- **rank guidance**: the reconstruction error against d (:func:`rank_curve`,
  :func:`suggest_rank`).

The plots are in :mod:`xcraft.viz.coupled`.

References
----------
Saini & Papalexakis, "Analyzing Representations inside Convolutional Neural Networks".
"""

import numbers

import numpy as np
import tensorflow as tf

from xcraft import _validation as v

__all__ = [
    "class_mass",
    "factor_purity",
    "top_classes",
    "top_examples",
    "pixel_maps",
    "pixel_masks",
    "cosine_similarity",
    "cosine_eigenvalues",
    "top_neurons",
    "nearest_neighbours",
    "neighbour_factors",
    "knn_label_agreement",
    "rank_curve",
    "suggest_rank",
    "METRICS",
]

METRICS = ("cosine", "euclidean")
#: Bytes of the (queries × examples) similarity chunk of the neighbour search.
KNN_BUDGET_BYTES = 64 * 2**20


def _check_examples(examples, name="examples"):
    f = v.check_matrix(examples, name, nonnegative=True)
    if 0 in f.shape:
        raise ValueError(f"`{name}` must not be empty, got shape {f.shape}.")
    return f


def _check_labels(labels, n_examples):
    labels = np.asarray(labels)
    if labels.ndim != 1 or len(labels) != n_examples:
        raise ValueError(
            f"`labels` must have shape ({n_examples},), one per example, got shape "
            f"{labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise TypeError(f"`labels` must hold integer class indices, got dtype {labels.dtype}.")
    if labels.min() < 0:
        raise ValueError(f"`labels` must be >= 0, got a minimum of {labels.min()}.")
    return labels.astype(np.int64)


def _check_k(k, limit, name="k"):
    k = v.check_positive_int(k, name)
    if k > limit:
        raise ValueError(f"`{name}` must be <= {limit}, got {k}.")
    return k


# --------------------------------------------------------------------------------------------
# Classes and images of a factor
# --------------------------------------------------------------------------------------------


def class_mass(examples, labels, *, n_classes=None, balanced=True):
    """Return how the mass of every factor splits over the classes.

    Parameters
    ----------
    examples : ndarray of shape (n_examples, n_components)
        F (``CoupledNMF.examples_``).
    labels : ndarray of shape (n_examples,)
        Class indices.
    n_classes : int, optional
        Default: ``labels.max() + 1``.
    balanced : bool, default=True
        Use the mean of F[:, k] over each class's examples, so that a class with more examples
        does not weigh more; False uses the sums (the same when classes are of equal size).

    Returns
    -------
    ndarray of shape (n_components, n_classes)
        Rows sum to 1 (a factor with no mass gets a uniform row).

    Examples
    --------
    >>> f = np.array([[1.0, 0.0], [3.0, 0.0], [0.0, 2.0]])
    >>> class_mass(f, np.array([0, 0, 1]), balanced=False).tolist()
    [[1.0, 0.0], [0.0, 1.0]]
    """
    f = _check_examples(examples).astype(np.float64)
    labels = _check_labels(labels, len(f))
    n_classes = int(labels.max()) + 1 if n_classes is None else v.check_positive_int(
        n_classes, "n_classes")
    if labels.max() >= n_classes:
        raise ValueError(f"`labels` must be < n_classes = {n_classes}, got {labels.max()}.")
    one_hot = np.eye(n_classes)[labels]  # (n, n_classes)
    mass = one_hot.T @ f  # (n_classes, d): total factor mass of each class
    if balanced:
        counts = one_hot.sum(axis=0)[:, None]
        mass = np.divide(mass, counts, out=np.zeros_like(mass), where=counts > 0)
    mass = mass.T  # (d, n_classes)
    totals = mass.sum(axis=1, keepdims=True)
    uniform = np.full_like(mass, 1.0 / n_classes)
    return np.divide(mass, totals, out=uniform, where=totals > 0)


def factor_purity(examples, labels, *, n_classes=None, balanced=True):
    """Return each factor's purity: the largest share of its mass that one class holds.

    1 when a factor lives on one class only; 1 / n_classes when it spreads evenly.

    Returns
    -------
    ndarray of shape (n_components,)
    """
    return class_mass(examples, labels, n_classes=n_classes, balanced=balanced).max(axis=1)


def top_classes(examples, labels, *, k=3, n_classes=None, balanced=True):
    """Return every factor's k classes of largest mass, and their shares.

    Returns
    -------
    classes : ndarray of shape (n_components, k), int
    shares : ndarray of shape (n_components, k)
        Their shares of the factor's mass (:func:`class_mass`), largest first.
    """
    mass = class_mass(examples, labels, n_classes=n_classes, balanced=balanced)
    k = _check_k(k, mass.shape[1])
    order = np.argsort(-mass, axis=1, kind="stable")[:, :k]
    return order, np.take_along_axis(mass, order, axis=1)


def top_examples(examples, *, k=9, relative=False):
    """Return the k examples of largest F[:, j] for every factor j (the paper's top images).

    Parameters
    ----------
    examples : ndarray of shape (n_examples, n_components)
    k : int, default=9
    relative : bool, default=False
        Rank by the factor's share of each example's row, F[i, j] / Σ_l F[i, l], so that
        examples strong in every factor do not top every list.

    Returns
    -------
    ndarray of shape (n_components, k), int
        Example indices, strongest first.
    """
    f = _check_examples(examples).astype(np.float64)
    k = _check_k(k, len(f))
    if relative:
        totals = f.sum(axis=1, keepdims=True)
        f = np.divide(f, totals, out=np.zeros_like(f), where=totals > 0)
    return np.argsort(-f.T, axis=1, kind="stable")[:, :k]


# --------------------------------------------------------------------------------------------
# Pixels of a factor
# --------------------------------------------------------------------------------------------


def _pixel_names(blocks):
    channels = getattr(blocks, "channels", None)
    if channels is None:
        raise TypeError(
            f"`blocks` must be the Blocks returned by build_blocks (it knows which blocks are "
            f"pixels), got {type(blocks).__name__}."
        )
    names = sorted((c, name) for name, c in channels.items() if c is not None)
    if not names:
        raise ValueError(
            "`blocks` must hold pixel blocks, got none: call build_blocks with "
            "include_pixels=True."
        )
    return [name for _, name in names]


def pixel_maps(components, blocks):
    """Return the pixel blocks' components as images: W_b of channel c at [..., c].

    Parameters
    ----------
    components : dict of str to ndarray of shape (n_components, p_b)
        ``CoupledNMF.components_``.
    blocks : Blocks
        What :func:`xcraft.coupled.build_blocks` returned (or a ``Blocks`` rebuilt by
        :func:`xcraft.coupled.io.load_coupled`): its ``shapes`` and ``channels`` say how each
        pixel block folds back into the image.

    Returns
    -------
    ndarray of shape (n_components, height, width, channels)
    """
    names = _pixel_names(blocks)
    missing = [name for name in names if name not in components]
    if missing:
        raise ValueError(f"`components` must hold the pixel blocks {names}, missing {missing}.")
    height, width = blocks.shapes[names[0]]
    # (d, H * W) per channel, columns y * W + x (see xcraft.coupled.blocks) -> (d, H, W, C)
    stacked = np.stack([np.asarray(components[name]) for name in names], axis=-1)
    return stacked.reshape(stacked.shape[0], height, width, len(names))


def pixel_masks(maps, *, quantile=0.9):
    """Threshold pixel maps: a pixel is in factor j's mask when its map (summed over channels)
    is above the map's ``quantile``.

    Parameters
    ----------
    maps : ndarray of shape (n_components, height, width, channels)
        :func:`pixel_maps`.
    quantile : float, default=0.9
        In [0, 1): 0.9 keeps the strongest 10 % of each factor's pixels.

    Returns
    -------
    ndarray of shape (n_components, height, width), bool
    """
    maps = v.check_matrix(maps, "maps", ndim=4)
    quantile = v.check_fraction(quantile, "quantile", low=0.0, high=1.0, inclusive_low=True)
    if quantile >= 1:
        raise ValueError(f"`quantile` must be in [0, 1), got {quantile}.")
    summed = maps.sum(axis=-1)  # (d, H, W)
    thresholds = np.quantile(summed.reshape(len(summed), -1), quantile, axis=1)  # (d,)
    return summed > thresholds[:, None, None]


# --------------------------------------------------------------------------------------------
# Layers: factor similarity and neurons
# --------------------------------------------------------------------------------------------


def cosine_similarity(component):
    """Return the (d, d) cosine similarity of the factors' rows of one W_b (TF ops).

    Parameters
    ----------
    component : ndarray of shape (n_components, p_b)

    Returns
    -------
    ndarray of shape (n_components, n_components)
        A zero row has similarity 0 with every row, itself included.
    """
    w = tf.constant(v.check_matrix(component, "component", dtype=np.float64))
    unit = tf.math.l2_normalize(w, axis=1)  # (d, p_b)
    return tf.matmul(unit, unit, transpose_b=True).numpy()  # (d, d)


def cosine_eigenvalues(components, *, names=None):
    """Return the eigenvalues of every block's factor cosine similarity, largest first.

    The paper's measure of specialisation across layers: with d factors the eigenvalues sum to
    d (the trace); d eigenvalues of 1 mean the factors use disjoint neurons of that layer, one
    eigenvalue of d means they all use the same.

    Parameters
    ----------
    components : dict of str to ndarray of shape (n_components, p_b)
    names : list of str, optional
        The blocks, in order (default: all of them, in the dict's order).

    Returns
    -------
    dict of str to ndarray of shape (n_components,)
    """
    names = list(components) if names is None else list(names)
    unknown = [name for name in names if name not in components]
    if unknown:
        raise ValueError(f"`names` must be among {list(components)}, got unknown {unknown}.")
    out = {}
    for name in names:
        similarity = tf.constant(cosine_similarity(components[name]))
        out[name] = tf.reverse(tf.linalg.eigvalsh(similarity), [0]).numpy()
    return out


def top_neurons(component, index_map, *, k=10, by="weight"):
    """Return the k columns of W_b most tied to every factor, traced back to (channel, y, x).

    Parameters
    ----------
    component : ndarray of shape (n_components, p_b)
        W_b.
    index_map : ndarray of shape (p_b, 3)
        ``Blocks.index_map(name)``.
    k : int, default=10
    by : {"weight", "share"}, default="weight"
        ``"weight"``: the largest W_b[j, col]. ``"share"``: the largest share of the column's
        total over factors, W_b[j, col] / Σ_l W_b[l, col] (neurons that serve this factor
        only), among columns with a weight of at least the factor's median.

    Returns
    -------
    columns : ndarray of shape (n_components, k), int
    index : ndarray of shape (n_components, k, 3), int
        ``(channel, y, x)`` of those columns (y = x = -1: pooled or dense).
    weights : ndarray of shape (n_components, k)
        W_b at those columns.
    """
    w = v.check_matrix(component, "component", dtype=np.float64)
    index_map = np.asarray(index_map)
    if index_map.shape != (w.shape[1], 3):
        raise ValueError(
            f"`index_map` must have shape ({w.shape[1]}, 3), one (channel, y, x) row per column "
            f"of `component`, got shape {index_map.shape}."
        )
    v.check_choice(by, "by", ("weight", "share"))
    k = _check_k(k, w.shape[1])
    score = w
    if by == "share":
        totals = w.sum(axis=0, keepdims=True)
        score = np.divide(w, totals, out=np.zeros_like(w), where=totals > 0)
        strong = w >= np.median(w, axis=1, keepdims=True)
        score = np.where(strong, score, -1.0)
    columns = np.argsort(-score, axis=1, kind="stable")[:, :k]
    return columns, index_map[columns], np.take_along_axis(w, columns, axis=1)


# --------------------------------------------------------------------------------------------
# Neighbourhoods in F
# --------------------------------------------------------------------------------------------


def nearest_neighbours(examples, *, k=10, queries=None, metric="cosine"):
    """Return the k nearest examples of every query in F space (TF ops, chunked).

    Parameters
    ----------
    examples : ndarray of shape (n_examples, n_components)
        F.
    k : int, default=10
    queries : ndarray of int of shape (n_queries,), optional
        Indices of the query examples (default: all). An example is never its own neighbour.
    metric : {"cosine", "euclidean"}, default="cosine"
        Cosine compares the examples' factor *profiles*, whatever their overall strength.

    Returns
    -------
    indices : ndarray of shape (n_queries, k), int
        Nearest first.
    distances : ndarray of shape (n_queries, k)
        1 − cosine, or the Euclidean distance.
    """
    f = _check_examples(examples).astype(np.float64)
    v.check_choice(metric, "metric", METRICS)
    n = len(f)
    k = _check_k(k, n - 1)
    queries = np.arange(n) if queries is None else np.asarray(queries)
    if queries.ndim != 1 or not np.issubdtype(queries.dtype, np.integer) or (
            queries.size and (queries.min() < -n or queries.max() >= n)):
        raise ValueError(
            f"`queries` must be a 1-D array of example indices in [0, {n - 1}], got "
            f"{queries!r}."
        )
    queries = queries % n
    bank = tf.constant(f)
    if metric == "cosine":
        bank = tf.math.l2_normalize(bank, axis=1)
    sq_norms = tf.reduce_sum(tf.square(bank), axis=1)  # (n,)
    chunk = max(1, KNN_BUDGET_BYTES // (8 * n))
    indices, distances = [], []
    for start in range(0, len(queries), chunk):
        rows = tf.constant(queries[start:start + chunk])
        q = tf.gather(bank, rows)  # (c, d)
        products = tf.matmul(q, bank, transpose_b=True)  # (c, n)
        if metric == "cosine":
            score = products
        else:
            score = -(tf.gather(sq_norms, rows)[:, None] + sq_norms[None, :] - 2 * products)
        self_mask = tf.one_hot(rows, n, on_value=True, off_value=False, dtype=tf.bool)
        score = tf.where(self_mask, tf.constant(-np.inf, score.dtype), score)
        top, found = tf.math.top_k(score, k=k)
        indices.append(found.numpy())
        distances.append((1.0 - top).numpy() if metric == "cosine"
                         else tf.sqrt(tf.maximum(-top, 0.0)).numpy())
    return np.concatenate(indices), np.concatenate(distances)


def neighbour_factors(examples, indices):
    """Return the factor distribution of every query's neighbours and its entropy.

    Each neighbour's row of F is divided by its sum (its factor distribution); the query's
    neighbourhood distribution is their mean.

    Parameters
    ----------
    examples : ndarray of shape (n_examples, n_components)
    indices : ndarray of shape (n_queries, k)
        :func:`nearest_neighbours`.

    Returns
    -------
    distribution : ndarray of shape (n_queries, n_components)
        Rows sum to 1.
    entropy : ndarray of shape (n_queries,)
        In nats: 0 when every neighbour uses one and the same factor, log(n_components) at most.
    """
    f = _check_examples(examples).astype(np.float64)
    indices = np.asarray(indices)
    if indices.ndim != 2 or not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"`indices` must be a 2-D array of example indices, got {indices!r}.")
    totals = f.sum(axis=1, keepdims=True)
    uniform = np.full_like(f, 1.0 / f.shape[1])
    profiles = np.divide(f, totals, out=uniform, where=totals > 0)  # (n, d)
    distribution = profiles[indices].mean(axis=1)  # (q, d)
    logs = np.log(distribution, out=np.zeros_like(distribution), where=distribution > 0)
    return distribution, -np.sum(distribution * logs, axis=1)


def knn_label_agreement(examples, labels, *, k=10, metric="cosine"):
    """Return how often an example's k nearest neighbours in F share its label, and chance.

    Parameters
    ----------
    examples : ndarray of shape (n_examples, n_components)
    labels : ndarray of shape (n_examples,)
    k : int, default=10
    metric : {"cosine", "euclidean"}, default="cosine"

    Returns
    -------
    agreement : float
        The mean over examples of the fraction of their neighbours with the same label.
    chance : float
        Its value for neighbours drawn at random among the other examples:
        Σ_c n_c (n_c − 1) / (n (n − 1)).
    """
    f = _check_examples(examples)
    labels = _check_labels(labels, len(f))
    indices, _ = nearest_neighbours(f, k=k, metric=metric)
    agreement = float(np.mean(labels[indices] == labels[:, None]))
    counts = np.bincount(labels).astype(np.float64)
    n = float(len(labels))
    chance = float(np.sum(counts * (counts - 1)) / (n * (n - 1)))
    return agreement, chance


# --------------------------------------------------------------------------------------------
# Rank guidance
# --------------------------------------------------------------------------------------------


def rank_curve(blocks, ranks, **params):
    """Fit a :class:`~xcraft.coupled.CoupledNMF` at every rank; return the errors against d.

    Parameters
    ----------
    blocks : dict of str to ndarray of shape (n_examples, p_b)
    ranks : sequence of int
        The values of d to try, increasing.
    **params
        Passed to ``CoupledNMF`` (``random_state``, ``max_iter``, ``weights``, ...).

    Returns
    -------
    dict
        ``"ranks"`` (n_ranks,), ``"error"`` (n_ranks,): the weighted relative error
        (Σ α_b ‖X_b − F W_b‖² / Σ α_b ‖X_b‖²)^½, ``"block_errors"``: dict of str to
        (n_ranks,) relative errors ‖X_b − F W_b‖ / ‖X_b‖, ``"n_iter"`` (n_ranks,).
    """
    from xcraft.coupled.estimator import CoupledNMF

    if isinstance(ranks, numbers.Integral) or not len(ranks):
        raise ValueError(f"`ranks` must be a non-empty list of ints, got {ranks!r}.")
    ranks = [v.check_positive_int(r, "ranks") for r in ranks]
    if sorted(set(ranks)) != ranks:
        raise ValueError(f"`ranks` must be increasing without repeats, got {ranks}.")
    errors, block_errors, n_iter = [], {name: [] for name in blocks}, []
    sq_norms = {name: float(np.sum(np.square(np.asarray(b, np.float64))))
                for name, b in blocks.items()}
    for rank in ranks:
        model = CoupledNMF(rank, **params).fit(blocks)
        data = sum(model.weights_[n] * sq_norms[n] * model.block_errors_[n] ** 2 for n in blocks)
        total = sum(model.weights_[n] * sq_norms[n] for n in blocks)
        errors.append(np.sqrt(data / total))
        for name in blocks:
            block_errors[name].append(model.block_errors_[name])
        n_iter.append(model.n_iter_)
    return {
        "ranks": np.asarray(ranks),
        "error": np.asarray(errors),
        "block_errors": {name: np.asarray(e) for name, e in block_errors.items()},
        "n_iter": np.asarray(n_iter),
    }


def suggest_rank(curve, *, min_gain=0.01):
    """Return the rank after which one more factor lowers the error by less than ``min_gain``.

    The error of a rank-d fit falls as d grows; this picks the knee: the first rank in
    ``curve["ranks"]`` whose next candidate gains less than ``min_gain`` (absolute relative
    error) per added factor. When every step gains more, the largest rank tried.

    Parameters
    ----------
    curve : dict
        :func:`rank_curve`.
    min_gain : float, default=0.01

    Returns
    -------
    int
    """
    ranks, errors = np.asarray(curve["ranks"]), np.asarray(curve["error"])
    gains = -np.diff(errors) / np.diff(ranks)  # error drop per added factor
    below = np.flatnonzero(gains < min_gain)
    return int(ranks[below[0]] if below.size else ranks[-1])
