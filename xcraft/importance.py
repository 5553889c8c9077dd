"""Concept importance: total Sobol' indices of concepts, and the TCAV and occlusion baselines.

The Sobol' estimator perturbs the concept coefficients ``u`` of each image with masks ``M`` in
[0, 1], reconstructs the activations ``(u ⊙ M) W`` at the split layer, runs the head and reads the
class score. Every (image, mask) pair is one row of a flat index; rows are evaluated in
fixed-shape chunks by one ``tf.function`` (the last chunk is padded by repeating the final row),
so a call traces the head once and never loops over images in Python. The chunk size comes from
a byte budget (see :func:`concept_importance`).

The same engine evaluates any set of masks shared across images; :mod:`xcraft.fidelity` uses it
for deletion and insertion curves.
"""

import functools
import inspect
import warnings
import weakref

import numpy as np
import tensorflow as tf
from tqdm.auto import tqdm

from xcraft._validation import (
    check_choice,
    check_matrix,
    check_nonnegative_int,
    check_positive_int,
    check_random_state,
)
from xcraft.sobol import (
    ESTIMATORS,
    SAMPLERS,
    VARIANCES,
    SobolIndices,
    _bootstrap_intervals,
    _check_confidence,
    _check_nb_design,
    _indices_kernel,
    sobol_design,
)

__all__ = ["METHODS", "concept_importance"]

METHODS = ("sobol", "tcav", "occlusion")

# When the head is not a built Keras model its intermediate activations cannot be listed; assume
# they hold this many times the elements of its input (a ResNet stage keeps ~10x alive at once).
_FALLBACK_HEAD_FACTOR = 16
# A backward pass keeps the forward activations and adds their gradients (and the input's).
_BACKWARD_FACTOR = 3
# Norms of concept directions are floored at this value so an all-zero concept gets derivative 0.
_MIN_DIRECTION_NORM = 1e-12


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_coefficients(u, concept_bank):
    """Return ``u`` (n, r) or (n, h, w, r) and ``concept_bank`` (r, p) as float tensors."""
    if hasattr(u, "numpy") and callable(u.numpy):
        u = u.numpy()
    u_array = np.asarray(u)
    if u_array.dtype != object and u_array.ndim not in (2, 4):
        raise ValueError(
            f"`u` must have shape (n, n_concepts) or (n, height, width, n_concepts), "
            f"got shape {u_array.shape}."
        )
    dtype = np.float64 if u_array.dtype == np.float64 else np.float32
    u_array = check_matrix(u_array, "u", ndim=u_array.ndim, dtype=dtype)
    if u_array.shape[0] == 0 or u_array.shape[-1] == 0:
        raise ValueError(f"`u` must hold at least one row and one concept, got {u_array.shape}.")
    w_array = check_matrix(concept_bank, "concept_bank", ndim=2, dtype=dtype)
    if w_array.shape[0] != u_array.shape[-1]:
        raise ValueError(
            f"`concept_bank` must have shape (n_concepts, n_channels) with n_concepts = "
            f"{u_array.shape[-1]} (the last axis of `u`), got shape {w_array.shape}."
        )
    return tf.constant(u_array), tf.constant(w_array)


def _check_head(head):
    if not callable(head):
        raise TypeError(
            f"`head` must be a callable mapping activations to logits (a Keras model), "
            f"got {type(head).__name__}."
        )
    return head


def _check_budget(max_batch_bytes, batch_size):
    max_batch_bytes = check_positive_int(max_batch_bytes, "max_batch_bytes")
    if batch_size is not None:
        batch_size = check_positive_int(batch_size, "batch_size")
    return max_batch_bytes, batch_size


# ---------------------------------------------------------------------------------------------
# Compiled per-head functions
# ---------------------------------------------------------------------------------------------


class _HeadFunctions:
    """The compiled functions that run one head; cached per head so repeated calls never retrace.

    One ``tf.function`` per (kind, chunk size, option, per-row shapes, dtype), each with an
    input signature whose only free axis is the number of images or masks: a new class, new
    images or new masks reuse the same graph. The head is held through a weak reference: a strong
    one in the cache value would keep the cache key (the head) alive forever.
    """

    def __init__(self, head):
        try:
            self._head = weakref.WeakMethod(head) if inspect.ismethod(head) else weakref.ref(head)
        except TypeError:  # not weak-referenceable (a builtin, ...): hold it, it is not cached
            self._head = lambda: head
        self._compiled = {}
        self.trace_error = None  # a message raised while tracing, re-raised cleanly by callers

    def tracing_count(self):
        """Number of graphs traced so far, over all compiled functions."""
        return sum(fn.experimental_get_tracing_count() for fn in self._compiled.values())

    def _compile(self, key, python_function, signature):
        fn = self._compiled.get(key)
        if fn is None:
            fn = tf.function(python_function, input_signature=signature)
            self._compiled[key] = fn
        return fn

    def scores(self, u, masks, w, start, class_id, chunk_size, probability):
        """Class scores of rows ``start : start + chunk_size`` of the (image, mask) grid."""
        key = ("scores", chunk_size, probability, tuple(u.shape[1:]), tuple(w.shape), u.dtype)
        signature = [
            tf.TensorSpec([None, *u.shape[1:]], u.dtype),
            tf.TensorSpec([None, u.shape[-1]], u.dtype),
            tf.TensorSpec(w.shape, u.dtype),
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.int64),
        ]
        fn = self._compile(key, functools.partial(self._scores, chunk_size=chunk_size,
                                                  probability=probability), signature)
        return fn(u, masks, w, start, class_id)

    def directional(self, u, w, start, class_id, chunk_size):
        """Per-image derivatives of the class score along each unit concept direction."""
        key = ("directional", chunk_size, tuple(u.shape[1:]), tuple(w.shape), u.dtype)
        signature = [
            tf.TensorSpec([None, *u.shape[1:]], u.dtype),
            tf.TensorSpec(w.shape, u.dtype),
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.int64),
        ]
        fn = self._compile(key, functools.partial(self._directional, chunk_size=chunk_size),
                           signature)
        return fn(u, w, start, class_id)

    def _fail(self, message):
        # Errors raised while AutoGraph traces come back wrapped in "in user code:" context;
        # keep the message so the caller can raise it as is.
        self.trace_error = message
        raise ValueError(message)

    def _logits(self, activations, dtype):
        logits = tf.convert_to_tensor(self._head()(activations))
        if logits.shape.rank != 2:
            self._fail(
                f"`head` must return logits of shape (batch, n_classes), got shape "
                f"{tuple(logits.shape)}."
            )
        return tf.cast(logits, dtype)

    @staticmethod
    def _class_column(logits, class_id):
        n_classes = tf.shape(logits, out_type=tf.int64)[-1]
        check = tf.debugging.assert_less(class_id, n_classes, message="class_id out of range")
        with tf.control_dependencies([check]):
            return tf.gather(logits, class_id, axis=-1)  # (chunk,)

    def _scores(self, u, masks, w, start, class_id, *, chunk_size, probability):
        n_masks = tf.shape(masks, out_type=tf.int64)[0]
        total = tf.shape(u, out_type=tf.int64)[0] * n_masks
        # Rows past the end repeat the last one, so every chunk has the same static shape.
        flat = tf.minimum(start + tf.range(chunk_size, dtype=tf.int64), total - 1)  # (chunk,)
        u_rows = tf.gather(u, flat // n_masks)  # (chunk, [h, w,] r)
        mask_rows = tf.gather(masks, flat % n_masks)  # (chunk, r)
        if u.shape.rank == 4:
            # The mask of concept i multiplies u_i at every location.
            mask_rows = mask_rows[:, None, None, :]  # (chunk, 1, 1, r)
        activations = tf.tensordot(u_rows * mask_rows, w, axes=1)  # (chunk, [h, w,] p)
        logits = self._logits(activations, u.dtype)  # (chunk, n_classes)
        score = self._class_column(logits, class_id)  # (chunk,)
        if not probability:
            return score
        # Ordered after the range check: otherwise this gather may run first and fail with
        # TF's bare "indices out of range" instead of our message.
        with tf.control_dependencies([score]):
            proba = tf.gather(tf.nn.softmax(logits, axis=-1), class_id, axis=-1)  # (chunk,)
        return tf.stack([score, proba], axis=-1)  # (chunk, 2)

    def _directional(self, u, w, start, class_id, *, chunk_size):
        n = tf.shape(u, out_type=tf.int64)[0]
        rows = tf.minimum(start + tf.range(chunk_size, dtype=tf.int64), n - 1)  # (chunk,)
        activations = tf.tensordot(tf.gather(u, rows), w, axes=1)  # (chunk, [h, w,] p)
        with tf.GradientTape() as tape:
            tape.watch(activations)
            score = self._class_column(self._logits(activations, u.dtype), class_id)
        # Rows are independent images, so the gradient of the summed scores is per-row.
        grad = tape.gradient(score, activations)  # (chunk, [h, w,] p)
        if grad is None:
            self._fail("`head` must be differentiable for method='tcav', got no gradient.")
        if u.shape.rank == 4:
            # Shifting a by t * d at every location moves the score by t * sum_loc <grad, d>.
            grad = tf.reduce_sum(grad, axis=[1, 2])  # (chunk, p)
        norms = tf.norm(w, axis=1, keepdims=True)  # (r, 1)
        directions = w / tf.maximum(norms, tf.cast(_MIN_DIRECTION_NORM, w.dtype))  # (r, p)
        return tf.matmul(grad, directions, transpose_b=True)  # (chunk, r)


_HEAD_FUNCTIONS = weakref.WeakKeyDictionary()


def _head_functions(head):
    try:
        functions = _HEAD_FUNCTIONS.get(head)
    except TypeError:  # unhashable or not weak-referenceable
        return _HeadFunctions(head)
    if functions is None:
        functions = _HeadFunctions(head)
        try:
            _HEAD_FUNCTIONS[head] = functions
        except TypeError:
            pass
    return functions


# ---------------------------------------------------------------------------------------------
# Chunk sizing
# ---------------------------------------------------------------------------------------------


def _keras_activation_elements(model):
    """Sum over a built Keras model's layers of their per-sample output sizes, or None."""
    layers = getattr(model, "layers", None)
    if not layers:
        return None
    total = 0
    for layer in layers:
        if getattr(layer, "layers", None):
            inner = _keras_activation_elements(layer)
            if inner is None:
                return None
            total += inner
        try:
            shapes = [tuple(t.shape) for t in tf.nest.flatten(layer.output)]
        except (AttributeError, ValueError, RuntimeError):
            return None
        for shape in shapes:
            if any(d is None for d in shape[1:]):
                return None
            total += int(np.prod(shape[1:], dtype=np.int64))
    return total


def _row_bytes(u, w, head, backward=False):
    """Conservative bytes held per perturbed row: masked coefficients, activations, head peak.

    For a built Keras head the peak is the sum of every layer's output size, as if all were alive
    at once (an upper bound for inference); otherwise ``_FALLBACK_HEAD_FACTOR`` times the head's
    input. A backward pass multiplies everything by ``_BACKWARD_FACTOR``.
    """
    locations = int(np.prod(u.shape[1:-1], dtype=np.int64))  # 1 for pooled coefficients
    coefficients = locations * int(u.shape[-1])
    activations = locations * int(w.shape[1])
    head_elements = _keras_activation_elements(head)
    if head_elements is None:
        head_elements = _FALLBACK_HEAD_FACTOR * activations
    elements = coefficients + activations + head_elements
    if backward:
        elements *= _BACKWARD_FACTOR
    return elements * u.dtype.size


def _chunk_size(n_rows, row_bytes, max_batch_bytes, batch_size):
    size = batch_size if batch_size is not None else max(1, max_batch_bytes // row_bytes)
    return int(min(size, n_rows))


def _run_chunks(functions, call, starts, class_id, desc, verbose):
    """Run ``call(start)`` over chunks, turning in-graph failures into clear errors."""
    results = []
    try:
        for start in tqdm(starts, desc=desc, disable=not verbose, unit="chunk"):
            results.append(call(tf.constant(start, tf.int64)))
    except tf.errors.InvalidArgumentError as err:
        if "class_id out of range" in str(err):
            raise ValueError(
                f"`class_id` must index a column of the head's logits "
                f"(0 <= class_id < n_classes), got {class_id}."
            ) from None
        raise
    except ValueError:
        message, functions.trace_error = functions.trace_error, None
        if message is None:
            raise
        raise ValueError(message) from None
    return tf.concat(results, axis=0)


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def _masked_scores(u, w, head, class_id, masks, *, max_batch_bytes, batch_size,
                   probability=False, verbose=False, desc="perturbations"):
    """Class scores of ``head(((u_k ⊙ M_j) W))`` for every image k and mask j.

    Parameters
    ----------
    u : tf.Tensor of shape (n, r) or (n, h, w, r)
    w : tf.Tensor of shape (r, p)
    masks : array-like of shape (m, r), shared by all images
    probability : bool
        Also return the softmax probability of ``class_id``.

    Returns
    -------
    tf.Tensor of shape (n, m), or (n, m, 2) with ``[..., 0]`` the logit and ``[..., 1]`` the
    probability when ``probability`` is True.
    """
    masks = tf.convert_to_tensor(np.asarray(masks), dtype=u.dtype)  # (m, r)
    n, m = int(u.shape[0]), int(masks.shape[0])
    total = n * m
    chunk = _chunk_size(total, _row_bytes(u, w, head), max_batch_bytes, batch_size)
    functions = _head_functions(head)
    class_tensor = tf.constant(class_id, tf.int64)
    y = _run_chunks(
        functions,
        lambda start: functions.scores(u, masks, w, start, class_tensor, chunk, bool(probability)),
        range(0, total, chunk), class_id, desc, verbose,
    )[:total]  # (n m[, 2])
    return tf.reshape(y, [n, m, 2] if probability else [n, m])


def _directional_derivatives(u, w, head, class_id, *, max_batch_bytes, batch_size, verbose):
    """Per-image derivatives of the class score along each unit concept direction: (n, r)."""
    n = int(u.shape[0])
    chunk = _chunk_size(n, _row_bytes(u, w, head, backward=True), max_batch_bytes, batch_size)
    functions = _head_functions(head)
    class_tensor = tf.constant(class_id, tf.int64)
    return _run_chunks(
        functions,
        lambda start: functions.directional(u, w, start, class_tensor, chunk),
        range(0, n, chunk), class_id, "tcav", verbose,
    )[:n]  # (n, r)


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def concept_importance(u, concept_bank, head, class_id, *, method="sobol", nb_design=32,
                       sampler="sobol", estimator="jansen", reduce="mean",
                       max_batch_bytes=2**28, batch_size=None, random_state=None,
                       n_bootstrap=0, confidence=0.95, variance="pooled", verbose=False):
    """Estimate how much each concept drives the class score of a head.

    Parameters
    ----------
    u : array-like of shape (n, n_concepts) or (n, height, width, n_concepts)
        Concept coefficients of ``n`` images: pooled, or at every location of the split layer.
    concept_bank : array-like of shape (n_concepts, n_channels)
        The concept bank ``W``; activations are reconstructed as ``u W``.
    head : callable
        The model after the split layer (a Keras model): activations of shape (batch, n_channels)
        or (batch, height, width, n_channels) to logits of shape (batch, n_classes).
    class_id : int
        Column of the logits whose score is explained.
    method : {"sobol", "tcav", "occlusion"}, default="sobol"
        - ``"sobol"`` (CRAFT): total Sobol' index of each concept's mask. Each image gets the
          masks ``M`` of :func:`xcraft.sobol.sobol_design` (shared across images), the class
          score of ``head((u ⊙ M) W)`` and its total indices; for spatial ``u`` the mask of
          concept ``i`` multiplies ``u_i`` at every location.
        - ``"tcav"``: derivative of the class score along the unit direction
          ``W_i / ||W_i||``, at the reconstructed activations ``u W`` (the point the other
          estimators perturb, so all three explain the same function). For spatial activations
          the direction is added at every location, so the derivative is the *sum* over locations
          of the per-location directional derivatives (the derivative of a uniform shift, the
          counterpart of the spatial mask). Signed: negative means the concept lowers the score.
        - ``"occlusion"``: score drop ``s(u W) - s(u_{-i} W)`` when ``u_i`` is zeroed.
    nb_design : int, default=32
        Rows of ``A`` and ``B`` for ``"sobol"``: ``nb_design * (n_concepts + 2)`` head
        evaluations per image.
    sampler : {"sobol", "halton", "lhs", "random", "xplique"}, default="sobol"
        See :func:`xcraft.sobol.sobol_design`.
    estimator : {"jansen", "saltelli", "homma"}, default="jansen"
        See :func:`xcraft.sobol.total_indices_from_outputs`.
    reduce : {"mean", None}, default="mean"
        ``"mean"`` averages the per-image values over images; ``None`` returns them per image.
    max_batch_bytes : int, default=2**28
        Memory budget of one head call. The chunk holds ``max_batch_bytes // row_bytes`` rows,
        where ``row_bytes`` counts a row's masked coefficients, its reconstructed activations and
        the head's activations: for a built Keras head, the sum of all its layers' output sizes
        (as if all were alive at once, an upper bound for inference); for another callable 16
        times the head's input. ``"tcav"`` triples this for the backward pass.
    batch_size : int, default=None
        Rows per head call; overrides ``max_batch_bytes`` when given.
    random_state : None, int or numpy.random.Generator, default=None
        Seeds the masks (then the bootstrap). Same seed, same masks, same result.
    n_bootstrap : int, default=0
        For ``"sobol"``: number of bootstrap replicates over design points for intervals.
    confidence : float, default=0.95
        Coverage of the bootstrap intervals.
    variance : {"pooled", "a"}, default="pooled"
        Variance in the Sobol' denominators; see :func:`xcraft.sobol.total_indices_from_outputs`.
    verbose : bool, default=False
        Show a progress bar over chunks.

    Returns
    -------
    importances : ndarray of shape (n_concepts,), or (n, n_concepts) when ``reduce=None``
        In the dtype of ``u`` (float32 unless float64). With ``n_bootstrap > 0``, a
        :class:`xcraft.sobol.SobolIndices` ``(indices, low, high, confidence)`` instead; with
        ``reduce="mean"`` its interval is that of the mean over images (design noise only, not
        the sampling of images).

    Raises
    ------
    TypeError, ValueError
        On invalid arguments, mismatched shapes or a ``class_id`` outside the logits.

    Warns
    -----
    UserWarning
        For ``"sobol"``, when the class score of some images does not vary under the masks
        (e.g. all their coefficients are 0): their indices are set to 0 (and enter the mean).

    Notes
    -----
    ``sampler="xplique", variance="a"`` reproduces Xplique's ``CraftTf.estimate_importance``
    with its Sobol' masks (up to float32 rounding), without its per-image Python loop.

    With masks uniform on [0, 1] and a head linear in the activations,
    ``s(M) = b + sum_i M_i u_i (W_i . g)`` with ``g`` the gradient of the score, so the
    concepts act additively and independently and ``ST_i = (u_i W_i . g)^2 / sum_j (u_j W_j .
    g)^2`` for each image.

    References
    ----------
    Fel, T. et al. (2023). CRAFT: Concept Recursive Activation FacTorization for Explainability.
    CVPR.
    Kim, B. et al. (2018). Interpretability beyond feature attribution: quantitative testing
    with concept activation vectors (TCAV). ICML.

    Examples
    --------
    >>> import keras
    >>> head = keras.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    >>> u, w = np.ones((4, 2)), np.eye(2, 3)
    >>> concept_importance(u, w, head, class_id=0, random_state=0).shape
    (2,)
    """
    check_choice(method, "method", METHODS)
    if reduce is not None and reduce != "mean":
        raise ValueError(f"`reduce` must be 'mean' or None, got {reduce!r}.")
    u, w = _check_coefficients(u, concept_bank)
    head = _check_head(head)
    class_id = check_nonnegative_int(class_id, "class_id")
    max_batch_bytes, batch_size = _check_budget(max_batch_bytes, batch_size)
    n_bootstrap = check_nonnegative_int(n_bootstrap, "n_bootstrap")
    if n_bootstrap and method != "sobol":
        raise ValueError(
            f"`n_bootstrap` must be 0 unless method='sobol', got {n_bootstrap} with "
            f"method={method!r}."
        )
    verbose = bool(verbose)
    budget = {"max_batch_bytes": max_batch_bytes, "batch_size": batch_size}
    r = int(u.shape[-1])

    if method == "tcav":
        values = _directional_derivatives(u, w, head, class_id, verbose=verbose, **budget)
    elif method == "occlusion":
        masks = np.concatenate([np.ones((1, r)), 1.0 - np.eye(r)])  # (r + 1, r): all, all but i
        scores = _masked_scores(u, w, head, class_id, masks, verbose=verbose, desc="occlusion",
                                **budget)  # (n, r + 1)
        values = scores[:, :1] - scores[:, 1:]  # (n, r)
    else:
        nb_design = _check_nb_design(nb_design)
        check_choice(sampler, "sampler", SAMPLERS)
        check_choice(estimator, "estimator", ESTIMATORS)
        check_choice(variance, "variance", VARIANCES)
        confidence = _check_confidence(confidence)
        rng = check_random_state(random_state)
        masks = sobol_design(r, nb_design, sampler, rng, dtype=u.dtype.as_numpy_dtype)
        outputs = _masked_scores(u, w, head, class_id, masks, verbose=verbose, desc="sobol",
                                 **budget)  # (n, nb_design (r + 2))
        values, constant = _indices_kernel(outputs, r, estimator, variance)  # (n, r), (n,)
        n_constant = int(tf.reduce_sum(tf.cast(constant, tf.int32)))
        if n_constant:
            warnings.warn(
                f"The class score of {n_constant} of {constant.shape[0]} images did not vary "
                f"under the masks (zero variance): their indices were set to 0.",
                UserWarning,
                stacklevel=2,
            )
        if n_bootstrap:
            low, high = _bootstrap_intervals(outputs, r, estimator, variance, n_bootstrap,
                                             confidence, rng,
                                             reduce_axis=0 if reduce == "mean" else None)
            indices = _reduce(values, reduce)
            return SobolIndices(indices, low, high, confidence)
    return _reduce(values, reduce)


def _reduce(values, reduce):
    values = tf.reduce_mean(values, axis=0) if reduce == "mean" else values
    return values.numpy()
