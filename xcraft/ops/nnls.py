"""Batched non-negative least squares in TensorFlow, with an exact implicit-function gradient.

For every row ``a`` of the activations the solver returns

    u*(a) = argmin_{u >= 0} 1/2 ||a - u W||^2,

with ``W`` the concept bank (r, p). The forward pass is an iterative solver (accelerated projected
gradient, then an active-set finish that makes the KKT conditions hold to floating-point precision);
the backward pass never differentiates through those iterations. It differentiates the fixed point
instead: on the active set S = {j : u_j > 0} the solution is u_S = a W_S^T G_SS^{-1} with
G = W W^T, so the vector-Jacobian product of an upstream gradient ``ubar`` is

    abar = (ubar_S G_SS^{-1}) W_S.

Each row has its own active set; rows are batched by solving the masked system
(M G M + diag(1 - M)) z = M ubar, which equals G_SS on S and the identity off S.
"""

import numbers

import numpy as np
import tensorflow as tf

from xcraft._validation import check_matrix, check_positive_int

__all__ = ["solve_nnls", "nnls_vjp"]

# Cholesky ridge, in units of r * eps (float64) times the diagonal of G_SS: far below float32
# precision, large enough for rounding not to break the factorisation. Numerically singular rows
# get sqrt(eps) instead (see _masked_factor).
_SMALL_RIDGE = 10.0
# A variable outside the active set is infeasible when its gradient (u G - b)_j is below minus this
# many machine epsilons times r times the row scale; above it the signal is rounding noise.
_KKT_EPS = 10.0
# Passes without a decrease of a row's number of infeasible variables before block pivoting falls
# back to exchanging one variable at a time (Kim and Park's p-bar).
_BACKUP_BUDGET = 3
# FISTA iterations between two convergence checks.
_FISTA_BLOCK = 10
# FISTA also stops once at most one row in this many changed its support over a block (measured
# on the bench's 4 096 rows: at r = 10 the solve is ~2 ms faster stopping near 50 iterations,
# with ~150 rows left to the finish, than at 100 with 16; at r = 25 supports settle later).
_SETTLED_SHARE = 20
# Byte budget of the float64 temporaries of the exact finish and of the VJP, which run by chunks
# of rows so that their memory does not grow with the batch (the float64 product b = a W^T gets
# an eighth of it). A row costs its float64 right-hand sides (finish) or cotangents (VJP) and
# about _FACTOR_COPIES (r, r) float64 matrices: that many are alive at once in a factorisation.
_FINISH_BYTES = 2**24
_FACTOR_COPIES = 4
# Masked solves form one inverse per distinct active set when (distinct sets) x r is at most this
# many times the number of rows, else factorise per row (see _masked_solve): the crossover
# measured on 4 096 rows (bench data, 2 CPU cores) is at 40-55 % distinct sets for r = 25, ~22 %
# for r = 50, and above 90 % for r = 10.
_GROUPED_SOLVE_RATIO = 12


def solve_nnls(activations, concept_bank, *, max_iter=100, tol=1e-4, max_active_set_iter=None):
    """Solve a batch of non-negative least-squares problems against a fixed concept bank.

    Parameters
    ----------
    activations : array-like or tf.Tensor of shape (n, p) or (n, height, width, p)
        Rows to project. Leading dimensions are flattened into independent problems. float64 input
        is solved in float64; any other dtype is solved in float32.
    concept_bank : array-like or tf.Tensor of shape (r, p)
        The concept bank W, finite, of any sign (NMF gives W >= 0, semi-NMF a signed W: the
        projection and its gradient need neither). It is treated as a constant: no gradient
        flows to it.
    max_iter : int, default=100
        Maximum number of accelerated projected-gradient (FISTA) iterations (rounded up to a
        multiple of 10). They only have to find most rows' active sets; the exact finish does
        the rest, so this trades FISTA iterations for finishing passes, not accuracy.
    tol : float, default=1e-4
        FISTA stops once every row moved by at most ``tol`` times its largest coefficient in one
        iteration (checked every 10 iterations), or earlier once at most one row in 20 changed
        its support over those 10 iterations.
    max_active_set_iter : int, default=None
        Maximum number of block-pivoting passes after FISTA (one solve per unfinished row
        each). ``None`` means ``3 * r + 10``, far more than a warm-started solve needs. Rows left
        unfinished, or with a singular G_SS, get this many plus 2 r Lawson-Hanson iterations.

    Returns
    -------
    u : tf.Tensor of shape (n, r) or (n, height, width, r)
        The non-negative coefficients, in the solve dtype.

    Raises
    ------
    TypeError
        If an argument has the wrong type.
    ValueError
        If ``activations`` is not 2-D or 4-D, if the channel counts differ, or if ``concept_bank``
        is not a finite non-negative matrix.

    Notes
    -----
    The solve runs in three stages, all batched over rows inside TensorFlow ops:

    1. FISTA (Beck and Teboulle, 2009) on 1/2 u G u^T - b u^T with G = W W^T and b = a W^T, in
       the solve dtype, started from the clipped unconstrained least-squares solution, in a
       ``tf.while_loop`` that stops when all rows meet ``tol`` or when at most one row in 20
       changed its support (its set of positive coefficients) over the last 10 iterations:
       the finish needs the supports, not the values.
    2. An exact finish in float64: batched block principal pivoting (Kim and Park, 2011),
       warm-started from the FISTA support. Every pass solves the unconstrained problem on each
       unfinished row's passive set and exchanges the variables violating the KKT conditions
       (the solves: see below); it ends when every row satisfies them (u >= 0, u G - b >= 0 off
       the active set, = 0 on it) to float64 precision. Rows on which it may cycle (singular
       G_FF: dependent concepts, more concepts than channels) are finished by Lawson and
       Hanson's active-set method instead. float32 results are this solution rounded to
       float32. The finish runs over chunks of rows (16 MiB of float64 temporaries each), so
       its memory does not grow with the batch; so does the float64 product b = a W^T it
       starts from.
    3. The gradient is a ``tf.custom_gradient``: the implicit-function VJP on each row's active set
       (see the module docstring). It is exact wherever the active set is locally constant (strict
       complementarity) and never differentiates the iterations. The tape keeps only u, O(N r),
       whatever the number of iterations; the backward pass solves with each row's G_SS once (in
       float64, by chunks of rows like the finish).

    Both the finish and the backward pass solve G_SS systems for many rows at once. Locations of
    images share their active sets, so when the rows have few distinct sets (their number times
    r at most 12 times the number of rows), G_SS^{-1} is formed once per distinct set (Cholesky)
    and applied to its rows by matrix products, with one step of iterative refinement;
    otherwise every row gets its own Cholesky factorisation of G_SS, compressed to the largest
    set in the batch.

    If concepts are linearly dependent (e.g. duplicated rows of W), G_SS is singular and the
    minimiser is not unique. Rows whose Cholesky factor of G_SS shows a pivot below sqrt(eps) times
    its diagonal are refactorised with a ridge of sqrt(eps) times the diagonal; the solver then
    returns one minimiser (the minimum is unique), and the gradient uses the corresponding
    regularised inverse, whose undetermined component is annihilated by W_S.
    Values and gradients stay finite for all-zero activations and concepts that are never active.

    Examples
    --------
    >>> import numpy as np
    >>> w = np.array([[1.0, 0.0, 1.0], [0.0, 1.0, 1.0]])
    >>> u = solve_nnls(np.array([[2.0, 0.0, 2.0]]), w)
    >>> np.round(u.numpy(), 6)
    array([[2., 0.]])
    """
    max_iter = check_positive_int(max_iter, "max_iter")
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real):
        raise TypeError(f"`tol` must be a float, got {type(tol).__name__} {tol!r}.")
    if not (np.isfinite(tol) and tol >= 0):
        raise ValueError(f"`tol` must be a finite float >= 0, got {tol}.")
    activations = _check_activations(activations)
    dtype = activations.dtype
    concept_bank = _check_concept_bank(concept_bank, activations.shape[-1], dtype)
    n_concepts = concept_bank.shape[0]
    if max_active_set_iter is None:
        max_active_set_iter = 3 * n_concepts + 10
    max_active_set_iter = check_positive_int(max_active_set_iter, "max_active_set_iter")

    n_channels = activations.shape[-1]
    leading = tf.shape(activations)[:-1]
    rows = tf.reshape(activations, (-1, n_channels))  # (N, p), N = product of leading dims
    # Options travel as tensors so that new values do not retrace the solver.
    u = _differentiable_nnls(
        rows, concept_bank, tf.constant(max_iter, tf.int32), tf.constant(tol, dtype),
        tf.constant(max_active_set_iter, tf.int32), tf.constant(_FINISH_BYTES, tf.int32),
    )
    return tf.reshape(u, tf.concat([leading, [n_concepts]], axis=0))  # (..., r)


def _check_activations(activations):
    """Return ``activations`` as a float32 or float64 tensor of rank 2 or 4."""
    if not tf.is_tensor(activations):
        try:
            array = np.asarray(activations)
        except (TypeError, ValueError) as err:
            raise TypeError(
                f"`activations` must be an array of real numbers, got {type(activations).__name__}."
            ) from err
        if array.dtype == object or not (
            np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
        ):
            raise TypeError(f"`activations` must hold real numbers, got dtype {array.dtype}.")
        activations = tf.convert_to_tensor(array)
    if not (activations.dtype.is_floating or activations.dtype.is_integer):
        raise TypeError(
            f"`activations` must hold real numbers, got dtype {activations.dtype.name}."
        )
    if activations.dtype != tf.float64:
        activations = tf.cast(activations, tf.float32)
    ndim = activations.shape.rank
    if ndim not in (2, 4):
        raise ValueError(
            "`activations` must be 2-D (n, channels) or 4-D (n, height, width, channels), "
            f"got shape {tuple(activations.shape)}."
        )
    if activations.shape[-1] is None:
        raise ValueError("`activations` must have a known number of channels, got None.")
    return activations


def _check_concept_bank(concept_bank, n_channels, dtype):
    """Return the concept bank as a constant tensor of ``dtype`` after checking it."""
    if tf.is_tensor(concept_bank) and not hasattr(concept_bank, "numpy"):
        # Symbolic inside a tf.function: only static checks are possible.
        if concept_bank.shape.rank != 2:
            raise ValueError(f"`concept_bank` must be 2-D, got shape {tuple(concept_bank.shape)}.")
        bank = tf.cast(concept_bank, dtype)
    else:
        array = check_matrix(concept_bank, "concept_bank")
        if array.shape[0] == 0:
            raise ValueError(f"`concept_bank` must hold at least one concept, got shape "
                             f"{array.shape}.")
        bank = tf.constant(array, dtype=dtype)
    if bank.shape[-1] != n_channels:
        raise ValueError(
            f"`concept_bank` must have as many columns as `activations` has channels "
            f"({n_channels}), got shape {tuple(bank.shape)}."
        )
    if bank.shape[0] is None:
        raise ValueError("`concept_bank` must have a known number of concepts, got None.")
    return bank


def _differentiable_nnls(rows, concept_bank, max_iter, tol, max_active_set_iter, finish_bytes):
    """NNLS of ``rows`` (N, p) with the implicit-function VJP as its gradient.

    Called eagerly, the solve runs as two graphs, each traced once per process and (p, r,
    dtype): the main one (FISTA and block pivoting) and, only when some rows are left
    unfinished, the Lawson-Hanson rescue; the VJP is a third graph, traced at the first
    gradient. Inside another ``tf.function`` all of it is inlined, the rescue under a
    ``tf.cond``. (One graph with everything cost 1.7 s of tracing and 0.9 s of first-run set-up
    on the demo's 9 800 rows, for a 45 ms solve.)
    """
    # W is a constant: without this, TF would differentiate the solver loops with respect to it.
    concept_bank = tf.stop_gradient(concept_bank)

    @tf.custom_gradient
    def _nnls(a):  # (N, p)
        # The solver's ops are never differentiated: the tape only sees this custom op.
        a = tf.stop_gradient(a)
        # stop_gradient keeps TF from ever building gradients of the loops (nested tapes try).
        u = tf.stop_gradient(
            _forward(a, concept_bank, max_iter, tol, max_active_set_iter, finish_bytes)
        )

        def grad(upstream):  # (N, r)
            # The tape keeps only u: the factors of G_SS are recomputed here, so that memory
            # between the forward and the backward pass is O(N r), not O(N r^2).
            if tf.executing_eagerly():
                return _call_graph(_vjp_graph, 2, u, upstream, concept_bank, finish_bytes)
            return _implicit_vjp(u, upstream, concept_bank, finish_bytes=finish_bytes)

        return u, grad

    return _nnls(rows)


def _forward(a, concept_bank, max_iter, tol, max_active_set_iter, finish_bytes):
    """The solution u (N, r) of every row of ``a``: main solve, then the rescue where needed."""
    if not tf.executing_eagerly():
        u, unfinished = _main_solve(a, concept_bank, max_iter, tol, max_active_set_iter,
                                    finish_bytes)
        return tf.cond(
            tf.reduce_any(unfinished),
            lambda: _rescue_unfinished(a, u, unfinished, concept_bank, max_active_set_iter,
                                       finish_bytes),
            lambda: u,
        )
    u, unfinished = _call_graph(_main_graph, 1, a, concept_bank, max_iter, tol,
                                max_active_set_iter, finish_bytes)
    if not bool(tf.reduce_any(unfinished)):
        return u
    # Rare (singular G_FF, dependent concepts): the rescue's graph is traced only now.
    return _call_graph(_rescue_graph, 3, a, u, unfinished, concept_bank, max_active_set_iter,
                       finish_bytes)


def _call_graph(function, n_row_args, *args):
    """Call the ``tf.function`` ``function`` through one trace for any number of rows.

    Its first ``n_row_args`` arguments hold rows on their leading axis: they are traced with a
    ``None`` leading dimension, so that a second batch size does not trace the graph again.
    """
    specs = [tf.TensorSpec(tf.TensorShape([None]).concatenate(arg.shape[1:]) if i < n_row_args
                           else arg.shape, arg.dtype) for i, arg in enumerate(args)]
    return function.get_concrete_function(*specs)(*args)


def nnls_vjp(u, cotangents, concept_bank, *, project=True):
    """Return the implicit-function vector-Jacobian product of NNLS at the solution ``u``.

    This is the gradient :func:`solve_nnls` uses; it is public so that callers needing several
    cotangents per row (e.g. one per concept for Grad-CAM) solve them in one factorisation.
    The solves run in float64, by chunks of rows.

    Parameters
    ----------
    u : tf.Tensor of shape (N, r)
        NNLS solutions; their positive entries define each row's active set S.
    cotangents : tf.Tensor of shape (N, r) or (N, k, r)
        Upstream gradients with respect to ``u`` (k of them per row in the 3-D case).
    concept_bank : tf.Tensor of shape (r, p)
        The concept bank W, in the dtype of ``u``.
    project : bool, default=True
        Return the VJP z W; if False, return z = cotangent_S G_SS^{-1} (zero off S) itself,
        which is smaller when p > r and linear, so it can be reduced before the projection.

    Returns
    -------
    tf.Tensor of shape (N, p) or (N, k, p) (``project=False``: (N, r) or (N, k, r))
        ``(cotangent_S G_SS^{-1}) W_S`` per row (and per cotangent), with G = W W^T.
    """
    return _implicit_vjp(u, cotangents, concept_bank, project=project)


def _implicit_vjp(u, upstream, concept_bank, project=True, finish_bytes=None):
    """:func:`nnls_vjp`: masked r x r solves in float64, by chunks of rows.

    The chunks bound the float64 temporaries by ``finish_bytes`` (default ``_FINISH_BYTES``), as
    in the forward finish.
    """
    dtype = u.dtype
    bank64 = tf.cast(concept_bank, tf.float64)
    gram64 = tf.matmul(bank64, bank64, transpose_b=True)  # (r, r)
    single = upstream.shape.rank == 2
    rhs = upstream[:, :, None] if single else tf.linalg.matrix_transpose(upstream)  # (N, r, k)

    def solve(u_rows, rhs_rows):  # (c, r), (c, r, k)
        mask = tf.cast(u_rows > 0, tf.float64)
        z, _ = _masked_solve(gram64, mask, tf.cast(rhs_rows, tf.float64),
                             refine=dtype == tf.float64)
        return tf.cast(z, dtype)  # (c, r, k)

    n_concepts = tf.shape(u)[1]
    row_bytes = 8 * (_FACTOR_COPIES * n_concepts + 2 * tf.shape(rhs)[2]) * n_concepts
    budget = _FINISH_BYTES if finish_bytes is None else finish_bytes
    z = _map_row_chunks(solve, [u, rhs], row_bytes, budget, dtype, rhs.shape[1:])
    z.set_shape(rhs.shape)
    z = z[:, :, 0] if single else tf.linalg.matrix_transpose(z)  # (N, [k,] r)
    if not project:
        return z
    if single:
        return tf.matmul(z, concept_bank)  # (N, p)
    return tf.einsum("nkr,rp->nkp", z, concept_bank)  # (N, k, p)


def _map_row_chunks(fn, tensors, row_bytes, budget, dtype, row_shape):
    """Concatenate ``fn(*chunk)`` over consecutive chunks of rows of ``tensors``.

    A chunk holds as many rows as fit ``budget`` bytes at ``row_bytes`` each (a chunk costs a few
    milliseconds of fixed overhead, so chunks are as large as the budget allows); chunks run one
    after the other, so at most one chunk's temporaries are alive. Every chunk has the same
    number of rows (the last one is padded with zero rows, whose results are dropped): ``pfor``
    (``GradientTape.batch_jacobian``, ``jacobian``) vectorises this loop only when its pieces have
    one shape. ``fn`` returns (chunk rows, *row_shape), or a tuple of such tensors when ``dtype``
    and ``row_shape`` are tuples (one entry per output). (Calling ``fn`` on a one-chunk batch
    without the loop saves ~0.5 ms at r = 10 on the bench, but traces ``fn`` twice: the first
    call took 4.2 s instead of 3.0 s.)
    """
    n_rows = tf.shape(tensors[0])[0]
    largest = tf.maximum(budget // row_bytes, 1)
    n_chunks = tf.maximum((n_rows + largest - 1) // largest, 1)
    # Balanced chunks: the padding of the last one is then less than one row per chunk.
    chunk = tf.maximum((n_rows + n_chunks - 1) // n_chunks, 1)

    def take(tensor, start):
        piece = tensor[start:start + chunk]
        padding = [[0, chunk - tf.shape(piece)[0]]] + [[0, 0]] * (tensor.shape.rank - 1)
        return tf.pad(piece, padding)

    # Several outputs: ``dtype`` and ``row_shape`` are then tuples, one entry per output.
    several = isinstance(dtype, tuple)
    dtypes, row_shapes = (dtype, row_shape) if several else ((dtype,), (row_shape,))

    def body(i, *pieces):
        outputs = fn(*[take(tensor, i * chunk) for tensor in tensors])
        outputs = outputs if several else (outputs,)
        return (i + 1, *[array.write(i, out) for array, out in zip(pieces, outputs, strict=True)])

    pieces = [tf.TensorArray(dtype, size=n_chunks, infer_shape=False,
                             element_shape=tf.TensorShape([None]).concatenate(shape))
              for dtype, shape in zip(dtypes, row_shapes, strict=True)]
    _, *pieces = tf.while_loop(lambda i, *_: i < n_chunks, body, (tf.constant(0), *pieces),
                               parallel_iterations=1)
    results = tuple(array.concat()[:n_rows] for array in pieces)
    return results if several else results[0]


def _masked_solve(gram, mask, rhs, grouped=True, refine=True, singular="ridge"):
    """Solve G_SS z_S = rhs_S for every row's set S = {j : mask_j = 1}; z = 0 off S.

    ``mask`` (N, r) is in {0, 1}, ``rhs`` and the result are (N, r, k). Rows rarely have as many
    distinct active sets as there are rows (locations of one image share their concepts). When
    the distinct sets are few (``_GROUPED_SOLVE_RATIO``), G_SS^{-1} is computed once per distinct
    set, from its Cholesky factor, and applied to each row by a matrix product, which is much
    cheaper in TF than a batch of small triangular solves; one step of iterative refinement
    brings the error of the explicit inverse back to that of a direct solve. Otherwise each row
    gets its own factorisation (:func:`_masked_factor`). With r at most the ratio, the sets are
    always few enough (there are at most N of them), and the per-row branch is not even traced
    unless a singular G_SS needs it.

    ``grouped=False`` always solves per row (the rescue's rows, whose G_SS are often singular,
    where the grouped solve falls back to that anyway). ``refine=False`` skips the refinement
    of the grouped solve, for callers that round the result to float32: the explicit inverse's
    relative error, about cond(G_SS) float64 epsilons, is then invisible (the KKT decisions of
    the finish do need it: they test residuals at the float64 rounding level).

    ``singular="ridge"`` solves rows with a numerically singular G_SS with a ridge, by row (the
    explicit inverse of a ridged G_SS is too inaccurate for the finish's KKT decisions);
    ``"flag"`` only flags them, their z being meaningless: block pivoting hands such rows to the
    rescue anyway, and the grouped solve then needs no per-row fallback.

    Returns z and which rows (N,) have a numerically singular G_SS.
    """
    def by_row():
        factor = _masked_factor(gram, mask)
        return _factor_solve(factor, rhs, mask, gram), factor[2]

    if not grouped:
        return by_row()
    patterns, index = tf.raw_ops.UniqueV2(x=tf.cast(mask, tf.int32), axis=[0])
    sets = tf.cast(patterns, gram.dtype)  # (K, r): the distinct active sets
    n_concepts = mask.shape[1]
    always_few = n_concepts is not None and n_concepts <= _GROUPED_SOLVE_RATIO
    # An r x r inverse costs several single solves, more so as r grows: with mostly distinct
    # sets, solve per row.
    few = tf.shape(patterns)[0] * tf.shape(mask)[1] <= _GROUPED_SOLVE_RATIO * tf.shape(mask)[0]

    def factor_patterns():
        # Few matrices: factorise them whole (r x r), without _masked_factor's compression.
        return _ridged_cholesky(gram, gram[None], tf.linalg.diag_part(gram)[None], sets)

    def by_pattern(chol, singular_rows):
        # The system is G_SS and the identity off S: this is G_SS^{-1} padded with zeros.
        inverse = tf.linalg.cholesky_solve(chol, tf.linalg.diag(sets))  # (K, r, r)
        row_inverse = tf.gather(inverse, index)  # (N, r, r)
        z = tf.matmul(row_inverse, rhs)  # (N, r, k)
        if refine:
            z = z + tf.matmul(row_inverse, mask[:, :, None] * (rhs - _gram_times(gram, z)))
        return z, singular_rows

    if singular == "flag":
        if always_few:
            chol, singular_sets = factor_patterns()
            return by_pattern(chol, tf.gather(singular_sets, index))
        return tf.cond(few, lambda: by_pattern(*_gather_flags(factor_patterns(), index)), by_row)

    def no_factor():  # never used: an empty stand-in
        size = n_concepts if n_concepts is not None else tf.shape(mask)[1]
        return tf.zeros([0, size, size], gram.dtype), tf.constant(True)

    if always_few:
        chol, singular_sets = factor_patterns()
        any_singular = tf.reduce_any(singular_sets)
    else:
        chol, any_singular = tf.cond(
            few, lambda: _any_flag(factor_patterns()), no_factor)
    # One per-row branch serves both fallbacks, so it is traced once. (The predicate depends
    # on the masks alone, not on ``rhs``: pfor, vectorising the VJP over cotangents, needs it.)
    return tf.cond(tf.logical_and(few, tf.logical_not(any_singular)),
                   lambda: by_pattern(chol, tf.zeros_like(index, dtype=tf.bool)), by_row)


def _gather_flags(factor, index):
    """``(chol, flags of the sets)`` to ``(chol, flags of the rows)``."""
    return factor[0], tf.gather(factor[1], index)


def _any_flag(factor):
    """``(chol, flags of the sets)`` to ``(chol, whether any set is singular)``."""
    return factor[0], tf.reduce_any(factor[1])


def _masked_factor(gram, mask):
    """Cholesky factors of every row's G_SS, compressed to the batch's largest active set.

    ``mask`` (N, r) is in {0, 1}. Each row's variables are reordered active first (``order``,
    (N, r)); its factor is that of the leading s x s block of the reordered masked system
    M G M + diag(1 - M), s = the largest |S| in the batch: G_SS, then the identity. Factorising
    s x s instead of r x r blocks costs (s / r)^3 of the flops.

    A ridge of ``_SMALL_RIDGE * r * eps`` times the diagonal keeps rounding from breaking the
    factorisation. Rows whose factor shows a pivot below sqrt(eps) times its diagonal
    (numerically singular G_SS, e.g. duplicated concepts) are factorised again with a ridge of
    sqrt(eps) times the diagonal: they then give one of the (non-unique) minimisers, and finite
    gradients.

    Returns the factor ``(chol, order, singular)``: ``chol`` (N, s, s), ``order`` (N, r) and
    which rows (N,) got the larger ridge.
    """
    n_concepts = tf.shape(gram)[0]
    size = tf.maximum(tf.reduce_max(tf.cast(tf.reduce_sum(mask, axis=1), tf.int32)), 1)
    order = tf.argsort(mask, axis=1, direction="DESCENDING", stable=True)  # active first
    index = order[:, :size]  # (N, s)
    active = tf.gather(mask, index, batch_dims=1)  # (N, s)
    flat = index[:, :, None] * n_concepts + index[:, None, :]  # (N, s, s) into G.ravel()
    block = tf.gather(tf.reshape(gram, [-1]), flat)  # (N, s, s): G[index_i, index_j]
    diagonal = tf.gather(tf.linalg.diag_part(gram), index)  # (N, s)
    chol, singular = _ridged_cholesky(gram, block, diagonal, active)
    return chol, order, singular


def _ridged_cholesky(gram, block, diagonal, active):
    """Cholesky factors of masked systems, with the ridges described in :func:`_masked_factor`.

    ``block`` (N, s, s) holds entries of G (or broadcasts to that shape), ``diagonal`` (N, s) their
    diagonal and ``active`` (N, s) which variables are in S. The factorised matrix is G on S x S
    (plus the ridge) and the identity elsewhere. Returns ``(chol, singular)``.
    """
    dtype = gram.dtype
    eps = np.finfo(dtype.as_numpy_dtype).eps
    # A floor keeps a ridge on concepts whose row of W is zero.
    floor = tf.maximum(np.sqrt(eps) * tf.reduce_max(tf.linalg.diag_part(gram)),
                       np.finfo(dtype.as_numpy_dtype).tiny)
    ridge_scale = active * tf.maximum(diagonal, floor)  # (N, s), zero off S
    # set_diag rather than adding diagonal matrices: fewer (N, s, s) temporaries.
    off_diagonal = block * (active[:, :, None] * active[:, None, :])  # (N, s, s)
    base_diagonal = active * diagonal + (1.0 - active)  # G_jj on S, 1 off S
    small = _SMALL_RIDGE * eps * tf.cast(tf.shape(gram)[0], dtype)
    chol = tf.linalg.cholesky(
        tf.linalg.set_diag(off_diagonal, base_diagonal + small * ridge_scale)
    )
    pivots = tf.square(tf.linalg.diag_part(chol)) / (ridge_scale + 1.0 - active)  # (N, s)
    # NaN pivots (failed factorisation) also count as singular.
    singular = tf.logical_not(tf.reduce_min(pivots, axis=1) > np.sqrt(eps))  # (N,)

    def refactor():  # rare: only when some row is numerically singular
        system = tf.linalg.set_diag(off_diagonal, base_diagonal + np.sqrt(eps) * ridge_scale)
        return tf.where(singular[:, None, None], tf.linalg.cholesky(system), chol)

    return tf.cond(tf.reduce_any(singular), refactor, lambda: chol), singular


def _gram_times(gram, z):
    """G z for every row of ``z`` (N, r, k): with one right-hand side, a plain matrix product."""
    if z.shape[2] == 1:
        # G is symmetric: (G z_n)^T = z_n^T G, one (N, r) x (r, r) product.
        return tf.matmul(z[:, :, 0], gram)[:, :, None]
    return tf.einsum("rq,nqk->nrk", gram, z)


def _factor_solve(factor, rhs, mask, gram):
    """Solve G_SS z_S = rhs_S with a :func:`_masked_factor` factor; z = 0 off S.

    ``rhs`` and the result are (N, r, k); the factor's ``chol`` is (N, s, s) with s >= the largest
    |S|. If some rows were factorised with the larger ridge, one step of iterative refinement
    against the un-ridged G_SS removes most of its bias.
    """
    chol, order, singular = factor
    size = tf.shape(chol)[1]
    index = order[:, :size]  # (N, s)
    active = tf.gather(mask, index, batch_dims=1)[:, :, None]  # (N, s, 1)
    rhs_s = active * tf.gather(rhs, index, axis=1, batch_dims=1)  # (N, s, k)
    z = active * tf.linalg.cholesky_solve(chol, rhs_s)  # (N, s, k)
    # Back to the original variable order; ``index`` holds distinct variables per row.
    row = tf.broadcast_to(tf.range(tf.shape(index)[0])[:, None], tf.shape(index))
    scatter = tf.stack([row, index], axis=-1)  # (N, s, 2)
    z = tf.scatter_nd(scatter, z, tf.shape(rhs))  # (N, r, k)

    def refine():
        residual = mask[:, :, None] * (rhs - _gram_times(gram, z))  # (N, r, k)
        residual = active * tf.gather(residual, index, axis=1, batch_dims=1)  # (N, s, k)
        step = active * tf.linalg.cholesky_solve(chol, residual)
        return z + tf.scatter_nd(scatter, step, tf.shape(rhs))

    return tf.cond(tf.reduce_any(singular), refine, lambda: z)


def _main_solve(a, concept_bank, max_iter, tol, max_active_set_iter, finish_bytes):
    """Minimise 1/2 ||a - u W||^2 over u >= 0 for every row of ``a`` (N, p), but the rescue.

    FISTA runs in the solve dtype (that of ``a``) on all rows at once; the exact finish (block
    pivoting) runs in float64, by chunks of rows whose float64 temporaries fit in
    ``finish_bytes``. Returns u (N, r) in the solve dtype and which rows (N,) block pivoting
    left unfinished: they hold FISTA's (feasible) iterate and go to :func:`_rescue`.
    """
    dtype = a.dtype
    n_concepts = tf.shape(concept_bank)[0]
    gram = tf.matmul(concept_bank, concept_bank, transpose_b=True)  # (r, r)
    # The finish works in float64 from float64 products: in float32 their rounding, amplified
    # by cond(G_SS), would dominate its error.
    bank64 = tf.cast(concept_bank, tf.float64)
    gram64 = tf.matmul(bank64, bank64, transpose_b=True)  # (r, r)

    def project(a_rows):  # (c, p)
        # b = a W^T from float64 products: when G is ill-conditioned (or singular, r > p), the
        # rounding of float32 products would move b off the range of W and the solution far.
        return tf.matmul(tf.cast(a_rows, tf.float64), bank64, transpose_b=True)  # (c, r)

    # Only this product needs float64 copies of the activations. Its chunks get an eighth of the
    # budget: a chunk costs little here, and these copies would otherwise set the peak memory.
    b = _map_row_chunks(project, [a], 8 * (tf.shape(a)[1] + n_concepts), finish_bytes // 8,
                        tf.float64, concept_bank.shape[:1])  # (N, r)
    # (FISTA could start from a float32 product while this one runs beside it: ~0.3 ms less
    # at r = 10 on the bench, but the gradient's peak memory grew from 5.3 to 8.4 MB.)
    u = _fista(gram, gram64, tf.cast(b, dtype), max_iter, tol)

    def finish(b_rows, u_rows):  # (c, r), (c, r)
        # The finish runs in float64: with float32 the active-set decisions of ill-conditioned
        # rows (cond(G) ~ 1e3 is common for NMF concept banks) would be made on rounding noise.
        x, done = _block_pivoting(gram64, b_rows, tf.cast(u_rows, tf.float64),
                                  max_active_set_iter)
        # Finished rows are feasible (x >= 0 on F, exactly 0 off F); the others keep u.
        return tf.where(done[:, None], tf.cast(x, dtype), u_rows), tf.logical_not(done)

    row_bytes = 8 * (_FACTOR_COPIES * n_concepts + 4) * n_concepts
    solution, unfinished = _map_row_chunks(finish, [b, u], row_bytes, finish_bytes,
                                           (dtype, tf.bool), (u.shape[1:], []))
    solution.set_shape(u.shape)
    return solution, unfinished


def _rescue(a, u, concept_bank, max_active_set_iter, finish_bytes):
    """Lawson-Hanson's solution of the rows ``a`` (m, p) block pivoting left unfinished.

    Their G_FF is singular (more concepts than channels, duplicated concepts), where block
    pivoting may cycle, or they ran out of passes; Lawson-Hanson, one variable at a time, keeps
    G_PP non-singular and always terminates. Rows it cannot finish either (iteration caps) keep
    the better (lower objective) of ``u`` (m, r), FISTA's feasible iterate, and the clipped last
    iterate, so the result is always feasible and never worse than the warm start. By chunks of
    rows, as the finish. Returns the solution (m, r) in the dtype of ``a``.
    """
    dtype = a.dtype
    n_concepts = tf.shape(concept_bank)[0]
    bank64 = tf.cast(concept_bank, tf.float64)
    gram64 = tf.matmul(bank64, bank64, transpose_b=True)  # (r, r)
    kkt_tol = _KKT_EPS * np.finfo(np.float64).eps * tf.cast(n_concepts, tf.float64)

    def solve(a_rows, u_rows):  # (c, p), (c, r)
        b = tf.matmul(tf.cast(a_rows, tf.float64), bank64, transpose_b=True)  # (c, r)
        start = tf.cast(u_rows, tf.float64)
        x, finished = _lawson_hanson(gram64, b, max_active_set_iter + 2 * n_concepts, kkt_tol)
        # Still unfinished rows (iteration caps): the last iterate may be infeasible; keep
        # whichever feasible point is better.
        x = tf.nn.relu(x)
        better = _objective(gram64, b, x) <= _objective(gram64, b, start)
        return tf.cast(tf.where(tf.logical_or(finished, better)[:, None], x, start), dtype)

    row_bytes = 8 * (tf.shape(a)[1] + (_FACTOR_COPIES * n_concepts + 4) * n_concepts)
    x = _map_row_chunks(solve, [a, u], row_bytes, finish_bytes, dtype, u.shape[1:])
    x.set_shape(u.shape)
    return x


def _rescue_unfinished(a, u, unfinished, concept_bank, max_active_set_iter, finish_bytes):
    """``u`` (N, r) with its ``unfinished`` rows (N,) solved again by :func:`_rescue`."""
    rows = tf.where(unfinished)  # (m, 1)
    rescued = _rescue(tf.gather_nd(a, rows), tf.gather_nd(u, rows), concept_bank,
                      max_active_set_iter, finish_bytes)
    return tf.tensor_scatter_nd_update(u, rows, rescued)


# The graphs of eager calls (see _differentiable_nnls), traced through _call_graph.
_main_graph = tf.function(_main_solve, autograph=False)
_rescue_graph = tf.function(_rescue_unfinished, autograph=False)
_vjp_graph = tf.function(
    lambda u, upstream, concept_bank, finish_bytes: _implicit_vjp(
        u, upstream, concept_bank, finish_bytes=finish_bytes),
    autograph=False,
)


def _fista(gram, gram64, b, max_iter, tol):
    """Accelerated projected gradient (FISTA), batched over the rows of ``b`` (N, r).

    ``gram`` is G in the solve dtype, ``gram64`` the same matrix computed in float64.

    It starts from the clipped unconstrained least-squares solution, whose support is already
    close to the NNLS one when concepts overlap little, rather than from zero. The momentum
    follows the fixed schedule (k - 1) / (k + 2), and convergence (every row moved by at most
    ``tol`` times its largest coefficient) is checked every ``_FISTA_BLOCK`` iterations: a lean
    body matters, since the iterations are the bulk of the forward pass.
    """
    dtype = b.dtype
    n_concepts = tf.shape(gram)[0]
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    eye = tf.eye(n_concepts, dtype=tf.float64)
    # The ridge only keeps the inverse finite for singular G (duplicated concepts): the start
    # is a heuristic, the finish makes the result exact.
    ridge = np.sqrt(np.finfo(np.float64).eps) * tf.reduce_max(tf.linalg.diag_part(gram64))
    inverse = tf.cast(tf.linalg.inv(gram64 + (ridge + np.finfo(np.float64).tiny) * eye), dtype)
    lipschitz = tf.reduce_max(tf.linalg.eigvalsh(gram))  # largest eigenvalue of G
    step = 1.0 / tf.maximum(lipschitz, tiny)
    # y - step (y G - b) = y (I - step G) + step b: one matmul and one add per iteration.
    descent = tf.eye(n_concepts, dtype=dtype) - step * gram  # (r, r)
    shift = step * b  # (N, r)
    n_blocks = (max_iter + _FISTA_BLOCK - 1) // _FISTA_BLOCK

    n_rows = tf.shape(b)[0]

    def cond(i, k, u, y, support, done):
        return tf.logical_and(i < n_blocks, tf.logical_not(done))

    # The block's iteration numbers past k: its momenta come from one vector of ops, which
    # keeps the unrolled body small (its trace is a good part of the first call's cost).
    offsets = tf.range(1, _FISTA_BLOCK + 1, dtype=dtype)  # (block,)

    def body(i, k, u, y, support, done):
        ks = k + offsets
        momenta = tf.unstack((ks - 1.0) / (ks + 2.0))  # the schedule (k - 1) / (k + 2)
        for momentum in momenta:
            previous = u
            u = tf.nn.relu(tf.matmul(y, descent) + shift)  # (N, r)
            y = u + momentum * (u - previous)
        k = k + _FISTA_BLOCK
        change = tf.reduce_max(tf.abs(u - previous), axis=1)  # (N,)
        converged = tf.reduce_all(change <= tol * tf.reduce_max(u, axis=1))
        # The finish only needs the supports, and its passes are cheap on a few rows: once
        # hardly any row changes support over a block, further iterations cost more than the
        # passes they save.
        new_support = u > 0
        n_changed = tf.reduce_sum(tf.cast(tf.reduce_any(new_support != support, axis=1),
                                          tf.int32))
        settled = n_changed * _SETTLED_SHARE <= n_rows
        return i + 1, k, u, y, new_support, tf.logical_or(converged, settled)

    u0 = tf.nn.relu(tf.matmul(b, inverse))  # (N, r)
    _, _, u, _, _, _ = tf.while_loop(
        cond, body,
        (tf.constant(0), tf.constant(0.0, dtype), u0, u0, u0 > 0, tf.constant(False)),
        maximum_iterations=n_blocks,
    )
    return u


def _pivot(gram, b, passive, n_best, budget, kkt_tol):
    """One block-principal-pivoting pass on rows ``b`` (m, r) with passive sets ``passive``.

    Returns the solution on the passive sets, the new passive sets, the pivoting counters, which
    rows satisfy the KKT conditions, and which rows have a numerically singular G_FF (they are
    left to :func:`_rescue`: with a singular G block pivoting may cycle, and the ridged
    solution is not accurate enough to certify the KKT conditions).
    """
    dtype = b.dtype
    mask = tf.cast(passive, dtype)  # (m, r)
    x, singular = _masked_solve(gram, mask, b[:, :, None], singular="flag")
    x = x[:, :, 0]  # (m, r)
    xg = tf.matmul(x, gram)  # (m, r)
    scale = tf.maximum(tf.reduce_max(tf.abs(b), axis=1, keepdims=True),
                       tf.reduce_max(tf.abs(xg), axis=1, keepdims=True))
    y = xg - b  # gradient of the objective, zero on F up to rounding
    infeasible = tf.logical_or(
        tf.logical_and(passive, x < 0),
        tf.logical_and(tf.logical_not(passive), y < -kkt_tol * scale),
    )  # (m, r)
    n_infeasible = tf.reduce_sum(tf.cast(infeasible, tf.int32), axis=1)  # (m,)
    progress = n_infeasible < n_best
    full = tf.logical_or(progress, budget > 0)
    # Backup rule: switch only the infeasible variable with the largest index.
    index = tf.range(tf.shape(b)[1])[None, :]  # (1, r)
    last = tf.reduce_max(tf.where(infeasible, index, -1), axis=1, keepdims=True)
    switch = tf.where(full[:, None], infeasible, tf.equal(index, last))
    budget = tf.where(progress, _BACKUP_BUDGET, tf.where(full, budget - 1, budget))
    done = tf.logical_and(tf.equal(n_infeasible, 0), tf.logical_not(singular))
    return (x, tf.math.logical_xor(passive, switch), tf.minimum(n_best, n_infeasible), budget,
            done, singular)


def _block_pivoting(gram, b, u, max_iter):
    """Batched block principal pivoting (Kim and Park, 2011) warm-started from ``u`` (N, r).

    Every row keeps a passive set F (the variables allowed to be positive), initially the support
    of ``u``. A pass solves the problem restricted to F for the unfinished rows at once,
    x_F = b_F G_FF^{-1}, and computes the gradient y = x G - b. The infeasible variables are
    those of F with x < 0 and those outside F with y < 0 (beyond rounding noise). A row with none
    satisfies the KKT conditions and is finished. Otherwise all its infeasible variables switch
    sides while that reduces their number (or for up to ``_BACKUP_BUDGET`` passes without
    progress), after which only the largest-index one switches: this backup rule guarantees
    finite termination when G is positive definite. Rows whose G_FF is numerically singular
    (where block pivoting may cycle) stop there; they and the rows still unfinished after
    ``max_iter`` passes are left to :func:`_rescue`.

    Returns the solution (N, r), feasible on the finished rows, and which rows (N,) finished.
    """
    dtype = b.dtype
    eps = np.finfo(dtype.as_numpy_dtype).eps
    n_rows, n_concepts = tf.shape(b)[0], tf.shape(b)[1]
    kkt_tol = _KKT_EPS * eps * tf.cast(n_concepts, dtype)

    def cond(i, x, passive, n_best, budget, done, stuck):
        return tf.logical_and(i < max_iter,
                              tf.logical_not(tf.reduce_all(tf.logical_or(done, stuck))))

    def body(i, x, passive, n_best, budget, done, stuck):
        # Only the unfinished rows are solved (all of them at the first pass, few after): one
        # pass function for all passes keeps the graph, and its trace, small.
        rows = tf.where(tf.logical_not(tf.logical_or(done, stuck)))  # (m, 1) indices
        x_m, passive_m, n_best_m, budget_m, done_m, stuck_m = _pivot(
            gram, tf.gather_nd(b, rows), tf.gather_nd(passive, rows),
            tf.gather_nd(n_best, rows), tf.gather_nd(budget, rows), kkt_tol,
        )
        return (
            i + 1,
            tf.tensor_scatter_nd_update(x, rows, x_m),
            tf.tensor_scatter_nd_update(passive, rows, passive_m),
            tf.tensor_scatter_nd_update(n_best, rows, n_best_m),
            tf.tensor_scatter_nd_update(budget, rows, budget_m),
            tf.tensor_scatter_nd_update(done, rows, done_m),
            tf.tensor_scatter_nd_update(stuck, rows, stuck_m),
        )

    unfinished = tf.zeros((n_rows,), tf.bool)
    _, x, _, _, _, done, _ = tf.while_loop(
        cond, body,
        (tf.constant(0), tf.zeros_like(b), u > 0, tf.fill((n_rows,), n_concepts + 1),
         tf.fill((n_rows,), _BACKUP_BUDGET), unfinished, unfinished),
        maximum_iterations=max_iter,
    )
    return x, done


def _lawson_hanson(gram, b, max_iter, kkt_tol):
    """Batched Lawson-Hanson active-set NNLS of the rows ``b`` (m, r), started from u = 0.

    The fallback of :func:`_block_pivoting` for the rows it could not finish. Every row keeps a
    feasible point x and a passive set P; an iteration solves the problem restricted to P for
    every unfinished row. Where that solution z is positive on P, x = z and the variable with the
    most negative gradient joins P (or, if none is negative beyond rounding noise, the row is
    finished); elsewhere x moves towards z until a variable of P reaches zero, and leaves P. The
    variable entering P is independent of P in exact arithmetic, so G_PP stays non-singular even
    when G is not. Returns the solution (m, r) and which rows finished.
    """
    dtype = b.dtype
    n_concepts = tf.shape(b)[1]
    tiny = np.finfo(dtype.as_numpy_dtype).tiny
    scale = tf.maximum(tf.reduce_max(tf.abs(b), axis=1, keepdims=True), tiny)  # (m, 1)

    def enter(x, passive):
        """At optimal points of P: add the most violating variable, or finish the row."""
        negative_gradient = b - tf.matmul(x, gram)  # (m, r)
        scale_x = tf.maximum(scale, tf.reduce_max(tf.abs(b - negative_gradient), axis=1,
                                                  keepdims=True))  # max(|b|, |x G|)
        candidates = tf.logical_and(tf.logical_not(passive),
                                    negative_gradient > kkt_tol * scale_x)
        best = tf.argmax(tf.where(candidates, negative_gradient, -np.inf), axis=1,
                         output_type=tf.int32)  # (m,)
        entering = tf.equal(tf.range(n_concepts)[None, :], best[:, None])  # (m, r)
        entering.set_shape(b.shape)
        finished = tf.logical_not(tf.reduce_any(candidates, axis=1))  # (m,)
        return (tf.logical_or(passive, tf.logical_and(entering, ~finished[:, None])), finished,
                entering)

    def cond(i, x, passive, done, entered):
        return tf.logical_and(i < max_iter, tf.logical_not(tf.reduce_all(done)))

    def body(i, x, passive, done, entered):
        mask = tf.cast(passive, dtype)
        z, _ = _masked_solve(gram, mask, b[:, :, None], grouped=False)
        z = z[:, :, 0]  # (m, r), zero off P
        blocking = tf.logical_and(passive, z <= 0)  # (m, r)
        feasible = tf.logical_not(tf.reduce_any(blocking, axis=1))  # (m,)
        # A variable that has just entered and is not positive at once has a gradient that is
        # rounding noise: the row is optimal (the safeguard of Lawson and Hanson's algorithm).
        stalled = tf.reduce_any(tf.logical_and(blocking, entered), axis=1)
        # Line search: the largest step from x towards z that keeps P feasible.
        ratios = tf.where(blocking, x / tf.maximum(x - z, tiny), np.inf)
        step = tf.minimum(tf.reduce_min(ratios, axis=1, keepdims=True), 1.0)  # (m, 1)
        moved = x + step * (z - x)
        leaving = tf.logical_and(passive, moved <= 0)
        moved = tf.where(leaving, tf.zeros_like(moved), moved)
        passive_moved = tf.logical_and(passive, tf.logical_not(leaving))
        passive_entered, finished, entering = enter(z, passive)
        active_row = tf.logical_not(done)[:, None]
        take_z = tf.logical_and(feasible, tf.logical_not(done))[:, None]
        x_stalled = tf.where(stalled[:, None], x, moved)
        x_new = tf.where(active_row, tf.where(take_z, z, x_stalled), x)
        passive_new = tf.where(
            active_row, tf.where(take_z, passive_entered, passive_moved), passive)
        done_new = tf.logical_or(
            done, tf.logical_or(tf.logical_and(feasible, finished), stalled))
        entered_new = tf.logical_and(take_z, entering)
        return i + 1, x_new, passive_new, done_new, entered_new

    x = tf.zeros_like(b)
    passive, done, entered = enter(x, tf.zeros_like(b, dtype=tf.bool))
    _, x, _, done, _ = tf.while_loop(
        cond, body, (tf.constant(0), x, passive, done, entered), maximum_iterations=max_iter,
    )
    return x, done


def _objective(gram, b, u):
    """Return 1/2 u G u^T - b u^T per row (the NNLS objective up to a constant)."""
    return tf.reduce_sum(u * (0.5 * tf.matmul(u, gram) - b), axis=1)
