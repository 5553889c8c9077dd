"""The first call's cost: ``fit`` and ``estimate_importance`` in a fresh process, against Xplique.

A user's first ``fit`` pays for TensorFlow's tracing of every ``tf.function`` it meets, and a
notebook or a CLI run is usually a fresh process. Each measurement here runs in a new Python
process (``--repeat`` of them per library, alternating xcraft and Xplique): it loads the
shipped demo CNN split at ``pool2`` and the images of one class (the ``demo grid`` line of
``bench/fit.py``: 200 images, r = 10, patch 14, Xplique's grid crops for both), then times

- ``fit`` and ``estimate_importance()`` cold (the first calls of the process),
- the same two calls again on a second estimator (warm: traces cached, as for a second class).

Imports and model loading are timed apart and left out of the ratios. Prints the medians and
``xplique / xcraft`` ratios (> 1: xcraft faster). Targets (issue 15): cold ``fit`` ratio ≥ 1,
cold ``estimate_importance`` ratio ≥ 30.

Run: ``/tmp/xplique-venv/bin/python bench/cold_start.py [--repeat 3]`` (plain ``python`` gives
xcraft's figures alone).
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def child(library, n_images, class_id):
    """One fresh process: times of imports, loading, cold and warm fit/importance (JSON)."""
    start = time.perf_counter()
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    sys.path.insert(0, str(HERE.parent))
    sys.path.insert(0, str(HERE))
    import warnings

    import tensorflow as tf  # noqa: F401  (timed as part of the imports)
    from fit import class_images, demo_split

    if library == "xcraft":
        from xcraft import CraftTf

        def make(g, h):
            return CraftTf(g, h, number_of_concepts=10, patch_size=14, batch_size=64,
                           crops="grid", random_state=0, verbose=False)
    else:
        from xplique.concepts import CraftTf

        def make(g, h):
            return CraftTf(input_to_latent_model=g, latent_to_logit_model=h,
                           number_of_concepts=10, patch_size=14, batch_size=64)
    times = {"imports": time.perf_counter() - start}
    start = time.perf_counter()
    g, h, _ = demo_split()
    images, _ = class_images(class_id, n_images)
    times["load"] = time.perf_counter() - start
    warnings.simplefilter("ignore")
    for run in ("cold", "warm"):
        craft = make(g, h)
        start = time.perf_counter()
        craft.fit(images, class_id=class_id)
        times[f"fit_{run}"] = time.perf_counter() - start
        start = time.perf_counter()
        craft.estimate_importance()
        times[f"importance_{run}"] = time.perf_counter() - start
    print(json.dumps(times))


def xplique_available():
    probe = subprocess.run([sys.executable, "-c", "import xplique"], capture_output=True)
    return probe.returncode == 0


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeat", type=int, default=3, help="fresh processes per library")
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--class-id", type=int, default=0)
    parser.add_argument("--child", choices=("xcraft", "xplique"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.n_images, args.class_id)
    libraries = ["xcraft"] + (["xplique"] if xplique_available() else [])
    if len(libraries) == 1:
        print("xplique not importable in this interpreter: xcraft's figures only "
              "(bash bench/setup_xplique_env.sh, then /tmp/xplique-venv/bin/python).")
    runs = {library: [] for library in libraries}
    for _ in range(args.repeat):
        for library in libraries:
            out = subprocess.run(
                [sys.executable, __file__, "--child", library, "--n-images", str(args.n_images),
                 "--class-id", str(args.class_id)],
                capture_output=True, text=True, check=True)
            runs[library].append(json.loads(out.stdout.strip().splitlines()[-1]))
    stages = ("imports", "load", "fit_cold", "importance_cold", "fit_warm", "importance_warm")
    medians = {lib: {s: statistics.median(r[s] for r in rs) for s in stages}
               for lib, rs in runs.items()}
    print(f"demo CNN at pool2, {args.n_images} images of class {args.class_id}, r = 10, grid "
          f"crops; median of {args.repeat} fresh processes (s)")
    print("| stage | xcraft | Xplique | Xplique / xcraft |")
    print("|---|---|---|---|")
    for stage in stages:
        ours = medians["xcraft"][stage]
        theirs = medians.get("xplique", {}).get(stage)
        ratio = f"{theirs / ours:.2f}×" if theirs else "-"
        print(f"| {stage} | {ours:.2f} | {f'{theirs:.2f}' if theirs else '-'} | {ratio} |")
    return medians


if __name__ == "__main__":
    main()
