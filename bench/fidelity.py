"""Benchmark importance estimators by concept deletion / insertion (CRAFT, Fel et al. 2023, Fig. 6).

For each class of the shipped Fashion-MNIST demo CNN (split at ``pool2``): fit ``CraftTf`` on
half of the class's demo images, estimate global concept importances with ``"sobol"`` (CRAFT),
``"tcav"`` (directional derivative along the concept) and ``"occlusion"`` (score drop when the
concept is removed), then compute deletion and insertion curves of the class logit on the
*other* half of the images (``--in-sample`` uses the fitted images) with
:func:`xcraft.craft.fidelity.concept_deletion_insertion`, together with the mean of ``--n-random``
random orders.

A faithful order has a low deletion AUC (removing its first concepts kills the score) and a high
insertion AUC. The paper's claim is that Sobol beats TCAV on both; the script counts the classes
where it does and prints the mean AUCs.

Run: ``python bench/fidelity.py`` (all 10 classes) or ``python bench/fidelity.py --quick``.
Xplique is not needed.
"""

import argparse
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from fit import class_images, demo_split  # noqa: E402  (bench/fit.py, next to this file)

from xcraft.craft.estimator import CraftTf  # noqa: E402
from xcraft.craft.fidelity import concept_deletion_insertion  # noqa: E402

METHODS = ("sobol", "tcav", "occlusion")
ORDERS = (*METHODS, "random")


def run_class(g, h, class_id, args):
    """Fit, estimate the three importances and return the AUCs of the curves for one class."""
    images, name = class_images(class_id, args.n_images)
    if args.in_sample:
        fit_images = eval_images = images
    else:
        half = len(images) // 2
        fit_images, eval_images = images[:half], images[half:]
    craft = CraftTf(g, h, number_of_concepts=args.concepts, batch_size=64,
                    patch_size=args.patch_size, random_state=args.seed, verbose=False)
    craft.fit(fit_images, class_id=class_id)
    importances = {}
    for method in METHODS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # constant scores on blank crops
            importances[method] = craft.estimate_importance(
                nb_design=args.nb_design, method=method, verbose=False
            )
    u = craft.transform(eval_images)  # (n, 7, 7, r): the spatial coefficients
    result = concept_deletion_insertion(
        u, craft.concept_bank_w_, h, class_id, importances, n_random=args.n_random,
        random_state=args.seed,
    )
    return name, result, importances


def print_class_table(rows, kind_suffix=""):
    header = (f"{'class':<18}" + "".join(f"{'del ' + m[:5]:>11}" for m in ORDERS)
              + "".join(f"{'ins ' + m[:5]:>11}" for m in ORDERS) + f"{'sobol<tcav':>12}"
              + f"{'sobol>tcav':>12}")
    print(header)
    print("-" * len(header))
    for name, result in rows:
        deletion = result.aucs["deletion" + kind_suffix]
        insertion = result.aucs["insertion" + kind_suffix]
        line = f"{name[:18]:<18}" + "".join(f"{deletion[m]:>11.3f}" for m in ORDERS)
        line += "".join(f"{insertion[m]:>11.3f}" for m in ORDERS)
        line += f"{'yes' if deletion['sobol'] < deletion['tcav'] else 'no':>12}"
        line += f"{'yes' if insertion['sobol'] > insertion['tcav'] else 'no':>12}"
        print(line)


def summary(rows, kind_suffix=""):
    deletion = {m: np.array([r.aucs["deletion" + kind_suffix][m] for _, r in rows]) for m in ORDERS}
    insertion = {m: np.array([r.aucs["insertion" + kind_suffix][m] for _, r in rows])
                 for m in ORDERS}
    print(f"{'mean':<18}" + "".join(f"{deletion[m].mean():>11.3f}" for m in ORDERS)
          + "".join(f"{insertion[m].mean():>11.3f}" for m in ORDERS))
    n = len(rows)
    del_wins = int(np.sum(deletion["sobol"] < deletion["tcav"]))
    ins_wins = int(np.sum(insertion["sobol"] > insertion["tcav"]))
    both = int(np.sum((deletion["sobol"] < deletion["tcav"])
                      & (insertion["sobol"] > insertion["tcav"])))
    best_del = {m: int(np.sum(deletion[m] == np.min([deletion[k] for k in ORDERS], axis=0)))
                for m in ORDERS}
    best_ins = {m: int(np.sum(insertion[m] == np.max([insertion[k] for k in ORDERS], axis=0)))
                for m in ORDERS}
    print(f"sobol vs tcav: lower deletion AUC in {del_wins}/{n} classes, higher insertion AUC "
          f"in {ins_wins}/{n}, both in {both}/{n}.")
    print(f"best deletion (lowest) per class: {best_del}; best insertion (highest): {best_ins}")
    return del_wins, ins_wins, both, n


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--classes", default="0,1,2,3,4,5,6,7,8,9",
                        help="comma-separated demo class ids")
    parser.add_argument("--n-images", type=int, default=200,
                        help="images per class, split in half (fit / curves)")
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--patch-size", type=int, default=14)
    parser.add_argument("--nb-design", type=int, default=32)
    parser.add_argument("--n-random", type=int, default=20, help="random orders averaged")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--in-sample", action="store_true",
                        help="draw the curves on the fitted images instead of held-out ones")
    parser.add_argument("--quick", action="store_true", help="classes 0,1,7 with 60 images")
    args = parser.parse_args(argv)
    if args.quick:
        args.classes, args.n_images = "0,1,7", 60
    classes = [int(c) for c in args.classes.split(",") if c.strip()]

    print(f"tensorflow {tf.__version__}, {os.cpu_count()} CPU cores")
    print(f"demo CNN at pool2, r={args.concepts}, patch={args.patch_size}, "
          f"nb_design={args.nb_design}, {args.n_random} random orders, "
          f"{'in-sample' if args.in_sample else 'held-out'} curves, seed {args.seed}")
    g, h, _ = demo_split()
    rows = []
    start = time.perf_counter()
    for class_id in classes:
        name, result, importances = run_class(g, h, class_id, args)
        rows.append((f"{class_id} {name}", result))
        print(f"  class {class_id} ({name}) done at {time.perf_counter() - start:.0f} s; "
              f"top-3 sobol {np.argsort(-importances['sobol'])[:3].tolist()}, "
              f"tcav {np.argsort(-importances['tcav'])[:3].tolist()}, "
              f"occlusion {np.argsort(-importances['occlusion'])[:3].tolist()}", flush=True)

    for title, suffix in (("class logit", ""), ("class probability (softmax)", "_proba")):
        print()
        print(f"AUC of the {title} against the fraction of concepts removed (deletion, lower is "
              f"better) / inserted (insertion, higher is better)")
        print_class_table(rows, suffix)
        wins = summary(rows, suffix)
        if suffix == "":
            logit_wins = wins
    del_wins, ins_wins, both, n = logit_wins
    verdict = ("holds" if del_wins > n / 2 and ins_wins > n / 2 else
               "holds only partly" if del_wins > n / 2 or ins_wins > n / 2 else "does not hold")
    print()
    print(f"Paper's claim (Sobol: lower deletion and higher insertion AUC than TCAV) on the "
          f"class logit {verdict} here: deletion {del_wins}/{n}, insertion {ins_wins}/{n}, "
          f"both {both}/{n}.")
    return 0


if __name__ == "__main__":
    sys.exit(main())
