r"""Train the demo Fashion-MNIST CNN and write the files shipped in ``xcraft/data``.

This is a maintainer's script, not part of the library: the package ships its output so that
``xcraft demo`` and the tutorials run offline. Regenerate the files with::

    apt-get install dataset-fashion-mnist
    python -m xcraft._train_demo --source /usr/share/datasets/fashion-mnist \
        --out xcraft/data --seed 0

Outputs
-------
``fashion_mnist_cnn.keras``
    A small Keras 3 Functional CNN mapping images of shape (28, 28, 1) in [0, 1] to 10 logits
    (no softmax: CRAFT explains logits). Its layers are named so that ``xcraft`` can split it:
    ``conv1``, ``conv2``, ``pool1`` (14x14x32), ``conv3``, ``conv4``, ``pool2`` (7x7x64),
    ``flatten``, ``fc1``, ``dropout``, ``logits``. Both pooling layers follow ReLU convolutions,
    so their activations are non-negative, as NMF requires. Saved without optimizer state.
``fashion_mnist_subset.npz``
    A class-stratified subset of the Fashion-MNIST *test* split (never seen in training):
    ``images`` uint8 (n, 28, 28), ``labels`` uint8 (n,), ``class_names`` str (10,),
    ``source_indices`` uint16 (n,) (positions in the original test split).
``metadata.json``
    The measured accuracy of the model on the subset and on the full test split, the training
    settings, the seed, the data source and the library versions.

Data source and licence
-----------------------
Fashion-MNIST, Copyright (c) 2017 Zalando SE, released under the MIT licence
(https://github.com/zalandoresearch/fashion-mnist), read from the Debian package
``dataset-fashion-mnist``. Xiao, Rasul and Vollgraf, "Fashion-MNIST: a Novel Image Dataset for
Benchmarking Machine Learning Algorithms", arXiv:1708.07747, 2017.

Notes
-----
The script seeds Python, NumPy and TensorFlow globally and turns on TF op determinism: it is a
stand-alone program, so this does not leak into a user's session (the library itself never
touches global seeds).
"""

import argparse
import gzip
import json
import pathlib
import platform
import struct
import sys
import time

import numpy as np

CLASS_NAMES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
N_CLASSES = len(CLASS_NAMES)
IMAGE_SHAPE = (28, 28, 1)
MODEL_FILE = "fashion_mnist_cnn.keras"
SUBSET_FILE = "fashion_mnist_subset.npz"
METADATA_FILE = "metadata.json"

# The Expat (MIT) notice of Fashion-MNIST, which must travel with the images we ship.
LICENCE_TEXT = (
    "Copyright (c) 2017 Zalando SE\n\n"
    "Permission is hereby granted, free of charge, to any person obtaining a copy of this "
    "software and associated documentation files (the \"Software\"), to deal in the Software "
    "without restriction, including without limitation the rights to use, copy, modify, merge, "
    "publish, distribute, sublicense, and/or sell copies of the Software, and to permit persons "
    "to whom the Software is furnished to do so, subject to the following conditions:\n\n"
    "The above copyright notice and this permission notice shall be included in all copies or "
    "substantial portions of the Software.\n\n"
    "THE SOFTWARE IS PROVIDED \"AS IS\", WITHOUT WARRANTY OF ANY KIND, EXPRESS OR IMPLIED, "
    "INCLUDING BUT NOT LIMITED TO THE WARRANTIES OF MERCHANTABILITY, FITNESS FOR A PARTICULAR "
    "PURPOSE AND NONINFRINGEMENT. IN NO EVENT SHALL THE AUTHORS OR COPYRIGHT HOLDERS BE LIABLE "
    "FOR ANY CLAIM, DAMAGES OR OTHER LIABILITY, WHETHER IN AN ACTION OF CONTRACT, TORT OR "
    "OTHERWISE, ARISING FROM, OUT OF OR IN CONNECTION WITH THE SOFTWARE OR THE USE OR OTHER "
    "DEALINGS IN THE SOFTWARE.\n"
)

_IDX_FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
_IDX_UINT8 = 0x08  # idx type code of unsigned bytes, the only one Fashion-MNIST uses


def read_idx(path):
    """Read an idx file (optionally gzip'd) of unsigned bytes.

    The idx format is a 4-byte magic number (two zero bytes, a type code, the number of
    dimensions), then each dimension as a big-endian uint32, then the data in C order.

    Parameters
    ----------
    path : str or pathlib.Path
        The file; a name ending in ``.gz`` is decompressed.

    Returns
    -------
    ndarray of dtype uint8
        The array with the shape the header gives.

    Raises
    ------
    ValueError
        If the header is malformed, the type is not uint8 or the data has the wrong length.
    """
    path = pathlib.Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as handle:
        raw = handle.read()
    if len(raw) < 4:
        raise ValueError(f"`path` must be an idx file, got {len(raw)} bytes in {path}.")
    zero, type_code, ndim = struct.unpack(">HBB", raw[:4])
    if zero != 0 or type_code != _IDX_UINT8:
        raise ValueError(
            f"`path` must be an idx file of uint8 (magic 0x0000{_IDX_UINT8:02x}..), "
            f"got magic 0x{raw[:4].hex()} in {path}."
        )
    header_size = 4 + 4 * ndim
    shape = struct.unpack(f">{ndim}I", raw[4:header_size])
    n_values = int(np.prod(shape))
    if len(raw) - header_size != n_values:
        raise ValueError(
            f"`path` must hold {n_values} values for shape {shape}, "
            f"got {len(raw) - header_size} bytes of data in {path}."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header_size).reshape(shape)


def load_fashion_mnist(source, split):
    """Return ``(images, labels)`` of one split, uint8 of shapes (n, 28, 28) and (n,)."""
    source = pathlib.Path(source)
    arrays = []
    for stem in _IDX_FILES[split]:
        candidates = [source / f"{stem}.gz", source / stem]
        found = [p for p in candidates if p.exists()]
        if not found:
            raise FileNotFoundError(
                f"Fashion-MNIST file {stem}[.gz] not found in {source}. "
                f"Install it with `apt-get install dataset-fashion-mnist`."
            )
        arrays.append(read_idx(found[0]))
    images, labels = arrays
    if images.shape[1:] != IMAGE_SHAPE[:2] or images.shape[0] != labels.shape[0]:
        raise ValueError(
            f"Fashion-MNIST {split} split must have images (n, 28, 28) and labels (n,), "
            f"got {images.shape} and {labels.shape}."
        )
    return images, labels


def stratified_indices(labels, n_per_class, rng):
    """Draw ``n_per_class`` indices of each label without replacement, sorted by label."""
    picks = []
    for label in np.unique(labels):
        members = np.flatnonzero(labels == label)
        if members.size < n_per_class:
            raise ValueError(
                f"`n_per_class` must be <= {members.size} (members of class {label}), "
                f"got {n_per_class}."
            )
        picks.append(np.sort(rng.choice(members, size=n_per_class, replace=False)))
    return np.concatenate(picks)


def build_model(n_classes=N_CLASSES, fc_units=32, dropout=0.3):
    """Build the demo CNN (Functional, named layers, logits output).

    Parameters
    ----------
    n_classes : int, default=10
        Number of logits.
    fc_units : int, default=32
        Width of the hidden dense layer of the head.
    dropout : float, default=0.3
        Dropout rate before the logits (inactive at inference).

    Returns
    -------
    keras.Model
        Input (28, 28, 1) float in [0, 1], output (n_classes,) logits.
    """
    import keras

    inputs = keras.Input(shape=IMAGE_SHAPE, name="image")
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(32, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)  # (14, 14, 32), >= 0
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv4")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)  # (7, 7, 64), >= 0: the CRAFT split
    # The head needs nothing but the pool2 activations, so h(pool2) reproduces the model.
    x = keras.layers.Flatten(name="flatten")(x)  # (3136,)
    x = keras.layers.Dense(fc_units, activation="relu", name="fc1")(x)
    x = keras.layers.Dropout(dropout, name="dropout")(x)
    outputs = keras.layers.Dense(n_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="fashion_mnist_cnn")


def to_model_input(images):
    """Map uint8 images (n, 28, 28) to float32 (n, 28, 28, 1) in [0, 1]."""
    return (images.astype(np.float32) / 255.0)[..., None]


def accuracy(model, images, labels, batch_size=500):
    """Top-1 accuracy of ``model`` on uint8 ``images`` (n, 28, 28)."""
    logits = model.predict(to_model_input(images), batch_size=batch_size, verbose=0)
    return float(np.mean(np.argmax(logits, axis=1) == labels))


def _parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m xcraft._train_demo",
        description="Train the xcraft demo Fashion-MNIST CNN and write xcraft/data.",
    )
    parser.add_argument("--source", default="/usr/share/datasets/fashion-mnist",
                        help="folder with the Fashion-MNIST idx files")
    parser.add_argument("--out", default="xcraft/data", help="output folder")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--epochs", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--learning-rate", type=float, default=2e-3)
    parser.add_argument("--n-train", type=int, default=60000,
                        help="number of training images (a random subset if < 60000)")
    parser.add_argument("--fc-units", type=int, default=32)
    parser.add_argument("--dropout", type=float, default=0.3)
    parser.add_argument("--n-per-class", type=int, default=200,
                        help="test images per class in the shipped subset")
    return parser.parse_args(argv)


def main(argv=None):
    """Train, evaluate and write the demo files; return the metadata dict."""
    args = _parse_args(argv)
    import keras
    import tensorflow as tf

    keras.utils.set_random_seed(args.seed)
    tf.config.experimental.enable_op_determinism()
    rng = np.random.default_rng(args.seed)
    out = pathlib.Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    train_images, train_labels = load_fashion_mnist(args.source, "train")
    test_images, test_labels = load_fashion_mnist(args.source, "test")
    if args.n_train < train_images.shape[0]:
        keep = np.sort(rng.choice(train_images.shape[0], size=args.n_train, replace=False))
        train_images, train_labels = train_images[keep], train_labels[keep]

    model = build_model(fc_units=args.fc_units, dropout=args.dropout)
    steps = args.epochs * int(np.ceil(train_images.shape[0] / args.batch_size))
    # Cosine decay reaches a good optimum in few epochs, which keeps training to minutes on CPU.
    schedule = keras.optimizers.schedules.CosineDecay(args.learning_rate, decay_steps=steps)
    model.compile(
        optimizer=keras.optimizers.Adam(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    start = time.perf_counter()
    model.fit(to_model_input(train_images), train_labels.astype(np.int64),
              batch_size=args.batch_size, epochs=args.epochs, shuffle=True, verbose=2)
    train_seconds = time.perf_counter() - start

    # Save an uncompiled copy: the Adam moments would triple the file for nothing.
    shipped = build_model(fc_units=args.fc_units, dropout=args.dropout)
    shipped.set_weights(model.get_weights())
    shipped.save(out / MODEL_FILE)

    subset = stratified_indices(test_labels, args.n_per_class, rng)
    np.savez_compressed(
        out / SUBSET_FILE,
        images=test_images[subset],
        labels=test_labels[subset],
        class_names=np.array(CLASS_NAMES),
        source_indices=subset.astype(np.uint16),
    )

    reloaded = keras.models.load_model(out / MODEL_FILE, compile=False)
    metadata = {
        "description": "xcraft demo: small CNN trained on Fashion-MNIST, and a stratified "
                       "subset of the Fashion-MNIST test split",
        "files": {"model": MODEL_FILE, "subset": SUBSET_FILE},
        "class_names": list(CLASS_NAMES),
        "input": {"shape": list(IMAGE_SHAPE), "dtype": "float32", "range": [0.0, 1.0],
                  "preprocessing": "uint8 / 255"},
        "output": "logits (no softmax)",
        "layers": {"demo_layer": "pool2", "demo_early_layer": "pool1"},
        "subset": {
            "split": "test",
            "n_per_class": args.n_per_class,
            "n_images": int(subset.size),
            "accuracy": accuracy(reloaded, test_images[subset], test_labels[subset]),
        },
        "test_accuracy_full": accuracy(reloaded, test_images, test_labels),
        "training": {
            "n_train": int(train_images.shape[0]),
            "epochs": args.epochs,
            "batch_size": args.batch_size,
            "optimizer": "Adam",
            "learning_rate": args.learning_rate,
            "schedule": "cosine decay to 0",
            "loss": "sparse categorical cross-entropy on logits",
            "fc_units": args.fc_units,
            "dropout": args.dropout,
            "seconds": round(train_seconds, 1),
            "n_params": int(shipped.count_params()),
        },
        "seed": args.seed,
        "source": {
            "dataset": "Fashion-MNIST",
            "url": "https://github.com/zalandoresearch/fashion-mnist",
            "debian_package": "dataset-fashion-mnist",
            "licence": "MIT (Expat), Copyright (c) 2017 Zalando SE",
            "licence_text": LICENCE_TEXT,
            "citation": "Xiao, Rasul and Vollgraf, Fashion-MNIST: a Novel Image Dataset for "
                        "Benchmarking Machine Learning Algorithms, arXiv:1708.07747, 2017",
        },
        "versions": {
            "python": platform.python_version(),
            "numpy": np.__version__,
            "tensorflow": tf.__version__,
            "keras": keras.__version__,
        },
        "command": "python -m xcraft._train_demo " + " ".join(sys.argv[1:] if argv is None
                                                            else argv),
    }
    with open(out / METADATA_FILE, "w", encoding="utf-8") as handle:
        json.dump(metadata, handle, indent=2)
        handle.write("\n")
    print(json.dumps({"subset_accuracy": metadata["subset"]["accuracy"],
                      "test_accuracy_full": metadata["test_accuracy_full"],
                      "train_seconds": metadata["training"]["seconds"]}))
    return metadata


if __name__ == "__main__":
    main()
