"""Coupled non-negative matrix factorization X_b ≈ F W_b of several blocks, in TensorFlow ops.

Every block X_b (N, p_b) describes the same N examples (the pixels of one image channel, the
activations of one layer, ...). All blocks share one example factor F (N, d) >= 0 and each has
its own W_b (d, p_b) >= 0. The objective is

    J = Σ_b α_b [½‖X_b − F W_b‖² + l1_w ‖W_b‖₁ + ½ l2_w ‖W_b‖²] + l1_f ‖F‖₁ + ½ l2_f ‖F‖²,

with block weights α_b (see :func:`block_weights`). With W̃ = [√α_1 W_1, ..., √α_B W_B] and
X̃ = [√α_1 X_1, ..., √α_B X_B], the data term is ½‖X̃ − F W̃‖²: a coupled fit without penalties is
the NMF of the weighted stacked matrix. So F needs one non-negative least-squares problem with
the Gram matrix G = Σ α_b W_b W_bᵀ and the data term R = Σ α_b X_b W_bᵀ, while the W_b are
independent given F and need only FᵀF and FᵀX_b (α_b factors out of their problems, which is
why their penalties carry α_b). Both products are sums over examples: :func:`fit_coupled` can
stream the examples in batches, so that no N × p_b block ever has to be on the device at once.

Solvers: ``"hals"`` (exact coordinate descent on one component at a time, with the accelerated
inner passes of :mod:`xcraft.ops.nmf`) and ``"mu"`` (Lee & Seung's multiplicative rules, as
Saini & Papalexakis use). After every sweep the components are rescaled (see
:func:`normalization_scales`); the ``"joint"`` rescaling leaves the data term unchanged.
"""

import numbers

import numpy as np
import tensorflow as tf

from xcraft._validation import check_choice
from xcraft.ops.nmf import (
    INNER_MIN_SIZE,
    INNER_RATIO,
    MAX_INNER,
    MAX_UNROLL,
    N_OVERSAMPLES,
    N_POWER_ITER,
    _decrease,
    _hals_update,
    initialize,
)

__all__ = [
    "SOLVERS",
    "NORMALIZATIONS",
    "INITS",
    "block_weights",
    "normalization_scales",
    "initialize_coupled",
    "fit_coupled",
    "solve_examples",
    "accumulate_products",
]

SOLVERS = ("hals", "mu")
NORMALIZATIONS = ("joint", "block", "none")
INITS = ("nndsvda", "nndsvd", "random")
WEIGHTS = ("frobenius", "uniform")


# --------------------------------------------------------------------------------------------
# Weights and normalisation
# --------------------------------------------------------------------------------------------


def block_weights(sq_norms, weights="frobenius"):
    """Return the block weights α_b as a float64 array.

    Parameters
    ----------
    sq_norms : array-like of shape (n_blocks,)
        ‖X_b‖²_F of every block, > 0.
    weights : {"frobenius", "uniform"} or array-like of shape (n_blocks,), default="frobenius"
        ``"frobenius"``: α_b = 1 / ‖X_b‖², so every block counts by its *relative* error and a
        16 384-column layer cannot drown a 1 024-pixel block. ``"uniform"``: α_b = 1 (Saini &
        Papalexakis). An array: the α_b themselves (finite, > 0).

    Returns
    -------
    ndarray of shape (n_blocks,)
    """
    sq_norms = np.asarray(sq_norms, np.float64)
    if isinstance(weights, str):
        check_choice(weights, "weights", WEIGHTS)
        if weights == "uniform":
            return np.ones_like(sq_norms)
        return 1.0 / sq_norms
    alphas = np.asarray(weights, np.float64)
    if alphas.shape != sq_norms.shape or not np.all(np.isfinite(alphas) & (alphas > 0)):
        raise ValueError(
            f"`weights` must be finite and > 0, one per block ({sq_norms.shape[0]}), got "
            f"{alphas.tolist()}."
        )
    return alphas


def normalization_scales(ws, alphas, normalization):
    """Return the rescaling ``(m, s)`` of the components after a sweep.

    Column k of F is multiplied by ``m[k]`` and row k of W_b divided by ``s[b][k]``.

    - ``"joint"``: s_b = m = n, n_k = (Σ_b α_b ‖W_b[k]‖²)^½, the norm of row k of the weighted
      stack W̃. F W_b is unchanged, so is the data term, and afterwards W̃ has unit-norm rows.
    - ``"block"``: s_b[k] = ‖W_b[k]‖, every W_b gets unit-norm rows (the paper's constraint on
      the columns of its P_i and O_j); F cannot follow every block at once, and m_k = Σ_b α_b
      s_b[k] / Σ_b α_b is the least-squares compromise. The data term can change.
    - ``"none"``: no rescaling.

    Rows that are all zero are left as they are.
    """
    dtype = ws[0].dtype
    d = tf.shape(ws[0])[0]
    if normalization == "none":
        ones = tf.ones((d,), dtype)
        return ones, [ones for _ in ws]
    alphas = tf.cast(alphas, dtype)
    sq_rows = [tf.reduce_sum(tf.square(w), axis=1) for w in ws]  # (d,) each
    if normalization == "joint":
        norm = tf.sqrt(tf.add_n([a * s for a, s in zip(tf.unstack(alphas), sq_rows, strict=True)]))
        norm = tf.where(norm > 0, norm, tf.ones_like(norm))
        return norm, [norm for _ in ws]
    norms = [tf.where(s > 0, tf.sqrt(s), tf.ones_like(s)) for s in sq_rows]
    weighted = [a * n for a, n in zip(tf.unstack(alphas), norms, strict=True)]
    m = tf.add_n(weighted) / tf.reduce_sum(alphas)
    return m, norms


# --------------------------------------------------------------------------------------------
# Kernels. As in xcraft.ops.nmf, a factor is updated in row layout V (d, m) given the data term
# `numer` (d, m) and the Gram matrix `gram` (d, d) of the other factor; the penalties enter as
# gram + l2 I and numer − l1.
# --------------------------------------------------------------------------------------------


def _update(solver, v, numer, gram, l1, max_inner):
    """Update ``v`` for ½ tr(V gram Vᵀ) − tr(V numerᵀ) + l1 Σ V; return (new v, exact drop)."""
    if solver == "mu":
        # Lee & Seung with an l1 term in the denominator (the positive part of the gradient);
        # rows with gram v + l1 = 0 are zero already and stay so.
        new = v * tf.math.divide_no_nan(tf.nn.relu(numer), tf.matmul(gram, v) + l1)
    else:
        new = _hals_update(v, numer - l1, gram, max_inner, v.shape[0] is not None
                           and v.shape[0] <= MAX_UNROLL)
    return new, _decrease(v, new, numer - l1, gram)


def _ridge(gram, l2):
    return gram + l2 * tf.eye(tf.shape(gram)[0], dtype=gram.dtype)


def _weighted_gram(ws, alphas):
    """G = Σ_b α_b W_b W_bᵀ (d, d)."""
    alphas = tf.unstack(tf.cast(alphas, ws[0].dtype))
    return tf.add_n([a * tf.matmul(w, w, transpose_b=True)
                     for a, w in zip(alphas, ws, strict=True)])


def _f_batch(xs, alphas, ws, gram, f_rows, solver, l1_f, inner_f):
    """Update the F rows of one batch of examples and return what the W step needs from it.

    ``xs``: the blocks' rows of the batch, (n, p_b) each; ``f_rows``: their F, transposed
    (d, n); ``gram``: G + l2_f I. Returns the new rows (d, n), the exact drop of the objective,
    the partial products F_newᵀ X_b (d, p_b) and F_newᵀ F_new (d, d), and F_new's column sums.
    """
    alphas = tf.unstack(tf.cast(alphas, f_rows.dtype))
    # R = Σ α_b W_b X_bᵀ: (d, p_b) @ (p_b, n) = (d, n) per block.
    numer = tf.add_n([a * tf.matmul(w, x, transpose_b=True)
                      for a, w, x in zip(alphas, ws, xs, strict=True)])
    new_rows, drop = _update(solver, f_rows, numer, gram, l1_f, inner_f)
    ftx = [tf.matmul(new_rows, x) for x in xs]  # (d, n) @ (n, p_b) = (d, p_b)
    ftf = tf.matmul(new_rows, new_rows, transpose_b=True)  # (d, d)
    return new_rows, drop, ftx, ftf, tf.reduce_sum(new_rows, axis=1)


def _objective(sq_norms, alphas, ftx, ftf, colsum, ws, penalties):
    """J and the blocks' squared errors, in float64, from the sweep's products."""
    l1_f, l2_f, l1_w, l2_w = penalties
    ftf64 = tf.cast(ftf, tf.float64)
    sq_errs, total = [], tf.zeros((), tf.float64)
    for b, w in enumerate(ws):
        w64 = tf.cast(w, tf.float64)
        cross = tf.reduce_sum(tf.cast(ftx[b], tf.float64) * w64)
        fit = tf.reduce_sum(ftf64 * tf.matmul(w64, w64, transpose_b=True))
        sq_err = tf.maximum(sq_norms[b] - 2.0 * cross + fit, 0.0)
        sq_errs.append(sq_err)
        penalty_w = l1_w * tf.reduce_sum(w64) + 0.5 * l2_w * tf.reduce_sum(tf.square(w64))
        total += alphas[b] * (0.5 * sq_err + penalty_w)
    total += l1_f * tf.reduce_sum(tf.cast(colsum, tf.float64))
    total += 0.5 * l2_f * tf.linalg.trace(ftf64)
    return total, tf.stack(sq_errs)


def _finish_sweep(ws, ftx, ftf, colsum, sq_norms, alphas, drop_f, solver, normalization,
                  penalties, inner_w):
    """W step, objective and rescaling of a sweep whose F step gave ``ftx``, ``ftf``, ``colsum``.

    Returns the new W_b, the scale m of F's columns, J after the sweep, the exact decrease of J
    over the sweep and the blocks' squared errors (all float64 but the W_b).
    """
    dtype = ws[0].dtype
    _, _, l1_w, l2_w = penalties
    gram_w = _ridge(ftf, tf.cast(l2_w, dtype))
    new_ws, drop = [], tf.cast(drop_f, tf.float64)
    for b, w in enumerate(ws):
        new, drop_b = _update(solver, w, ftx[b], gram_w, tf.cast(l1_w, dtype), inner_w)
        new_ws.append(new)
        drop += alphas[b] * drop_b
    before, sq_errs = _objective(sq_norms, alphas, ftx, ftf, colsum, new_ws, penalties)
    m, s = normalization_scales(new_ws, alphas, normalization)
    new_ws = [w / s_b[:, None] for w, s_b in zip(new_ws, s, strict=True)]
    # The products of the rescaled factors, without touching the data again.
    ftx = [m[:, None] * p for p in ftx]
    ftf = m[:, None] * ftf * m[None, :]
    after, sq_errs_after = _objective(sq_norms, alphas, ftx, ftf, m * colsum, new_ws, penalties)
    # The rescaling changes J only through the penalties (and, with "block", the data term):
    # the difference of two values computed from the same products is exact up to float64
    # round-off, unlike the difference of the objectives of two sweeps in float32.
    decrease = drop - (after - before)
    errors = sq_errs if normalization != "block" else sq_errs_after
    return new_ws, m, after, decrease, errors


# --------------------------------------------------------------------------------------------
# Runners: the whole loop in one graph, or a Python loop over sweeps streaming the examples
# --------------------------------------------------------------------------------------------


@tf.function(reduce_retracing=True, autograph=False)
def _run_in_memory(xs, alphas, sq_norms, f, ws, max_iter, tol, solver, normalization,
                   penalties, inner_f, inner_w, verbose):
    dtype = f.dtype
    n_blocks = len(xs)
    l1_f, l2_f = tf.cast(penalties[0], dtype), tf.cast(penalties[1], dtype)
    history = tf.TensorArray(tf.float64, size=max_iter, element_shape=())
    errors = tf.TensorArray(tf.float64, size=max_iter, element_shape=(n_blocks,))

    def cond(i, f_rows, ws, converged, history, errors):
        return (i < max_iter) & tf.logical_not(converged)

    def body(i, f_rows, ws, converged, history, errors):
        ws = list(ws)
        gram = _ridge(_weighted_gram(ws, alphas), l2_f)
        new_rows, drop_f, ftx, ftf, colsum = _f_batch(
            xs, alphas, ws, gram, f_rows, solver, l1_f, inner_f
        )
        new_ws, m, objective, decrease, sq_errs = _finish_sweep(
            ws, ftx, ftf, colsum, sq_norms, alphas, drop_f, solver, normalization, penalties,
            inner_w,
        )
        if verbose:
            tf.print("CoupledNMF iteration", i + 1, "objective", objective)
        rel = tf.math.divide_no_nan(decrease, objective + decrease)
        converged = (rel < tol) | (objective <= 0.0)
        rel_errors = tf.sqrt(tf.math.divide_no_nan(sq_errs, sq_norms))
        return (i + 1, new_rows * m[:, None], tuple(new_ws), converged, history.write(i, objective),
                errors.write(i, rel_errors))

    init = (tf.constant(0), tf.transpose(f), tuple(ws), tf.constant(False), history, errors)
    n_iter, f_rows, ws, converged, history, errors = tf.while_loop(cond, body, init)
    return (tf.transpose(f_rows), list(ws), history.stack()[:n_iter], errors.stack()[:n_iter],
            n_iter, converged)


@tf.function(reduce_retracing=True, autograph=False)
def _stream_f_step(xs, alphas, ws, gram, f_rows, solver, l1_f, inner_f):
    return _f_batch(xs, alphas, ws, gram, f_rows, solver, l1_f, inner_f)


@tf.function(reduce_retracing=True, autograph=False)
def _stream_gram(ws, alphas, l2_f):
    return _ridge(_weighted_gram(ws, alphas), l2_f)


@tf.function(reduce_retracing=True, autograph=False)
def _stream_finish(ws, ftx, ftf, colsum, sq_norms, alphas, drop_f, solver, normalization,
                   penalties, inner_w):
    return _finish_sweep(list(ws), list(ftx), ftf, colsum, sq_norms, alphas, drop_f, solver,
                         normalization, penalties, inner_w)


def _batches(n, batch_size):
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def _rows(block, start, stop, dtype):
    """Rows ``start:stop`` of a block (an ndarray, a memmap, an HDF5 dataset...) as a tensor."""
    return tf.constant(np.asarray(block[start:stop]), dtype=dtype)


def accumulate_products(blocks, f, *, batch_size, dtype=tf.float32):
    """Return ``(FᵀF, [FᵀX_b])`` summed over batches of examples, never holding a whole block.

    Parameters
    ----------
    blocks : sequence of array-like of shape (n_samples, p_b)
        Anything sliceable by rows (ndarray, ``np.memmap``, HDF5 dataset).
    f : array-like of shape (n_samples, d)
    batch_size : int
        Examples per batch.
    dtype : tf.DType, default=tf.float32

    Returns
    -------
    ftf : tf.Tensor of shape (d, d)
    ftx : list of tf.Tensor of shape (d, p_b)
    """
    f = np.asarray(f)
    ftf, ftx = 0.0, [0.0 for _ in blocks]
    for start, stop in _batches(f.shape[0], batch_size):
        fb = tf.constant(f[start:stop], dtype)  # (n, d)
        ftf += tf.matmul(fb, fb, transpose_a=True)
        for b, block in enumerate(blocks):
            ftx[b] += tf.matmul(fb, _rows(block, start, stop, dtype), transpose_a=True)
    return ftf, ftx


def _run_streaming(blocks, alphas, sq_norms, f, ws, max_iter, tol, solver, normalization,
                   penalties, inner_f, inner_w, batch_size, progress):
    dtype = ws[0].dtype
    f = np.array(f, dtype=dtype.as_numpy_dtype)  # (N, d) on the host, updated batch by batch
    n = f.shape[0]
    l1_f, l2_f = tf.constant(penalties[0], dtype), tf.constant(penalties[1], dtype)
    history, errors, converged = [], [], False
    for _ in range(max_iter):
        gram = _stream_gram(tuple(ws), alphas, l2_f)
        ftx, ftf, colsum, drop_f = None, None, None, tf.zeros((), tf.float64)
        for start, stop in _batches(n, batch_size):
            xs = tuple(_rows(block, start, stop, dtype) for block in blocks)
            f_rows = tf.constant(f[start:stop].T)
            new_rows, drop, ftx_b, ftf_b, colsum_b = _stream_f_step(
                xs, alphas, tuple(ws), gram, f_rows, solver, l1_f, inner_f
            )
            f[start:stop] = new_rows.numpy().T
            drop_f += drop
            if ftx is None:
                ftx, ftf, colsum = list(ftx_b), ftf_b, colsum_b
            else:
                ftx = [a + b for a, b in zip(ftx, ftx_b, strict=True)]
                ftf, colsum = ftf + ftf_b, colsum + colsum_b
        ws, m, objective, decrease, sq_errs = _stream_finish(
            tuple(ws), tuple(ftx), ftf, colsum, sq_norms, alphas, drop_f, solver, normalization,
            penalties, inner_w,
        )
        ws = list(ws)
        f *= m.numpy()[None, :]
        objective, decrease = float(objective), float(decrease)
        history.append(objective)
        errors.append(np.sqrt(np.divide(sq_errs.numpy(), sq_norms.numpy())))
        if progress is not None:
            progress(len(history), objective)
        rel = decrease / (objective + decrease) if objective + decrease != 0 else 0.0
        if rel < tol or objective <= 0.0:
            converged = True
            break
    return (tf.constant(f), ws, tf.constant(history, tf.float64),
            tf.constant(np.reshape(errors, (len(errors), len(blocks))), tf.float64),
            len(history), converged)


def _inner_passes(n, p_total, d):
    """Accelerated-HALS passes per sweep for F and for the W_b (see xcraft.ops.nmf)."""
    if n * p_total < INNER_MIN_SIZE:
        return 1, 1
    inner_f = min(1 + int(INNER_RATIO * p_total / d), MAX_INNER)
    inner_w = min(1 + int(INNER_RATIO * n / d), MAX_INNER)
    return inner_f, inner_w


def _check_penalty(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}.")
    if not (np.isfinite(value) and value >= 0):
        raise ValueError(f"`{name}` must be a finite float >= 0, got {value}.")
    return float(value)


def fit_coupled(blocks, alphas, f, ws, *, solver="hals", normalization="joint", max_iter=200,
                tol=1e-4, l1_f=0.0, l2_f=0.0, l1_w=0.0, l2_w=0.0, batch_size=None,
                verbose=False, progress=None):
    """Run the coupled factorization from the start ``(f, ws)``.

    Tensor-level core of :class:`xcraft.coupled.CoupledNMF`; inputs are assumed valid (finite,
    non-negative, same number of rows).

    Parameters
    ----------
    blocks : sequence of array-like of shape (n_samples, p_b)
        The X_b. With ``batch_size`` they are only ever sliced by rows, so ``np.memmap`` or HDF5
        datasets work and stay on disk.
    alphas : array-like of shape (n_blocks,)
        Block weights α_b (:func:`block_weights`).
    f : array-like of shape (n_samples, d)
        Start of F, >= 0 (:func:`initialize_coupled`).
    ws : sequence of array-like of shape (d, p_b)
        Start of the W_b, >= 0.
    solver : {"hals", "mu"}, default="hals"
    normalization : {"joint", "block", "none"}, default="joint"
        Rescaling after every sweep, see :func:`normalization_scales`.
    max_iter : int, default=200
        Maximum number of sweeps (F, then every W_b).
    tol : float, default=1e-4
        Stop after the first sweep whose relative decrease of J, (J_{k-1} − J_k) / J_{k-1},
        is below ``tol``. The decrease is the exact drop made by each update, not a difference
        of two float32 objectives.
    l1_f, l2_f, l1_w, l2_w : float, default=0
        Penalties of the objective (see the module docstring).
    batch_size : int or None, default=None
        None: every block goes to the device whole and the loop runs in one ``tf.function``.
        An int: the examples are streamed in batches of this many, once per sweep; each batch
        updates its rows of F (their problems are independent given the W_b) and adds its
        share of FᵀF and FᵀX_b for the W step. Peak memory is then O(batch_size × Σ p_b +
        N d + d Σ p_b) instead of O(N Σ p_b).
    verbose : bool, default=False
        Print the objective after every sweep (in-memory runner).
    progress : callable or None, default=None
        Called as ``progress(sweep, objective)`` after every sweep of the streaming runner.

    Returns
    -------
    f : tf.Tensor of shape (n_samples, d)
    ws : list of tf.Tensor of shape (d, p_b)
    history : tf.Tensor of shape (n_iter,)
        J after every sweep, float64.
    errors : tf.Tensor of shape (n_iter, n_blocks)
        ‖X_b − F W_b‖_F / ‖X_b‖_F after every sweep, float64.
    n_iter : int
    converged : bool

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f0 = rng.uniform(size=(40, 3))
    >>> xs = [f0 @ rng.uniform(size=(3, 8)), f0 @ rng.uniform(size=(3, 5))]
    >>> alphas = block_weights([np.sum(x**2) for x in xs])
    >>> f, ws = initialize_coupled(xs, alphas, 3, seed=(0, 1))
    >>> f, ws, history, errors, n_iter, converged = fit_coupled(xs, alphas, f, ws)
    >>> bool(errors[-1].numpy().max() < 0.01)
    True
    """
    check_choice(solver, "solver", SOLVERS)
    check_choice(normalization, "normalization", NORMALIZATIONS)
    penalties = tuple(_check_penalty(v, name) for v, name in
                      zip((l1_f, l2_f, l1_w, l2_w), ("l1_f", "l2_f", "l1_w", "l2_w"), strict=True))
    dtype = tf.convert_to_tensor(ws[0]).dtype
    ws = [tf.cast(w, dtype) for w in ws]
    alphas = tf.constant(np.asarray(alphas, np.float64))
    n, d = np.shape(f)
    p_total = sum(int(np.shape(block)[1]) for block in blocks)
    inner_f, inner_w = _inner_passes(n, p_total, d)
    if batch_size is None or batch_size >= n:
        xs = tuple(tf.cast(block, dtype) for block in blocks)
        sq_norms = tf.stack([tf.reduce_sum(tf.square(tf.cast(x, tf.float64))) for x in xs])
        f, ws, history, errors, n_iter, converged = _run_in_memory(
            xs, alphas, sq_norms, tf.cast(f, dtype), tuple(ws), tf.constant(int(max_iter)),
            tf.constant(float(tol), tf.float64), solver, normalization, penalties,
            tf.constant(inner_f), tf.constant(inner_w), bool(verbose),
        )
        return f, list(ws), history, errors, int(n_iter), bool(converged)
    sq_norms = tf.constant(_sq_norms(blocks, batch_size))
    return _run_streaming(
        blocks, alphas, sq_norms, f, ws, int(max_iter), float(tol), solver, normalization,
        penalties, tf.constant(inner_f), tf.constant(inner_w), int(batch_size), progress,
    )


def _sq_norms(blocks, batch_size):
    """‖X_b‖² of every block in float64, read batch by batch."""
    n = np.shape(blocks[0])[0]
    totals = np.zeros(len(blocks))
    for start, stop in _batches(n, batch_size):
        for b, block in enumerate(blocks):
            totals[b] += np.sum(np.square(np.asarray(block[start:stop], np.float64)))
    return totals


# --------------------------------------------------------------------------------------------
# Initialisation: NNDSVD(a) of the weighted stacked matrix X̃, so that all blocks start aligned
# --------------------------------------------------------------------------------------------


def _streamed_svd(blocks, roots, rank, seed, batch_size, dtype):
    """Leading singular triplets of X̃ = [√α_b X_b] by the randomized range finder of
    :mod:`xcraft.ops.nmf`, with every product formed batch by batch over the examples."""
    n = np.shape(blocks[0])[0]
    sizes = [int(np.shape(block)[1]) for block in blocks]
    p_total = sum(sizes)
    size = min(rank + N_OVERSAMPLES, n, p_total)
    omega = tf.random.stateless_normal((p_total, size), seed, dtype=dtype)  # (P, k)
    omegas = tf.split(omega, sizes, axis=0)
    batches = _batches(n, batch_size)

    def times(right):  # X̃ @ right, right given per block (p_b, k) -> (N, k)
        parts = []
        for start, stop in batches:
            parts.append(tf.add_n([
                r * tf.matmul(_rows(block, start, stop, dtype), rb)
                for block, r, rb in zip(blocks, roots, right, strict=True)
            ]))
        return tf.concat(parts, axis=0)

    def transposed_times(left):  # X̃ᵀ @ left, (N, k) -> per block (p_b, k)
        out = [0.0 for _ in blocks]
        for start, stop in batches:
            lb = left[start:stop]
            for b, (block, r) in enumerate(zip(blocks, roots, strict=True)):
                out[b] += r * tf.matmul(_rows(block, start, stop, dtype), lb, transpose_a=True)
        return out

    q = tf.linalg.qr(times(omegas))[0]  # (N, k)
    for _ in range(N_POWER_ITER):
        z = tf.linalg.qr(tf.concat(transposed_times(q), axis=0))[0]  # (P, k)
        q = tf.linalg.qr(times(tf.split(z, sizes, axis=0)))[0]  # (N, k)
    small = tf.transpose(tf.concat(transposed_times(q), axis=0))  # (k, P) = qᵀ X̃
    s, left_small, right = tf.linalg.svd(small)  # (k,), (k, k), (P, k)
    left = tf.matmul(q, left_small)  # (N, k)
    return s[:rank], left[:, :rank], right[:, :rank]


def _nndsvd_from_svd(s, left, right):
    """NNDSVD (Boutsidis & Gallopoulos, 2008) from given singular triplets, as in
    :mod:`xcraft.ops.nmf`: each pair keeps its dominant non-negative rank-one part."""
    left_pos, left_neg = tf.nn.relu(left), tf.nn.relu(-left)
    right_pos, right_neg = tf.nn.relu(right), tf.nn.relu(-right)
    norms = [tf.norm(x, axis=0) for x in (left_pos, left_neg, right_pos, right_neg)]
    mass_pos, mass_neg = norms[0] * norms[2], norms[1] * norms[3]
    use_pos = mass_pos >= mass_neg
    left_part = tf.where(use_pos, left_pos, left_neg)
    right_part = tf.where(use_pos, right_pos, right_neg)
    weight = tf.sqrt(s * tf.where(use_pos, mass_pos, mass_neg))
    u = left_part * tf.math.divide_no_nan(weight, tf.where(use_pos, norms[0], norms[1]))
    w = tf.transpose(right_part * tf.math.divide_no_nan(weight, tf.where(use_pos, norms[2],
                                                                          norms[3])))
    # The leading pair is the Perron pair of a non-negative matrix: |u₁| and |v₁| whole.
    u = tf.concat([tf.sqrt(s[:1]) * tf.abs(left[:, :1]), u[:, 1:]], axis=1)
    w = tf.concat([tf.sqrt(s[:1])[:, None] * tf.abs(tf.transpose(right[:, :1])), w[1:]], axis=0)
    return u, w


def initialize_coupled(blocks, alphas, n_components, *, init="nndsvda", seed=(0, 0),
                       batch_size=None, dtype=None):
    """Return a start ``(f, ws)`` from the weighted stacked matrix X̃ = [√α_b X_b].

    A factorization of X̃ started from its NNDSVD is one start for all blocks at once: the
    components of every W_b come from the same singular vectors, so they are aligned from the
    first sweep (separate starts per block would pair unrelated components).

    Parameters
    ----------
    blocks : sequence of array-like of shape (n_samples, p_b)
    alphas : array-like of shape (n_blocks,)
    n_components : int
        d, at most min(n_samples, Σ p_b) for the NNDSVD starts.
    init : {"nndsvda", "nndsvd", "random"}, default="nndsvda"
        As in :func:`xcraft.ops.nmf.initialize`, applied to X̃; zeros of ``"nndsvda"`` are filled
        with the mean of X̃.
    seed : array-like of 2 ints, default=(0, 0)
        Seed of ``tf.random.stateless_*``; the same seed gives the start
        :func:`xcraft.ops.nmf.initialize` gives X̃.
    batch_size : int or None, default=None
        Stream the examples in batches of this many (the randomized SVD only needs products
        with X̃ and X̃ᵀ, which are sums over batches) instead of stacking X̃ in memory.
    dtype : tf.DType or None, default=None
        float64 when every block is float64 (the default), else float32.

    Returns
    -------
    f : tf.Tensor of shape (n_samples, n_components)
    ws : list of tf.Tensor of shape (n_components, p_b)
        In the blocks' own scale: W_b = W̃_b / √α_b.
    """
    check_choice(init, "init", INITS)
    if dtype is None:
        all64 = all(np.asarray(block[:1]).dtype == np.float64 for block in blocks)
        dtype = tf.float64 if all64 else tf.float32
    roots = [float(r) for r in np.sqrt(np.asarray(alphas, np.float64))]
    sizes = [int(np.shape(block)[1]) for block in blocks]
    n = int(np.shape(blocks[0])[0])
    if batch_size is None or batch_size >= n:
        stacked = tf.concat([r * tf.cast(block, dtype)
                             for r, block in zip(roots, blocks, strict=True)], 1)
        f, w = initialize(stacked, n_components, init=init, seed=seed)
    else:
        seed_t = tf.convert_to_tensor(seed, tf.int32)
        svd_seed, fill_seed, fill_seed_w = tf.unstack(
            tf.random.experimental.stateless_split(seed_t, 3)
        )
        total = 0.0
        for start, stop in _batches(n, batch_size):
            total += sum(r * np.sum(np.asarray(block[start:stop], np.float64))
                         for r, block in zip(roots, blocks, strict=True))
        mean = tf.constant(total / (n * sum(sizes)), dtype)

        def abs_normal(shape, s):
            return tf.abs(tf.random.stateless_normal(shape, s, dtype=dtype))

        if init == "random":
            scale = tf.sqrt(mean / n_components)
            f = scale * abs_normal((n, n_components), fill_seed)
            w = scale * abs_normal((n_components, sum(sizes)), fill_seed_w)
        else:
            f, w = _nndsvd_from_svd(*_streamed_svd(blocks, roots, n_components, svd_seed,
                                                   batch_size, dtype))
            if init == "nndsvda":
                f = tf.where(f == 0, mean, f)
                w = tf.where(w == 0, mean, w)
    ws = [w_b / r for w_b, r in zip(tf.split(w, sizes, axis=1), roots, strict=True)]
    return f, ws


# --------------------------------------------------------------------------------------------
# New examples: F by exact NNLS with the W_b fixed
# --------------------------------------------------------------------------------------------


def solve_examples(blocks, alphas, ws, *, l1_f=0.0, l2_f=0.0, batch_size=None):
    """Return F = argmin_{F >= 0} Σ_b α_b ½‖X_b − F W_b‖² + l1_f ‖F‖₁ + ½ l2_f ‖F‖² (W_b fixed).

    Any subset of the fitted blocks can be given: the problem is the NNLS of the stacked
    X̃ = [√α_b X_b] against W̃ = [√α_b W_b], solved exactly by :func:`xcraft.ops.nnls.solve_nnls`.

    Parameters
    ----------
    blocks : sequence of array-like of shape (n_samples, p_b)
    alphas : array-like of shape (n_blocks,)
    ws : sequence of array-like of shape (d, p_b)
    l1_f, l2_f : float, default=0
        The penalties on F. The ridge enters as √l2_f I appended to W̃ (and zeros to X̃); the
        l1 term as the shift X̃ − l1_f c with c the least-norm solution of W̃ cᵀ = 1, which turns
        the linear term into a data term (exact when W̃ has full row rank).
    batch_size : int or None, default=None
        Examples per NNLS call (None: all at once).

    Returns
    -------
    f : ndarray of shape (n_samples, d)
    """
    from xcraft.ops.nnls import solve_nnls

    roots = np.sqrt(np.asarray(alphas, np.float64))
    dtype = np.float64 if all(np.asarray(w).dtype == np.float64 for w in ws) else np.float32
    bank = np.concatenate([r * np.asarray(w, np.float64)
                           for r, w in zip(roots, ws, strict=True)], axis=1)
    d = bank.shape[0]
    if l2_f > 0:
        bank = np.concatenate([bank, np.sqrt(l2_f) * np.eye(d)], axis=1)
    shift = None
    if l1_f > 0:
        shift = l1_f * np.linalg.lstsq(bank, np.ones(d), rcond=None)[0]  # (P',)
    n = int(np.shape(blocks[0])[0])
    batch_size = n if batch_size is None else int(batch_size)
    out = np.empty((n, d), dtype)
    for start, stop in _batches(n, batch_size):
        rows = [r * np.asarray(block[start:stop], np.float64)
                for r, block in zip(roots, blocks, strict=True)]
        if l2_f > 0:
            rows.append(np.zeros((stop - start, d)))
        a = np.concatenate(rows, axis=1)
        if shift is not None:
            a = a - shift[None, :]
        out[start:stop] = solve_nnls(a.astype(dtype), bank.astype(dtype)).numpy()
    return out
