import base64
import html
import html.parser
import importlib.util
import io
import json
import os
import re
import shutil
import subprocess

import numpy as np
import pytest
from matplotlib.figure import Figure
from PIL import Image

from tests import _synthetic
from xcraft.craft.estimator import CraftTf
from xcraft.craft.fidelity import concept_deletion_insertion
from xcraft.craft.recursion import ConceptTree
from xcraft.viz import report as report_module
from xcraft.viz.plots import (
    _displayable_images,
    _tree_prefixes,
    plot_concept_tree,
    plot_concepts_crops,
)
from xcraft.viz.report import write_report

ATTRIBUTION_AVAILABLE = importlib.util.find_spec("xcraft.craft.attribution") is not None


@pytest.fixture(scope="module")
def parts_craft():
    """A planted two-part craft whose object concept is decomposed at the "parts" layer."""
    images, _ = _synthetic.make_motif_images(48, motifs=("red", "green"), seed=1)
    model = _synthetic.make_parts_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=3,
                               patch_size=12, random_state=0, verbose=False)
    craft.fit(images, class_id=0)
    craft.estimate_importance(nb_design=16, n_bootstrap=30)
    top = int(craft.sensitivity.most_important_concepts[0])
    craft.decompose(top, _synthetic.PARTS_LAYER, number_of_concepts=2, percentile=70,
                    nb_design=8, n_bootstrap=20)
    return craft


@pytest.fixture(scope="module")
def written(parts_craft, tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    summary = write_report({0: parts_craft}, out, class_names=["object", "background"],
                           n_crops=6, n_map_images=2, n_map_concepts=2, n_random=4,
                           settings={"purpose": "test"})
    return out, summary


class _PageParser(html.parser.HTMLParser):
    """Collect the tags and attributes of a page."""

    def __init__(self):
        super().__init__()
        self.tags, self.images, self.links = [], [], []

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "img":
            self.images.append(attrs.get("src", ""))
        self.links.extend(attrs[key] for key in ("href", "src") if key in attrs and tag != "img")


def _parse(path):
    parser = _PageParser()
    parser.feed(path.read_text(encoding="utf-8"))
    parser.close()
    return parser


def _decode_png(uri):
    prefix = "data:image/png;base64,"
    assert uri.startswith(prefix)
    image = Image.open(io.BytesIO(base64.b64decode(uri[len(prefix):], validate=True)))
    image.verify()  # raises on a truncated or corrupt PNG
    return image


def test_report_is_one_self_contained_page(written, parts_craft):
    out, _ = written
    assert sorted(os.listdir(out)) == ["report.html", "summary.json"]
    page = _parse(out / "report.html")
    # No external asset: no stylesheet link, no script, every image inline.
    assert "link" not in page.tags and "script" not in page.tags
    assert all(link.startswith("#class-") for link in page.links)
    n_nodes = len(ConceptTree(parts_craft))  # 3 concepts + 2 sub-concepts
    # One crop strip per node, plus importance, fidelity and tree figures (and the maps).
    assert len(page.images) == n_nodes + 3 + int(ATTRIBUTION_AVAILABLE)
    sizes = [_decode_png(uri).size for uri in page.images]
    assert all(width > 10 and height > 10 for width, height in sizes)


def test_summary_matches_the_estimators(written, parts_craft):
    out, summary = written
    with open(out / "summary.json", encoding="utf-8") as file:
        on_disk = json.load(file, parse_constant=lambda name: pytest.fail(f"{name} in JSON"))
    assert on_disk == json.loads(json.dumps(summary))
    entry = on_disk["classes"]["0"]
    assert entry["class_name"] == "object" and entry["layer"] == _synthetic.FEATURE_LAYER
    assert on_disk["settings"] == {"purpose": "test"}
    assert {"xcraft", "tensorflow", "numpy", "python"} <= set(on_disk["versions"])

    concepts = entry["concepts"]
    order = np.argsort(-parts_craft.importances_, kind="stable")
    assert [c["concept_id"] for c in concepts] == order.tolist()
    np.testing.assert_allclose([c["importance"] for c in concepts],
                               parts_craft.importances_[order], rtol=1e-6)
    np.testing.assert_allclose([c["interval"] for c in concepts],
                               parts_craft.sensitivity.intervals[:, order].T, rtol=1e-6)
    assert entry["importance_sum"] > 0
    # Each crop counts once, for its strongest concept.
    assert sum(c["n_crops"] for c in concepts) == len(parts_craft.crops_u_)

    top = int(order[0])
    child = parts_craft.children_[top]
    (decomposed,) = [c for c in concepts if c["children"]]
    assert decomposed["concept_id"] == top
    assert decomposed["refinement"]["coherence_gain"] == pytest.approx(
        child.refinement_["coherence_gain"], rel=1e-9)
    subs = decomposed["children"]
    assert [s["path"] for s in subs] == [f"C{top}.{i}" for i in
                                         np.argsort(-child.importances_, kind="stable")]
    assert all(s["layer"] == _synthetic.PARTS_LAYER for s in subs)
    np.testing.assert_allclose(sorted(s["importance"] for s in subs),
                               np.sort(child.importances_), rtol=1e-6)
    # Sub-concepts carry their own bootstrap intervals (decompose(n_bootstrap=...)), from
    # the child's designs, not the parent's.
    for sub in subs:
        sub_id = sub["concept_id"]
        np.testing.assert_allclose(sub["interval"], child.sensitivity.intervals[:, sub_id],
                                   rtol=1e-6)
        assert sub["interval"][0] <= sub["importance"] + 1e-6
        assert sub["interval"][1] >= sub["importance"] - 1e-6


def test_fidelity_matches_a_direct_computation(written, parts_craft):
    _, summary = written
    fidelity = summary["classes"]["0"]["fidelity"]
    assert set(fidelity["aucs"]["deletion"]) == {"sobol", "tcav", "occlusion", "random"}
    craft = parts_craft
    direct = concept_deletion_insertion(
        craft.transform(craft.images_), craft.concept_bank_w_, craft.latent_to_logit_model,
        craft.class_id_, {"sobol": craft.importances_}, n_random=0)
    for kind in ("deletion", "insertion"):
        assert fidelity["aucs"][kind]["sobol"] == pytest.approx(direct.aucs[kind]["sobol"],
                                                                rel=1e-6)
    # The planted object concept drives the class: removing it first beats random orders.
    assert fidelity["aucs"]["deletion"]["sobol"] < fidelity["aucs"]["deletion"]["random"]
    assert fidelity["aucs"]["insertion"]["sobol"] > fidelity["aucs"]["insertion"]["random"]


def test_files_follow_the_umask(written):
    out, _ = written
    umask = os.umask(0)
    os.umask(umask)
    for name in ("report.html", "summary.json"):
        assert os.stat(out / name).st_mode & 0o777 == 0o666 & ~umask


def test_failed_report_keeps_the_previous_files(parts_craft, tmp_path, monkeypatch):
    write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0)
    before = {name: (tmp_path / name).read_bytes() for name in ("report.html", "summary.json")}

    def broken(*args, **kwargs):
        raise RuntimeError("disk full")

    monkeypatch.setattr(report_module, "_page", broken)
    with pytest.raises(RuntimeError, match="disk full"):
        write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0, title="new")
    assert sorted(os.listdir(tmp_path)) == ["report.html", "summary.json"]  # no temp file left
    assert {name: (tmp_path / name).read_bytes() for name in before} == before


def test_single_estimator_without_extras(parts_craft, tmp_path):
    summary = write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0)
    entry = summary["classes"]["0"]
    assert entry["class_name"] == "class 0" and entry["fidelity"] is None
    page = _parse(tmp_path / "report.html")
    assert len(page.images) == len(ConceptTree(parts_craft)) + 2  # strips, importance, tree


def test_manager_reports_its_fitted_classes(parts_craft, tmp_path):
    class Manager:  # what write_report reads of a CraftManagerTf
        craft_instances = {0: parts_craft, 1: CraftTf(parts_craft.input_to_latent_model,
                                                      parts_craft.latent_to_logit_model)}

    summary = write_report(Manager(), tmp_path, fidelity=False, n_map_images=0)
    assert list(summary["classes"]) == ["0"]  # class 1 was never fitted


@pytest.mark.parametrize(
    ("crafts", "kwargs", "error", "match"),
    [
        ({}, {}, ValueError, "`crafts` must hold at least one fitted CraftTf, got an empty dict."),
        ([1], {}, TypeError, "`crafts` must be a dict mapping class ids to fitted CraftTf"),
        ("unfitted", {}, ValueError, r"`crafts\[0\]` must be a fitted CraftTf, got CraftTf"),
        ("fitted", {"fidelity_orders": ("shap",)}, ValueError,
         "`fidelity_orders` must hold names among 'sobol', 'tcav', 'occlusion', got 'shap'."),
        ("fitted", {"n_crops": 0}, ValueError, "`n_crops` must be >= 1, got 0."),
        ("fitted", {"display": "gray"}, TypeError, "`display` must be callable or None"),
    ],
)
def test_bad_arguments(parts_craft, tmp_path, crafts, kwargs, error, match):
    if crafts == "unfitted":
        crafts = {0: CraftTf(parts_craft.input_to_latent_model,
                             parts_craft.latent_to_logit_model)}
    elif crafts == "fitted":
        crafts = {0: parts_craft}
    with pytest.raises(error, match=match):
        write_report(crafts, tmp_path, **kwargs)
    assert not os.listdir(tmp_path)


# ------------------------------------------------------------------------------------ plots


def test_concepts_crops_rows_follow_importance(parts_craft):
    figure = plot_concepts_crops(parts_craft, nb_crops=4, figure=Figure())
    (ax,) = figure.axes
    r = parts_craft.concept_bank_w_.shape[0]
    assert len(ax.images) == r * 4
    order = parts_craft.sensitivity.most_important_concepts
    labels = [text.get_text().split("\n")[0] for text in ax.texts[:-1]]
    assert labels == [f"C{i}" for i in order]
    strongest = np.argmax(parts_craft.crops_u_[:, order[0]])
    expected = _displayable_images(parts_craft.factorization.crops[strongest:strongest + 1])[0]
    np.testing.assert_array_equal(ax.images[0].get_array(), expected)


@pytest.mark.parametrize(
    ("paths", "prefixes"),
    [
        (["C1", "C1 → C1.0", "C1 → C1.1", "C0"], ["", "├─ ", "└─ ", ""]),
        (["C1", "C1 → C1.0", "C1 → C1.0 → C1.0.2", "C1 → C1.1"],
         ["", "├─ ", "│  └─ ", "└─ "]),
        (["C1", "C1 → C1.1", "C1 → C1.1 → C1.1.0", "C0"], ["", "└─ ", "   └─ ", ""]),
    ],
)
def test_tree_prefixes(paths, prefixes):
    assert _tree_prefixes(paths, " → ") == prefixes


def test_concept_tree_draws_every_node(parts_craft):
    tree = ConceptTree(parts_craft)
    figure = plot_concept_tree(tree, n_crops=3, figure=Figure())
    (ax,) = figure.axes
    assert len(ax.images) == len(tree) * 3
    texts = " ".join(text.get_text() for text in ax.texts)
    assert all(node.label in texts for node in tree)
    figure = plot_concept_tree(tree, n_crops=2, max_depth=0, figure=Figure())
    assert len(figure.axes[0].images) == parts_craft.concept_bank_w_.shape[0] * 2


def test_concept_tree_plot_method(parts_craft):
    import matplotlib.pyplot as plt

    figure = ConceptTree(parts_craft).plot(n_crops=2, nb_most_important_concepts=1)
    try:
        assert len(figure.axes[0].images) == (1 + 2) * 2  # the top concept and its 2 children
    finally:
        plt.close(figure)


def test_plot_arguments_are_checked(parts_craft):
    with pytest.raises(ValueError, match="`nb_crops` must be an int >= 1, got 0."):
        plot_concepts_crops(parts_craft, nb_crops=0, figure=Figure())
    with pytest.raises(ValueError, match=r"`concept_ids` must hold concept ids in \[0, 2\]"):
        plot_concepts_crops(parts_craft, concept_ids=[5], figure=Figure())


def test_an_interrupted_first_report_leaves_no_folder(parts_craft, tmp_path, monkeypatch):
    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(report_module, "_page", interrupted)
    with pytest.raises(KeyboardInterrupt):
        write_report(parts_craft, tmp_path / "out", fidelity=False, n_map_images=0)
    assert os.listdir(tmp_path) == []


def test_a_sigint_during_the_renames_still_gives_a_matching_pair(parts_craft, tmp_path,
                                                                 monkeypatch):
    import signal

    from xcraft.plumbing import storage

    write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0, title="old")
    real_replace = os.replace

    def replace_with_sigint(src, dst):
        os.kill(os.getpid(), signal.SIGINT)  # held until both files are in place
        real_replace(src, dst)

    monkeypatch.setattr(storage.os, "replace", replace_with_sigint)
    with pytest.raises(KeyboardInterrupt):
        write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0, title="new")
    page = (tmp_path / "report.html").read_text()
    summary = json.loads((tmp_path / "summary.json").read_text())
    assert "<title>new</title>" in page and summary["created"]
    assert sorted(os.listdir(tmp_path)) == ["report.html", "summary.json"]


def test_a_folder_of_other_files_is_refused_before_any_work(parts_craft, tmp_path, monkeypatch):
    (tmp_path / "thesis.tex").write_text("mine")

    def no_work(*args, **kwargs):
        raise AssertionError("the report was computed before the folder was checked")

    monkeypatch.setattr(report_module, "_class_report", no_work)
    with pytest.raises(ValueError, match=r"which holds other files \(thesis.tex\)"):
        write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0)
    assert os.listdir(tmp_path) == ["thesis.tex"]


def test_extra_sections_join_the_page_and_the_summary(parts_craft, tmp_path):
    section = '<section id="afi"><h2>AfI: the occluder</h2></section>'
    summary = write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0,
                           extra_sections={"afi": (section, {"flip_rate": np.float64(1.0)})})
    assert section in (tmp_path / "report.html").read_text()
    assert summary["sections"] == {"afi": {"flip_rate": 1.0}}
    assert json.loads((tmp_path / "summary.json").read_text())["sections"]["afi"]["flip_rate"] == 1
    with pytest.raises(TypeError, match=r"`extra_sections\['afi'\]` must be a pair \(html, "
                                        r"summary\), got str\."):
        write_report(parts_craft, tmp_path, fidelity=False, n_map_images=0,
                     extra_sections={"afi": section})


# ------------------------------------------------------------------------- issue 18: layout

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Written into a copy of the page (the report itself has no script): once the images are laid
# out, every table, card and figure records its scrollWidth and clientWidth in the DOM, which
# --dump-dom prints. Scroll bars are not hidden: an overflow must not pass unseen.
_MEASURE_SCRIPT = """<script>
window.addEventListener('load', function () {
  var out = [];
  document.querySelectorAll('table, section, .figure, main').forEach(function (el) {
    out.push([el.tagName + '.' + el.className, el.scrollWidth, el.clientWidth]);
  });
  out.push(['document', document.documentElement.scrollWidth,
            document.documentElement.clientWidth]);
  var pre = document.createElement('pre'); pre.id = 'widths';
  pre.textContent = JSON.stringify(out); document.body.appendChild(pre);
});
</script>"""


@pytest.fixture(scope="module")
def written_ten_crops(parts_craft, tmp_path_factory):
    """The default 10 crops per strip: wider than the page in the 0.1 layout at any width."""
    out = tmp_path_factory.mktemp("report10")
    write_report({0: parts_craft}, out, fidelity=False, n_map_images=1, n_map_concepts=2)
    return out


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (apt-get install chromium)")
@pytest.mark.parametrize("window_width", [390, 768, 1024, 1400, 1920])
def test_nothing_scrolls_sideways_in_a_browser(written_ten_crops, tmp_path, window_width):
    # Before issue 18 the card scrolled: scrollWidth 1352 for clientWidth 1198 at 1400 and
    # 1920 px, and a figure 901 for 899 at 1024 px (its border outside max-width: 100%).
    out = written_ten_crops
    page = (out / "report.html").read_text(encoding="utf-8")
    probe = tmp_path / "probe.html"
    probe.write_text(page.replace("</body>", _MEASURE_SCRIPT + "</body>"), encoding="utf-8")
    dom = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--virtual-time-budget=5000",
         f"--window-size={window_width},1000", "--dump-dom", probe.as_uri()],
        capture_output=True, text=True, timeout=120, check=True, cwd=tmp_path).stdout
    match = re.search(r'<pre id="widths">(.*?)</pre>', dom, re.S)
    assert match, dom[-500:]
    widths = json.loads(html.unescape(match.group(1)))
    assert len(widths) > 5
    overflowing = [(name, scroll, client) for name, scroll, client in widths
                   if scroll > client + 1]
    assert overflowing == []


def test_concepts_table_fits_the_page_without_a_browser(written):
    out, _ = written
    page = (out / "report.html").read_text(encoding="utf-8")
    css = page[page.index("<style>"):page.index("</style>")]
    # The table takes the card's width and lays out its columns from fixed widths only ...
    assert re.search(r"table\.concepts \{[^}]*width: 100%;[^}]*table-layout: fixed", css)
    assert re.search(rf"main \{{[^}}]*max-width: {report_module.PAGE_WIDTH}px", css)
    # ... whose sum leaves room for the strips on the page (0.92 em table font, 10 px paddings).
    em = 16 * 0.92

    def px(width):
        return float(width[:-2]) * em if width.endswith("em") else float(width[:-2])

    fixed = [px(width) + 20 for _, width in report_module.CONCEPT_COLUMNS if width]
    assert sum(fixed) < 0.6 * report_module.PAGE_WIDTH
    # The strip column has no fixed width, and the strips shrink with it.
    assert report_module.CONCEPT_COLUMNS[-1][1] is None
    assert re.search(r"td\.strip img \{[^}]*max-width: 100%", css)
    assert "td.strip img { height:" not in css  # a fixed height would keep the full width
    # The long refinement text is a wrapping row of its own, not a nowrap column.
    assert '<tr class="refined">' in page and "refinement</th>" not in page
    # Narrower than the fixed columns (a phone, a tablet), each concept is a block of
    # labelled lines and the header row is hidden (the 390 and 768 px browser runs above).
    narrow = css[css.index(f"@media (max-width: {report_module.NARROW_WIDTH}px)"):]
    assert re.search(r"table\.concepts td \{ display: block", narrow.replace("tr, ", "")
                     .replace("tbody, ", "").replace("table.concepts, ", ""))
    assert "table.concepts tr.head { display: none; }" in narrow.replace(
        "table.concepts colgroup, ", "")
    assert 'data-label="importance"' in page and 'data-label="n crops"' in page
    assert '<tr class="head">' in page


# --------------------------------------------------------------- issue 18: what numbers mean


class _Cells(html.parser.HTMLParser):
    """Rows of the concepts table: label, importance text, bar width, n crops."""

    def __init__(self):
        super().__init__()
        self.rows, self._row, self._cell, self._in = [], None, None, False

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "table" and attrs.get("class") == "concepts":
            self._in = True
        elif self._in and tag == "tr" and attrs.get("class") != "refined":
            self._row = {"cells": [], "bar": None}
        elif self._row is not None and tag == "td":
            self._cell = ""
        elif self._row is not None and tag == "span" and attrs.get("class") == "bar":
            self._row["bar"] = float(re.search(r"width:([\d.]+)px", attrs["style"]).group(1))

    def handle_data(self, data):
        if self._cell is not None:
            self._cell += data

    def handle_endtag(self, tag):
        if tag == "td" and self._cell is not None:
            self._row["cells"].append(self._cell.strip())
            self._cell = None
        elif tag == "tr" and self._row is not None:
            if self._row["cells"]:
                self.rows.append(self._row)
            self._row = None
        elif tag == "table":
            self._in = False


def _concept_table(out):
    parser = _Cells()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    return {row["cells"][0].replace("↳", "").strip(): row for row in parser.rows}


def test_child_bars_split_their_parents_bar(written, parts_craft):
    out, _ = written
    rows = _concept_table(out)
    top = int(parts_craft.sensitivity.most_important_concepts[0])
    child = parts_craft.children_[top]
    parent = rows[f"C{top}"]
    assert parent["bar"] == pytest.approx(report_module.BAR_WIDTH, abs=0.1)  # the top root
    children = [rows[f"C{top}.{j}"] for j in range(len(child.importances_))]
    assert all(row["bar"] <= parent["bar"] for row in children)
    assert sum(row["bar"] for row in children) == pytest.approx(parent["bar"], abs=0.2)
    shares = child.importances_ / child.importances_.sum()
    for j, row in enumerate(children):
        assert row["bar"] == pytest.approx(parent["bar"] * shares[j], abs=0.1)
        assert f"{100 * shares[j]:.0f} % of C{top}" in row["cells"][1]


def test_page_says_what_each_number_is_relative_to(written, parts_craft):
    out, summary = written
    text = " ".join((out / "report.html").read_text(encoding="utf-8").split())
    assert "The root concepts are relative to each other" in text
    assert "relative to its siblings, not to the root concepts" in text
    assert "AUCs are in logit units" in text and "deletion AUC (logit)" in text
    top = int(parts_craft.sensitivity.most_important_concepts[0])
    child = parts_craft.children_[top]
    n_fitted = len(child.crops_u_)
    # The children's counts add up to the crops they were fitted on, and the page says so.
    (decomposed,) = [c for c in summary["classes"]["0"]["concepts"] if c["children"]]
    assert sum(c["n_crops"] for c in decomposed["children"]) == n_fitted
    assert (f"fitted on the {n_fitted} crops where C{top}'s coefficient is highest (of all "
            f"{len(parts_craft.crops_u_)} crops") in text
    assert f"add up to {n_fitted}, not to C{top}'s {decomposed['n_crops']}" in text


def test_a_strip_shows_only_crops_that_express_the_concept():
    from types import SimpleNamespace

    crops = np.arange(5)[:, None, None, None] * np.ones((5, 2, 2, 3))
    u = np.array([[0.0, 1.0], [2.0, 0.0], [0.0, 3.0], [1.0, 0.0], [0.0, 0.0]])
    craft = SimpleNamespace(crops_u_=u, factorization=SimpleNamespace(crops=crops))
    strip = report_module._strip_crops(SimpleNamespace(craft=craft, concept_id=0), 4)
    np.testing.assert_array_equal(strip[:, 0, 0, 0], [1, 3])  # not the 0-coefficient crops
    dead = SimpleNamespace(crops_u_=np.zeros((5, 2)), factorization=craft.factorization)
    assert report_module._strip_crops(SimpleNamespace(craft=dead, concept_id=1), 4) is None


# ------------------------------------------------------------------------ issue 18: figures


def test_concept_tree_labels_are_readable(parts_craft):
    figure = plot_concept_tree(ConceptTree(parts_craft), n_crops=3, figure=Figure())
    sizes = [text.get_fontsize() for text in figure.axes[0].texts]
    assert min(sizes) >= 10  # points; at the report's 96 dpi, >= 13 px
    # The labels fit left of the crops: the label column is as wide as the longest line.
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    renderer = FigureCanvasAgg(figure).get_renderer()
    first_crop = min(image.get_extent()[0] for image in figure.axes[0].images)
    crop_left = figure.axes[0].transData.transform((first_crop, 0))[0]
    for text in figure.axes[0].texts[:-1]:
        assert text.get_window_extent(renderer).x1 <= crop_left + 1


def _curves(orders):
    from xcraft.craft.fidelity import FidelityCurves

    fractions = np.linspace(0, 1, 4)
    curves = {name: np.linspace(3, 0, 4) for name in orders}  # identical curves
    return FidelityCurves(fractions, {"deletion": curves, "insertion": curves},
                          {"deletion": dict.fromkeys(orders, 1.5),
                           "insertion": dict.fromkeys(orders, 1.5)}, {}, orders)


def test_agreeing_orders_stay_visible_and_are_named():
    from xcraft.viz.plots import plot_fidelity_curves

    orders = {"sobol": np.array([2, 0, 1]), "tcav": np.array([0, 1, 2]),
              "occlusion": np.array([2, 0, 1])}
    figure = plot_fidelity_curves(_curves(orders), axes=Figure().subplots(1, 2))
    for ax in figure.axes:
        styles = [(line.get_linestyle(), line.get_marker(), line.get_markersize())
                  for line in ax.get_lines()]
        assert len(set(styles)) == len(styles) == 3  # a curve over another leaves it visible
        labels = [text.get_text() for text in ax.get_legend().get_texts()]
        assert labels[2] == "occlusion (AUC 1.5), same order as sobol"
        assert "same order" not in labels[1]
        assert ax.get_ylabel() == "class logit (mean over images)"
    assert report_module._same_orders_note({"occlusion": "sobol"}).startswith(
        "Orders agree (occlusion and sobol)")


@pytest.mark.parametrize("scale", ["shared", "each"])
def test_attribution_maps_scale(parts_craft, scale):
    images = parts_craft.images_[:2]
    maps = np.ones((2, 2, *images.shape[1:3]))
    maps[:, 1] *= 0.01  # a weak concept
    maps[1, 0, 0, 0] = 5.0
    figure = report_module._attribution_plot(images, maps, [0, 1], parts_craft, None,
                                             "gradcam", scale)
    (ax,) = figure.axes
    heats = [image for image in ax.images if image.get_alpha() is not None]  # the overlays
    assert len(heats) == 4
    ranges = {image.get_clim() for image in heats}
    if scale == "shared":
        assert ranges == {(0.0, 5.0)}  # one colour range: the weak concept looks weak
    else:
        assert ranges == {(0.0, 1.0), (0.0, 0.01), (0.0, 5.0)}
    texts = " ".join(text.get_text() for text in ax.texts)
    assert ("one colour scale for all maps, 0 to 5" if scale == "shared"
            else "each map scaled to its own maximum") in texts
    assert min(text.get_fontsize() for text in ax.texts) >= 10


def test_map_scale_is_said_on_the_page_and_checked(parts_craft, tmp_path):
    with pytest.raises(ValueError, match="`map_scale` must be one of 'shared', 'each', got "
                                         "'max'."):
        write_report(parts_craft, tmp_path / "bad", map_scale="max")
    summary = write_report(parts_craft, tmp_path, fidelity=False, n_map_images=1,
                           n_map_concepts=1, map_scale="each")
    assert summary["classes"]["0"]["attribution_maps"]["scale"] == "each"
    if ATTRIBUTION_AVAILABLE:
        assert "Each map is scaled to its own maximum" in (tmp_path / "report.html").read_text()


# ----------------------------------------------------------------------- issue 18: progress


def test_progress_is_called_for_every_step(parts_craft, tmp_path):
    messages = []
    write_report({0: parts_craft}, tmp_path, class_names=["object"], n_map_images=1,
                 n_map_concepts=1, n_random=1, fidelity_orders=(), progress=messages.append)
    assert [m.split(" (")[0] for m in messages] == [
        "object: crop strips and importances", "object: fidelity", "object: attribution maps",
        "object: concept tree", "writing report.html and summary.json"]
    assert [m[-5:] for m in messages[:4]] == ["[1/4]", "[2/4]", "[3/4]", "[4/4]"]
    with pytest.raises(TypeError, match="`progress` must be callable or None, got str."):
        write_report(parts_craft, tmp_path, progress="yes")


def test_the_cli_passes_its_progress_and_bars_only_on_a_terminal(monkeypatch):
    from types import SimpleNamespace

    from xcraft import cli

    seen = {}
    monkeypatch.setattr(report_module, "write_report", lambda *a, **kw: seen.update(kw))
    args = SimpleNamespace(out="out", fidelity=True, seed=0, overwrite=False, quiet=False)
    messages = []
    progress = messages.append  # one bound method, compared by identity below
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: False, raising=False)
    cli._write({}, args, progress, class_names=None, display=None, settings={}, title="t")
    assert seen["progress"] is progress and seen["verbose"] is False  # plain lines
    monkeypatch.setattr(cli.sys.stderr, "isatty", lambda: True, raising=False)
    cli._write({}, args, progress, class_names=None, display=None, settings={}, title="t")
    assert seen["verbose"] is True  # bars on a terminal
