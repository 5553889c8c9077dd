"""File plumbing shared by every method's save/load: atomic directories, JSON, versions.

Every fitted estimator of every method is saved as a directory of ``.npz`` arrays and JSON
metadata, never pickle. The helpers here are what those savers share; each method's ``io``
module decides what goes into its files.
"""

import json
import os
import shutil
import tempfile

import numpy as np

__all__ = ["atomic_directory", "json_default", "library_versions", "read_json"]


def library_versions():
    """Return the versions of xcraft and of the libraries a saved result depends on."""
    import keras
    import tensorflow as tf

    from xcraft import __version__

    return {
        "xcraft": __version__,
        "tensorflow": tf.__version__,
        "keras": keras.__version__,
        "numpy": np.__version__,
    }


class atomic_directory:  # noqa: N801 - used as a context manager, reads like `open`
    """Context manager yielding a temporary directory that replaces ``path`` on success.

    On an exception the temporary directory is removed and ``path`` is left as it was.
    """

    def __init__(self, path):
        self.path = os.path.abspath(os.fspath(path))

    def __enter__(self):
        parent = os.path.dirname(self.path)
        os.makedirs(parent, exist_ok=True)
        self.tmp = tempfile.mkdtemp(prefix=f".{os.path.basename(self.path)}.tmp-", dir=parent)
        return self.tmp

    def __exit__(self, exc_type, exc, traceback):
        if exc_type is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            return False
        backup = None
        if os.path.lexists(self.path):
            if not os.path.isdir(self.path):
                shutil.rmtree(self.tmp, ignore_errors=True)
                raise ValueError(
                    f"`path` must be a directory or a new name, got the existing file "
                    f"{self.path!r}."
                )
            backup = f"{self.tmp}.old"
            os.replace(self.path, backup)
        os.replace(self.tmp, self.path)
        if backup is not None:
            shutil.rmtree(backup, ignore_errors=True)
        return False


def json_default(value):
    """Convert NumPy scalars and arrays for ``json.dump`` (its ``default`` hook)."""
    if isinstance(value, np.integer):
        return int(value)
    if isinstance(value, np.floating):
        return float(value)
    if isinstance(value, np.ndarray):
        return value.tolist()
    raise TypeError(f"cannot store {type(value).__name__} in JSON")


def read_json(path):
    """Read a JSON object from ``path``, naming the file in every error.

    Raises
    ------
    ValueError
        If the file is missing, is not valid JSON or does not hold a JSON object.
    """
    path = os.fspath(path)
    if not os.path.isfile(path):
        raise ValueError(f"Expected the file {path!r}, which does not exist.")
    try:
        with open(path, encoding="utf-8") as file:
            value = json.load(file)
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"The file {path!r} is not valid JSON ({err}).") from err
    if not isinstance(value, dict):
        raise ValueError(
            f"The file {path!r} must hold a JSON object, got a {type(value).__name__}."
        )
    return value
