"""Save and load a fitted :class:`~xcraft.coupled.CoupledNMF`: arrays in ``.npz``, JSON metadata.

The directory holds ``arrays.npz`` (F, every W_b, the history and, when the blocks' layout is
given, their index maps) and ``metadata.json`` (the parameters, the block names in order, their
weights and errors, and the layout: shapes, sources, channels, pooling). Never pickle. It is
written atomically (see :mod:`xcraft.plumbing.storage`): ``path`` holds either the old result
or the new one. Arrays are stored by block position (``components/0``, ...) so that any block
name, a nested layer path with ``/`` included, is safe; the JSON floats round-trip exactly, so a
loaded estimator equals the saved one bit for bit.
"""

import json
import os

import numpy as np

from xcraft import _validation as v
from xcraft.coupled.blocks import Blocks
from xcraft.plumbing.storage import (
    atomic_directory,
    json_default,
    library_versions,
    load_npz,
    read_result_metadata,
)

__all__ = ["FORMAT_VERSION", "save_coupled", "load_coupled"]

FORMAT_VERSION = 1
KIND = "CoupledNMF"
ARRAYS_FILE = "arrays.npz"
METADATA_FILE = "metadata.json"
OWN_NAMES = (ARRAYS_FILE, METADATA_FILE)


def _params(estimator):
    params = estimator.get_params(deep=False)
    if not isinstance(params.get("random_state"), (int, type(None))):
        params["random_state"] = None  # a Generator's state is not a parameter
    if isinstance(params.get("weights"), dict):
        params["weights"] = {str(k): float(w) for k, w in params["weights"].items()}
    return params


def save_coupled(estimator, path, *, blocks=None, overwrite=False):
    """Write a fitted ``CoupledNMF`` (and its blocks' layout) to the directory ``path``.

    Parameters
    ----------
    estimator : CoupledNMF
        Fitted.
    path : str or os.PathLike
        A new name, an empty directory or an earlier result (replaced atomically).
    blocks : Blocks, optional
        What :func:`~xcraft.coupled.build_blocks` returned for the fit: its layout and index
        maps are saved (not its arrays), so that the loaded components still trace back to
        channels and positions.
    overwrite : bool, default=False
        Write into a non-empty directory that is not a result (its files are kept).

    Raises
    ------
    NotFittedError
        If ``estimator`` is not fitted.
    ValueError
        If ``blocks`` does not describe the fitted blocks, or ``path`` cannot receive the result.
    """
    v.check_is_fitted(estimator, "examples_")
    names = list(estimator.components_)
    layout = None
    if blocks is not None:
        if not isinstance(blocks, Blocks):
            raise TypeError(
                f"`blocks` must be the Blocks returned by build_blocks, or None, got "
                f"{type(blocks).__name__}."
            )
        if list(blocks.shapes) != names:
            raise ValueError(
                f"`blocks` must describe the fitted blocks {names}, got {list(blocks.shapes)}."
            )
        maps = blocks.index_maps
        wrong = {n: len(maps[n]) for n in names if len(maps[n]) != estimator.n_features_in_[n]}
        if wrong:
            raise ValueError(
                f"`blocks` index maps must have one row per fitted column "
                f"({estimator.n_features_in_}), got {wrong}."
            )
        layout = blocks.layout()
    arrays = {"examples": np.asarray(estimator.examples_), "history": estimator.history_}
    for b, name in enumerate(names):
        arrays[f"components/{b}"] = np.asarray(estimator.components_[name])
        if layout is not None:
            arrays[f"index/{b}"] = maps[name]
    metadata = {
        "format_version": FORMAT_VERSION,
        "kind": KIND,
        "versions": library_versions(),
        "params": _params(estimator),
        "names": names,
        "weights": {n: float(estimator.weights_[n]) for n in names},
        "block_errors": {n: float(estimator.block_errors_[n]) for n in names},
        "n_features_in": {n: int(estimator.n_features_in_[n]) for n in names},
        "n_iter": int(estimator.n_iter_),
        "layout": layout,
    }
    with atomic_directory(path, marker=METADATA_FILE, own_names=OWN_NAMES,
                          overwrite=overwrite) as tmp:
        np.savez_compressed(os.path.join(tmp, ARRAYS_FILE), **arrays)
        with open(os.path.join(tmp, METADATA_FILE), "w", encoding="utf-8") as file:
            json.dump(metadata, file, indent=2, default=json_default, allow_nan=False)


def _fail(path, detail):
    raise ValueError(
        f"The result at {os.fspath(path)!r} is inconsistent: {detail}. It is corrupt or was "
        f"edited: save the estimator again."
    )


def _check_metadata(metadata, path):
    metadata_path = os.path.join(os.fspath(path), METADATA_FILE)
    if metadata.get("kind") != KIND:
        raise ValueError(
            f"`path` must be a CoupledNMF result, got {os.fspath(path)!r}, whose "
            f"{METADATA_FILE} describes a {metadata.get('kind')!r}."
        )
    names = metadata.get("names")
    if not isinstance(names, list) or not names or not all(isinstance(n, str) for n in names):
        _fail(path, f"{metadata_path} must list the block `names`, got {names!r}")
    for key in ("weights", "block_errors", "n_features_in"):
        value = metadata.get(key)
        if not isinstance(value, dict) or sorted(value) != sorted(names):
            _fail(path, f"`{key}` in {METADATA_FILE} must give one value per block {names}, "
                        f"got {value!r}")
    if not isinstance(metadata.get("params"), dict) or not isinstance(metadata.get("n_iter"),
                                                                      int):
        _fail(path, f"{METADATA_FILE} lacks `params` or `n_iter`")
    layout = metadata.get("layout")
    if layout is not None:
        keys = ("names", "shapes", "sources", "channels", "pool")
        if not isinstance(layout, dict) or any(k not in layout for k in keys) or (
                layout["names"] != names):
            _fail(path, f"the `layout` in {METADATA_FILE} must describe the blocks {names}")
    return names


def load_coupled(path):
    """Read an estimator written by :func:`save_coupled`.

    Parameters
    ----------
    path : str or os.PathLike

    Returns
    -------
    estimator : CoupledNMF
        Fitted: ``examples_``, ``components_``, ``weights_``, ``history_``,
        ``block_errors_``, ``n_iter_`` and ``n_features_in_`` equal the saved ones exactly.
    blocks : Blocks or None
        The blocks' layout (no arrays: ``shapes``, ``sources``, ``channels``, ``pool`` and
        ``index_map(name)``) when it was saved, else None.

    Raises
    ------
    ValueError
        If ``path`` is not a CoupledNMF result, is of a newer format, or its files are corrupt
        or do not agree with each other (the message names what).
    """
    from xcraft.coupled.estimator import CoupledNMF

    metadata = read_result_metadata(path, METADATA_FILE, FORMAT_VERSION,
                                    writer="`save_coupled`")
    names = _check_metadata(metadata, path)
    arrays = load_npz(os.path.join(os.fspath(path), ARRAYS_FILE))
    layout = metadata["layout"]
    wanted = ["examples", "history", *(f"components/{b}" for b in range(len(names)))]
    if layout is not None:
        wanted += [f"index/{b}" for b in range(len(names))]
    missing = [key for key in wanted if key not in arrays]
    if missing:
        _fail(path, f"{ARRAYS_FILE} lacks {missing}")
    examples = arrays["examples"]
    if examples.ndim != 2:
        _fail(path, f"`examples` must be 2-D, got shape {examples.shape}")
    d = examples.shape[1]
    components = {}
    for b, name in enumerate(names):
        w = arrays[f"components/{b}"]
        expected = (d, metadata["n_features_in"][name])
        if w.shape != expected:
            _fail(path, f"the components of block {name!r} must have shape {expected}, got "
                        f"{w.shape}")
        components[name] = w
    blocks = None
    if layout is not None:
        blocks = Blocks.from_layout(layout)
        for b, name in enumerate(names):
            if not np.array_equal(arrays[f"index/{b}"], blocks.index_map(name)):
                _fail(path, f"the saved index map of block {name!r} does not match its layout "
                            f"{layout['shapes'][name]}")
    params = dict(metadata["params"])
    try:
        estimator = CoupledNMF(**params)
    except TypeError as err:
        _fail(path, f"its parameters are not CoupledNMF's ({err})")
    if params.get("n_components") != d:
        _fail(path, f"`n_components` is {params.get('n_components')!r} but `examples` has {d} "
                    f"columns")
    estimator.examples_ = examples
    estimator.components_ = components
    estimator.weights_ = {n: float(metadata["weights"][n]) for n in names}
    estimator.history_ = arrays["history"]
    estimator.block_errors_ = {n: float(metadata["block_errors"][n]) for n in names}
    estimator.n_iter_ = int(metadata["n_iter"])
    estimator.n_features_in_ = {n: int(metadata["n_features_in"][n]) for n in names}
    return estimator, blocks
