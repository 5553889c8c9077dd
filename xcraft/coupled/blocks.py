"""Blocks of a coupled NMF from a Keras model: pixels of each input channel and layer activations.

:func:`build_blocks` streams the images through *one* multi-output model (every analysed layer
comes out of the same forward pass), vectorises every output and returns a :class:`Blocks`, a
dict of block name to (n_examples, p_b) array that :class:`xcraft.coupled.CoupledNMF` takes
as it is, with the index maps that trace every column back to where it came from.

Index maps
----------
Every block has an index map of shape (p_b, 3): row j is ``(channel, y, x)`` of column j.

- Pixel block of input channel c (images of shape (H, W, C)): column ``j = y * W + x`` is pixel
  (y, x) of channel c, so its row is ``(c, y, x)``.
- Layer with 4-D activations (h, w, c), ``pool=None``: the vector is *channel-major*, every
  channel's feature map contiguous (the paper vectorises each feature map): column
  ``j = channel * h * w + y * w + x``.
- Layer with 4-D activations and ``pool="avg"``, or with 2-D activations (c,) (a dense layer):
  column ``j = channel``, and y = x = -1 (no position: the column covers them all).

:func:`column_of` inverts the map, so ``blocks[name][:, column_of(...)]`` is the activation of
that channel at that position.
"""

import keras
import numpy as np
import tensorflow as tf

from xcraft import _validation as v
from xcraft.plumbing.activations import NEGATIVE_TOLERANCE
from xcraft.plumbing.split import resolve_layer

__all__ = ["Blocks", "build_blocks", "index_map", "column_of", "POOLS", "pixel_block_names"]

POOLS = (None, "avg")
_SEPARATOR = "/"
#: Names of the pixel blocks of RGB images, as in Saini & Papalexakis (one block per colour).
_RGB = ("pixels_r", "pixels_g", "pixels_b")


class Blocks(dict):
    """Dict of block name to (n_examples, p_b) float32 array, with where every column comes from.

    A plain ``dict`` to every consumer (``CoupledNMF.fit`` takes it as it is); the extra
    attributes describe the blocks.

    Attributes
    ----------
    shapes : dict of str to tuple of int
        The source's shape per example: (height, width) for a pixel block, (h, w, c) or (c,)
        for a layer (before pooling).
    sources : dict of str to str
        ``"pixels"`` or the layer (its path, for a layer inside a nested model).
    channels : dict of str to int or None
        The input channel of a pixel block; None for a layer.
    pool : str or None
        The pooling the layer blocks went through.
    """

    def __init__(self, arrays=(), *, shapes, sources, channels, pool):
        super().__init__(arrays)
        self.shapes = dict(shapes)
        self.sources = dict(sources)
        self.channels = dict(channels)
        self.pool = pool

    def index_map(self, name):
        """Return the (p_b, 3) ``(channel, y, x)`` map of block ``name`` (see the module)."""
        if name not in self.shapes:
            raise ValueError(f"`name` must be one of the blocks {list(self.shapes)}, got {name!r}.")
        return index_map(self.shapes[name], channel=self.channels[name],
                         pool=None if self.channels[name] is not None else self.pool)

    @property
    def index_maps(self):
        """dict of str to ndarray of shape (p_b, 3): every block's index map."""
        return {name: self.index_map(name) for name in self.shapes}

    def layout(self):
        """Return the JSON-ready description of the blocks (everything but the arrays)."""
        return {
            "names": list(self.shapes),
            "shapes": {k: list(s) for k, s in self.shapes.items()},
            "sources": dict(self.sources),
            "channels": dict(self.channels),
            "pool": self.pool,
        }

    @classmethod
    def from_layout(cls, layout, arrays=()):
        """Rebuild from :meth:`layout` (and optionally the arrays)."""
        names = list(layout["names"])
        return cls(arrays, shapes={k: tuple(layout["shapes"][k]) for k in names},
                   sources={k: layout["sources"][k] for k in names},
                   channels={k: layout["channels"][k] for k in names}, pool=layout["pool"])

    def __repr__(self):
        parts = ", ".join(f"{k!r}: {self.sources[k]} {tuple(self[k].shape) if k in self else ''}"
                          for k in self.shapes)
        return f"Blocks({{{parts}}})"


def index_map(shape, *, channel=None, pool=None):
    """Return the (p_b, 3) ``(channel, y, x)`` index map of a block.

    Parameters
    ----------
    shape : tuple of int
        (height, width) of a pixel block (then ``channel`` is its input channel); (h, w, c) or
        (c,) of a layer.
    channel : int or None, default=None
        The input channel of a pixel block.
    pool : {None, "avg"}, default=None
        Whether a layer's spatial positions were averaged.

    Returns
    -------
    ndarray of shape (p_b, 3), int64

    Examples
    --------
    >>> index_map((2, 3, 4))[7].tolist()         # channel-major: 7 = 1 * 6 + 0 * 3 + 1
    [1, 0, 1]
    >>> index_map((2, 2), channel=2)[3].tolist()  # pixel (1, 1) of input channel 2
    [2, 1, 1]
    """
    shape = tuple(int(s) for s in shape)
    if channel is not None:
        height, width = shape
        y, x = np.divmod(np.arange(height * width), width)
        return np.stack([np.full_like(y, channel), y, x], axis=1).astype(np.int64)
    if len(shape) == 1 or pool == "avg":
        c = np.arange(shape[-1])
        return np.stack([c, -np.ones_like(c), -np.ones_like(c)], axis=1).astype(np.int64)
    h, w, c = shape
    channels, rest = np.divmod(np.arange(c * h * w), h * w)  # channel-major order
    y, x = np.divmod(rest, w)
    return np.stack([channels, y, x], axis=1).astype(np.int64)


def column_of(shape, channel, y=-1, x=-1, *, pool=None):
    """Return the column of a block holding ``(channel, y, x)``: the inverse of :func:`index_map`.

    Parameters
    ----------
    shape : tuple of int
        As for :func:`index_map` ((height, width) for a pixel block: ``channel`` is ignored).
    channel, y, x : int or ndarray of int

    Returns
    -------
    int or ndarray of int
    """
    shape = tuple(int(s) for s in shape)
    if len(shape) == 2:
        return np.asarray(y) * shape[1] + np.asarray(x)
    if len(shape) == 1 or pool == "avg":
        return np.asarray(channel)
    h, w, _ = shape
    return (np.asarray(channel) * h + np.asarray(y)) * w + np.asarray(x)


def pixel_block_names(n_channels):
    """Names of the pixel blocks: ``"pixels"`` (gray), ``"pixels_r/g/b"`` (RGB), else
    ``"pixels_0"``, ``"pixels_1"``, ..."""
    if n_channels == 1:
        return ["pixels"]
    if n_channels == 3:
        return list(_RGB)
    return [f"pixels_{c}" for c in range(n_channels)]


# --------------------------------------------------------------------------------------------
# One multi-output model for every layer, nested models included
# --------------------------------------------------------------------------------------------


def _is_relu(layer):
    activation = getattr(layer, "activation", None)
    return isinstance(layer, keras.layers.ReLU) or getattr(activation, "__name__", "") == "relu"


def _post_relu_layers(model, limit=6, prefix=""):
    """Paths of layers whose outputs are non-negative by construction (for the message)."""
    names, after_relu = [], False
    for layer in model.layers:
        pooling = isinstance(layer, (keras.layers.MaxPooling2D, keras.layers.AveragePooling2D,
                                     keras.layers.GlobalAveragePooling2D,
                                     keras.layers.GlobalMaxPooling2D))
        if isinstance(layer, keras.Model):
            names.extend(_post_relu_layers(layer, limit, f"{prefix}{layer.name}{_SEPARATOR}"))
            after_relu = False
        elif _is_relu(layer) or (pooling and after_relu):
            names.append(prefix + layer.name)
            after_relu = True
        elif not pooling:
            after_relu = False
    return names[-limit:]


def _call_inputs(model, layer):
    """The input tensors of ``layer``'s single call in ``model``'s graph.

    Keras 3 has no public accessor for the call of a nested model inside an outer graph (its
    ``.input`` is its own Input); the inbound node is what Keras' Functional itself uses.
    """
    nodes = getattr(layer, "_inbound_nodes", [])
    calls = [node for node in nodes if _node_in(model, node)]
    if len(calls) != 1:
        raise ValueError(
            f"`layers` must name layers called once in the model, but the nested model "
            f"{layer.name!r} is called {len(calls)} times: its inner activations are ambiguous."
        )
    return list(calls[0].input_tensors)


def _node_in(model, node):
    """Whether ``node`` is in ``model``'s graph (not in another model sharing the layer)."""
    inputs = {id(t) for t in keras.tree.flatten(model.inputs)}
    seen, stack = set(), [t for t in keras.tree.flatten(model.outputs)]
    wanted = {id(t) for t in node.output_tensors}
    while stack:
        tensor = stack.pop()
        if id(tensor) in seen:
            continue
        seen.add(id(tensor))
        if id(tensor) in wanted:
            return True
        if id(tensor) in inputs:
            continue
        operation, index, _ = tensor._keras_history
        stack.extend(operation._inbound_nodes[index].input_tensors)
    return False


def _resolve_path(model, path):
    """Split ``path`` into (outer nested model or None, rest); resolve bare nested names."""
    if _SEPARATOR in path:
        outer_name, rest = path.split(_SEPARATOR, 1)
        outer = resolve_layer(model, outer_name)
        if not isinstance(outer, keras.Model):
            raise ValueError(
                f"`layers` path {path!r} must go through a nested model, but {outer_name!r} is "
                f"a {type(outer).__name__}."
            )
        return outer, rest
    try:
        return None, resolve_layer(model, path)
    except ValueError as err:
        found = _nested_paths(model, path)
        if len(found) == 1:
            return _resolve_path(model, found[0])
        if len(found) > 1:
            raise ValueError(
                f"`layers` entry {path!r} appears in several nested models "
                f"({', '.join(found)}); pass one of these paths."
            ) from None
        raise ValueError(f"`layers` entry {path!r}: {err}") from None


def _nested_paths(model, name, prefix=""):
    found = []
    for layer in model.layers:
        if isinstance(layer, keras.Model):
            here = f"{prefix}{layer.name}{_SEPARATOR}"
            if any(inner.name == name for inner in layer.layers):
                found.append(here + name)
            found.extend(_nested_paths(layer, name, here))
    return found


def _layer_tensors(model, paths):
    """Symbolic outputs of ``paths`` in terms of ``model``'s inputs, one graph for all of them.

    Top-level layers give their own output tensors. Layers inside a nested model are grouped by
    that model: one sub-model (nested model's input -> all its requested layers) is called once
    on the nested model's input tensor in the outer graph, so the shared computation runs once.
    Calling it adds a node to that new sub-model only: the user's layers are left as they were.
    """
    tensors, groups = {}, {}
    for path in paths:
        outer, rest = _resolve_path(model, path)
        if outer is None:
            if isinstance(rest, keras.layers.InputLayer):
                raise ValueError(
                    f"`layers` must name layers after the input, got the input layer {path!r}; "
                    f"the pixels come with `include_pixels=True`."
                )
            tensors[path] = rest.output
        else:
            groups.setdefault(outer.name, (outer, []))[1].append((path, rest))
    for outer, members in groups.values():
        inner = _layer_tensors(outer, [rest for _, rest in members])
        sub_inputs = outer.inputs[0] if len(outer.inputs) == 1 else outer.inputs
        sub = keras.Model(sub_inputs, [inner[rest] for _, rest in members],
                          name=f"{outer.name}_blocks")
        inputs = _call_inputs(model, outer)
        outputs = sub(inputs[0] if len(inputs) == 1 else inputs)
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        for (path, _), tensor in zip(members, outputs, strict=True):
            tensors[path] = tensor
    return tensors


def _check_layers(layers):
    if isinstance(layers, (str, int)):
        layers = [layers]
    if not isinstance(layers, (list, tuple)):
        raise TypeError(
            f"`layers` must be a list of layer names, got {type(layers).__name__} {layers!r}."
        )
    for layer in layers:
        if not isinstance(layer, str):
            raise TypeError(
                f"`layers` must hold layer names (str), got {type(layer).__name__} {layer!r}."
            )
    if len(set(layers)) != len(layers):
        raise ValueError(f"`layers` must not repeat a layer, got {list(layers)}.")
    return list(layers)


def _multi_output_model(model, layers):
    if not isinstance(model, keras.Model):
        raise TypeError(f"`model` must be a keras.Model, got {type(model).__name__}.")
    if not layers:
        return None
    try:
        has_graph = bool(model.inputs) and bool(model.outputs)
    except (AttributeError, ValueError):
        has_graph = False
    if not has_graph:
        raise TypeError(
            f"`model` must be a Sequential or Functional Keras model, got the subclassed model "
            f"{type(model).__name__}, whose layers form no graph to read activations from."
        )
    tensors = _layer_tensors(model, layers)
    return keras.Model(model.inputs, [tensors[layer] for layer in layers],
                       name=f"{model.name}_coupled_blocks")


def _vectorise(activations, pool):
    """(b, h, w, c) -> (b, c * h * w) channel-major, or (b, c) pooled; (b, c) unchanged."""
    if activations.shape.rank == 2:
        return activations
    if activations.shape.rank != 4:
        raise ValueError(
            f"The layers must give activations of shape (batch, channels) or (batch, height, "
            f"width, channels), got shape {tuple(activations.shape)}."
        )
    if pool == "avg":
        return tf.reduce_mean(activations, axis=[1, 2])  # (b, c)
    moved = tf.transpose(activations, [0, 3, 1, 2])  # (b, c, h, w): channel-major columns
    return tf.reshape(moved, [tf.shape(moved)[0], -1])  # (b, c * h * w)


def build_blocks(model, layers, images, *, include_pixels=True, pool=None, pixel_images=None,
                 batch_size=64, verbose=False):
    """Return the blocks of a coupled NMF: pixels of each input channel and layer activations.

    Parameters
    ----------
    model : keras.Model
        A Sequential or Functional model; its layers are read, never changed.
    layers : list of str
        The layers to analyse: names, or ``"nested_model/layer"`` paths into nested models (a
        bare name found in exactly one nested model is resolved). Each must give non-negative
        activations (a ReLU's output, or a pooling of one).
    images : ndarray of shape (n_images, height, width, channels)
        The model's inputs. With ``include_pixels`` they must be non-negative, unless
        ``pixel_images`` is given.
    include_pixels : bool, default=True
        Add one block per input channel (``"pixels"`` for gray images, ``"pixels_r"``,
        ``"pixels_g"``, ``"pixels_b"`` for RGB), each of shape (n_images, height * width).
    pool : {None, "avg"}, default=None
        None: every activation is a column (h * w * c of them). ``"avg"``: the spatial mean of
        every channel (c columns). Dense layers are (c,) either way; pixels are never pooled.
    pixel_images : ndarray of shape (n_images, height, width, channels), optional
        What the pixel blocks are made of, when not the model's inputs: the [0, 1] pixels of
        a model that takes signed, preprocessed inputs (e.g. ``(x + 1) / 2`` of inputs in
        [-1, 1]). Default: ``images``.
    batch_size : int, default=64
        Images per forward pass. One ``tf.function`` runs every batch (the last one padded to
        the same shape), and only the vectorised outputs are kept.
    verbose : bool, default=False
        Show a progress bar.

    Returns
    -------
    Blocks
        A dict of block name (the pixel blocks first, then the layers as given) to float32
        arrays of shape (n_images, p_b), with ``shapes``, ``sources``, ``channels``,
        ``index_map(name)`` (see the module docstring).

    Raises
    ------
    TypeError
        If ``model`` is not a graph Keras model or ``layers`` is not a list of names.
    ValueError
        If a layer is unknown (the valid names are listed), its activations are negative (the
        message names the layer and post-ReLU layers to use instead) or not finite, or the
        images are negative with ``include_pixels``.

    Examples
    --------
    >>> import keras
    >>> model = keras.Sequential([keras.Input((6, 6, 1)),
    ...                           keras.layers.Conv2D(2, 3, activation="relu", name="conv")])
    >>> blocks = build_blocks(model, ["conv"], np.ones((5, 6, 6, 1), "float32"))
    >>> {name: block.shape for name, block in blocks.items()}
    {'pixels': (5, 36), 'conv': (5, 32)}
    >>> blocks.index_map("conv")[16].tolist()      # channel 1, y 0, x 0
    [1, 0, 0]
    """
    layers = _check_layers(layers)
    if pool not in POOLS:
        raise ValueError(f"`pool` must be None or 'avg', got {pool!r}.")
    if not isinstance(include_pixels, bool):
        raise TypeError(
            f"`include_pixels` must be a bool, got {type(include_pixels).__name__}."
        )
    if not layers and not include_pixels:
        raise ValueError("`layers` must name at least one layer when `include_pixels` is False.")
    batch_size = v.check_positive_int(batch_size, "batch_size")
    images = v.check_images(images)
    n, height, width, n_channels = images.shape
    extractor = _multi_output_model(model, layers)

    arrays, shapes, sources, channels = {}, {}, {}, {}
    if include_pixels:
        pixels = images
        if pixel_images is not None:
            pixels = v.check_images(pixel_images, "pixel_images")
            if pixels.shape != images.shape:
                raise ValueError(
                    f"`pixel_images` must have the shape of `images` {images.shape}, got "
                    f"{pixels.shape}."
                )
        low = float(pixels.min())
        if low < 0:
            raise ValueError(
                f"The pixels must be non-negative to form pixel blocks, got a minimum of "
                f"{low:.4g}. Pass the [0, 1] pixels as `pixel_images` (e.g. (x + 1) / 2 of "
                f"inputs in [-1, 1]), or `include_pixels=False`."
            )
        # (n, H, W, C) -> (C, n, H * W): one (n, H * W) block per channel, rows y * W + x
        per_channel = np.moveaxis(pixels, -1, 0).reshape(n_channels, n, height * width)
        for c, name in enumerate(pixel_block_names(n_channels)):
            arrays[name] = np.ascontiguousarray(per_channel[c])
            shapes[name], sources[name], channels[name] = (height, width), "pixels", c
    if extractor is not None:
        outputs = _stream(extractor, images, layers, pool, batch_size, verbose, model)
        for layer in layers:
            if layer in arrays:
                raise ValueError(f"`layers` entry {layer!r} clashes with a pixel block name.")
            arrays[layer], shapes[layer] = outputs[layer]
            sources[layer], channels[layer] = layer, None
    return Blocks(arrays, shapes=shapes, sources=sources, channels=channels, pool=pool)


def _stream(extractor, images, layers, pool, batch_size, verbose, model):
    """Run the multi-output model batch by batch; return name -> (array, source shape)."""
    n = len(images)
    batch_size = min(batch_size, n)
    shapes = [tuple(int(s) for s in t.shape[1:]) for t in extractor.outputs]

    @tf.function(reduce_retracing=True)
    def embed(batch):
        outputs = extractor(batch, training=False)  # a list: call_model would stack it
        outputs = outputs if isinstance(outputs, (list, tuple)) else [outputs]
        vectors = [_vectorise(tf.convert_to_tensor(o), pool) for o in outputs]
        # The minimum of the raw maps, not of their means: a pre-ReLU layer whose negatives
        # average out would otherwise pass.
        minima = tf.stack([tf.reduce_min(o) for o in outputs])
        finite = tf.stack([tf.reduce_all(tf.math.is_finite(o)) for o in outputs])
        return vectors, minima, finite

    out = None
    minima = np.full(len(layers), np.inf)
    finite = np.ones(len(layers), bool)
    bar = None
    if verbose:
        from tqdm import tqdm

        bar = tqdm(total=n, desc="blocks", unit="img", leave=False)
    for start in range(0, n, batch_size):
        stop = min(start + batch_size, n)
        index = np.arange(start, start + batch_size).clip(max=n - 1)  # pad: one trace
        vectors, batch_min, batch_finite = embed(tf.constant(images[index]))
        if out is None:
            out = [np.empty((n, int(vec.shape[1])), np.float32) for vec in vectors]
        for array, vec in zip(out, vectors, strict=True):
            array[start:stop] = vec.numpy()[: stop - start]
        minima = np.minimum(minima, batch_min.numpy())
        finite &= batch_finite.numpy()
        if bar is not None:
            bar.update(stop - start)
    if bar is not None:
        bar.close()
    for layer, low, ok in zip(layers, minima, finite, strict=True):
        if not ok:
            raise ValueError(
                f"The activations of layer {layer!r} must be finite, got NaN or infinite values. "
                f"Check that the images are preprocessed as the model expects."
            )
        if low < -NEGATIVE_TOLERANCE:
            suggestions = _post_relu_layers(model)
            hint = (f" Post-ReLU layers of the model: {', '.join(map(repr, suggestions))}."
                    if suggestions else "")
            raise ValueError(
                f"The activations of layer {layer!r} must be non-negative for the coupled NMF, "
                f"got a minimum of {low:.4g}. Use the output of a ReLU (or a pooling of one) "
                f"instead, e.g. the block output rather than its pre-activation sum.{hint}"
            )
    for array in out:
        np.maximum(array, 0.0, out=array)  # round-off negatives of post-ReLU layers, in place
    return {layer: (array, shape) for layer, array, shape in zip(layers, out, shapes, strict=True)}
