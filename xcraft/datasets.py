"""The demo data and model that ship inside xcraft, so the demo and tutorials run offline.

The package holds, in ``xcraft/data``:

- ``fashion_mnist_subset.npz``: 2 000 images of the Fashion-MNIST *test* split, 200 per class,
  drawn at random (seed 0) within each class;
- ``fashion_mnist_cnn.keras``: a small Keras 3 CNN trained on the Fashion-MNIST *train* split
  (about 91 % top-1 on the test split), with named layers ``conv1``, ``conv2``, ``pool1``,
  ``conv3``, ``conv4``, ``pool2``, ``flatten``, ``fc1``, ``dropout``, ``logits``. It takes
  float images of shape (28, 28, 1) in [0, 1] and returns logits (no softmax);
- ``metadata.json``: the measured accuracy, the training settings, the seed and the versions.

The files are made by ``python -m xcraft._train_demo`` (see that module).

Data source and licence: Fashion-MNIST, Copyright (c) 2017 Zalando SE, MIT licence,
https://github.com/zalandoresearch/fashion-mnist (read from the Debian package
``dataset-fashion-mnist``). Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.
"""

import importlib.resources
import json

import numpy as np

from ._validation import check_choice

__all__ = [
    "DEMO_LAYER",
    "DEMO_EARLY_LAYER",
    "load_demo_data",
    "load_demo_model",
    "load_demo_metadata",
]

#: Layer of the demo model where CRAFT splits it: ``pool2``, activations (7, 7, 64), >= 0.
DEMO_LAYER = "pool2"
#: Earlier layer for recursive decomposition: ``pool1``, activations (14, 14, 32), >= 0.
DEMO_EARLY_LAYER = "pool1"

_MODEL_FILE = "fashion_mnist_cnn.keras"
_SUBSET_FILE = "fashion_mnist_subset.npz"
_METADATA_FILE = "metadata.json"
_SPLITS = ("test",)
_REGENERATE = (
    "Reinstall xcraft, or from a source checkout regenerate the files with "
    "`python -m xcraft._train_demo --source /usr/share/datasets/fashion-mnist --out xcraft/data`."
)


def _resource(filename):
    """Return the Traversable of a shipped data file, or raise if it is missing."""
    resource = importlib.resources.files("xcraft").joinpath("data", filename)
    if not resource.is_file():
        raise FileNotFoundError(
            f"The xcraft demo file `data/{filename}` is missing from the installed package "
            f"({resource}). {_REGENERATE}"
        )
    return resource


def load_demo_data(split="test"):
    """Load the shipped Fashion-MNIST demo images and labels.

    Parameters
    ----------
    split : {"test"}, default="test"
        Which split the images come from. Only a stratified subset of the test split ships
        (the demo model never saw it in training).

    Returns
    -------
    images : ndarray of shape (n_images, 28, 28, 1), dtype float32
        Gray images scaled to [0, 1], the input the demo model expects. ``n_images`` is 2000.
    labels : ndarray of shape (n_images,), dtype int64
        Class indices in ``range(10)``, sorted by class (200 images each).
    class_names : list of str
        The 10 Fashion-MNIST class names, ``class_names[label]``.

    Raises
    ------
    ValueError
        If ``split`` is not ``"test"``.
    FileNotFoundError
        If the data file is missing from the installation.

    Examples
    --------
    >>> from xcraft.datasets import load_demo_data
    >>> images, labels, class_names = load_demo_data()
    >>> images.shape, class_names[labels[0]]
    ((2000, 28, 28, 1), 'T-shirt/top')
    """
    check_choice(split, "split", _SPLITS)
    with _resource(_SUBSET_FILE).open("rb") as handle, np.load(handle) as archive:
        # uint8 (n, 28, 28) -> float32 (n, 28, 28, 1) in [0, 1]
        images = (archive["images"].astype(np.float32) / np.float32(255.0))[..., None]
        labels = archive["labels"].astype(np.int64)
        class_names = [str(name) for name in archive["class_names"]]
    return images, labels, class_names


def load_demo_model():
    """Load the shipped Fashion-MNIST demo CNN.

    Returns
    -------
    keras.Model
        A Functional model, uncompiled, mapping float32 images of shape (batch, 28, 28, 1) in
        [0, 1] to logits of shape (batch, 10). Split it at :data:`DEMO_LAYER` (``"pool2"``) for
        CRAFT and at :data:`DEMO_EARLY_LAYER` (``"pool1"``) for sub-concepts; both follow ReLU
        convolutions, so their activations are non-negative.

    Raises
    ------
    FileNotFoundError
        If the model file is missing from the installation.

    Examples
    --------
    >>> from xcraft.datasets import DEMO_LAYER, load_demo_model
    >>> model = load_demo_model()
    >>> model.get_layer(DEMO_LAYER).output.shape
    (None, 7, 7, 64)
    """
    import keras

    resource = _resource(_MODEL_FILE)
    # Keras needs a real path; as_file extracts one when the package lives in a zip.
    with importlib.resources.as_file(resource) as path:
        return keras.models.load_model(path, compile=False)


def load_demo_metadata():
    """Load the record of how the demo model and data were made.

    Returns
    -------
    dict
        Parsed ``metadata.json``: ``subset["accuracy"]`` (the model's top-1 accuracy on the
        shipped images), ``test_accuracy_full``, ``training`` settings, ``seed``, ``source``
        (dataset, licence) and library ``versions``.

    Raises
    ------
    FileNotFoundError
        If the metadata file is missing from the installation.
    """
    with _resource(_METADATA_FILE).open("r", encoding="utf-8") as handle:
        return json.load(handle)
