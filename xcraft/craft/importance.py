"""Concept importance: total Sobol' indices of concepts, and the TCAV and occlusion baselines.

The Sobol' estimator perturbs the concept coefficients ``u`` of each image with masks ``M`` in
[0, 1], reconstructs the activations ``(u ⊙ M) W`` at the split layer, runs the head and reads the
class score. Every (image, mask) pair is one row of a flat index; rows are evaluated in
fixed-shape chunks by one ``tf.function`` (the last chunk is padded by repeating the final row),
so a call traces the head once and never loops over images in Python. The chunk size comes from
a byte budget (see :func:`concept_importance`).

When the head starts with affine layers (e.g. Flatten -> Dense, GlobalAveragePooling -> Dense),
they are folded into the concept basis (see :mod:`xcraft.plumbing.head_fold`): each image's
``r`` basis responses are computed once and every (image, mask) row costs a small product and
the rest of the head, instead of rebuilding ``(u ⊙ M) W``. Folded rows are evaluated in
fixed-shape blocks of images × masks.

The same engine evaluates any set of masks shared across images; :mod:`xcraft.craft.fidelity`
uses it for deletion and insertion curves.
"""

import functools
import inspect
import warnings
import weakref

import numpy as np

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import tensorflow as tf
from tqdm import tqdm

from xcraft._validation import (
    check_choice,
    check_matrix,
    check_nonnegative_int,
    check_positive_int,
    check_random_state,
)
from xcraft.ops.distribute import active_strategy, run_grouped
from xcraft.ops.sobol import (
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
from xcraft.plumbing import head_fold as _head_fold

__all__ = ["METHODS", "concept_importance"]

METHODS = ("sobol", "tcav", "occlusion")

# When the head is not a built Keras model its intermediate activations cannot be listed; assume
# they hold this many times the elements of its input (a ResNet stage keeps ~10x alive at once).
_FALLBACK_HEAD_FACTOR = 16
# A backward pass keeps the forward activations and adds their gradients (and the input's).
_BACKWARD_FACTOR = 3
# Norms of concept directions are floored at this value so an all-zero concept gets derivative 0.
_MIN_DIRECTION_NORM = 1e-12
# Marks a head whose fold has not been attempted yet (None means "does not fold").
_NOT_FOLDED_YET = object()


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_coefficients(u, concept_bank):
    """Return ``u`` (n, r), (n, t, r) or (n, h, w, r) and ``concept_bank`` (r, p) as tensors."""
    if hasattr(u, "numpy") and callable(u.numpy):
        u = u.numpy()
    u_array = np.asarray(u)
    if u_array.dtype != object and u_array.ndim not in (2, 3, 4):
        raise ValueError(
            f"`u` must have shape (n, n_concepts), (n, tokens, n_concepts) or (n, height, "
            f"width, n_concepts), got shape {u_array.shape}."
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
        self._folded = _NOT_FOLDED_YET
        self.trace_error = None  # a message raised while tracing, re-raised cleanly by callers

    def folded(self):
        """The head split as an affine prefix and the rest (computed once), or None."""
        if self._folded is _NOT_FOLDED_YET:
            head = self._head()
            self._folded = None if head is None else _head_fold.fold_head(head)
        return self._folded

    def tracing_count(self):
        """Number of graphs traced so far, over all compiled functions."""
        return sum(fn.experimental_get_tracing_count() for fn in self._compiled.values())

    def _compile(self, key, python_function, signature):
        fn = self._compiled.get(key)
        if fn is None:
            fn = tf.function(python_function, input_signature=signature, autograph=False)
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

    def basis(self, coefficients, w, offset, start, chunk_size):
        """Folded responses ``L(u_i ⊗ W_i) - L(0)`` of rows ``start : start + chunk_size``."""
        key = ("basis", chunk_size, tuple(coefficients.shape[1:]), tuple(w.shape),
               coefficients.dtype, tuple(offset.shape), offset.dtype)
        signature = [
            tf.TensorSpec([None, *coefficients.shape[1:]], coefficients.dtype),
            tf.TensorSpec(w.shape, coefficients.dtype),
            tf.TensorSpec(offset.shape, offset.dtype),
            tf.TensorSpec([], tf.int64),
        ]
        fn = self._compile(key, functools.partial(self._basis, chunk_size=chunk_size), signature)
        return fn(coefficients, w, offset, start)

    def folded_scores(self, basis, offset, masks, image_start, mask_start, class_id, n_images,
                      n_masks, probability):
        """Class scores of a block of images × masks through the folded head."""
        key = ("folded_scores", n_images, n_masks, probability, tuple(basis.shape[1:]),
               basis.dtype, tuple(offset.shape), masks.dtype)
        signature = [
            tf.TensorSpec([None, *basis.shape[1:]], basis.dtype),
            tf.TensorSpec(offset.shape, offset.dtype),
            tf.TensorSpec([None, masks.shape[-1]], masks.dtype),
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.int64),
            tf.TensorSpec([], tf.int64),
        ]
        fn = self._compile(key, functools.partial(self._folded_scores, n_images=n_images,
                                                  n_masks=n_masks, probability=probability),
                           signature)
        return fn(basis, offset, masks, image_start, mask_start, class_id)

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
        return self._checked_logits(self._head()(activations), dtype)

    def _checked_logits(self, logits, dtype):
        logits = tf.convert_to_tensor(logits)
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
        u_rows = tf.gather(u, flat // n_masks)  # (chunk, [h, w | t,] r)
        mask_rows = tf.gather(masks, flat % n_masks)  # (chunk, r)
        # The mask of concept i multiplies u_i at every location (every token).
        locations = [1] * (u.shape.rank - 2)
        mask_rows = tf.reshape(mask_rows, [chunk_size, *locations, u.shape[-1]])  # (chunk, 1.., r)
        activations = tf.tensordot(u_rows * mask_rows, w, axes=1)  # (chunk, [h, w | t,] p)
        logits = self._logits(activations, u.dtype)  # (chunk, n_classes)
        return self._read_scores(logits, class_id, probability)

    def _read_scores(self, logits, class_id, probability):
        score = self._class_column(logits, class_id)  # (chunk,)
        if not probability:
            return score
        # Ordered after the range check: otherwise this gather may run first and fail with
        # TF's bare "indices out of range" instead of our message.
        with tf.control_dependencies([score]):
            proba = tf.gather(tf.nn.softmax(logits, axis=-1), class_id, axis=-1)  # (chunk,)
        return tf.stack([score, proba], axis=-1)  # (chunk, 2)

    def _basis(self, coefficients, w, offset, start, *, chunk_size):
        # Row q is concept q % r of image q // r: coefficients (n r, [h, w]) hold u_i of image k.
        n_rows = tf.shape(coefficients, out_type=tf.int64)[0]
        flat = tf.minimum(start + tf.range(chunk_size, dtype=tf.int64), n_rows - 1)  # (chunk,)
        coefficient = tf.gather(coefficients, flat)  # (chunk, [h, w])
        direction = tf.gather(w, flat % w.shape[0])  # (chunk, p)
        locations = coefficients.shape.rank - 1
        direction = tf.reshape(direction, [chunk_size, *([1] * locations), w.shape[1]])
        activations = coefficient[..., None] * direction  # (chunk, [h, w,] p): u_i ⊗ W_i
        response = self.folded().prefix(activations) - offset  # (chunk, *prefix output)
        return tf.reshape(response, [chunk_size, -1])  # (chunk, d)

    def _folded_scores(self, basis, offset, masks, image_start, mask_start, class_id, *,
                       n_images, n_masks, probability):
        # Past the end, the last image and the last mask repeat: every block has one shape.
        images = tf.minimum(image_start + tf.range(n_images, dtype=tf.int64),
                            tf.shape(basis, out_type=tf.int64)[0] - 1)  # (bi,)
        rows = tf.minimum(mask_start + tf.range(n_masks, dtype=tf.int64),
                          tf.shape(masks, out_type=tf.int64)[0] - 1)  # (bm,)
        block = tf.gather(basis, images)  # (bi, r, d)
        mask_rows = tf.cast(tf.gather(masks, rows), basis.dtype)  # (bm, r)
        # sum_i m_i B_i for every (image, mask) pair: one broadcast batched matmul.
        folded = tf.matmul(mask_rows[None], block)  # (bi, bm, d)
        folded = tf.reshape(folded, [n_images * n_masks, *offset.shape]) + offset  # L((u ⊙ m) W)
        logits = self._checked_logits(self.folded().rest(folded), masks.dtype)  # (bi bm, classes)
        scores = self._read_scores(logits, class_id, probability)  # (bi bm[, 2])
        return tf.reshape(scores, [n_images, n_masks, *scores.shape[1:]])  # (bi, bm[, 2])

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
        if u.shape.rank > 2:
            # Shifting a by t * d at every location (token) moves the score by
            # t * sum_loc <grad, d>.
            grad = tf.reduce_sum(grad, axis=list(range(1, u.shape.rank - 1)))  # (chunk, p)
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


def _fold_row_bytes(u, w, folded, n_outputs):
    """Bytes per row of the two folded steps: (basis row, scored row, basis per image).

    A basis row is one (image, concept) pair: its activation ``u_i ⊗ W_i``, the prefix's layers
    and the response. A scored row is one (image, mask) pair: the mask, the folded activation
    and the rest's layers; each image of a block also holds its ``r`` responses. Unknown layer
    sizes count ``_FALLBACK_HEAD_FACTOR`` times the layer input, as in :func:`_row_bytes`.
    """
    locations = int(np.prod(u.shape[1:-1], dtype=np.int64))
    r, activations = int(u.shape[-1]), locations * int(w.shape[1])
    prefix = folded.prefix_elements
    if prefix is None:
        prefix = _FALLBACK_HEAD_FACTOR * activations
    rest = folded.rest_elements
    if rest is None:
        rest = _FALLBACK_HEAD_FACTOR * n_outputs
    size = u.dtype.size
    basis_row = (locations + activations + prefix + n_outputs) * size
    scored_row = (r + n_outputs + rest) * size
    return basis_row, scored_row, r * n_outputs * size


def _run_chunks(functions, call, starts, class_id, desc, verbose):
    """Run ``call(start)`` over chunks, turning in-graph failures into clear errors."""
    return tf.concat(_run_calls(functions, call, starts, class_id, desc, verbose), axis=0)


def _run_calls(functions, call, starts, class_id, desc, verbose):
    """The results of ``call(*start)`` (or ``call(start)``) for each start, as a list."""
    results = []
    strategy = active_strategy()
    # Under a multi-device tf.distribute strategy, one chunk per device at a time.
    step = 1 if strategy is None else strategy.num_replicas_in_sync
    calls = [tuple(tf.constant(s, tf.int64) for s in (start if isinstance(start, tuple)
                                                      else (start,))) for start in starts]
    try:
        with tqdm(total=len(calls), desc=desc, disable=not verbose, unit="chunk") as bar:
            for first in range(0, len(calls), step):
                group = calls[first:first + step]
                results.extend(run_grouped(call, group))
                bar.update(len(group))
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
    return results


# ---------------------------------------------------------------------------------------------
# Engines
# ---------------------------------------------------------------------------------------------


def _masked_scores(u, w, head, class_id, masks, *, max_batch_bytes, batch_size,
                   probability=False, verbose=False, desc="perturbations", fold_head=True):
    """Class scores of ``head(((u_k ⊙ M_j) W))`` for every image k and mask j.

    Parameters
    ----------
    u : tf.Tensor of shape (n, r) or (n, h, w, r)
    w : tf.Tensor of shape (r, p)
    masks : array-like of shape (m, r), shared by all images
    probability : bool
        Also return the softmax probability of ``class_id``.
    fold_head : bool
        Fold the head's leading affine layers into the concept basis when it can be done
        exactly (see :mod:`xcraft.plumbing.head_fold`) and there are more masks than concepts (else
        the
        ``r`` basis responses per image cost more than the plain rows they replace).

    Returns
    -------
    tf.Tensor of shape (n, m), or (n, m, 2) with ``[..., 0]`` the logit and ``[..., 1]`` the
    probability when ``probability`` is True.
    """
    masks = tf.convert_to_tensor(np.asarray(masks), dtype=u.dtype)  # (m, r)
    n, m = int(u.shape[0]), int(masks.shape[0])
    functions = _head_functions(head)
    if fold_head and m > int(u.shape[-1]):
        folded = functions.folded()
        if folded is not None and folded.accepts([*u.shape[1:-1], w.shape[1]]):
            return _folded_masked_scores(u, w, functions, folded, class_id, masks,
                                         max_batch_bytes=max_batch_bytes, batch_size=batch_size,
                                         probability=probability, verbose=verbose, desc=desc)
    total = n * m
    chunk = _chunk_size(total, _row_bytes(u, w, head), max_batch_bytes, batch_size)
    class_tensor = tf.constant(class_id, tf.int64)
    y = _run_chunks(
        functions,
        lambda start: functions.scores(u, masks, w, start, class_tensor, chunk, bool(probability)),
        range(0, total, chunk), class_id, desc, verbose,
    )[:total]  # (n m[, 2])
    return tf.reshape(y, [n, m, 2] if probability else [n, m])


def _folded_masked_scores(u, w, functions, folded, class_id, masks, *, max_batch_bytes,
                          batch_size, probability, verbose, desc):
    """:func:`_masked_scores` through a folded head: ``rest(sum_i m_i B_i + L(0))``.

    Images go in blocks whose basis responses fit the budget; in a block, the responses of
    each (image, concept) pair are computed in fixed-shape chunks, then the scores in fixed-shape
    blocks of images × masks (the last image and mask repeated past the end).
    """
    n, m, r = int(u.shape[0]), int(masks.shape[0]), int(u.shape[-1])
    # L(0), once: the constant of the affine map (eager, one row).
    offset = folded.prefix(tf.zeros([1, *u.shape[1:-1], w.shape[1]], u.dtype))[0]  # (*out)
    n_outputs = int(np.prod(offset.shape, dtype=np.int64))  # d
    basis_row, scored_row, basis_image = _fold_row_bytes(u, w, folded, n_outputs)
    rows = batch_size if batch_size is not None else max(1, max_batch_bytes // scored_row)
    n_masks = min(m, rows)
    if batch_size is not None:
        n_images = min(n, max(1, batch_size // n_masks))
    else:
        n_images = max(1, max_batch_bytes // (n_masks * scored_row + basis_image))
        # As many calls as the budget needs, evenly filled: padding the last block to a full
        # budget-sized one wasted up to half the time. The block shape then depends on n, as
        # it already did for n below one block (a new n may trace once).
        n_images = -(-n // -(-n // n_images))
    # A block of images holds its basis responses (r d values each) within the budget too.
    per_block = max(n_images, max_batch_bytes // basis_image // n_images * n_images)
    # (n, [h, w,] r) -> (n r, [h, w]): row k r + i holds u_i of image k.
    order = [0, u.shape.rank - 1, *range(1, u.shape.rank - 1)]
    coefficients = tf.reshape(tf.transpose(u, order), [n * r, *u.shape[1:-1]])
    class_tensor = tf.constant(class_id, tf.int64)
    # Sized on a full block, so a shorter last block reuses the same graph.
    chunk = _chunk_size(min(per_block, n) * r, basis_row, max_batch_bytes, batch_size)
    blocks = []
    for first in range(0, n, per_block):
        count = min(per_block, n - first)
        block_rows = coefficients[first * r:(first + count) * r]  # (count r, [h, w])
        basis = _run_chunks(
            functions,
            lambda start, rows=block_rows: functions.basis(rows, w, offset, start, chunk),
            range(0, count * r, chunk), class_id, f"{desc} basis", verbose,
        )[:count * r]
        basis = tf.reshape(basis, [count, r, n_outputs])  # (count, r, d)
        starts = [(i, j) for i in range(0, count, n_images) for j in range(0, m, n_masks)]
        scores = _run_calls(
            functions,
            lambda i, j, basis=basis: functions.folded_scores(
                basis, offset, masks, i, j, class_tensor, n_images, n_masks, bool(probability)),
            starts, class_id, desc, verbose,
        )  # row-major blocks of (n_images, n_masks[, 2])
        per_row = -(-m // n_masks)
        rows_of_blocks = [tf.concat(scores[k:k + per_row], axis=1)[:, :m]
                          for k in range(0, len(scores), per_row)]
        blocks.append(tf.concat(rows_of_blocks, axis=0)[:count])  # (count, m[, 2])
    return tf.concat(blocks, axis=0)  # (n, m[, 2])


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
                       n_bootstrap=0, confidence=0.95, variance="pooled", verbose=False,
                       fold_head=True):
    """Estimate how much each concept drives the class score of a head.

    Parameters
    ----------
    u : array-like of shape (n, n_concepts), (n, tokens, n_concepts) or \
(n, height, width, n_concepts)
        Concept coefficients of ``n`` images: pooled, or at every location (or token, leading
        tokens included) of the split layer.
    concept_bank : array-like of shape (n_concepts, n_channels)
        The concept bank ``W``; activations are reconstructed as ``u W``.
    head : callable
        The model after the split layer (a Keras model): activations of shape (batch, n_channels),
        (batch, tokens, n_channels) or (batch, height, width, n_channels) to logits of shape
        (batch, n_classes).
    class_id : int
        Column of the logits whose score is explained.
    method : {"sobol", "tcav", "occlusion"}, default="sobol"
        - ``"sobol"`` (CRAFT): total Sobol' index of each concept's mask. Each image gets the
          masks ``M`` of :func:`xcraft.ops.sobol.sobol_design` (shared across images), the class
          score of ``head((u ⊙ M) W)`` and its total indices; for spatial (or token) ``u`` the
          mask of concept ``i`` multiplies ``u_i`` at every location (every token).
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
        See :func:`xcraft.ops.sobol.sobol_design`.
    estimator : {"jansen", "saltelli", "homma"}, default="jansen"
        See :func:`xcraft.ops.sobol.total_indices_from_outputs`.
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
        Variance in the Sobol' denominators; see
        :func:`xcraft.ops.sobol.total_indices_from_outputs`.
    verbose : bool, default=False
        Show a progress bar over chunks.
    fold_head : bool, default=True
        For ``"sobol"`` and ``"occlusion"``: when the head is a Keras chain that starts with
        affine layers (reshapes, average pooling, batch normalisation, dropout, ``Dense`` without
        its activation, ...) that include a ``Dense``, fold them into the concept bank so each
        perturbation costs an ``(r)·(r × d)`` product and the rest of the head (see Notes). The
        scores equal the plain ones up to float rounding. ``False`` always rebuilds
        ``(u ⊙ M) W`` and runs the whole head. Heads that cannot be folded exactly (another
        first layer, branches, subclassed layers or models, plain callables) use the plain
        engine either way.

    Returns
    -------
    importances : ndarray of shape (n_concepts,), or (n, n_concepts) when ``reduce=None``
        In the dtype of ``u`` (float32 unless float64). With ``n_bootstrap > 0``, a
        :class:`xcraft.ops.sobol.SobolIndices` ``(indices, low, high, confidence)`` instead; with
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

    Folding the head: if ``h = rest ∘ L`` with ``L`` affine, ``L((u ⊙ m) W) = sum_i m_i B_i +
    L(0)`` with ``B_i = L(u_i ⊗ W_i) - L(0)`` (``u_i ⊗ W_i`` is concept ``i``'s activation
    alone; for spatial ``u``, ``u_i`` at every location times ``W_i``). The ``r`` responses
    ``B_i`` of each image are computed once; every (image, mask) pair then costs
    ``sum_i m_i B_i`` and ``rest``. This is used when there are more masks than concepts (always
    for ``"sobol"`` and ``"occlusion"``).

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
                                fold_head=bool(fold_head), **budget)  # (n, r + 1)
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
                                 fold_head=bool(fold_head), **budget)  # (n, nb_design (r + 2))
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


def sampler_name(sampler):
    """Accept our sampler names and Xplique's ``MaskSampler`` enum members."""
    name = getattr(sampler, "name", sampler)
    if isinstance(name, str):
        name = name.lower()
        return {"latin": "lhs"}.get(name, name)
    return sampler


def split_importance_result(result):
    """Split the engine's result into (importances, intervals of shape (2, r) or None)."""
    if hasattr(result, "indices") and hasattr(result, "low"):
        return np.asarray(result.indices), np.stack([result.low, result.high])
    return np.asarray(result), None


def clip_total_indices(indices, intervals=None, n_designs=None):
    """Clip total Sobol index estimates to [0, 1], warning when an estimate was above 1.

    A total index is a share of the class score's variance, so it lies in [0, 1]; Monte-Carlo
    estimators (Jansen's included) overshoot 1 by their noise when one concept carries nearly
    all of it. Such a value is reported as 1 with a warning rather than as a share above the
    whole.

    Parameters
    ----------
    indices : ndarray of shape (n_concepts,) or (n_images, n_concepts)
    intervals : ndarray of shape (2, n_concepts) or None
        Bootstrap bounds. Only their lower side is clipped (at 0): they describe the
        estimator's noise, and clipped at 1 an interval lying above 1 collapsed to [1, 1], a
        certainty the estimate does not have. An interval reaching above 1 says the estimate
        is at the ceiling within its noise.
    n_designs : int, default=None
        The designs used, named in the warning's advice.

    Returns
    -------
    indices, intervals : ndarray
    """
    indices = np.asarray(indices)
    above = indices > 1.0
    if np.any(above):
        advice = f" (more than {n_designs})" if n_designs else ""
        warnings.warn(
            f"{int(above.sum())} total Sobol index estimate(s) exceed 1 (up to "
            f"{float(indices.max()):.3f}): estimator noise, as a share of the variance cannot "
            "exceed the whole. Reported as 1 (its bootstrap interval, if any, as estimated); "
            f"more designs{advice} narrow the noise.",
            UserWarning,
            stacklevel=3,
        )
    indices = np.clip(indices, 0.0, 1.0)
    if intervals is not None:
        intervals = np.maximum(np.asarray(intervals), 0.0)
    return indices, intervals
