"""Figures and the HTML report of a fitted AfI: these functions draw, they never compute.

Every plotting function draws on a ``matplotlib.figure.Figure`` that pyplot never sees (no
display needed) and returns it. :func:`afi_report_section` returns an HTML fragment with the
figures embedded as data URIs; :func:`write_afi_report` wraps it in a self-contained page and a
JSON summary, both written atomically.
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
    "plot_occluder",
    "plot_channel_importances",
    "plot_concept_scores",
    "plot_class_impressions",
    "afi_report_section",
    "write_afi_report",
    "AFI_REPORT_FILE",
    "AFI_SUMMARY_FILE",
]

AFI_REPORT_FILE = "afi_report.html"
AFI_SUMMARY_FILE = "afi_summary.json"


def plot_occluder(delta, *, input_range=(0.0, 1.0), images=None, display=None, figure=None):
    """Draw the occluder δ (signed, per channel mean) and, optionally, occluded images.

    Parameters
    ----------
    delta : ndarray of shape (height, width, channels)
    input_range : tuple of float, default=(0.0, 1.0)
        Clips the occluded images.
    images : ndarray of shape (n, height, width, channels), optional
        Up to 4 are drawn before and after occlusion.
    display : callable, optional
        Maps model inputs to [0, 1] pixels for display.
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    delta = np.asarray(delta, float)
    shown = [] if images is None else list(np.asarray(images)[:4])
    figure = figure or new_figure()
    columns = 1 + len(shown)
    figure.set_size_inches(2.4 * columns, 2.4 * (2 if shown else 1) + 0.3)
    signed = delta.mean(axis=-1)
    limit = float(np.abs(signed).max()) or 1.0
    ax = figure.add_subplot(2 if shown else 1, columns, 1)
    picture = ax.imshow(signed, cmap="RdBu_r", vmin=-limit, vmax=limit)
    figure.colorbar(picture, ax=ax, fraction=0.046)
    ax.set_title("occluder δ (mean over channels)", fontsize=8)
    ax.axis("off")
    if shown:
        low, high = input_range
        clean = _displayable_images(np.stack(shown), display)
        occluded = _displayable_images(np.clip(np.stack(shown) - delta, low, high), display)
        for i in range(len(shown)):
            for row, pixels, label in ((0, clean, "x"), (1, occluded, "x − δ")):
                axis = figure.add_subplot(2, columns, row * columns + i + 2)
                axis.imshow(pixels[i], cmap="gray" if pixels.ndim == 3 else None,
                            vmin=0, vmax=1)
                axis.set_title(label, fontsize=8)
                axis.axis("off")
    return figure


def plot_channel_importances(channel_importance, *, top_k=20, figure=None):
    """Draw each layer's top-k channel importances (eq. 8) as bar charts, one row per layer.

    Parameters
    ----------
    channel_importance : dict of str to ndarray of shape (channels,)
    top_k : int, default=20
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = figure or new_figure()
    layers = list(channel_importance)
    figure.set_size_inches(7, 1.8 * max(1, len(layers)))
    for row, layer in enumerate(layers):
        values = np.asarray(channel_importance[layer], float)
        order = np.argsort(-values, kind="stable")[:top_k]
        ax = figure.add_subplot(len(layers), 1, row + 1)
        ax.bar(range(len(order)), values[order], color="#2a7ab9")
        ax.set_xticks(range(len(order)), [str(c) for c in order], fontsize=6)
        ax.set_ylim(0, 1.05)
        ax.set_ylabel(layer, fontsize=8)
        if row == 0:
            ax.set_title("channel importance (top channels)", fontsize=9)
    figure.tight_layout()
    return figure


def plot_concept_scores(result, *, figure=None):
    """Draw concept scores (mean over random sets, min-max bars) with their p-values.

    Parameters
    ----------
    result : ConceptImportance
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = figure or new_figure()
    order = result.order[::-1]  # most important on top
    figure.set_size_inches(6, 0.45 * len(order) + 1.0)
    ax = figure.add_subplot(1, 1, 1)
    mean, interval = result.mean[order], result.interval[order]
    errors = np.stack([mean - interval[:, 0], interval[:, 1] - mean])
    ax.barh(range(len(order)), mean, xerr=errors, color="#2a7ab9", capsize=3)
    shift = result.response_shift
    signs = ["" if shift is None else (" ↑" if shift[i].mean() > 0 else " ↓") for i in order]
    labels = [f"{result.names[i]} (p={result.p_value[i]:.3g}){sign}"
              for i, sign in zip(order, signs, strict=True)]
    ax.set_yticks(range(len(order)), labels, fontsize=8)
    ax.set_xlabel("normalised MMD score (bars: min-max over random sets; ↑ excites, ↓ silences "
                  "the detectors)", fontsize=8)
    figure.tight_layout()
    return figure


def plot_class_impressions(impressions, *, display=None, figure=None):
    """Draw class impressions side by side.

    Parameters
    ----------
    impressions : dict of str to ndarray of shape (height, width, channels)
        One image per layer (or any label).
    display : callable, optional
    figure : matplotlib.figure.Figure, optional

    Returns
    -------
    matplotlib.figure.Figure
    """
    figure = figure or new_figure()
    names = list(impressions)
    figure.set_size_inches(2.4 * len(names), 2.7)
    pixels = _displayable_images(np.stack([impressions[n] for n in names]), display)
    for i, name in enumerate(names):
        ax = figure.add_subplot(1, len(names), i + 1)
        ax.imshow(pixels[i], cmap="gray" if pixels.ndim == 3 else None, vmin=0, vmax=1)
        ax.set_title(f"impression: {name}", fontsize=8)
        ax.axis("off")
    return figure


def _summary(afi, class_label):
    concepts = afi.concept_importance_
    return _plain({
        "class_id": afi.class_id_,
        "class_name": class_label,
        "n_images": len(afi.images_used_),
        "lambda": afi.lambda_,
        "n_steps": afi.n_steps_,
        "flip_rate": afi.flip_rate_,
        "transform_excluded": afi.transform_excluded_,
        "l1": float(np.abs(afi.delta_).sum()),
        "channel_importance": {layer: afi.channel_importance_[layer]
                               for layer in afi.channel_importance_},
        "concepts": None if concepts is None else concepts.as_dict(),
    })


def afi_report_section(afi, *, class_label=None, images=None, impressions=None, display=None):
    """Return the HTML fragment of a fitted AfI and its JSON-ready summary.

    Parameters
    ----------
    afi : AfI
        A fitted estimator (``concept_importance`` run for the concept section).
    class_label : str, optional
    images : ndarray, optional
        A few class images shown before and after occlusion.
    impressions : dict of str to ndarray, optional
        Class impressions to show, by layer.
    display : callable, optional
        Maps model inputs to [0, 1] pixels.

    Returns
    -------
    html : str
    summary : dict
    """
    label = class_label or f"class {afi.class_id_}"
    summary = _summary(afi, label)
    figures = [
        _figure_html(_figure_uri(plot_occluder(afi.delta_, input_range=afi.input_range,
                                               images=images, display=display)),
                     f"occluder of {label}",
                     "The occluder δ learnt for all the class's images, and images before and "
                     "after it is subtracted."),
    ]
    if afi.channel_importance_:
        figures.append(_figure_html(_figure_uri(plot_channel_importances(
            afi.channel_importance_)), f"channel importances of {label}",
            "Channel importance (eq. 8): the drop of each channel's activations under the "
            "occluder, summed over the map and divided by the largest."))
    if afi.concept_importance_ is not None:
        result = afi.concept_importance_
        figures.append(_figure_html(_figure_uri(plot_concept_scores(result)),
                                    f"concept scores of {label}",
                                    f"MMD between the meta-detectors' responses to each concept's "
                                    f"probe images and to random images, summed over "
                                    f"{', '.join(result.layers)}; p: median permutation p-value "
                                    f"over {result.scores.shape[1]} random sets."))
    if impressions:
        figures.append(_figure_html(_figure_uri(plot_class_impressions(impressions,
                                                                       display=display)),
                                    f"class impressions of {label}",
                                    "Activation maximisation of the meta-detector, with a "
                                    "total-variation penalty."))
    flips = summary["flip_rate"]
    transformed = "n/a" if flips["transformed"] is None else f"{flips['transformed']:.3f}"
    text = (f'<section class="class" id="afi-{afi.class_id_}"><h2>AfI: {html.escape(label)}</h2>'
            f"<p>{summary['n_images']} images, λ = {summary['lambda']:.4g}, "
            f"{summary['n_steps']} Adam steps, ‖δ‖₁ = {summary['l1']:.4g}; flip rate "
            f"{flips['clean']:.3f} on occluded images, {transformed} on transformed ones.</p>"
            + "\n".join(figures) + "</section>")
    return text, summary


def write_afi_report(afi, out_dir, *, class_label=None, images=None, impressions=None,
                     display=None, settings=None, title="xcraft AfI report"):
    """Write ``afi_report.html`` (self-contained) and ``afi_summary.json`` to ``out_dir``.

    Returns
    -------
    dict
        What ``afi_summary.json`` holds.
    """
    if settings is not None and not isinstance(settings, dict):
        raise TypeError(f"`settings` must be a dict or None, got {type(settings).__name__}.")
    out_dir = os.fspath(out_dir)
    section, class_summary = afi_report_section(afi, class_label=class_label, images=images,
                                                impressions=impressions, display=display)
    summary = {
        "format_version": 1,
        "created": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "versions": _versions(),
        "settings": _plain(settings or {}),
        "afi": class_summary,
    }
    versions = ", ".join(f"{k} {v}" for k, v in summary["versions"].items())
    page = ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p>AfI (Wu et al., CVPR 2020), made "
            f"{summary['created']}.</p><p>{html.escape(versions)}</p></header>\n<main>\n"
            f"{section}\n</main>\n</body>\n</html>\n")
    # Both files appear together, and the folder only once they are complete.
    write_files_together(out_dir, {
        AFI_SUMMARY_FILE: json.dumps(summary, indent=2, allow_nan=False) + "\n",
        AFI_REPORT_FILE: page,
    })
    return summary
