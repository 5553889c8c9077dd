"""xcraft: CRAFT concept explanations for Keras/TensorFlow image classifiers.

The package has one folder per method on shared parts: ``xcraft.craft`` (CRAFT; ``CraftTf``
and ``CraftManagerTf`` are drop-ins for Xplique's classes of the same names), ``xcraft.afi`` and
``xcraft.coupled``, all built on ``xcraft.ops`` (NMF, NNLS, Sobol as TF ops, usable on their
own) and ``xcraft.plumbing`` (model splitting, crops, streamed activations). ``xcraft.viz``
draws; import it explicitly so that ``import xcraft`` does not load matplotlib.

The public names are resolved on first use: ``import xcraft`` (and so ``xcraft --help``) does
not pay for importing TensorFlow until a name that needs it is touched.
"""

import importlib
import os

__version__ = "0.1.0"

# TensorFlow greets every process with C++ INFO and WARNING lines (oneDNN, CUDA drivers not
# found, ...) that say nothing about the user's work. Quiet them unless the user chose a level.
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

_EXPORTS = {
    "CraftTf": "craft.estimator",
    "CraftManagerTf": "craft.manager",
    "ConceptTree": "craft.recursion",
    "split_model": "plumbing.split",
    "solve_nnls": "ops.nnls",
    "total_sobol_indices": "ops.sobol",
    "sweep": "craft.sweep",
    "explain_classes": "craft.runner",
    "load_run": "craft.runner",
    "AfI": "afi",
    "occluder_concept_importance": "afi",
    "CoupledNMF": "coupled",
}

__all__ = [*_EXPORTS, "__version__"]


def __getattr__(name):
    if name in _EXPORTS:
        import xcraft._tensorflow  # noqa: F401  TensorFlow's C++ start-up lines held back
        value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
        globals()[name] = value  # later look-ups skip this function
        return value
    raise AttributeError(f"module 'xcraft' has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_EXPORTS))
