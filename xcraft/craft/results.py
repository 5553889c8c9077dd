"""What a fitted ``CraftTf`` holds, under Xplique's names (``factorization``, ``sensitivity``).

Kept apart from the estimator so that ``io`` can rebuild the records without importing it.
"""

import dataclasses

import numpy as np

__all__ = ["Factorization", "Sensitivity", "concept_colours"]


@dataclasses.dataclass
class Factorization:
    """What ``fit`` produced, under Xplique's field names.

    Attributes
    ----------
    inputs : ndarray of shape (n_images, height, width, channels)
        The images the concepts were extracted from.
    class_id : int
        The explained class.
    crops : xcraft.plumbing.crops.LazyCrops, array-like of shape (n_crops, height, width, channels)
        The crops, resized to the model's input.
    reducer : xcraft.ops.nmf.NMF
        The fitted factorisation.
    crops_u : ndarray of shape (n_crops, n_concepts)
        The crops' concept coefficients U.
    concept_bank_w : ndarray of shape (n_concepts, n_channels)
        The concept bank W.
    """

    inputs: np.ndarray
    class_id: int
    crops: np.ndarray
    reducer: object
    crops_u: np.ndarray
    concept_bank_w: np.ndarray


@dataclasses.dataclass
class Sensitivity:
    """Global concept importances, under Xplique's field names.

    Attributes
    ----------
    importances : ndarray of shape (n_concepts,)
    most_important_concepts : ndarray of shape (n_concepts,)
        Concept ids sorted by decreasing importance.
    cmaps : list
        One matplotlib colour per concept, in the order of ``most_important_concepts``.
    intervals : ndarray of shape (2, n_concepts) or None
        Lower and upper bootstrap confidence bounds, when they were asked for.
    method : str
        The estimator that produced the importances.
    """

    importances: np.ndarray
    most_important_concepts: np.ndarray
    cmaps: list = dataclasses.field(default_factory=list)
    intervals: np.ndarray = None
    method: str = "sobol"


def concept_colours(n_concepts):
    """Distinct RGB colours for any number of concepts (Xplique runs out after 16)."""
    import colorsys

    golden = 0.61803398875  # golden-ratio hue steps keep neighbours far apart on the wheel
    return [
        colorsys.hls_to_rgb((i * golden) % 1.0, 0.5, 0.75 if i % 2 == 0 else 0.95)
        for i in range(n_concepts)
    ]
