"""Split a Keras classifier f into a feature extractor g and a head h, with f = h ∘ g.

CRAFT factorises the activations of one intermediate layer, so the model must be cut there: g maps
images to that layer's output and h maps that output to the logits. A layer is a valid cut only
when every path from the input to the output goes through it; a residual branch that jumps over
the layer would leave h with an input it cannot see.
"""

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import keras

__all__ = ["split_model", "resolve_layer", "layer_position"]

_NESTED_SEPARATOR = "/"


def _is_graph_model(model):
    """Tell whether ``model`` carries a functional graph (Sequential or Functional)."""
    if isinstance(model, keras.Sequential):
        return True
    try:
        return bool(model.inputs) and bool(model.outputs) and hasattr(model, "operations")
    except (AttributeError, ValueError):
        return False


def _flat_tensors(structure):
    return [t for t in keras.tree.flatten(structure) if isinstance(t, keras.KerasTensor)]


def _single_node_io(operation):
    """Return (inputs, outputs) of an operation called exactly once in the graph."""
    try:
        return _flat_tensors(operation.input), _flat_tensors(operation.output)
    except (AttributeError, ValueError) as err:
        raise ValueError(
            f"Layer {operation.name!r} is called more than once in the model (a shared layer), "
            f"so the graph cannot be split around it. Pass your own `g` and `h` instead."
        ) from err


def _check_is_graph(model, name="model"):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`{name}` must be a keras.Model, got {type(model).__name__}.")
    if not _is_graph_model(model):
        raise TypeError(
            f"`{name}` must be a Sequential or Functional Keras model to be split, got the "
            f"subclassed model {type(model).__name__}, whose layers form no inspectable graph. "
            f"Build the two halves yourself and pass them as `CraftTf(g, h)`, with g mapping "
            f"images to non-negative activations and h mapping those activations to logits."
        )


def _nested_models(model):
    return [layer for layer in model.layers if isinstance(layer, keras.Model)]


def _find_nested_paths(model, layer_name, prefix=""):
    """Return every "outer/inner/..." path under which ``layer_name`` appears in nested models."""
    paths = []
    for sub in _nested_models(model):
        if not _is_graph_model(sub):
            continue
        names = [layer.name for layer in sub.layers]
        path = f"{prefix}{sub.name}{_NESTED_SEPARATOR}"
        if layer_name in names:
            paths.append(path + layer_name)
        paths.extend(_find_nested_paths(sub, layer_name, path))
    return paths


def resolve_layer(model, layer):
    """Return the layer of ``model`` named or indexed by ``layer``.

    Parameters
    ----------
    model : keras.Model
        A Sequential or Functional model.
    layer : str or int
        A layer name, or an index into ``model.layers`` (negative indices count from the end).

    Returns
    -------
    keras.layers.Layer

    Raises
    ------
    TypeError
        If ``layer`` is neither a str nor an int.
    ValueError
        If no such layer exists; the message lists the valid names.
    """
    if isinstance(layer, bool) or not isinstance(layer, (str, int)):
        raise TypeError(
            f"`layer` must be a layer name (str) or an index (int), got "
            f"{type(layer).__name__} {layer!r}."
        )
    layers = list(model.layers)
    if isinstance(layer, int):
        if not -len(layers) <= layer < len(layers):
            raise ValueError(
                f"`layer` index must be in [{-len(layers)}, {len(layers) - 1}], got {layer}."
            )
        return layers[layer]
    for candidate in layers:
        if candidate.name == layer:
            return candidate
    names = ", ".join(repr(item.name) for item in layers)
    raise ValueError(f"`layer` must be one of the model's layers ({names}), got {layer!r}.")


def _graph_nodes(model):
    """Return ``(operation, inputs, outputs)`` for every call in the graph, in topological order.

    Keras 3 has no public API for the call nodes of a functional graph; a layer's ``.input`` is
    ambiguous for nested models (their own graph and their call in the outer one). The tensors'
    ``_keras_history`` is what Keras' own Functional uses, so we walk it, in one place.
    """
    if isinstance(model, keras.Sequential):
        return [(layer, *_single_node_io(layer)) for layer in model.layers]
    order, seen = [], set()
    stack = [(tensor, False) for tensor in _flat_tensors(model.outputs)]
    while stack:
        tensor, expanded = stack.pop()
        operation, node_index, _ = tensor._keras_history
        key = (id(operation), node_index)
        node = operation._inbound_nodes[node_index]
        if expanded:
            if key not in seen:
                seen.add(key)
                order.append((operation, list(node.input_tensors), list(node.output_tensors)))
            continue
        if key in seen:
            continue
        stack.append((tensor, True))
        stack.extend((t, False) for t in node.input_tensors)
    return order


def _layer_node(nodes, layer):
    """Return the single ``(inputs, outputs)`` of ``layer`` in the graph ``nodes``."""
    calls = [(inputs, outputs) for operation, inputs, outputs in nodes if operation is layer]
    if len(calls) != 1:
        raise ValueError(
            f"`layer` must be called exactly once in the model graph, but {layer.name!r} is "
            f"called {len(calls)} times (a shared layer): no single cut exists there. Pass your "
            f"own `g` and `h` instead."
        )
    return calls[0]


def _check_is_cut(model, cut_layer):
    """Raise ``ValueError`` naming the connections that jump over ``cut_layer``.

    Returns the cut layer's (inputs, outputs) tensors in the model's graph.
    """
    nodes = _graph_nodes(model)
    cut_inputs, cut_outputs = _layer_node(nodes, cut_layer)
    if len(cut_outputs) != 1:
        raise ValueError(
            f"`layer` must have a single output tensor, got {len(cut_outputs)} outputs "
            f"for layer {cut_layer.name!r}."
        )
    if isinstance(model, keras.Sequential):
        return cut_inputs, cut_outputs  # a chain: every layer is a cut
    reached = {id(cut_outputs[0])}
    producer_of = {}
    crossing = []
    for operation, inputs, outputs in nodes:
        for tensor in outputs:
            producer_of[id(tensor)] = operation
        if operation is cut_layer or not any(id(t) in reached for t in inputs):
            continue
        reached.update(id(t) for t in outputs)
        for tensor in inputs:
            if id(tensor) not in reached:
                producer = producer_of.get(id(tensor))
                source = producer.name if producer is not None else "a model input"
                crossing.append(f"{source} -> {operation.name}")
    unreached = [t for t in _flat_tensors(model.outputs) if id(t) not in reached]
    if crossing or unreached:
        detail = ", ".join(crossing) if crossing else "the outputs do not depend on it"
        raise ValueError(
            f"`layer` must cut the model graph in two, but connections cross layer "
            f"{cut_layer.name!r}: {detail}. Choose a layer that every path from the input to "
            f"the output goes through, e.g. the output of a whole residual block."
        )
    return cut_inputs, cut_outputs


def _split_flat(model, cut_layer):
    _, cut_outputs = _check_is_cut(model, cut_layer)
    if any(cut_outputs[0] is output for output in _flat_tensors(model.outputs)):
        raise ValueError(
            f"`layer` must come before the model's output, got its output layer "
            f"{cut_layer.name!r}: the head after it would be empty. Split at an intermediate "
            f"layer (the last convolutional block's output, say)."
        )
    inputs = model.inputs
    g_inputs = inputs[0] if len(inputs) == 1 else inputs
    outputs = model.outputs
    h_outputs = outputs[0] if len(outputs) == 1 else outputs
    g = keras.Model(g_inputs, cut_outputs[0], name=f"{model.name}_to_{cut_layer.name}")
    h = keras.Model(cut_outputs[0], h_outputs, name=f"{model.name}_from_{cut_layer.name}")
    return g, h


def compose_models(first, second, name="composed"):
    """Return one functional model x -> second(first(x)) of two single-input models.

    Parameters
    ----------
    first, second : keras.Model
        E.g. g and h of :func:`split_model`, to get the classifier back.
    name : str, default="composed"
    """
    return _chain(first, second, name)


def _chain(first, second, name):
    """Compose two single-input models into one functional model x -> second(first(x))."""
    inputs = keras.Input(shape=first.inputs[0].shape[1:], dtype=first.inputs[0].dtype)
    return keras.Model(inputs, second(first(inputs)), name=name)


def split_model(model, layer):
    """Split ``model`` into ``(g, h)`` at ``layer`` so that ``h(g(x)) == model(x)``.

    Parameters
    ----------
    model : keras.Model
        A Sequential or Functional Keras model (a classifier returning logits).
    layer : str or int
        Where to cut: a layer name, an index into ``model.layers``, or a path
        ``"submodel/layer"`` into a nested model (a bare name found in exactly one nested model
        is resolved automatically). ``g`` ends with that layer's output.

    Returns
    -------
    g : keras.Model
        Images to the layer's activations.
    h : keras.Model
        The layer's activations to the model's outputs.

    Raises
    ------
    TypeError
        If ``model`` is subclassed (no graph to cut) or ``layer`` has the wrong type.
    ValueError
        If the layer does not exist, or is not a cut of the graph: the message names the
        connections (e.g. residual branches) that jump over it.

    Examples
    --------
    >>> import keras, numpy as np
    >>> model = keras.Sequential([keras.Input((8, 8, 3)), keras.layers.Conv2D(4, 3, name="conv"),
    ...                           keras.layers.ReLU(name="relu"), keras.layers.Flatten(),
    ...                           keras.layers.Dense(2)])
    >>> g, h = split_model(model, "relu")
    >>> x = np.ones((1, 8, 8, 3), "float32")
    >>> bool(np.allclose(h(g(x)), model(x), atol=1e-6))
    True
    """
    _check_is_graph(model)
    if len(model.outputs) != 1:
        raise ValueError(
            f"`model` must have a single output (the logits), got {len(model.outputs)} outputs. "
            f"Pick one: `keras.Model(model.inputs, model.outputs[k])`."
        )
    if isinstance(layer, str) and _NESTED_SEPARATOR in layer:
        outer_name, inner_path = layer.split(_NESTED_SEPARATOR, 1)
        outer = resolve_layer(model, outer_name)
        return _split_nested(model, outer, inner_path)
    try:
        cut_layer = resolve_layer(model, layer)
    except ValueError:
        if not isinstance(layer, str):
            raise
        paths = _find_nested_paths(model, layer)
        if len(paths) != 1:
            if len(paths) > 1:
                raise ValueError(
                    f"`layer` {layer!r} appears in several nested models ({', '.join(paths)}); "
                    f"pass one of these paths."
                ) from None
            raise
        outer_name, inner_path = paths[0].split(_NESTED_SEPARATOR, 1)
        return _split_nested(model, resolve_layer(model, outer_name), inner_path)
    if isinstance(cut_layer, keras.layers.InputLayer):
        raise ValueError(
            f"`layer` must be a layer after the input, got the input layer {cut_layer.name!r}."
        )
    return _split_flat(model, cut_layer)


def _is_nested_output(outer, inner_path):
    """Whether ``inner_path`` names the layer giving the nested model ``outer``'s output."""
    if _NESTED_SEPARATOR in inner_path:
        inner_name, rest = inner_path.split(_NESTED_SEPARATOR, 1)
        inner = resolve_layer(outer, inner_name)
        if not isinstance(inner, keras.Model) or not _is_nested_output(inner, rest):
            return False
    else:
        try:
            inner = resolve_layer(outer, inner_path)
        except ValueError:
            paths = _find_nested_paths(outer, inner_path)
            return len(paths) == 1 and _is_nested_output(outer, paths[0])
    outputs = _flat_tensors(outer.outputs)
    if len(outputs) != 1:
        return False
    _, inner_outputs = _layer_node(_graph_nodes(outer), inner)
    return len(inner_outputs) == 1 and inner_outputs[0] is outputs[0]


def _split_nested(model, outer, inner_path):
    """Split a model at a layer inside the nested model ``outer``.

    The outer graph is cut at ``outer`` itself, the nested model is cut at ``inner_path``, and the
    pieces are chained: g = g_inner ∘ g_outer, h = h_outer ∘ h_inner.
    """
    if not isinstance(outer, keras.Model):
        raise ValueError(
            f"`layer` path must go through a nested model, but {outer.name!r} is a "
            f"{type(outer).__name__}."
        )
    _check_is_graph(outer, name=f"nested model {outer.name!r}")
    if _is_nested_output(outer, inner_path):
        # A transfer-learning model's backbone ends in the layer users split at ("out_relu"):
        # there is nothing of the nested model after it, so the cut is the nested model itself.
        return _split_flat(model, outer)
    g_inner, h_inner = split_model(outer, inner_path)
    if outer is model.layers[-1] and isinstance(model.layers[0], keras.layers.InputLayer) and len(
        model.layers
    ) == 2:
        return g_inner, h_inner
    outer_inputs, outer_outputs = _check_is_cut(model, outer)
    if len(outer_inputs) != 1:
        raise ValueError(
            f"`layer` path must go through a nested model with one input, got "
            f"{len(outer_inputs)} inputs for {outer.name!r}."
        )
    model_inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    before = keras.Model(model_inputs, outer_inputs[0], name=f"{model.name}_before_{outer.name}")
    after = keras.Model(
        outer_outputs[0],
        model.outputs[0] if len(model.outputs) == 1 else model.outputs,
        name=f"{model.name}_after_{outer.name}",
    )
    cut_name = inner_path.replace(_NESTED_SEPARATOR, "_")
    g = _chain(before, g_inner, name=f"{model.name}_to_{cut_name}")
    h = _chain(h_inner, after, name=f"{model.name}_from_{cut_name}")
    return g, h


def layer_position(model, layer):
    """Return a sortable position of ``layer`` in ``model``: earlier layers compare smaller.

    The position is a tuple of indices, one per level of nesting (``"submodel/layer"`` gives
    ``(index of submodel, index of layer in it)``). A layer inside a nested model counts as
    earlier than the nested model itself, whose output comes after all of its layers.
    """
    _check_is_graph(model)
    if isinstance(layer, str) and _NESTED_SEPARATOR not in layer:
        try:
            resolve_layer(model, layer)
        except ValueError:
            paths = _find_nested_paths(model, layer)
            if len(paths) == 1:
                layer = paths[0]
    if isinstance(layer, str) and _NESTED_SEPARATOR in layer:
        outer_name, inner_path = layer.split(_NESTED_SEPARATOR, 1)
        outer = resolve_layer(model, outer_name)
        index = list(model.layers).index(outer)
        # -1 sorts the inside of the nested model before the nested model's own output (0).
        return (index, -1, *layer_position(outer, inner_path))
    index = list(model.layers).index(resolve_layer(model, layer))
    return (index, 0)


def _is_squashing(activation):
    return getattr(activation, "__name__", None) in _SQUASHING


#: Final activations whose pre-activation is the logit CRAFT explains.
_SQUASHING = ("softmax", "sigmoid")


def logits_model(model):
    """Return ``model`` without a final softmax or sigmoid, and what was removed (or None).

    CRAFT explains logits (Fel et al., 2023): on probabilities the other classes' scores leak
    into every importance, and a saturated sigmoid has no variance left to share. A final
    ``Softmax`` layer, ``Activation("softmax"|"sigmoid")`` or a layer with
    ``activation="softmax"|"sigmoid"`` (a Dense head, say) is replaced by its pre-activation
    output; the returned model shares the original's layers and weights.

    Parameters
    ----------
    model : keras.Model
        A Sequential or Functional model with one output.

    Returns
    -------
    model : keras.Model
        The logits model (``model`` itself when it does not end in a softmax).
    removed : str or None
        A description of the removed softmax, for the message to the user.
    """
    _check_is_graph(model)
    if len(model.outputs) != 1:
        return model, None
    nodes = _graph_nodes(model)
    last = [op for op, _, outputs in nodes if any(t is model.outputs[0] for t in outputs)]
    if not last:
        return model, None
    layer = last[0]
    inputs, _ = _layer_node(nodes, layer)
    if isinstance(layer, keras.layers.Softmax) or (
        isinstance(layer, keras.layers.Activation) and _is_squashing(layer.activation)
    ):
        logits = inputs[0]
        kind = "softmax" if isinstance(layer, keras.layers.Softmax) else layer.activation.__name__
        removed = f"the final {type(layer).__name__} layer {layer.name!r} ({kind})"
    elif isinstance(layer, keras.layers.Dense) and _is_squashing(layer.activation):
        config = layer.get_config()
        config.update(activation="linear", name=f"{layer.name}_logits")
        linear = type(layer).from_config(config)
        linear.build(inputs[0].shape)
        linear.set_weights(layer.get_weights())
        logits = linear(inputs[0])
        removed = (
            f"the {layer.activation.__name__} activation of the final layer {layer.name!r}"
        )
    else:
        return model, None
    model_inputs = model.inputs[0] if len(model.inputs) == 1 else model.inputs
    return keras.Model(model_inputs, logits, name=f"{model.name}_logits"), removed
