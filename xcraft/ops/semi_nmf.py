"""Semi-NMF as TensorFlow ops: A ≈ U W with U ≥ 0 and W of any sign (Ding, Li & Jordan, 2010).

Layers whose activations are signed (GELU, pre-activation residual sums, LayerNorm, a
transformer's tokens) cannot be factorised by NMF. Semi-NMF keeps what CRAFT needs, non-negative
concept coefficients U, and lets the concept bank W take any sign; everything downstream (the
NNLS projection of new activations, its implicit gradient, the Sobol engine) is unchanged,
since none of it needs W ≥ 0.

Two solvers minimise ½‖A − U W‖²_F:

- ``"als"`` (default): alternate the exact least-squares W = (UᵀU)⁻¹ UᵀA (W is free) with
  HALS passes on U against G = W Wᵀ (coordinate descent, exact per coordinate, valid for
  any sign of G's off-diagonal entries). Every step decreases the objective.
- ``"mu"``: Ding et al.'s multiplicative rule for U,
  U ← U ⊙ sqrt(([AWᵀ]⁺ + U [WWᵀ]⁻) / ([AWᵀ]⁻ + U [WWᵀ]⁺)), with the same W step.

The start is deterministic: U₀ = |left singular vectors · singular values| of A (a randomized
SVD), then W₀ from U₀ by least squares.
"""

import numbers
import warnings

import numpy as np
import tensorflow as tf
from sklearn.base import BaseEstimator, TransformerMixin
from sklearn.exceptions import ConvergenceWarning

from xcraft._validation import check_choice, check_is_fitted, check_positive_int, check_random_state
from xcraft.ops._memory import to_tensor
from xcraft.ops.nmf import _hals_update, _max_inner, _randomized_svd, _squared_norm

__all__ = ["SemiNMF", "semi_factorize"]

SOLVERS = ("als", "mu")
#: Ridge added to UᵀU in the W step, relative to its mean diagonal: keeps a concept whose
#: coefficients all vanished from making the solve singular, without moving a well-posed one.
RIDGE = 1e-10


def _w_step(u, a, dtype):
    """W = argmin_W ‖A − U W‖² (least squares, any sign), with a vanishing ridge."""
    utu = tf.matmul(u, u, transpose_a=True)  # (r, n) @ (n, r) = (r, r)
    uta = tf.matmul(u, a, transpose_a=True)  # (r, n) @ (n, p) = (r, p)
    scale = tf.reduce_mean(tf.linalg.diag_part(utu)) + tf.constant(1e-30, dtype)
    ridge = RIDGE * scale * tf.eye(tf.shape(utu)[0], dtype=dtype)
    w = tf.linalg.solve(tf.cast(utu + ridge, tf.float64), tf.cast(uta, tf.float64))
    return tf.cast(w, dtype), utu, uta


def _mu_step(u_rows, numer, gram):
    """Ding et al.'s multiplicative update of U (in row layout (r, n))."""
    pos_n, neg_n = tf.nn.relu(numer), tf.nn.relu(-numer)  # (r, n)
    pos_g, neg_g = tf.nn.relu(gram), tf.nn.relu(-gram)  # (r, r)
    top = pos_n + tf.matmul(neg_g, u_rows)
    bottom = neg_n + tf.matmul(pos_g, u_rows)
    return u_rows * tf.sqrt(tf.math.divide_no_nan(top, bottom))


@tf.function(reduce_retracing=True, autograph=False)
def _run(a, u, max_iter, tol, solver):
    dtype = a.dtype
    sq_norm_a = _squared_norm(a)
    p = tf.shape(a)[1]
    rank = tf.shape(u)[1]
    inner = _max_inner(rank, p, tf.size(a))
    w, _, _ = _w_step(u, a, dtype)
    history = tf.TensorArray(tf.float64, size=max_iter, element_shape=())

    def error(u, w):
        utu = tf.cast(tf.matmul(u, u, transpose_a=True), tf.float64)
        uta = tf.cast(tf.matmul(u, a, transpose_a=True), tf.float64)
        w64 = tf.cast(w, tf.float64)
        sq = sq_norm_a - 2.0 * tf.reduce_sum(uta * w64) + tf.reduce_sum(
            utu * tf.matmul(w64, w64, transpose_b=True))
        return tf.sqrt(tf.maximum(sq, 0.0) / tf.maximum(sq_norm_a, 1e-300))

    def cond(i, u, w, previous, converged, history):
        return (i < max_iter) & tf.logical_not(converged)

    def body(i, u, w, previous, converged, history):
        gram = tf.matmul(w, w, transpose_b=True)  # (r, p) @ (p, r) = (r, r)
        numer = tf.matmul(w, a, transpose_b=True)  # (r, p) @ (p, n) = (r, n): (A Wᵀ)ᵀ
        u_rows = tf.transpose(u)
        if solver == "mu":
            u_rows = _mu_step(u_rows, numer, gram)
        else:
            u_rows = _hals_update(u_rows, numer, gram, inner)
        u = tf.transpose(u_rows)  # (n, r)
        w, _, _ = _w_step(u, a, dtype)
        err = error(u, w)
        converged = (previous - err) < tol * previous
        return i + 1, u, w, err, converged, history.write(i, err)

    start = error(u, w)
    init = (tf.constant(0), u, w, start, tf.constant(False), history)
    n_iter, u, w, _, converged, history = tf.while_loop(cond, body, init)
    return u, w, history.stack()[:n_iter], n_iter, converged


def _initial_u(a, rank, seed):
    s, left, _ = _randomized_svd(a, rank, seed)
    return tf.abs(left * s[None, :])  # (n, r) >= 0


def semi_factorize(activations, n_components, *, solver="als", max_iter=200, tol=1e-4,
                   seed=(0, 0)):
    """Factorize ``activations`` ≈ ``u @ w`` with ``u >= 0`` and ``w`` of any sign.

    Parameters
    ----------
    activations : tf.Tensor or array-like of shape (n_samples, n_features)
        Any real, finite matrix A. float64 stays float64, anything else is float32.
    n_components : int
        Rank r, at most min(n_samples, n_features).
    solver : {"als", "mu"}, default="als"
    max_iter : int, default=200
    tol : float, default=1e-4
        Stop when the relative error's relative decrease falls below ``tol``.
    seed : array-like of 2 ints, default=(0, 0)
        Seed of the randomized SVD of the start.

    Returns
    -------
    u : tf.Tensor of shape (n_samples, n_components)
    w : tf.Tensor of shape (n_components, n_features)
    history : tf.Tensor of shape (n_iter,)
        ‖A − U W‖_F / ‖A‖_F after each iteration, float64.
    n_iter : tf.Tensor
    converged : tf.Tensor, bool

    Examples
    --------
    >>> a = tf.random.stateless_normal((40, 12), seed=(0, 1))
    >>> u, w, history, n_iter, converged = semi_factorize(a, 3)
    >>> bool(tf.reduce_min(u) >= 0), bool(tf.reduce_min(w) < 0)
    (True, True)
    """
    check_choice(solver, "solver", SOLVERS)
    n_components = check_positive_int(n_components, "n_components")
    max_iter = check_positive_int(max_iter, "max_iter")
    a = to_tensor(activations)
    a = a if a.dtype == tf.float64 else tf.cast(a, tf.float32)
    if n_components > min(a.shape):
        raise ValueError(
            f"`n_components` must be <= min(n_samples, n_features) = {min(a.shape)}, got "
            f"{n_components}."
        )
    u0 = _initial_u(a, n_components, tf.convert_to_tensor(seed, tf.int32))
    return _run(a, u0, tf.constant(max_iter), tf.constant(float(tol), tf.float64), solver)


class SemiNMF(TransformerMixin, BaseEstimator):
    """Semi-NMF estimator: A ≈ U W, U ≥ 0, W of any sign (scikit-learn API, TF ops).

    Parameters
    ----------
    n_components : int, default=10
        Rank r (the number of concepts).
    solver : {"als", "mu"}, default="als"
        See the module docstring.
    max_iter : int, default=200
    tol : float, default=1e-4
    random_state : int, numpy.random.Generator or None, default=None
        Seed of the start's randomized SVD.

    Attributes
    ----------
    components_ : ndarray of shape (n_components, n_features)
        W, of any sign.
    n_iter_ : int
    history_ : ndarray of shape (n_iter_,)
    reconstruction_err_ : float
        ‖A − U W‖_F on the fitted data.
    n_features_in_ : int

    References
    ----------
    Ding, Li & Jordan, "Convex and semi-nonnegative matrix factorizations", IEEE TPAMI 2010.

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> a = rng.uniform(size=(30, 3)) @ rng.normal(size=(3, 8))
    >>> model = SemiNMF(3, random_state=0).fit(a)
    >>> bool(model.reconstruction_err_ < 1e-3 * np.linalg.norm(a))
    True
    """

    def __init__(self, n_components=10, *, solver="als", max_iter=200, tol=1e-4,
                 random_state=None):
        self.n_components = n_components
        self.solver = solver
        self.max_iter = max_iter
        self.tol = tol
        self.random_state = random_state

    def _check_input(self, activations):
        array = activations.numpy() if hasattr(activations, "numpy") else np.asarray(activations)
        if array.ndim != 2 or 0 in array.shape:
            raise ValueError(
                f"`activations` must be a non-empty 2-D array (n_samples, n_features), got "
                f"shape {array.shape}."
            )
        if not np.issubdtype(array.dtype, np.number) or np.iscomplexobj(array):
            raise TypeError(f"`activations` must hold real numbers, got dtype {array.dtype}.")
        if not np.all(np.isfinite(array)):
            raise ValueError("`activations` must be finite, got NaN or infinite values.")
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        return array

    def fit_transform(self, activations, y=None):
        """Fit and return U (n_samples, n_components), non-negative."""
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"`tol` must be a float >= 0, got {self.tol!r}.")
        array = self._check_input(activations)
        rng = check_random_state(self.random_state)
        seed = rng.integers(2**31 - 1, size=2)
        u, w, history, n_iter, converged = semi_factorize(
            array, self.n_components, solver=self.solver, max_iter=self.max_iter, tol=self.tol,
            seed=seed,
        )
        u, w = u.numpy(), w.numpy()
        self.components_ = w
        self.history_ = history.numpy()
        self.n_iter_ = int(n_iter)
        self.n_features_in_ = array.shape[1]
        residual = 0.0
        for start in range(0, len(array), 4096):  # by blocks: no (n, p) product in memory
            block = array[start:start + 4096].astype(np.float64)
            residual += float(np.sum((block - u[start:start + 4096] @ w) ** 2))
        self.reconstruction_err_ = float(np.sqrt(residual))
        if not bool(converged):
            warnings.warn(
                f"SemiNMF did not converge in max_iter={self.max_iter} iterations (tol="
                f"{self.tol}). Increase `max_iter`.", ConvergenceWarning, stacklevel=2,
            )
        return u

    def fit(self, activations, y=None):
        """Fit the factorisation; return ``self``."""
        self.fit_transform(activations)
        return self

    def transform(self, activations):
        """Return U ≥ 0 of new rows: the exact NNLS against the fitted (signed) W."""
        from xcraft.ops.nnls import solve_nnls

        check_is_fitted(self, "components_")
        array = self._check_input(activations)
        if array.shape[1] != self.n_features_in_:
            raise ValueError(
                f"`activations` must have {self.n_features_in_} features, got {array.shape[1]}."
            )
        return solve_nnls(array, self.components_).numpy()
