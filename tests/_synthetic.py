"""Planted-structure fixtures: images with coloured motifs and a fixed-weight CNN that sees them.

The CNN's feature layer has three channel groups: "red" channels fire on red pixels, "blue"
channels on blue pixels and "gray" channels on the background. Its class-0 logit is a weighted sum
of the red and blue groups, so the ground truth for concepts, importances and where a concept is
in an image is known by construction.
"""

import keras
import numpy as np

RED, BLUE = 0, 1
N_PER_GROUP = 4
FEATURE_LAYER = "features"
EARLY_LAYER = "pixels"


def make_motif_images(n_images=48, size=32, motif_size=8, seed=0, motifs=("red", "blue")):
    """Return images with motifs at random places, and each motif's box.

    Returns
    -------
    images : ndarray of shape (n_images, size, size, 3), float32 in [0, 1]
    boxes : dict mapping motif name to an int array (n_images, 4) of (y, x, height, width);
        a row of -1 where the image lacks the motif.
    """
    rng = np.random.default_rng(seed)
    images = 0.35 + 0.1 * rng.random((n_images, size, size, 3))
    colours = {"red": (1.0, 0.0, 0.0), "blue": (0.0, 0.0, 1.0), "green": (0.0, 1.0, 0.0)}
    boxes = {name: -np.ones((n_images, 4), dtype=int) for name in motifs}
    half = size // 2
    for i in range(n_images):
        # Each motif gets its own half of the image so the two never overlap.
        order = rng.permutation(len(motifs))
        for slot, m in enumerate(order):
            name = motifs[m]
            y = rng.integers(0, size - motif_size + 1)
            x_low = slot * half if len(motifs) > 1 else 0
            x_high = (slot + 1) * half - motif_size if len(motifs) > 1 else size - motif_size
            x = rng.integers(x_low, x_high + 1)
            images[i, y : y + motif_size, x : x + motif_size] = colours[name]
            boxes[name][i] = (y, x, motif_size, motif_size)
    return images.astype(np.float32), boxes


def _feature_kernel(rng):
    """3×3 conv weights (3, 3, 3, 3·N_PER_GROUP) making red, blue and gray channel groups."""
    n_channels = 3 * N_PER_GROUP
    kernel = np.zeros((3, 3, 3, n_channels), np.float32)
    bias = np.zeros(n_channels, np.float32)
    gains = rng.uniform(0.5, 1.5, size=n_channels)
    for c in range(n_channels):
        group = c // N_PER_GROUP
        if group == 0:  # red: R minus the others, negative on gray
            colour = np.array([1.0, -0.6, -0.6])
        elif group == 1:  # blue
            colour = np.array([-0.6, -0.6, 1.0])
        else:  # gray background: mean intensity above a floor, silent on pure colours
            colour = np.array([0.5, 0.5, 0.5])
        kernel[:, :, :, c] = gains[c] * colour / 9.0
        bias[c] = -0.05 if group < 2 else -0.3 * gains[c]
    return kernel, bias


def make_motif_model(size=32, red_weight=1.0, blue_weight=1.0, seed=0):
    """Return a fixed-weight Functional CNN: pixels -> conv/relu -> pool "features" -> logits.

    Class 0's logit is ``red_weight · mean(red group) + blue_weight · mean(blue group)``; class 1's
    logit is the mean of the gray group.
    """
    rng = np.random.default_rng(seed)
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Activation("linear", name=EARLY_LAYER)(inputs)
    conv = keras.layers.Conv2D(3 * N_PER_GROUP, 3, padding="same", activation="relu", name="conv")
    x = conv(x)
    x = keras.layers.AveragePooling2D(2, name=FEATURE_LAYER)(x)
    pooled = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    dense = keras.layers.Dense(2, name="logits")
    outputs = dense(pooled)
    model = keras.Model(inputs, outputs, name="motif_cnn")
    kernel, bias = _feature_kernel(rng)
    conv.set_weights([kernel, bias])
    head = np.zeros((3 * N_PER_GROUP, 2), np.float32)
    head[:N_PER_GROUP, 0] = red_weight
    head[N_PER_GROUP : 2 * N_PER_GROUP, 0] = blue_weight
    head[2 * N_PER_GROUP :, 1] = 1.0
    dense.set_weights([head, np.zeros(2, np.float32)])
    return model


def channel_group(index):
    """Name of the planted group a feature channel belongs to."""
    return ("red", "blue", "gray")[index // N_PER_GROUP]


PARTS_LAYER = "parts"


def make_parts_model(size=32, seed=0):
    """Return a fixed-weight CNN whose deep layer merges red and green parts into one "object".

    pixels -> conv/relu with red, green and gray channel groups -> pool "parts" -> 1×1 conv/relu
    whose "object" channels sum the red and green groups (so a red and a green crop look alike
    there) and whose gray channels copy the gray group -> pool "features" -> logits. Class 0's
    logit is the mean of the object channels. Only the earlier "parts" layer tells red from green.
    """
    rng = np.random.default_rng(seed)
    n = N_PER_GROUP
    inputs = keras.Input((size, size, 3), name="image")
    x = keras.layers.Activation("linear", name=EARLY_LAYER)(inputs)
    parts_conv = keras.layers.Conv2D(3 * n, 3, padding="same", activation="relu", name="parts_conv")
    x = keras.layers.AveragePooling2D(2, name=PARTS_LAYER)(parts_conv(x))
    merge = keras.layers.Conv2D(2 * n, 1, activation="relu", name="merge_conv")
    x = keras.layers.AveragePooling2D(2, name=FEATURE_LAYER)(merge(x))
    dense = keras.layers.Dense(2, name="logits")
    outputs = dense(keras.layers.GlobalAveragePooling2D(name="gap")(x))
    model = keras.Model(inputs, outputs, name="parts_cnn")

    kernel = np.zeros((3, 3, 3, 3 * n), np.float32)
    bias = np.zeros(3 * n, np.float32)
    gains = rng.uniform(0.5, 1.5, size=3 * n)
    colours = ([1.0, -0.6, -0.6], [-0.6, 1.0, -0.6], [0.5, 0.5, 0.5])
    for c in range(3 * n):
        group = c // n
        kernel[:, :, :, c] = gains[c] * np.array(colours[group]) / 9.0
        bias[c] = -0.05 if group < 2 else -0.3 * gains[c]
    parts_conv.set_weights([kernel, bias])
    mixing = np.zeros((1, 1, 3 * n, 2 * n), np.float32)
    mixing[0, 0, : 2 * n, :n] = rng.uniform(0.5, 1.0, size=(2 * n, n))  # red + green -> object
    mixing[0, 0, 2 * n :, n:] = np.eye(n)  # gray -> gray
    merge.set_weights([mixing, np.zeros(2 * n, np.float32)])
    head = np.zeros((2 * n, 2), np.float32)
    head[:n, 0] = 1.0
    head[n:, 1] = 1.0
    dense.set_weights([head, np.zeros(2, np.float32)])
    return model


def trained_batch_norm(shape, seed):
    """A BatchNormalization whose moving statistics, gamma and beta are far from 0 / 1."""
    layer = keras.layers.BatchNormalization()
    layer.build((None, *shape))
    rng = np.random.default_rng(seed)
    channels = shape[-1]
    layer.set_weights([rng.uniform(0.5, 2.0, channels), rng.normal(size=channels),
                       rng.normal(size=channels), rng.uniform(0.2, 3.0, channels)])
    return layer
