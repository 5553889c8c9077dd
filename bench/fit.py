"""Benchmark ``CraftTf.fit``: xcraft against ``xplique.concepts.CraftTf``, same model and images.

Both estimators get the same split model (g, h), the same images of one class and the same
``number_of_concepts``, ``patch_size`` and ``batch_size``. Xplique cuts a sliding-window grid
(stride 0.8 · patch) and factorises with scikit-learn's NMF; the apples-to-apples line runs
xcraft with ``crops="grid"`` (the same crops), and a second line runs xcraft's default random
crops with as many crops per image. The relative reconstruction error ‖A − U W‖_F / ‖A‖_F is
computed here in float64, each on its own activation matrix A.

Two models:

- ``demo``: the Fashion-MNIST CNN shipped in ``xcraft.datasets``, split at ``pool2``
  (7 × 7 × 64), on test images of one class;
- ``mobilenet``: a randomly initialised ``keras.applications.MobileNetV2(weights=None)`` at
  96 × 96, split at ``out_relu`` (3 × 3 × 1280), on the same images resized and tiled to RGB, to
  show the behaviour at a realistic layer width. Its batch norms are calibrated on the images
  (see :func:`mobilenet_split`) so that activations have a realistic scale. The weights are
  random: timings and reconstruction errors mean something, the concepts do not.

Xplique is not a dependency of xcraft: install it in a separate venv with
``bash bench/setup_xplique_env.sh`` and run ``/tmp/xplique-venv/bin/python bench/fit.py``. Without
xplique the script prints xcraft's numbers alone.

Timing: every line first runs each estimator once untimed (graph tracing, Keras' predict
function, kernel set-up), then ``--repeat`` timed runs alternating xcraft and Xplique; the table
shows the median and the first (cold) time is printed below it. The machine's cores may be shared,
so run it twice.
"""

import argparse
import os
import statistics
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xcraft.craft.estimator import CraftTf  # noqa: E402
from xcraft.datasets import DEMO_LAYER, load_demo_data, load_demo_model  # noqa: E402
from xcraft.plumbing.split import split_model  # noqa: E402

MOBILENET_LAYER = "out_relu"


# ------------------------------------------------------------------------------ shared helpers
def import_xplique():
    """Return ``xplique.concepts.CraftTf``, or None (with the reason printed) if unavailable."""
    try:
        import xplique
        from xplique.concepts import CraftTf as XpliqueCraftTf
    except ImportError as err:
        print(f"xplique is not importable ({err}); printing xcraft's numbers only. "
              f"Run `bash bench/setup_xplique_env.sh` and use /tmp/xplique-venv/bin/python.")
        return None
    print(f"xplique {xplique.__version__} from {Path(xplique.__file__).parent}")
    return XpliqueCraftTf


def class_images(class_id, n_images):
    """Return ``n_images`` demo test images of ``class_id`` (N, 28, 28, 1) in [0, 1].

    The demo subset holds 200 images per class; beyond that the horizontal mirrors of the same
    images are appended (still pictures of the class), so up to 400 are available.
    """
    images, labels, class_names = load_demo_data()
    selected = images[labels == class_id]
    if n_images > len(selected):
        selected = np.concatenate([selected, selected[:, :, ::-1, :]])
    if n_images > len(selected):
        raise SystemExit(f"--n-images must be <= {len(selected)} for one class, got {n_images}.")
    return np.ascontiguousarray(selected[:n_images]), class_names[class_id]


def demo_split():
    """Return (g, h, model) of the shipped demo CNN split at ``DEMO_LAYER``."""
    model = load_demo_model()
    g, h = split_model(model, DEMO_LAYER)
    return g, h, model


def mobilenet_split(image_size, calibration_images=None, seed=0):
    """Return (g, h, model) of a randomly initialised MobileNetV2 split at ``out_relu``.

    With default batch-norm statistics (mean 0, variance 1) a randomly initialised MobileNetV2
    shrinks its activations layer after layer (to ~1e-12 at ``out_relu``), which would make the
    NMF meaningless. So the batch norms are calibrated once on ``calibration_images``: with
    momentum 0, one training-mode pass sets every moving mean and variance to the batch's own
    statistics, layer after layer, and inference then sees activations of order 1.
    """
    import keras

    keras.utils.set_random_seed(seed)  # benchmark script: reproducible random weights
    model = keras.applications.MobileNetV2(
        weights=None, input_shape=(image_size, image_size, 3), classes=1000
    )
    if calibration_images is not None:
        for layer in model.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = 0.0
        model(tf.constant(calibration_images, tf.float32), training=True)
    g, h = split_model(model, MOBILENET_LAYER)
    return g, h, model


def to_rgb(images, image_size):
    """Resize gray (N, 28, 28, 1) images to (N, size, size, 3), in fixed batches."""
    out = np.empty((len(images), image_size, image_size, 3), np.float32)
    for start in range(0, len(images), 256):
        batch = tf.image.resize(images[start : start + 256], (image_size, image_size))
        out[start : start + len(batch)] = tf.tile(batch, [1, 1, 1, 3]).numpy()
    return out


def relative_error(a, u, w):
    """‖A − U W‖_F / ‖A‖_F in float64."""
    a = np.asarray(a, np.float64)
    u, w = np.asarray(u, np.float64), np.asarray(w, np.float64)
    return float(np.linalg.norm(a - u @ w) / np.linalg.norm(a))


def xplique_activations(craft, images):
    """Xplique keeps no activation matrix: recompute it exactly as its ``fit`` does."""
    _, activations = craft._extract_patches(images)
    return np.asarray(activations)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


# -------------------------------------------------------------------------------- benchmark
def bench_line(name, make_ours, make_xplique, images, class_id, repeat):
    """Fit both estimators ``1 + repeat`` times; return the row of the table."""
    runs = {"ours": [], "xplique": []}
    fitted = {}
    for i in range(1 + repeat):
        seconds, craft = timed(lambda: _fit(make_ours(), images, class_id))
        runs["ours"].append(seconds)
        fitted["ours"] = craft
        if make_xplique is not None:
            seconds, craft = timed(lambda: _fit(make_xplique(), images, class_id))
            runs["xplique"].append(seconds)
            fitted["xplique"] = craft
        print(f"  {name} run {i}: ours {runs['ours'][-1]:.2f} s"
              + (f", xplique {runs['xplique'][-1]:.2f} s" if runs["xplique"] else ""),
              flush=True)
    ours = fitted["ours"]
    row = {
        "line": name,
        "crops": len(ours.crops_u_),
        "ours_s": statistics.median(runs["ours"][1:]),
        "ours_cold": runs["ours"][0],
        "ours_err": relative_error(ours.crop_activations_, ours.crops_u_, ours.concept_bank_w_),
        "ours_iter": int(getattr(ours.nmf_, "n_iter_", -1)),
    }
    if make_xplique is not None:
        xp = fitted["xplique"]
        factorization = xp.factorization
        activations = xplique_activations(xp, images)
        row.update(
            xp_s=statistics.median(runs["xplique"][1:]),
            xp_cold=runs["xplique"][0],
            xp_err=relative_error(activations, factorization.crops_u,
                                  factorization.reducer.components_),
            xp_iter=int(factorization.reducer.n_iter_),
            xp_crops=len(factorization.crops_u),
        )
    return row


def _fit(craft, images, class_id):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # sklearn ConvergenceWarning inside Xplique
        craft.fit(images, class_id=class_id)
    return craft


def print_table(rows, has_xplique):
    header = f"{'line':<34}{'crops':>7}{'ours s':>9}"
    if has_xplique:
        header += f"{'xpl s':>9}{'ours/xpl':>10}{'ours err':>10}{'xpl err':>9}{'iters o/x':>11}"
    else:
        header += f"{'ours err':>10}{'iters':>7}"
    print()
    print(header)
    print("-" * len(header))
    for row in rows:
        line = f"{row['line']:<34}{row['crops']:>7}{row['ours_s']:>9.2f}"
        if has_xplique and "xp_s" in row:
            line += (f"{row['xp_s']:>9.2f}{row['ours_s'] / row['xp_s']:>10.3f}"
                     f"{row['ours_err']:>10.4f}{row['xp_err']:>9.4f}"
                     f"{str(row['ours_iter']) + '/' + str(row['xp_iter']):>11}")
        elif has_xplique:
            line += f"{'':>9}{'':>10}{row['ours_err']:>10.4f}{'':>9}{row['ours_iter']:>11}"
        else:
            line += f"{row['ours_err']:>10.4f}{row['ours_iter']:>7}"
        print(line)
    cold = ", ".join(
        f"{row['line']}: ours {row['ours_cold']:.2f} s"
        + (f" / xplique {row['xp_cold']:.2f} s" if "xp_cold" in row else "")
        for row in rows
    )
    print(f"cold (first, untimed-in-table) runs: {cold}")
    print("times: median of the timed runs after one warm-up; err = ||A - UW||_F / ||A||_F, "
          "each on its own A; ours/xpl < 1 means xcraft is faster.")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--class-id", type=int, default=0, help="demo class to explain")
    parser.add_argument("--n-images", type=int, default=200, help="images of the class (<= 400)")
    parser.add_argument("--concepts", type=int, default=10, help="number_of_concepts")
    parser.add_argument("--patch-size", type=int, default=14, help="demo patch size (of 28)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=2, help="timed runs per line (median)")
    parser.add_argument("--big-images", type=int, default=100,
                        help="images for the MobileNetV2 line (0 skips it)")
    parser.add_argument("--big-size", type=int, default=96, help="MobileNetV2 input size")
    parser.add_argument("--big-patch-size", type=int, default=48)
    parser.add_argument("--big-concepts", type=int, default=20)
    parser.add_argument("--no-xplique", action="store_true", help="time xcraft only")
    parser.add_argument("--quick", action="store_true",
                        help="50 demo images, one timed run, no MobileNetV2 line")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.repeat, args.big_images = 50, 1, 0

    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    xplique_craft = None if args.no_xplique else import_xplique()
    rows = []

    # ----- demo CNN
    g, h, _ = demo_split()
    images, class_name = class_images(args.class_id, args.n_images)
    print(f"demo: {len(images)} images of class {args.class_id} ({class_name}), split at "
          f"{DEMO_LAYER} {tuple(g.output.shape[1:])}, r={args.concepts}, "
          f"patch={args.patch_size}, batch={args.batch_size}")
    common = dict(number_of_concepts=args.concepts, batch_size=args.batch_size,
                  patch_size=args.patch_size)
    per_image = _grid_per_image(images.shape[1], args.patch_size)

    def make_xplique(g=g, h=h, common=common):
        return xplique_craft(g, h, **common)

    rows.append(bench_line(
        "demo grid (xplique's crops)",
        lambda: CraftTf(g, h, **common, crops="grid", random_state=0, verbose=False),
        make_xplique if xplique_craft else None, images, args.class_id, args.repeat))
    rows.append(bench_line(
        f"demo random ({per_image}/image)",
        lambda: CraftTf(g, h, **common, crops="random", patches_per_image=per_image,
                        random_state=0, verbose=False),
        None, images, args.class_id, args.repeat))

    # ----- randomly initialised MobileNetV2 at a realistic width
    if args.big_images:
        big, _ = class_images(args.class_id, args.big_images)
        big = to_rgb(big, args.big_size)
        g, h, _ = mobilenet_split(args.big_size, calibration_images=big[:64])
        print(f"mobilenet: {len(big)} images {big.shape[1:]}, random weights (batch norms "
              f"calibrated on 64 of the images), split at "
              f"{MOBILENET_LAYER} {tuple(g.output.shape[1:])}, r={args.big_concepts}, "
              f"patch={args.big_patch_size}")
        common = dict(number_of_concepts=args.big_concepts, batch_size=args.batch_size,
                      patch_size=args.big_patch_size)
        per_image = _grid_per_image(args.big_size, args.big_patch_size)

        def make_xplique_big(g=g, h=h, common=common):
            return xplique_craft(g, h, **common)

        rows.append(bench_line(
            "mobilenetv2 grid (xplique's crops)",
            lambda: CraftTf(g, h, **common, crops="grid", random_state=0, verbose=False),
            make_xplique_big if xplique_craft else None, big, args.class_id, args.repeat))
        rows.append(bench_line(
            f"mobilenetv2 random ({per_image}/image)",
            lambda: CraftTf(g, h, **common, crops="random", patches_per_image=per_image,
                            random_state=0, verbose=False),
            None, big, args.class_id, args.repeat))

    print_table(rows, xplique_craft is not None)
    for row in rows:
        if "xp_crops" in row and row["xp_crops"] != row["crops"]:
            print(f"note: {row['line']}: xplique cut {row['xp_crops']} crops, xcraft "
                  f"{row['crops']}.")
    return 0


def _grid_per_image(image_size, patch_size):
    """Crops per image of Xplique's grid (stride int(0.8 · patch), no padding)."""
    stride = max(1, int(patch_size * 0.8))
    per_side = (image_size - patch_size) // stride + 1
    return per_side * per_side


if __name__ == "__main__":
    sys.exit(main())
