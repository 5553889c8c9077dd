"""Time ``CraftTf.fit`` once and ``transform`` three times on a pretrained model's composites.

The forward pass of g dominates ``transform`` on real networks; this isolates it from the rest
of ``bench/real_models.py``. Usage: ``python bench/transform_time.py [--model nudity-mobilenet]
[--n-images 100]`` (the model's package and the Tux Paint photos as for ``real_models.py``).
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

from xcraft import CraftTf  # noqa: E402
from xcraft.real_data import (  # noqa: E402
    PRETRAINED,
    load_pretrained,
    make_composites,
    preprocess,
    stable_seed,
    tuxpaint_stamps,
)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", default="nudity-mobilenet", choices=list(PRETRAINED))
    parser.add_argument("--n-images", type=int, default=100)
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    model, info = load_pretrained(args.model)
    size = int(model.inputs[0].shape[1])
    objects = [stamp for entry in info["objects"] for stamp in tuxpaint_stamps(entry)]
    pixels, _ = make_composites(objects, args.n_images, size,
                                random_state=stable_seed(args.model))
    images = preprocess(pixels, info["preprocess"])
    craft = CraftTf.from_model(model, info["layers"][0], number_of_concepts=10,
                               patch_size=max(8, round(size * 2 / 7)), batch_size=32,
                               random_state=0, verbose=False)
    start = time.perf_counter()
    craft.fit(images, class_id=info["class_id"])
    print(f"fit {time.perf_counter() - start:.2f} s")
    for run in ("cold", "warm", "warm"):
        start = time.perf_counter()
        craft.transform(images)
        print(f"transform ({run}) {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
