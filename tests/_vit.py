"""A small vision transformer trained on planted motifs, shared by the ViT tests.

The ViT (Conv2D patch embedding, a learned CLS token and position embeddings, two encoder
blocks of LayerNorm + MultiHeadAttention + GELU MLP, the class read from the CLS token) learns
"red and blue squares both present" from images where a red, a blue and a green (distractor)
square each appear with probability 1/2. Its first encoder block's output ``block1`` is a signed
(n, 65, 32) token layer (a CLS token and an 8 x 8 grid of patch tokens).
"""

import functools
import time

import keras
import numpy as np

SIZE, PATCH, DIM = 32, 4, 32
MOTIF = 8
MOTIFS = ("red", "blue", "green")
COLOURS = np.array([(1.0, 0.0, 0.0), (0.0, 0.0, 1.0), (0.0, 1.0, 0.0)])


@keras.saving.register_keras_serializable(package="xcraft_tests")
class ClsAndPositions(keras.layers.Layer):
    """Prepend a learned CLS token and add learned position embeddings: (n, t, d) -> (n, t+1, d)."""

    def build(self, input_shape):
        init = keras.initializers.RandomNormal(stddev=0.02)
        self.cls = self.add_weight(shape=(1, 1, input_shape[-1]), initializer=init, name="cls")
        self.positions = self.add_weight(shape=(1, input_shape[1] + 1, input_shape[-1]),
                                         initializer=init, name="positions")

    def call(self, x):
        cls = keras.ops.broadcast_to(self.cls, (keras.ops.shape(x)[0], 1, x.shape[-1]))
        return keras.ops.concatenate([cls, x], axis=1) + self.positions


@keras.saving.register_keras_serializable(package="xcraft_tests")
class ClsToken(keras.layers.Layer):
    """The CLS token of a (n, t, d) sequence: (n, d)."""

    def call(self, x):
        return x[:, 0]


def build_vit(n_classes=2, heads=2):
    images = keras.Input((SIZE, SIZE, 3))
    x = keras.layers.Conv2D(DIM, PATCH, strides=PATCH, name="patch_embedding")(images)
    x = keras.layers.Reshape(((SIZE // PATCH) ** 2, DIM))(x)
    x = ClsAndPositions(name="tokens")(x)  # (n, 65, 32)
    for block in (1, 2):
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.MultiHeadAttention(heads, DIM // heads)(y, y)
        x = keras.layers.Add()([x, y])
        y = keras.layers.LayerNormalization(epsilon=1e-6)(x)
        y = keras.layers.Dense(2 * DIM, activation="gelu")(y)
        x = keras.layers.Add(name=f"block{block}")([x, keras.layers.Dense(DIM)(y)])
    x = ClsToken()(keras.layers.LayerNormalization(epsilon=1e-6)(x))
    return keras.Model(images, keras.layers.Dense(n_classes, name="logits")(x), name="vit")


def motif_images(n_images, seed):
    """Images with each motif present with probability 1/2, apart; label = red and blue.

    Returns
    -------
    images : ndarray of shape (n_images, 32, 32, 3)
    labels : ndarray of shape (n_images,)
    masks : ndarray of shape (n_images, 3, 32, 32), bool: where each motif is
    """
    rng = np.random.default_rng(seed)
    images = 0.35 + 0.1 * rng.random((n_images, SIZE, SIZE, 3))
    present = rng.random((n_images, len(MOTIFS))) < 0.5
    masks = np.zeros((n_images, len(MOTIFS), SIZE, SIZE), bool)
    for i in range(n_images):
        free = np.ones((SIZE + 4, SIZE + 4), bool)  # margin of 2 px: motifs never touch
        for m in np.flatnonzero(present[i]):
            while True:
                y, x = rng.integers(0, SIZE - MOTIF + 1, size=2)
                if free[y:y + MOTIF + 4, x:x + MOTIF + 4].all():
                    break
            free[y:y + MOTIF + 4, x:x + MOTIF + 4] = False
            images[i, y:y + MOTIF, x:x + MOTIF] = COLOURS[m]
            masks[i, m, y:y + MOTIF, x:x + MOTIF] = True
    labels = (present[:, 0] & present[:, 1]).astype(np.int64)
    return images.astype(np.float32), labels, masks


@functools.lru_cache(maxsize=1)
def trained_vit():
    """Train the ViT once per process (about 10 s on 2 cores) and evaluate it on held-out images.

    Returns
    -------
    model : keras.Model
    test_x, test_y, test_masks : the 400 held-out images of ``motif_images(400, seed=1)``
    accuracy : float
        Held-out accuracy.
    seconds : float
        Training time.
    """
    keras.utils.set_random_seed(0)
    train_x, train_y, _ = motif_images(640, seed=0)
    model = build_vit()
    model.compile(keras.optimizers.Adam(2e-3),
                  keras.losses.SparseCategoricalCrossentropy(from_logits=True))
    start = time.perf_counter()
    model.fit(train_x, train_y, epochs=7, batch_size=64, verbose=0)
    seconds = time.perf_counter() - start
    test_x, test_y, test_masks = motif_images(400, seed=1)
    accuracy = float(np.mean(model.predict(test_x, verbose=0).argmax(1) == test_y))
    return model, test_x, test_y, test_masks, accuracy, seconds
