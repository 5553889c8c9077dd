"""Peak memory of ``CraftTf.fit`` at scale, against the sizes it cannot avoid.

A fit must hold the images and the pooled crop activations A (n_crops × channels, float32);
everything else (crops, NMF temporaries, copies handed to TensorFlow) should cost little beside
them. For each number of crops this script runs one fit in a fresh interpreter on a randomly
initialised ``keras.applications.MobileNetV2`` at 96 × 96 split at ``out_relu`` (1 280
channels; batch norms calibrated as in ``bench/fit.py``), and prints the peak resident memory
during the fit (current RSS sampled every 5 ms) beside the images and A:

- ``runtime``: the RSS after TensorFlow, the model and the images are loaded and one small fit
  has traced the graphs, just before the measured fit (the images are part of it);
- ``added``: peak − runtime, what the fit itself needed;
- ``added / (A + images)``: the ratio the issue asks to keep within 2 (it was 5.5–6.3 before the
  zero-copy hand-over and blocked reductions of ``xcraft.ops.nmf``).

``--nmf-only`` measures ``xcraft.ops.nmf.NMF.fit`` alone on a random non-negative A of the same
size (seconds instead of minutes). The images come from the embedded Fashion-MNIST subset,
resized and tiled to RGB (repeated to reach the count); the weights are random, so only the
memory and time mean something.

Run: ``python bench/memory.py`` (about 5 minutes on 2 cores) or
``python bench/memory.py --crops 20000 --nmf-only``.
"""

import argparse
import json
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PATCHES_PER_IMAGE = 20
IMAGE_SIZE = 96
CHANNELS = 1280


def _current_rss_mib():
    with open("/proc/self/statm") as file:
        return int(file.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


class _PeakSampler:
    """The highest current RSS seen every few milliseconds while the block runs.

    ``ru_maxrss`` alone would report the process's all-time peak, which the set-up (model
    building, batch-norm calibration) may already have set higher than the fit.
    """

    def __enter__(self):
        import threading

        self.peak = _current_rss_mib()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def _run(self):
        while not self._stop.wait(0.005):
            self.peak = max(self.peak, _current_rss_mib())

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, _current_rss_mib())
        return False


def _child(n_crops, nmf_only, n_concepts, batch_size=64):
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    sys.path.insert(0, str(ROOT))
    import time

    import numpy as np

    from xcraft.ops._memory import aligned_empty
    from xcraft.ops.nmf import NMF

    if nmf_only:
        NMF(3, random_state=0, max_iter=2).fit(np.random.default_rng(1).random((500, CHANNELS),
                                                                                 np.float32))
        a = aligned_empty((n_crops, CHANNELS))
        np.random.default_rng(0).random((n_crops, CHANNELS), np.float32, out=a)
        np.power(a, 4, out=a)  # sparse-ish and non-negative, like post-ReLU activations
        runtime = _current_rss_mib()
        start = time.perf_counter()
        with _PeakSampler() as sampler:
            NMF(n_concepts, random_state=0, max_iter=50).fit(a)
        return {"crops": n_crops, "a_mib": a.nbytes / 2**20, "images_mib": 0.0,
                "runtime_mib": runtime, "peak_mib": sampler.peak,
                "seconds": time.perf_counter() - start}

    sys.path.insert(0, str(ROOT / "bench"))
    from fit import mobilenet_split, to_rgb

    from xcraft.craft.estimator import CraftTf
    from xcraft.datasets import load_demo_data

    gray, _, _ = load_demo_data()
    n_images = -(-n_crops // PATCHES_PER_IMAGE)
    base = to_rgb(gray[: min(len(gray), n_images)], IMAGE_SIZE)
    images = np.resize(base, (n_images, *base.shape[1:]))  # repeated to the count
    del base
    g, h, _ = mobilenet_split(IMAGE_SIZE, images[:64])
    options = dict(number_of_concepts=n_concepts, patch_size=48, batch_size=batch_size,
                   patches_per_image=PATCHES_PER_IMAGE, random_state=0, verbose=False)
    CraftTf(g, h, **options).fit(images[:50], class_id=0)  # traces every graph
    runtime = _current_rss_mib()
    start = time.perf_counter()
    craft = CraftTf(g, h, **options)
    with _PeakSampler() as sampler:
        craft.fit(images, class_id=0)
    return {"crops": len(craft.crop_boxes_), "a_mib": craft.crop_activations_.nbytes / 2**20,
            "images_mib": images.nbytes / 2**20, "runtime_mib": runtime,
            "peak_mib": sampler.peak, "seconds": time.perf_counter() - start}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--crops", type=int, nargs="+", default=[20_000, 50_000, 100_000])
    parser.add_argument("--concepts", type=int, default=25)
    parser.add_argument("--nmf-only", action="store_true")
    parser.add_argument("--batch-size", type=int, default=64,
                        help="crops per forward pass (64: CraftTf's default)")
    parser.add_argument("--child", type=int, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child is not None:
        print(json.dumps(_child(args.child, args.nmf_only, args.concepts, args.batch_size)))
        return
    what = "NMF.fit alone" if args.nmf_only else "CraftTf.fit, MobileNetV2-96 at out_relu"
    print(f"{what}, r = {args.concepts}, batches of {args.batch_size}; MiB; one fresh "
          f"interpreter per line")
    print(f"{'crops':>8} {'A':>7} {'images':>7} {'runtime':>8} {'peak':>7} {'added':>7} "
          f"{'added/(A+img)':>14} {'peak/(A+img)':>13} {'time s':>7}")
    for n_crops in args.crops:
        command = [sys.executable, __file__, "--child", str(n_crops),
                   "--concepts", str(args.concepts), "--batch-size", str(args.batch_size)]
        command += ["--nmf-only"] if args.nmf_only else []
        out = subprocess.run(command, capture_output=True, text=True, check=True).stdout
        r = json.loads(out.strip().splitlines()[-1])
        unavoidable = r["a_mib"] + r["images_mib"]
        added = r["peak_mib"] - r["runtime_mib"]
        print(f"{r['crops']:>8} {r['a_mib']:>7.0f} {r['images_mib']:>7.0f} "
              f"{r['runtime_mib']:>8.0f} {r['peak_mib']:>7.0f} {added:>7.0f} "
              f"{added / unavoidable:>14.2f} {r['peak_mib'] / unavoidable:>13.2f} "
              f"{r['seconds']:>7.1f}")


if __name__ == "__main__":
    main()
