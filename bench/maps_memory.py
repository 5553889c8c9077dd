"""Peak memory of ``concept_attribution_maps`` at 224 px with 25 concepts, one process per method.

A randomly initialised ``keras.applications.MobileNetV2`` (224 × 224, split at ``out_relu``:
7 × 7 × 1 280) and a random non-negative bank of 25 concepts; the maps of all 25 concepts for
``--n-images`` images with each method, in a fresh process each, reporting the growth of the
peak resident set over the call (``ru_maxrss``) next to the size of the maps themselves.

Usage: ``python bench/maps_memory.py [--n-images 32] [--methods gradcam saliency ...]``.
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout


def child(method, n_images, concepts):
    import keras
    import numpy as np

    from xcraft.craft.attribution import concept_attribution_maps
    from xcraft.plumbing.split import split_model

    keras.utils.set_random_seed(0)
    model = keras.applications.MobileNetV2(weights=None, input_shape=(224, 224, 3))
    g, _ = split_model(model, "out_relu")
    images = np.random.default_rng(0).uniform(-1, 1, (n_images, 224, 224, 3)).astype("float32")
    bank = np.random.default_rng(1).uniform(size=(concepts, 1280))
    concept_attribution_maps(images[:1], g, bank, concept_ids=[0], method=method,
                             n_masks=8)  # load kernels before the baseline
    before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    start = time.perf_counter()
    maps = concept_attribution_maps(images, g, bank, method=method, batch_size=64, n_masks=256)
    seconds = time.perf_counter() - start
    after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(json.dumps({"method": method, "growth_mb": after - before, "seconds": seconds,
                      "maps_mb": maps.nbytes / 2**20}))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--n-images", type=int, default=32)
    parser.add_argument("--concepts", type=int, default=25)
    parser.add_argument("--methods", nargs="+",
                        default=["gradcam", "saliency", "gradient_input", "coefficients"])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child(args.child, args.n_images, args.concepts)
    print(f"MobileNetV2-224 at out_relu, {args.concepts} concepts, {args.n_images} images, "
          f"batch_size=64")
    print("| method | peak growth (MB) | maps (MB) | s |")
    print("|---|---|---|---|")
    for method in args.methods:
        out = subprocess.run([sys.executable, __file__, "--child", method, "--n-images",
                              str(args.n_images), "--concepts", str(args.concepts)],
                             capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"| {method} | {row['growth_mb']:.0f} | {row['maps_mb']:.0f} | "
              f"{row['seconds']:.1f} |")


if __name__ == "__main__":
    main()
