"""The report section of a layer × rank sweep: "choosing a layer and a number of concepts".

:func:`sweep_report_section` turns what :func:`xcraft.craft.sweep.sweep` returned into the
``(html_fragment, json_summary)`` pair that :func:`xcraft.viz.report.write_report` embeds
through ``extra_sections={"sweep": ...}``: the sweep's figure (a PNG data URI), its table, the
recommendation and the rule that made it, in words. :func:`sweep_report_page` wraps the same
section in a self-contained page (what ``xcraft sweep`` writes as ``report.html``). These
functions draw what they are handed; they compute nothing.
"""

import datetime
import html
import numbers

import numpy as np

from xcraft.viz.plots import new_figure, plot_sweep
from xcraft.viz.report import _CSS, _figure_html, _figure_uri, _plain, _versions

__all__ = ["sweep_report_section", "sweep_report_page"]

SECTION_TITLE = "Choosing a layer and a number of concepts"
_ROW_KEYS = ("layer", "rank", "relative_error", "logit_r2", "top1_agreement", "stability")


def _check_result(result):
    """Raise unless ``result`` looks like what ``sweep`` returns (rows and a recommendation)."""
    if not isinstance(result, dict):
        raise TypeError(
            f"`result` must be the dict returned by xcraft.sweep, got {type(result).__name__}."
        )
    missing = [key for key in ("rows", "recommendation") if key not in result]
    if missing:
        raise ValueError(
            f"`result` must hold the keys 'rows' and 'recommendation' of xcraft.sweep, got "
            f"keys {sorted(result)} (missing {', '.join(map(repr, missing))})."
        )
    rows = result["rows"]
    if not isinstance(rows, (list, tuple)) or not rows:
        raise ValueError("`result['rows']` must hold at least one candidate, got none.")
    for i, row in enumerate(rows):
        absent = [key for key in _ROW_KEYS if not isinstance(row, dict) or key not in row]
        if absent:
            raise ValueError(
                f"`result['rows'][{i}]` must hold the keys {', '.join(_ROW_KEYS)}, got "
                f"{row!r} (missing {', '.join(absent)})."
            )


def _number(value, digits=3):
    """A table cell: ``digits`` decimals, a dash for NaN or None (one seed: no stability)."""
    if value is None or (isinstance(value, numbers.Real) and not np.isfinite(value)):
        return "–"
    return f"{float(value):.{digits}f}"


def _rule_text(rule):
    """The recommendation rule in words, with the thresholds used when the result has them."""
    agreement = ("the share of held-out images whose predicted class is unchanged when the layer "
                 "is replaced by its concept reconstruction (top-1 agreement)")
    stability = ("the mean matched cosine of the concept banks fitted with other seeds "
                 "(stability)")
    if rule:
        agreement = f"{agreement} is at least {rule['min_agreement']:g}"
        stability = f"{stability} is at least {rule['min_stability']:g}"
    else:
        agreement, stability = (f"{agreement} reaches the sweep's `min_agreement`",
                                f"{stability} reaches its `min_stability`")
    return (
        f"A candidate qualifies when {agreement} (the concepts keep the model's decisions) and "
        f"{stability} (they do not depend on the seed; with one seed stability is not "
        f"measured and does not block). Among qualifying candidates the latest layer wins, "
        f"as deeper layers carry the more semantic concepts, then the smallest number of "
        f"concepts there, as fewer concepts are easier to read. When none qualifies, the "
        f"candidate with the highest agreement, then logit R², is shown as the best available. "
        f"R² of the class logit is reported but not used: within one class the logit varies "
        f"little, so a small offset of the reconstruction drives R² below 0 while every "
        f"decision is kept."
    )


def _table(rows, best, monotone):
    header = ("<tr><th>layer</th><th>concepts r</th><th>reconstruction error ↓</th>"
              "<th>logit R²</th><th>top-1 agreement ↑</th><th>stability ↑</th>"
              "<th>seconds per fit</th></tr>")
    lines = []
    for row in rows:
        chosen = row["layer"] == best.get("layer") and row["rank"] == best.get("rank")
        note = (' <span class="note">(error not monotone in r)</span>'
                if monotone.get(row["layer"]) is False else "")
        cells = [
            f"<td><code>{html.escape(str(row['layer']))}</code>{note}</td>",
            f'<td class="num">{int(row["rank"])}</td>',
            f'<td class="num">{_number(row["relative_error"])}</td>',
            f'<td class="num">{_number(row["logit_r2"])}</td>',
            f'<td class="num">{_number(row["top1_agreement"], 2)}</td>',
            f'<td class="num">{_number(row["stability"])}</td>',
            f'<td class="num">{_number(row.get("seconds"), 2)}</td>',
        ]
        style = ' style="font-weight: 600; background: #eef5fb"' if chosen else ""
        lines.append(f"<tr{style}>{''.join(cells)}</tr>")
    return f"<table>{header}{''.join(lines)}</table>"


def sweep_report_section(result, *, class_label=None):
    """Return the HTML fragment of a layer × rank sweep and its JSON-ready summary.

    Parameters
    ----------
    result : dict
        What :func:`xcraft.craft.sweep.sweep` returned (or its ``sweep.json``, loaded).
    class_label : str, optional
        Names the explained class in the text.

    Returns
    -------
    html : str
        A ``<section>`` with the figure (embedded PNG), the table (the recommended candidate
        in bold), the recommendation and the rule in words.
    summary : dict
        ``kind`` ("sweep"), ``rows``, ``recommendation``, ``monotone``, ``rule`` and
        ``split`` as far as the result holds them, JSON-ready (NaN as None).

    Raises
    ------
    TypeError, ValueError
        If ``result`` is not a sweep result with at least one row.

    Examples
    --------
    >>> from xcraft.viz.report import write_report
    >>> section = sweep_report_section(xcraft.sweep(model, layers, images, 1))  # doctest: +SKIP
    >>> write_report({1: craft}, "report", extra_sections={"sweep": section})  # doctest: +SKIP
    """
    _check_result(result)
    rows, best = list(result["rows"]), dict(result["recommendation"])
    monotone = dict(result.get("monotone") or {})
    rule = result.get("rule")
    layers = list(dict.fromkeys(str(row["layer"]) for row in rows))
    ranks = sorted({int(row["rank"]) for row in rows})
    about = (f" to the images of {html.escape(str(class_label))}" if class_label else "")
    measured = {(str(row["layer"]), int(row["rank"])) for row in rows}
    skipped = [f"<code>{html.escape(layer)}</code> at r = {rank}" for layer in layers
               for rank in ranks if (layer, rank) not in measured]

    figure = plot_sweep(result, figure=new_figure())
    picture = _figure_html(
        _figure_uri(figure), "layer x rank sweep",
        "One line per layer: the crops' reconstruction error, the held-out decisions kept "
        "when the layer is replaced by its concepts, and the concepts' stability across "
        "seeds, against the number of concepts. The recommended candidate is ringed.")
    layer_name = f"<code>{html.escape(str(best.get('layer')))}</code>"
    if best.get("qualified", True):
        verdict = (f"<p><strong>Recommended: layer {layer_name} with {best.get('rank')} "
                   f"concepts.</strong></p>")
    else:
        verdict = (f"<p><strong>No candidate met the rule; the best available is layer "
                   f"{layer_name} with {best.get('rank')} concepts.</strong> Try other layers, "
                   f"more concepts or more images.</p>")
    split = result.get("split") or {}
    held = (f", {len(split['held_out'])} held-out images for the decisions"
            if "held_out" in split else "")
    rises = [layer for layer in layers if monotone.get(layer) is False]
    rise_note = (
        f"<p class=\"note\">At {', '.join(f'<code>{html.escape(x)}</code>' for x in rises)} "
        f"the reconstruction error rose with r somewhere: each rank is its own factorisation "
        f"from its own start, not a nested one.</p>" if rises else "")
    text = (
        f'<section class="class" id="sweep"><h2>{SECTION_TITLE}</h2>'
        f"<p>CRAFT fitted{about} at {len(layers)} layer{'s' if len(layers) != 1 else ''} × "
        f"{len(ranks)} numbers of concepts ({', '.join(map(str, ranks))}){held}.</p>"
        + verdict + picture + _table(rows, best, monotone) + rise_note
        + (f"<p class=\"note\">Not fitted (more concepts than the layer's channels or the "
           f"crops): {', '.join(skipped)}.</p>" if skipped else "")
        + f"<h3>The rule</h3><p>{html.escape(_rule_text(rule))}</p></section>"
    )
    summary = {"kind": "sweep", "class_label": class_label, "rows": rows,
               "recommendation": best, "monotone": monotone}
    for key in ("rule", "split"):
        if key in result:
            summary[key] = result[key]
    return text, _plain(summary)


def sweep_report_page(result, *, class_label=None, title="xcraft layer × rank sweep",
                      data_file=None):
    """Return a self-contained HTML page holding :func:`sweep_report_section` alone.

    Parameters
    ----------
    result : dict
        What :func:`xcraft.craft.sweep.sweep` returned.
    class_label : str, optional
    title : str, default="xcraft layer × rank sweep"
    data_file : str, optional
        The file beside the page holding the same numbers (``sweep.json``), named at the foot.

    Returns
    -------
    page : str
        The page (``report.html`` of ``xcraft sweep``).
    """
    section, _ = sweep_report_section(result, class_label=class_label)
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    versions = ", ".join(f"{k} {v}" for k, v in _versions().items())
    foot = ("" if data_file is None else
            f"<p class=\"note\">The numbers of this page are in "
            f"<code>{html.escape(str(data_file))}</code> beside it.</p>\n")
    return ("<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
            f"<title>{html.escape(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
            f"<header><h1>{html.escape(title)}</h1><p>CRAFT (Fel et al., CVPR 2023), made "
            f"{created}.</p><p>{html.escape(versions)}</p></header>\n<main>\n{section}\n"
            f"{foot}</main>\n</body>\n</html>\n")
