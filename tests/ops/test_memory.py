"""Zero-copy hand-over of large matrices to TensorFlow (xcraft.ops._memory)."""

import numpy as np
import pytest

from xcraft.ops._memory import ALIGNMENT, aligned_empty, to_tensor


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("shape", [(1, 1), (7, 13), (300, 64)])
def test_aligned_arrays_start_on_the_boundary(shape, dtype):
    array = aligned_empty(shape, dtype)
    assert array.shape == shape and array.dtype == dtype and array.flags.c_contiguous
    assert array.ctypes.data % ALIGNMENT == 0


def test_an_aligned_array_is_shared_not_copied(rng):
    array = aligned_empty((50, 8))
    array[:] = rng.uniform(size=(50, 8))
    tensor = to_tensor(array)
    np.testing.assert_array_equal(tensor.numpy(), array)
    # The tensor reads the array's own buffer (no second copy): a write shows through.
    array[3, 4] = 123.0
    assert float(tensor[3, 4]) == 123.0


@pytest.mark.parametrize("make", [
    lambda rng: rng.uniform(size=(20, 9)).astype(np.float32)[:, 1:],   # strided
    lambda rng: aligned_empty((20, 9), np.float32).view(np.uint8)[:, 1:],  # odd dtype/offset
    lambda rng: np.arange(12, dtype=np.int64).reshape(3, 4),          # integers
], ids=["strided", "misaligned", "integers"])
def test_other_arrays_are_converted_as_usual(make, rng):
    array = make(rng)
    np.testing.assert_array_equal(to_tensor(array).numpy(), array)
