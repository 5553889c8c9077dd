"""Kernel two-sample tests: the unbiased MMD² with a Gaussian kernel and its permutation test.

The maximum mean discrepancy between distributions P and Q in the reproducing kernel Hilbert
space of a kernel k is MMD²(P, Q) = E k(x, x') + E k(y, y') − 2 E k(x, y), with x, x' ~ P and
y, y' ~ Q independent. Its unbiased estimate from samples x_1..x_m and y_1..y_n (Gretton et al.,
JMLR 2012, eq. 3) is

    MMD²_u = Σ_{i≠j} k(x_i, x_j) / (m(m−1)) + Σ_{i≠j} k(y_i, y_j) / (n(n−1))
             − 2 Σ_{i,j} k(x_i, y_j) / (mn),

which can be negative when P = Q. The kernel is Gaussian, k(a, b) = exp(−‖a − b‖² / (2σ²)).

**Bandwidth convention (median heuristic).** When no bandwidth is given, σ is the median of the
Euclidean distances ‖z_i − z_j‖ over the distinct pairs i < j of the pooled sample z = (x, y)
(Gretton et al., 2012, section 8), computed once on the observed pooling and kept fixed for the
permutations, so that the null distribution is that of the same statistic. A sample whose pairs
are all at distance 0 gets σ = 1 (every kernel value is then 1 and the statistic 0).

**Permutation test.** Under H0: P = Q the pooled sample is exchangeable, so relabelling it at
random draws from the statistic's null distribution. With B permutations the p-value is
p = (1 + #{b : MMD²_b ≥ MMD²_observed}) / (1 + B), which is valid (P(p ≤ α) ≤ α) at every B
(Phipson & Smyth, 2010). The permutations never recompute a kernel: a relabelling is a vector
a of m ones and n zeros, and the three sums are the quadratic forms aᵀK₀a, bᵀK₀b and aᵀKb on
the pooled kernel matrix K (K₀: its diagonal zeroed, b = 1 − a), evaluated for a whole batch of
permutations with one matrix product.

Several feature sets of the same examples (e.g. several layers of a network) can be tested
together: the statistic is then the sum of their MMD², each with its own bandwidth, and the
same relabelling is applied to every set.
"""

import dataclasses
import numbers

import numpy as np
import tensorflow as tf

from xcraft._validation import check_positive_int, check_random_state

__all__ = [
    "MMDTestResult",
    "gaussian_kernel",
    "median_bandwidth",
    "mmd2_unbiased",
    "mmd_permutation_test",
]

#: Largest number of entries of the (permutations × pooled) batch processed at once, a memory
#: budget of 64 MB in float64 for the relabelling products.
_PERMUTATION_BUDGET = 8_000_000


@dataclasses.dataclass(frozen=True)
class MMDTestResult:
    """Outcome of :func:`mmd_permutation_test`.

    Attributes
    ----------
    statistic : float
        The observed unbiased MMD² (summed over the feature sets).
    p_value : float
        (1 + #{null ≥ statistic}) / (1 + n_permutations).
    null : ndarray of shape (n_permutations,)
        The statistic of every relabelling.
    bandwidths : ndarray of shape (n_feature_sets,)
        The Gaussian kernel's σ of each feature set.
    per_set : ndarray of shape (n_feature_sets,)
        The observed MMD² of each feature set (they sum to ``statistic``).
    """

    statistic: float
    p_value: float
    null: np.ndarray
    bandwidths: np.ndarray
    per_set: np.ndarray


def _squared_distances(a, b):
    """Pairwise ‖a_i − b_j‖² of (..., m, d) and (..., n, d), as (..., m, n), clipped at 0."""
    a_norms = tf.reduce_sum(a * a, axis=-1)[..., :, None]  # (..., m, 1)
    b_norms = tf.reduce_sum(b * b, axis=-1)[..., None, :]  # (..., 1, n)
    cross = tf.matmul(a, b, transpose_b=True)  # (..., m, n)
    # The expansion loses the exact zeros of equal points to round-off; distances are >= 0.
    return tf.maximum(a_norms + b_norms - 2.0 * cross, 0.0)


def gaussian_kernel(a, b, bandwidth):
    """Return the Gaussian kernel matrix exp(−‖a_i − b_j‖² / (2σ²)).

    Parameters
    ----------
    a : array-like of shape (..., m, d)
    b : array-like of shape (..., n, d)
    bandwidth : float or array-like broadcastable to (..., 1, 1)
        σ > 0.

    Returns
    -------
    tf.Tensor of shape (..., m, n)
    """
    a = tf.convert_to_tensor(a)
    b = tf.cast(tf.convert_to_tensor(b), a.dtype)
    if isinstance(bandwidth, tf.Tensor):
        sigma = tf.cast(bandwidth, a.dtype)
    else:  # a Python float straight to the samples' dtype (through float32 it would round)
        sigma = tf.constant(np.asarray(bandwidth, a.dtype.as_numpy_dtype))
    return tf.exp(-_squared_distances(a, b) / (2.0 * sigma**2))


def median_bandwidth(x, y=None):
    """Return σ of the median heuristic: the median pairwise distance of the pooled sample.

    Parameters
    ----------
    x : array-like of shape (m, d)
    y : array-like of shape (n, d), optional
        Pooled with ``x`` when given.

    Returns
    -------
    float
        The median of ‖z_i − z_j‖ over the pairs i < j of z = (x, y); 1.0 when it is 0.
    """
    z = np.asarray(x, np.float64)
    if y is not None:
        z = np.concatenate([z, np.asarray(y, np.float64)])
    distances = np.sqrt(_squared_distances(tf.constant(z), tf.constant(z)).numpy())
    upper = distances[np.triu_indices(len(z), k=1)]
    median = float(np.median(upper)) if upper.size else 0.0
    return median if median > 0.0 else 1.0


def _mmd2_from_kernels(k_xx, k_yy, k_xy):
    m = tf.cast(tf.shape(k_xx)[-1], k_xx.dtype)
    n = tf.cast(tf.shape(k_yy)[-1], k_yy.dtype)
    sum_xx = tf.reduce_sum(k_xx, axis=[-2, -1]) - tf.linalg.trace(k_xx)
    sum_yy = tf.reduce_sum(k_yy, axis=[-2, -1]) - tf.linalg.trace(k_yy)
    sum_xy = tf.reduce_sum(k_xy, axis=[-2, -1])
    return sum_xx / (m * (m - 1.0)) + sum_yy / (n * (n - 1.0)) - 2.0 * sum_xy / (m * n)


def mmd2_unbiased(x, y, bandwidth=None):
    """Return the unbiased estimate of MMD² between two samples, Gaussian kernel.

    Parameters
    ----------
    x : array-like of shape (..., m, d)
        First sample (leading dimensions: independent problems, computed at once).
    y : array-like of shape (..., n, d)
        Second sample, with the same leading dimensions.
    bandwidth : float, optional
        σ of the kernel; by default the median heuristic of the pooled sample (only for
        unbatched 2-D inputs).

    Returns
    -------
    tf.Tensor of shape (...)
        MMD²_u (float64).

    Raises
    ------
    ValueError
        If a sample has fewer than two points, or the samples' feature sizes differ.

    Examples
    --------
    >>> import numpy as np
    >>> x, y = np.zeros((3, 2)), np.ones((3, 2))
    >>> round(float(mmd2_unbiased(x, y, bandwidth=1.0)), 4)  # 2 − 2·exp(−1)
    1.2642
    """
    x = tf.cast(tf.convert_to_tensor(x), tf.float64)
    y = tf.cast(tf.convert_to_tensor(y), tf.float64)
    _check_pair(x, y, "x", "y")
    if bandwidth is None:
        if x.shape.rank != 2:
            raise ValueError(
                f"`bandwidth` must be given for batched samples, got samples of shape "
                f"{tuple(x.shape)} and no bandwidth."
            )
        bandwidth = median_bandwidth(x.numpy(), y.numpy())
    return _mmd2_from_kernels(
        gaussian_kernel(x, x, bandwidth),
        gaussian_kernel(y, y, bandwidth),
        gaussian_kernel(x, y, bandwidth),
    )


def _check_pair(x, y, x_name, y_name):
    if x.shape.rank < 2 or y.shape.rank < 2:
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have shape (..., n_samples, n_features), got shapes "
            f"{tuple(x.shape)} and {tuple(y.shape)}."
        )
    for name, sample in ((x_name, x), (y_name, y)):
        if sample.shape[-2] is not None and sample.shape[-2] < 2:
            raise ValueError(
                f"`{name}` must hold at least 2 samples for the unbiased MMD², got "
                f"{sample.shape[-2]}."
            )
    if x.shape[-1] != y.shape[-1]:
        raise ValueError(
            f"`{x_name}` and `{y_name}` must have the same number of features, got "
            f"{x.shape[-1]} and {y.shape[-1]}."
        )


def _as_feature_sets(value, name):
    """A list of finite (n, d) float64 arrays from one array or a sequence of them."""
    if isinstance(value, (list, tuple)):
        sets = list(value)
        if not sets:
            raise ValueError(f"`{name}` must hold at least one feature set, got an empty list.")
    else:
        sets = [value]
    arrays = []
    for i, features in enumerate(sets):
        if hasattr(features, "numpy") and callable(features.numpy):
            features = features.numpy()
        array = np.asarray(features)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
        array = array.astype(np.float64)
        if array.ndim == 1:
            array = array[:, None]  # one scalar feature per sample
        elif array.ndim > 2:
            array = array.reshape(len(array), -1)  # e.g. (n, h, w) maps, flattened
        if not np.all(np.isfinite(array)):
            label = name if len(sets) == 1 else f"{name}[{i}]"
            raise ValueError(f"`{label}` must be finite, got NaN or infinite values.")
        arrays.append(array)
    return arrays


def mmd_permutation_test(x, y, *, n_permutations=1000, bandwidth=None, random_state=None):
    """Test whether two samples come from the same distribution (unbiased MMD², permutations).

    Parameters
    ----------
    x : array-like of shape (m, ...) or list of them
        First sample; a list holds several feature sets of the same m examples (the statistic
        is then the sum of their MMD²). Features beyond the first axis are flattened.
    y : array-like of shape (n, ...) or list of them
        Second sample, with as many feature sets as ``x``.
    n_permutations : int, default=1000
        Random relabellings B of the pooled sample.
    bandwidth : float or sequence of float, optional
        σ of each feature set's Gaussian kernel; default the median heuristic (see the module
        notes for the convention).
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the permutations.

    Returns
    -------
    MMDTestResult

    Raises
    ------
    ValueError
        If a sample has fewer than 2 examples, the feature sets disagree, or a bandwidth is not
        positive.

    Notes
    -----
    p = (1 + #{b : MMD²_b ≥ MMD²}) / (1 + B). Cost: one (m + n)² kernel per feature set and
    B (m + n)² multiply-adds per set for the null, in batches of permutations.

    References
    ----------
    Gretton, Borgwardt, Rasch, Schölkopf and Smola, "A Kernel Two-Sample Test", JMLR 13, 2012.
    Phipson and Smyth, "Permutation P-values Should Never Be Zero", SAGMB 9, 2010.

    Examples
    --------
    >>> import numpy as np
    >>> rng = np.random.default_rng(0)
    >>> result = mmd_permutation_test(rng.normal(size=(30, 2)), rng.normal(3, 1, size=(30, 2)),
    ...                               n_permutations=99, random_state=0)
    >>> result.p_value
    0.01
    """
    n_permutations = check_positive_int(n_permutations, "n_permutations")
    xs, ys = _as_feature_sets(x, "x"), _as_feature_sets(y, "y")
    if len(xs) != len(ys):
        raise ValueError(
            f"`x` and `y` must hold the same number of feature sets, got {len(xs)} and "
            f"{len(ys)}."
        )
    m, n = len(xs[0]), len(ys[0])
    for name, sets, size in (("x", xs, m), ("y", ys, n)):
        if size < 2:
            raise ValueError(
                f"`{name}` must hold at least 2 samples for the unbiased MMD², got {size}."
            )
        if any(len(features) != size for features in sets):
            lengths = [len(features) for features in sets]
            raise ValueError(
                f"`{name}` must hold the same examples in every feature set, got lengths "
                f"{lengths}."
            )
    for i, (a, b) in enumerate(zip(xs, ys, strict=True)):
        if a.shape[1] != b.shape[1]:
            raise ValueError(
                f"`x` and `y` must have the same number of features in feature set {i}, got "
                f"{a.shape[1]} and {b.shape[1]}."
            )
    bandwidths = _bandwidths(bandwidth, xs, ys)
    rng = check_random_state(random_state)
    seed = rng.integers(2**31 - 1, size=2)

    total = m + n
    kernels = [
        gaussian_kernel(np.concatenate([a, b]), np.concatenate([a, b]), sigma)
        for a, b, sigma in zip(xs, ys, bandwidths, strict=True)
    ]
    per_set = np.array([float(_split_statistic(k, m)) for k in kernels])
    statistic = float(per_set.sum())
    # Zeroing the diagonal once lets the within-sample sums be plain quadratic forms.
    kernels_off = tf.stack([tf.linalg.set_diag(k, tf.zeros(total, tf.float64)) for k in kernels])
    chunk = max(1, min(n_permutations, _PERMUTATION_BUDGET // (total * len(kernels))))
    null = np.empty(n_permutations, np.float64)
    for start in range(0, n_permutations, chunk):
        stop = min(start + chunk, n_permutations)
        chunk_seed = tf.random.experimental.stateless_fold_in(seed, start)
        null[start:stop] = _permuted_statistics(
            kernels_off, m, n, stop - start, chunk_seed
        ).numpy()
    # Ties count as extreme, and a tiny tolerance keeps the observed relabelling's own
    # round-off from making it look less extreme than itself.
    tolerance = 1e-12 * max(1.0, abs(statistic))
    n_extreme = int(np.sum(null >= statistic - tolerance))
    p_value = (1.0 + n_extreme) / (1.0 + n_permutations)
    return MMDTestResult(statistic, p_value, null, np.asarray(bandwidths), per_set)


def _bandwidths(bandwidth, xs, ys):
    if bandwidth is None:
        return [median_bandwidth(a, b) for a, b in zip(xs, ys, strict=True)]
    values = [bandwidth] if isinstance(bandwidth, numbers.Real) else list(bandwidth)
    if len(values) == 1 and len(xs) > 1:
        values = values * len(xs)
    if len(values) != len(xs):
        raise ValueError(
            f"`bandwidth` must give one value per feature set ({len(xs)}), got {len(values)}."
        )
    for value in values:
        if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0:
            raise ValueError(f"`bandwidth` must be positive, got {value!r}.")
    return [float(v) for v in values]


def _split_statistic(kernel, m):
    return _mmd2_from_kernels(kernel[:m, :m], kernel[m:, m:], kernel[:m, m:])


def _permuted_statistics(kernels_off, m, n, count, seed):
    """MMD²_u summed over feature sets, for ``count`` random relabellings: (count,)."""
    total = m + n
    keys = tf.random.stateless_uniform((count, total), seed=seed)
    # The first m positions of a random permutation form the relabelled first sample.
    ranks = tf.argsort(tf.argsort(keys, axis=1), axis=1)
    a = tf.cast(ranks < m, tf.float64)  # (count, total): 1 on the relabelled x
    b = 1.0 - a
    ka_off = tf.einsum("stu,pu->spt", kernels_off, a)  # (n_sets, count, total)
    kb_off = tf.einsum("stu,pu->spt", kernels_off, b)
    sum_xx = tf.reduce_sum(ka_off * a, axis=-1)  # (n_sets, count)
    sum_yy = tf.reduce_sum(kb_off * b, axis=-1)
    # aᵀ K b = aᵀ K₀ b, as a and b never share a position (the diagonal does not enter).
    sum_xy = tf.reduce_sum(ka_off * b, axis=-1)
    mf, nf = float(m), float(n)
    statistics = sum_xx / (mf * (mf - 1)) + sum_yy / (nf * (nf - 1)) - 2 * sum_xy / (mf * nf)
    return tf.reduce_sum(statistics, axis=0)
