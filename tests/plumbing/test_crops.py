import numpy as np
import pytest

from xcraft.plumbing.crops import extract_crops, sample_crop_boxes


def test_random_boxes_are_inside_and_deterministic():
    boxes = sample_crop_boxes((30, 40), 7, 12, patches_per_image=5, random_state=3)
    again = sample_crop_boxes((30, 40), 7, 12, patches_per_image=5, random_state=3)
    other = sample_crop_boxes((30, 40), 7, 12, patches_per_image=5, random_state=4)
    np.testing.assert_array_equal(boxes, again)
    assert not np.array_equal(boxes, other)
    assert boxes.shape == (35, 4)
    np.testing.assert_array_equal(boxes[:, 0], np.repeat(np.arange(7), 5))
    assert boxes[:, 1].min() >= 0 and (boxes[:, 1] + boxes[:, 3]).max() <= 30
    assert boxes[:, 2].min() >= 0 and (boxes[:, 2] + boxes[:, 3]).max() <= 40


def test_grid_boxes_follow_xplique_stride():
    # 32 px image, 10 px patches, stride int(0.8 * 10) = 8: starts 0, 8, 16 (24 + 10 > 32).
    boxes = sample_crop_boxes((32, 32), 2, 10, strategy="grid")
    starts = sorted(set(boxes[:, 1].tolist()))
    assert starts == [0, 8, 16]
    assert len(boxes) == 2 * 9


def test_crops_are_the_pixels_of_their_boxes(rng):
    images = rng.uniform(size=(3, 20, 24, 2)).astype("float32")
    boxes = sample_crop_boxes((20, 24), 3, 8, patches_per_image=4, random_state=0)
    crops = extract_crops(images, boxes, (8, 8)).numpy()
    expected = np.stack([images[i, y : y + s, x : x + s] for i, y, x, s in boxes])
    np.testing.assert_allclose(crops, expected, atol=1e-6)


def test_crops_resize_to_model_input(rng):
    images = rng.uniform(size=(1, 16, 16, 3)).astype("float32")
    images[:] = 0.25
    crops = extract_crops(images, np.array([[0, 2, 3, 8]]), (32, 32)).numpy()
    assert crops.shape == (1, 32, 32, 3)
    np.testing.assert_allclose(crops, 0.25, atol=1e-6)  # resizing a constant keeps it


def test_patch_larger_than_image():
    message = r"`patch_size` must be <= the image size \(16×20\), got 24"
    with pytest.raises(ValueError, match=message):
        sample_crop_boxes((16, 20), 2, 24)


def test_unknown_strategy():
    with pytest.raises(ValueError, match=r"`crops` must be one of 'random', 'grid', got 'tiles'\."):
        sample_crop_boxes((16, 16), 2, 8, strategy="tiles")


def test_lazy_crops_index_like_an_array(rng):
    from xcraft.plumbing.crops import LazyCrops

    images = rng.uniform(size=(4, 20, 20, 3)).astype("float32")
    boxes = sample_crop_boxes((20, 20), 4, 10, patches_per_image=3, random_state=1)
    lazy = LazyCrops(images, boxes, (16, 16), batch_size=5)
    eager = extract_crops(images, boxes, (16, 16)).numpy()
    assert lazy.shape == eager.shape and len(lazy) == 12
    np.testing.assert_array_equal(np.asarray(lazy), eager)
    np.testing.assert_array_equal(lazy[3], eager[3])
    np.testing.assert_array_equal(lazy[[7, 1]], eager[[7, 1]])
    np.testing.assert_array_equal(lazy[2:9], eager[2:9])
    np.testing.assert_array_equal(lazy[eager.mean(axis=(1, 2, 3)) > 0.5],
                                  eager[eager.mean(axis=(1, 2, 3)) > 0.5])
    np.testing.assert_array_equal(lazy[1, :4, :4], eager[1, :4, :4])
    np.testing.assert_array_equal(np.stack(list(lazy)), eager)
