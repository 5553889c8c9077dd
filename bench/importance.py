"""Benchmark ``CraftTf.estimate_importance``: xcraft against Xplique and against the head's floor.

One xcraft ``CraftTf`` is fitted (grid crops, as Xplique cuts them); the Xplique ``CraftTf`` is
fitted on the same images and then given xcraft's concept bank W, so that both estimate the
importance of the *same* concepts, globally over the same images, with the same ``nb_design``.
Xplique loops over images in Python and calls ``model.predict`` once per image; xcraft evaluates
every (image, mask) pair in fixed-shape chunks inside one ``tf.function``.

The floor is the unavoidable work: ``nb_design · (r + 2) · n_images`` head evaluations, timed
alone on a fixed tensor in big batches (the best of a few batch sizes). The script prints

- ``ours / xplique`` (target: <= 1/20, i.e. >= 20x faster),
- ``ours / floor`` (target: <= 2),
- the same two ratios with ``fold_head=False`` (the head evaluated whole on every rebuilt
  ``(u ⊙ m) W``; by default xcraft folds the head's leading affine layers into the concept basis),
- a breakdown of xcraft's time (transform: g on the images + NNLS; the perturbation engine on a
  fixed U, with and without the fold),
- the Spearman correlation of the two importance vectors (the masks and the NNLS differ:
  Xplique uses unscrambled Halton masks and scikit-learn's L2-regularised ``transform``), next to
  that of xcraft with two different seeds (the design noise the correlation cannot beat).

Run in the Xplique venv (``bash bench/setup_xplique_env.sh``):
``/tmp/xplique-venv/bin/python bench/importance.py``; see ``--help``.
"""

import argparse
import math
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
from fit import (  # noqa: E402  (bench/fit.py, next to this file)
    class_images,
    demo_split,
    import_xplique,
    mobilenet_split,
    to_rgb,
)
from scipy.stats import spearmanr  # noqa: E402

from xcraft.craft.estimator import CraftTf  # noqa: E402
from xcraft.craft.importance import _chunk_size, _row_bytes, concept_importance  # noqa: E402
from xcraft.plumbing.head_fold import fold_head  # noqa: E402

FLOOR_BATCHES = (1024, 4096, 16384)


def timed(fn):
    start = time.perf_counter()
    result = fn()
    return time.perf_counter() - start, result


def head_floor(h, activation_shape, class_id, n_rows, batch_sizes, repeat):
    """Best time of ``n_rows`` head evaluations in batches of each size (one traced function)."""
    results = {}
    for batch in batch_sizes:
        batch = min(batch, n_rows)
        fn = tf.function(lambda a: h(a, training=False)[:, class_id],
                         input_signature=[tf.TensorSpec((batch, *activation_shape), tf.float32)])
        a = tf.random.uniform((batch, *activation_shape), dtype=tf.float32)
        fn(a).numpy()  # trace and warm up
        n_calls = math.ceil(n_rows / batch)

        def run(fn=fn, a=a, n_calls=n_calls):
            out = None
            for _ in range(n_calls):
                out = fn(a)
            return out.numpy()

        results[batch] = min(timed(run)[0] for _ in range(repeat))
    return results


def make_setup(args):
    if args.model == "demo":
        g, h, _ = demo_split()
        images, name = class_images(args.class_id, args.n_images)
        patch = args.patch_size or 14
        description = f"demo CNN at pool2, class {args.class_id} ({name})"
    else:
        images, _ = class_images(args.class_id, args.n_images)
        images = to_rgb(images, args.big_size)
        g, h, _ = mobilenet_split(args.big_size, calibration_images=images[:64])
        patch = args.patch_size or args.big_size // 2
        description = (f"random-weight MobileNetV2-{args.big_size} at out_relu, "
                       f"class {args.class_id}")
    return g, h, images, patch, description


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", choices=("demo", "mobilenet"), default="demo")
    parser.add_argument("--class-id", type=int, default=0)
    parser.add_argument("--n-images", type=int, default=300,
                        help="images (global importance over all of them; <= 400)")
    parser.add_argument("--concepts", type=int, default=10, help="number_of_concepts")
    parser.add_argument("--nb-design", type=int, default=32)
    parser.add_argument("--patch-size", type=int, default=None,
                        help="default 14 (demo) or half the MobileNetV2 input")
    parser.add_argument("--big-size", type=int, default=96, help="MobileNetV2 input size")
    parser.add_argument("--batch-size", type=int, default=64, help="CraftTf batch_size")
    parser.add_argument("--repeat", type=int, default=2, help="timed runs (median)")
    parser.add_argument("--no-xplique", action="store_true")
    parser.add_argument("--quick", action="store_true", help="60 images, one timed run")
    args = parser.parse_args(argv)
    if args.quick:
        args.n_images, args.repeat = 60, 1

    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPU cores, "
          f"GPU: {bool(tf.config.list_physical_devices('GPU'))}")
    xplique_craft = None if args.no_xplique else import_xplique()
    g, h, images, patch, description = make_setup(args)
    r, nb_design, n = args.concepts, args.nb_design, len(images)
    n_rows = nb_design * (r + 2) * n
    print(f"{description}: {n} images, r={r}, nb_design={nb_design}, patch={patch} -> "
          f"{n_rows} head evaluations")

    ours = CraftTf(g, h, number_of_concepts=r, batch_size=args.batch_size, patch_size=patch,
                   crops="grid", random_state=0, verbose=False)
    ours.fit(images, class_id=args.class_id)

    # ----- xcraft: cold call (traces), then timed warm calls
    cold, _ = timed(lambda: ours.estimate_importance(nb_design=nb_design, verbose=False))
    ours_times, imp_ours = [], None
    for _ in range(args.repeat):
        seconds, imp_ours = timed(lambda: ours.estimate_importance(nb_design=nb_design,
                                                                   verbose=False))
        ours_times.append(seconds)
    t_ours = statistics.median(ours_times)
    imp_seed1 = ours.estimate_importance(nb_design=nb_design, random_state=1, verbose=False)

    # The same global estimate with the whole head run on every perturbation.
    def unfolded():
        return ours.estimate_importance(nb_design=nb_design, fold_head=False, verbose=False)

    cold_plain, imp_plain = timed(unfolded)
    plain_times = [timed(unfolded)[0] for _ in range(args.repeat)]
    t_plain = statistics.median(plain_times)
    fold_gap = float(np.max(np.abs(imp_plain - imp_ours)))

    # breakdown: transform (g + NNLS) and the engine on fixed U, with and without the fold
    t_transform, u = timed(lambda: ours.transform(images))
    engine = dict(method="sobol", nb_design=nb_design, random_state=0)
    t_engine = {}
    for fold in (True, False):
        def run(fold=fold):
            return concept_importance(u, ours.concept_bank_w_, h, args.class_id, **engine,
                                      fold_head=fold)

        run()  # warm
        t_engine[fold] = min(timed(run)[0] for _ in range(args.repeat))
    u_tensor = tf.constant(u)
    w_tensor = tf.constant(ours.concept_bank_w_)
    chunk = _chunk_size(n_rows, _row_bytes(u_tensor, w_tensor, h), 2**28, None)

    # ----- floor: the head alone
    activation_shape = tuple(int(s) for s in g.output.shape[1:])
    floor = head_floor(h, activation_shape, args.class_id, n_rows,
                       sorted({*FLOOR_BATCHES, chunk}), max(args.repeat, 1))
    best_batch = min(floor, key=floor.get)
    t_floor = floor[best_batch]

    # ----- Xplique on the same concepts
    t_xp = xp_cold = None
    if xplique_craft is not None:
        xp = xplique_craft(g, h, number_of_concepts=r, batch_size=args.batch_size,
                           patch_size=patch)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            xp.fit(images, class_id=args.class_id)
        # Same concepts as xcraft: its transform (sklearn NMF.transform) and its perturbations
        # both read W from here.
        xp.factorization.reducer.components_ = ours.concept_bank_w_.astype(np.float32)
        xp.factorization.concept_bank_w = ours.concept_bank_w_.astype(np.float32)
        xp_cold, _ = timed(lambda: xp.estimate_importance(images[:2], nb_design=nb_design))
        xp_times, imp_xp = [], None
        for _ in range(args.repeat):
            seconds, imp_xp = timed(lambda: xp.estimate_importance(nb_design=nb_design))
            xp_times.append(seconds)
            print(f"  xplique run: {seconds:.2f} s", flush=True)
        t_xp = statistics.median(xp_times)

    # ----- report
    print()
    print(f"{'':<38}{'seconds':>10}{'ratio':>10}")
    print("-" * 58)
    print(f"{'xcraft estimate_importance (warm)':<38}{t_ours:>10.3f}")
    print(f"{'xcraft estimate_importance (cold)':<38}{cold:>10.3f}")
    print(f"{'  same, fold_head=False (warm)':<38}{t_plain:>10.3f}")
    print(f"{'  same, fold_head=False (cold)':<38}{cold_plain:>10.3f}")
    if t_xp is not None:
        print(f"{'xplique estimate_importance':<38}{t_xp:>10.3f}{t_ours / t_xp:>10.4f}"
              f"   ours/xplique -> {t_xp / t_ours:.1f}x faster (target >= 20x)")
        print(f"{'':<48}{t_plain / t_xp:>10.4f}   ours/xplique, fold_head=False -> "
              f"{t_xp / t_plain:.1f}x faster")
    print(f"{'floor: head alone, batch ' + str(best_batch):<38}{t_floor:>10.3f}"
          f"{t_ours / t_floor:>10.2f}   ours/floor (target <= 2)")
    print(f"{'':<48}{t_plain / t_floor:>10.2f}   ours/floor, fold_head=False")
    print(f"{'  xcraft transform (g + NNLS)':<38}{t_transform:>10.3f}")
    print(f"{'  xcraft engine on fixed U, folded':<38}{t_engine[True]:>10.3f}"
          f"{t_engine[True] / t_floor:>10.2f}   engine/floor")
    print(f"{'  same, fold_head=False (chunk ' + str(chunk) + ')':<38}{t_engine[False]:>10.3f}"
          f"{t_engine[False] / t_floor:>10.2f}   engine/floor")
    print(f"head folds: {fold_head(h) is not None}; max |importance folded - fold_head=False| = "
          f"{fold_gap:.2e}")
    print("floor by batch: " + ", ".join(f"{b}: {s:.3f} s" for b, s in sorted(floor.items())))
    print(f"timed runs: xcraft {[round(s, 3) for s in ours_times]}, fold_head=False "
          f"{[round(s, 3) for s in plain_times]}"
          + (f", xplique {[round(s, 3) for s in xp_times]} (cold on 2 images {xp_cold:.2f} s)"
             if t_xp is not None else ""))
    print()
    rank = np.argsort(-imp_ours)
    print(f"xcraft importances (seed 0): {np.round(imp_ours, 4).tolist()}")
    print(f"xcraft order: {rank.tolist()}")
    rho_seed = spearmanr(imp_ours, imp_seed1).statistic
    if t_xp is not None:
        print(f"xplique importances:        {np.round(imp_xp, 4).tolist()}")
        print(f"xplique order: {np.argsort(-imp_xp).tolist()}")
        rho = spearmanr(imp_ours, imp_xp).statistic
        top = "agrees" if rank[0] == np.argmax(imp_xp) else "differs"
        print(f"Spearman(xcraft, xplique) = {rho:.3f}; Spearman(xcraft seed 0, seed 1) = "
              f"{rho_seed:.3f}; top concept {top}")
        # Where do they differ? Xplique's U (sklearn's regularised transform) through our engine
        # with Halton masks isolates the transform from the masks and the estimator.
        u_xp = xp.transform(images).astype(np.float32)
        gap = np.linalg.norm(u_xp - u) / np.linalg.norm(u)
        imp_mixed = concept_importance(u_xp, ours.concept_bank_w_, h, args.class_id,
                                       method="sobol", nb_design=nb_design, sampler="halton",
                                       random_state=0)
        print(f"U: ||U_xplique - U_xcraft|| / ||U_xcraft|| = {gap:.3f}; Spearman(xcraft engine "
              f"on Xplique's U, xplique) = {spearmanr(imp_mixed, imp_xp).statistic:.3f}, "
              f"(.., xcraft) = {spearmanr(imp_mixed, imp_ours).statistic:.3f}")
    else:
        print(f"Spearman(xcraft seed 0, seed 1) = {rho_seed:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
