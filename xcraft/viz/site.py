"""A browsable site of many explained classes: an index page, class cards and class similarity.

A run that explains many classes (``xcraft explain --all-classes``) leaves one folder per class::

    OUT/
      run.json
      classes/class_<k>/
          result/                       # CraftTf.save(...) of the class
          report.html, summary.json     # xcraft.viz.report.write_report of the class alone
          card.json                     # write_class_card: what the index shows of the class
          concept_bank.npz              # its concept bank W and importances, for similarity
          card_concept_<i>.png          # the crop strips of its top concepts
      index.html, site.json, similarity.npz   # write_site

:func:`write_class_card` needs only the fitted estimator (no model); :func:`write_site` reads
the cards and banks of every class (no estimator, no TensorFlow) and writes the index: a
searchable grid of the classes with their top concepts' crops and importances, each linking to
its report, and a class-similarity view (the classes whose concept banks are closest, with the
concept pairs they share, and for a few tens of classes a heatmap). Every page links only to
files of the site or to data URIs: it opens offline, from a folder, with no server.

The index shows each class's thumbnails from the PNG files beside its card (``loading="lazy"``)
rather than inline: inline, 1 000 classes of 3 strips of 4 crops of 40 px would weigh some 50 MB
of base64, which a browser must parse before it shows anything. The size of the index grows
linearly with the number of classes (a few kB each): only the ``top_similar`` most similar
classes of each class are written, never the whole matrix, which is in ``similarity.npz``.
"""

import base64
import collections
import datetime
import html
import io
import json
import numbers
import os
import re
import urllib.parse

import numpy as np

from xcraft.plumbing.storage import load_npz, read_json, write_files_together
from xcraft.viz.report import REPORT_FILE

__all__ = [
    "class_card",
    "write_class_card",
    "write_site",
    "concept_bank_similarity",
    "shared_concepts",
    "CARD_FILE",
    "BANK_FILE",
    "INDEX_FILE",
    "SITE_FILE",
    "SIMILARITY_FILE",
]

CARD_FILE = "card.json"
BANK_FILE = "concept_bank.npz"
INDEX_FILE = "index.html"
SITE_FILE = "site.json"
SIMILARITY_FILE = "similarity.npz"
CLASSES_DIR = "classes"
CARD_FORMAT_VERSION = 1
SITE_FORMAT_VERSION = 1
#: Side, in pixels, of a crop thumbnail on a card: 4 crops of a concept make a 160 px strip.
THUMBNAIL_SIZE = 40
#: Above this many classes the heatmap's labels would be unreadable: it is not drawn.
MAX_HEATMAP_CLASSES = 60
#: Bytes of cosines held at once while the similarity matrix is computed (blocks of classes).
SIMILARITY_BLOCK_BYTES = 64 * 2**20
WEIGHTINGS = ("importance", "uniform")
_PNG_PREFIX = "data:image/png;base64,"
_CLASS_DIR = re.compile(r"^class_(\d+)$")


def _class_dir_name(class_id):
    return f"class_{class_id}"


# ---------------------------------------------------------------------------------------------
# Input checks
# ---------------------------------------------------------------------------------------------


def _check_class_id(value, name):
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"`{name}` must be an int, got {type(value).__name__} {value!r}.")
    if value < 0:
        raise ValueError(f"`{name}` must be >= 0, got {value}.")
    return int(value)


def _check_fitted(craft):
    if getattr(craft, "concept_bank_w_", None) is None:
        raise ValueError(
            f"`craft` must be a fitted CraftTf, got {type(craft).__name__} that is not fitted. "
            f"Call `fit` first."
        )
    for name in ("images_", "crop_boxes_", "crops_u_"):
        if getattr(craft, name, None) is None:
            raise ValueError(
                f"`craft` must hold the fitted `{name}`, got {type(craft).__name__} without it."
            )
    if getattr(craft, "importances_", None) is None:
        raise ValueError(
            "`craft` must have global importances, got an estimator whose `importances_` is "
            "None. Call `craft.estimate_importance()` first."
        )


def _name_from(class_names, class_id):
    """``class_names[class_id]`` as a str, or None when it has no such entry."""
    if class_names is None:
        return None
    try:
        return str(class_names[class_id])
    except (IndexError, KeyError, TypeError):
        return None


# ---------------------------------------------------------------------------------------------
# Cards: what the index shows of one class
# ---------------------------------------------------------------------------------------------


def _box_crops(craft, crop_ids):
    """The crops ``crop_ids`` cut from the fitted images at their own resolution (no resize).

    The estimator's ``factorization.crops`` are resized to the model's input size (224 px for
    ImageNet models); a 40 px thumbnail needs only the crop's own pixels.
    """
    images = np.asarray(craft.images_)
    crops = []
    for image_index, y, x, size in np.asarray(craft.crop_boxes_)[crop_ids].astype(int):
        crops.append(images[image_index, y:y + size, x:x + size])
    if len({crop.shape for crop in crops}) > 1:  # boxes of several sizes: one common size
        return np.asarray(craft.factorization.crops[crop_ids])
    return np.stack(crops)


def _strip_png(craft, concept_id, n_thumbnails, thumbnail_size, display):
    """PNG bytes of the ``n_thumbnails`` crops where the concept is strongest, or None."""
    from xcraft.viz.report import _crop_strip_uri

    u = np.asarray(craft.crops_u_)[:, concept_id]  # (n_crops,)
    best = np.argsort(-u, kind="stable")[:n_thumbnails]
    best = best[u[best] > 0]  # only crops that express the concept at all
    if not len(best):
        return None
    uri = _crop_strip_uri(_box_crops(craft, best), display, thumbnail_size=thumbnail_size,
                          gap=1)
    return base64.b64decode(uri[len(_PNG_PREFIX):])


def _card_and_strips(craft, class_id, class_name, n_concepts, n_thumbnails, thumbnail_size,
                     display):
    from xcraft import __version__
    from xcraft.viz.report import _plain

    _check_fitted(craft)
    if class_id is None:
        class_id = getattr(craft, "class_id_", 0)
    class_id = _check_class_id(class_id, "class_id")
    n_concepts = _check_count(n_concepts, "n_concepts")
    n_thumbnails = _check_count(n_thumbnails, "n_thumbnails")
    thumbnail_size = _check_count(thumbnail_size, "thumbnail_size")
    if display is not None and not callable(display):
        raise TypeError(f"`display` must be callable or None, got {type(display).__name__}.")
    if class_name is not None and not isinstance(class_name, str):
        raise TypeError(f"`class_name` must be a str or None, got {type(class_name).__name__}.")

    importances = np.asarray(craft.importances_, dtype=np.float64)  # (r,)
    w = np.asarray(craft.concept_bank_w_)  # (r, p)
    total = float(np.sum(np.maximum(importances, 0.0)))
    order = np.argsort(-importances, kind="stable")[:n_concepts]
    concepts, strips = [], {}
    for rank, concept_id in enumerate(order.tolist()):
        png = _strip_png(craft, concept_id, n_thumbnails, thumbnail_size, display)
        if png is not None:
            strips[concept_id] = png
        concepts.append({
            "concept_id": concept_id,
            "rank": rank,
            "importance": importances[concept_id],
            "share": importances[concept_id] / total if total > 0 else None,
            "thumbnails": None if png is None else _PNG_PREFIX + base64.b64encode(png).decode(),
        })
    sensitivity = getattr(craft, "sensitivity", None)
    card = {
        "format_version": CARD_FORMAT_VERSION,
        "xcraft": __version__,
        "class_id": class_id,
        "class_name": class_name if class_name is not None else f"class {class_id}",
        "n_images": len(craft.images_),
        "n_crops": len(craft.crops_u_),
        "n_concepts": int(w.shape[0]),
        "n_channels": int(w.shape[1]),
        "importance_method": getattr(sensitivity, "method", "sobol"),
        "importances": importances,
        "concepts": concepts,
    }
    return _plain(card), strips


def _check_count(value, name):
    from xcraft._validation import check_positive_int

    return check_positive_int(value, name)


def class_card(craft, class_id=None, class_name=None, *, n_concepts=3, n_thumbnails=4,
               thumbnail_size=THUMBNAIL_SIZE, display=None):
    """Summarise one fitted class for the site index: its top concepts, importances and crops.

    Parameters
    ----------
    craft : CraftTf
        Fitted, with global importances (``estimate_importance()`` run). Its model is not used:
        a loaded estimator works the same.
    class_id : int, default=None
        The class; None for ``craft.class_id_``.
    class_name : str, default=None
        Shown in the index; ``"class <id>"`` when None.
    n_concepts : int, default=3
        The most important concepts shown.
    n_thumbnails : int, default=4
        Crops shown per concept: those where its coefficient is highest (and positive).
    thumbnail_size : int, default=40
        Height in pixels of a crop thumbnail (smaller crops are enlarged by an integer factor).
    display : callable, default=None
        Maps model inputs (n, h, w, c) to pixels in [0, 1], e.g. undoing a preprocessing; None
        rescales crops outside [0, 1] by their min and max.

    Returns
    -------
    card : dict
        JSON-ready: ``format_version``, ``class_id``, ``class_name``, ``n_images``, ``n_crops``,
        ``n_concepts`` (r), ``n_channels`` (p), ``importance_method``, ``importances`` (all r,
        by concept id) and ``concepts``: the top ``n_concepts`` by decreasing importance, each
        with ``concept_id``, ``rank``, ``importance``, ``share`` (of the sum of the positive
        importances) and ``thumbnails`` (a PNG data URI of its crop strip, or None when no crop
        expresses the concept).

    Raises
    ------
    TypeError, ValueError
        If ``craft`` is not fitted or has no importances, or on invalid options.

    Examples
    --------
    >>> card = class_card(craft, 3, "tench")  # doctest: +SKIP
    >>> [c["concept_id"] for c in card["concepts"]]  # doctest: +SKIP
    [7, 2, 11]
    """
    card, _ = _card_and_strips(craft, class_id, class_name, n_concepts, n_thumbnails,
                               thumbnail_size, display)
    return card


def _strip_file(concept_id):
    return f"card_concept_{concept_id}.png"


def _npz_bytes(**arrays):
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    return buffer.getvalue()


def write_class_card(craft, class_dir, class_id=None, class_name=None, *, n_concepts=3,
                     n_thumbnails=4, thumbnail_size=THUMBNAIL_SIZE, display=None):
    """Write a class's card, concept bank and thumbnails into its folder of the site.

    The files appear together (written under temporary names, then renamed with interrupts
    held): a site build never reads a card without its bank. Other files of ``class_dir`` (the
    result, the report) are kept; ``class_dir`` is created if needed.

    Parameters
    ----------
    craft : CraftTf
        Fitted, with global importances; no model is needed.
    class_dir : str or os.PathLike
        The class's folder, ``OUT/classes/class_<k>`` (or the temporary folder a worker renames
        to it).
    class_id, class_name, n_concepts, n_thumbnails, thumbnail_size, display
        As in :func:`class_card`.

    Returns
    -------
    card : dict
        What ``card.json`` holds: :func:`class_card`'s card, except that each concept's
        ``thumbnails`` is the name of its PNG file in ``class_dir`` (``card_concept_<i>.png``)
        rather than a data URI, so that the index can load the strips lazily.

    Notes
    -----
    Files written: ``card.json``; ``concept_bank.npz`` with ``concept_bank_w`` (r, p) float32,
    ``importances`` (r,) and ``class_id``; one ``card_concept_<i>.png`` per shown concept
    that some crop expresses.
    """
    card, strips = _card_and_strips(craft, class_id, class_name, n_concepts, n_thumbnails,
                                    thumbnail_size, display)
    for concept in card["concepts"]:
        if concept["thumbnails"] is not None:
            concept["thumbnails"] = _strip_file(concept["concept_id"])
    files = {
        CARD_FILE: json.dumps(card, indent=1, allow_nan=False) + "\n",
        BANK_FILE: _npz_bytes(
            concept_bank_w=np.asarray(craft.concept_bank_w_, dtype=np.float32),
            importances=np.asarray(craft.importances_, dtype=np.float64),
            class_id=np.int64(card["class_id"]),
        ),
        **{_strip_file(concept_id): png for concept_id, png in strips.items()},
    }
    write_files_together(class_dir, files)
    # Strips of an earlier card whose concepts are no longer the top ones.
    stale = re.compile(r"^card_concept_\d+\.png$")
    for name in os.listdir(class_dir):
        if stale.match(name) and name not in files:
            os.remove(os.path.join(class_dir, name))
    return card


# ---------------------------------------------------------------------------------------------
# Similarity of classes from their concept banks
# ---------------------------------------------------------------------------------------------


def _unit_rows(bank):
    """Rows of ``bank`` scaled to unit norm, and which rows have a direction (norm > 0)."""
    bank = np.asarray(bank, dtype=np.float32)
    norms = np.linalg.norm(bank, axis=1)  # (r,)
    live = norms > 0
    return bank / np.where(live, norms, 1.0)[:, None], live


def _concept_weights(importances, live, weighting):
    """Weights (r,) summing to 1 over the live concepts: positive importances, or uniform."""
    weights = np.zeros(live.shape, np.float64)
    if weighting == "importance" and importances is not None:
        weights = np.where(live, np.maximum(np.nan_to_num(np.asarray(importances, float)), 0), 0)
    if weights.sum() <= 0:  # no importances, or all zero: every live concept counts the same
        weights = live.astype(np.float64)
    return weights / weights.sum()


def concept_bank_similarity(banks, importances=None, *, weighting="importance",
                            block_bytes=SIMILARITY_BLOCK_BYTES):
    """Similarity of classes from the cosines of their concepts: (n_classes, n_classes).

    Parameters
    ----------
    banks : sequence of ndarray of shape (r_k, p)
        One concept bank W per class (r_k may differ between classes; p may not).
    importances : sequence of ndarray of shape (r_k,) or None, default=None
        Each class's concept importances (None entries allowed), for ``weighting="importance"``.
    weighting : {"importance", "uniform"}, default="importance"
        How a class's concepts count in its similarity to others.
    block_bytes : int, default=64 MiB
        Cosines held in memory at once: the classes are compared by blocks.

    Returns
    -------
    ndarray of shape (n_classes, n_classes), float64
        Symmetric, 1 on the diagonal; in [0, 1] for non-negative banks (NMF), in [-1, 1] for
        signed ones (semi-NMF).

    Raises
    ------
    ValueError
        If the banks do not share one number of channels, or a bank has no non-zero concept.

    Notes
    -----
    With ŵ_i the unit-norm concepts of class a and v̂_j those of class b, each concept of a is
    matched with its closest concept of b, and the matches are averaged with weights ω_a:

    .. math::
        s(a \\to b) = \\sum_i \\omega_{a,i} \\max_j \\hat w_i \\cdot \\hat v_j, \\qquad
        S(a, b) = \\tfrac12 \\big(s(a \\to b) + s(b \\to a)\\big).

    ω_a are the class's positive importances normalised to sum 1 (``"importance"``: a class is
    what its important concepts are, and an unimportant concept it happens to share with
    another class counts little), or 1 / r_a (``"uniform"``, also used when a class has no
    positive importance). Concepts with a zero vector have no direction and weigh 0. S(a, a)
    = 1 because each concept is its own best match; two classes with the same concepts have
    S = 1 whatever their order; orthogonal banks have S = 0. The max makes S robust to
    concepts of one class that the other lacks, which only lower it by their weight.
    """
    if weighting not in WEIGHTINGS:
        listed = ", ".join(repr(w) for w in WEIGHTINGS)
        raise ValueError(f"`weighting` must be one of {listed}, got {weighting!r}.")
    banks = [np.asarray(bank) for bank in banks]
    n = len(banks)
    if n == 0:
        return np.zeros((0, 0))
    for k, bank in enumerate(banks):
        if bank.ndim != 2 or bank.shape[0] == 0:
            raise ValueError(
                f"`banks[{k}]` must have shape (n_concepts, n_channels), got shape {bank.shape}."
            )
    channels = {bank.shape[1] for bank in banks}
    if len(channels) > 1:
        raise ValueError(
            f"`banks` must share one number of channels (concepts of one layer), got "
            f"{sorted(channels)}. Build the site from classes explained at the same layer."
        )
    if importances is None:
        importances = [None] * n
    r_max, p = max(bank.shape[0] for bank in banks), channels.pop()
    unit = np.zeros((n, r_max, p), np.float32)  # zero rows pad the smaller banks
    weights = np.zeros((n, r_max))
    live = np.zeros((n, r_max), bool)
    for k, bank in enumerate(banks):
        rows, alive = _unit_rows(bank)
        if not alive.any():
            raise ValueError(f"`banks[{k}]` must have a non-zero concept, got only zero rows.")
        r = bank.shape[0]
        unit[k, :r], live[k, :r] = rows, alive
        weights[k, :r] = _concept_weights(importances[k], alive, weighting)
    flat = unit.reshape(n * r_max, p)  # (n r, p), rows (class, concept)
    # Rows (concept, class): the max over b's concepts is then an elementwise maximum of r
    # contiguous (n,) slabs, several times faster than reducing r-long runs of each row.
    by_concept = unit.transpose(1, 0, 2).reshape(r_max * n, p)  # (r n, p)
    live_by_concept = live.T  # (r_b, n)
    directed = np.zeros((n, n))
    all_live = bool(live.all())  # banks of one rank, no zero concept: no mask needed
    # Two (block, r, r, n) float32 arrays live at once: the cosines and the masked copy.
    per_class = 2 * 4 * r_max * n * r_max
    block = max(1, int(block_bytes) // per_class)
    for start in range(0, n, block):
        stop = min(n, start + block)
        cos = flat[start * r_max:stop * r_max] @ by_concept.T  # (b r_a, r_b n)
        cos = cos.reshape(stop - start, r_max, r_max, n)  # (b, r_a, r_b, n)
        if not all_live:  # a padded or dead concept of b is no match for anything
            cos = np.where(live_by_concept[None, None], cos, -np.inf)
        best = cos.max(axis=2)  # (b, r_a, n): each concept of a, its closest concept of b
        best = np.where(weights[start:stop, :, None] > 0, best, 0.0)
        directed[start:stop] = np.einsum("br,brn->bn", weights[start:stop], best)
    similarity = 0.5 * (directed + directed.T)
    np.fill_diagonal(similarity, 1.0)  # exact: float32 cosines of a unit vector are 1 ± 1e-7
    return np.clip(similarity, -1.0, 1.0)


def shared_concepts(bank_a, bank_b, n_pairs=3):
    """The concept pairs two classes share: mutual nearest concepts, by decreasing cosine.

    Parameters
    ----------
    bank_a : ndarray of shape (r_a, p)
    bank_b : ndarray of shape (r_b, p)
    n_pairs : int, default=3

    Returns
    -------
    list of (int, int, float)
        ``(i, j, cosine)``: concept i of a and concept j of b are each other's closest concept,
        with a positive cosine (orthogonal or opposite concepts share nothing).
    """
    unit_a, live_a = _unit_rows(bank_a)
    unit_b, live_b = _unit_rows(bank_b)
    cos = np.asarray(unit_a, np.float64) @ np.asarray(unit_b, np.float64).T  # (r_a, r_b)
    cos = np.where(live_a[:, None] & live_b[None, :], cos, -np.inf)
    best_j, best_i = cos.argmax(axis=1), cos.argmax(axis=0)
    pairs = [(i, int(j), float(cos[i, j])) for i, j in enumerate(best_j)
             if live_a[i] and best_i[j] == i and np.isfinite(cos[i, j]) and cos[i, j] > 0]
    pairs.sort(key=lambda pair: -pair[2])
    return pairs[:n_pairs]


# ---------------------------------------------------------------------------------------------
# Reading the classes of a run
# ---------------------------------------------------------------------------------------------


def _read_class(out_dir, class_id):
    """What the site knows of one class: ``status`` ok / missing / unreadable, card, bank."""
    folder = os.path.join(out_dir, CLASSES_DIR, _class_dir_name(class_id))
    entry = {"class_id": class_id, "dir": f"{CLASSES_DIR}/{_class_dir_name(class_id)}",
             "report": os.path.isfile(os.path.join(folder, REPORT_FILE))}
    card_path = os.path.join(folder, CARD_FILE)
    if not os.path.isfile(card_path):
        return {**entry, "status": "missing", "reason": "no card (failed or still running)"}
    try:
        card = read_json(card_path)
        concepts = card.get("concepts")
        if card.get("class_id") != class_id or not isinstance(concepts, list) or not all(
            isinstance(c, dict) and isinstance(c.get("concept_id"), int) for c in concepts
        ):
            raise ValueError(f"the file {card_path!r} is not the card of class {class_id}")
        arrays = load_npz(os.path.join(folder, BANK_FILE))
        bank = np.asarray(arrays["concept_bank_w"], np.float32)
        if bank.ndim != 2 or not np.isfinite(bank).all() or not np.any(bank != 0, axis=1).any():
            raise ValueError(f"its concept bank of shape {bank.shape} is not a finite (r, p) "
                             f"matrix with a non-zero concept")
        importances = arrays.get("importances")
        if importances is not None and np.shape(importances) != (bank.shape[0],):
            importances = None  # not one per concept: the similarity weighs them uniformly
    except (ValueError, KeyError) as err:
        return {**entry, "status": "unreadable", "reason": str(err)}
    thumbnails = {concept.get("concept_id"): _thumbnail_src(out_dir, entry,
                                                             concept.get("thumbnails"))
                  for concept in concepts}
    return {**entry, "status": "ok", "card": card, "bank": bank, "importances": importances,
            "thumbnails": thumbnails}


def _class_ids_of(out_dir, class_ids):
    found = set()
    classes_dir = os.path.join(out_dir, CLASSES_DIR)
    if os.path.isdir(classes_dir):
        for name in os.listdir(classes_dir):
            match = _CLASS_DIR.match(name)
            if match and os.path.isdir(os.path.join(classes_dir, name)):
                found.add(int(match.group(1)))
    if class_ids is not None:
        found |= {_check_class_id(k, "class_ids[...]") for k in class_ids}
    return sorted(found)


def _thumbnail_src(out_dir, entry, value):
    """The src of a card's strip: a data URI as is, a file of the class folder if it exists."""
    if not isinstance(value, str):
        return None
    if value.startswith(_PNG_PREFIX):
        return value
    # Only plain file names of the class's own folder: a card cannot point outside the site.
    if os.path.basename(value) != value or value in ("", ".", ".."):
        return None
    if not os.path.isfile(os.path.join(out_dir, *entry["dir"].split("/"), value)):
        return None
    return f"{entry['dir']}/{urllib.parse.quote(value)}"


# ---------------------------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------------------------

_CSS = """
body { font-family: -apple-system, 'Segoe UI', Helvetica, Arial, sans-serif; margin: 0;
       color: #1d232a; background: #f6f7f9; line-height: 1.4; }
header { background: #22313f; color: #fff; padding: 16px 32px; }
header h1 { margin: 0 0 4px 0; font-size: 1.5em; }
header p { margin: 2px 0; color: #c9d3dd; font-size: 0.9em; }
.tools { padding: 10px 32px; background: #e9edf1; position: sticky; top: 0; z-index: 1; }
#search { font-size: 1em; padding: 5px 8px; width: 22em; max-width: 60%; }
main { padding: 8px 32px 40px 32px; }
.grid { display: grid; grid-template-columns: repeat(auto-fill, minmax(340px, 1fr));
        gap: 14px; }
.card { background: #fff; border: 1px solid #dde2e7; border-radius: 6px; padding: 8px 14px;
        overflow: hidden; }
.card h2 { font-size: 1.05em; margin: 2px 0 4px 0; overflow-wrap: anywhere; }
.card.hidden { display: none; }
a { color: #1f5f99; text-decoration: none; }
a:hover { text-decoration: underline; }
.concept { display: flex; align-items: center; gap: 8px; margin: 3px 0; }
.concept .label { width: 7.5em; flex: none; font-size: 0.88em; font-variant-numeric: tabular-nums; }
.concept img { height: 40px; max-width: 100%; image-rendering: pixelated; }
.similar { margin: 6px 0 0 0; padding-left: 1.4em; font-size: 0.85em; }
.note { color: #5a6773; font-size: 0.86em; }
.figure img { max-width: 100%; height: auto; }
ul.missing { columns: 3; font-size: 0.9em; }
"""

_SCRIPT = """
(function () {
  var box = document.getElementById('search');
  var cards = document.querySelectorAll('.card');
  var count = document.getElementById('shown');
  function filter() {
    var words = box.value.toLowerCase().split(/\\s+/).filter(function (w) { return w; });
    var shown = 0;
    cards.forEach(function (card) {
      var text = card.getAttribute('data-search');
      var keep = words.every(function (w) { return text.indexOf(w) >= 0; });
      card.classList.toggle('hidden', !keep);
      if (keep) { shown += 1; }
    });
    count.textContent = shown;
  }
  box.addEventListener('input', filter);
  filter();
})();
"""


def _esc(text):
    return html.escape(str(text), quote=True)


def _number(value):
    """``value`` if it is a real number (a card is read from disk: trust nothing), else None."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        return None
    return float(value)


def _fmt(value):
    return "n/a" if value is None else f"{value:.3g}"


def _class_link(entry, label):
    """The class's name linking to its report, or plain when the report does not exist."""
    if entry["report"]:
        return f'<a href="{entry["dir"]}/{REPORT_FILE}">{_esc(label)}</a>'
    return _esc(label)


def _concept_html(entry, concept):
    src = entry["thumbnails"].get(concept.get("concept_id"))
    image = (f'<img loading="lazy" alt="crops of concept {concept["concept_id"]}" src="{src}">'
             if src else '<span class="note">no crop expresses it</span>')
    importance, share = _number(concept.get("importance")), _number(concept.get("share"))
    return (f'<div class="concept" data-concept="{concept["concept_id"]}" '
            f'data-importance="{_esc(repr(importance))}"><span class="label">'
            f'C{concept["concept_id"]} <b>{_fmt(importance)}</b>'
            + ("" if share is None else f" <span class=\"note\">{100 * share:.0f} %</span>")
            + f"</span>{image}</div>")


def _similar_html(entry, similar, labels, entries):
    if not similar:
        return ""
    items = []
    for other in similar:
        b = other["class_id"]
        pairs = ", ".join(
            f'C{i}↔' + (f'<a href="{entries[b]["dir"]}/{REPORT_FILE}#class-{b}">C{j}</a>'
                        if entries[b]["report"] else f"C{j}")
            + f" ({cosine:.2f})"
            for i, j, cosine in other["shared"]
        )
        items.append(f'<li><a href="#class-{b}">{_esc(labels[b])}</a> '
                     f'{other["similarity"]:.2f}'
                     + (f' <span class="note">shared: {pairs}</span>' if pairs else "")
                     + "</li>")
    return ('<div class="note">Most similar classes (shared concept pairs):</div>'
            f'<ol class="similar">{"".join(items)}</ol>')


def _card_html(entry, label, similar, labels, entries):
    card = entry["card"]
    class_id = entry["class_id"]
    search = f"{class_id} {label}".lower()
    return (f'<div class="card" id="class-{class_id}" data-search="{_esc(search)}">'
            f'<h2>{_class_link(entry, label)} <span class="note">#{class_id}</span></h2>'
            f'<div class="note">{_esc(card.get("n_images", "?"))} images, '
            f'{_esc(card.get("n_concepts", "?"))} concepts'
            + ("" if entry["report"] else "; no report yet")
            + "</div>"
            + "".join(_concept_html(entry, concept) for concept in card["concepts"])
            + _similar_html(entry, similar, labels, entries)
            + "</div>")


def _heatmap_uri(similarity, labels):
    """Heatmap of the similarity matrix, classes ordered by average-linkage clustering."""
    from scipy.cluster.hierarchy import leaves_list, linkage
    from scipy.spatial.distance import squareform

    from xcraft.viz.plots import new_figure
    from xcraft.viz.report import _figure_uri

    n = len(labels)
    order = np.arange(n)
    if n > 2:
        distance = np.clip(1.0 - similarity, 0.0, None)
        np.fill_diagonal(distance, 0.0)
        order = leaves_list(linkage(squareform(distance, checks=False), method="average"))
    figure = new_figure()
    side = 2.5 + 0.16 * n
    figure.set_size_inches(side + 1.2, side)
    ax = figure.subplots()
    shown = similarity[np.ix_(order, order)]
    low = min(0.0, float(shown.min()))
    image = ax.imshow(shown, cmap="viridis", vmin=low, vmax=1.0)
    names = [labels[k] if len(labels[k]) <= 24 else labels[k][:23] + "…" for k in order]
    ax.set_xticks(range(n), names, rotation=90, fontsize=7)
    ax.set_yticks(range(n), names, fontsize=7)
    figure.colorbar(image, ax=ax, fraction=0.04, label="concept-bank similarity")
    return _figure_uri(figure), order


def _page(title, entries, labels, similar, heatmap, weighting, created):
    ok = [k for k, entry in entries.items() if entry["status"] == "ok"]
    absent = [k for k, entry in entries.items() if entry["status"] != "ok"]
    cards = "\n".join(_card_html(entries[k], labels[k], similar.get(k, []), labels, entries)
                      for k in ok)
    parts = [
        "<!DOCTYPE html>\n<html lang=\"en\">\n<head>\n<meta charset=\"utf-8\">\n"
        "<meta name=\"viewport\" content=\"width=device-width, initial-scale=1\">\n"
        f"<title>{_esc(title)}</title>\n<style>{_CSS}</style>\n</head>\n<body>\n"
        f"<header><h1>{_esc(title)}</h1><p>CRAFT concept explanations (Fel et al., CVPR 2023) "
        f"of {len(ok)} class{'es' if len(ok) != 1 else ''}"
        + (f", {len(absent)} missing" if absent else "")
        + f"; made {_esc(created)}.</p></header>\n"
        '<div class="tools"><label for="search">Filter by name or id: </label>'
        '<input id="search" type="search" placeholder="e.g. dog, 207" autocomplete="off"> '
        f'<span class="note"><span id="shown">{len(ok)}</span> of {len(ok)} classes shown'
        + (' · <a href="#similarity">class similarity</a>' if heatmap else "")
        + (' · <a href="#missing">missing classes</a>' if absent else "")
        + "</span></div>\n<main>\n"
        '<p class="note">Each card shows the class\'s most important concepts (C<i>id</i>, '
        "its importance and its share of the class's total), with the crops where each is "
        "strongest; the class name opens its full report. Similar classes: "
        + _similarity_note(weighting) + "</p>\n",
        f'<div class="grid">\n{cards}\n</div>\n',
    ]
    if heatmap:
        parts.append(
            '<h2 id="similarity">Class similarity</h2><div class="figure">'
            f'<img alt="class similarity heatmap" src="{heatmap}"></div>'
            '<p class="note">Classes ordered by average-linkage clustering of 1 − similarity: '
            "classes sharing concepts form blocks. The matrix is in "
            f"<code>{SIMILARITY_FILE}</code>.</p>\n")
    elif len(ok) > MAX_HEATMAP_CLASSES:
        parts.append(f'<p class="note">The similarity matrix of the {len(ok)} classes is in '
                     f"<code>{SIMILARITY_FILE}</code> (no heatmap above "
                     f"{MAX_HEATMAP_CLASSES} classes).</p>\n")
    if absent:
        items = "".join(
            f"<li>{_class_link(entries[k], labels[k])} <span class=\"note\">#{k}: "
            f"{_esc(entries[k]['reason'])}</span></li>" for k in absent)
        parts.append(f'<h2 id="missing">Missing classes ({len(absent)})</h2>'
                     f'<ul class="missing">{items}</ul>\n')
    parts.append(f"</main>\n<script>{_SCRIPT}</script>\n</body>\n</html>\n")
    return "".join(parts)


def _similarity_note(weighting):
    weights = ("weighted by the concepts' importances" if weighting == "importance"
               else "every concept counting the same")
    return (f"each concept of a class is matched with its closest concept (cosine of the concept "
            f"vectors) in the other class, the matches are averaged ({weights}) and the two "
            f"directions averaged: 1 for the same concepts, 0 for orthogonal ones. A shared "
            f"pair C<i>i</i>↔C<i>j</i> is two concepts that are each other's closest.")


# ---------------------------------------------------------------------------------------------
# Public entry point
# ---------------------------------------------------------------------------------------------


def write_site(out_dir, *, title="xcraft concept explanations", class_ids=None, class_names=None,
               top_similar=5, n_shared=3, weighting="importance",
               max_heatmap_classes=MAX_HEATMAP_CLASSES):
    """Write the site index of a many-class run: a searchable grid and a class-similarity view.

    Parameters
    ----------
    out_dir : str or os.PathLike
        The run's folder, holding ``classes/class_<k>/`` with each class's ``card.json`` and
        ``concept_bank.npz`` (:func:`write_class_card`) and ``report.html``.
    title : str, default="xcraft concept explanations"
    class_ids : iterable of int, default=None
        Every class of the run (e.g. ``run.json``'s list): those without a readable card are
        listed as missing. None: the classes that have a folder.
    class_names : sequence of str or dict of int to str, default=None
        ``class_names[class_id]``; else the card's name, else ``"class <id>"``.
    top_similar : int, default=5
        Most similar classes listed per class (0 for none).
    n_shared : int, default=3
        Shared concept pairs shown per similar class.
    weighting : {"importance", "uniform"}, default="importance"
        Concept weights of the similarity (:func:`concept_bank_similarity`).
    max_heatmap_classes : int, default=60
        The heatmap of the similarity matrix is drawn up to this many classes.

    Returns
    -------
    site : dict
        What ``site.json`` holds: ``format_version``, ``created``, ``title``, ``files``,
        ``similarity`` (definition, weighting, ``class_ids`` of the matrix), ``classes`` (per
        class id as a string: ``class_name``, ``status`` "ok" / "missing" / "unreadable",
        ``reason``, ``report`` path or None, ``similar``: the top classes with their similarity
        and shared pairs) and ``missing`` (class ids).

    Raises
    ------
    TypeError, ValueError
        On invalid options, or if the banks of the classes have different numbers of channels.

    Notes
    -----
    Files written into ``out_dir``, together: ``index.html`` (one page, inline style and
    script, thumbnails from the class folders, the heatmap inline), ``site.json`` and
    ``similarity.npz`` (``similarity`` (n, n) float32 and ``class_ids`` (n,), over the classes
    with a card). A class whose card is missing or unreadable is listed, not fatal; a class
    without ``report.html`` is shown without a link.

    Examples
    --------
    >>> site = write_site("out", class_ids=range(1000), class_names=names)  # doctest: +SKIP
    """
    from xcraft._validation import check_nonnegative_int
    from xcraft.viz.report import _plain

    out_dir = os.fspath(out_dir)
    if not os.path.isdir(out_dir):
        raise ValueError(f"`out_dir` must be an existing run folder, got {out_dir!r}, "
                         f"which is not a directory.")
    top_similar = check_nonnegative_int(top_similar, "top_similar")
    n_shared = check_nonnegative_int(n_shared, "n_shared")
    max_heatmap_classes = check_nonnegative_int(max_heatmap_classes, "max_heatmap_classes")
    if weighting not in WEIGHTINGS:
        listed = ", ".join(repr(w) for w in WEIGHTINGS)
        raise ValueError(f"`weighting` must be one of {listed}, got {weighting!r}.")
    if class_ids is not None and isinstance(class_ids, (str, bytes)):
        raise TypeError(f"`class_ids` must be an iterable of int, got {type(class_ids).__name__}.")

    entries = {k: _read_class(out_dir, k) for k in _class_ids_of(out_dir, class_ids)}
    labels = {}
    for k, entry in entries.items():
        card_name = entry.get("card", {}).get("class_name")
        labels[k] = (_name_from(class_names, k) or (str(card_name) if card_name else None)
                     or f"class {k}")
    ok = [k for k, entry in entries.items() if entry["status"] == "ok"]
    # Banks of another layer cannot be compared: such classes (a mixed-up run) are set aside.
    channels = collections.Counter(entries[k]["bank"].shape[1] for k in ok)
    if len(channels) > 1:
        common = channels.most_common(1)[0][0]
        for k in ok:
            p = entries[k]["bank"].shape[1]
            if p != common:
                entries[k].update(status="unreadable", reason=(
                    f"its concept bank has {p} channels, most classes' {common}: not the "
                    f"same layer"))
        ok = [k for k in ok if entries[k]["status"] == "ok"]
    similarity = concept_bank_similarity([entries[k]["bank"] for k in ok],
                                         [entries[k]["importances"] for k in ok],
                                         weighting=weighting)
    similar = {}
    for row, a in enumerate(ok):
        scores = similarity[row].copy()
        scores[row] = -np.inf  # a class is not its own neighbour
        # argpartition: the top k of n in O(n), then only those k sorted.
        k = min(top_similar, len(ok) - 1)
        if k <= 0:
            similar[a] = []
            continue
        top = np.argpartition(-scores, k - 1)[:k]
        top = top[np.argsort(-scores[top], kind="stable")]
        similar[a] = [{
            "class_id": ok[col],
            "similarity": float(similarity[row, col]),
            "shared": shared_concepts(entries[a]["bank"], entries[ok[col]]["bank"], n_shared)
            if n_shared else [],
        } for col in top]

    heatmap = None
    if 1 < len(ok) <= max_heatmap_classes:
        heatmap, _ = _heatmap_uri(similarity, [labels[k] for k in ok])
    created = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    page = _page(str(title), entries, labels, similar, heatmap, weighting, created)
    site = {
        "format_version": SITE_FORMAT_VERSION,
        "created": created,
        "title": str(title),
        "files": {"index": INDEX_FILE, "site": SITE_FILE, "similarity": SIMILARITY_FILE},
        "similarity": {
            "definition": "S(a,b) = (s(a->b) + s(b->a)) / 2, s(a->b) = sum_i w_a,i max_j "
                          "cos(W_a[i], W_b[j])",
            "weighting": weighting,
            "class_ids": ok,
        },
        "classes": {
            str(k): {
                "class_name": labels[k],
                "status": entry["status"],
                "reason": entry.get("reason"),
                "dir": entry["dir"],
                "report": f"{entry['dir']}/{REPORT_FILE}" if entry["report"] else None,
                "similar": similar.get(k, []),
            }
            for k, entry in entries.items()
        },
        "missing": [k for k, entry in entries.items() if entry["status"] != "ok"],
    }
    site = _plain(site)
    write_files_together(out_dir, {
        INDEX_FILE: page,
        SITE_FILE: json.dumps(site, indent=1, allow_nan=False) + "\n",
        SIMILARITY_FILE: _npz_bytes(similarity=similarity.astype(np.float32),
                                    class_ids=np.asarray(ok, dtype=np.int64)),
    })
    return site
