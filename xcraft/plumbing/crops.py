"""Crop sampling: where the crops are (boxes) and how they are cut and resized (TF ops).

CRAFT factorises the activations of many small crops of a class's images: a crop shows one part of
the object, so a concept is a part rather than a whole image. Boxes are kept as integers
``(image_index, y, x, size)`` so that every crop can be traced back to its image, and crops are
cut on demand from the boxes, a batch at a time, so that no more than one batch of resized crops
is ever held in memory.
"""

import numpy as np

import xcraft._tensorflow  # noqa: F401  first: TensorFlow's C++ start-up lines held back

# isort: split
import tensorflow as tf

from xcraft._validation import check_choice, check_fraction, check_positive_int, check_random_state

__all__ = ["CROP_STRATEGIES", "sample_crop_boxes", "extract_crops", "LazyCrops"]

CROP_STRATEGIES = ("random", "grid")
GRID_STRIDE_FRACTION = 0.8  # Xplique's stride: 80 % of the patch size, so grid crops overlap


def _grid_starts(length, patch_size, stride):
    """Start offsets of a valid (no padding) sliding window of ``patch_size`` along ``length``."""
    return np.arange(0, length - patch_size + 1, stride)


def sample_crop_boxes(
    image_shape,
    n_images,
    patch_size,
    *,
    strategy="random",
    patches_per_image=10,
    stride_fraction=GRID_STRIDE_FRACTION,
    random_state=None,
):
    """Return the boxes of the crops to cut from ``n_images`` images.

    Parameters
    ----------
    image_shape : tuple of int
        ``(height, width)`` of the images.
    n_images : int
        Number of images.
    patch_size : int
        Side of the square crops, in pixels of the original images.
    strategy : {"random", "grid"}, default="random"
        ``"random"``: ``patches_per_image`` squares at uniformly random positions in each image
        (the paper). ``"grid"``: a sliding window with stride ``stride_fraction · patch_size``
        (what ``xplique.concepts.CraftTf`` does).
    patches_per_image : int, default=10
        Crops per image for ``"random"``.
    stride_fraction : float, default=0.8
        Stride of the ``"grid"`` window as a fraction of ``patch_size``.
    random_state : int, numpy.random.Generator or None, default=None
        Seed of the random positions.

    Returns
    -------
    boxes : ndarray of shape (n_crops, 4), int64
        One row ``(image_index, y, x, size)`` per crop, grouped by image.

    Raises
    ------
    ValueError
        If ``patch_size`` exceeds the images or a count is not positive.
    """
    strategy = check_choice(strategy, "crops", CROP_STRATEGIES)
    patch_size = check_positive_int(patch_size, "patch_size")
    n_images = check_positive_int(n_images, "n_images")
    height, width = (int(s) for s in image_shape)
    if patch_size > min(height, width):
        raise ValueError(
            f"`patch_size` must be <= the image size ({height}×{width}), got {patch_size}. "
            f"Use a smaller patch_size or larger images."
        )
    if strategy == "random":
        patches_per_image = check_positive_int(patches_per_image, "patches_per_image")
        rng = check_random_state(random_state)
        n_crops = n_images * patches_per_image
        ys = rng.integers(0, height - patch_size + 1, size=n_crops)
        xs = rng.integers(0, width - patch_size + 1, size=n_crops)
        image_index = np.repeat(np.arange(n_images), patches_per_image)
    else:
        stride_fraction = check_fraction(stride_fraction, "stride_fraction")
        stride = max(1, int(patch_size * stride_fraction))
        grid_y, grid_x = np.meshgrid(
            _grid_starts(height, patch_size, stride),
            _grid_starts(width, patch_size, stride),
            indexing="ij",
        )
        per_image = grid_y.size
        image_index = np.repeat(np.arange(n_images), per_image)
        ys = np.tile(grid_y.ravel(), n_images)
        xs = np.tile(grid_x.ravel(), n_images)
    sizes = np.full_like(ys, patch_size)
    return np.stack([image_index, ys, xs, sizes], axis=1).astype(np.int64)


def normalized_boxes(boxes, image_shape):
    """Turn integer boxes into ``tf.image.crop_and_resize`` coordinates.

    ``crop_and_resize`` samples the box corners at pixel centres, so a box covering pixels
    ``[y, y + size)`` spans ``y / (H - 1)`` to ``(y + size - 1) / (H - 1)``.
    """
    height, width = (int(s) for s in image_shape)
    boxes = np.asarray(boxes, dtype=np.float64)
    y0, x0, size = boxes[:, 1], boxes[:, 2], boxes[:, 3]
    scale_y, scale_x = max(height - 1, 1), max(width - 1, 1)
    coords = np.stack(
        [y0 / scale_y, x0 / scale_x, (y0 + size - 1) / scale_y, (x0 + size - 1) / scale_x], axis=1
    )
    return coords.astype(np.float32)  # (n_crops, 4)


def extract_crops(images, boxes, output_size):
    """Cut the crops described by ``boxes`` out of ``images`` and resize them (bilinear).

    Parameters
    ----------
    images : array-like of shape (n_images, height, width, channels)
    boxes : ndarray of shape (n_crops, 4)
        Rows ``(image_index, y, x, size)`` from :func:`sample_crop_boxes`.
    output_size : tuple of int
        ``(height, width)`` of the resized crops, usually the model's input size.

    Returns
    -------
    tf.Tensor of shape (n_crops, output_height, output_width, channels), float32
    """
    images = tf.convert_to_tensor(images, tf.float32)
    boxes = np.asarray(boxes)
    coords = normalized_boxes(boxes, images.shape[1:3])
    return tf.image.crop_and_resize(
        images,
        coords,
        tf.constant(boxes[:, 0], tf.int32),
        tuple(int(s) for s in output_size),
        method="bilinear",
    )


class LazyCrops:
    """The resized crops of a fit, cut from the images only when indexed.

    Xplique's ``fit`` returns every resized crop; at realistic sizes (100 000 crops of
    224 × 224 × 3) that is 60 GB. This array-like keeps only the images and the boxes and cuts
    what is asked for: ``crops[ids]``, slices, boolean masks and iteration work as on an array,
    and ``np.asarray(crops)`` materialises everything when that really is wanted.

    Parameters
    ----------
    images : ndarray of shape (n_images, height, width, channels)
    boxes : ndarray of shape (n_crops, 4)
    output_size : tuple of int
    batch_size : int, default=256
        Crops cut per TF call when many are asked for at once.
    """

    def __init__(self, images, boxes, output_size, batch_size=256):
        self.images = images
        self.boxes = np.asarray(boxes)
        self.output_size = tuple(int(s) for s in output_size)
        self.batch_size = batch_size

    @property
    def shape(self):
        return (len(self.boxes), *self.output_size, self.images.shape[-1])

    @property
    def ndim(self):
        return 4

    @property
    def dtype(self):
        return np.dtype(np.float32)

    def __len__(self):
        return len(self.boxes)

    def _cut(self, boxes):
        out = np.empty((len(boxes), *self.shape[1:]), np.float32)
        for start in range(0, len(boxes), self.batch_size):
            chunk = boxes[start : start + self.batch_size]
            out[start : start + len(chunk)] = extract_crops(
                self.images, chunk, self.output_size
            ).numpy()
        return out

    def __getitem__(self, index):
        if isinstance(index, tuple):
            first = self[index[0]]
            if isinstance(index[0], (int, np.integer)):
                return first[index[1:]]
            return first[(slice(None), *index[1:])]
        if isinstance(index, (int, np.integer)):
            return self._cut(self.boxes[[index]])[0]
        return self._cut(self.boxes[index])

    def __iter__(self):
        for start in range(0, len(self), self.batch_size):
            yield from self._cut(self.boxes[start : start + self.batch_size])

    def __array__(self, dtype=None, copy=None):
        crops = self._cut(self.boxes)
        return crops if dtype is None else crops.astype(dtype, copy=False)

    def __repr__(self):
        return f"LazyCrops(shape={self.shape})"
