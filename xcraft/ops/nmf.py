"""Non-negative matrix factorization A ≈ U W in TensorFlow ops.

CRAFT factorizes the pooled activations ``A`` (n, p) of a class into coefficients ``U`` (n, r)
and a concept bank ``W`` (r, p), both non-negative, by minimising the Frobenius objective

    ½ ‖A − U W‖²_F   subject to   U ≥ 0, W ≥ 0.

Two solvers share one loop: hierarchical alternating least squares (``"hals"``, exact coordinate
descent on one component at a time) and Lee & Seung's multiplicative updates (``"mu"``). Every
sweep needs the products A Wᵀ, W Wᵀ, Uᵀ A and Uᵀ U once; the two (n, p) × (p, r) matmuls dominate
and everything else costs O((n + p) r²). The whole iteration runs inside one ``tf.function``
(``tf.while_loop``), so it runs on a GPU when there is one.

:func:`factorize` and :func:`solve_coefficients` take and return tensors; :class:`NMF` wraps them
in a scikit-learn transformer that takes and returns NumPy arrays.
"""

import numbers
import warnings

import numpy as np
import tensorflow as tf
from scipy import sparse
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning, NotFittedError
from sklearn.utils.validation import check_is_fitted

from xcraft._validation import check_choice, check_positive_int, check_random_state
from xcraft.ops import distribute
from xcraft.ops._memory import to_tensor
from xcraft.ops.distribute import replica_devices

__all__ = [
    "NMF",
    "factorize",
    "solve_coefficients",
    "initialize",
    "ConvergenceWarning",
    "NotFittedError",
]

SOLVERS = ("hals", "mu")
INITS = ("nndsvd", "nndsvda", "nndsvdar", "random")

# Randomized SVD of the NNDSVD initialisation (Halko, Martinsson & Tropp, 2011): the range of A
# is sampled with r + N_OVERSAMPLES Gaussian directions refined by N_POWER_ITER power
# iterations. On 20000 × 2048 activation-like matrices 1, 2 or 4 iterations gave the same final
# error to 7 digits, 2 costing 0.6 s less CPU than 4; scikit-learn uses 4 to 7.
N_OVERSAMPLES = 10
N_POWER_ITER = 2

# Accelerated HALS (Gillis & Glineur, 2012): once the Gram products of a sweep are paid for,
# re-running the cheap O(m r²) row updates of the same factor is almost free. A factor gets up
# to 1 + INNER_RATIO · (flops of its Gram products) / (flops of one pass) = 1 + INNER_RATIO · m' / r
# passes (m' = long side of the other factor), at most MAX_INNER, and stops as soon as a pass
# moves it by less than INNER_DECAY times what the first pass moved it (the paper's values).
# Below INNER_MIN_SIZE entries in A, per-op overhead rather than flops sets the cost of a pass,
# and one pass per sweep is faster.
INNER_RATIO = 0.5
INNER_DECAY = 0.1
MAX_INNER = 10
INNER_MIN_SIZE = 2**16

# A HALS pass is a loop of r small row updates. Compiled with XLA it updates the factor in place
# and fuses each row update, about 4x faster on a (25, 20000) factor, but XLA compiles once per
# shape (about a second). Factors with fewer entries than this use the uncompiled graph.
XLA_MIN_SIZE = 2**16
#: Rows per block of the final residual norm: 4 096 rows x 2 048 channels is 64 MiB in float64.
RESIDUAL_BLOCK_ROWS = 4096

# Ranks up to this are unrolled in the graph of a HALS pass; larger or unknown ones loop.
MAX_UNROLL = 64


# --------------------------------------------------------------------------------------------
# Kernels. A factor is updated in "row" layout V (r, m): V = Uᵀ (m = n) for the coefficients and
# V = W (m = p) for the concept bank, with `numer` = the data term (W Aᵀ or Uᵀ A, (r, m)) and
# `gram` = the Gram matrix of the other factor (r, r). Then ½‖A − U W‖² = ½ tr(V gram Vᵀ) −
# tr(V numerᵀ) + const, and both solvers only ever see (V, numer, gram).
# --------------------------------------------------------------------------------------------


def _hals_pass(v, numer, gram, unroll):
    """One HALS pass: update each row of ``v`` (r, m) in turn, in closed form."""
    n_rows = v.shape[0]
    if unroll and n_rows is not None and n_rows <= MAX_UNROLL:
        # A static rank: unrolled in the graph, which spares the while-loop bookkeeping (4x
        # faster per pass on small matrices). Not under XLA, which compiles an unrolled pass
        # 6x slower and runs it 3x slower (it copies the factor at each step). The rows are
        # split once, so that a row update is six ops and no slicing: the trace of this
        # unrolled loop was most of the first fit's cost (0.6 of 1.2 s on the demo).
        axis, zero = tf.constant(0), tf.zeros((), v.dtype)  # shared, not one constant per op
        rows, numer_rows, gram_rows = (tf.split(x, n_rows, axis=axis) for x in (v, numer, gram))
        diag = tf.unstack(tf.linalg.diag_part(gram))  # r scalars
        for t in range(n_rows):
            # As update_row below, on the factor with rows < t already updated: (1, r) @ (r, m).
            step = numer_rows[t] - tf.matmul(gram_rows[t], tf.concat(rows, axis))  # (1, m)
            rows[t] = tf.maximum(rows[t] + tf.math.divide_no_nan(step, diag[t]), zero)
        return tf.concat(rows, axis)  # (r, m)

    diag = tf.linalg.diag_part(gram)  # (r,)

    def update_row(t, v):
        # Gradient of the objective along row t, with rows < t already updated (Gauss-Seidel).
        step = numer[t] - tf.linalg.matvec(v, gram[t], transpose_a=True)  # (m,) = gram[t] @ v
        # divide_no_nan: a component whose partner factor is all zero has a zero Hessian and a
        # zero gradient, and stays as it is instead of becoming NaN.
        row = tf.maximum(v[t] + tf.math.divide_no_nan(step, diag[t]), 0.0)  # (m,)
        return tf.tensor_scatter_nd_update(v, [[t]], row[None])

    _, v = tf.while_loop(
        lambda t, _: t < tf.shape(v)[0], lambda t, v: (t + 1, update_row(t, v)), (0, v)
    )
    return v


def _hals_update(v, numer, gram, max_inner, unroll=True):
    """Up to ``max_inner`` HALS passes on one factor, reusing ``numer`` and ``gram``."""

    def cond(k, v, move, first_move):
        return (k < max_inner) & (move > INNER_DECAY**2 * first_move)

    def body(k, v, move, first_move):
        new = _hals_pass(v, numer, gram, unroll)
        move = tf.reduce_sum(tf.square(new - v))
        return k + 1, new, move, tf.where(k == 0, move, first_move)

    zero = tf.zeros((), v.dtype)
    # At k = 0 the condition reads inf > 0, so the first pass always runs.
    init = (tf.constant(0), v, tf.constant(np.inf, v.dtype), zero)
    return tf.while_loop(cond, body, init)[1]


_hals_update_xla = tf.function(
    lambda v, numer, gram, max_inner: _hals_update(v, numer, gram, max_inner, unroll=False),
    jit_compile=True,
    autograph=False,
)


def _mu_update(v, numer, gram):
    """One multiplicative update of ``v`` (r, m): v ← v ⊙ numer / (gram v)."""
    # Lee & Seung's ratio of the negative and positive parts of the gradient. Where gram v = 0
    # the row is already 0 (gram has a positive diagonal), so divide_no_nan keeps it 0, not NaN.
    return v * tf.math.divide_no_nan(numer, tf.matmul(gram, v))  # (r, m)


def _max_inner(rank, other_size, size):
    """Number of HALS passes per sweep allowed for a factor (see INNER_RATIO)."""
    ratio = INNER_RATIO * tf.cast(other_size, tf.float64) / tf.cast(rank, tf.float64)
    passes = tf.minimum(1 + tf.cast(ratio, tf.int32), MAX_INNER)
    return tf.where(size < INNER_MIN_SIZE, 1, passes)


def _update(solver, v, numer, gram, use_xla, max_inner):
    """Update the factor ``v`` (r, m) given its data term and the partner's Gram matrix."""
    if solver == "mu":
        return _mu_update(v, numer, gram)
    update = _hals_update_xla if use_xla else _hals_update
    return update(v, numer, gram, max_inner)


def _decrease(old, new, numer, gram):
    """Exact decrease of ½‖A − UW‖² made by one factor's update, in float64.

    With D = new − old and G = numer − gram old (minus the gradient at ``old``) the objective
    drops by ⟨G, D⟩ − ½⟨gram, D Dᵀ⟩. This involves only the small quantities G and D, where the
    difference of two errors near convergence cancels down to float32 round-off.
    """
    d = new - old  # (r, m)
    g = numer - tf.matmul(gram, old)  # (r, r) @ (r, m) = (r, m)
    dd = tf.matmul(d, d, transpose_b=True)  # (r, m) @ (m, r) = (r, r)
    drop = tf.reduce_sum(g * d) - 0.5 * tf.reduce_sum(gram * dd)
    return tf.cast(drop, tf.float64)


@tf.function(reduce_retracing=True, autograph=False)
def _run_factorization(a, u, w, max_iter, tol, solver, verbose, xla_u=False, xla_w=False,
                       sq_norm_a=None, devices=None):
    """Alternate updates of U (n, r) and W (r, p) from the given start, in one graph.

    With ``devices`` (those of an active multi-replica tf.distribute strategy), the rows of A
    are split once across them and the two (n, p)-sized products run there, shard by shard.

    Returns U, W, the relative error after each sweep (float64), the number of sweeps and
    whether the relative decrease of the error fell below ``tol``.
    """
    if sq_norm_a is None:
        sq_norm_a = _squared_norm(a)
    u_rows = tf.transpose(u)  # (r, n): rows are contiguous for the row-wise kernels
    history = tf.TensorArray(tf.float64, size=max_iter, element_shape=())
    n, p = tf.shape(a)[0], tf.shape(a)[1]
    rank = tf.shape(w)[0]
    inner_u, inner_w = _max_inner(rank, p, tf.size(a)), _max_inner(rank, n, tf.size(a))

    if devices:
        bounds = [(n * i) // len(devices) for i in range(len(devices) + 1)]
        shards = []
        for device, start, stop in zip(devices, bounds[:-1], bounds[1:], strict=True):
            with tf.device(device):
                shards.append(tf.identity(a[start:stop]))  # copied to its device once

        def a_wt_rows(w):  # (r, n), each device its columns
            parts = []
            for device, shard in zip(devices, shards, strict=True):
                with tf.device(device):
                    parts.append(tf.matmul(w, shard, transpose_b=True))
            return tf.concat(parts, axis=1)

        def ut_a(u):  # (r, p), the sum of each device's partial product
            parts = []
            for device, shard, start, stop in zip(devices, shards, bounds[:-1], bounds[1:],
                                                  strict=True):
                with tf.device(device):
                    parts.append(tf.matmul(u[start:stop], shard, transpose_a=True))
            return tf.add_n(parts)
    else:
        def a_wt_rows(w):
            return tf.transpose(tf.matmul(a, w, transpose_b=True))  # (n, p) @ (p, r) -> (r, n)

        def ut_a(u):
            return tf.matmul(u, a, transpose_a=True)  # (r, n) @ (n, p) = (r, p)

    def cond(i, u_rows, w, converged, history):
        return (i < max_iter) & tf.logical_not(converged)

    def body(i, u_rows, w, converged, history):
        wwt = tf.matmul(w, w, transpose_b=True)  # (r, p) @ (p, r) = (r, r)
        awt_rows = a_wt_rows(w)
        new_u_rows = _update(solver, u_rows, awt_rows, wwt, xla_u, inner_u)  # (r, n)
        drop = _decrease(u_rows, new_u_rows, awt_rows, wwt)
        u = tf.transpose(new_u_rows)  # (n, r)
        uta = ut_a(u)
        utu = tf.matmul(new_u_rows, u)  # (r, n) @ (n, r) = (r, r)
        new_w = _update(solver, w, uta, utu, xla_w, inner_w)  # (r, p)
        drop += _decrease(w, new_w, uta, utu)
        # ‖A − UW‖² = ‖A‖² − 2⟨UᵀA, W⟩ + ⟨UᵀU, WWᵀ⟩ from products already at hand, which saves
        # a third (n, p)-sized matmul per sweep. In float32 it carries a round-off of about
        # 1e-7 ‖A‖², so the stopping rule below uses the exact `drop` instead of differences.
        # The (r, p) and (r, r) factors are cast before the reductions (cheap), so only the
        # round-off of the big matmuls remains.
        w64 = tf.cast(new_w, tf.float64)
        cross = tf.reduce_sum(tf.cast(uta, tf.float64) * w64)
        fit = tf.reduce_sum(tf.cast(utu, tf.float64) * tf.matmul(w64, w64, transpose_b=True))
        sq_err = tf.maximum(sq_norm_a - 2.0 * cross + fit, 0.0)
        err = tf.math.divide_no_nan(tf.sqrt(sq_err), tf.sqrt(sq_norm_a))
        if verbose:
            tf.print("NMF iteration", i + 1, "relative error", err)
        # (e_{k-1} − e_k) / e_{k-1} = (e²_{k-1} − e²_k) / (e_{k-1} (e_{k-1} + e_k)), where
        # e²_{k-1} − e²_k = 2 drop / ‖A‖². An error at round-off level (0) is converged too.
        prev = tf.sqrt(sq_err + 2.0 * drop)
        decrease = tf.math.divide_no_nan(2.0 * drop, prev * (prev + tf.sqrt(sq_err)))
        converged = (decrease < tol) | (sq_err <= 0.0)
        return i + 1, new_u_rows, new_w, converged, history.write(i, err)

    init = (tf.constant(0), u_rows, w, tf.constant(False), history)
    n_iter, u_rows, w, converged, history = tf.while_loop(cond, body, init)
    return tf.transpose(u_rows), w, history.stack()[:n_iter], n_iter, converged


@tf.function(reduce_retracing=True, autograph=False)
def _run_coefficients(a, w, max_iter, tol, solver, use_xla=False):
    """Solve min_{U ≥ 0} ½‖A − U W‖² with W fixed, from the best constant start."""
    wwt = tf.matmul(w, w, transpose_b=True)  # (r, r)
    awt_rows = tf.matmul(w, a, transpose_b=True)  # (r, p) @ (p, n) = (r, n)
    # The constant U = c minimising ‖A − c 1 W‖: c = Σ A Wᵀ / (n Σ W Wᵀ). A constant start
    # keeps every entry positive, which the multiplicative updates need.
    n = tf.cast(tf.shape(a)[0], a.dtype)
    scale = tf.math.divide_no_nan(tf.reduce_sum(awt_rows), n * tf.reduce_sum(wwt))
    u_rows = tf.fill(tf.shape(awt_rows), tf.maximum(scale, 0.0))  # (r, n)

    def cond(i, u_rows, converged):
        return (i < max_iter) & tf.logical_not(converged)

    def body(i, u_rows, converged):
        new = _update(solver, u_rows, awt_rows, wwt, use_xla, 1)
        # W is fixed and a sweep is cheap, so the stopping rule is the relative change of U.
        change = tf.norm(new - u_rows)
        converged = change <= tol * tf.norm(new)
        return i + 1, new, converged

    n_iter, u_rows, converged = tf.while_loop(
        cond, body, (tf.constant(0), u_rows, tf.constant(False))
    )
    return tf.transpose(u_rows), n_iter, converged


# --------------------------------------------------------------------------------------------
# Initialisation
# --------------------------------------------------------------------------------------------


def _randomized_svd(a, rank, seed):
    """Leading ``rank`` singular triplets of ``a`` (n, p) by a randomized range finder.

    Returns ``s`` (rank,), ``left`` (n, rank), ``right`` (p, rank) with a ≈ left diag(s) rightᵀ.
    """
    n, p = a.shape
    size = min(rank + N_OVERSAMPLES, n, p)
    omega = tf.random.stateless_normal((p, size), seed, dtype=a.dtype)  # (p, k)
    # QR after every product keeps the power iterations from collapsing onto the top direction.
    q = tf.linalg.qr(tf.matmul(a, omega))[0]  # (n, k)
    for _ in range(N_POWER_ITER):
        z = tf.linalg.qr(tf.matmul(a, q, transpose_a=True))[0]  # (p, k)
        q = tf.linalg.qr(tf.matmul(a, z))[0]  # (n, k)
    small = tf.matmul(q, a, transpose_a=True)  # (k, n) @ (n, p) = (k, p)
    s, left_small, right = tf.linalg.svd(small)  # (k,), (k, k), (p, k)
    left = tf.matmul(q, left_small)  # (n, k)
    return s[:rank], left[:, :rank], right[:, :rank]


def _nndsvd(a, rank, seed):
    """NNDSVD of Boutsidis & Gallopoulos (2008): a non-negative start with exact zeros."""
    s, left, right = _randomized_svd(a, rank, seed)  # (r,), (n, r), (p, r)
    left_pos, left_neg = tf.nn.relu(left), tf.nn.relu(-left)
    right_pos, right_neg = tf.nn.relu(right), tf.nn.relu(-right)
    norms = [tf.norm(x, axis=0) for x in (left_pos, left_neg, right_pos, right_neg)]  # (r,) each
    mass_pos, mass_neg = norms[0] * norms[2], norms[1] * norms[3]
    # Each singular pair u vᵀ is replaced by the rank-one part, (u₊ v₊ᵀ) or (u₋ v₋ᵀ), that keeps
    # more of its norm. The SVD's sign ambiguity swaps the two parts and so changes nothing.
    use_pos = mass_pos >= mass_neg
    left_part = tf.where(use_pos, left_pos, left_neg)
    right_part = tf.where(use_pos, right_pos, right_neg)
    left_norm = tf.where(use_pos, norms[0], norms[1])
    right_norm = tf.where(use_pos, norms[2], norms[3])
    mass = tf.where(use_pos, mass_pos, mass_neg)
    weight = tf.sqrt(s * mass)  # (r,)
    u = left_part * tf.math.divide_no_nan(weight, left_norm)  # (n, r)
    w = tf.transpose(right_part * tf.math.divide_no_nan(weight, right_norm))  # (r, p)
    # The leading pair is the Perron pair of a non-negative matrix: take |u₁| and |v₁| whole.
    u = tf.concat([tf.sqrt(s[:1]) * tf.abs(left[:, :1]), u[:, 1:]], axis=1)
    w = tf.concat([tf.sqrt(s[:1])[:, None] * tf.abs(tf.transpose(right[:, :1])), w[1:]], axis=0)
    return u, w


def initialize(activations, n_components, *, init="nndsvda", seed=(0, 0)):
    """Return a non-negative start ``(u, w)`` for the factorization of ``activations``.

    Parameters
    ----------
    activations : tf.Tensor of shape (n_samples, n_features)
        Non-negative matrix A, float32 or float64.
    n_components : int
        Rank r of the factorization.
    init : {"nndsvd", "nndsvda", "nndsvdar", "random"}, default="nndsvda"
        ``"nndsvd"``: NNDSVD (Boutsidis & Gallopoulos, 2008), sparse, with exact zeros.
        ``"nndsvda"``: NNDSVD with its zeros set to the mean of A (best with ``"mu"``, whose
        zeros never move). ``"nndsvdar"``: zeros set to small random values (mean / 100 scale).
        ``"random"``: |N(0, 1)| entries scaled by sqrt(mean(A) / r).
    seed : array-like of 2 ints, default=(0, 0)
        Seed of ``tf.random.stateless_*`` (the SVD sketch and the random fills).

    Returns
    -------
    u : tf.Tensor of shape (n_samples, n_components)
    w : tf.Tensor of shape (n_components, n_features)

    Notes
    -----
    The SVD behind NNDSVD is a randomized one (range finder with ``N_OVERSAMPLES`` extra
    directions and ``N_POWER_ITER`` power iterations): its cost is a few (n, p) × (p, r + 10)
    matmuls, where a full ``tf.linalg.svd`` of a 20000 × 2048 matrix costs O(n p²).
    """
    a = activations
    n, p = a.shape
    seed = tf.convert_to_tensor(seed, tf.int32)
    svd_seed, fill_seed, fill_seed_w = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
    mean = tf.reduce_mean(a)

    def abs_normal(shape, seed):
        return tf.abs(tf.random.stateless_normal(shape, seed, dtype=a.dtype))

    if init == "random":
        scale = tf.sqrt(mean / n_components)
        return (
            scale * abs_normal((n, n_components), fill_seed),
            scale * abs_normal((n_components, p), fill_seed_w),
        )
    u, w = _nndsvd(a, n_components, svd_seed)
    if init == "nndsvda":
        u = tf.where(u == 0, mean, u)
        w = tf.where(w == 0, mean, w)
    elif init == "nndsvdar":
        u = tf.where(u == 0, mean / 100 * abs_normal(u.shape, fill_seed), u)
        w = tf.where(w == 0, mean / 100 * abs_normal(w.shape, fill_seed_w), w)
    return u, w


# --------------------------------------------------------------------------------------------
# Functional core
# --------------------------------------------------------------------------------------------


def _check_rank(n_components, init, shape):
    """NNDSVD starts from r singular pairs, so it needs r <= min(n, p)."""
    if init != "random" and n_components > min(shape):
        raise ValueError(
            f"`n_components` must be <= min(n_samples, n_features) = {min(shape)} "
            f"for init={init!r}, got {n_components}. Use init='random' for more components."
        )


def _squared_norm(a, block_rows=RESIDUAL_BLOCK_ROWS):
    """‖A‖²: per row in A's dtype, across rows in float64 (float32 keeps its precision).

    By row blocks, so that the squares never form a second (n, p) matrix.
    """
    n = tf.shape(a)[0]
    starts = tf.range(0, n, block_rows)

    def block_sum(start):
        block = a[start:start + block_rows]  # (block_rows, p) at most
        return tf.reduce_sum(tf.cast(tf.reduce_sum(tf.square(block), axis=1), tf.float64))

    return tf.reduce_sum(tf.map_fn(block_sum, starts, fn_output_signature=tf.float64))


def _residual_norm(activations, u, w, block_rows=RESIDUAL_BLOCK_ROWS):
    """‖A − U W‖_F summed over row blocks, in float64.

    Computed directly rather than from the Gram products (which lose precision near a perfect
    fit), but a block at a time in one graph: the full (n, p) product U W and residual would
    each cost as much memory as A itself.
    """
    a = to_tensor(activations)
    return _blocked_residual_norm(a, tf.cast(u, a.dtype), tf.cast(w, a.dtype), block_rows)


@tf.function(reduce_retracing=True, autograph=False)
def _blocked_residual_norm(a, u, w, block_rows):
    starts = tf.range(0, tf.shape(a)[0], block_rows)

    def block_sum(start):
        block = a[start:start + block_rows] - tf.matmul(u[start:start + block_rows], w)
        return tf.reduce_sum(tf.square(tf.cast(block, tf.float64)))  # (rows, p) at most

    return tf.sqrt(tf.reduce_sum(tf.map_fn(block_sum, starts, fn_output_signature=tf.float64)))


def _as_float_tensor(x):
    """float64 stays float64; every other dtype becomes float32 (aligned arrays: no copy)."""
    x = to_tensor(x)
    return x if x.dtype == tf.float64 else tf.cast(x, tf.float32)


def _check_loop_args(solver, max_iter, tol):
    check_choice(solver, "solver", SOLVERS)
    max_iter = check_positive_int(max_iter, "max_iter")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"`tol` must be a float, got {type(tol).__name__} {tol!r}.")
    if not (tol >= 0 and np.isfinite(tol)):
        raise ValueError(f"`tol` must be a finite float >= 0, got {tol}.")
    return max_iter, float(tol)


def _factorize(activations, n_components, solver, init, max_iter, tol, seed, verbose=False):
    a = _as_float_tensor(activations)
    u, w = initialize(a, n_components, init=init, seed=seed)
    n, p = a.shape
    devices = replica_devices()
    if devices:
        distribute.STATS["nmf"] += 1
    return _run_factorization(
        a, u, w, tf.constant(max_iter), tf.constant(tol, tf.float64), solver, verbose,
        n * n_components >= XLA_MIN_SIZE, p * n_components >= XLA_MIN_SIZE, devices=devices,
    )


def _coefficients(activations, concept_bank, solver, max_iter, tol):
    a = _as_float_tensor(activations)
    w = tf.cast(concept_bank, a.dtype)
    use_xla = a.shape[0] * w.shape[0] >= XLA_MIN_SIZE
    return _run_coefficients(
        a, w, tf.constant(max_iter), tf.constant(tol, a.dtype), solver, use_xla
    )


def factorize(
    activations, n_components, *, solver="hals", init="nndsvda", max_iter=200, tol=1e-4,
    seed=(0, 0),
):
    """Factorize non-negative ``activations`` ≈ ``u @ w`` with ``u, w >= 0``.

    Tensor-in, tensor-out core of :class:`NMF`; inputs are assumed valid (finite,
    non-negative, 2-D).

    Parameters
    ----------
    activations : tf.Tensor or array-like of shape (n_samples, n_features)
        Non-negative matrix A. float64 stays float64, anything else is computed in float32.
    n_components : int
        Rank r (the number of concepts).
    solver : {"hals", "mu"}, default="hals"
        Hierarchical alternating least squares or multiplicative updates.
    init : {"nndsvd", "nndsvda", "nndsvdar", "random"}, default="nndsvda"
        Start, see :func:`initialize`.
    max_iter : int, default=200
        Maximum number of sweeps (one update of U and one of W).
    tol : float, default=1e-4
        Stop after sweep k when (e_{k-1} − e_k) / e_{k-1} < tol, where e_k = ‖A − U W‖_F / ‖A‖_F
        after k sweeps (e_0: at the start).
    seed : array-like of 2 ints, default=(0, 0)
        Seed of the initialisation (``tf.random.stateless_*``).

    Returns
    -------
    u : tf.Tensor of shape (n_samples, n_components)
    w : tf.Tensor of shape (n_components, n_features)
        The concept bank.
    history : tf.Tensor of shape (n_iter,)
        Relative error e_k after each sweep, float64.
    n_iter : tf.Tensor, int32 scalar
        Number of sweeps run.

    Examples
    --------
    >>> a = tf.random.stateless_uniform((50, 12), seed=(0, 1))
    >>> u, w, history, n_iter = factorize(a, 3, seed=(2, 3))
    >>> u.shape, w.shape, bool(history[-1] < history[0])
    (TensorShape([50, 3]), TensorShape([3, 12]), True)
    """
    max_iter, tol = _check_loop_args(solver, max_iter, tol)
    check_choice(init, "init", INITS)
    n_components = check_positive_int(n_components, "n_components")
    activations = _as_float_tensor(activations)
    _check_rank(n_components, init, activations.shape)
    u, w, history, n_iter, _ = _factorize(
        activations, n_components, solver, init, max_iter, tol, seed
    )
    return u, w, history, n_iter


def solve_coefficients(activations, concept_bank, *, solver="hals", max_iter=200, tol=1e-4):
    """Return ``u = argmin_{u >= 0} ½‖activations − u concept_bank‖²_F`` (W fixed).

    Parameters
    ----------
    activations : tf.Tensor or array-like of shape (n_samples, n_features)
    concept_bank : tf.Tensor or array-like of shape (n_components, n_features)
        W, non-negative.
    solver : {"hals", "mu"}, default="hals"
        ``"hals"`` is exact coordinate descent on this convex problem; ``"mu"`` converges more
        slowly.
    max_iter : int, default=200
    tol : float, default=1e-4
        Stop when ‖U_k − U_{k-1}‖_F <= tol ‖U_k‖_F.

    Returns
    -------
    u : tf.Tensor of shape (n_samples, n_components)
    """
    max_iter, tol = _check_loop_args(solver, max_iter, tol)
    u, _, _ = _coefficients(activations, concept_bank, solver, max_iter, tol)
    return u


# --------------------------------------------------------------------------------------------
# Estimator
# --------------------------------------------------------------------------------------------


# auto_wrap_output_keys=None: no set_output wrapper around transform and fit_transform, so that
# warnings raised with stacklevel=2 point at the caller's line.
class NMF(TransformerMixin, BaseEstimator, auto_wrap_output_keys=None):
    """Non-negative matrix factorization A ≈ U W computed with TensorFlow.

    Minimises ½‖A − U W‖²_F over U ≥ 0 (n_samples, n_components) and W ≥ 0
    (n_components, n_features). W is ``components_``, the concept bank; U is what
    :meth:`fit_transform` and :meth:`transform` return.

    Parameters
    ----------
    n_components : int, default=10
        Rank r of the factorization (number of concepts).
    solver : {"hals", "mu"}, default="hals"
        ``"hals"``: hierarchical alternating least squares, i.e. exact coordinate descent on one
        component (a column of U, a row of W) at a time, with extra inner passes while the Gram
        products are at hand (accelerated HALS). ``"mu"``: Lee & Seung's multiplicative updates.
    init : {"nndsvd", "nndsvda", "nndsvdar", "random"}, default="nndsvda"
        Start of the iterations, with scikit-learn's meanings: NNDSVD, NNDSVD with zeros filled
        with the mean of A (``"a"``) or with small random values (``"ar"``), or scaled
        |Gaussian| entries. The NNDSVD variants need n_components <= min(n_samples, n_features).
    max_iter : int, default=200
        Maximum number of sweeps (one update of U then one of W).
    tol : float, default=1e-4
        Convergence tolerance: fit stops after the first sweep k whose relative decrease of the
        error, (e_{k-1} − e_k) / e_{k-1} with e_k = ‖A − U W‖_F / ‖A‖_F, falls below ``tol``;
        transform stops when the relative change of U, ‖U_k − U_{k-1}‖_F / ‖U_k‖_F, does.
    random_state : int, numpy.random.Generator or None, default=None
        Seeds the randomized SVD of NNDSVD and the random fills.
    verbose : bool, default=False
        Print the relative error after every sweep.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        The concept bank W.
    n_iter_ : int
        Number of sweeps run by the last fit.
    reconstruction_err_ : float
        ‖A − U W‖_F of the fitted factors (absolute, as scikit-learn reports it).
    history_ : ndarray of shape (n_iter_,)
        Relative error ‖A − U W‖_F / ‖A‖_F after each sweep, in float64. It is computed from
        the products of the sweep, ‖A‖² − 2⟨UᵀA, W⟩ + ⟨UᵀU, WWᵀ⟩, so for float32 input it
        carries a round-off of about 1e-7 ‖A‖²_F on the squared error.
    n_features_in_ : int
        Number of columns of the matrix seen in fit.

    Notes
    -----
    float64 input is factorized in float64; any other dtype in float32.

    A sweep costs two (n, p) × (p, r) matmuls (A Wᵀ and Uᵀ A) plus O((n + p) r²). With
    ``"hals"``, each factor then gets several passes of row updates while those products are at
    hand (accelerated HALS), and the coefficient passes run under XLA when U has at least
    ``XLA_MIN_SIZE`` entries. The stopping rule uses the exact decrease of the objective made by
    each update rather than a difference of two errors, so that float32 round-off does not stop
    (or prolong) the iterations near convergence. The NNDSVD start comes from a randomized SVD.

    References
    ----------
    Fel et al., "CRAFT: Concept Recursive Activation FacTorization for Explainability",
    CVPR 2023. Cichocki & Phan, "Fast local algorithms for large scale nonnegative matrix and
    tensor factorizations", IEICE 2009. Gillis & Glineur, "Accelerated multiplicative updates
    and hierarchical ALS algorithms for nonnegative matrix factorization", Neural Computation
    2012. Boutsidis & Gallopoulos, "SVD based initialization: a head start for nonnegative
    matrix factorization", Pattern Recognition 2008.

    Examples
    --------
    >>> import numpy as np
    >>> a = np.random.default_rng(0).uniform(size=(30, 8))
    >>> nmf = NMF(3, random_state=0)
    >>> u = nmf.fit_transform(a)
    >>> u.shape, nmf.components_.shape
    ((30, 3), (3, 8))
    """

    def __init__(
        self, n_components=10, *, solver="hals", init="nndsvda", max_iter=200, tol=1e-4,
        random_state=None, verbose=False,
    ):
        self.n_components = n_components
        self.solver = solver
        self.init = init
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state
        self.verbose = verbose

    def __sklearn_tags__(self):
        tags = super().__sklearn_tags__()
        tags.input_tags.positive_only = True
        tags.transformer_tags.preserves_dtype = ["float64", "float32"]
        return tags

    def _more_tags(self):
        # scikit-learn < 1.6 reads tags from here (setup.cfg allows 1.4); newer versions use
        # __sklearn_tags__ above and ignore this.
        return {"requires_positive_X": True, "preserves_dtype": [np.float64, np.float32]}

    def fit(self, activations, y=None):
        """Factorize ``activations`` and store the concept bank in ``components_``.

        Parameters
        ----------
        activations : array-like of shape (n_samples, n_features)
            Non-negative, finite matrix A.
        y : None
            Ignored.

        Returns
        -------
        self : NMF

        Raises
        ------
        ValueError
            If A is not 2-D, not finite, negative somewhere or empty, or if an NNDSVD init is
            asked for more than min(n_samples, n_features) components.
        """
        _, converged = self._fit(activations)
        if not converged:
            warnings.warn(self._not_converged_message(), ConvergenceWarning, stacklevel=2)
        return self

    def fit_transform(self, activations, y=None):
        """Factorize ``activations`` and return the coefficients U.

        Parameters
        ----------
        activations : array-like of shape (n_samples, n_features)
            Non-negative, finite matrix A.
        y : None
            Ignored.

        Returns
        -------
        u : ndarray of shape (n_samples, n_components)

        Raises
        ------
        ValueError
            As :meth:`fit`.
        """
        u, converged = self._fit(activations)
        if not converged:
            warnings.warn(self._not_converged_message(), ConvergenceWarning, stacklevel=2)
        return u

    def _not_converged_message(self):
        return (
            f"NMF did not converge in max_iter={self.max_iter} iterations: the last relative "
            f"decrease of the error was above tol={self.tol}. Increase `max_iter`."
        )

    def _fit(self, activations):
        """Validate, factorize, set the fitted attributes; return (U, converged)."""
        n_components = check_positive_int(self.n_components, "n_components")
        solver = check_choice(self.solver, "solver", SOLVERS)
        init = check_choice(self.init, "init", INITS)
        max_iter, tol = _check_loop_args(solver, self.max_iter, self.tol)
        rng = check_random_state(self.random_state)
        a = _check_activations(activations)
        _check_rank(n_components, init, a.shape)
        seed = rng.integers(2**31 - 1, size=2)
        u, w, history, n_iter, converged = _factorize(
            a, n_components, solver, init, max_iter, tol, seed, bool(self.verbose)
        )
        self.reconstruction_err_ = float(_residual_norm(a, u, w))
        u, w = u.numpy(), w.numpy()
        self.components_ = w
        self.n_iter_ = int(n_iter)
        self.history_ = history.numpy()
        self.n_features_in_ = a.shape[1]
        return u, bool(converged)

    def transform(self, activations):
        """Return the coefficients U >= 0 of new rows with the concept bank W fixed.

        Each row solves the non-negative least squares problem min_{u >= 0} ½‖a − u W‖²,
        with the estimator's solver run until ‖U_k − U_{k-1}‖_F <= tol ‖U_k‖_F.

        Parameters
        ----------
        activations : array-like of shape (n_samples, n_features)
            Non-negative, finite matrix with ``n_features_in_`` columns.

        Returns
        -------
        u : ndarray of shape (n_samples, n_components)
        """
        check_is_fitted(self, "components_")
        max_iter, tol = _check_loop_args(self.solver, self.max_iter, self.tol)
        a = _check_activations(activations, n_features=self.n_features_in_)
        u, _, converged = _coefficients(a, self.components_, self.solver, max_iter, tol)
        if not bool(converged):
            warnings.warn(
                f"NMF.transform did not converge in max_iter={max_iter} iterations. "
                f"Increase `max_iter`.",
                ConvergenceWarning,
                stacklevel=2,
            )
        return u.numpy()

    def inverse_transform(self, coefficients):
        """Return the reconstruction U W of ``coefficients`` U.

        Parameters
        ----------
        coefficients : array-like of shape (n_samples, n_components)

        Returns
        -------
        activations : ndarray of shape (n_samples, n_features)
        """
        check_is_fitted(self, "components_")
        u = np.asarray(coefficients)
        if u.ndim != 2 or u.shape[1] != self.components_.shape[0]:
            raise ValueError(
                f"`coefficients` must have shape (n_samples, {self.components_.shape[0]}), "
                f"got shape {u.shape}."
            )
        return u @ self.components_


def _all_finite(array, block_rows=RESIDUAL_BLOCK_ROWS):
    """np.isfinite(array).all() by row blocks: no (n, p) boolean temporary."""
    if not np.issubdtype(array.dtype, np.floating):
        return True
    return all(
        np.isfinite(array[start:start + block_rows]).all()
        for start in range(0, len(array), block_rows)
    )


def _check_activations(activations, name="activations", *, n_features=None):
    """Return ``activations`` as a finite, non-negative float32/float64 (n, p) array."""
    if sparse.issparse(activations):
        raise TypeError(
            f"`{name}` must be a dense array, got a sparse matrix. Sparse input is not "
            f"supported: pass `{name}.toarray()`."
        )
    if hasattr(activations, "numpy") and callable(activations.numpy):
        activations = activations.numpy()
    array = np.asarray(activations)
    if array.dtype == object:
        try:
            array = array.astype(np.float32)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`{name}` must hold real numbers, got dtype object with a non-numeric entry "
                f"({err})."
            ) from err
    if np.issubdtype(array.dtype, np.complexfloating):
        # scikit-learn's estimator checks want this exact phrase.
        raise ValueError(f"Complex data not supported: `{name}` must be real, got {array.dtype}.")
    if not (
        np.issubdtype(array.dtype, np.floating)
        or np.issubdtype(array.dtype, np.integer)
        or np.issubdtype(array.dtype, np.bool_)
    ):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
    if array.ndim != 2:
        # "Reshape your data" is scikit-learn's wording, which its estimator checks match.
        hint = ""
        if array.ndim == 1:
            hint = f" Reshape your data: for a single sample pass `{name}[None]`."
        raise ValueError(
            f"`{name}` must be 2-D (n_samples, n_features), got shape {array.shape}.{hint}"
        )
    n, p = array.shape
    if n == 0:
        raise ValueError(f"`{name}` must have at least 1 sample, got shape {array.shape}.")
    if p == 0:
        # The second sentence is scikit-learn's wording, which its estimator checks match.
        raise ValueError(
            f"`{name}` must have at least 1 feature, got shape {array.shape}: "
            f"found array with 0 feature(s) (shape={array.shape}) while a minimum of 1 is "
            f"required."
        )
    if n_features is not None and p != n_features:
        raise ValueError(
            f"`{name}` must have {n_features} features as in fit, got shape {array.shape} "
            f"(X has {p} features, but NMF is expecting {n_features} features as input)."
        )
    array = array.astype(np.float64 if array.dtype == np.float64 else np.float32, copy=False)
    if not _all_finite(array):
        n_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(f"`{name}` must be finite, got {n_bad} NaN or infinite values.")
    minimum = array.min()
    if minimum < 0:
        # "Negative values in data" is scikit-learn's wording, which its estimator checks match.
        raise ValueError(
            f"Negative values in data: `{name}` must be non-negative, got a minimum of "
            f"{minimum:.4g}. Factorize post-ReLU activations, or shift them."
        )
    return array
