"""Hand large NumPy matrices to TensorFlow without copying them.

``tf.convert_to_tensor`` copies a NumPy array, and transiently needs twice its size: for the
crops' activations of a large fit (100 000 × 1 280 float32 is 0.5 GB) that copy sets the peak
memory. TensorFlow can instead adopt the array's buffer through DLPack, provided the buffer is
64-byte aligned (TF's CPU allocator alignment); :func:`aligned_empty` allocates such arrays.
"""

import numpy as np
import tensorflow as tf

__all__ = ["aligned_empty", "to_tensor"]

#: TensorFlow's CPU allocator alignment; DLPack buffers with less are refused (or crash).
ALIGNMENT = 64


def aligned_empty(shape, dtype=np.float32):
    """Return an uninitialised C-contiguous array whose data start on a 64-byte boundary."""
    dtype = np.dtype(dtype)
    size = int(np.prod(shape, dtype=np.int64))
    raw = np.empty(size * dtype.itemsize + ALIGNMENT, np.uint8)
    offset = (-raw.ctypes.data) % ALIGNMENT
    return raw[offset:offset + size * dtype.itemsize].view(dtype).reshape(shape)


def _adoptable(array):
    return (
        isinstance(array, np.ndarray)
        and array.dtype in (np.float32, np.float64)
        and array.flags.c_contiguous
        and array.size > 0
        and array.ctypes.data % ALIGNMENT == 0
        and hasattr(array, "__dlpack__")
    )


def to_tensor(array):
    """Return ``array`` as a tf.Tensor, sharing its memory when it can (see module docstring).

    The array must not be written to while the tensor is in use; xcraft's callers never do.
    Anything that cannot be shared (other dtypes, misaligned or strided arrays, tensors) goes
    through ``tf.convert_to_tensor``.
    """
    if _adoptable(array):
        try:
            return tf.experimental.dlpack.from_dlpack(array.__dlpack__())
        except (AttributeError, TypeError, ValueError, tf.errors.InvalidArgumentError):
            pass
    return tf.convert_to_tensor(array)
