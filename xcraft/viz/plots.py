"""Matplotlib figures of xcraft results: these functions draw, they never compute.

This is the only module that imports matplotlib; import it explicitly (``import xcraft.viz.plots``)
so that ``import xcraft`` stays free of it. Every function returns the ``Figure`` it drew on.
"""

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "plot_concepts_importances",
    "plot_fidelity_curves",
    "plot_concepts_crops",
    "plot_concept_tree",
    "plot_concept_attribution_maps",
    "plot_image_concepts",
    "plot_attribution_grid",
    "plot_sweep",
    "new_figure",
    "use_file_backend",
]


# ---------------------------------------------------------------------------------------------
# Concept importances and fidelity curves
# ---------------------------------------------------------------------------------------------


def plot_concepts_importances(importances, *, concept_names=None, intervals=None, ax=None,
                              top_k=None, sort=True, color="#2a7ab9", title=None, xlabel=None):
    """Draw concept importances as a horizontal bar chart, most important on top.

    Parameters
    ----------
    importances : array-like of shape (n_concepts,) or SobolIndices
        One value per concept. A :class:`xcraft.ops.sobol.SobolIndices` also gives the intervals.
    concept_names : sequence of str, default=None
        Labels of the concepts; ``"concept i"`` when None.
    intervals : array-like of shape (2, n_concepts), default=None
        Lower and upper bounds drawn as error bars (e.g. bootstrap confidence intervals).
    ax : matplotlib.axes.Axes, default=None
        Axes to draw on; a new figure when None.
    top_k : int, default=None
        Draw only the ``top_k`` most important concepts (all when None).
    sort : bool, default=True
        Sort by decreasing importance; otherwise keep the concept order.
    color : color, default="#2a7ab9"
        Bar colour.
    title, xlabel : str, default=None
        Axes title and x label (``"importance"`` when None).

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    if hasattr(importances, "indices") and hasattr(importances, "low"):
        if intervals is None:
            intervals = (importances.low, importances.high)
        importances = importances.indices
    values = np.asarray(importances, dtype=float)
    if values.ndim != 1 or values.size == 0:
        raise ValueError(
            f"`importances` must have shape (n_concepts,), got shape {values.shape}. "
            f"Average per-image importances over images first."
        )
    n = values.size
    names = [f"concept {i}" for i in range(n)] if concept_names is None else list(concept_names)
    if len(names) != n:
        raise ValueError(
            f"`concept_names` must have one name per concept ({n}), got {len(names)}."
        )
    if intervals is not None:
        bounds = np.asarray(intervals, dtype=float)
        if bounds.shape != (2, n):
            raise ValueError(
                f"`intervals` must have shape (2, {n}) (lower and upper bounds), "
                f"got shape {bounds.shape}."
            )
    order = np.argsort(-values, kind="stable") if sort else np.arange(n)
    if top_k is not None:
        order = order[:top_k]

    if ax is None:
        figure, ax = plt.subplots(figsize=(6.0, 0.35 * len(order) + 1.2))
    else:
        figure = ax.figure
    positions = np.arange(len(order))[::-1]  # first (most important) at the top
    xerr = None
    if intervals is not None:
        # Error bars are offsets from the bar's end; a bound on the wrong side draws nothing.
        xerr = np.stack([np.maximum(values[order] - bounds[0, order], 0.0),
                         np.maximum(bounds[1, order] - values[order], 0.0)])
    ax.barh(positions, values[order], xerr=xerr, color=color, capsize=3 if xerr is not None
            else 0, error_kw={"elinewidth": 1.0})
    ax.set_yticks(positions, [names[i] for i in order])
    ax.axvline(0.0, color="0.3", linewidth=0.8)
    ax.set_xlabel("importance" if xlabel is None else xlabel)
    if title is not None:
        ax.set_title(title)
    ax.spines[["top", "right"]].set_visible(False)
    return figure


#: (line style, marker, marker size) of the compared orders of the fidelity curves, in turn.
_ORDER_STYLES = [("-", "o", 4), ("--", "s", 7), (":", "^", 9), ("-.", "D", 6)]


def _same_orders(result):
    """``{name: earlier name}`` for each order identical to an earlier one (random excluded)."""
    orders = getattr(result, "orders", None) or {}
    same, seen = {}, []
    for name, order in orders.items():
        if name == "random":
            continue
        for earlier in seen:
            if np.array_equal(np.asarray(orders[earlier]), np.asarray(order)):
                same[name] = earlier
                break
        else:
            seen.append(name)
    return same


def plot_fidelity_curves(result, *, score="logit", kinds=("deletion", "insertion"), names=None,
                         axes=None, show_random_band=True):
    """Draw deletion and insertion curves of a fidelity result, with their AUCs in the legend.

    Parameters
    ----------
    result : FidelityCurves
        Output of :func:`xcraft.craft.fidelity.concept_deletion_insertion`.
    score : {"logit", "proba"}, default="logit"
        Draw the class logit or its softmax probability.
    kinds : sequence of {"deletion", "insertion"}, default=("deletion", "insertion")
        One panel per kind.
    names : sequence of str, default=None
        Orders to draw (all when None); ``"random"`` is drawn dashed, with a ±1 std band.
    axes : sequence of matplotlib.axes.Axes, default=None
        One axes per kind; a new figure when None.
    show_random_band : bool, default=True
        Shade ±1 standard deviation of the random orders.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    if score not in ("logit", "proba"):
        raise ValueError(f"`score` must be one of 'logit', 'proba', got {score!r}.")
    kinds = [kinds] if isinstance(kinds, str) else list(kinds)
    for kind in kinds:
        if kind not in ("deletion", "insertion"):
            raise ValueError(f"`kinds` must hold 'deletion' or 'insertion', got {kind!r}.")
    if axes is None:
        figure, axes = plt.subplots(1, len(kinds), figsize=(5.0 * len(kinds), 3.8),
                                    squeeze=False)
        axes = axes[0]
    else:
        axes = np.atleast_1d(axes)
        if len(axes) != len(kinds):
            raise ValueError(f"`axes` must hold one axes per kind ({len(kinds)}), "
                             f"got {len(axes)}.")
        figure = axes[0].figure
    suffix = "" if score == "logit" else "_proba"
    cycle = plt.rcParams["axes.prop_cycle"].by_key().get("color", ["C0"])
    same = _same_orders(result)

    for ax, kind in zip(axes, kinds, strict=True):
        key = kind + suffix
        curves, aucs = result.curves[key], result.aucs[key]
        drawn = list(curves) if names is None else list(names)
        styles = iter(_ORDER_STYLES * len(drawn))
        for i, name in enumerate(drawn):
            if name not in curves:
                raise ValueError(
                    f"`names` must be among {sorted(curves)}, got {name!r}."
                )
            label = f"{name} (AUC {aucs[name]:.3g})"
            if name in same:
                label += f", same order as {same[name]}"
            if name == "random":
                ax.plot(result.fractions, curves[name], color="0.4", linestyle="--", label=label)
                if show_random_band and key in result.random_std:
                    std = result.random_std[key]
                    ax.fill_between(result.fractions, curves[name] - std, curves[name] + std,
                                    color="0.6", alpha=0.25, linewidth=0)
            else:
                # Orders often agree (Sobol and occlusion on a few strong concepts): each order
                # has its own line style and marker, later ones hollow and larger, so a curve
                # drawn over another leaves it visible.
                linestyle, marker, size = next(styles)
                colour = cycle[i % len(cycle)]
                ax.plot(result.fractions, curves[name], linestyle=linestyle, marker=marker,
                        markersize=size, color=colour, markerfacecolor=colour if size <= 4
                        else "none", label=label)
        ax.set_xlabel(f"fraction of concepts {'removed' if kind == 'deletion' else 'kept'}")
        ax.set_ylabel("class logit (mean over images)" if score == "logit"
                      else "class probability")
        ax.set_title(kind)
        ax.legend(fontsize="small")
        ax.spines[["top", "right"]].set_visible(False)
    return figure


# ---------------------------------------------------------------------------------------------
# Concept crops and concept trees
# ---------------------------------------------------------------------------------------------

# Layout of the crop grids, in inches: one Axes spans the figure and its data unit is one inch,
# so that many crops cost one Axes (an Axes per crop makes large trees slow to draw).
_CROP_SIZE = 1.0
_CROP_GAP = 0.06
_TITLE_HEIGHT = 0.45
#: Font sizes (points) of the concept tree: read at 100 % in a report drawn at 96 dpi, where a
#: point is 1.33 px (matplotlib's "x-small", 6.9 pt, is 9 px there: too small).
TREE_LABEL_FONTSIZE = 13
TREE_DETAIL_FONTSIZE = 11


def new_figure():
    """Return a bare matplotlib Figure, for drawing off screen (reports, files).

    It renders with Agg on ``savefig`` and is never registered with pyplot, so it needs no
    display and does not leak into a notebook's output.
    """
    from matplotlib.figure import Figure

    return Figure()


def _displayable_images(images, display=None):
    """Return images ready for ``imshow``: (n, h, w) gray or (n, h, w, 3) RGB, in [0, 1].

    ``display`` maps the model's inputs back to [0, 1] pixels (e.g. undoing a preprocessing);
    without it, images outside [0, 1] are rescaled together by their common min and max, so the
    crops of one figure keep their relative brightness.
    """
    images = np.asarray(images if display is None else display(np.asarray(images)), dtype=float)
    if images.ndim == 4 and images.shape[-1] == 1:
        images = images[..., 0]  # (n, h, w): drawn with a gray colour map
    if display is None and images.size:
        low, high = float(images.min()), float(images.max())
        if low < 0.0 or high > 1.0:
            images = (images - low) / max(high - low, np.finfo(float).tiny)
    return np.clip(images, 0.0, 1.0)


def _inch_canvas(figure, width, height):
    """Size ``figure`` to ``width`` x ``height`` inches; return one Axes in inch units, y down."""
    if figure is None:
        figure = plt.figure()
    figure.set_size_inches(width, height)
    ax = figure.add_axes((0.0, 0.0, 1.0, 1.0))
    ax.set_xlim(0.0, width)
    ax.set_ylim(height, 0.0)
    ax.set_aspect("equal")
    ax.axis("off")
    return figure, ax


def _draw_crop_row(ax, images, x, y, size):
    """Draw ``images`` (displayable) left to right from (x, y), each ``size`` inches square."""
    for image in images:
        ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0,
                  interpolation="nearest", extent=(x, x + size, y + size, y))
        x += size + _CROP_GAP


def _top_crop_indices(crops_u, concept_id, n_crops):
    """Crops with the highest coefficient of ``concept_id``, strongest first."""
    return np.argsort(-np.asarray(crops_u)[:, concept_id], kind="stable")[:n_crops]


def _rank_colours(sensitivity, n_concepts):
    """Colour of every concept id: ``cmaps[rank]`` as in Xplique, black without importances."""
    colours = ["black"] * n_concepts
    if sensitivity is None or not getattr(sensitivity, "cmaps", None):
        return colours
    for rank, concept_id in enumerate(np.asarray(sensitivity.most_important_concepts)):
        colours[int(concept_id)] = sensitivity.cmaps[rank % len(sensitivity.cmaps)]
    return colours


def _check_count(value, name):
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{name}` must be an int >= 1, got {value!r}.")
    return int(value)


def plot_concepts_crops(craft, nb_crops=10, nb_most_important_concepts=None, *, concept_ids=None,
                        display=None, figure=None):
    """Draw the crops that most express each concept, one row per concept.

    Parameters
    ----------
    craft : CraftTf
        A fitted estimator. With importances (``estimate_importance``) the rows go by decreasing
        importance and each row's label carries the concept's importance and colour; otherwise
        by concept id.
    nb_crops : int, default=10
        Crops per concept: those with the highest coefficient ``U[:, i]``, strongest on the left.
    nb_most_important_concepts : int, default=None
        Draw only this many concepts (all when None).
    concept_ids : sequence of int, default=None
        Draw exactly these concepts, in this order (overrides the two orderings above).
    display : callable, default=None
        Maps model inputs (n, h, w, c) to pixels in [0, 1], e.g. undoing the preprocessing.
        Without it, crops outside [0, 1] are rescaled by their common min and max.
    figure : matplotlib.figure.Figure, default=None
        Empty figure to draw on (its size is set here); a new pyplot figure when None.

    Returns
    -------
    figure : matplotlib.figure.Figure

    Examples
    --------
    >>> from xcraft.viz.plots import plot_concepts_crops
    >>> figure = plot_concepts_crops(craft, nb_crops=8)       # doctest: +SKIP
    """
    if getattr(craft, "concept_bank_w_", None) is None:
        raise ValueError("`craft` must be a fitted CraftTf, got one that is not fitted yet.")
    nb_crops = _check_count(nb_crops, "nb_crops")
    n_concepts = craft.concept_bank_w_.shape[0]
    sensitivity = getattr(craft, "sensitivity", None)
    importances = getattr(craft, "importances_", None)
    if concept_ids is None:
        concept_ids = (np.asarray(sensitivity.most_important_concepts) if sensitivity is not None
                       else np.arange(n_concepts))
        if nb_most_important_concepts is not None:
            concept_ids = concept_ids[: _check_count(nb_most_important_concepts,
                                                     "nb_most_important_concepts")]
    concept_ids = [int(i) for i in concept_ids]
    if not concept_ids or any(not 0 <= i < n_concepts for i in concept_ids):
        raise ValueError(
            f"`concept_ids` must hold concept ids in [0, {n_concepts - 1}], got {concept_ids}."
        )
    colours = _rank_colours(sensitivity, n_concepts)
    crops = craft.factorization.crops  # lazy: only the drawn crops are cut
    n_crops = min(nb_crops, len(crops))

    label_width, row_height = 1.2, _CROP_SIZE + 2 * _CROP_GAP
    width = label_width + n_crops * (_CROP_SIZE + _CROP_GAP)
    height = _TITLE_HEIGHT + len(concept_ids) * row_height
    figure, ax = _inch_canvas(figure, width, height)
    for row, concept_id in enumerate(concept_ids):
        y = _TITLE_HEIGHT + row * row_height
        best = _top_crop_indices(craft.crops_u_, concept_id, n_crops)
        _draw_crop_row(ax, _displayable_images(crops[best], display), label_width, y, _CROP_SIZE)
        label = f"C{concept_id}"
        if importances is not None:
            label += f"\n{importances[concept_id]:.3g}"
        ax.text(label_width - 0.12, y + _CROP_SIZE / 2, label, ha="right", va="center",
                fontsize="medium", color=colours[concept_id])
    ax.text(width / 2, _TITLE_HEIGHT / 2, f"Top {n_crops} crops per concept (class "
            f"{craft.class_id_}), strongest on the left", ha="center", va="center",
            fontsize="medium")
    return figure


def _tree_prefixes(paths, separator):
    """Box-drawing prefixes ("├─ ", "│  └─ ", ...) of depth-first ordered node paths."""
    parents = [path.rsplit(separator, 1)[0] if separator in path else None for path in paths]
    is_last = {
        path: all(parents[j] != parents[i] for j in range(i + 1, len(paths)))
        for i, path in enumerate(paths)
    }
    prefixes = []
    for path in paths:
        parts = path.split(separator)
        if len(parts) == 1:
            prefixes.append("")
            continue
        ancestors = [separator.join(parts[: k + 1]) for k in range(1, len(parts) - 1)]
        prefix = "".join("   " if is_last[a] else "│  " for a in ancestors)
        prefixes.append(prefix + ("└─ " if is_last[path] else "├─ "))
    return prefixes


def plot_concept_tree(tree, n_crops=5, *, nb_most_important_concepts=None, max_depth=None,
                      display=None, figure=None):
    """Draw a concept tree: one row per concept, indented under its parent, with its top crops.

    Parameters
    ----------
    tree : xcraft.craft.recursion.ConceptTree
        The tree of a fitted estimator; its decompositions (``decompose``) are the branches.
    n_crops : int, default=5
        Crops per concept, those with the highest coefficient of the concept in its estimator.
    nb_most_important_concepts : int, default=None
        Keep only this many root concepts (by importance), with their sub-concepts.
    max_depth : int, default=None
        Deepest level drawn (0: the root's concepts only); all levels when None.
    display : callable, default=None
        Maps model inputs to pixels in [0, 1]; see :func:`plot_concepts_crops`.
    figure : matplotlib.figure.Figure, default=None
        Empty figure to draw on (its size is set here); a new pyplot figure when None.

    Returns
    -------
    figure : matplotlib.figure.Figure

    Examples
    --------
    >>> from xcraft.craft.recursion import ConceptTree
    >>> figure = ConceptTree(craft).plot(n_crops=4)            # doctest: +SKIP
    """
    separator = tree.separator  # the tree names its paths; the drawing only splits them
    n_crops = _check_count(n_crops, "n_crops")
    nodes = list(tree)
    if max_depth is not None:
        nodes = [node for node in nodes if node.depth <= max_depth]
    if nb_most_important_concepts is not None:
        keep = _check_count(nb_most_important_concepts, "nb_most_important_concepts")
        roots = [node.path for node in nodes if node.depth == 0][:keep]
        nodes = [node for node in nodes if node.path.split(separator)[0] in roots]
    prefixes = _tree_prefixes([node.path for node in nodes], separator)

    texts = []
    for node, prefix in zip(nodes, prefixes, strict=True):
        details = [] if node.importance is None else [
            f"importance {node.importance:.3g}" + (" among siblings" if node.depth else "")]
        layer = getattr(node.craft, "_source_layer", None)
        if isinstance(layer, str):
            details.append(f"@ {layer}")
        lines = [prefix + node.label, " " * len(prefix) + "  ".join(details)]
        if node.refinement is not None:
            lines.append(" " * len(prefix)
                         + f"refined: coherence gain {node.refinement['coherence_gain']:+.2f}")
        texts.append(lines)
    # Monospace text: the label column is as wide as its longest line (0.6 em per character).
    longest = max((len(line) for lines in texts for line in lines), default=10)
    label_width = 0.2 + longest * 0.6 * TREE_DETAIL_FONTSIZE / 72
    size = 0.9
    row_height = max(size, 0.2 + max(map(len, texts), default=2) * 1.35 * TREE_DETAIL_FONTSIZE
                     / 72) + 2 * _CROP_GAP
    width = label_width + n_crops * (size + _CROP_GAP)
    height = _TITLE_HEIGHT + len(nodes) * row_height
    figure, ax = _inch_canvas(figure, width, height)
    for row, (node, lines) in enumerate(zip(nodes, texts, strict=True)):
        y = _TITLE_HEIGHT + row * row_height
        colour = _rank_colours(getattr(node.craft, "sensitivity", None),
                               node.craft.concept_bank_w_.shape[0])[node.concept_id]
        ax.text(0.1, y + 0.05, lines[0], family="monospace", fontsize=TREE_LABEL_FONTSIZE,
                fontweight="bold" if node.depth == 0 else "normal", color=colour, va="top")
        ax.text(0.1, y + 0.1 + 1.35 * TREE_LABEL_FONTSIZE / 72, "\n".join(lines[1:]),
                family="monospace", fontsize=TREE_DETAIL_FONTSIZE, color="0.2", va="top",
                linespacing=1.25)
        _draw_crop_row(ax, _displayable_images(node.top_crops(n_crops), display), label_width,
                       y, size)
    ax.text(width / 2, _TITLE_HEIGHT / 2, f"Concept tree of class {tree.root.class_id_} (top "
            f"{n_crops} crops per concept)", ha="center", va="center",
            fontsize=TREE_LABEL_FONTSIZE)
    return figure


# ---------------------------------------------------------------------------------------------
# Concept attribution maps
# ---------------------------------------------------------------------------------------------


def _attribution_colours(n_concepts):
    """``n_concepts`` distinct RGB colours: tab10 / tab20 while they last, then an even hue wheel.

    Xplique cycles a fixed list of 16 colour maps; sampling a colour map instead scales to any
    number of concepts.
    """
    import matplotlib

    if n_concepts <= 10:
        colours = matplotlib.colormaps["tab10"](np.arange(n_concepts))
    elif n_concepts <= 20:
        colours = matplotlib.colormaps["tab20"](np.arange(n_concepts))
    else:
        colours = matplotlib.colormaps["hsv"](np.linspace(0.0, 1.0, n_concepts, endpoint=False))
    return np.asarray(colours)[:, :3]


def _attribution_image(image):
    """Return one image ready for ``imshow`` ((h, w) gray or (h, w, 3) RGB in [0, 1])."""
    image = np.asarray(image, dtype=float)
    if image.ndim == 4 and image.shape[0] == 1:
        image = image[0]
    if image.ndim == 3 and image.shape[-1] == 1:
        image = image[..., 0]
    if image.ndim not in (2, 3) or (image.ndim == 3 and image.shape[-1] not in (3, 4)):
        raise ValueError(
            f"`image` must have shape (height, width), (height, width, 1) or "
            f"(height, width, 3), got shape {image.shape}."
        )
    image = image[..., :3] if image.ndim == 3 else image
    low, high = float(image.min()), float(image.max())
    if low < 0.0 or high > 1.0:
        image = (image - low) / max(high - low, np.finfo(float).tiny)
    return np.clip(image, 0.0, 1.0)


def _attribution_inputs(image, maps, concept_ids, importances):
    """Check and align the arguments of the attribution plots."""
    image = _attribution_image(image)
    maps = np.asarray(maps, dtype=float)
    if maps.ndim == 2:
        maps = maps[None]
    if maps.ndim != 3 or maps.shape[1:] != image.shape[:2]:
        raise ValueError(
            f"`maps` must have shape (n_concepts, {image.shape[0]}, {image.shape[1]}) to match "
            f"`image`, got shape {maps.shape}. Pass one image's maps, e.g. `maps[0]`."
        )
    n_maps = maps.shape[0]
    concept_ids = np.arange(n_maps) if concept_ids is None else np.asarray(concept_ids).ravel()
    if concept_ids.shape != (n_maps,):
        raise ValueError(
            f"`concept_ids` must have one id per map ({n_maps}), got {concept_ids.shape[0]}."
        )
    if importances is not None:
        importances = np.asarray(importances, dtype=float).ravel()
        if importances.shape != (n_maps,):
            raise ValueError(
                f"`importances` must have one value per map ({n_maps}), "
                f"got {importances.shape[0]}."
            )
    return image, np.nan_to_num(maps), concept_ids, importances


#: Maps are scaled by this percentile of their positive values, not by their maximum: gradient
#: maps (saliency, SmoothGrad) are heavy-tailed, and scaled by a few hot pixels the rest of the
#: map drew at a few percent opacity, invisible on a photograph.
ROBUST_PEAK_PERCENTILE = 99.0
#: Opacity, as a share of ``alpha``, of the weakest pixel that passes ``filter_percentile``:
#: a kept pixel is meant to be seen.
MIN_VISIBLE_OPACITY = 0.35


def _normalised_map(heatmap, filter_percentile):
    """Scale a map to [0, 1] by a robust peak and zero it below its ``filter_percentile``."""
    heatmap = np.maximum(np.asarray(heatmap, dtype=float), 0.0)
    positive = heatmap[heatmap > 0.0]
    if not positive.size:
        return np.zeros_like(heatmap)
    peak = np.percentile(positive, ROBUST_PEAK_PERCENTILE)
    if peak <= 0.0:
        peak = positive.max()
    heatmap = np.minimum(heatmap / peak, 1.0)
    if filter_percentile:
        heatmap = np.where(heatmap >= np.percentile(heatmap, filter_percentile), heatmap, 0.0)
    return heatmap


def _overlay(ax, image, maps, colours, alpha, filter_percentile):
    """Draw ``image`` and, at every pixel, the colour of its strongest concept map.

    Each pixel takes the colour of the concept whose normalised map is largest there, with an
    opacity rising from ``MIN_VISIBLE_OPACITY * alpha`` (the weakest kept pixel) to ``alpha``:
    overlapping concepts stay readable for any count, and a kept pixel is visible.
    """
    ax.imshow(image, cmap="gray" if image.ndim == 2 else None, vmin=0.0, vmax=1.0)
    if not len(maps):
        return
    ax.imshow(_overlay_layer(maps, colours, alpha, filter_percentile), interpolation="bilinear")


def _overlay_layer(maps, colours, alpha, filter_percentile):
    """The RGBA layer :func:`_overlay` draws over the image, of shape (height, width, 4)."""
    normalised = np.stack([_normalised_map(m, filter_percentile) for m in maps])  # (k, h, w)
    strongest = np.argmax(normalised, axis=0)  # (h, w)
    strength = np.max(normalised, axis=0)
    layer = np.zeros((*strength.shape, 4))
    layer[..., :3] = np.asarray(colours)[strongest][..., :3]
    opacity = MIN_VISIBLE_OPACITY + (1.0 - MIN_VISIBLE_OPACITY) * strength
    layer[..., 3] = np.where(strength > 0.0, alpha * opacity, 0.0)
    return layer


def plot_concept_attribution_maps(image, maps, concept_ids=None, importances=None, *, alpha=0.6,
                                  filter_percentile=70, ax=None, legend=True, title=None):
    """Overlay the attribution maps of several concepts on one image, one colour per concept.

    Parameters
    ----------
    image : array-like of shape (height, width, channels) or (height, width)
        The image, displayed as is if in [0, 1], else min-max rescaled.
    maps : array-like of shape (n_maps, height, width)
        One image's attribution maps, e.g. ``concept_attribution_maps(...)[i]``.
    concept_ids : sequence of int, default=None
        The concept id of each map, for the legend; ``None`` means 0..n_maps-1.
    importances : array-like of shape (n_maps,), default=None
        Shown in the legend, which is then sorted by decreasing importance.
    alpha : float, default=0.6
        Opacity of the strongest point of a map.
    filter_percentile : float, default=70
        Each map is hidden below this percentile of its own values (0 shows everything).
    ax : matplotlib.axes.Axes, default=None
        Where to draw; a new figure if None.
    legend : bool, default=True
        Draw a legend of the concept colours.
    title : str, default=None

    Returns
    -------
    matplotlib.figure.Figure

    Notes
    -----
    Colours come from ``tab10`` / ``tab20`` up to 20 concepts, then from evenly spaced hues, so
    any number of concepts can be drawn (Xplique's fixed list stops at 16).
    """
    from matplotlib.patches import Patch

    image, maps, concept_ids, importances = _attribution_inputs(
        image, maps, concept_ids, importances
    )
    figure = plt.figure(figsize=(5, 5)) if ax is None else ax.figure
    ax = figure.add_subplot(1, 1, 1) if ax is None else ax
    colours = _attribution_colours(len(maps))
    _overlay(ax, image, maps, colours, alpha, filter_percentile)
    ax.set_xticks([])
    ax.set_yticks([])
    if title is not None:
        ax.set_title(title)
    if legend and len(maps):
        order = np.arange(len(maps)) if importances is None else np.argsort(-importances)
        labels = [
            f"concept {concept_ids[i]}"
            + ("" if importances is None else f" ({importances[i]:.3g})")
            for i in order
        ]
        handles = [
            Patch(color=colours[i], label=label) for i, label in zip(order, labels, strict=True)
        ]
        ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.02, 1.0), fontsize="small",
                  frameon=False, ncol=1 + len(maps) // 20)
    return figure


def plot_attribution_grid(images, maps, concept_ids, importances, *, cols=5, img_size=2.0,
                          alpha=0.6, filter_percentile=90):
    """Draw :func:`plot_concept_attribution_maps` for several images on a grid.

    Parameters
    ----------
    images : ndarray of shape (n, height, width, channels)
    maps : ndarray of shape (n, k, height, width)
        The maps of ``concept_ids`` for each image.
    concept_ids : sequence of int of length k
    importances : array-like of shape (k,)
        Importances of ``concept_ids`` (legend labels).
    cols : int, default=5
        Images per row.
    img_size : float, default=2.0
        Inches per image.
    alpha, filter_percentile
        See :func:`plot_concept_attribution_maps`.

    Returns
    -------
    matplotlib.figure.Figure
        Legends are drawn beside the last image of the first row and beside the last image
        (the same one when the grid has one row).
    """
    cols = min(_check_count(cols, "cols"), len(images))
    rows = int(np.ceil(len(images) / cols))
    figure, axes = plt.subplots(
        rows, cols, figsize=(cols * img_size + 2.5, rows * img_size), squeeze=False
    )
    for index, ax in enumerate(axes.ravel()):
        if index >= len(images):
            ax.axis("off")
            continue
        plot_concept_attribution_maps(
            images[index], maps[index], concept_ids, importances, alpha=alpha,
            filter_percentile=filter_percentile, ax=ax,
            legend=index == cols - 1 or index == len(images) - 1,
        )
    return figure


def use_file_backend():
    """Switch matplotlib to Agg: a program that writes files must never open windows."""
    import matplotlib

    matplotlib.use("Agg")


def plot_image_concepts(image, maps, importances=None, *, concept_ids=None, n_concepts=5,
                        crops=None, n_crops=4, alpha=0.6, filter_percentile=70, figure=None):
    """Draw an image with its most important concepts overlaid, then one panel per concept.

    Parameters
    ----------
    image : array-like of shape (height, width, channels) or (height, width)
    maps : array-like of shape (n_maps, height, width)
        The image's attribution maps (e.g. ``craft.concept_attribution_maps(image[None])[0]``).
    importances : array-like of shape (n_maps,), default=None
        Local importances of the maps' concepts: the ``n_concepts`` largest are drawn, most
        important first. ``None`` keeps the first ``n_concepts`` maps in order.
    concept_ids : sequence of int, default=None
        The concept id of each map (for the titles); ``None`` means 0..n_maps-1.
    n_concepts : int, default=5
        How many concepts to draw.
    crops : sequence of array-like, default=None
        ``crops[j]`` are example crops (m, h, w, channels) of the concept of map j, e.g. its
        strongest training crops; up to ``n_crops`` are drawn under its panel.
    n_crops : int, default=4
    alpha, filter_percentile : float
        As in :func:`plot_concept_attribution_maps`.
    figure : matplotlib.figure.Figure, default=None
        Drawn on (cleared) if given.

    Returns
    -------
    matplotlib.figure.Figure
    """
    image, maps, concept_ids, importances = _attribution_inputs(
        image, maps, concept_ids, importances
    )
    if isinstance(n_concepts, bool) or not isinstance(n_concepts, (int, np.integer)) \
            or n_concepts < 1:
        raise ValueError(f"`n_concepts` must be an int >= 1, got {n_concepts!r}.")
    if crops is not None and len(crops) != len(maps):
        raise ValueError(f"`crops` must hold one array per map ({len(maps)}), got {len(crops)}.")
    order = np.arange(len(maps)) if importances is None else np.argsort(-importances)
    order = order[:n_concepts]
    colours = _attribution_colours(len(maps))

    n_rows = 1 if crops is None else 2
    if figure is None:
        figure = plt.figure(figsize=(3.0 * (len(order) + 1), 3.2 * n_rows))
    else:
        figure.clear()
    grid = figure.add_gridspec(n_rows, len(order) + 1)
    main = figure.add_subplot(grid[:, 0])
    _overlay(main, image, maps[order], colours[order], alpha, filter_percentile)
    main.set_title("image")
    main.axis("off")
    for column, j in enumerate(order, start=1):
        ax = figure.add_subplot(grid[0, column])
        _overlay(ax, image, maps[j:j + 1], colours[j:j + 1], alpha, filter_percentile)
        label = f"concept {concept_ids[j]}"
        if importances is not None:
            label += f"\nimportance {importances[j]:.3g}"
        ax.set_title(label, color=colours[j])
        ax.axis("off")
        if crops is not None and len(crops[j]):
            ax = figure.add_subplot(grid[1, column])
            ax.imshow(_crop_mosaic(np.asarray(crops[j])[:n_crops]),
                      cmap="gray" if np.asarray(crops[j]).shape[-1] == 1 else None)
            ax.set_title("crops", fontsize="small")
            ax.axis("off")
    return figure


def _crop_mosaic(crops):
    """Tile (m, h, w, c) crops into a near-square mosaic in [0, 1]."""
    crops = np.asarray(crops, dtype=float)
    low, high = float(crops.min()), float(crops.max())
    if low < 0.0 or high > 1.0:
        crops = (crops - low) / max(high - low, np.finfo(float).tiny)
    if crops.shape[-1] == 1:
        crops = crops[..., 0]
    n = crops.shape[0]
    side = int(np.ceil(np.sqrt(n)))
    pad = side * side - n
    crops = np.concatenate([crops, np.ones((pad, *crops.shape[1:]))]) if pad else crops
    rows = [np.concatenate(list(crops[i * side:(i + 1) * side]), axis=1) for i in range(side)]
    return np.clip(np.concatenate(rows, axis=0), 0.0, 1.0)


# ---------------------------------------------------------------------------------------------
# Layer x rank sweep
# ---------------------------------------------------------------------------------------------


def plot_sweep(result, *, figure=None):
    """Draw a :func:`xcraft.craft.sweep.sweep`: error, decisions kept and stability vs rank.

    One line per layer in each of three panels; the recommended candidate is ringed.

    Parameters
    ----------
    result : dict
        What ``sweep`` returned.
    figure : matplotlib.figure.Figure, default=None
        Empty figure to draw on; a new pyplot figure when None.

    Returns
    -------
    figure : matplotlib.figure.Figure
    """
    rows = result["rows"]
    layers = list(dict.fromkeys(row["layer"] for row in rows))
    if figure is None:
        figure = plt.figure(figsize=(11, 3.4))
    else:
        figure.set_size_inches(11, 3.4)
    axes = figure.subplots(1, 3)
    panels = (
        ("relative_error", "reconstruction error\n‖A − UW‖ / ‖A‖ (crops)"),
        ("top1_agreement", "decisions kept (top-1 agreement,\nheld-out images)"),
        ("stability", "stability across seeds\n(matched cosine of W)"),
    )
    best = result.get("recommendation", {})
    for ax, (key, title) in zip(axes, panels, strict=True):
        for layer in layers:
            mine = [row for row in rows if row["layer"] == layer]
            ranks = [row["rank"] for row in mine]
            ax.plot(ranks, [row[key] for row in mine], marker="o", label=str(layer))
            for row in mine:
                if row["layer"] == best.get("layer") and row["rank"] == best.get("rank"):
                    ax.plot(row["rank"], row[key], marker="o", markersize=14,
                            markerfacecolor="none", markeredgecolor="black")
        ax.set_xscale("log", base=2)
        ax.set_xticks(sorted({row["rank"] for row in rows}))
        ax.set_xticklabels([str(r) for r in sorted({row["rank"] for row in rows})])
        ax.set_xlabel("number of concepts r")
        ax.set_title(title, fontsize=10)
    axes[0].legend(title="layer", fontsize=8)
    verdict = "recommended" if best.get("qualified", True) else "best available (none qualified)"
    figure.suptitle(f"{verdict}: layer {best.get('layer')!r}, r = {best.get('rank')} (ringed)",
                    fontsize=10)
    figure.tight_layout()
    return figure
