"""Figures and the HTML report of a fitted coupled NMF: these functions draw, they never compute.

The plotting functions take the arrays of :mod:`xcraft.coupled.analysis` and draw on a
``matplotlib.figure.Figure`` that pyplot never sees (no display needed), which they return.
:func:`coupled_report_section` runs those analyses on a fitted ``CoupledNMF`` and returns an
HTML fragment (figures as data URIs) and its JSON-ready summary, like
:func:`xcraft.viz.afi.afi_report_section`; :func:`write_coupled_report` wraps it in a
self-contained page and a JSON file, written together.
"""

import datetime
import html
import json
import os

import numpy as np

from xcraft.plumbing.storage import write_files_together
from xcraft.viz.plots import _displayable_images, new_figure
from xcraft.viz.report import _CSS, _figure_html, _figure_uri, _plain, _versions

__all__ = [
    "plot_factor_top_images",
    "plot_pixel_masks",
    "plot_cosine_eigenvalues",
    "plot_factor_similarity",
    "plot_class_mass",
    "plot_rank_curve",
    "coupled_report_section",
    "write_coupled_report",
    "COUPLED_REPORT_FILE",
    "COUPLED_SUMMARY_FILE",
]

COUPLED_REPORT_FILE = "coupled_report.html"
COUPLED_SUMMARY_FILE = "coupled_summary.json"
MASK_COLOUR = (1.0, 0.15, 0.1)  # red: visible on gray and on most natural images


def _factor_titles(n, factor_labels):
    if factor_labels is None:
        return [f"F{j}" for j in range(n)]
    if len(factor_labels) != n:
        raise ValueError(
            f"`factor_labels` must have one label per factor ({n}), got {len(factor_labels)}."
        )
    return [str(label) for label in factor_labels]


def _check_top(top, n_images):
    top = np.asarray(top)
    if top.ndim != 2 or not np.issubdtype(top.dtype, np.integer):
        raise ValueError(
            f"`top` must be a 2-D array of image indices (n_factors, k), got {top!r}."
        )
    if top.size and (top.min() < 0 or top.max() >= n_images):
        raise ValueError(
            f"`top` must index the {n_images} images, got indices up to {top.max()}."
        )
    return top


def plot_factor_top_images(images, top, *, factor_labels=None, display=None, figure=None):
    """Draw every factor's top images, one row per factor.

    Parameters
    ----------
    images : ndarray of shape (n_images, height, width, channels)
    top : ndarray of shape (n_factors, k), int
        :func:`xcraft.coupled.analysis.top_examples`.
    factor_labels : list of str, optional
        Row labels (default ``F0``, ``F1``, ...).
    display : callable, optional
        Maps model inputs to [0, 1] pixels.
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    images = np.asarray(images)
    top = _check_top(top, len(images))
    d, k = top.shape
    titles = _factor_titles(d, factor_labels)
    pixels = _displayable_images(images[top.reshape(-1)], display)
    figure = figure or new_figure()
    figure.set_size_inches(1.1 * k + 1.4, 1.1 * d + 0.2)
    for j in range(d):
        for i in range(k):
            ax = figure.add_subplot(d, k, j * k + i + 1)
            ax.imshow(pixels[j * k + i], cmap="gray" if pixels.ndim == 3 else None,
                      vmin=0, vmax=1)
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_ylabel(titles[j], fontsize=7, rotation=0, ha="right", va="center")
    return figure


def plot_pixel_masks(images, top, masks, *, maps=None, factor_labels=None, display=None,
                     alpha=0.5, figure=None):
    """Draw every factor's pixel mask over its top images (and its pixel map first).

    Parameters
    ----------
    images : ndarray of shape (n_images, height, width, channels)
    top : ndarray of shape (n_factors, k), int
    masks : ndarray of shape (n_factors, height, width), bool
        :func:`xcraft.coupled.analysis.pixel_masks`.
    maps : ndarray of shape (n_factors, height, width, channels), optional
        :func:`xcraft.coupled.analysis.pixel_maps`, drawn (summed over channels) in a first
        column.
    factor_labels : list of str, optional
    display : callable, optional
    alpha : float, default=0.5
        Opacity of the mask's colour.
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    images = np.asarray(images)
    top = _check_top(top, len(images))
    masks = np.asarray(masks, bool)
    d, k = top.shape
    if masks.shape != (d, *images.shape[1:3]):
        raise ValueError(
            f"`masks` must have shape ({d}, {images.shape[1]}, {images.shape[2]}), one per "
            f"factor of the images' size, got shape {masks.shape}."
        )
    titles = _factor_titles(d, factor_labels)
    pixels = _displayable_images(images[top.reshape(-1)], display)
    if pixels.ndim == 3:  # gray -> RGB so that the mask's colour shows
        pixels = np.repeat(pixels[..., None], 3, axis=-1)
    pixels = pixels.reshape(d, k, *pixels.shape[1:])
    overlay = np.where(masks[:, None, :, :, None],
                       (1 - alpha) * pixels + alpha * np.asarray(MASK_COLOUR), pixels)
    columns = k + (maps is not None)
    figure = figure or new_figure()
    figure.set_size_inches(1.1 * columns + 1.4, 1.1 * d + 0.3)
    for j in range(d):
        offset = 0
        if maps is not None:
            ax = figure.add_subplot(d, columns, j * columns + 1)
            ax.imshow(np.asarray(maps[j]).sum(axis=-1), cmap="magma")
            ax.set_xticks([])
            ax.set_yticks([])
            ax.set_ylabel(titles[j], fontsize=7, rotation=0, ha="right", va="center")
            if j == 0:
                ax.set_title("pixel map", fontsize=7)
            offset = 1
        for i in range(k):
            ax = figure.add_subplot(d, columns, j * columns + offset + i + 1)
            ax.imshow(np.clip(overlay[j, i], 0, 1))
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0 and maps is None:
                ax.set_ylabel(titles[j], fontsize=7, rotation=0, ha="right", va="center")
    return figure


def plot_cosine_eigenvalues(eigenvalues, *, figure=None):
    """Draw each layer's spectrum of factor cosine similarity and its trend across layers.

    Left: the eigenvalues of every block, largest first (d eigenvalues of 1: factors on
    disjoint neurons; one of d: factors on the same neurons). Right: the largest eigenvalue
    divided by d against the blocks, in the given order (the paper's trend across layers).

    Parameters
    ----------
    eigenvalues : dict of str to ndarray of shape (n_factors,)
        :func:`xcraft.coupled.analysis.cosine_eigenvalues`, blocks in network order.
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    if not eigenvalues:
        raise ValueError("`eigenvalues` must hold at least one block, got an empty dict.")
    figure = figure or new_figure()
    figure.set_size_inches(8, 3)
    spectrum, trend = figure.add_subplot(1, 2, 1), figure.add_subplot(1, 2, 2)
    names = list(eigenvalues)
    for name in names:
        values = np.asarray(eigenvalues[name], float)
        spectrum.plot(np.arange(1, len(values) + 1), values, marker="o", markersize=3,
                      label=name)
    spectrum.set_xlabel("eigenvalue rank", fontsize=8)
    spectrum.set_ylabel("eigenvalue", fontsize=8)
    spectrum.set_title("factor cosine similarity: spectrum", fontsize=9)
    spectrum.legend(fontsize=7)
    top = [float(np.max(eigenvalues[n])) / len(eigenvalues[n]) for n in names]
    trend.plot(range(len(names)), top, marker="o", color="#2a7ab9")
    trend.set_xticks(range(len(names)), names, fontsize=7, rotation=30)
    trend.set_ylim(0, 1.05)
    trend.set_ylabel("largest eigenvalue / d", fontsize=8)
    trend.set_title("sharing of neurons between factors", fontsize=9)
    figure.tight_layout()
    return figure


def plot_factor_similarity(similarities, *, figure=None):
    """Draw each block's (d, d) factor cosine similarity as a heat map.

    Parameters
    ----------
    similarities : dict of str to ndarray of shape (n_factors, n_factors)
        :func:`xcraft.coupled.analysis.cosine_similarity` per block.
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    names = list(similarities)
    figure = figure or new_figure()
    figure.set_size_inches(2.6 * len(names) + 0.6, 2.8)
    picture = None
    for i, name in enumerate(names):
        ax = figure.add_subplot(1, len(names), i + 1)
        picture = ax.imshow(np.asarray(similarities[name]), vmin=0, vmax=1, cmap="viridis")
        ax.set_title(name, fontsize=8)
        ax.tick_params(labelsize=6)
    if picture is not None:
        figure.colorbar(picture, ax=figure.axes, fraction=0.02)
    return figure


def plot_class_mass(mass, *, class_names=None, factor_labels=None, figure=None):
    """Draw the class mass of every factor as a heat map (factors × classes), with purity.

    Parameters
    ----------
    mass : ndarray of shape (n_factors, n_classes)
        :func:`xcraft.coupled.analysis.class_mass` (rows sum to 1).
    class_names : list of str, optional
    factor_labels : list of str, optional
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    mass = np.asarray(mass, float)
    if mass.ndim != 2:
        raise ValueError(f"`mass` must be 2-D (n_factors, n_classes), got shape {mass.shape}.")
    d, n_classes = mass.shape
    names = [str(c) for c in range(n_classes)] if class_names is None else list(class_names)
    if len(names) != n_classes:
        raise ValueError(
            f"`class_names` must name the {n_classes} classes, got {len(names)} names."
        )
    titles = _factor_titles(d, factor_labels)
    figure = figure or new_figure()
    figure.set_size_inches(0.5 * n_classes + 2.2, 0.32 * d + 1.6)
    ax = figure.add_subplot(1, 1, 1)
    picture = ax.imshow(mass, vmin=0, vmax=1, cmap="Blues", aspect="auto")
    ax.set_xticks(range(n_classes), names, fontsize=7, rotation=45, ha="right")
    purity = mass.max(axis=1)
    ax.set_yticks(range(d), [f"{t} ({p:.2f})" for t, p in zip(titles, purity, strict=True)],
                  fontsize=7)
    ax.set_title(f"class mass of each factor (purity in brackets, mean {purity.mean():.2f})",
                 fontsize=8)
    figure.colorbar(picture, ax=ax, fraction=0.04)
    figure.tight_layout()
    return figure


def plot_rank_curve(curve, *, suggested=None, figure=None):
    """Draw the reconstruction error against the number of factors d, total and per block.

    Parameters
    ----------
    curve : dict
        :func:`xcraft.coupled.analysis.rank_curve`.
    suggested : int, optional
        A rank to mark (:func:`xcraft.coupled.analysis.suggest_rank`).
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    ranks = np.asarray(curve["ranks"])
    figure = figure or new_figure()
    figure.set_size_inches(5, 3)
    ax = figure.add_subplot(1, 1, 1)
    ax.plot(ranks, curve["error"], marker="o", color="black", label="weighted total")
    for name, errors in curve.get("block_errors", {}).items():
        ax.plot(ranks, errors, marker=".", linewidth=1, alpha=0.8, label=name)
    if suggested is not None:
        ax.axvline(suggested, color="grey", linestyle="--", linewidth=1,
                   label=f"suggested d = {suggested}")
    ax.set_xlabel("number of factors d", fontsize=8)
    ax.set_ylabel("relative error", fontsize=8)
    ax.set_ylim(bottom=0)
    ax.legend(fontsize=7)
    figure.tight_layout()
    return figure


# --------------------------------------------------------------------------------------------
# Report
# --------------------------------------------------------------------------------------------


def _layers(estimator, blocks):
    if blocks is None:
        return list(estimator.components_)
    return [name for name in estimator.components_ if blocks.channels.get(name) is None]


def _summary(estimator, blocks, labels, class_names, n_top, knn_k, curve):
    from xcraft.coupled import analysis as an

    f = estimator.examples_
    names = list(estimator.components_)
    layers = _layers(estimator, blocks)
    eigenvalues = an.cosine_eigenvalues(estimator.components_, names=layers) if layers else {}
    summary = {
        "n_examples": int(f.shape[0]),
        "n_components": int(f.shape[1]),
        "n_iter": estimator.n_iter_,
        "blocks": {name: {"columns": estimator.n_features_in_[name],
                          "weight": estimator.weights_[name],
                          "relative_error": estimator.block_errors_[name],
                          "source": None if blocks is None else blocks.sources[name],
                          "shape": None if blocks is None else list(blocks.shapes[name])}
                   for name in names},
        "cosine_eigenvalues": eigenvalues,
        "top_examples": an.top_examples(f, k=min(n_top, len(f))),
        "top_neurons": {},
        "classes": None,
        "rank_curve": None,
    }
    if blocks is not None:
        for name in layers:
            columns, where, weights = an.top_neurons(
                estimator.components_[name], blocks.index_map(name),
                k=min(5, estimator.n_features_in_[name]))
            summary["top_neurons"][name] = [
                [{"column": c, "channel": w[0], "y": w[1], "x": w[2], "weight": v}
                 for c, w, v in zip(cs, ws, vs, strict=True)]
                for cs, ws, vs in zip(columns, where, weights, strict=True)]
    if labels is not None:
        labels = np.asarray(labels)
        n_classes = len(class_names) if class_names is not None else int(labels.max()) + 1
        mass = an.class_mass(f, labels, n_classes=n_classes)
        classes, shares = an.top_classes(f, labels, k=min(3, n_classes), n_classes=n_classes)
        agreement, chance = an.knn_label_agreement(f, labels, k=min(knn_k, len(f) - 1))
        summary["classes"] = {
            "names": list(class_names) if class_names is not None else None,
            "class_mass": mass,
            "purity": mass.max(axis=1),
            "mean_purity": float(mass.max(axis=1).mean()),
            "chance_purity": 1.0 / n_classes,
            "top_classes": classes,
            "top_shares": shares,
            "knn_k": min(knn_k, len(f) - 1),
            "knn_agreement": agreement,
            "knn_chance": chance,
        }
    if curve is not None:
        summary["rank_curve"] = {
            "ranks": curve["ranks"], "error": curve["error"],
            "block_errors": curve.get("block_errors", {}),
            "suggested": an.suggest_rank(curve)}
    return summary


def _factor_labels(summary):
    classes = summary["classes"]
    d = summary["n_components"]
    if classes is None:
        return [f"F{j}" for j in range(d)]
    names = classes["names"]
    labels = []
    for j in range(d):
        best = int(classes["top_classes"][j][0])
        name = names[best] if names is not None else f"class {best}"
        labels.append(f"F{j}: {name}")
    return labels


def coupled_report_section(estimator, *, blocks=None, images=None, labels=None,
                           class_names=None, display=None, n_top=6, knn_k=10,
                           rank_curve=None, mask_quantile=0.9, title="Coupled NMF"):
    """Return the HTML fragment of a fitted coupled NMF and its JSON-ready summary.

    Parameters
    ----------
    estimator : CoupledNMF
        Fitted.
    blocks : Blocks, optional
        The blocks of the fit (or their layout from :func:`xcraft.coupled.io.load_coupled`):
        pixel masks and neurons traced back to (channel, y, x) need it.
    images : ndarray of shape (n_examples, height, width, channels), optional
        The fitted examples' images, for the top images and the pixel masks.
    labels : ndarray of shape (n_examples,), optional
        For the class mass, the purity and the kNN label agreement.
    class_names : list of str, optional
    display : callable, optional
        Maps model inputs to [0, 1] pixels.
    n_top : int, default=6
        Top images per factor.
    knn_k : int, default=10
        Neighbours of the label agreement.
    rank_curve : dict, optional
        :func:`xcraft.coupled.analysis.rank_curve`, drawn when given.
    mask_quantile : float, default=0.9
        Pixel masks keep the pixels above this quantile of each factor's map.
    title : str, default="Coupled NMF"

    Returns
    -------
    html : str
    summary : dict
    """
    from xcraft._validation import check_is_fitted
    from xcraft.coupled import analysis as an

    check_is_fitted(estimator, "examples_")
    if images is not None and len(images) != len(estimator.examples_):
        raise ValueError(
            f"`images` must be the {len(estimator.examples_)} fitted examples' images, got "
            f"{len(images)}."
        )
    summary = _summary(estimator, blocks, labels, class_names, n_top, knn_k, rank_curve)
    factor_labels = _factor_labels(summary)
    figures = []
    classes = summary["classes"]
    if classes is not None:
        figures.append(_figure_html(_figure_uri(plot_class_mass(
            classes["class_mass"], class_names=class_names)), "class mass of the factors",
            f"How each factor's mass (column of F) splits over the classes (class means, "
            f"normalised). Mean purity {classes['mean_purity']:.3f} (chance "
            f"{classes['chance_purity']:.3f})."))
    top = summary["top_examples"]
    if images is not None:
        figures.append(_figure_html(_figure_uri(plot_factor_top_images(
            images, top, factor_labels=factor_labels, display=display)),
            "top images of the factors", "The examples with the largest F[:, j], per factor."))
        has_pixels = blocks is not None and any(c is not None for c in blocks.channels.values())
        if has_pixels:
            maps = an.pixel_maps(estimator.components_, blocks)
            masks = an.pixel_masks(maps, quantile=mask_quantile)
            figures.append(_figure_html(_figure_uri(plot_pixel_masks(
                images, top[:, : min(4, top.shape[1])], masks, maps=maps,
                factor_labels=factor_labels, display=display)), "pixel masks of the factors",
                f"Each factor's pixel components (W of the pixel blocks) as an image, and its "
                f"strongest {100 * (1 - mask_quantile):.0f} % of pixels in red on its top "
                f"images."))
    eigenvalues = summary["cosine_eigenvalues"]
    if eigenvalues:
        figures.append(_figure_html(_figure_uri(plot_factor_similarity(
            {name: an.cosine_similarity(estimator.components_[name]) for name in eigenvalues})),
            "factor similarity per layer",
            "Cosine similarity of the factors' neurons (rows of W_b), per layer."))
        figures.append(_figure_html(_figure_uri(plot_cosine_eigenvalues(eigenvalues)),
                                    "cosine eigenvalues across layers",
                                    "Eigenvalues of each layer's factor similarity: all near 1 "
                                    "when the factors use different neurons, one near d when "
                                    "they share them."))
    if rank_curve is not None:
        figures.append(_figure_html(_figure_uri(plot_rank_curve(
            rank_curve, suggested=summary["rank_curve"]["suggested"])),
            "reconstruction error against d",
            "Relative reconstruction error of fits with d factors; the dashed line is the "
            "first d after which one more factor gains less than 0.01."))
    rows = "".join(
        f"<tr><td>{html.escape(name)}</td><td>{entry['columns']}</td>"
        f"<td>{entry['relative_error']:.3f}</td><td>{entry['weight']:.3g}</td></tr>"
        for name, entry in summary["blocks"].items())
    table = ("<table><tr><th>block</th><th>columns</th><th>relative error</th>"
             f"<th>weight α</th></tr>{rows}</table>")
    scores = ""
    if classes is not None:
        scores = (f"<p>Mean factor purity {classes['mean_purity']:.3f} (chance "
                  f"{classes['chance_purity']:.3f}); {classes['knn_k']}-NN label agreement in "
                  f"F {classes['knn_agreement']:.3f} (chance {classes['knn_chance']:.3f}).</p>")
    text = (f'<section class="class" id="coupled"><h2>{html.escape(title)}</h2>'
            f"<p>{summary['n_examples']} examples, {summary['n_components']} factors, "
            f"{summary['n_iter']} sweeps.</p>{table}{scores}" + "\n".join(figures)
            + "</section>")
    return text, _plain(summary)


def write_coupled_report(estimator, out_dir, *, settings=None, title="xcraft coupled NMF report",
                         **section_kwargs):
    """Write ``coupled_report.html`` (self-contained) and ``coupled_summary.json`` to ``out_dir``.

    ``section_kwargs`` go to :func:`coupled_report_section`.

    Returns
    -------
    dict
        What ``coupled_summary.json`` holds.
    """
    if settings is not None and not isinstance(settings, dict):
        raise TypeError(f"`settings` must be a dict or None, got {type(settings).__name__}.")
    section, coupled_summary = coupled_report_section(estimator, **section_kwargs)
    summary = {
        "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "settings": _plain(settings or {}),
        "coupled": coupled_summary,
    }
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p>Coupled NMF of pixels, neurons and "
            f"examples (Saini &amp; Papalexakis), made {summary['created']}.</p>"
            f"<p>{html.escape(versions)}</p></header>\n<main>\n{section}\n</main>\n</body>\n"
            f"</html>\n")
    write_files_together(os.fspath(out_dir), {
        COUPLED_SUMMARY_FILE: json.dumps(summary, indent=2, allow_nan=False) + "\n",
        COUPLED_REPORT_FILE: page,
    })
    return summary
