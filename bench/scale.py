"""Scale on paper: what one class costs, and the wall time of 1 000 classes on 1, 8, 64 workers.

Each measurement is a fresh process that runs :func:`xcraft.explain_classes` in-process on
``--classes`` classes (default 3) of one model with the library's defaults (10 concepts, 32
Sobol designs, a report per class with its fidelity curves and attribution maps, a card), and
reports

- ``setup``: importing TensorFlow and xcraft, building or loading the model (once per worker);
- ``first``: the first class (it pays for every trace);
- ``class``: the median of the later classes (a worker's steady state);
- ``peak RSS``: the process's peak resident memory.

Models: the shipped demo CNN (28 px, 100 images a class) and a MobileNetV2 of random weights at
224 px (1 000 logits, split at ``out_relu``), timed at two numbers of images a class so the
per-image slope can be read off. Random weights and noise images change no cost: the work is
the same forward, backward and factorisation passes.

The extrapolation (printed, and in bench/README.md): with ``W`` workers that each own their
cores (or GPU), a run of ``K`` classes of ``n`` images takes

    T(W) = setup + (first - class) + ceil(K / W) * class(n),   class(n) = a + b * n

with ``a`` and ``b`` fitted on the two sizes measured. A second figure runs the demo with 2
workers of 1 thread against 1 worker of 2 threads on this machine, to show how far sharing
cores between workers is from that ideal.

Run: ``python bench/scale.py`` (about 10 minutes on 2 cores; ``--quick`` for a smoke run).
"""

import argparse
import json
import math
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(model_name, n_images, n_classes, workers, threads):
    """One fresh process: setup, first class, steady classes and peak memory (JSON on stdout)."""
    start = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(HERE.parent))
    import warnings

    warnings.filterwarnings("ignore")
    import numpy as np
    import tensorflow as tf

    if threads:
        tf.config.threading.set_intra_op_parallelism_threads(threads)
        tf.config.threading.set_inter_op_parallelism_threads(threads)
    import keras

    from xcraft.craft.runner import explain_classes

    if model_name == "demo":
        from xcraft.datasets import load_demo_data, load_demo_model

        images, labels, _ = load_demo_data()
        model, layer, patch = load_demo_model(), "pool2", 14
        classes = list(range(n_classes))
        keep = np.isin(labels, classes)
        images, labels = images[keep], labels[keep]
    else:
        keras.utils.set_random_seed(0)
        model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3),
                                               classes=1000, classifier_activation=None)
        layer, patch = "out_relu", 64
        classes = list(range(n_classes))
        rng = np.random.default_rng(0)
        images = rng.uniform(-1, 1, size=(n_images * n_classes, 224, 224, 3)).astype("float32")
        labels = np.repeat(classes, n_images)
    setup = time.perf_counter() - start
    out = tempfile.mkdtemp(prefix="xcraft-scale-")
    executor = "inprocess"
    if workers > 1:
        import concurrent.futures
        import multiprocessing

        executor = concurrent.futures.ProcessPoolExecutor(
            workers, mp_context=multiprocessing.get_context("spawn"))
    run_start = time.perf_counter()
    result = explain_classes(model, layer, images, labels, classes, out,
                             images_per_class=n_images, patch_size=patch, progress=False,
                             executor=executor, cpus_per_worker=max(1, threads or 1))
    wall = time.perf_counter() - run_start
    if result.failed:
        raise SystemExit(f"classes failed: {result.failed}")
    seconds = []
    for class_id in classes:
        with open(os.path.join(result.class_dir(class_id), "done.json"), encoding="utf-8") as f:
            seconds.append(json.load(f)["seconds"])
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    if workers > 1:
        peak = max(peak, resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss / 1024)
    print(json.dumps({"setup": setup, "first": seconds[0],
                      "class": statistics.median(seconds[1:]) if len(seconds) > 1 else seconds[0],
                      "wall": wall, "peak_mb": peak}))


def measure(model_name, n_images, n_classes, workers=1, threads=0):
    command = [sys.executable, __file__, "--child", model_name, str(n_images), str(n_classes),
               str(workers), str(threads)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed:\n{done.stderr[-3000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def wall_time(setup, first, per_class, classes, workers):
    """The extrapolation of the module docstring, in seconds."""
    return setup + (first - per_class) + math.ceil(classes / workers) * per_class


def _hours(seconds):
    return f"{seconds / 3600:8.2f} h" if seconds >= 3600 else f"{seconds / 60:8.1f} min"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--child", nargs=5, metavar=("MODEL", "N", "K", "W", "T"))
    parser.add_argument("--quick", action="store_true", help="tiny sizes: a smoke run")
    parser.add_argument("--classes", type=int, default=3, help="classes per measurement")
    args = parser.parse_args()
    if args.child:
        name, n, k, w, t = args.child
        child(name, int(n), int(k), int(w), int(t))
        return
    classes = 2 if args.quick else max(2, args.classes)
    sizes = {"demo": (20, 100) if not args.quick else (10, 20),
             "mobilenetv2-224": (16, 48) if not args.quick else (4, 8)}
    rows = {}
    for name, (small, large) in sizes.items():
        for n in (small, large):
            start = time.perf_counter()
            rows[name, n] = measure(name, n, classes)
            print(f"measured {name} at {n} images a class ({time.perf_counter() - start:.0f} s)",
                  file=sys.stderr)
    print(f"\nPer class, one worker with all {os.cpu_count()} cores of this machine "
          f"({classes} classes per fresh process):\n")
    print("| model | images/class | setup | first class | class (steady) | peak RSS |")
    print("|---|---|---|---|---|---|")
    for (name, n), row in rows.items():
        print(f"| {name} | {n} | {row['setup']:.1f} s | {row['first']:.1f} s | "
              f"{row['class']:.1f} s | {row['peak_mb']:.0f} MB |")
    print("\nExtrapolated wall time, 1 000 classes x 500 images (T(W) of the docstring):\n")
    print("| model | a (s) | b (s/image) | class(500) | 1 worker | 8 workers | 64 workers |")
    print("|---|---|---|---|---|---|---|")
    for name, (small, large) in sizes.items():
        low, high = rows[name, small], rows[name, large]
        slope = (high["class"] - low["class"]) / (large - small)
        intercept = low["class"] - slope * small
        per_class = intercept + slope * 500
        first = high["first"] - high["class"] + per_class
        times = [wall_time(high["setup"], first, per_class, 1000, w) for w in (1, 8, 64)]
        print(f"| {name} | {intercept:.2f} | {slope:.4f} | {per_class:.1f} s | "
              + " | ".join(_hours(t).strip() for t in times) + " |")
    n = sizes["demo"][1]
    shared_one = measure("demo", n, 4, workers=1, threads=0)
    shared_two = measure("demo", n, 4, workers=2, threads=1)
    print(f"\nSharing this machine's {os.cpu_count()} cores, demo, 4 classes of {n} images "
          f"(wall time of the run, after setup):\n")
    print("| workers x threads | wall | speed-up |")
    print("|---|---|---|")
    print(f"| 1 x all | {shared_one['wall']:.1f} s | 1.00x |")
    speed_up = shared_one["wall"] / shared_two["wall"]
    print(f"| 2 x 1 | {shared_two['wall']:.1f} s | {speed_up:.2f}x |")


if __name__ == "__main__":
    main()
