"""Matplotlib figures of xcraft results: these functions draw, they never compute.

This is the only module that imports matplotlib; import it explicitly (``import xcraft.plots``)
so that ``import xcraft`` stays free of it. Every function returns the ``Figure`` it drew on.
"""

import matplotlib.pyplot as plt
import numpy as np

__all__ = [
    "plot_concepts_importances",
    "plot_fidelity_curves",
    "plot_concepts_crops",
    "plot_concept_tree",
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
        One value per concept. A :class:`xcraft.sobol.SobolIndices` also gives the intervals.
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


def plot_fidelity_curves(result, *, score="logit", kinds=("deletion", "insertion"), names=None,
                         axes=None, show_random_band=True):
    """Draw deletion and insertion curves of a fidelity result, with their AUCs in the legend.

    Parameters
    ----------
    result : FidelityCurves
        Output of :func:`xcraft.fidelity.concept_deletion_insertion`.
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

    for ax, kind in zip(axes, kinds, strict=True):
        key = kind + suffix
        curves, aucs = result.curves[key], result.aucs[key]
        drawn = list(curves) if names is None else list(names)
        for i, name in enumerate(drawn):
            if name not in curves:
                raise ValueError(
                    f"`names` must be among {sorted(curves)}, got {name!r}."
                )
            label = f"{name} (AUC {aucs[name]:.3g})"
            if name == "random":
                ax.plot(result.fractions, curves[name], color="0.4", linestyle="--", label=label)
                if show_random_band and key in result.random_std:
                    std = result.random_std[key]
                    ax.fill_between(result.fractions, curves[name] - std, curves[name] + std,
                                    color="0.6", alpha=0.25, linewidth=0)
            else:
                ax.plot(result.fractions, curves[name], marker="o", markersize=3,
                        color=cycle[i % len(cycle)], label=label)
        ax.set_xlabel(f"fraction of concepts {'removed' if kind == 'deletion' else 'kept'}")
        ax.set_ylabel("class logit" if score == "logit" else "class probability")
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
    >>> from xcraft.plots import plot_concepts_crops
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
    crops = np.asarray(craft.factorization.crops)
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
    tree : xcraft.recursion.ConceptTree
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
    >>> from xcraft.recursion import ConceptTree
    >>> figure = ConceptTree(craft).plot(n_crops=4)            # doctest: +SKIP
    """
    from .recursion import ARROW

    n_crops = _check_count(n_crops, "n_crops")
    nodes = list(tree)
    if max_depth is not None:
        nodes = [node for node in nodes if node.depth <= max_depth]
    if nb_most_important_concepts is not None:
        keep = _check_count(nb_most_important_concepts, "nb_most_important_concepts")
        roots = [node.path for node in nodes if node.depth == 0][:keep]
        nodes = [node for node in nodes if node.path.split(ARROW)[0] in roots]
    prefixes = _tree_prefixes([node.path for node in nodes], ARROW)

    size, row_height = 0.85, 0.85 + 2 * _CROP_GAP
    label_width = 3.0 + 0.3 * max((node.depth for node in nodes), default=0)
    width = label_width + n_crops * (size + _CROP_GAP)
    height = _TITLE_HEIGHT + len(nodes) * row_height
    figure, ax = _inch_canvas(figure, width, height)
    for row, (node, prefix) in enumerate(zip(nodes, prefixes, strict=True)):
        y = _TITLE_HEIGHT + row * row_height
        colour = _rank_colours(getattr(node.craft, "sensitivity", None),
                               node.craft.concept_bank_w_.shape[0])[node.concept_id]
        ax.text(0.1, y + 0.3 * size, prefix + node.label, family="monospace", fontsize="medium",
                fontweight="bold" if node.depth == 0 else "normal", color=colour, va="center")
        details = [] if node.importance is None else [f"importance {node.importance:.3g}"]
        layer = getattr(node.craft, "_source_layer", None)
        if isinstance(layer, str):
            details.append(f"@ {layer}")
        if node.refinement is not None:
            details.append(f"\nrefined: coherence gain {node.refinement['coherence_gain']:+.2f}")
        indent = " " * len(prefix)
        text = indent + "  ".join(details).replace("\n", "\n" + indent)
        ax.text(0.1, y + 0.72 * size, text, family="monospace", fontsize="x-small",
                color="0.25", va="center")
        _draw_crop_row(ax, _displayable_images(node.top_crops(n_crops), display), label_width,
                       y, size)
    ax.text(width / 2, _TITLE_HEIGHT / 2, f"Concept tree of class {tree.root.class_id_} (top "
            f"{n_crops} crops per concept)", ha="center", va="center", fontsize="medium")
    return figure
