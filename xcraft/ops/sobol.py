"""Total Sobol' indices: replicated QMC designs, estimators and bootstrap intervals.

A function ``f`` of ``dim`` independent inputs uniform on [0, 1] is evaluated on a replicated
design: two independent sample matrices ``A`` and ``B`` (``nb_design`` × ``dim`` each, the two
halves of one ``2 · dim``-dimensional QMC draw) and, for each input ``i``, the matrix ``C_i``
equal to ``A`` with its column ``i`` taken from ``B``. The rows are stacked as

    [A; B; C_1; ...; C_dim]        ->  nb_design · (dim + 2) rows,

so the outputs of the design reshape to ``(dim + 2, nb_design)``: row 0 is ``f(A)``, row 1 is
``f(B)`` and row ``2 + i`` is ``f(C_i)``. ``A`` and ``C_i`` share every input but ``i``, so
``f(A) - f(C_i)`` only moves with ``x_i`` and its spread measures the total effect of ``x_i``.

Compared with Xplique's CRAFT (``ScipySobolSequenceRS`` masks + ``JansenEstimator``): the layout
is the same; Xplique draws the *unscrambled* Sobol' sequence (fixed masks whose first design
point is all zeros; newer releases default to unscrambled Halton), we scramble it with a seeded
generator, so repeated estimates are independent and unbiased; Xplique divides by the variance of
``f(A)`` alone, we pool ``f(A)`` and ``f(B)`` by default; and a constant output gives 0 with a
warning here instead of a division by zero. ``sampler="xplique"`` with ``variance="a"``
reproduces Xplique's numbers.

The module is pure maths: it takes arrays, tensors and callables, never models. The batched
perturbation engine that feeds concept masks to a network lives in :mod:`xcraft.craft.importance`.
"""

import inspect
import numbers
import warnings
from typing import NamedTuple

import numpy as np
import tensorflow as tf
from scipy.stats import qmc

from xcraft._validation import (
    check_choice,
    check_nonnegative_int,
    check_positive_int,
    check_random_state,
)

__all__ = [
    "SAMPLERS",
    "ESTIMATORS",
    "SobolIndices",
    "sobol_design",
    "total_indices_from_outputs",
    "total_sobol_indices",
]

SAMPLERS = ("sobol", "halton", "lhs", "random", "xplique")
ESTIMATORS = ("jansen", "saltelli", "homma")
VARIANCES = ("pooled", "a")

# An output whose standard deviation is below this many float epsilons of its largest magnitude
# is constant up to rounding: its indices are 0/0 and are reported as 0 with a warning.
_CONSTANT_RTOL_EPS = 8.0
# Bootstrap replicates are evaluated in groups holding at most this many output values, so that
# intervals on many images never materialise every replicate at once.
_BOOTSTRAP_MAX_VALUES = 2**24


class SobolIndices(NamedTuple):
    """Total Sobol' indices with percentile-bootstrap confidence intervals.

    Attributes
    ----------
    indices : ndarray of shape (..., dim)
        Point estimates on the full design.
    low, high : ndarray of shape (..., dim)
        Bounds of the two-sided percentile bootstrap interval.
    confidence : float
        Coverage the interval aims at, e.g. 0.95.
    """

    indices: np.ndarray
    low: np.ndarray
    high: np.ndarray
    confidence: float


def _qmc_engine(cls, dim, rng, **kwargs):
    """Build a ``scipy.stats.qmc`` engine, seeding it with ``rng=`` or the older ``seed=``."""
    # scipy >= 1.15 spells the seed `rng`; older releases (setup.cfg allows 1.10) only `seed`.
    key = "rng" if "rng" in inspect.signature(cls).parameters else "seed"
    return cls(dim, **{key: rng}, **kwargs)


def _draw_sobol(engine, nb_design):
    """Draw ``nb_design`` Sobol' points, rewording scipy's power-of-two warning."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        points = engine.random(nb_design)
    if any("power of 2" in str(w.message) for w in caught):
        warnings.warn(
            f"`nb_design` should be a power of 2 for the balance properties of Sobol' points, "
            f"got {nb_design}. The indices stay consistent but converge more slowly.",
            UserWarning,
            stacklevel=3,
        )
    return points


def sobol_design(dim, nb_design=32, sampler="sobol", random_state=None, dtype="float32"):
    """Return the replicated design ``[A; B; C_1; ...; C_dim]`` of masks in [0, 1].

    Parameters
    ----------
    dim : int
        Number of inputs (concepts).
    nb_design : int, default=32
        Number of rows of ``A`` (and of ``B``). A power of 2 keeps the balance of Sobol' points.
    sampler : {"sobol", "halton", "lhs", "random", "xplique"}, default="sobol"
        How ``[A, B]`` is drawn, as one ``(nb_design, 2 * dim)`` sample:

        - ``"sobol"``: scrambled Sobol' sequence (``scipy.stats.qmc.Sobol``).
        - ``"halton"``: scrambled Halton sequence.
        - ``"lhs"``: Latin hypercube.
        - ``"random"``: i.i.d. uniform (plain Monte Carlo).
        - ``"xplique"``: Xplique's CRAFT masks (``ScipySobolSequenceRS``): the first
          ``nb_design`` points of the *unscrambled* Sobol' sequence. They ignore
          ``random_state`` and their first row is all zeros in ``A``, ``B`` and every ``C_i``,
          so that design point adds nothing to the numerators (a slight downward bias on small
          designs). The layout is the same as ours.
    random_state : None, int or numpy.random.Generator, default=None
        Seed of the scrambling (or of the Monte Carlo / Latin hypercube draw).
    dtype : str or numpy dtype, default="float32"
        Floating dtype of the returned masks.

    Returns
    -------
    masks : ndarray of shape (nb_design * (dim + 2), dim)
        Rows ``k * nb_design : (k + 1) * nb_design`` hold ``A`` (k = 0), ``B`` (k = 1) and
        ``C_i`` (k = 2 + i), where ``C_i`` is ``A`` with column ``i`` from ``B``.

    Raises
    ------
    TypeError, ValueError
        If an argument has the wrong type or value.

    Examples
    --------
    >>> sobol_design(3, nb_design=4, random_state=0).shape
    (20, 3)
    """
    dim = check_positive_int(dim, "dim")
    nb_design = _check_nb_design(nb_design)
    check_choice(sampler, "sampler", SAMPLERS)
    dtype = _check_float_dtype(dtype)
    rng = check_random_state(random_state)

    if sampler == "sobol":
        points = _draw_sobol(_qmc_engine(qmc.Sobol, 2 * dim, rng, scramble=True), nb_design)
    elif sampler == "xplique":
        points = _draw_sobol(qmc.Sobol(2 * dim, scramble=False), nb_design)
    elif sampler == "halton":
        points = _qmc_engine(qmc.Halton, 2 * dim, rng, scramble=True).random(nb_design)
    elif sampler == "lhs":
        points = _qmc_engine(qmc.LatinHypercube, 2 * dim, rng).random(nb_design)
    else:
        points = rng.random((nb_design, 2 * dim))

    a, b = points[:, :dim], points[:, dim:]  # (N, dim) each
    # C_i = A with column i from B, for every i at once: (dim, N, dim) then stacked to rows.
    swap = np.eye(dim, dtype=bool)[:, None, :]  # (dim, 1, dim): True on column i of block i
    c = np.where(swap, b[None], a[None])  # (dim, N, dim)
    masks = np.concatenate([a, b, c.reshape(dim * nb_design, dim)], axis=0)
    return masks.astype(dtype)


def _indices_kernel(outputs, dim, estimator, variance):
    """Total indices and a constant-output flag; ``outputs`` is (..., (dim + 2) * N).

    Plain TF ops, not a ``tf.function``: the reductions cost microseconds next to the forward
    passes that produced ``outputs``, while a graph would retrace for every new batch shape.
    """
    lead = tf.shape(outputs)[:-1]
    y = tf.reshape(outputs, tf.concat([lead, [dim + 2, -1]], axis=0))  # (..., dim + 2, N)
    f_a, f_b, f_c = y[..., 0, :], y[..., 1, :], y[..., 2:, :]  # (..., N), (..., N), (..., dim, N)
    n = tf.cast(tf.shape(f_a)[-1], y.dtype)

    pooled = tf.concat([f_a, f_b], axis=-1)  # (..., 2N)
    mean = tf.reduce_mean(pooled, axis=-1)  # (...,)
    if variance == "pooled":
        var = tf.reduce_sum(tf.square(pooled - mean[..., None]), axis=-1) / (2.0 * n - 1.0)
    else:
        mean_a = tf.reduce_mean(f_a, axis=-1, keepdims=True)
        var = tf.reduce_sum(tf.square(f_a - mean_a), axis=-1) / tf.maximum(n - 1.0, 1.0)

    # Centring by the pooled mean leaves every estimator's expectation unchanged (E f(A) =
    # E f(C_i)) and removes the cancellation error of products when |E f| >> sd f.
    a0 = (f_a - mean[..., None])[..., None, :]  # (..., 1, N)
    c0 = f_c - mean[..., None, None]  # (..., dim, N)
    if estimator == "jansen":
        numerator = 0.5 * tf.reduce_mean(tf.square(a0 - c0), axis=-1)  # (..., dim)
    elif estimator == "saltelli":
        numerator = tf.reduce_mean(a0 * (a0 - c0), axis=-1)
    else:  # homma: V - (E[f(A) f(C_i)] - f0^2), with f0 the mean of f(A)
        f0_sq = tf.square(tf.reduce_mean(a0, axis=-1))  # (..., 1)
        numerator = var[..., None] - (tf.reduce_mean(a0 * c0, axis=-1) - f0_sq)

    scale = tf.reduce_max(tf.abs(y), axis=[-2, -1])  # (...,)
    eps = np.finfo(y.dtype.as_numpy_dtype).eps
    constant = tf.sqrt(tf.maximum(var, 0.0)) <= _CONSTANT_RTOL_EPS * eps * scale  # (...,)
    safe_var = tf.where(constant, tf.ones_like(var), var)
    indices = numerator / safe_var[..., None]  # (..., dim)
    indices = tf.where(constant[..., None], tf.zeros_like(indices), indices)
    return indices, constant


def _as_outputs(outputs, name="outputs"):
    """Return ``outputs`` as a floating tensor (float32 unless given float64)."""
    if not isinstance(outputs, tf.Tensor):
        array = np.asarray(outputs)
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.floating)
            or np.issubdtype(array.dtype, np.integer)
            or np.issubdtype(array.dtype, np.bool_)
        ):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
        outputs = tf.convert_to_tensor(array)
    if outputs.dtype not in (tf.float32, tf.float64):
        if not (outputs.dtype.is_floating or outputs.dtype.is_integer or outputs.dtype.is_bool):
            raise TypeError(f"`{name}` must hold real numbers, got dtype {outputs.dtype.name}.")
        outputs = tf.cast(outputs, tf.float32)
    return outputs


def _check_layout(outputs, dim, name="outputs"):
    """Check ``outputs`` is (..., nb_design * (dim + 2)) with nb_design >= 2; return nb_design."""
    if outputs.shape.rank is None or outputs.shape.rank < 1:
        raise ValueError(f"`{name}` must have at least one axis, got shape {outputs.shape}.")
    size = outputs.shape[-1]
    if size is None or size % (dim + 2) or size // (dim + 2) < 2:
        raise ValueError(
            f"`{name}` must have a last axis of nb_design * (dim + 2) = nb_design * {dim + 2} "
            f"with nb_design >= 2, got shape {tuple(outputs.shape)}."
        )
    return size // (dim + 2)


def _warn_constant(constant, stacklevel):
    """Warn once when some outputs are constant over the design (their indices were set to 0)."""
    constant = np.asarray(constant)
    n_constant = int(constant.sum())
    if n_constant:
        where = "The output" if constant.size == 1 else f"{n_constant} of {constant.size} outputs"
        warnings.warn(
            f"{where} did not vary over the design (zero variance): the total indices are 0/0 "
            f"and were set to 0.",
            UserWarning,
            stacklevel=stacklevel,
        )


def total_indices_from_outputs(outputs, dim, estimator="jansen", *, variance="pooled"):
    """Estimate total Sobol' indices from the outputs of a :func:`sobol_design`.

    Parameters
    ----------
    outputs : array-like or tf.Tensor of shape (..., nb_design * (dim + 2))
        Values of ``f`` on the design rows, in the order of :func:`sobol_design`. Leading axes
        are batch axes (e.g. one row per image) and are estimated independently.
    dim : int
        Number of inputs.
    estimator : {"jansen", "saltelli", "homma"}, default="jansen"
        With ``y_A = f(A)``, ``y_i = f(C_i)`` and ``V`` the variance below:

        - ``"jansen"`` (Jansen 1999): ``mean((y_A - y_i)^2) / (2 V)``; always >= 0.
        - ``"saltelli"`` (Sobol' 2007, Saltelli et al. 2010, table 2 (b)):
          ``mean(y_A (y_A - y_i)) / V``.
        - ``"homma"`` (Homma & Saltelli 1996): ``1 - (mean(y_A y_i) - f0^2) / V`` with
          ``f0 = mean(y_A)``.

        ``"saltelli"`` and ``"homma"`` can return small negative values on small designs; they
        are not clipped.
    variance : {"pooled", "a"}, default="pooled"
        ``"pooled"``: the unbiased sample variance of the ``2 * nb_design`` values
        ``[f(A), f(B)]``. ``A`` and ``B`` are independent draws of the inputs, so both halves
        sample ``Var f`` and pooling them halves the Monte Carlo variance of ``V`` (the
        denominator of every index) at no extra evaluation. ``"a"``: the unbiased sample
        variance of ``f(A)`` alone, as Xplique's estimators compute it.

    Returns
    -------
    indices : tf.Tensor of shape (..., dim)
        Total indices, in the dtype of ``outputs`` (float32 unless float64 is given). Outputs
        that are constant over the design (variance 0, up to rounding) get indices 0 and a
        ``UserWarning`` (when run eagerly).

    Raises
    ------
    TypeError, ValueError
        If ``outputs`` is not numeric or its last axis is not ``nb_design * (dim + 2)``.

    Notes
    -----
    Every estimator is computed on outputs centred by their pooled mean; this leaves the
    expectations unchanged (``E f(A) = E f(C_i)``) and avoids cancellation when the output has a
    large mean. Jansen's estimator is shift-invariant anyway.

    References
    ----------
    Jansen, M. J. W. (1999). Analysis of variance designs for model output. Computer Physics
    Communications 117, 35-43.
    Homma, T. & Saltelli, A. (1996). Importance measures in global sensitivity analysis of
    nonlinear models. Reliability Engineering & System Safety 52, 1-17.
    Saltelli, A. et al. (2010). Variance based sensitivity analysis of model output. Design and
    estimator for the total sensitivity index. Computer Physics Communications 181, 259-270.

    Examples
    --------
    >>> masks = sobol_design(2, nb_design=64, random_state=0)
    >>> st = total_indices_from_outputs(masks @ np.array([1.0, 0.0]), 2).numpy()
    >>> np.round(st, 1)
    array([1., 0.])
    """
    dim = check_positive_int(dim, "dim")
    check_choice(estimator, "estimator", ESTIMATORS)
    check_choice(variance, "variance", VARIANCES)
    outputs = _as_outputs(outputs)
    _check_layout(outputs, dim)
    indices, constant = _indices_kernel(outputs, dim, estimator, variance)
    if tf.executing_eagerly():
        _warn_constant(constant, stacklevel=3)
    return indices


def _bootstrap_intervals(outputs, dim, estimator, variance, n_bootstrap, confidence, rng,
                         reduce_axis=None):
    """Percentile-bootstrap bounds of the total indices, resampling design points.

    A replicate draws ``nb_design`` design points with replacement and keeps, for each, its rows
    in ``A``, ``B`` and every ``C_i`` together (the estimators pair them). The same replicate is
    applied to every leading (batch) index, so with ``reduce_axis`` the interval is that of the
    mean over the batch of the per-row indices.

    Returns
    -------
    low, high : ndarray of shape (..., dim), or with ``reduce_axis`` removed.
    """
    lead = outputs.shape[:-1]
    n = outputs.shape[-1] // (dim + 2)
    y = tf.reshape(outputs, [*lead, dim + 2, n])  # (..., dim + 2, N)
    resamples = rng.integers(n, size=(n_bootstrap, n))  # (n_bootstrap, N)
    group = max(1, _BOOTSTRAP_MAX_VALUES // max(1, int(np.prod(y.shape))))
    replicates = []
    for start in range(0, n_bootstrap, group):
        picks = resamples[start : start + group]  # (g, N)
        y_b = tf.gather(y, picks, axis=-1)  # (..., dim + 2, g, N)
        y_b = tf.experimental.numpy.moveaxis(y_b, -2, 0)  # (g, ..., dim + 2, N)
        y_b = tf.reshape(y_b, [len(picks), *lead, (dim + 2) * n])  # (g, ..., (dim + 2) N)
        st, _ = _indices_kernel(y_b, dim, estimator, variance)  # (g, ..., dim)
        if reduce_axis is not None:
            st = tf.reduce_mean(st, axis=reduce_axis + 1)
        replicates.append(st.numpy())
    replicates = np.concatenate(replicates, axis=0)  # (n_bootstrap, ..., dim)
    tail = 50.0 * (1.0 - confidence)
    low, high = np.percentile(replicates, [tail, 100.0 - tail], axis=0)
    return low.astype(replicates.dtype), high.astype(replicates.dtype)


def total_sobol_indices(f, dim, nb_design=32, sampler="sobol", estimator="jansen",
                        random_state=None, n_bootstrap=0, confidence=0.95, *,
                        variance="pooled", batch_size=None, dtype="float32"):
    """Estimate the total Sobol' indices of a vectorised function of inputs uniform on [0, 1].

    Parameters
    ----------
    f : callable
        Maps an array of shape (m, dim) (NumPy, in ``dtype``) to outputs of shape (m,)
        (NumPy array or tensor). Inputs on other ranges are mapped inside ``f``.
    dim : int
        Number of inputs.
    nb_design : int, default=32
        Rows of each of ``A`` and ``B``; ``f`` is evaluated on ``nb_design * (dim + 2)`` points.
    sampler : {"sobol", "halton", "lhs", "random", "xplique"}, default="sobol"
        See :func:`sobol_design`.
    estimator : {"jansen", "saltelli", "homma"}, default="jansen"
        See :func:`total_indices_from_outputs`.
    random_state : None, int or numpy.random.Generator, default=None
        Seeds the design, then the bootstrap.
    n_bootstrap : int, default=0
        Number of bootstrap replicates; 0 skips the intervals.
    confidence : float, default=0.95
        Coverage of the bootstrap intervals, in (0, 1).
    variance : {"pooled", "a"}, default="pooled"
        See :func:`total_indices_from_outputs`.
    batch_size : int, default=None
        Evaluate ``f`` on at most this many points per call; ``None`` makes one call.
    dtype : str or numpy dtype, default="float32"
        Dtype of the points given to ``f``.

    Returns
    -------
    indices : ndarray of shape (dim,)
        When ``n_bootstrap == 0``.
    result : SobolIndices
        When ``n_bootstrap > 0``: named tuple ``(indices, low, high, confidence)``, each array
        of shape (dim,). The interval is a percentile bootstrap over design points; QMC points
        are not independent, so read it as an approximate (usually conservative) interval.

    Raises
    ------
    TypeError, ValueError
        If an argument is invalid or ``f`` returns the wrong shape.

    Examples
    --------
    >>> st = total_sobol_indices(lambda x: x[:, 0] + 2 * x[:, 1], 2, nb_design=256,
    ...                          random_state=0)
    >>> np.round(st, 1)
    array([0.2, 0.8], dtype=float32)
    """
    if not callable(f):
        raise TypeError(f"`f` must be callable, got {type(f).__name__}.")
    n_bootstrap = check_nonnegative_int(n_bootstrap, "n_bootstrap")
    confidence = _check_confidence(confidence)
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    check_choice(estimator, "estimator", ESTIMATORS)
    check_choice(variance, "variance", VARIANCES)
    rng = check_random_state(random_state)
    masks = sobol_design(dim, nb_design, sampler, rng, dtype=dtype)  # (N (dim + 2), dim)

    chunks = [masks] if batch_size is None else np.array_split(
        masks, range(batch_size, len(masks), batch_size))
    outputs = [_as_outputs(f(chunk), name="f(x)") for chunk in chunks]
    for chunk, out in zip(chunks, outputs, strict=True):
        if tuple(out.shape) != (len(chunk),):
            raise ValueError(
                f"`f` must return one value per point, shape ({len(chunk)},), got shape "
                f"{tuple(out.shape)}."
            )
    outputs = tf.concat(outputs, axis=0) if len(outputs) > 1 else outputs[0]  # (N (dim + 2),)

    indices, constant = _indices_kernel(outputs, dim, estimator, variance)
    _warn_constant(constant, stacklevel=2)
    indices = indices.numpy()
    if n_bootstrap == 0:
        return indices
    low, high = _bootstrap_intervals(outputs, dim, estimator, variance, n_bootstrap, confidence,
                                     rng)
    return SobolIndices(indices, low, high, confidence)


def _check_nb_design(nb_design):
    nb_design = check_positive_int(nb_design, "nb_design")
    if nb_design < 2:
        raise ValueError(
            f"`nb_design` must be >= 2 (a variance needs two points), got {nb_design}."
        )
    return nb_design


def _check_confidence(confidence):
    if isinstance(confidence, bool) or not isinstance(confidence, numbers.Real):
        raise TypeError(
            f"`confidence` must be a float, got {type(confidence).__name__} {confidence!r}."
        )
    if not 0.0 < float(confidence) < 1.0:
        raise ValueError(f"`confidence` must be in (0, 1), got {confidence}.")
    return float(confidence)


def _check_float_dtype(dtype):
    try:
        dtype = np.dtype(dtype)
    except TypeError as err:
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype!r}.") from err
    if not np.issubdtype(dtype, np.floating):
        raise TypeError(f"`dtype` must be a floating dtype, got {dtype}.")
    return dtype
