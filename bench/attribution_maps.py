"""Time ``CraftTf.concept_attribution_maps``: first call (tracing included) and repeated calls.

One ``CraftTf`` is fitted on demo images of one class (the shipped Fashion-MNIST CNN split at
``pool2``, 7 x 7 x 64); then the maps of every concept are computed for other images of the
class with each method, once cold and ``--repeat`` times warm. The warm time is what a user pays
for each further call (other images, other classes of the same model), since the traced step is
cached per feature extractor. No Xplique line: Xplique has no gradient-based concept maps to
compare with (its maps are the upsampled coefficients, our ``"coefficients"``).

Run: ``python bench/attribution_maps.py`` (~1 min on 2 cores; ``--quick`` for a smoke run).
"""

import argparse
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

import numpy as np  # noqa: E402
from fit import class_images, demo_split  # noqa: E402  (bench/fit.py, next to this file)

from xcraft.craft.estimator import CraftTf  # noqa: E402

METHODS = ("gradcam", "saliency", "coefficients", "rise")


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class-id", type=int, default=0)
    parser.add_argument("--n-fit", type=int, default=100, help="images to fit the concepts on")
    parser.add_argument("--n-images", type=int, default=200, help="images to explain")
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--methods", nargs="+", choices=METHODS,
                        default=["gradcam", "saliency", "coefficients"])
    parser.add_argument("--quick", action="store_true", help="50 images, 2 repeats")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_fit, args.n_images, args.repeat = 50, 50, 2

    g, h, _ = demo_split()
    images, name = class_images(args.class_id, args.n_fit + args.n_images)
    craft = CraftTf(g, h, number_of_concepts=args.concepts, patch_size=14, random_state=0)
    craft.fit(images[:args.n_fit], class_id=args.class_id)
    explained = images[args.n_fit:]
    print(f"demo CNN at pool2, class {args.class_id} ({name}), r = {args.concepts}, "
          f"{len(explained)} images explained, maps of every concept")
    print(f"{'method':14s} {'first call s':>12s} {'warm best s':>11s} {'warm median s':>13s} "
          f"{'ms / image':>10s}")
    for method in args.methods:
        cold, maps = timed(lambda method=method: craft.concept_attribution_maps(
            explained, method=method))
        warm = [timed(lambda method=method: craft.concept_attribution_maps(
            explained, method=method))[0] for _ in range(args.repeat)]
        print(f"{method:14s} {cold:12.3f} {min(warm):11.3f} {np.median(warm):13.3f} "
              f"{1e3 * min(warm) / len(explained):10.2f}")
        assert np.all(np.isfinite(maps)), f"{method} maps are not finite"


if __name__ == "__main__":
    main()
