"""Benchmark AfI: occluder fit time and memory, the distillation test, planted-concept ranking.

Three parts, each printed as a table:

1. **Occluder fit** for 100 and 1 000 images on a small random-weight CNN at ``--size`` pixels
   (default 64; ``--size 224`` for the issue's 224×224×3), a fixed number of Adam steps, each size
   in its own subprocess so that its peak RSS is its own. The images themselves weigh
   n·H·W·C·4 bytes; the rest of the peak must not grow with n (gradients are accumulated over
   fixed-size batches).
2. **Distillation test** (Wu et al., Table 2) on the demo Fashion-MNIST CNN: test accuracy of the
   32-16-2 student on the meta-detectors of ``pool2`` and ``fc1`` weighted by AfI's channel
   importance, against the same student with the gradient-based (TCAV-style) weights.
3. **Planted concepts**: the CNN of ``tests/afi/_planted.py`` (class 1 = a red and a blue square,
   distractors green and black), AfI's MMD scores and p-values against TCAV's sign-count scores
   (fraction of class images whose class-logit gradient at ``conv2`` has a positive dot product
   with the concept activation vector), both on the same probe and random sets.

Run: ``python bench/afi.py`` (a few minutes on 2 cores); ``--size 224 --steps 3`` for the
issue's memory check; ``--classes 0 1 ... 9`` for the full distillation table.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the xcraft checkout (and its tests/ helpers)

import numpy as np  # noqa: E402


def _peak_rss_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # kB on Linux


def fit_one(n_images, size, steps, batch_size):
    """Fit the occluder for a fixed number of steps; return timings and peak RSS (one process)."""
    import keras

    from xcraft.afi import AfI

    keras.utils.set_random_seed(0)
    model = keras.Sequential([
        keras.Input((size, size, 3)),
        keras.layers.Conv2D(16, 3, strides=2, activation="relu", name="conv1"),
        keras.layers.Conv2D(32, 3, strides=2, activation="relu", name="conv2"),
        keras.layers.GlobalAveragePooling2D(),
        keras.layers.Dense(10),
    ])
    rng = np.random.default_rng(0)
    images = rng.uniform(size=(n_images, size, size, 3)).astype(np.float32)
    predictions = np.argmax(model.predict(images, batch_size=64, verbose=0), axis=1)
    class_id = int(np.bincount(predictions).argmax())
    afi = AfI(model, layers=["conv2"], max_steps=steps, batch_size=batch_size, random_state=0)
    before = _peak_rss_mb()
    start = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        afi.fit(images, class_id)
    seconds = time.perf_counter() - start
    return {"n_images": n_images, "n_used": len(afi.images_used_), "size": size,
            "steps": afi.n_steps_, "seconds": seconds,
            "seconds_per_step": seconds / max(afi.n_steps_ + 1, 1),
            "images_mb": images.nbytes / 2**20, "rss_before_fit_mb": before,
            "peak_rss_mb": _peak_rss_mb()}


def bench_fit(args):
    print(f"\n## Occluder fit ({args.size}x{args.size}x3, {args.steps} Adam steps, batch "
          f"{args.batch_size})")
    print(f"{'images':>7}{'used':>6}{'s total':>9}{'s/pass':>8}{'images MB':>11}"
          f"{'peak RSS MB':>13}{'peak - images':>15}")
    for n in args.fit_sizes:
        command = [sys.executable, __file__, "--_fit-one", str(n), "--size", str(args.size),
                   "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        output = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        row = json.loads(output.strip().splitlines()[-1])
        print(f"{n:>7}{row['n_used']:>6}{row['seconds']:>9.1f}{row['seconds_per_step']:>8.2f}"
              f"{row['images_mb']:>11.0f}{row['peak_rss_mb']:>13.0f}"
              f"{row['peak_rss_mb'] - row['images_mb']:>15.0f}")


def bench_distillation(args):
    from xcraft.afi import AfI
    from xcraft.afi.evaluation import distillation_test
    from xcraft.datasets import DEMO_LAYER, load_demo_data, load_demo_model

    images, labels, names = load_demo_data()
    model = load_demo_model()
    subset = np.arange(len(images))[::2]
    print("\n## Distillation test (demo CNN; student 32-16-2 on meta-detector outputs; test "
          "accuracy, 30% held out)")
    print(f"{'class':<14}{'layers':<14}{'AfI':>7}{'gradient':>10}")
    for class_id in args.classes:
        afi = AfI(model, layers=[DEMO_LAYER, "fc1"], max_steps=200, random_state=0)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            afi.fit(images[labels == class_id][:100], class_id)
        for layers in ([DEMO_LAYER], ["fc1"], [DEMO_LAYER, "fc1"]):
            result = distillation_test(afi, images[subset], labels[subset], layers=layers,
                                       random_state=0)
            print(f"{names[class_id]:<14}{'+'.join(layers):<14}{result['afi']:>7.3f}"
                  f"{result['gradient']:>10.3f}")


def tcav_scores(model, layer, class_images, class_id, probes, random_sets):
    """TCAV sign-count score of each concept against each random set: (n_concepts, n_sets)."""
    import tensorflow as tf
    from sklearn.linear_model import LogisticRegression

    from xcraft.plumbing.split import split_model

    g, h = split_model(model, layer)
    activations = g(class_images).numpy()
    a = tf.constant(activations)
    with tf.GradientTape() as tape:
        tape.watch(a)
        score = tf.reduce_sum(h(a)[:, class_id])
    gradients = tape.gradient(score, a).numpy().reshape(len(class_images), -1)
    scores = np.zeros((len(probes), len(random_sets)))
    for i, concept in enumerate(probes.values()):
        positive = g(concept).numpy().reshape(len(concept), -1)
        for r, random_images in enumerate(random_sets):
            negative = g(random_images).numpy().reshape(len(random_images), -1)
            x = np.concatenate([positive, negative])
            y = np.r_[np.ones(len(positive)), np.zeros(len(negative))]
            cav = LogisticRegression(max_iter=2000).fit(x, y).coef_[0]
            scores[i, r] = np.mean(gradients @ cav > 0)
    return scores


def bench_planted(args):
    from tests.afi import _planted
    from xcraft.afi import AfI

    model = _planted.train_model(seed=0)
    images, labels, _ = _planted.make_dataset(300, seed=1)
    class_images = images[labels == 1][:60]
    afi = AfI(model, layers=["conv1", "conv2"], max_steps=200, random_state=0)
    afi.fit(class_images, 1)
    probes = {name: _planted.probe_set(name, 20, seed=i)
              for i, name in enumerate(_planted.COLOURS)}
    pool = _planted.background(np.random.default_rng(5), 60)
    start = time.perf_counter()
    result = afi.concept_importance(probes, pool, layers=["conv2"], n_random_sets=5,
                                    n_permutations=args.n_permutations, random_state=0)
    mmd_seconds = time.perf_counter() - start
    rng = np.random.default_rng(0)
    random_sets = [pool[rng.choice(len(pool), 30, replace=False)] for _ in range(5)]
    start = time.perf_counter()
    tcav = tcav_scores(model, "conv2", class_images, 1, probes, random_sets)
    tcav_seconds = time.perf_counter() - start
    print("\n## Planted concepts (class = red AND blue squares; distractors green, black); "
          "layer conv2, 5 random sets")
    print(f"{'concept':<9}{'planted':<12}{'MMD score':>11}{'± std':>8}{'p (median)':>12}"
          f"{'shift':>8}{'TCAV':>7}{'± std':>8}")
    for i, name in enumerate(result.names):
        role = "class" if name in _planted.CLASS_MOTIFS else "distractor"
        print(f"{name:<9}{role:<12}{result.mean[i]:>11.3f}{result.std[i]:>8.3f}"
              f"{result.p_value[i]:>12.4f}{result.response_shift[i].mean():>+8.2f}"
              f"{tcav[i].mean():>7.2f}{tcav[i].std(ddof=1):>8.2f}")
    print(f"MMD: {mmd_seconds:.1f} s ({args.n_permutations} permutations); TCAV: "
          f"{tcav_seconds:.1f} s")


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--size", type=int, default=64, help="image side of the fit benchmark")
    parser.add_argument("--steps", type=int, default=5, help="Adam steps of the fit benchmark")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--fit-sizes", type=int, nargs="+", default=[100, 1000])
    parser.add_argument("--classes", type=int, nargs="+", default=[1, 7, 8])
    parser.add_argument("--n-permutations", type=int, default=1000)
    parser.add_argument("--only", choices=["fit", "distillation", "planted"], default=None)
    parser.add_argument("--_fit-one", type=int, default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args._fit_one is not None:
        print(json.dumps(fit_one(args._fit_one, args.size, args.steps, args.batch_size)))
        return
    if args.only in (None, "fit"):
        bench_fit(args)
    if args.only in (None, "distillation"):
        bench_distillation(args)
    if args.only in (None, "planted"):
        bench_planted(args)


if __name__ == "__main__":
    main()
