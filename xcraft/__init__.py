"""xcraft: CRAFT concept explanations for Keras/TensorFlow image classifiers.

``CraftTf`` and ``CraftManagerTf`` are drop-ins for Xplique's classes of the same names; the
stage modules (``xcraft.nmf``, ``xcraft.nnls``, ``xcraft.sobol``, ...) are usable on their own.
``xcraft.plots`` is imported explicitly so that ``import xcraft`` does not load matplotlib.

The public names are resolved on first use: ``import xcraft`` (and so ``xcraft --help``) does
not pay for importing TensorFlow until a name that needs it is touched.
"""

import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "CraftTf": "craft",
    "CraftManagerTf": "manager",
    "ConceptTree": "recursion",
    "split_model": "split",
    "solve_nnls": "nnls",
    "total_sobol_indices": "sobol",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'xcraft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
