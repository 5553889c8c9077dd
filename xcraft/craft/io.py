"""Save and load fitted CRAFT results: arrays in ``.npz``, metadata in JSON, never pickle.

A result is a directory. It is written under a temporary name beside its destination and renamed
into place only when complete, so a crash (or Ctrl-C) never leaves a half-written result behind;
an older result at the same path stays intact until the new one is whole. Models are not saved
(they are the user's, and Keras saves them): ``load`` takes g and h again.
"""

import json
import os
import warnings

import numpy as np

from xcraft.craft.results import Factorization, Sensitivity
from xcraft.ops.nmf import NMF
from xcraft.ops.semi_nmf import SemiNMF
from xcraft.plumbing.shapes import fingerprint_differences, model_fingerprint
from xcraft.plumbing.split import logits_model
from xcraft.plumbing.storage import (
    atomic_directory,
    json_default,
    library_versions,
    load_npz,
    read_result_metadata,
)

__all__ = ["FORMAT_VERSION", "save_craft", "load_craft", "atomic_directory", "read_metadata"]

FORMAT_VERSION = 1
ARRAYS_FILE = "arrays.npz"
METADATA_FILE = "metadata.json"
CHILDREN_DIR = "children"
OWN_NAMES = (ARRAYS_FILE, METADATA_FILE, CHILDREN_DIR)

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
        "source_logits": bool(getattr(craft, "_source_logits", False)),
        "parent_concept_id": getattr(craft, "parent_concept_id_", None),
        "refinement": getattr(craft, "refinement_", None),
        "sensitivity_method": None if sensitivity is None else sensitivity.method,
        "solver_used": getattr(craft, "solver_", craft.solver),
        "nmf": {
            "n_iter": int(getattr(nmf, "n_iter_", 0)),
            "reconstruction_err": float(getattr(nmf, "reconstruction_err_", np.nan)),
        },
        "children": sorted(int(k) for k in getattr(craft, "children_", {})),
        "fingerprint": {
            "input_to_latent_model": model_fingerprint(craft.input_to_latent_model),
            "latent_to_logit_model": model_fingerprint(craft.latent_to_logit_model),
        },
    }
    with open(os.path.join(directory, METADATA_FILE), "w", encoding="utf-8") as file:
        json.dump(metadata, file, indent=2, default=json_default)
    for concept_id, child in getattr(craft, "children_", {}).items():
        child_dir = os.path.join(directory, CHILDREN_DIR, str(int(concept_id)))
        os.makedirs(child_dir)
        _write(child, child_dir)


def save_craft(craft, path, *, overwrite=False):
    """Write a fitted ``CraftTf`` (and its decompositions) to the directory ``path``, atomically.

    Parameters
    ----------
    craft : CraftTf
        A fitted estimator.
    path : str or os.PathLike
        Destination directory: a new name, an empty directory or an earlier result (replaced
        as a whole; files in it that xcraft did not write are kept).
    overwrite : bool, default=False
        Also write into a non-empty directory that is not an xcraft result (its files are
        kept). Without it such a directory is refused before anything is written.
    """
    craft.check_if_fitted()
    with atomic_directory(path, marker=METADATA_FILE, own_names=OWN_NAMES,
                          overwrite=overwrite) as tmp:
        _write(craft, tmp)


def read_metadata(path):
    """Return the metadata of a saved result, refusing formats newer than this xcraft's."""
    metadata = read_result_metadata(path, METADATA_FILE, FORMAT_VERSION)
    return metadata


def _check_metadata(metadata, metadata_path):
    """Refuse metadata that lacks a field or holds one of the wrong type, naming the file."""
    expected = {
        "params": dict,
        "class_id": int,
        "n_classes": int,
        "input_size": list,
        "nmf": dict,
        "children": list,
    }
    for key, kind in expected.items():
        value = metadata.get(key)
        if isinstance(value, bool) or not isinstance(value, kind):
            raise ValueError(
                f"The file {metadata_path!r} must hold `{key}` as a JSON {kind.__name__}, got "
                f"{type(value).__name__ if key in metadata else 'nothing'}: it is corrupt."
            )
    if metadata.get("kind", "CraftTf") != "CraftTf":
        raise ValueError(
            f"The file {metadata_path!r} describes a {metadata['kind']}, not a CraftTf: load "
            f"it with that class."
        )


def _check_arrays(arrays, metadata, arrays_path):
    """Refuse arrays that are missing or disagree with each other or with the metadata."""
    def fail(message):
        raise ValueError(f"The file {arrays_path!r} is inconsistent: {message}")

    missing = [name for name in _ARRAY_ATTRIBUTES if name not in arrays]
    if missing:
        fail(f"it lacks {', '.join(missing)}.")
    w, u = arrays["concept_bank_w_"], arrays["crops_u_"]
    images, boxes = arrays["images_"], arrays["crop_boxes_"]
    activations = arrays["crop_activations_"]
    if w.ndim != 2 or u.ndim != 2 or images.ndim != 4 or boxes.ndim != 2 or boxes.shape[1] != 4:
        fail(f"concept_bank_w_ {w.shape}, crops_u_ {u.shape}, images_ {images.shape} and "
             f"crop_boxes_ {boxes.shape} must be of ranks 2, 2, 4 and (n, 4).")
    n_concepts = metadata["params"].get("number_of_concepts")
    if n_concepts != w.shape[0]:
        fail(f"metadata says number_of_concepts = {n_concepts!r}, concept_bank_w_ has "
             f"{w.shape[0]} rows.")
    n_crops, expected = len(u), (len(u), w.shape[1])
    if u.shape[1] != w.shape[0] or n_crops != len(boxes) or activations.shape != expected:
        fail(f"crops_u_ {u.shape}, crop_boxes_ {boxes.shape} and crop_activations_ "
             f"{activations.shape} must be (n_crops, {w.shape[0]}), (n_crops, 4) and "
             f"(n_crops, {w.shape[1]}).")
    if len(boxes) and (
        boxes[:, 0].min() < 0 or boxes[:, 0].max() >= len(images) or boxes[:, 1:].min() < 0
        or (boxes[:, 1] + boxes[:, 3]).max() > images.shape[1]
        or (boxes[:, 2] + boxes[:, 3]).max() > images.shape[2]
    ):
        fail(f"crop_boxes_ point outside the {len(images)} saved images of size "
             f"{images.shape[1]}x{images.shape[2]}.")
    importances = arrays.get("importances_")
    if importances is not None and importances.shape != (w.shape[0],):
        fail(f"importances_ has shape {importances.shape}, expected ({w.shape[0]},).")
    for name in ("concept_bank_w_", "crops_u_", "crop_activations_"):
        if not np.all(np.isfinite(arrays[name])):
            fail(f"{name} holds NaN or infinite values.")
    if not 0 <= metadata["class_id"] < metadata["n_classes"]:
        fail(f"class_id {metadata['class_id']} is outside the {metadata['n_classes']} classes.")


def _check_fingerprints(metadata, models, path, strict):
    """Refuse (or, not strict, warn about) models that differ from those the result used."""
    saved = metadata.get("fingerprint") or {}
    lines = []
    for name, model in models.items():
        if name in saved:
            lines += [f"{name}: {line}" for line in
                      fingerprint_differences(saved[name], model_fingerprint(model))]
    if not lines:
        return
    message = (
        f"The models given to load {os.fspath(path)!r} are not the ones it was saved with: "
        + "; ".join(lines) + "."
    )
    if strict:
        raise ValueError(message + " Pass the same g and h, or `strict=False` to load anyway.")
    warnings.warn(message + " Loaded anyway (strict=False): results may be meaningless.",
                  UserWarning, stacklevel=4)


def load_craft(cls, path, input_to_latent_model, latent_to_logit_model, *, model=None,
               strict=True):
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
    strict : bool, default=True
        Refuse g and h whose fingerprint (layer names, shapes, dtypes, weights) differs from
        the saved one; False loads with a warning.

    Returns
    -------
    CraftTf
        Its ``transform``, importances and maps equal the saved estimator's.
    """
    metadata = read_metadata(path)
    _check_metadata(metadata, os.path.join(os.fspath(path), METADATA_FILE))
    arrays_path = os.path.join(os.fspath(path), ARRAYS_FILE)
    arrays = load_npz(arrays_path)
    _check_arrays(arrays, metadata, arrays_path)
    _check_fingerprints(
        metadata,
        {"input_to_latent_model": input_to_latent_model,
         "latent_to_logit_model": latent_to_logit_model},
        path,
        strict,
    )
    craft = cls(input_to_latent_model, latent_to_logit_model, **metadata["params"])
    for name in _ARRAY_ATTRIBUTES + _OPTIONAL_ARRAYS:
        setattr(craft, name, arrays.get(name))
    craft.class_id_ = metadata["class_id"]
    craft.n_classes_ = metadata["n_classes"]
    craft.input_size_ = tuple(metadata["input_size"])
    # Not stored: the saved `cls_token` and `token_grid` with g's output shape give it again.
    craft.token_layout_ = craft._find_token_layout(craft.images_[:1])
    if model is not None:
        if metadata.get("source_logits"):
            # `from_model` explained the logits: split the given classifier the same way.
            model, _ = logits_model(model)
            craft._source_logits = True
        craft._source_model = model
    if metadata["layer"] is not None:
        craft._source_layer = metadata["layer"]
    if metadata.get("parent_concept_id") is not None:
        craft.parent_concept_id_ = metadata["parent_concept_id"]
    if metadata.get("refinement") is not None:
        craft.refinement_ = metadata["refinement"]
    craft.solver_ = metadata.get("solver_used") or craft.solver
    if craft.solver_ == "semi-nmf":
        nmf = SemiNMF(craft.number_of_concepts, max_iter=craft.max_iter, tol=craft.tol)
    else:
        nmf = NMF(craft.number_of_concepts, solver=craft.solver_, max_iter=craft.max_iter,
                  tol=craft.tol)
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
        craft.children_[concept_id] = load_craft(
            cls, child_path, g_child, h_child, model=model, strict=strict
        )
    return craft
