"""Input checks shared by the public entry points.

Every message reads "`name` must be <expected>, got <actual>." so that users see both what they
gave and what was wanted. Checks raise ``TypeError`` for a wrong type and ``ValueError`` for a
wrong value, shape or range; they never use ``assert`` (stripped by ``python -O``).
"""

import numbers

import numpy as np
from sklearn.exceptions import NotFittedError

__all__ = [
    "NotFittedError",
    "check_positive_int",
    "check_nonnegative_int",
    "check_fraction",
    "check_choice",
    "check_images",
    "check_matrix",
    "check_random_state",
    "check_is_fitted",
    "check_index",
]


def check_positive_int(value, name):
    """Return ``value`` as an int after checking it is an integer >= 1."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 1:
        raise ValueError(f"`{name}` must be >= 1, got {value}.")
    return int(value)


def check_index(value, name, size, detail=""):
    """Return ``value`` as an int after checking it indexes ``size`` items (0 <= value < size).

    ``detail`` is added inside the range message, e.g. " (the model has 10 outputs)".
    """
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if not 0 <= value < size:
        raise ValueError(f"`{name}` must be in [0, {size - 1}]{detail}, got {value}.")
    return int(value)


def check_nonnegative_int(value, name):
    """Return ``value`` as an int after checking it is an integer >= 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return int(value)


def check_fraction(value, name, *, low=0.0, high=1.0, inclusive_low=False):
    """Return ``value`` as a float after checking it lies in (low, high] (or [low, high])."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"`{name}` must be a float, got {type(value).__name__} {value!r}.")
    value = float(value)
    low_ok = value >= low if inclusive_low else value > low
    if not (low_ok and value <= high and np.isfinite(value)):
        bracket = "[" if inclusive_low else "("
        raise ValueError(f"`{name}` must be in {bracket}{low}, {high}], got {value}.")
    return value


def check_choice(value, name, choices):
    """Return ``value`` after checking it is one of ``choices``."""
    if not isinstance(value, str) or value not in choices:
        listed = ", ".join(repr(c) for c in choices)
        raise ValueError(f"`{name}` must be one of {listed}, got {value!r}.")
    return value


def check_images(images, name="images", *, allow_integers=True):
    """Return ``images`` as a float32 array of shape (batch, height, width, channels).

    Raises
    ------
    TypeError
        If ``images`` is not array-like of numbers.
    ValueError
        If it is not 4-D, is empty, or holds NaN or infinite values.
    """
    if hasattr(images, "numpy") and callable(images.numpy):
        images = images.numpy()
    try:
        array = np.asarray(images)
    except (TypeError, ValueError) as err:
        raise TypeError(
            f"`{name}` must be an array of shape (batch, height, width, channels), "
            f"got {type(images).__name__}."
        ) from err
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating)
        or (allow_integers and np.issubdtype(array.dtype, np.integer))
        or np.issubdtype(array.dtype, np.bool_)
    ):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
    if array.ndim != 4:
        hint = " For a single image pass `images[None]`." if array.ndim == 3 else ""
        raise ValueError(
            f"`{name}` must have shape (batch, height, width, channels), "
            f"got shape {array.shape}.{hint}"
        )
    if array.shape[0] == 0:
        raise ValueError(f"`{name}` must hold at least one image, got shape {array.shape}.")
    array = array.astype(np.float32, copy=False)
    if not np.all(np.isfinite(array)):
        n_bad = int(np.sum(~np.isfinite(array)))
        raise ValueError(
            f"`{name}` must be finite, got {n_bad} NaN or infinite values. "
            f"Clean or re-normalise the images first."
        )
    return array


def check_matrix(matrix, name, *, ndim=2, nonnegative=False, dtype=None):
    """Return ``matrix`` as a finite NumPy array with ``ndim`` dimensions."""
    if hasattr(matrix, "numpy") and callable(matrix.numpy):
        matrix = matrix.numpy()
    array = np.asarray(matrix)
    if array.dtype == object or not (
        np.issubdtype(array.dtype, np.floating) or np.issubdtype(array.dtype, np.integer)
    ):
        raise TypeError(f"`{name}` must hold real numbers, got dtype {array.dtype}.")
    if array.ndim != ndim:
        raise ValueError(f"`{name}` must be {ndim}-D, got shape {array.shape}.")
    if dtype is not None:
        array = array.astype(dtype, copy=False)
    if not np.all(np.isfinite(array)):
        raise ValueError(f"`{name}` must be finite, got NaN or infinite values.")
    if nonnegative and array.size and array.min() < 0:
        raise ValueError(f"`{name}` must be non-negative, got a minimum of {array.min():.4g}.")
    return array


def check_random_state(random_state):
    """Turn ``random_state`` (None, int or ``np.random.Generator``) into a Generator."""
    if random_state is None or isinstance(random_state, np.random.Generator):
        return np.random.default_rng(random_state)
    if isinstance(random_state, bool) or not isinstance(random_state, numbers.Integral):
        raise TypeError(
            "`random_state` must be None, an int or a numpy.random.Generator, "
            f"got {type(random_state).__name__} {random_state!r}."
        )
    if random_state < 0:
        raise ValueError(f"`random_state` must be a non-negative int, got {random_state}.")
    return np.random.default_rng(int(random_state))


def check_is_fitted(estimator, attributes):
    """Raise ``NotFittedError`` unless every attribute in ``attributes`` is set."""
    if isinstance(attributes, str):
        attributes = [attributes]
    if any(getattr(estimator, attr, None) is None for attr in attributes):
        name = type(estimator).__name__
        raise NotFittedError(
            f"This {name} instance is not fitted yet. Call `fit` with images of the class "
            f"before using this method."
        )
