import base64
import html.parser
import importlib.util
import io
import json
import os

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
                    nb_design=8)
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
