"""Planted-motif datasets and small classifiers trained on them, for ``bench/faithfulness.py``.

Every image is a smooth random background with drawn motifs (a shape, a colour and a texture)
pasted on it. Each class is defined by its motifs: some always occur together (co-occurring),
some stand in for each other (exclusive: exactly one of a group). Every image also carries
distractors: motifs of *other* classes, which are evidence against its own class. The generator
keeps what a benchmark needs as ground truth: each motif's pixel mask in each image, and the
background before any motif was drawn, so a motif can be removed from an image exactly.

The datasets and architectures are ours and deliberately unlike the test fixtures of
``tests/``: two image sizes (64 and 96 px), solid and textured motifs of varying sizes, a plain
CNN and one with residual blocks. Trained models are cached (``XCRAFT_BENCH_CACHE``, default
``~/.cache/xcraft-bench``), keyed by a hash of everything that defines them.
"""

import hashlib
import json
import os
from pathlib import Path

import numpy as np

GENERATOR_VERSION = 1

COLOURS = {
    "red": (0.9, 0.1, 0.1), "blue": (0.1, 0.2, 0.9), "green": (0.1, 0.75, 0.2),
    "yellow": (0.95, 0.85, 0.1), "magenta": (0.85, 0.1, 0.8), "cyan": (0.1, 0.85, 0.85),
    "white": (0.97, 0.97, 0.97), "orange": (1.0, 0.5, 0.0), "black": (0.05, 0.05, 0.05),
    "purple": (0.45, 0.1, 0.6),
}

# name -> (shape, colour, texture)
SHAPES64 = {
    "size": 64,
    "motif_size": (12, 18),
    "n_distractors": 1,
    "motifs": {
        "red disc": ("disc", "red", "solid"),
        "blue square": ("square", "blue", "solid"),
        "green triangle": ("triangle", "green", "solid"),
        "yellow cross": ("cross", "yellow", "solid"),
        "magenta ring": ("ring", "magenta", "solid"),
        "cyan bar": ("bar", "cyan", "solid"),
        "white diamond": ("diamond", "white", "solid"),
        "orange square": ("square", "orange", "solid"),
    },
    # class -> list of groups; a group of one motif is always present, a group of several
    # contributes exactly one of them (exclusive alternatives).
    "classes": [
        [["red disc"], ["blue square"]],
        [["green triangle"], ["yellow cross"]],
        [["magenta ring"], ["cyan bar"]],
        [["white diamond"], ["orange square"]],
    ],
}

TEXTURES96 = {
    "size": 96,
    "motif_size": (16, 32),
    "n_distractors": 1,
    "motifs": {
        "red stripes": ("square", "red", "stripes"),
        "blue checker disc": ("disc", "blue", "checker"),
        "green ring": ("ring", "green", "solid"),
        "yellow stripes triangle": ("triangle", "yellow", "stripes"),
        "purple checker": ("square", "purple", "checker"),
        "cyan disc": ("disc", "cyan", "solid"),
        "orange cross": ("cross", "orange", "stripes"),
        "white bar": ("bar", "white", "checker"),
    },
    "classes": [
        [["red stripes"], ["blue checker disc", "green ring"]],
        [["yellow stripes triangle"], ["purple checker"]],
        [["cyan disc"], ["orange cross", "white bar"]],
    ],
}

DATASETS = {"shapes64": SHAPES64, "textures96": TEXTURES96}


def shape_mask(shape, size):
    """Boolean (size, size) mask of a shape filling its box."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    c = (size - 1) / 2.0
    r = size / 2.0
    dy, dx = yy - c, xx - c
    if shape == "disc":
        return dy**2 + dx**2 <= r**2
    if shape == "ring":
        d2 = dy**2 + dx**2
        return (d2 <= r**2) & (d2 >= (0.55 * r) ** 2)
    if shape == "square":
        return np.ones((size, size), bool)
    if shape == "triangle":  # apex up
        return (yy >= 0) & (np.abs(dx) <= (yy + 1) / 2.0)
    if shape == "cross":
        arm = max(2.0, size / 6.0)
        return (np.abs(dy) <= arm) | (np.abs(dx) <= arm)
    if shape == "diamond":
        return np.abs(dy) + np.abs(dx) <= r
    if shape == "bar":  # a horizontal bar, a third of the box high
        return np.abs(dy) <= size / 6.0
    raise ValueError(f"unknown shape {shape!r}")


def texture(kind, size, colour, rng):
    """(size, size, 3) texture of a motif."""
    base = np.broadcast_to(np.asarray(colour, np.float32), (size, size, 3)).copy()
    if kind == "solid":
        return base
    yy, xx = np.mgrid[0:size, 0:size]
    period = max(3, size // 5)
    phase = int(rng.integers(period))
    if kind == "stripes":
        dark = ((xx + yy + phase) // max(2, period // 2)) % 2 == 1
    elif kind == "checker":
        dark = ((yy // period) + (xx + phase) // period) % 2 == 1
    else:
        raise ValueError(f"unknown texture {kind!r}")
    base[dark] *= 0.35
    return base


def background(size, rng):
    """Smooth coloured noise in about [0.2, 0.8], with fine pixel noise."""
    coarse = rng.uniform(0.2, 0.8, size=(5, 5, 3))
    # Bilinear upsampling of the coarse grid, in NumPy so the generator needs no TensorFlow.
    positions = np.linspace(0, 4, size)
    low = np.floor(positions).astype(int).clip(0, 3)
    frac = positions - low
    rows = coarse[low] * (1 - frac)[:, None, None] + coarse[low + 1] * frac[:, None, None]
    image = rows[:, low] * (1 - frac)[None, :, None] + rows[:, low + 1] * frac[None, :, None]
    image = image + rng.normal(0, 0.03, size=image.shape)
    return np.clip(image, 0, 1).astype(np.float32)


def _place(size, motif_size, taken, rng, tries=60):
    """Top-left corner for a motif box not overlapping the boxes in ``taken``."""
    for _ in range(tries):
        y, x = (int(v) for v in rng.integers(0, size - motif_size + 1, size=2))
        if all(y + motif_size <= ty or ty + ts <= y or x + motif_size <= tx or tx + ts <= x
               for ty, tx, ts in taken):
            return y, x
    return None


def make_dataset(spec, n_per_class, random_state=0):
    """Images of every class of ``spec`` with their motifs' masks and backgrounds.

    Returns
    -------
    dict with
        ``images`` (n, S, S, 3) float32 in [0, 1]; ``labels`` (n,) int;
        ``backgrounds`` (n, S, S, 3): each image before any motif was drawn;
        ``masks`` dict motif name -> (n, S, S) bool (all False where absent);
        ``motif_names`` list in the spec's order.
    """
    rng = np.random.default_rng(random_state)
    size = spec["size"]
    names = list(spec["motifs"])
    n_classes = len(spec["classes"])
    n = n_per_class * n_classes
    images = np.empty((n, size, size, 3), np.float32)
    backgrounds = np.empty_like(images)
    masks = {name: np.zeros((n, size, size), bool) for name in names}
    labels = np.repeat(np.arange(n_classes), n_per_class)
    low, high = spec["motif_size"]
    for i, label in enumerate(labels):
        image = background(size, rng)
        backgrounds[i] = image
        chosen = [group[int(rng.integers(len(group)))] for group in spec["classes"][label]]
        others = [m for c, groups in enumerate(spec["classes"]) if c != label
                  for group in groups for m in group]
        chosen += list(rng.choice(others, size=spec["n_distractors"], replace=False))
        taken = []
        for name in chosen:
            shape, colour, kind = spec["motifs"][name]
            motif_size = int(rng.integers(low, high + 1))
            corner = _place(size, motif_size, taken, rng)
            if corner is None:
                continue
            y, x = corner
            taken.append((y, x, motif_size))
            mask = shape_mask(shape, motif_size)
            patch = texture(kind, motif_size, COLOURS[colour], rng)
            region = image[y:y + motif_size, x:x + motif_size]
            region[mask] = patch[mask]
            masks[name][i, y:y + motif_size, x:x + motif_size] = mask
        images[i] = image
    order = rng.permutation(n)
    return {
        "images": images[order], "labels": labels[order], "backgrounds": backgrounds[order],
        "masks": {name: m[order] for name, m in masks.items()}, "motif_names": names,
    }


def class_motifs(spec, class_id):
    """The motifs that define ``class_id`` (every group's members)."""
    return [m for group in spec["classes"][class_id] for m in group]


# ------------------------------------------------------------------------------ architectures
def plain_cnn(size, n_classes):
    """conv-pool ×3 then a last conv "features" (post-ReLU), GAP, logits. Early layer "conv3"."""
    import keras

    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Conv2D(24, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool1")(x)
    x = keras.layers.Conv2D(48, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.MaxPooling2D(2, name="pool2")(x)
    x = keras.layers.Conv2D(64, 3, padding="same", activation="relu", name="conv3")(x)
    x = keras.layers.MaxPooling2D(2, name="pool3")(x)
    x = keras.layers.Conv2D(96, 3, padding="same", activation="relu", name="features")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(n_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="plain_cnn")


def residual_cnn(size, n_classes):
    """A stem and two residual blocks; "res1" and "features" are the blocks' post-ReLU sums."""
    import keras

    layers = keras.layers

    def block(x, channels, name):
        shortcut = x
        if x.shape[-1] != channels:
            shortcut = layers.Conv2D(channels, 1, name=f"{name}_proj")(x)
        y = layers.Conv2D(channels, 3, padding="same", activation="relu", name=f"{name}_a")(x)
        y = layers.Conv2D(channels, 3, padding="same", name=f"{name}_b")(y)
        return layers.Activation("relu", name=name)(layers.Add(name=f"{name}_add")([shortcut, y]))

    inputs = keras.Input((size, size, 3), name="image")
    x = layers.Conv2D(32, 3, padding="same", activation="relu", name="stem")(inputs)
    x = layers.MaxPooling2D(2, name="pool1")(x)
    x = block(x, 32, "res1")
    x = layers.MaxPooling2D(2, name="pool2")(x)
    x = layers.MaxPooling2D(2, name="pool3")(block(x, 64, "res2"))
    x = block(x, 96, "features")
    x = layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = layers.Dense(n_classes, name="logits")(x)
    return keras.Model(inputs, outputs, name="residual_cnn")


ARCHITECTURES = {
    # name -> (builder, split layer, earlier layer for decompose)
    "plain": (plain_cnn, "features", "conv3"),
    "residual": (residual_cnn, "features", "res2"),
}

TRAINING = {"n_per_class": 500, "epochs": 10, "batch_size": 64, "learning_rate": 2e-3, "seed": 0}


def cache_dir():
    return Path(os.environ.get("XCRAFT_BENCH_CACHE", Path.home() / ".cache" / "xcraft-bench"))


def model_key(dataset, architecture):
    description = json.dumps({"dataset": DATASETS[dataset], "architecture": architecture,
                              "training": TRAINING, "generator": GENERATOR_VERSION},
                             sort_keys=True)
    return hashlib.sha256(description.encode()).hexdigest()[:16]


def trained_model(dataset, architecture, verbose=True):
    """The classifier of ``architecture`` trained on ``dataset`` (cached), and its test accuracy."""
    import keras

    path = cache_dir() / f"{dataset}-{architecture}-{model_key(dataset, architecture)}.keras"
    spec = DATASETS[dataset]
    test = make_dataset(spec, 100, random_state=12345)
    if path.exists():
        model = keras.models.load_model(path)
    else:
        keras.utils.set_random_seed(TRAINING["seed"])
        train = make_dataset(spec, TRAINING["n_per_class"], random_state=TRAINING["seed"])
        builder = ARCHITECTURES[architecture][0]
        model = builder(spec["size"], len(spec["classes"]))
        model.compile(optimizer=keras.optimizers.Adam(TRAINING["learning_rate"]),
                      loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                      metrics=["accuracy"])
        model.fit(train["images"], train["labels"], epochs=TRAINING["epochs"],
                  batch_size=TRAINING["batch_size"], verbose=2 if verbose else 0)
        path.parent.mkdir(parents=True, exist_ok=True)
        temporary = path.with_suffix(".tmp.keras")
        model.save(temporary)
        os.replace(temporary, path)  # a killed run never leaves a half-written cache entry
    predictions = model.predict(test["images"], batch_size=128, verbose=0).argmax(axis=1)
    return model, float(np.mean(predictions == test["labels"]))
