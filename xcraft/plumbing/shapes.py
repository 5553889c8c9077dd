"""What a model's shapes say about the images it takes and the classes it scores.

Keras models know their input and output shapes without running; plain callables do not, and
are run once on one image instead.
"""

import re

import numpy as np

from xcraft.plumbing.activations import call_model

__all__ = [
    "activation_shape",
    "check_images_fit_model",
    "count_classes",
    "fingerprint_differences",
    "model_fingerprint",
    "model_input_size",
]


def _input_shape(model):
    try:
        return model.inputs[0].shape
    except (AttributeError, IndexError, TypeError):
        return None


def model_input_size(feature_extractor, images):
    """Return the (height, width) crops are resized to: g's input size, else the images' size.

    Parameters
    ----------
    feature_extractor : keras.Model or callable
        g; a callable without ``inputs`` takes images of any size.
    images : ndarray of shape (n_images, height, width, channels)

    Returns
    -------
    tuple of int
    """
    shape = _input_shape(feature_extractor)
    if shape is not None and len(shape) == 4 and shape[1] is not None and shape[2] is not None:
        return int(shape[1]), int(shape[2])
    return int(images.shape[1]), int(images.shape[2])


def check_images_fit_model(feature_extractor, images, name="inputs"):
    """Raise ``ValueError`` when ``images`` do not have the shape g's input declares.

    Parameters
    ----------
    feature_extractor : keras.Model or callable
    images : ndarray of shape (n_images, height, width, channels)
    name : str, default="inputs"
        The argument named in the message.
    """
    shape = _input_shape(feature_extractor)
    if shape is not None and len(shape) == 4:
        expected = tuple(shape[1:])
        got = images.shape[1:]
        if any(e is not None and e != g for e, g in zip(expected, got, strict=True)):
            raise ValueError(
                f"`{name}` must have shape (batch, {', '.join(str(e) for e in expected)}) "
                f"to match the model's input, got shape {images.shape}."
            )


def count_classes(feature_extractor, head, one_image):
    """Return the number of logits h(g(x)) has, from h's output shape or by running it once.

    Parameters
    ----------
    feature_extractor, head : keras.Model or callable
        g and h.
    one_image : ndarray of shape (1, height, width, channels)
        Run through g and h only when h does not declare its output width.

    Raises
    ------
    ValueError
        If g's activations are not of rank 2, 3 or 4, or h's output is not (batch, n_classes).
    """
    try:  # a Keras head knows its output width without running
        shape = head.outputs[0].shape
        if len(shape) == 2 and shape[-1] is not None:
            return int(shape[-1])
    except (AttributeError, IndexError, TypeError):
        pass
    activations = call_model(feature_extractor, one_image)
    _check_activation_rank(tuple(activations.shape))
    logits = call_model(head, activations)
    if logits.shape.rank != 2:
        raise ValueError(
            "`latent_to_logit_model` must return logits of shape (batch, n_classes), got "
            f"shape {tuple(logits.shape)}."
        )
    return int(logits.shape[-1])


def _check_activation_rank(shape):
    if len(shape) not in (2, 3, 4):
        raise ValueError(
            "`input_to_latent_model` must return activations of shape (batch, channels), "
            "(batch, tokens, channels) or (batch, height, width, channels), got shape "
            f"{shape}."
        )


def activation_shape(feature_extractor, one_image):
    """Return the shape of g's activations: declared by a Keras g, else from one forward pass.

    Parameters
    ----------
    feature_extractor : keras.Model or callable
        g.
    one_image : ndarray of shape (1, height, width, channels)
        Run through g only when g does not declare its output shape.

    Returns
    -------
    tuple
        ``(batch, channels)``, ``(batch, tokens, channels)`` or ``(batch, height, width,
        channels)``; the batch entry may be None.

    Raises
    ------
    ValueError
        If the activations are of another rank.
    """
    try:
        shape = tuple(feature_extractor.outputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        shape = None
    if shape is None or any(d is None for d in shape[1:]):
        shape = tuple(call_model(feature_extractor, one_image).shape)
    _check_activation_rank(shape)
    return shape


def model_fingerprint(model):
    """Describe a model well enough to tell, at load time, that it is the one a result used.

    Parameters
    ----------
    model : keras.Model or callable

    Returns
    -------
    dict
        JSON-ready: the layer names, input and output shapes and dtypes, the number of
        weights and a SHA-256 of their values. A callable that is not a Keras model is
        described by its type name only.
    """
    import hashlib

    if not hasattr(model, "weights") or not hasattr(model, "layers"):
        return {"type": type(model).__name__}

    def shapes(tensors):
        try:
            return [[None if d is None else int(d) for d in t.shape] for t in tensors]
        except (AttributeError, TypeError):
            return None

    def dtypes(tensors):
        try:
            return [str(getattr(t.dtype, "name", t.dtype)) for t in tensors]
        except (AttributeError, TypeError):
            return None

    digest = hashlib.sha256()
    n_weights = 0
    for weight in model.weights:
        values = np.ascontiguousarray(np.asarray(weight))
        digest.update(str(values.shape).encode())
        digest.update(values.tobytes())
        n_weights += int(values.size)
    inputs = getattr(model, "inputs", None) or []
    outputs = getattr(model, "outputs", None) or []
    return {
        "type": type(model).__name__,
        # Input layers are left out: Keras names them by a per-process counter
        # (input_layer, input_layer_2, ...), so the same split made twice differs there.
        "layers": [layer.name for layer in model.layers if not _is_input_layer(layer)],
        "input_shapes": shapes(inputs),
        "input_dtypes": dtypes(inputs),
        "output_shapes": shapes(outputs),
        "output_dtypes": dtypes(outputs),
        "n_weights": n_weights,
        "weights_sha256": digest.hexdigest(),
    }


def _is_input_layer(layer):
    return type(layer).__name__ == "InputLayer"


_AUTOMATIC_INPUT_NAME = re.compile(r"^input_layer(_\d+)?$")


def fingerprint_differences(saved, current):
    """Return one line per field where two :func:`model_fingerprint` results differ."""
    saved, current = dict(saved), dict(current)
    for fingerprint in (saved, current):
        # Results saved before input layers were left out still list Keras's automatic names.
        if isinstance(fingerprint.get("layers"), list):
            fingerprint["layers"] = [name for name in fingerprint["layers"]
                                     if not _AUTOMATIC_INPUT_NAME.match(str(name))]
    labels = {
        "type": "type",
        "layers": "layer names",
        "input_shapes": "input shapes",
        "input_dtypes": "input dtypes",
        "output_shapes": "output shapes",
        "output_dtypes": "output dtypes",
        "n_weights": "number of weights",
        "weights_sha256": "weight values",
    }
    lines = []
    for key, label in labels.items():
        if key not in saved and key not in current:
            continue
        if saved.get(key) != current.get(key):
            if key == "weights_sha256":
                lines.append(f"{label} differ")
            elif key == "layers":
                lines.append(f"{label}: saved {_short(saved.get(key))}, "
                             f"given {_short(current.get(key))}")
            else:
                lines.append(f"{label}: saved {saved.get(key)}, given {current.get(key)}")
    return lines


def _short(names):
    if not isinstance(names, list):
        return repr(names)
    return "[" + ", ".join(names[:4]) + (", ..." if len(names) > 4 else "") + f"] ({len(names)})"
