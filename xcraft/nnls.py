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

# Cholesky ridge, in units of r * eps times the diagonal of G_SS: small enough to leave the
# solution exact after refinement, large enough for rounding not to break the factorisation.
# Numerically singular rows get sqrt(eps) instead (see _masked_solve).
_SMALL_RIDGE = 10.0
_N_REFINEMENTS = 2
# A variable outside the active set is infeasible when its gradient (u G - b)_j is below minus this
# many machine epsilons times r times the row scale; above it the signal is rounding noise.
_KKT_EPS = 10.0
# Passes without a decrease of a row's number of infeasible variables before block pivoting falls
# back to exchanging one variable at a time (Kim and Park's p-bar).
_BACKUP_BUDGET = 3


def solve_nnls(activations, concept_bank, *, max_iter=500, tol=1e-6, max_active_set_iter=None):
    """Solve a batch of non-negative least-squares problems against a fixed concept bank.

    Parameters
    ----------
    activations : array-like or tf.Tensor of shape (n, p) or (n, height, width, p)
        Rows to project. Leading dimensions are flattened into independent problems. float64 input
        is solved in float64; any other dtype is solved in float32.
    concept_bank : array-like or tf.Tensor of shape (r, p)
        The concept bank W, non-negative and finite. It is treated as a constant: no gradient flows
        to it.
    max_iter : int, default=500
        Maximum number of accelerated projected-gradient (FISTA) iterations. They only have to
        find the active set; the exact finish does the rest.
    tol : float, default=1e-6
        FISTA stops once every row moved by at most ``tol`` times its largest coefficient in one
        iteration.
    max_active_set_iter : int, default=None
        Maximum number of batched Lawson-Hanson passes after FISTA (one r x r solve per row each).
        ``None`` means ``3 * r + 10``, more than a warm-started solve ever needs.

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

    1. FISTA with gradient-based adaptive restart (O'Donoghue and Candes, 2015) on
       1/2 u G u^T - b u^T with G = W W^T and b = a W^T, in a ``tf.while_loop`` that stops when
       all rows meet ``tol``.
    2. A batched Lawson-Hanson active-set method warm-started from the FISTA iterate: every pass
       solves the unconstrained problem on each row's active set, steps back to feasibility and
       drops variables that hit zero, or, if the row is feasible, adds its most violated variable.
       It ends when every row satisfies the KKT conditions (u >= 0, u G - b >= 0 off the active
       set, = 0 on it) to floating-point precision.
    3. The gradient is a ``tf.custom_gradient``: the implicit-function VJP on each row's active set
       (see the module docstring). It is exact wherever the active set is locally constant (strict
       complementarity), costs one r x r Cholesky solve per row, and keeps nothing but ``u``.

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
    if isinstance(tol, bool) or not isinstance(tol, numbers.Real) or not np.isfinite(tol):
        raise TypeError(f"`tol` must be a finite float, got {type(tol).__name__} {tol!r}.")
    if tol < 0:
        raise ValueError(f"`tol` must be >= 0, got {tol}.")
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
        tf.constant(max_active_set_iter, tf.int32),
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
        array = check_matrix(concept_bank, "concept_bank", nonnegative=True)
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


@tf.function(reduce_retracing=True, autograph=False)
def _differentiable_nnls(rows, concept_bank, max_iter, tol, max_active_set_iter):
    """NNLS of ``rows`` (N, p) with the implicit-function VJP as its gradient.

    A ``tf.function`` so that eager calls run the solver loops as graphs; inside another
    ``tf.function`` it is inlined.
    """
    # W is a constant: without this, TF would differentiate the solver loops with respect to it.
    concept_bank = tf.stop_gradient(concept_bank)
    gram = tf.matmul(concept_bank, concept_bank, transpose_b=True)  # (r, r)

    @tf.custom_gradient
    def _nnls(a):  # (N, p)
        # The solver's ops are never differentiated: the tape only sees this custom op.
        a = tf.stop_gradient(a)
        b = tf.matmul(a, concept_bank, transpose_b=True)  # (N, r)
        # stop_gradient keeps TF from ever building gradients of the loops (nested tapes try).
        u = tf.stop_gradient(_solve(gram, b, max_iter, tol, max_active_set_iter))  # (N, r)

        def grad(upstream):  # (N, r)
            return _implicit_vjp(u, upstream, gram, concept_bank)  # (N, p)

        return u, grad

    return _nnls(rows)


def nnls_vjp(u, cotangents, concept_bank):
    """Return the implicit-function vector-Jacobian product of NNLS at the solution ``u``.

    This is the gradient :func:`solve_nnls` uses; it is public so that callers needing several
    cotangents per row (e.g. one per concept for Grad-CAM) solve them in one factorisation.

    Parameters
    ----------
    u : tf.Tensor of shape (N, r)
        NNLS solutions; their positive entries define each row's active set S.
    cotangents : tf.Tensor of shape (N, r) or (N, k, r)
        Upstream gradients with respect to ``u`` (k of them per row in the 3-D case).
    concept_bank : tf.Tensor of shape (r, p)
        The concept bank W, in the dtype of ``u``.

    Returns
    -------
    tf.Tensor of shape (N, p) or (N, k, p)
        ``(cotangent_S G_SS^{-1}) W_S`` per row (and per cotangent), with G = W W^T.
    """
    gram = tf.matmul(concept_bank, concept_bank, transpose_b=True)  # (r, r)
    return _implicit_vjp(u, cotangents, gram, concept_bank)


def _implicit_vjp(u, upstream, gram, concept_bank):
    """:func:`nnls_vjp` with the Gram matrix already computed."""
    mask = tf.cast(u > 0, u.dtype)  # (N, r)
    z = _masked_solve(gram, upstream, mask)  # (N, r) or (N, k, r), zero off S
    if upstream.shape.rank == 2:
        return tf.matmul(z, concept_bank)  # (N, p)
    return tf.einsum("nkr,rp->nkp", z, concept_bank)  # (N, k, p)


def _masked_solve(gram, rhs, mask):
    """Solve G_SS z_S = rhs_S per row, z = 0 off S; safe when G_SS is singular.

    ``rhs`` is (N, r) or (N, k, r) (k right-hand sides per row); ``mask`` is (N, r) in {0, 1}.
    Each row's system (M G M + diag(1 - M)) is factorised by Cholesky with a ridge of
    ``_SMALL_RIDGE * r * eps`` times its diagonal. Rows whose factor shows a pivot below
    sqrt(eps) times its diagonal (numerically singular G_SS, e.g. duplicated concepts) are
    factorised again with a ridge of sqrt(eps) times the diagonal. Iterative refinement against the
    un-ridged system then removes the ridge's bias wherever G_SS is invertible.
    """
    dtype = gram.dtype
    eps = np.finfo(dtype.as_numpy_dtype).eps
    n_concepts = tf.cast(tf.shape(gram)[0], dtype)
    diagonal = tf.linalg.diag_part(gram)  # (r,)
    # A floor keeps a ridge on concepts whose row of W is zero.
    floor = tf.maximum(np.sqrt(eps) * tf.reduce_max(diagonal), np.finfo(dtype.as_numpy_dtype).tiny)
    ridge_scale = mask * tf.maximum(diagonal, floor)[None]  # (N, r), zero off S
    masked_gram = mask[:, :, None] * gram[None] * mask[:, None, :]  # (N, r, r), M G M
    base = masked_gram + tf.linalg.diag(1.0 - mask)  # identity off S, G_SS on S
    small = _SMALL_RIDGE * eps * n_concepts
    chol = tf.linalg.cholesky(base + tf.linalg.diag(small * ridge_scale))
    pivots = tf.square(tf.linalg.diag_part(chol)) / (ridge_scale + 1.0 - mask)  # (N, r)
    # NaN pivots (failed factorisation) also count as singular.
    singular = tf.logical_not(tf.reduce_min(pivots, axis=1) > np.sqrt(eps))  # (N,)

    def refactor():  # rare: only when some row is numerically singular
        system = base + tf.linalg.diag(np.sqrt(eps) * ridge_scale)
        return tf.where(singular[:, None, None], tf.linalg.cholesky(system), chol)

    chol = tf.cond(tf.reduce_any(singular), refactor, lambda: chol)
    single = rhs.shape.rank == 2
    rhs = rhs[:, :, None] if single else tf.linalg.matrix_transpose(rhs)  # (N, r, k)
    rhs = mask[:, :, None] * rhs
    z = tf.linalg.cholesky_solve(chol, rhs)  # (N, r, k)
    for _ in range(_N_REFINEMENTS):
        residual = rhs - tf.matmul(base, z)
        z = z + tf.linalg.cholesky_solve(chol, residual)
    z = mask[:, :, None] * z
    return z[:, :, 0] if single else tf.linalg.matrix_transpose(z)


def _solve(gram, b, max_iter, tol, max_active_set_iter):
    """Minimise 1/2 u G u^T - b u^T over u >= 0 for every row of ``b`` (N, r)."""
    u = _fista(gram, b, max_iter, tol)
    return _block_pivoting(gram, b, u, max_active_set_iter)


def _fista(gram, b, max_iter, tol):
    """Accelerated projected gradient with adaptive restart, batched over rows of ``b``."""
    dtype = b.dtype
    tiny = tf.constant(np.finfo(dtype.as_numpy_dtype).tiny, dtype)
    lipschitz = tf.reduce_max(tf.linalg.eigvalsh(gram))  # largest eigenvalue of G
    step = 1.0 / tf.maximum(lipschitz, tiny)
    n_rows = tf.shape(b)[0]
    u0 = tf.zeros_like(b)  # (N, r)
    t0 = tf.ones((n_rows, 1), dtype)  # per-row momentum parameter

    def cond(i, u, y, t, done):
        return tf.logical_and(i < max_iter, tf.logical_not(done))

    def body(i, u, y, t, done):
        grad = tf.matmul(y, gram) - b  # (N, r)
        u_new = tf.nn.relu(y - step * grad)
        # Restart a row's momentum when the step goes against it (gradient restart scheme).
        restart = tf.reduce_sum((y - u_new) * (u_new - u), axis=1, keepdims=True) > 0
        t_new = 0.5 * (1.0 + tf.sqrt(1.0 + 4.0 * t * t))
        momentum = tf.where(restart, tf.zeros_like(t), (t - 1.0) / t_new)
        y_new = u_new + momentum * (u_new - u)
        t_new = tf.where(restart, tf.ones_like(t), t_new)
        change = tf.reduce_max(tf.abs(u_new - u), axis=1)  # (N,)
        scale = tf.reduce_max(u_new, axis=1)
        done = tf.reduce_all(change <= tol * scale)
        return i + 1, u_new, y_new, t_new, done

    _, u, _, _, _ = tf.while_loop(
        cond, body, (tf.constant(0), u0, u0, t0, tf.constant(False)),
        maximum_iterations=max_iter,
    )
    return u


def _block_pivoting(gram, b, u, max_iter):
    """Batched block principal pivoting (Kim and Park, 2011) warm-started from ``u`` (N, r).

    Every row keeps a passive set F (the variables allowed to be positive), initially the support
    of ``u``. A pass solves the problem restricted to F for all rows at once, x_F = b_F G_FF^{-1},
    and computes the gradient y = x G - b. The infeasible variables are those of F with x < 0 and
    those outside F with y < 0 (beyond rounding noise). A row with none satisfies the KKT
    conditions and is finished. Otherwise all its infeasible variables switch sides while that
    reduces their number (or for up to ``_BACKUP_BUDGET`` passes without progress), after which only
    the largest-index one switches: this backup rule guarantees finite termination. Rows still
    unfinished after ``max_iter`` passes keep the better (lower objective) of ``u`` and the
    clipped last iterate, so the result is always feasible and never worse than the warm start.
    """
    dtype = b.dtype
    eps = np.finfo(dtype.as_numpy_dtype).eps
    n_concepts = tf.shape(gram)[0]  # dynamic: the traced shapes may be relaxed
    kkt_tol = _KKT_EPS * eps * tf.cast(n_concepts, dtype)
    b_scale = tf.reduce_max(tf.abs(b), axis=1, keepdims=True)  # (N, 1)
    index = tf.range(n_concepts)[None, :]  # (1, r)

    def cond(i, x, passive, n_best, budget, done):
        return tf.logical_and(i < max_iter, tf.logical_not(tf.reduce_all(done)))

    def body(i, x, passive, n_best, budget, done):
        # Only the unfinished rows are solved again: after the first pass they are few.
        rows = tf.where(tf.logical_not(done))  # (m, 1) indices
        passive_m = tf.gather_nd(passive, rows)  # (m, r)
        b_m = tf.gather_nd(b, rows)
        x_m = _masked_solve(gram, b_m, tf.cast(passive_m, dtype))  # (m, r), zero off F
        xg = tf.matmul(x_m, gram)  # (m, r)
        scale = tf.maximum(tf.gather_nd(b_scale, rows),
                           tf.reduce_max(tf.abs(xg), axis=1, keepdims=True))
        y = xg - b_m  # gradient of the objective, zero on F up to rounding
        infeasible = tf.logical_or(
            tf.logical_and(passive_m, x_m < 0),
            tf.logical_and(tf.logical_not(passive_m), y < -kkt_tol * scale),
        )  # (m, r)
        n_infeasible = tf.reduce_sum(tf.cast(infeasible, tf.int32), axis=1)  # (m,)
        n_best_m = tf.gather_nd(n_best, rows)
        budget_m = tf.gather_nd(budget, rows)
        progress = n_infeasible < n_best_m
        full = tf.logical_or(progress, budget_m > 0)
        # Backup rule: switch only the infeasible variable with the largest index.
        last = tf.reduce_max(tf.where(infeasible, index, -1), axis=1, keepdims=True)
        switch = tf.where(full[:, None], infeasible, tf.equal(index, last))
        budget_m = tf.where(progress, _BACKUP_BUDGET, tf.where(full, budget_m - 1, budget_m))
        return (
            i + 1,
            tf.tensor_scatter_nd_update(x, rows, x_m),
            tf.tensor_scatter_nd_update(passive, rows, tf.math.logical_xor(passive_m, switch)),
            tf.tensor_scatter_nd_update(n_best, rows, tf.minimum(n_best_m, n_infeasible)),
            tf.tensor_scatter_nd_update(budget, rows, budget_m),
            tf.tensor_scatter_nd_update(done, rows, tf.equal(n_infeasible, 0)),
        )

    n_rows = tf.shape(b)[0]
    state = (
        tf.constant(0), u, u > 0,
        tf.fill((n_rows,), n_concepts + 1), tf.fill((n_rows,), _BACKUP_BUDGET),
        tf.zeros((n_rows,), tf.bool),
    )
    _, x, _, _, _, done = tf.while_loop(cond, body, state, maximum_iterations=max_iter)
    # Unfinished rows: the last iterate may be infeasible; keep whichever feasible point is better.
    x = tf.nn.relu(x)
    better = _objective(gram, b, x) <= _objective(gram, b, u)
    return tf.where(tf.logical_or(done, better)[:, None], x, u)


def _objective(gram, b, u):
    """Return 1/2 u G u^T - b u^T per row (the NNLS objective up to a constant)."""
    return tf.reduce_sum(u * (0.5 * tf.matmul(u, gram) - b), axis=1)
