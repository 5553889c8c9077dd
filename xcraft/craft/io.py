"""Save and load fitted CRAFT results: arrays in ``.npz``, metadata in JSON, never pickle.

A result is a directory. It is written under a temporary name beside its destination and renamed
into place only when complete, so a crash (or Ctrl-C) never leaves a half-written result behind;
an older result at the same path stays intact until the new one is whole. Models are not saved
(they are the user's, and Keras saves them): ``load`` takes g and h again.
"""

import json
import os

import numpy as np

from xcraft.craft.results import Factorization, Sensitivity
from xcraft.ops.nmf import NMF
from xcraft.plumbing.storage import atomic_directory, json_default, library_versions, read_json

__all__ = ["FORMAT_VERSION", "save_craft", "load_craft", "atomic_directory", "read_metadata"]

FORMAT_VERSION = 1
ARRAYS_FILE = "arrays.npz"
METADATA_FILE = "metadata.json"
CHILDREN_DIR = "children"

_ARRAY_ATTRIBUTES = (
    "images_",
    "crop_boxes_",
    "crop_activations_",
    "crops_u_",
    "concept_bank_w_",
    "seed_sequence_",
)
_OPTIONAL_ARRAYS = ("importances_", "parent_crop_indices_")


def _serialisable_params(craft):
    params = craft.get_params(deep=False)
    params.pop("input_to_latent_model")
    params.pop("latent_to_logit_model")
    if not isinstance(params.get("random_state"), (int, type(None))):
        # A Generator's state is not a parameter a user can write down; record that it was one.
        params["random_state"] = None
    return params


def _write(craft, directory):
    arrays = {name: np.asarray(getattr(craft, name)) for name in _ARRAY_ATTRIBUTES}
    for name in _OPTIONAL_ARRAYS:
        value = getattr(craft, name, None)
        if value is not None:
            arrays[name] = np.asarray(value)
    sensitivity = craft.sensitivity
    if sensitivity is not None:
        arrays["sensitivity_importances"] = np.asarray(sensitivity.importances)
        arrays["sensitivity_order"] = np.asarray(sensitivity.most_important_concepts)
        arrays["sensitivity_colours"] = np.asarray(sensitivity.cmaps, dtype=np.float64)
        if sensitivity.intervals is not None:
            arrays["sensitivity_intervals"] = np.asarray(sensitivity.intervals)
    nmf = craft.nmf_
    for name in ("history_",):
        if getattr(nmf, name, None) is not None:
            arrays[f"nmf_{name}"] = np.asarray(getattr(nmf, name))
    np.savez_compressed(os.path.join(directory, ARRAYS_FILE), **arrays)

    layer = getattr(craft, "_source_layer", None)
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": "CraftTf",
        "versions": library_versions(),
        "params": _serialisable_params(craft),
        "class_id": int(craft.class_id_),
        "n_classes": int(craft.n_classes_),
        "input_size": list(craft.input_size_),
        "layer": layer if isinstance(layer, (str, int)) else None,
        "parent_concept_id": getattr(craft, "parent_concept_id_", None),
        "refinement": getattr(craft, "refinement_", None),
        "sensitivity_method": None if sensitivity is None else sensitivity.method,
        "nmf": {
            "n_iter": int(getattr(nmf, "n_iter_", 0)),
            "reconstruction_err": float(getattr(nmf, "reconstruction_err_", np.nan)),
        },
        "children": sorted(int(k) for k in getattr(craft, "children_", {})),
    }
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=2, default=json_default)
    for concept_id, child in getattr(craft, "children_", {}).items():
        child_dir = os.path.join(directory, CHILDREN_DIR, str(int(concept_id)))
        os.makedirs(child_dir)
        _write(child, child_dir)


def save_craft(craft, path):
    """Write a fitted ``CraftTf`` (and its decompositions) to the directory ``path``, atomically.

    Parameters
    ----------
    craft : CraftTf
        A fitted estimator.
    path : str or os.PathLike
        Destination directory; replaced as a whole if it exists.
    """
    craft.check_if_fitted()
    with atomic_directory(path) as tmp:
        _write(craft, tmp)


def read_metadata(path):
    """Return the metadata of a saved result, refusing formats newer than this xcraft's."""
    metadata_path = os.path.join(os.fspath(path), METADATA_FILE)
    if not os.path.isfile(metadata_path):
        raise ValueError(
            f"`path` must be a directory written by `save`, got {os.fspath(path)!r}, which has no "
            f"{METADATA_FILE}."
        )
    metadata = read_json(metadata_path)
    version = metadata.get("format_version")
    if not isinstance(version, int) or version > FORMAT_VERSION:
        raise ValueError(
            f"The result at {os.fspath(path)!r} was saved in format version {version!r}, newer "
            f"than this xcraft understands ({FORMAT_VERSION}). Upgrade xcraft to load it."
        )
    return metadata


def load_craft(cls, path, input_to_latent_model, latent_to_logit_model, *, model=None):
    """Rebuild a fitted ``cls`` (``CraftTf``) saved by :func:`save_craft`.

    Parameters
    ----------
    cls : type
        ``CraftTf`` (or a subclass).
    path : str or os.PathLike
        The saved directory.
    input_to_latent_model, latent_to_logit_model : keras.Model
        g and h, as given to the saved estimator.
    model : keras.Model, default=None
        The full classifier; needed to restore decompositions (re-split at their layers) and
        to decompose further.

    Returns
    -------
    CraftTf
        Its ``transform``, importances and maps equal the saved estimator's.
    """
    metadata = read_metadata(path)
    with np.load(os.path.join(os.fspath(path), ARRAYS_FILE), allow_pickle=False) as data:
        arrays = {name: data[name] for name in data.files}
    craft = cls(input_to_latent_model, latent_to_logit_model, **metadata["params"])
    for name in _ARRAY_ATTRIBUTES + _OPTIONAL_ARRAYS:
        setattr(craft, name, arrays.get(name))
    craft.class_id_ = metadata["class_id"]
    craft.n_classes_ = metadata["n_classes"]
    craft.input_size_ = tuple(metadata["input_size"])
    if model is not None:
        craft._source_model = model
    if metadata["layer"] is not None:
        craft._source_layer = metadata["layer"]
    if metadata.get("parent_concept_id") is not None:
        craft.parent_concept_id_ = metadata["parent_concept_id"]
    if metadata.get("refinement") is not None:
        craft.refinement_ = metadata["refinement"]
    nmf = NMF(craft.number_of_concepts, solver=craft.solver, max_iter=craft.max_iter, tol=craft.tol)
    nmf.components_ = craft.concept_bank_w_
    nmf.n_components_ = craft.concept_bank_w_.shape[0]
    nmf.n_features_in_ = craft.concept_bank_w_.shape[1]
    nmf.n_iter_ = metadata["nmf"]["n_iter"]
    nmf.reconstruction_err_ = metadata["nmf"]["reconstruction_err"]
    nmf.history_ = arrays.get("nmf_history_")
    craft.nmf_ = nmf
    crops = craft._cut_crops(craft.images_, craft.crop_boxes_, craft.input_size_)
    craft.factorization = Factorization(
        craft.images_, craft.class_id_, crops, nmf, craft.crops_u_, craft.concept_bank_w_
    )
    if "sensitivity_importances" in arrays:
        craft.sensitivity = Sensitivity(
            arrays["sensitivity_importances"],
            arrays["sensitivity_order"],
            [tuple(c) for c in arrays["sensitivity_colours"]],
            arrays.get("sensitivity_intervals"),
            metadata.get("sensitivity_method") or "sobol",
        )
    craft.children_ = {}
    for concept_id in metadata["children"]:
        child_path = os.path.join(os.fspath(path), CHILDREN_DIR, str(concept_id))
        child_meta = read_metadata(child_path)
        if model is None:
            raise ValueError(
                f"`model` must be given to load the decompositions saved in {child_path!r}: "
                f"their g and h are re-split from it at layer {child_meta['layer']!r}."
            )
        from xcraft.plumbing.split import split_model

        g_child, h_child = split_model(model, child_meta["layer"])
        craft.children_[concept_id] = load_craft(cls, child_path, g_child, h_child, model=model)
    return craft
