"""Faithfulness of CRAFT against planted ground truth: discovery, localisation, importance.

On datasets of ``bench/planted_data.py`` (drawn motifs define the classes; each image also
carries a distractor motif of another class; each motif's pixel mask and the image's background
before the motifs are known), with a classifier trained per dataset (cached), class 0 is
explained by xcraft (and by Xplique 2.0.2 where it is importable, on the same g, h, images,
patch and rank) and scored on what the truth says:

- **True effect of a motif**: mean drop of the class-0 logit when the motif is removed from the
  images that have it (its pixels replaced by that image's own background).
- **Which motif a concept is**: each concept is shown crops centred on each motif, drawn alone
  on its image's background (and the same crops of the backgrounds alone); it belongs to the
  motif (or the background) on whose crops its mean coefficient is highest. No map is used, so
  no map method is favoured by the matching.
- **Discovery**: the best Pearson correlation, over the pixels of held-out images, between a
  concept's coefficient map (upsampled NNLS coefficients) and each class motif's mask, for the
  root concepts and for the sub-concepts after ``decompose`` of the motif's concept at an
  earlier layer.
- **Localisation at input resolution**: for each class motif, the maps of its concept by every
  map method, scored by the share of the map's positive mass inside the motif's mask and by the
  pointing game (the map's maximum on the motif), against chance (the mask's share of the
  pixels) and against Grad-CAM of the class logit (scored on the class motifs' union).
- **Importance against the truth**: Spearman correlation, over the concepts that belong to a
  motif, between each estimator's importances and the true effect of their motif; and over
  all motifs of the class-0 images (class motifs and distractors), between the motif's
  importance (the sum of its concepts', 0 when no concept is it) and its true effect. The
  estimators run on the fitted images (the global estimate of xcraft and of Xplique) and, for
  Sobol, on the crops.

Run: ``python bench/faithfulness.py`` (Xplique's columns with ``/tmp/xplique-venv/bin/python``,
see ``bench/setup_xplique_env.sh``); ``--quick`` for a smoke run; ``--json out.json`` keeps the
records. The first run trains the models (~5 min on 2 cores); they are cached after.
"""

import argparse
import json
import os
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402
from planted_data import (  # noqa: E402  (bench/planted_data.py, next to this file)
    ARCHITECTURES,
    DATASETS,
    class_motifs,
    make_dataset,
    trained_model,
)
from real_models import class_gradcam, import_xplique, upsample  # noqa: E402
from real_models import mass_inside as _mass_inside  # noqa: E402
from real_models import pointing_game as pointing  # noqa: E402
from scipy.stats import spearmanr  # noqa: E402

from xcraft import CraftTf  # noqa: E402

CONFIGS = (("shapes64", "plain"), ("shapes64", "residual"), ("textures96", "residual"))
# "gradcam@earlier": Grad-CAM of the concept at the earlier layer (``gradcam_layer``).
MAP_METHODS = ("gradcam", "gradcam@earlier", "saliency", "gradient_input", "coefficients",
               "rise")
ESTIMATORS = (  # (label, method, on the crops rather than on the fitted images)
    ("sobol", "sobol", False),
    ("sobol on crops", "sobol", True),
    ("occlusion", "occlusion", False),
    ("tcav", "tcav", False),
)
CLASS_ID = 0


def logits_of(model, images, class_id=CLASS_ID, batch_size=128):
    return np.asarray(model.predict(images, batch_size=batch_size, verbose=0))[:, class_id]


def true_effects(model, data, indices, motifs):
    """Mean class-logit drop when each motif is removed (replaced by the image's background)."""
    images, backgrounds = data["images"][indices], data["backgrounds"][indices]
    base = logits_of(model, images)
    effects = {}
    for name in motifs:
        mask = data["masks"][name][indices]
        has = mask.any(axis=(1, 2))
        if not has.any():
            continue
        removed = np.where(mask[has][..., None], backgrounds[has], images[has])
        effects[name] = float(np.mean(base[has] - logits_of(model, removed)))
    return effects


def motif_crops(data, indices, motif, patch):
    """Crops of side ``patch`` centred on the motif, drawn alone on the image's background and
    resized to the input, and the same boxes of the backgrounds alone."""
    masks = data["masks"][motif][indices]
    keep = np.flatnonzero(masks.any(axis=(1, 2)))
    size = masks.shape[1]
    boxes = []
    for i in keep:
        ys, xs = np.nonzero(masks[i])
        top = int(np.clip(round(ys.mean() - patch / 2), 0, size - patch))
        left = int(np.clip(round(xs.mean() - patch / 2), 0, size - patch))
        boxes.append([top, left, top + patch - 1, left + patch - 1])
    boxes = np.asarray(boxes, np.float32) / (size - 1)
    box_images = indices[keep].astype(np.int32)

    def cut(source):
        return tf.image.crop_and_resize(source, boxes, box_images, (size, size)).numpy()

    # The motif alone on its image's background: no other motif can leak into its crops.
    isolated = np.where(data["masks"][motif][..., None], data["images"], data["backgrounds"])
    return cut(isolated), cut(data["backgrounds"])


def concept_motif_scores(transform, data, indices, motifs, patch):
    """Mean pooled coefficient of every concept on each motif's crops, and on background crops."""
    scores, background = {}, []
    for name in motifs:
        crops, background_crops = motif_crops(data, indices, name, patch)
        if not len(crops):
            continue
        scores[name] = pooled(transform(crops)).mean(axis=0)
        background.append(pooled(transform(background_crops)))
    scores["background"] = np.concatenate(background).mean(axis=0)
    return scores


def pooled(u):
    u = np.asarray(u, np.float64)
    return u.mean(axis=(1, 2)) if u.ndim == 4 else u


def assign(scores):
    """Concept -> the motif (or "background") on whose crops its mean coefficient is highest."""
    names = list(scores)
    table = np.stack([scores[name] for name in names])  # (motifs + 1, r)
    return [names[k] for k in table.argmax(axis=0)]


def concept_of(scores, motif):
    """The concept most specific to ``motif``: highest coefficient on its crops over background."""
    return int(np.argmax(scores[motif] - scores["background"]))


def mass_inside(maps, masks):
    """Mean share of the maps' positive mass inside the masks (0 for an all-zero map)."""
    share = _mass_inside(maps, masks)
    return 0.0 if np.isnan(share) else share


def pearson(maps, masks):
    """Correlation over all pixels of the images between one map per image and the masks."""
    a = np.asarray(maps, np.float64).ravel()
    b = np.asarray(masks, np.float64).ravel()
    if a.std() == 0 or b.std() == 0:
        return 0.0
    return float(np.corrcoef(a, b)[0, 1])


def motif_importance(importances, assignment, motifs):
    pairs = list(zip(importances, assignment, strict=True))
    return {m: float(sum(imp for imp, owner in pairs if owner == m)) for m in motifs}


def agreement(importances, assignment, effects):
    """Spearman with the truth per concept (its motif's effect) and per motif (summed)."""
    importances = np.asarray(importances, np.float64)
    owned = [i for i, owner in enumerate(assignment) if owner in effects]
    per_concept = float("nan")
    if len(owned) > 2 and np.std(importances[owned]) > 0:
        per_concept = spearmanr(importances[owned],
                                [effects[assignment[i]] for i in owned]).statistic
    by_motif = motif_importance(importances, assignment, list(effects))
    names = list(effects)
    estimated = [by_motif[m] for m in names]
    per_motif = float("nan")
    if np.std(estimated) > 0:
        per_motif = spearmanr(estimated, [effects[m] for m in names]).statistic
    return {"per_concept": round(float(per_concept), 3), "per_motif": round(float(per_motif), 3),
            "importances": [round(float(v), 4) for v in importances],
            "by_motif": {m: round(v, 4) for m, v in by_motif.items()}}


def timed(record, name, fn):
    start = time.perf_counter()
    result = fn()
    record[name] = round(time.perf_counter() - start, 2)
    return result


def bench_config(dataset, architecture, args, xplique_cls):
    spec = DATASETS[dataset]
    layer, early_layer = ARCHITECTURES[architecture][1:]
    record = {"config": f"{dataset}-{architecture}", "size": spec["size"], "layer": layer,
              "early_layer": early_layer}
    model, accuracy = timed(record, "model_s", lambda: trained_model(dataset, architecture,
                                                                     verbose=False))
    record["test_accuracy"] = round(accuracy, 3)
    data = make_dataset(spec, args.n_fit + args.n_map, random_state=2024)
    class_indices = np.flatnonzero(data["labels"] == CLASS_ID)
    fit_idx, map_idx = class_indices[:args.n_fit], class_indices[args.n_fit:]
    fit_images, map_images = data["images"][fit_idx], data["images"][map_idx]
    own = class_motifs(spec, CLASS_ID)
    present = [m for m in data["motif_names"] if data["masks"][m][fit_idx].any()]
    effects = true_effects(model, data, fit_idx, present)
    record["true_effects"] = {m: round(v, 3) for m, v in effects.items()}
    record["class_motifs"] = own
    patch = spec["size"] // 2
    record["patch"] = patch

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        craft = CraftTf.from_model(model, layer, number_of_concepts=args.concepts,
                                   patch_size=patch, random_state=0, verbose=False)
        timed(record, "fit_s", lambda: craft.fit(fit_images, class_id=CLASS_ID))
    a = np.asarray(craft.crop_activations_, np.float64)
    residual = a - craft.crops_u_.astype(np.float64) @ craft.concept_bank_w_.astype(np.float64)
    record["nmf_relative_error"] = round(float(np.linalg.norm(residual) / np.linalg.norm(a)), 3)
    scores = concept_motif_scores(craft.transform, data, fit_idx, present, patch)
    assignment = assign(scores)
    record["assignment"] = assignment

    # Importance against the truth.
    importance = {}
    crops = np.asarray(craft.factorization.crops)
    for label, method, on_crops in ESTIMATORS:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            values = timed(record, f"importance_{label}_s", lambda method=method, on=on_crops:
                           craft.estimate_importance(crops if on else None, method=method))
        importance[label] = agreement(values, assignment, effects)
    craft.estimate_importance()  # the default global estimate, kept for decompose's ordering

    # Discovery: coefficient maps against the class motifs' masks.
    map_masks = {m: data["masks"][m][map_idx] for m in own}
    coefficient_maps = craft.concept_attribution_maps(map_images, method="coefficients")
    discovery = {}
    for m in own:
        rho = [pearson(coefficient_maps[:, c], map_masks[m]) for c in range(args.concepts)]
        discovery[m] = {"root": round(max(rho), 3), "root_concept": int(np.argmax(rho))}
    for m in own:
        concept = concept_of(scores, m)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            child = timed(record, f"decompose_{m}_s", lambda c=concept: craft.decompose(
                c, early_layer, number_of_concepts=args.sub_concepts))
        child_maps = child.concept_attribution_maps(map_images, method="coefficients")
        rho = [pearson(child_maps[:, c], map_masks[m]) for c in range(child_maps.shape[1])]
        best = int(np.argmax(rho))
        child_importances = np.asarray(child.importances_)
        child_on_images = np.asarray(child.estimate_importance(fit_images))
        discovery[m].update(
            decomposed=round(max(rho), 3), parent_concept=concept, best_child=best,
            child_importance_crops=round(float(child_importances[best]), 3),
            child_rank_crops=int((child_importances > child_importances[best]).sum()) + 1,
            child_importance_images=round(float(child_on_images[best]), 3),
            child_rank_images=int((child_on_images > child_on_images[best]).sum()) + 1)
    record["discovery"] = discovery

    # Localisation at input resolution.
    localisation = {method: {"mass": [], "pointing": []} for method in MAP_METHODS}
    chance = []
    for m in own:
        has = map_masks[m].any(axis=(1, 2))
        images, masks = map_images[has], map_masks[m][has]
        chance.append(float(masks.mean()))
        concept = concept_of(scores, m)
        for method in MAP_METHODS:
            options = {"n_masks": args.rise_masks} if method == "rise" else {}
            name = method
            if method == "gradcam@earlier":
                name, options = "gradcam", {"gradcam_layer": early_layer}
            maps = timed(record, f"maps_{method}_{m}_s",
                         lambda x=images, c=concept, name=name, o=options:
                         craft.concept_attribution_maps(x, concept_ids=[c], method=name,
                                                        **o))[:, 0]
            localisation[method]["mass"].append(mass_inside(maps, masks))
            localisation[method]["pointing"].append(pointing(maps, masks))
    grid = tuple(int(d) for d in craft.input_to_latent_model.outputs[0].shape[1:3])
    perfect = []
    for m in own:
        has = map_masks[m].any(axis=(1, 2))
        masks = map_masks[m][has]
        cells = tf.image.resize(masks[..., None].astype(np.float32), grid, method="area")
        perfect.append(mass_inside(upsample(cells.numpy()[..., 0], masks.shape[1]), masks))
    record["perfect_at_grid"] = round(float(np.mean(perfect)), 3)
    union = np.any([map_masks[m] for m in own], axis=0)
    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    logit_maps = class_gradcam(g, h, map_images, CLASS_ID)
    record["localisation"] = {
        method: {k: round(float(np.mean(v)), 3) for k, v in scores_.items()}
        for method, scores_ in localisation.items()}
    record["chance"] = round(float(np.mean(chance)), 3)
    record["class_gradcam_on_union"] = {"mass": round(mass_inside(logit_maps, union), 3),
                                        "pointing": round(pointing(logit_maps, union), 3),
                                        "chance": round(float(union.mean()), 3)}
    record["importance"] = importance

    if xplique_cls is not None:
        record["xplique"] = run_xplique(xplique_cls, g, h, data, fit_idx, map_idx, present, own,
                                        effects, patch, args)
    return record


def run_xplique(xplique_cls, g, h, data, fit_idx, map_idx, present, own, effects, patch, args):
    record = {}
    fit_images, map_images = data["images"][fit_idx], data["images"][map_idx]
    craft = xplique_cls(input_to_latent_model=g, latent_to_logit_model=h,
                        number_of_concepts=args.concepts, batch_size=64, patch_size=patch)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        timed(record, "fit_s", lambda: craft.fit(fit_images, class_id=CLASS_ID))
        importances = np.asarray(timed(record, "importance_s", craft.estimate_importance))

    def transform(x):
        return np.asarray(craft.transform(x))

    scores = concept_motif_scores(transform, data, fit_idx, present, patch)
    assignment = assign(scores)
    record["assignment"] = assignment
    record["importance"] = {"sobol": agreement(importances, assignment, effects)}
    coefficients = transform(map_images)
    size = map_images.shape[1]
    discovery, mass, point = {}, [], []
    for m in own:
        masks = data["masks"][m][map_idx]
        maps = np.stack([upsample(coefficients[..., c], size) for c in range(args.concepts)],
                        axis=1)
        rho = [pearson(maps[:, c], masks) for c in range(args.concepts)]
        discovery[m] = round(max(rho), 3)
        has = masks.any(axis=(1, 2))
        concept = concept_of(scores, m)
        mass.append(mass_inside(maps[has, concept], masks[has]))
        point.append(pointing(maps[has, concept], masks[has]))
    record["discovery"] = discovery
    record["localisation"] = {"coefficients": {"mass": round(float(np.mean(mass)), 3),
                                               "pointing": round(float(np.mean(point)), 3)}}
    return record


def print_records(records):
    names = [r["config"] for r in records]
    print("\n| figure | " + " | ".join(names) + " |")
    print("|---|" + "---|" * len(names))

    def row(label, cells):
        print(f"| {label} | " + " | ".join(cells) + " |")

    row("image size / split layer / earlier layer",
        [f"{r['size']} / {r['layer']} / {r['early_layer']}" for r in records])
    row("test accuracy (4 or 3 classes)", [f"{r['test_accuracy']:.3f}" for r in records])
    row("NMF relative error", [f"{r['nmf_relative_error']}" for r in records])
    row("true effects, class motifs (logit drop)",
        [", ".join(f"{m} {r['true_effects'].get(m, float('nan')):.2f}" for m in r["class_motifs"])
         for r in records])
    row("true effects, distractors (min / max)",
        [f"{min(v for m, v in r['true_effects'].items() if m not in r['class_motifs']):.2f} / "
         f"{max(v for m, v in r['true_effects'].items() if m not in r['class_motifs']):.2f}"
         for r in records])
    row("concepts per owner (motif: n)",
        [", ".join(f"{m}: {r['assignment'].count(m)}" for m in dict.fromkeys(r["assignment"]))
         for r in records])
    row("**discovery**: best ρ of a concept with each class motif, root",
        [", ".join(f"{d['root']:.2f}" for d in r["discovery"].values()) for r in records])
    row("same, after `decompose` at the earlier layer",
        [", ".join(f"{d['decomposed']:.2f}" for d in r["discovery"].values()) for r in records])
    row("same, Xplique (root)",
        [", ".join(f"{v:.2f}" for v in r["xplique"]["discovery"].values()) if "xplique" in r
         else "-" for r in records])
    row("best sub-concept's Sobol index on crops (rank) / on images (rank)",
        [", ".join(f"{d['child_importance_crops']:.2f} ({d['child_rank_crops']}) / "
                   f"{d['child_importance_images']:.2f} ({d['child_rank_images']})"
                   for d in r["discovery"].values()) for r in records])
    row("**localisation** chance (motif's share of the pixels)",
        [f"{r['chance']:.3f}" for r in records])
    for method in MAP_METHODS:
        row(f"map mass in its motif / pointing, `{method}`",
            [f"{r['localisation'][method]['mass']:.3f} / "
             f"{r['localisation'][method]['pointing']:.2f}" for r in records])
    row("a perfect map at the split layer's grid, upsampled",
        [f"{r['perfect_at_grid']:.3f}" for r in records])
    row("same, Xplique `coefficients`",
        [f"{r['xplique']['localisation']['coefficients']['mass']:.3f} / "
         f"{r['xplique']['localisation']['coefficients']['pointing']:.2f}" if "xplique" in r
         else "-" for r in records])
    row("Grad-CAM of the class logit, mass in the class motifs / pointing (chance)",
        [f"{r['class_gradcam_on_union']['mass']:.3f} / "
         f"{r['class_gradcam_on_union']['pointing']:.2f} "
         f"({r['class_gradcam_on_union']['chance']:.3f})" for r in records])
    for label, _, _ in ESTIMATORS:
        row(f"**importance** Spearman with the truth per concept / per motif, {label}",
            [f"{r['importance'][label]['per_concept']:.2f} / "
             f"{r['importance'][label]['per_motif']:.2f}" for r in records])
    row("same, Xplique sobol",
        [f"{r['xplique']['importance']['sobol']['per_concept']:.2f} / "
         f"{r['xplique']['importance']['sobol']['per_motif']:.2f}" if "xplique" in r else "-"
         for r in records])
    for method in MAP_METHODS:
        row(f"time of `{method}` maps (s, all class motifs)",
            [f"{sum(v for k, v in r.items() if k.startswith(f'maps_{method}_')):.1f}"
             for r in records])
    row("time fit / Sobol importance (s), xcraft",
        [f"{r['fit_s']:.1f} / {r['importance_sobol_s']:.1f}" for r in records])
    row("same, Xplique",
        [f"{r['xplique']['fit_s']:.1f} / {r['xplique']['importance_s']:.1f}" if "xplique" in r
         else "-" for r in records])


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--configs", nargs="+", default=[f"{d}-{a}" for d, a in CONFIGS],
                        choices=[f"{d}-{a}" for d in DATASETS for a in ARCHITECTURES])
    parser.add_argument("--n-fit", type=int, default=150, help="class images to fit on")
    parser.add_argument("--n-map", type=int, default=40, help="held-out class images for maps")
    parser.add_argument("--concepts", type=int, default=8)
    parser.add_argument("--sub-concepts", type=int, default=4)
    parser.add_argument("--rise-masks", type=int, default=256)
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--quick", action="store_true", help="one config, fewer images")
    args = parser.parse_args(argv)
    if args.quick:
        args.configs, args.n_fit, args.n_map, args.rise_masks = args.configs[:1], 60, 16, 64
    xplique_cls = import_xplique()
    records = []
    for config in args.configs:
        dataset, architecture = config.split("-")
        start = time.perf_counter()
        record = bench_config(dataset, architecture, args, xplique_cls)
        record["total_s"] = round(time.perf_counter() - start, 1)
        print(f"{config}: {record['total_s']} s", flush=True)
        records.append(record)
    print_records(records)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
