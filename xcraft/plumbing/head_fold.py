"""Fold the leading affine layers of a Keras head into the concept basis.

The Sobol' and occlusion engines evaluate ``h((u ⊙ m) W)`` for many masks ``m`` of each image.
When the head starts with layers whose composition ``L`` is affine at inference (reshapes,
average pooling, batch normalisation with its moving statistics, dropout, the ``x @ kernel +
bias`` part of a Dense), then, writing ``h = rest ∘ L``,

    L((u ⊙ m) W) = Σ_i m_i B_i + L(0),      B_i = L(u_i ⊗ W_i) − L(0),

where ``u_i ⊗ W_i`` is the activation of concept ``i`` alone (``u_i W_i`` for pooled ``u``; ``u_i``
at every location times ``W_i`` for spatial ``u``, whose mask multiplies ``u_i`` everywhere). The
``r`` responses ``B_i`` of an image are computed once, and every perturbation then costs an
``(r)·(r × D)`` product and the rest of the head instead of rebuilding ``(u ⊙ m) W`` and running
``L`` on it.

:func:`fold_head` only folds what it can prove affine: a Sequential or Functional single-input,
single-output chain whose leading layers are of known classes (exact classes, not subclasses,
which may override ``call``). Anything else returns None and the engines use the plain path.
"""

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import keras
import numpy as np
import tensorflow as tf

from xcraft.plumbing.split import _graph_nodes, _is_graph_model

__all__ = ["FoldedHead", "fold_head"]


def _layer_types(*names):
    # Look names up one by one: a Keras release without one of them still folds the others.
    return tuple(getattr(keras.layers, name) for name in names if hasattr(keras.layers, name))


# Identity at inference: dropped from the folded map.
_IDENTITY_TYPES = _layer_types(
    "Dropout", "SpatialDropout1D", "SpatialDropout2D", "SpatialDropout3D", "GaussianNoise",
    "GaussianDropout", "AlphaDropout", "ActivityRegularization", "Identity",
)
# Affine at inference, whatever their configuration: called as they are, with training=False.
_AFFINE_TYPES = _layer_types(
    "Flatten", "Reshape", "Permute", "GlobalAveragePooling1D", "GlobalAveragePooling2D",
    "GlobalAveragePooling3D", "AveragePooling1D", "AveragePooling2D", "AveragePooling3D",
    "BatchNormalization",
)


def _is_linear(activation):
    return activation is None or activation is keras.activations.linear


def _plain_call(operation, inputs, output):
    """Tell whether a Functional node calls ``operation`` on its one input and nothing else.

    A graph may fix call arguments (``Dropout(0.5)(x, training=True)`` keeps dropout on at
    inference, a mask); those nodes are not folded nor replayed. Keras keeps a node's
    arguments on the node its output tensor comes from.
    """
    try:
        history = output._keras_history
        node = operation._inbound_nodes[history.node_index]
        args, kwargs = node.arguments.args, node.arguments.kwargs
    except (AttributeError, IndexError, TypeError):
        return False
    # Keras records ``mask=None`` for layers that support masks; None is every default.
    fixed = {key: value for key, value in kwargs.items() if value is not None}
    return len(args) == 1 and args[0] is inputs and fixed in ({}, {"training": False})


def _chain(head):
    """Return ``[(operation, output tensor), ...]`` of a single-path graph, or None."""
    try:
        if not _is_graph_model(head):
            return None
        model_inputs, model_outputs = list(head.inputs), list(head.outputs)
        nodes = _graph_nodes(head)
    except (AttributeError, ValueError, TypeError, IndexError, KeyError):
        return None  # unbuilt Sequential, shared layers, ...: no inspectable chain
    if len(model_inputs) != 1 or len(model_outputs) != 1:
        return None
    sequential = isinstance(head, keras.Sequential)
    current, chain = model_inputs[0], []
    for operation, inputs, outputs in nodes:
        if isinstance(operation, keras.layers.InputLayer) and not inputs:
            if len(outputs) != 1 or outputs[0] is not current:
                return None
            continue
        if len(inputs) != 1 or len(outputs) != 1 or inputs[0] is not current:
            return None
        # A Sequential calls each layer on the previous output alone (its recorded nodes carry
        # the symbolic build's training flag, which the real call replaces).
        if not sequential and not _plain_call(operation, inputs[0], outputs[0]):
            return None
        chain.append((operation, outputs[0]))
        current = outputs[0]
    if current is not model_outputs[0] or len({id(op) for op, _ in chain}) != len(chain):
        return None
    return chain


def _elements(tensors):
    """Sum of per-row sizes of symbolic tensors, or None when a dimension is unknown."""
    total = 0
    for tensor in tensors:
        dims = tuple(tensor.shape[1:])
        if any(d is None for d in dims):
            return None
        total += int(np.prod(dims, dtype=np.int64))
    return total


class _DenseAffine:
    """``x @ kernel + bias`` of a Dense layer on the last axis, without its activation."""

    def __init__(self, layer):
        self.layer = layer

    def __call__(self, x):
        dtype = self.layer.compute_dtype
        x = tf.cast(x, dtype)
        kernel = tf.cast(self.layer.kernel, dtype)  # (p, units)
        y = tf.matmul(x, kernel) if x.shape.rank == 2 else tf.tensordot(x, kernel, axes=1)
        if self.layer.bias is not None:
            y = y + tf.cast(self.layer.bias, dtype)
        return y  # (batch, ..., units)


class _Inference:
    """Call a Keras layer in inference mode (an operation takes no training flag)."""

    def __init__(self, operation):
        self.operation = operation

    def __call__(self, x):
        if isinstance(self.operation, keras.layers.Layer):
            return self.operation(x, training=False)
        return self.operation(x)


class FoldedHead:
    """A head written as ``rest(prefix(x))`` with ``prefix`` affine.

    Parameters
    ----------
    prefix_steps : list of callable
        The affine map, step by step (identity layers already dropped).
    rest_steps : list of callable
        The split-off activation of the last folded Dense, if any, then the remaining layers.
    input_shape : tuple
        Per-row shape of the head's input (``None`` for a free dimension).
    input_dtype : str
        The head's input dtype: inputs are cast to it first, as a Keras model does.
    prefix_elements, rest_elements : int or None
        Sum of the per-row output sizes of the prefix's and the rest's steps (for memory
        budgets), or None when a dimension is unknown.
    """

    def __init__(self, prefix_steps, rest_steps, input_shape, input_dtype, prefix_elements,
                 rest_elements):
        self.prefix_steps = list(prefix_steps)
        self.rest_steps = list(rest_steps)
        self.input_shape = tuple(input_shape)
        self.input_dtype = input_dtype
        self.prefix_elements = prefix_elements
        self.rest_elements = rest_elements

    def accepts(self, shape):
        """Tell whether per-row activations of ``shape`` fit the head's input."""
        shape = tuple(shape)
        return len(shape) == len(self.input_shape) and all(
            expected is None or expected == int(actual)
            for expected, actual in zip(self.input_shape, shape, strict=True)
        )

    def prefix(self, x):
        """The affine part ``L(x)``: (batch, *input_shape) to (batch, *prefix output)."""
        x = tf.cast(x, self.input_dtype)
        for step in self.prefix_steps:
            x = step(x)
        return x

    def rest(self, z):
        """The remaining head on the prefix's output: logits (batch, n_classes)."""
        for step in self.rest_steps:
            z = step(z)
        return z

    def __call__(self, x):
        return self.rest(self.prefix(x))


def fold_head(head):
    """Split ``head`` into an affine prefix and the rest, or return None.

    Parameters
    ----------
    head : object
        The model after the split layer.

    Returns
    -------
    FoldedHead or None
        None unless ``head`` is a Sequential or Functional Keras model forming one chain from
        its single input to its single output (no branch, no shared layer, no call argument
        fixed in the graph) that starts with layers of exactly these classes: ``Flatten``,
        ``Reshape``, ``Permute``, ``GlobalAveragePooling{1,2,3}D``, ``AveragePooling{1,2,3}D``,
        ``BatchNormalization`` (moving statistics), the dropout and noise layers and
        ``ActivityRegularization`` (identity at inference), ``Activation("linear")`` and
        ``Dense`` (without LoRA or quantization); and unless that prefix holds a ``Dense``
        (without one, nothing is gained). The prefix ends after the first Dense with a
        non-linear activation, whose activation then starts the rest.

    Notes
    -----
    Layers are matched by exact class: a subclass may override ``call``.
    """
    if not isinstance(head, keras.Model):
        return None
    chain = _chain(head)
    if chain is None:
        return None
    prefix_steps, prefix_outputs, rest_steps = [], [], []
    has_dense, position = False, 0
    for position, (operation, output) in enumerate(chain):
        kind = type(operation)
        foldable = kind in (*_IDENTITY_TYPES, *_AFFINE_TYPES, keras.layers.Activation,
                            keras.layers.Dense)
        if foldable and (getattr(operation, "lora_enabled", False)
                         or getattr(operation, "quantization_mode", None) is not None):
            return None  # the kernel is not the plain variable: do not reason about it
        if kind in _IDENTITY_TYPES:
            prefix_outputs.append(output)
        elif kind is keras.layers.Activation and _is_linear(operation.activation):
            prefix_outputs.append(output)
        elif kind in _AFFINE_TYPES:
            prefix_steps.append(_Inference(operation))
            prefix_outputs.append(output)
        elif kind is keras.layers.Dense:
            has_dense = True
            prefix_steps.append(_DenseAffine(operation))
            prefix_outputs.append(output)
            if not _is_linear(operation.activation):
                rest_steps.append(operation.activation)
                position += 1
                break
        else:
            break
    else:
        position = len(chain)
    if not has_dense:
        return None
    remaining = chain[position:]
    rest_steps.extend(_Inference(operation) for operation, _ in remaining)
    rest_outputs = [output for _, output in remaining]
    if len(rest_steps) > len(remaining):  # the split-off activation keeps the Dense's size
        rest_outputs.append(prefix_outputs[-1])
    model_input = head.inputs[0]
    return FoldedHead(
        prefix_steps,
        rest_steps,
        input_shape=tuple(model_input.shape[1:]),
        input_dtype=model_input.dtype,
        prefix_elements=_elements(prefix_outputs),
        rest_elements=_elements(rest_outputs),
    )
