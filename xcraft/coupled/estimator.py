"""`CoupledNMF`: examples, pixels and neurons in one latent space (Saini & Papalexakis).

The estimator validates the blocks, chooses their weights, starts from the weighted stack and
runs :func:`xcraft.ops.coupled.fit_coupled`; the maths lives there.
"""

import numbers

import numpy as np
from sklearn.base import BaseEstimator, TransformerMixin

from xcraft import _validation as v
from xcraft.ops.coupled import (
    NORMALIZATIONS,
    SOLVERS,
    block_weights,
    fit_coupled,
    initialize_coupled,
    solve_examples,
)

__all__ = ["CoupledNMF"]


#: Rows per slice of the whole-block scans below: a (2 048, 6 272) float64 slice is ~100 MB,
#: where a float64 copy of a whole 20 000-example block was ~1 GB.
_SCAN_ROWS = 2048


def _row_slices(array):
    for start in range(0, len(array), _SCAN_ROWS):
        yield array[start:start + _SCAN_ROWS]


def _finite_and_min(array):
    """Whether every entry is finite, and the minimum, by row slices (no whole-block copy)."""
    finite, minimum = True, np.inf
    for rows in _row_slices(array):
        finite = finite and bool(np.isfinite(rows).all())
        minimum = min(minimum, float(rows.min()))
    return finite, minimum


def _squared_norm(array):
    """‖X‖² in float64, by row slices, so that a memory-mapped block is never copied whole."""
    return float(sum(np.einsum("ij,ij->", rows, rows, dtype=np.float64)
                     for rows in _row_slices(array)))


def _check_blocks(blocks, name="blocks", *, n_rows=None):
    """Return ``blocks`` as an ordered dict of finite, non-negative 2-D float arrays."""
    if not isinstance(blocks, dict):
        raise TypeError(
            f"`{name}` must be a dict of block name to (n_examples, p_b) array, got "
            f"{type(blocks).__name__}."
        )
    if not blocks:
        raise ValueError(f"`{name}` must hold at least one block, got an empty dict.")
    checked = {}
    for key, block in blocks.items():
        if not isinstance(key, str):
            raise TypeError(f"`{name}` keys must be strings, got {type(key).__name__} {key!r}.")
        array = np.asarray(block)
        if array.dtype == object or not np.issubdtype(array.dtype, np.number):
            raise TypeError(f"Block {key!r} must hold real numbers, got dtype {array.dtype}.")
        if array.ndim != 2 or 0 in array.shape:
            raise ValueError(
                f"Block {key!r} must be a non-empty 2-D array (n_examples, p_b), got shape "
                f"{array.shape}. Vectorise images or feature maps first (see build_blocks)."
            )
        if array.dtype not in (np.float32, np.float64):
            array = array.astype(np.float32)
        finite, minimum = _finite_and_min(array)
        if not finite:
            raise ValueError(f"Block {key!r} must be finite, got NaN or infinite values.")
        if minimum < 0:
            raise ValueError(
                f"Block {key!r} must be non-negative, got a minimum of {minimum:.4g}. "
                f"Use post-ReLU layers, or shift the pixels into a non-negative range."
            )
        checked[key] = array
    rows = {key: len(array) for key, array in checked.items()}
    expected = n_rows if n_rows is not None else next(iter(rows.values()))
    wrong = {key: n for key, n in rows.items() if n != expected}
    if wrong:
        raise ValueError(
            f"Every block must have the same {expected} examples (rows), got {wrong}."
        )
    return checked


class CoupledNMF(TransformerMixin, BaseEstimator):
    """Factorize blocks X_b ≈ F W_b with one shared example factor F >= 0 and W_b >= 0.

    Parameters
    ----------
    n_components : int, default=10
        d, the dimension of the shared latent space.
    solver : {"hals", "mu"}, default="hals"
        HALS (exact coordinate descent), or the paper's multiplicative rules.
    weights : {"frobenius", "uniform"} or dict of str to float, default="frobenius"
        Block weights α_b: ``"frobenius"`` (1 / ‖X_b‖², so every block counts by its relative
        error), ``"uniform"`` (the paper), or one weight per block.
    normalization : {"joint", "block", "none"}, default="joint"
        Rescaling of the components after every sweep (``"joint"`` keeps the objective).
    max_iter : int, default=200
    tol : float, default=1e-4
    l1_f, l2_f, l1_w, l2_w : float, default=0
        Penalties on F and on the W_b.
    batch_size : int or None, default=None
        Stream the examples in batches of this many (W steps from accumulated FᵀF, FᵀX_b).
    random_state : int, numpy.random.Generator or None, default=None
        Seed of the start.

    Attributes
    ----------
    examples_ : ndarray of shape (n_examples, n_components)
        F: every example in the shared space.
    components_ : dict of str to ndarray of shape (n_components, p_b)
        W_b: the pixels or neurons of each block in that space.
    weights_ : dict of str to float
        α_b.
    history_ : ndarray of shape (n_iter_,)
        The objective after every sweep.
    block_errors_ : dict of str to float
        ‖X_b − F W_b‖_F / ‖X_b‖_F at the end.
    n_iter_ : int

    References
    ----------
    Saini & Papalexakis, "Analyzing Representations inside Convolutional Neural Networks".

    Examples
    --------
    >>> rng = np.random.default_rng(0)
    >>> f = rng.uniform(size=(50, 3))
    >>> blocks = {"pixels": f @ rng.uniform(size=(3, 16)), "conv": f @ rng.uniform(size=(3, 8))}
    >>> model = CoupledNMF(3, random_state=0, max_iter=500).fit(blocks)
    >>> model.examples_.shape, model.components_["conv"].shape
    ((50, 3), (3, 8))
    """

    def __init__(self, n_components=10, *, solver="hals", weights="frobenius",
                 normalization="joint", max_iter=200, tol=1e-4, l1_f=0.0, l2_f=0.0, l1_w=0.0,
                 l2_w=0.0, batch_size=None, random_state=None):
        self.n_components = n_components
        self.solver = solver
        self.weights = weights
        self.normalization = normalization
        self.max_iter = max_iter
        self.tol = tol
        self.l1_f = l1_f
        self.l2_f = l2_f
        self.l1_w = l1_w
        self.l2_w = l2_w
        self.batch_size = batch_size
        self.random_state = random_state

    def _weights(self, blocks):
        sq_norms = [_squared_norm(b) for b in blocks.values()]
        if isinstance(self.weights, dict):
            missing = sorted(set(blocks) - set(self.weights))
            if missing:
                raise ValueError(f"`weights` must give every block a weight, missing {missing}.")
            return block_weights(sq_norms, [self.weights[key] for key in blocks])
        return block_weights(sq_norms, v.check_choice(self.weights, "weights",
                                                      ("frobenius", "uniform")))

    def fit(self, blocks, y=None):
        """Factorize ``blocks`` (dict of name to (n_examples, p_b) array); return ``self``."""
        d = v.check_positive_int(self.n_components, "n_components")
        v.check_choice(self.solver, "solver", SOLVERS)
        v.check_choice(self.normalization, "normalization", NORMALIZATIONS)
        if not (isinstance(self.tol, numbers.Real) and self.tol >= 0):
            raise ValueError(f"`tol` must be a float >= 0, got {self.tol!r}.")
        blocks = _check_blocks(blocks)
        total = sum(b.shape[1] for b in blocks.values())
        n = len(next(iter(blocks.values())))
        if d > min(n, total):
            raise ValueError(
                f"`n_components` must be <= min(n_examples, total columns) = {min(n, total)}, "
                f"got {d}."
            )
        alphas = self._weights(blocks)
        rng = v.check_random_state(self.random_state)
        seed = rng.integers(2**31 - 1, size=2)
        xs = list(blocks.values())
        f0, ws0 = initialize_coupled(xs, alphas, d, seed=seed, batch_size=self.batch_size)
        f, ws, history, errors, n_iter, _ = fit_coupled(
            xs, alphas, f0, ws0, solver=self.solver, normalization=self.normalization,
            max_iter=v.check_positive_int(self.max_iter, "max_iter"), tol=float(self.tol),
            l1_f=self.l1_f, l2_f=self.l2_f, l1_w=self.l1_w, l2_w=self.l2_w,
            batch_size=self.batch_size,
        )
        self.examples_ = np.asarray(f)
        self.components_ = {key: np.asarray(w) for key, w in zip(blocks, ws, strict=True)}
        self.weights_ = {key: float(a) for key, a in zip(blocks, alphas, strict=True)}
        self.history_ = np.asarray(history)
        errors = np.asarray(errors)
        self.block_errors_ = {key: float(e) for key, e in zip(blocks, errors[-1], strict=True)}
        self.n_iter_ = int(n_iter)
        self.n_features_in_ = {key: b.shape[1] for key, b in blocks.items()}
        return self

    def fit_transform(self, blocks, y=None):
        """Fit and return ``examples_``."""
        return self.fit(blocks).examples_

    def transform(self, blocks):
        """Return F of new examples from any subset of the fitted blocks (W_b fixed, exact NNLS)."""
        v.check_is_fitted(self, "examples_")
        blocks = _check_blocks(blocks)
        unknown = sorted(set(blocks) - set(self.components_))
        if unknown:
            raise ValueError(
                f"`blocks` must be among the fitted blocks {sorted(self.components_)}, got "
                f"unknown {unknown}."
            )
        for key, block in blocks.items():
            if block.shape[1] != self.n_features_in_[key]:
                raise ValueError(
                    f"Block {key!r} must have {self.n_features_in_[key]} columns, got "
                    f"{block.shape[1]}."
                )
        return solve_examples(
            list(blocks.values()), [self.weights_[k] for k in blocks],
            [self.components_[k] for k in blocks], l1_f=self.l1_f, l2_f=self.l2_f,
            batch_size=self.batch_size,
        )
