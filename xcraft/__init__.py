"""xcraft: CRAFT concept explanations for Keras/TensorFlow image classifiers.

``CraftTf`` and ``CraftManagerTf`` are drop-ins for Xplique's classes of the same names; the
stage modules (``xcraft.nmf``, ``xcraft.nnls``, ``xcraft.sobol``, ...) are usable on their own.
``xcraft.plots`` is imported explicitly so that ``import xcraft`` does not load matplotlib.
"""

__version__ = "0.1.0"

from .craft import CraftTf  # noqa: E402
from .manager import CraftManagerTf  # noqa: E402
from .nnls import solve_nnls  # noqa: E402
from .recursion import ConceptTree  # noqa: E402
from .sobol import total_sobol_indices  # noqa: E402
from .split import split_model  # noqa: E402

__all__ = [
    "CraftTf",
    "CraftManagerTf",
    "ConceptTree",
    "split_model",
    "solve_nnls",
    "total_sobol_indices",
    "__version__",
]
