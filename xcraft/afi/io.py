"""Save and load fitted AfI estimators: arrays in ``.npz``, metadata in JSON, never pickle.

The directory is written atomically (see :mod:`xcraft.plumbing.storage`); the model is not saved
(it is the user's): ``load`` takes it again and refuses one whose fingerprint differs.
"""

import json
import os

import numpy as np

from xcraft.plumbing.shapes import fingerprint_differences, model_fingerprint
from xcraft.plumbing.storage import (
    atomic_directory,
    json_default,
    library_versions,
    load_npz,
    read_json,
    recover_previous,
)

__all__ = ["FORMAT_VERSION", "save_afi", "load_afi"]

FORMAT_VERSION = 1
ARRAYS_FILE = "arrays.npz"
METADATA_FILE = "metadata.json"
OWN_NAMES = (ARRAYS_FILE, METADATA_FILE)
_ARRAYS = ("delta_", "images_used_", "transform_excluded_")


def _params(afi):
    params = afi.get_params(deep=False)
    params.pop("model")
    params["input_range"] = [float(v) for v in params["input_range"]]
    if isinstance(params.get("layers"), tuple):
        params["layers"] = list(params["layers"])
    if not isinstance(params.get("random_state"), (int, type(None))):
        params["random_state"] = None  # a Generator's state is not a parameter
    return params


def save_afi(afi, path, *, overwrite=False):
    """Write a fitted :class:`xcraft.afi.AfI` to the directory ``path``, atomically."""
    from xcraft._validation import check_is_fitted

    check_is_fitted(afi, "delta_")
    arrays = {name: np.asarray(getattr(afi, name)) for name in _ARRAYS}
    for key, value in afi.history_.items():
        arrays[f"history/{key}"] = value
    for layer in afi.layers_:
        arrays[f"neuron/{layer}"] = afi.neuron_importance_[layer]
        arrays[f"channel/{layer}"] = afi.channel_importance_[layer]
    concepts = afi.concept_importance_
    if concepts is not None:
        arrays["concepts/scores"] = concepts.scores
        arrays["concepts/mmd"] = concepts.mmd
        arrays["concepts/p_values"] = concepts.p_values
        if concepts.response_shift is not None:
            arrays["concepts/response_shift"] = concepts.response_shift
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "AfI",
        "versions": library_versions(),
        "params": _params(afi),
        "class_id": int(afi.class_id_),
        "n_classes": int(afi.n_classes_),
        "input_shape": list(afi.input_shape_),
        "layers": list(afi.layers_),
        "lambda": float(afi.lambda_),
        "lambda_search": afi.lambda_search_,
        "n_steps": int(afi.n_steps_),
        "flip_rate": {k: (None if np.isnan(v) else float(v)) for k, v in afi.flip_rate_.items()},
        "concepts": None if concepts is None else {
            "names": list(concepts.names), "layers": list(concepts.layers),
            "n_permutations": int(concepts.n_permutations)},
        "fingerprint": model_fingerprint(afi.model),
    }
    with atomic_directory(path, marker=METADATA_FILE, own_names=OWN_NAMES,
                          overwrite=overwrite) as tmp:
        np.savez_compressed(os.path.join(tmp, ARRAYS_FILE), **arrays)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as file:
            json.dump(metadata, file, indent=2, default=json_default)


def load_afi(path, model, estimator_class):
    """Read an estimator written by :func:`save_afi`; ``model`` must be the one it was fitted on.

    ``estimator_class`` is :class:`xcraft.afi.AfI` (passed in by ``AfI.load``, so that this
    module does not import the estimator's).

    Raises
    ------
    ValueError
        If the directory is not an AfI result, is corrupt or of a newer format, or ``model``
        differs from the saved fingerprint.
    """
    from xcraft.afi.concepts import ConceptImportance
    recover_previous(path)
    metadata_path = os.path.join(os.fspath(path), METADATA_FILE)
    if not os.path.isfile(metadata_path):
        raise ValueError(
            f"`path` must be a directory written by `AfI.save`, got {os.fspath(path)!r}, which "
            f"has no {METADATA_FILE}."
        )
    metadata = read_json(metadata_path)
    version = metadata.get("format_version")
    if metadata.get("kind") != "AfI" or not isinstance(version, int):
        raise ValueError(f"The file {metadata_path!r} does not describe an AfI result.")
    if version > FORMAT_VERSION:
        raise ValueError(
            f"The result at {os.fspath(path)!r} was saved in format version {version}, newer "
            f"than this xcraft understands ({FORMAT_VERSION}). Upgrade xcraft to load it."
        )
    differences = fingerprint_differences(metadata.get("fingerprint", {}), model_fingerprint(model))
    if differences:
        raise ValueError(
            f"`model` must be the model the result was fitted on, got one that differs: "
            f"{differences}."
        )
    arrays_path = os.path.join(os.fspath(path), ARRAYS_FILE)
    arrays = load_npz(arrays_path)
    missing = [name for name in _ARRAYS if name not in arrays]
    missing += [f"{kind}/{layer}" for layer in metadata["layers"] for kind in ("neuron", "channel")
                if f"{kind}/{layer}" not in arrays]
    if missing:
        raise ValueError(f"The file {arrays_path!r} is inconsistent: it lacks {missing}.")
    afi = estimator_class(model, **metadata["params"])
    for name in _ARRAYS:
        setattr(afi, name, arrays[name])
    afi.history_ = {key.split("/", 1)[1]: value for key, value in arrays.items()
                    if key.startswith("history/")}
    afi.class_id_ = int(metadata["class_id"])
    afi.n_classes_ = int(metadata["n_classes"])
    afi.input_shape_ = tuple(metadata["input_shape"])
    afi.layers_ = list(metadata["layers"])
    afi.lambda_ = float(metadata["lambda"])
    afi.lambda_search_ = list(metadata["lambda_search"])
    afi.n_steps_ = int(metadata["n_steps"])
    afi.flip_rate_ = {k: (np.nan if v is None else float(v))
                      for k, v in metadata["flip_rate"].items()}
    afi.neuron_importance_ = {layer: arrays[f"neuron/{layer}"] for layer in afi.layers_}
    afi.channel_importance_ = {layer: arrays[f"channel/{layer}"] for layer in afi.layers_}
    afi._detectors = {}
    concepts = metadata.get("concepts")
    afi.concept_importance_ = None if concepts is None else ConceptImportance(
        list(concepts["names"]), list(concepts["layers"]), arrays["concepts/scores"],
        arrays["concepts/mmd"], arrays["concepts/p_values"], int(concepts["n_permutations"]),
        arrays.get("concepts/response_shift"))
    return afi
