"""A small CNN trained on planted motifs: class 1 shows a red and a blue square, every image a
distractor (green or black, independent of the class)."""

import keras
import numpy as np

SIZE, MOTIF = 16, 4
COLOURS = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0),
           "black": (0.0, 0.0, 0.0)}
CLASS_MOTIFS, DISTRACTORS = ("red", "blue"), ("green", "black")


def background(rng, n):
    return (0.35 + 0.1 * rng.random((n, SIZE, SIZE, 3))).astype(np.float32)


def paint(images, rng, motifs_per_image):
    """Paint each image's motifs in distinct quadrants; return the motifs' masks by name."""
    n = len(images)
    masks = {name: np.zeros((n, SIZE, SIZE), bool) for name in COLOURS}
    half = SIZE // 2
    for i, motifs in enumerate(motifs_per_image):
        quadrants = rng.permutation(4)[: len(motifs)]
        for name, quadrant in zip(motifs, quadrants, strict=True):
            y0, x0 = half * (quadrant // 2), half * (quadrant % 2)
            y = y0 + rng.integers(0, half - MOTIF + 1)
            x = x0 + rng.integers(0, half - MOTIF + 1)
            images[i, y : y + MOTIF, x : x + MOTIF] = COLOURS[name]
            masks[name][i, y : y + MOTIF, x : x + MOTIF] = True
    return masks


def make_dataset(n, seed):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 2, size=n)
    motifs = []
    for label in labels:
        distractor = [DISTRACTORS[rng.integers(2)]]
        if label == 1:
            chosen = ["red", "blue"]
        else:
            chosen = [[], ["red"], ["blue"]][rng.integers(3)]
        motifs.append(chosen + distractor)
    images = background(rng, n)
    masks = paint(images, rng, motifs)
    return images, labels, masks


def probe_set(name, n, seed):
    rng = np.random.default_rng(seed)
    images = background(rng, n)
    paint(images, rng, [[name]] * n)
    return images


def train_model(seed=0):
    keras.utils.set_random_seed(seed)
    images, labels, _ = make_dataset(800, seed)
    inputs = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv2")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    model.compile(keras.optimizers.Adam(0.01),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True),
                  metrics=["accuracy"])
    model.fit(images, labels, epochs=12, batch_size=32, verbose=0)
    return model
