"""A self-contained HTML report of fitted CRAFT estimators, with a JSON summary beside it.

``write_report`` turns one fitted :class:`xcraft.CraftTf` per class into two files:

- ``report.html``: one page, no external asset (figures are embedded as base64 PNG data URIs,
  the style is inline CSS), that opens offline in any browser and can be mailed as is. Per class:
  the concepts by decreasing importance with the crops that express them most, the importances
  with their confidence intervals, concept deletion / insertion curves comparing the Sobol order
  with TCAV, occlusion and random orders, per-concept attribution maps on a few images, and the
  concept tree when concepts were decomposed;
- ``summary.json``: the same numbers for programs (concepts, importances, intervals, crop counts,
  refinement metrics, sub-concepts, fidelity AUCs), with the versions and settings that made them.

Both files are written under a temporary name and renamed into place, so an interrupted run never
leaves a truncated report behind. Figures are drawn on ``matplotlib.figure.Figure`` objects with
the Agg renderer: no display is needed and pyplot's global state is never touched.
"""

import base64
import datetime
import html
import io
import json
import numbers
import os
import platform

import numpy as np

from xcraft.plumbing.storage import check_destination, write_files_together

__all__ = ["write_report", "REPORT_FILE", "SUMMARY_FILE"]

REPORT_FILE = "report.html"
SUMMARY_FILE = "summary.json"
SUMMARY_FORMAT_VERSION = 1
#: Side, in pixels, of a crop thumbnail in the report's crop strips.
THUMBNAIL_SIZE = 84
#: Resolution of the embedded figures: sharp on a laptop screen, a few tens of kB per figure.
FIGURE_DPI = 96
#: Concept orders compared with the Sobol order in the fidelity curves.
FIDELITY_ORDERS = ("tcav", "occlusion")
#: How the attribution maps are coloured: one colour range for every map of a class
#: ("shared": a concept with weak maps looks weak) or each map scaled to its own maximum ("each":
#: shows where each concept is, whatever its strength).
MAP_SCALES = ("shared", "each")
#: Width in pixels of the longest importance bar (the most important root concept).
BAR_WIDTH = 120
#: Width of ``main`` (the page) in pixels; the concepts table and the figures fit in it.
PAGE_WIDTH = 1200
#: Below this window width (a phone, a tablet) the concepts table lays each concept out as a
#: block of labelled lines: its fixed columns alone are wider than such a screen.
NARROW_WIDTH = 960
#: Columns of the concepts table and their fixed widths (CSS); the crop strips take the rest
#: of the page and shrink with it (``max-width: 100%``), so the table never scrolls sideways.
CONCEPT_COLUMNS = (("concept", "8em"), ("importance", "7.5em"), ("", f"{BAR_WIDTH + 16}px"),
                   ("95 % interval", "10em"), ("n crops", "5em"), ("top crops", None))
_METHOD_NAMES = {"gradcam": "Grad-CAM", "rise": "RISE", "saliency": "input saliency",
                 "gradient_input": "gradient × input", "coefficients": "upsampled coefficients"}


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_crafts(crafts):
    """Return ``{class_id: craft}`` from a dict, a ``CraftManagerTf`` or a single ``CraftTf``."""
    if hasattr(crafts, "craft_instances"):  # a CraftManagerTf: its fitted classes
        crafts = {
            class_id: craft
            for class_id, craft in crafts.craft_instances.items()
            if getattr(craft, "concept_bank_w_", None) is not None
        }
    elif hasattr(crafts, "concept_bank_w_") or hasattr(crafts, "check_if_fitted"):
        craft = crafts
        crafts = {getattr(craft, "class_id_", 0): craft}
    if not isinstance(crafts, dict):
        raise TypeError(
            f"`crafts` must be a dict mapping class ids to fitted CraftTf, a CraftManagerTf or "
            f"a CraftTf, got {type(crafts).__name__}."
        )
    if not crafts:
        raise ValueError("`crafts` must hold at least one fitted CraftTf, got an empty dict.")
    checked = {}
    for class_id, craft in crafts.items():
        if isinstance(class_id, bool) or not isinstance(class_id, numbers.Integral):
            raise TypeError(
                f"`crafts` keys must be int class ids, got {type(class_id).__name__} "
                f"{class_id!r}."
            )
        if getattr(craft, "concept_bank_w_", None) is None:
            raise ValueError(
                f"`crafts[{class_id}]` must be a fitted CraftTf, got "
                f"{type(craft).__name__} that is not fitted. Call `fit` first."
            )
        checked[int(class_id)] = craft
    return checked


def _class_name(class_names, class_id):
    if class_names is None:
        return f"class {class_id}"
    try:
        return str(class_names[class_id])
    except (IndexError, KeyError, TypeError):
        return f"class {class_id}"


def _images_for(images_for_maps, class_id, craft, n_map_images):
    """The images whose concept attribution maps are drawn for ``class_id``."""
    if isinstance(images_for_maps, dict):
        images = images_for_maps.get(class_id)
    else:
        images = images_for_maps
    if images is None:
        images = craft.images_
    return np.asarray(images)[:n_map_images]


# ---------------------------------------------------------------------------------------------
# Encoding
# ---------------------------------------------------------------------------------------------


def _png_uri(png_bytes):
    return "data:image/png;base64," + base64.b64encode(png_bytes).decode("ascii")


def _figure_uri(figure, tight=True):
    """Render a matplotlib figure to a PNG data URI (Agg, no display).

    ``tight`` crops the figure to what was drawn (an extra layout pass); figures laid out in
    inches by :mod:`xcraft.viz.plots` need none.
    """
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=FIGURE_DPI, bbox_inches="tight" if tight else None,
                   facecolor="white")
    return _png_uri(buffer.getvalue())


def _crop_strip_uri(crops, display, thumbnail_size=THUMBNAIL_SIZE, gap=2):
    """Tile crops side by side into one PNG (thumbnails of ``thumbnail_size`` pixels)."""
    from PIL import Image

    from xcraft.viz.plots import _displayable_images

    pixels = _displayable_images(crops, display)  # (n, h, w) or (n, h, w, 3) in [0, 1]
    tiles = []
    for crop in np.round(pixels * 255).astype(np.uint8):
        tile = Image.fromarray(crop, mode="L" if crop.ndim == 2 else "RGB").convert("RGB")
        height = tile.height
        if height < thumbnail_size:
            # Integer up-scaling with nearest neighbours keeps small crops' pixels crisp.
            factor = max(1, thumbnail_size // height)
            tile = tile.resize((tile.width * factor, height * factor), Image.NEAREST)
        elif height > thumbnail_size:
            width = max(1, round(tile.width * thumbnail_size / height))
            tile = tile.resize((width, thumbnail_size), Image.LANCZOS)
        tiles.append(tile)
    width = sum(tile.width for tile in tiles) + gap * (len(tiles) - 1)
    strip = Image.new("RGB", (max(width, 1), max(tile.height for tile in tiles)), "white")
    x = 0
    for tile in tiles:
        strip.paste(tile, (x, 0))
        x += tile.width + gap
    buffer = io.BytesIO()
    strip.save(buffer, format="PNG")
    return _png_uri(buffer.getvalue())


def _plain(value):
    """Make ``value`` JSON-ready: NumPy scalars and arrays to Python, NaN and inf to None."""
    if isinstance(value, dict):
        return {str(key): _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    if isinstance(value, np.ndarray):
        return _plain(value.tolist())
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        value = float(value)
        return value if np.isfinite(value) else None
    if value is None or isinstance(value, str):
        return value
    return str(value)


def _versions():
    from importlib.metadata import version

    from xcraft.plumbing.storage import library_versions

    return {
        **library_versions(),
        "matplotlib": version("matplotlib"),
        "python": platform.python_version(),
    }


# ---------------------------------------------------------------------------------------------
# What the report holds for one class
# ---------------------------------------------------------------------------------------------


def _intervals(craft):
    """Confidence bounds as an array (2, n_concepts) (lower, upper), or None."""
    sensitivity = getattr(craft, "sensitivity", None)
    intervals = None if sensitivity is None else getattr(sensitivity, "intervals", None)
    if intervals is None:
        return None
    if hasattr(intervals, "low") and hasattr(intervals, "high"):  # a SobolIndices record
        intervals = (intervals.low, intervals.high)
    intervals = np.asarray(intervals, dtype=float)
    n_concepts = craft.concept_bank_w_.shape[0]
    if intervals.shape == (2, n_concepts):
        return intervals
    if intervals.shape == (n_concepts, 2):  # one (low, high) row per concept
        return intervals.T
    return None


def _concept_order(craft):
    importances = getattr(craft, "importances_", None)
    if importances is None:
        return np.arange(craft.concept_bank_w_.shape[0])
    return np.argsort(-np.asarray(importances), kind="stable")


def _annotate_tree(nodes, craft):
    """Add each node's confidence interval (from the estimator it belongs to) to ``to_dict``."""
    intervals = _intervals(craft)
    for node in nodes:
        concept_id = node["concept_id"]
        node["interval"] = None if intervals is None else intervals[:, concept_id].tolist()
        child = getattr(craft, "children_", {}).get(concept_id)
        if child is not None:
            # What the children's numbers are counted among: the parent's strong crops.
            node["children_fitted_on"] = {
                "n_crops": int(len(child.crops_u_)),
                "out_of": int(len(craft.crops_u_)),
            }
            _annotate_tree(node["children"], child)
    return nodes


def _strip_crops(node, n_crops):
    """The node's top crops where the concept is present (coefficient > 0), strongest first.

    ``ConceptNode.top_crops`` sorts by coefficient only: for a concept absent from most crops it
    would fill the strip with crops that do not express it at all.
    """
    u = np.asarray(node.craft.crops_u_)[:, node.concept_id]
    best = np.argsort(-u, kind="stable")[:n_crops]
    best = best[u[best] > 0]
    return node.craft.factorization.crops[best] if len(best) else None


def _fidelity(craft, *, orders, n_random, random_state, verbose=False):
    """Deletion / insertion curves of the Sobol order against the other estimators' orders."""
    from xcraft.craft.fidelity import concept_deletion_insertion
    from xcraft.craft.importance import concept_importance

    head, class_id = craft.latent_to_logit_model, craft.class_id_
    u = craft.transform(craft.images_)  # (n, [h, w,] r)
    w = craft.concept_bank_w_
    named = {}
    importances = getattr(craft, "importances_", None)
    if importances is not None:
        method = getattr(getattr(craft, "sensitivity", None), "method", "sobol")
        named[method] = np.asarray(importances, dtype=np.float64)
    for method in orders:
        if method not in named:
            named[method] = np.asarray(
                concept_importance(u, w, head, class_id, method=method, verbose=verbose),
                dtype=np.float64,
            )
    return concept_deletion_insertion(
        u, w, head, class_id, named, n_random=n_random, random_state=random_state,
        verbose=verbose,
    )


def _importance_figure(craft, class_label):
    from xcraft.viz.plots import new_figure, plot_concepts_importances

    figure = new_figure()
    r = craft.concept_bank_w_.shape[0]
    intervals = _intervals(craft)
    plot_concepts_importances(
        craft.importances_,
        concept_names=[f"C{i}" for i in range(r)],
        intervals=intervals,
        ax=figure.subplots(),
        title=f"Concept importance for {class_label}",
        xlabel="total Sobol index" if _method(craft) == "sobol" else f"{_method(craft)} score",
    )
    figure.set_size_inches(6.0, 0.32 * r + 1.3)
    return _figure_uri(figure)


def _method(craft):
    return getattr(getattr(craft, "sensitivity", None), "method", "sobol")


def _fidelity_figure(result, class_label):
    from xcraft.viz.plots import new_figure, plot_fidelity_curves

    figure = new_figure()
    figure.set_size_inches(10.0, 3.8)
    plot_fidelity_curves(result, axes=figure.subplots(1, 2))
    figure.suptitle(f"Concept deletion and insertion for {class_label}: class logit when the "
                    f"top-k concepts are removed (left) or kept alone (right)",
                    fontsize="medium", y=1.04)
    return _figure_uri(figure)


def _attribution_figure(images, maps, concept_ids, craft, display, method, scale="shared"):
    """PNG data URI of :func:`_attribution_plot`."""
    return _figure_uri(_attribution_plot(images, maps, concept_ids, craft, display, method,
                                         scale), tight=False)


def _attribution_plot(images, maps, concept_ids, craft, display, method, scale="shared"):
    """Grid of images (rows) and their concept attribution maps (columns), overlaid.

    ``scale="shared"`` colours every map of the figure on one range, [0, the largest value of
    all the maps]; ``"each"`` scales each map to its own maximum.
    """
    from xcraft.viz.plots import _displayable_images, _inch_canvas, new_figure

    pixels = _displayable_images(images, display)
    n_images, n_maps = maps.shape[:2]
    importances = getattr(craft, "importances_", None)
    size, gap, top, left = 1.5, 0.08, 0.75, 0.25
    width = left + (n_maps + 1) * (size + gap)
    figure, ax = _inch_canvas(new_figure(), width, top + n_images * (size + gap))
    titles = ["input"] + [
        f"C{i}" + ("" if importances is None else f" ({importances[i]:.2f})") for i in concept_ids
    ]
    for j, title in enumerate(titles):
        ax.text(left + j * (size + gap) + size / 2, top - 0.12, title, ha="center", va="bottom",
                fontsize=10)
    maps = np.maximum(np.asarray(maps, dtype=float), 0.0)
    shared_peak = float(maps.max()) if maps.size and maps.max() > 0 else 1.0
    for i in range(n_images):
        y = top + i * (size + gap)
        image = pixels[i]
        gray = image if image.ndim == 2 else image.mean(axis=-1)
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0, vmax=1,
                  extent=(left, left + size, y + size, y))
        for j in range(n_maps):
            x = left + (j + 1) * (size + gap)
            heat = maps[i, j]
            peak = shared_peak
            if scale == "each":
                peak = float(heat.max()) if heat.size and heat.max() > 0 else 1.0
            ax.imshow(gray, cmap="gray", vmin=0, vmax=1, extent=(x, x + size, y + size, y))
            ax.imshow(heat, cmap="inferno", alpha=0.55, vmin=0, vmax=peak,
                      extent=(x, x + size, y + size, y))
    scaled = (f"one colour scale for all maps, 0 to {shared_peak:.3g}" if scale == "shared"
              else "each map scaled to its own maximum")
    ax.text(width / 2, 0.2, f"Where each concept is: {_METHOD_NAMES.get(method, method)} of the "
            f"concept's coefficient ({scaled})", ha="center", va="center", fontsize=10)
    return figure


def _attribution_maps(craft, images, concept_ids, method):
    """Return (maps or None, what the summary records about them)."""
    record = {"method": method, "n_images": 0, "concept_ids": []}
    try:
        maps = craft.concept_attribution_maps(images, concept_ids=concept_ids, method=method)
    except (ImportError, ValueError) as err:
        if method == "gradcam" and _pooled_activations(craft):
            # Grad-CAM needs a spatial layer; input saliency explains pooled (n, channels)
            # activations as well, so the report still shows where each concept is.
            maps, record = _attribution_maps(craft, images, concept_ids, "saliency")
            record["note"] = "Grad-CAM needs spatial activations; input saliency shown instead."
            return maps, record
        # The rest of the report stands; the page and the summary say why the maps are missing.
        record["error"] = " ".join(str(err).split())
        return None, record
    record.update(n_images=int(len(images)), concept_ids=list(concept_ids))
    return np.asarray(maps), record


def _pooled_activations(craft):
    """Whether g returns (n, channels) activations (no spatial axes)."""
    return np.ndim(craft.crop_activations_) == 2 and _layer_rank(craft) == 2


def _layer_rank(craft):
    try:
        return len(craft.input_to_latent_model.outputs[0].shape)
    except (AttributeError, IndexError, TypeError):
        return None


def _tree_figure(tree, n_crops, display):
    from xcraft.viz.plots import new_figure, plot_concept_tree

    figure = plot_concept_tree(tree, n_crops=n_crops, display=display, figure=new_figure())
    return _figure_uri(figure, tight=False)


def _class_steps(fidelity, n_maps, decomposed):
    """The steps of one class's report, for progress messages."""
    return (["crop strips and importances"] + (["fidelity"] if fidelity else [])
            + (["attribution maps"] if n_maps else []) + (["concept tree"] if decomposed else []))


def _class_report(class_id, craft, *, class_label, images, fidelity, fidelity_orders, n_random,
                  n_crops, n_map_concepts, map_method, map_scale="shared", display,
                  random_state, step=None, verbose=False):
    """Compute the numbers and figures of one class: (summary dict, figures dict).

    ``step(name, detail)`` is called as each step starts (see :func:`_class_steps`).
    """
    from xcraft.craft.recursion import ConceptTree

    step = step or (lambda name, detail: None)
    tree = ConceptTree(craft)
    tree_dict = tree.to_dict()
    concepts = _annotate_tree(tree_dict["concepts"], craft)
    order = _concept_order(craft)
    map_ids = [int(i) for i in order[:n_map_concepts]] if len(images) else []
    step("crop strips and importances", f"{len(tree)} concepts")
    # One strip per node of the tree (sub-concepts included), keyed by its label ("C3.1"),
    # which is the node's "path" in ``to_dict``; None for a concept present in no crop.
    figures = {"strips": {}}
    for node in tree:
        crops = _strip_crops(node, n_crops)
        figures["strips"][node.label] = None if crops is None else _crop_strip_uri(crops,
                                                                                   display)

    importances = getattr(craft, "importances_", None)
    if importances is not None:
        figures["importance"] = _importance_figure(craft, class_label)

    fidelity_summary = None
    if fidelity:
        step("fidelity", f"deletion and insertion, orders {', '.join(fidelity_orders)} and "
                         f"{n_random} random, on {len(craft.images_)} images")
        result = _fidelity(craft, orders=fidelity_orders, n_random=n_random,
                           random_state=random_state, verbose=verbose)
        figures["fidelity"] = _fidelity_figure(result, class_label)
        from xcraft.viz.plots import _same_orders

        fidelity_summary = {
            "n_images": int(len(craft.images_)),
            "n_random": int(n_random),
            "score": "logit",
            "aucs": result.aucs,
            "full_score": float(result.curves["deletion"][next(iter(result.curves["deletion"]))]
                                [0]),
            "same_orders": _same_orders(result),
            "orders": {name: value for name, value in result.orders.items() if name != "random"},
            "curves": {"fractions": result.fractions, **{
                kind: curves for kind, curves in result.curves.items()
            }},
        }

    attribution = {"method": map_method, "n_images": 0, "concept_ids": [], "scale": map_scale}
    if map_ids:
        step("attribution maps", f"{len(images)} images x {len(map_ids)} concepts, "
                                 f"{_METHOD_NAMES.get(map_method, map_method)}")
        maps, attribution = _attribution_maps(craft, images, map_ids, map_method)
        attribution["scale"] = map_scale
        if maps is not None:
            figures["attribution"] = _attribution_figure(images, maps, map_ids, craft, display,
                                                         attribution["method"], map_scale)

    if tree.depth > 0:
        step("concept tree", f"{len(tree)} nodes")
        figures["tree"] = _tree_figure(tree, min(n_crops, 6), display)

    layer = getattr(craft, "_source_layer", None)
    summary = {
        "class_id": int(class_id),
        "class_name": class_label,
        "layer": layer if isinstance(layer, (str, int)) else None,
        "n_images": int(len(craft.images_)),
        "n_crops": int(len(craft.crops_u_)),
        "number_of_concepts": int(craft.concept_bank_w_.shape[0]),
        "importance_method": _method(craft) if importances is not None else None,
        "importance_sum": None if importances is None else float(np.sum(importances)),
        "nmf_relative_error": _relative_error(craft),
        "concepts": concepts,
        "fidelity": fidelity_summary,
        "attribution_maps": attribution,
        "tree_depth": int(tree.depth),
        "params": _params(craft),
    }
    return summary, figures


def _relative_error(craft):
    """‖A − U W‖_F / ‖A‖_F of the fitted crops: how much of the activations the concepts keep."""
    a = np.asarray(craft.crop_activations_, dtype=np.float64)
    residual = a - craft.crops_u_.astype(np.float64) @ craft.concept_bank_w_.astype(np.float64)
    return float(np.linalg.norm(residual) / max(np.linalg.norm(a), np.finfo(float).tiny))


def _params(craft):
    from xcraft.craft.io import _serialisable_params

    try:
        return _serialisable_params(craft)
    except (AttributeError, TypeError, KeyError):  # not a CraftTf: nothing to record
        return {}


# ---------------------------------------------------------------------------------------------
# HTML
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0;
       color: #1d232a; background: #f6f7f9; line-height: 1.45; }
header { background: #22313f; color: #fff; padding: 18px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 1.5em; }
header p { margin: 2px 0; color: #c9d3dd; font-size: 0.9em; }
nav { padding: 10px 32px; background: #e9edf1; font-size: 0.95em; }
nav a { margin-right: 14px; color: #1f5f99; text-decoration: none; }
main { padding: 8px 32px 40px 32px; max-width: PAGE_WIDTHpx; }
section.class { background: #fff; border: 1px solid #dde2e7; border-radius: 6px;
                padding: 8px 22px 18px 22px; margin: 22px 0; overflow-x: auto; }
h2 { border-bottom: 2px solid #22313f; padding-bottom: 4px; }
h3 { margin-top: 26px; color: #22313f; }
table { border-collapse: collapse; font-size: 0.92em; }
th, td { padding: 4px 10px; border-bottom: 1px solid #e3e7eb; text-align: left;
         vertical-align: middle; white-space: nowrap; }
td.note, tr.refined td { white-space: normal; }
table.concepts { width: 100%; table-layout: fixed; }
table.concepts td { overflow-wrap: anywhere; }
th { background: #f0f3f6; }
td.num { text-align: right; font-variant-numeric: tabular-nums; }
td.strip img { max-height: 56px; max-width: 100%; width: auto; height: auto;
               image-rendering: pixelated; display: block; }
tr.refined td { border-bottom: none; padding-top: 0; color: #5a6773; font-size: 0.88em; }
.share { display: block; color: #5a6773; font-size: 0.85em; }
td.sub { padding-left: 26px; color: #3d4a56; }
.bar { display: inline-block; height: 10px; background: #2a7ab9; vertical-align: middle; }
.note { color: #5a6773; font-size: 0.88em; }
.figure img { max-width: 100%; height: auto; border: 1px solid #eef0f2;
              box-sizing: border-box; }
dl.settings { display: grid; grid-template-columns: max-content auto; gap: 2px 14px;
              font-size: 0.9em; }
dl.settings dt { font-weight: 600; } dl.settings dd { margin: 0; font-family: monospace; }
@media (max-width: NARROW_WIDTHpx) {
  header, nav { padding-left: 12px; padding-right: 12px; }
  main { padding: 4px 8px 24px 8px; }
  section.class { padding: 6px 10px 12px 10px; }
  th, td { white-space: normal; overflow-wrap: anywhere; }
  table.concepts, table.concepts tbody, table.concepts tr, table.concepts td { display: block;
      width: auto; }
  table.concepts colgroup, table.concepts tr.head { display: none; }
  table.concepts tr { border-bottom: 1px solid #e3e7eb; padding: 6px 0; }
  table.concepts td { border: none; padding: 1px 0; text-align: left; }
  table.concepts td[data-label]::before { content: attr(data-label) ": "; color: #5a6773; }
  table.concepts .share { display: inline; margin-left: 6px; }
  td.sub { padding-left: 14px; }
  dl.settings { grid-template-columns: auto; }
  dl.settings dd { overflow-wrap: anywhere; margin-bottom: 4px; }
}
""".replace("PAGE_WIDTH", str(PAGE_WIDTH)).replace("NARROW_WIDTH", str(NARROW_WIDTH))


def _fmt(value, digits=3):
    return "–" if value is None else f"{value:.{digits}g}"


def _bar_widths(nodes, max_importance):
    """Bar width in pixels of every node, by path.

    Root concepts share one axis (the most important is ``BAR_WIDTH`` long). Sub-concepts'
    importances are measured through another head (the earlier layer's) among their siblings
    only, so they are not on that axis: the children split their parent's bar in proportion to
    their importances.
    """
    widths = {}

    def walk(nodes, total_width, total):
        for node in nodes:
            importance = node["importance"] or 0.0
            width = 0.0 if total <= 0 else total_width * importance / total
            widths[node["path"]] = width
            children = node["children"]
            walk(children, width, sum(child["importance"] or 0.0 for child in children))

    walk(nodes, BAR_WIDTH, max_importance)
    return widths


def _concept_rows(nodes, strips, widths, depth=0, parent=None):
    """Table rows of concepts, sub-concepts indented under their parent."""
    rows = []
    siblings = sum(node["importance"] or 0.0 for node in nodes)
    for node in nodes:
        importance = node["importance"]
        interval = node.get("interval")
        strip = strips.get(node["path"])
        label_class = ' class="sub"' if depth else ""
        indent = "&nbsp;&nbsp;" * depth + ("↳ " if depth else "")
        label = html.escape(node["path"].split(" → ")[-1])
        interval_text = "–" if interval is None else f"[{_fmt(interval[0])}, {_fmt(interval[1])}]"
        strip_html = ('<span class="note">present in no crop</span>' if strip is None
                      else f'<img alt="top crops" src="{strip}">')
        share = ""
        if depth and importance is not None and siblings > 0:
            share = (f'<span class="share">{100 * importance / siblings:.0f} % of '
                     f'{html.escape(parent)}</span>')
        rows.append(
            f"<tr><td{label_class}>{indent}<b>{label}</b></td>"
            f'<td class="num" data-label="importance">{_fmt(importance)}{share}</td>'
            f'<td><span class="bar" style="width:{widths[node["path"]]:.1f}px"></span></td>'
            f'<td class="num" data-label="95 % interval">{interval_text}</td>'
            f'<td class="num" data-label="n crops">{node["n_crops"]}</td>'
            f'<td class="strip">{strip_html}</td></tr>'
        )
        refinement = node.get("refinement")
        if node["children"]:
            fitted = node.get("children_fitted_on") or {}
            text = (f"{label} refined at layer <code>"
                    f"{html.escape(str(node['children'][0].get('layer')))}</code>"
                    if node["children"][0].get("layer") is not None else f"{label} refined")
            if fitted:
                text += (f": its sub-concepts are fitted on the {fitted['n_crops']} crops where "
                         f"{label}'s coefficient is highest (of all {fitted['out_of']} crops, "
                         f"each refit as one crop), so their <i>n crops</i> add up to "
                         f"{fitted['n_crops']}, not to {label}'s {node['n_crops']}")
            if refinement:
                text += (f"; coherence {refinement['parent_coherence']:.2f} → "
                         f"{np.mean(refinement['child_coherence']):.2f}, relative "
                         f"reconstruction error {refinement['relative_reconstruction_error']:.2f}")
            rows.append(f'<tr class="refined"><td></td><td colspan="{len(CONCEPT_COLUMNS) - 1}">'
                        f"{text}.</td></tr>")
            rows.extend(_concept_rows(node["children"], strips, widths, depth + 1, label))
    return rows


def _concepts_table(concepts, strips, max_importance):
    columns = "".join(f'<col style="width:{width}">' if width else "<col>"
                      for _, width in CONCEPT_COLUMNS)
    header = "".join(f"<th>{html.escape(name)}</th>" for name, _ in CONCEPT_COLUMNS)
    rows = _concept_rows(concepts, strips, _bar_widths(concepts, max_importance))
    return (f'<table class="concepts"><colgroup>{columns}</colgroup><tr class="head">{header}</tr>'
            + "".join(rows) + "</table>")


def _same_orders_note(same):
    """A sentence naming the orders whose curves coincide, or ""."""
    if not same:
        return ""
    pairs = "; ".join(f"{name} and {earlier}" for name, earlier in same.items())
    return (f"Orders agree ({pairs}): the same concept order, so the curves coincide; each "
            f"order is drawn with its own line style and marker.")


def _figure_html(uri, alt, caption):
    return (f'<div class="figure"><img alt="{html.escape(alt)}" src="{uri}">'
            f'<p class="note">{html.escape(caption)}</p></div>')


def _class_html(summary, figures):
    class_id, label = summary["class_id"], summary["class_name"]
    parts = [f'<section class="class" id="class-{class_id}">',
             f"<h2>{html.escape(label)} <span class=\"note\">(class {class_id})</span></h2>",
             f"<p>{summary['n_images']} images, {summary['n_crops']} crops, "
             f"{summary['number_of_concepts']} concepts"
             + ("" if summary["layer"] is None else
                f" at layer <code>{html.escape(str(summary['layer']))}</code>")
             + f"; the concepts reconstruct the crops' activations with a relative error of "
             f"{summary['nmf_relative_error']:.3f}.</p>"]
    importances = [node["importance"] or 0.0 for node in summary["concepts"]]
    max_importance = max(importances) if importances else 0.0
    method = summary["importance_method"] or "not estimated"
    layer = summary["layer"]
    at = "" if layer is None else f" at layer <code>{html.escape(str(layer))}</code>"
    parts.append(
        f"<h3>Concepts by importance</h3><p class=\"note\">Importance: {html.escape(method)}"
        + (" (total Sobol index: the share of the variance of the class logit that involves the "
           "concept when the concepts' coefficients are randomly masked)" if method == "sobol"
           else "")
        + f", for {html.escape(label)} through the head after the split{at}. The root "
          "concepts are relative to each other: one bar axis, the longest bar is the most "
          "important concept. A sub-concept's importance is the same measure for the same "
          "class, but through the earlier layer's head and among its siblings only: it is "
          "relative to its siblings, not to the root concepts, so its bar splits its parent's "
          "bar in proportion to the siblings' importances (the share under the number). "
          "Intervals: 95 % bootstrap intervals over the designs (one reaching above 1 is the "
          "estimator's noise at the ceiling: a share cannot exceed 1, so the estimate is shown "
          "as 1 and the interval as estimated).</p>"
        "<p class=\"note\">The strip shows the crops with the highest coefficient of the "
        "concept (only crops where it is present), strongest first. <i>n crops</i> counts the "
        "crops of the concept's estimator whose activations it dominates (its contribution "
        "u<sub>i</sub> ‖W<sub>i</sub>‖ is the largest; each crop counts once). A concept "
        "may dominate no crop (0) and still be strong in the crops of its strip, which is "
        "where it is strongest. Sub-concepts count among the crops their decomposition was "
        "fitted on (the row under their parent says how many).</p>"
    )
    parts.append(_concepts_table(summary["concepts"], figures["strips"], max_importance))
    if "importance" in figures:
        caption = "Concepts sorted by importance."
        if any(node.get("interval") for node in summary["concepts"]):
            caption += (" Error bars: bootstrap confidence interval over the designs (design "
                        "noise only, not the sampling of images).")
        parts.append(_figure_html(figures["importance"], f"importances of {label}", caption))
    if "fidelity" in figures:
        fidelity = summary["fidelity"]
        parts.append("<h3>Fidelity: do the important concepts carry the decision?</h3>")
        parts.append(_figure_html(
            figures["fidelity"], f"deletion and insertion curves of {label}",
            "Deletion: remove the top-k concepts (by each estimator's order) from every image's "
            "coefficients and re-run the head; a faithful order drops the score fast (low AUC). "
            "Insertion: keep only the top-k; a faithful order raises it fast (high AUC). "
            f"Averaged over {fidelity['n_images']} images; random: mean of "
            f"{fidelity['n_random']} random orders, ±1 std shaded. "
            + _same_orders_note(fidelity.get("same_orders") or {})))
        parts.append(
            "<p class=\"note\">AUCs are in logit units: the area under the curve of the mean "
            "class logit (not a probability) against the fraction of concepts, from 0 to 1, "
            "which is the curve's average logit"
            + ("" if fidelity.get("full_score") is None else
               f"; with every concept kept the mean logit is {_fmt(fidelity['full_score'])}")
            + ".</p>")
        rows = "".join(
            f"<tr><td>{html.escape(name)}</td><td class=\"num\">"
            f"{_fmt(fidelity['aucs']['deletion'][name])}</td><td class=\"num\">"
            f"{_fmt(fidelity['aucs']['insertion'][name])}</td></tr>"
            for name in fidelity["aucs"]["deletion"]
        )
        parts.append("<table><tr><th>order</th><th>deletion AUC (logit) ↓</th>"
                     "<th>insertion AUC (logit) ↑</th>"
                     f"</tr>{rows}</table>")
    attribution = summary["attribution_maps"]
    parts.append("<h3>Concept attribution maps</h3>")
    if "attribution" in figures:
        parts.append(_figure_html(
            figures["attribution"], f"concept attribution maps of {label}",
            (f"{_METHOD_NAMES.get(attribution['method'], attribution['method'])} of each "
            f"concept's coefficient U_i(x) (its NNLS projection onto the concept bank, "
            f"differentiated implicitly), for the {len(attribution['concept_ids'])} most "
            f"important concepts. "
            + ("All maps share one colour scale, from 0 to the largest value of any map: a "
               "dim map is a weak concept there. (write_report(map_scale=\"each\") scales each "
               "map to its own maximum instead.) " if attribution.get("scale") == "shared" else
               "Each map is scaled to its own maximum: it shows where the concept is, not how "
               "strong it is (write_report(map_scale=\"shared\") gives one colour scale). ")
            + attribution.get("note", "")).strip()))
    else:
        reason = attribution.get("error", "no image to explain")
        parts.append(f"<p class=\"note\">Not drawn: {html.escape(reason)}</p>")
    if "tree" in figures:
        parts.append("<h3>Concept tree</h3>")
        parts.append(_figure_html(
            figures["tree"], f"concept tree of {label}",
            "Each decomposed concept's strongest crops, factorised again at an earlier layer: "
            "its sub-concepts, indented below it, with their importance for the class through "
            "the earlier layer's head, relative to their siblings (not to the root concepts)."))
    parts.append("</section>")
    return "\n".join(parts)


def _page(title, summary, sections):
    classes = summary["classes"]
    nav = "".join(
        f'<a href="#class-{entry["class_id"]}">{html.escape(entry["class_name"])}</a>'
        for entry in classes.values()
    )
    settings = "".join(
        f"<dt>{html.escape(str(key))}</dt><dd>{html.escape(json.dumps(value))}</dd>"
        for key, value in summary["settings"].items()
    )
    versions = ", ".join(f"{key} {value}" for key, value in summary["versions"].items())
    return (
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{html.escape(title)}</h1>"
        f"<p>CRAFT concept explanations (Fel et al., CVPR 2023) of {len(classes)} "
        f"class{'es' if len(classes) != 1 else ''}, made {html.escape(summary['created'])}.</p>"
        f"<p>{html.escape(versions)}</p></header>\n<nav>{nav}</nav>\n<main>\n"
        + "\n".join(sections)
        + f"\n<h3>Settings</h3><dl class=\"settings\">{settings}</dl>\n"
        "<p class=\"note\">The numbers of this page are in <code>summary.json</code> beside it."
        "</p>\n</main>\n</body>\n</html>\n"
    )


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def write_report(crafts, out_dir, *, images_for_maps=None, class_names=None, fidelity=True,
                 fidelity_orders=FIDELITY_ORDERS, n_random=10, n_crops=10, n_map_images=4,
                 n_map_concepts=4, map_method="saliency", map_scale="shared", display=None,
                 settings=None, title="xcraft concept report", random_state=0, overwrite=False,
                 extra_sections=None, progress=None, verbose=False):
    """Write a self-contained HTML report and a JSON summary of fitted CRAFT estimators.

    Parameters
    ----------
    crafts : dict of int to CraftTf, CraftManagerTf or CraftTf
        One fitted estimator per class (``estimate_importance`` run for the importance sections;
        ``decompose`` run for the concept trees).
    out_dir : str or os.PathLike
        Directory receiving ``report.html`` and ``summary.json``: new, empty or an earlier
        report (whose two files are replaced together; other files are kept).
    images_for_maps : ndarray of shape (n, height, width, channels) or dict of int to ndarray
        Images whose concept attribution maps are drawn (per class with a dict); the first
        ``n_map_images`` are used. None: each class's first fitted images.
    class_names : sequence of str or dict of int to str, default=None
        ``class_names[class_id]`` titles the sections; ``"class <id>"`` when None.
    fidelity : bool, default=True
        Compute concept deletion / insertion curves (:mod:`xcraft.craft.fidelity`) on each class's
        fitted images, comparing the estimator's importance order with ``fidelity_orders`` and
        random orders.
    fidelity_orders : sequence of {"sobol", "tcav", "occlusion"}, default=("tcav", "occlusion")
        Other importance estimators whose orders are compared (each costs about one head pass
        per image and concept).
    n_random : int, default=10
        Random orders averaged into the fidelity baseline.
    n_crops : int, default=10
        Crops shown per concept.
    n_map_images : int, default=4
        Images with attribution maps per class.
    n_map_concepts : int, default=4
        Most important concepts whose maps are drawn.
    map_method : str, default="saliency"
        Attribution method of :meth:`CraftTf.concept_attribution_maps`.
    map_scale : {"shared", "each"}, default="shared"
        Colour range of the attribution maps: one for all the maps of a class (a weak concept
        looks weak), or each map scaled to its own maximum (where each concept is, whatever its
        strength). The page says which is shown.
    display : callable, default=None
        Maps model inputs (n, h, w, c) to pixels in [0, 1] for display (e.g. undoing the
        preprocessing); None rescales images outside [0, 1] by their min and max.
    settings : dict, default=None
        JSON-ready settings recorded in the summary and shown in the report (e.g. the command
        line that produced it).
    title : str, default="xcraft concept report"
        Title of the page.
    random_state : int, Generator or None, default=0
        Seeds the random fidelity orders.
    overwrite : bool, default=False
        Also write into a non-empty ``out_dir`` that is not an xcraft report (its files are
        kept). Without it such a folder is refused before any work.
    extra_sections : dict of str to (str, dict), default=None
        More sections of the same page, by name: their HTML fragment and their JSON summary
        (stored under ``summary["sections"][name]``). For AfI, ``afi_report_section(afi)`` of
        :mod:`xcraft.viz.afi` returns exactly that pair.
    progress : callable, default=None
        Called with a one-line message (e.g. ``"Bag: fidelity (...) [2/4]"``) as each step of
        each class starts: crop strips and importances, fidelity, attribution maps, concept
        tree, then writing the files. The CLI prints them with the elapsed time.
    verbose : bool, default=False
        Progress bars over the fidelity's and the other orders' head calls (for terminals).

    Returns
    -------
    summary : dict
        What ``summary.json`` holds: ``format_version``, ``created``, ``versions``,
        ``settings``, ``files`` and ``classes`` (keyed by the class id as a string), each with
        ``concepts`` (by decreasing importance: ``concept_id``, ``path``, ``importance``,
        ``interval``, ``n_crops``, ``layer``, ``refinement``, ``children``), ``fidelity``
        (AUCs, orders, curves) and the estimator's parameters.

    Raises
    ------
    TypeError, ValueError
        If ``crafts`` holds no fitted estimator, or on invalid options.

    Examples
    --------
    >>> from xcraft.viz.report import write_report
    >>> summary = write_report({3: craft}, "report_dir", class_names=names)  # doctest: +SKIP
    """
    from xcraft._validation import check_nonnegative_int, check_positive_int, check_random_state
    from xcraft.craft.importance import METHODS

    crafts = _check_crafts(crafts)
    n_crops = check_positive_int(n_crops, "n_crops")
    n_random = check_nonnegative_int(n_random, "n_random")
    n_map_images = check_nonnegative_int(n_map_images, "n_map_images")
    n_map_concepts = check_nonnegative_int(n_map_concepts, "n_map_concepts")
    fidelity_orders = tuple(fidelity_orders)
    for method in fidelity_orders:
        if method not in METHODS:
            listed = ", ".join(repr(m) for m in METHODS)
            raise ValueError(f"`fidelity_orders` must hold names among {listed}, got {method!r}.")
    if display is not None and not callable(display):
        raise TypeError(f"`display` must be callable or None, got {type(display).__name__}.")
    if map_scale not in MAP_SCALES:
        listed = ", ".join(repr(m) for m in MAP_SCALES)
        raise ValueError(f"`map_scale` must be one of {listed}, got {map_scale!r}.")
    if progress is not None and not callable(progress):
        raise TypeError(f"`progress` must be callable or None, got {type(progress).__name__}.")
    if settings is not None and not isinstance(settings, dict):
        raise TypeError(f"`settings` must be a dict or None, got {type(settings).__name__}.")
    rng = check_random_state(random_state)
    out_dir = os.fspath(out_dir)
    # Checked before the work, and the folder is created only with the finished files in it.
    check_destination(out_dir, marker=SUMMARY_FILE, overwrite=overwrite)

    classes, sections = {}, []
    for class_id, craft in crafts.items():
        label = _class_name(class_names, class_id)
        images = _images_for(images_for_maps, class_id, craft, n_map_images)
        steps = _class_steps(bool(fidelity), min(n_map_concepts, len(images)),
                             bool(getattr(craft, "children_", None)))

        def step(name, detail, label=label, steps=steps):
            if progress is not None:
                progress(f"{label}: {name} ({detail}) [{steps.index(name) + 1}/{len(steps)}]")

        summary, figures = _class_report(
            class_id, craft, class_label=label, images=images,
            fidelity=bool(fidelity), fidelity_orders=fidelity_orders, n_random=n_random,
            n_crops=n_crops, n_map_concepts=n_map_concepts, map_method=map_method,
            map_scale=map_scale, display=display, random_state=rng, step=step,
            verbose=bool(verbose),
        )
        classes[str(class_id)] = _plain(summary)
        sections.append(_class_html(classes[str(class_id)], figures))
    extra = {}
    for name, pair in (extra_sections or {}).items():
        if not (isinstance(pair, tuple) and len(pair) == 2 and isinstance(pair[0], str)):
            raise TypeError(
                f"`extra_sections[{name!r}]` must be a pair (html, summary), got "
                f"{type(pair).__name__}."
            )
        sections.append(pair[0])
        extra[str(name)] = _plain(pair[1])

    summary = {
        "format_version": SUMMARY_FORMAT_VERSION,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "settings": _plain(settings or {}),
        "files": {"report": REPORT_FILE, "summary": SUMMARY_FILE},
        "classes": classes,
        **({"sections": extra} if extra else {}),
    }
    if progress is not None:
        progress(f"writing {REPORT_FILE} and {SUMMARY_FILE}")
    page = _page(str(title), summary, sections)
    write_files_together(out_dir, {
        SUMMARY_FILE: json.dumps(summary, indent=2, allow_nan=False) + "\n",
        REPORT_FILE: page,
    })
    return summary
