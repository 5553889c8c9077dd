"""The many-class site: class cards, concept-bank similarity and the index page."""

import base64
import copy
import html
import html.parser
import io
import json
import os
import re
import shutil
import subprocess
import time

import numpy as np
import pytest
from PIL import Image

from xcraft.craft.estimator import CraftTf
from xcraft.datasets import DEMO_LAYER, load_demo_data, load_demo_model
from xcraft.viz import site as site_module
from xcraft.viz.report import write_report
from xcraft.viz.site import (
    class_card,
    concept_bank_similarity,
    shared_concepts,
    write_class_card,
    write_site,
)

CLASSES = (0, 1, 2, 7)
NO_REPORT = 2  # has a card, no report.html (its report still being written, say)
UNREADABLE = 5  # its card.json is truncated
NEVER_STARTED = 8  # in the run's class list, no folder at all
TRICKY_NAME = 'Sneaker <b>&"quoted"</b>'
PATCH_SIZE = 14


@pytest.fixture(scope="module")
def demo():
    images, labels, names = load_demo_data()
    names = list(names)
    names[7] = TRICKY_NAME
    return images, labels, names, load_demo_model()


@pytest.fixture(scope="module")
def crafts(demo):
    images, labels, _, model = demo
    fitted = {}
    for class_id in CLASSES:
        craft = CraftTf.from_model(model, DEMO_LAYER, number_of_concepts=4,
                                   patch_size=PATCH_SIZE, patches_per_image=4, random_state=0,
                                   verbose=False)
        craft.fit(images[labels == class_id][:24], class_id=class_id)
        craft.estimate_importance(nb_design=8)
        fitted[class_id] = craft
    return fitted


@pytest.fixture(scope="module")
def out(crafts, demo, tmp_path_factory):
    """The runner's layout: reports and cards of the finished classes, plus broken ones."""
    names = demo[2]
    root = tmp_path_factory.mktemp("run")
    (root / "run.json").write_text(json.dumps({"classes": list(range(10))}), encoding="utf-8")
    for class_id, craft in crafts.items():
        class_dir = root / "classes" / f"class_{class_id}"
        if class_id != NO_REPORT:
            # The report first: write_report refuses a folder that already holds other files.
            write_report({class_id: craft}, class_dir, class_names=names, fidelity=False,
                         n_crops=4, n_map_images=0, n_map_concepts=0)
        write_class_card(craft, class_dir, class_name=names[class_id])
    broken = root / "classes" / f"class_{UNREADABLE}"
    broken.mkdir()
    (broken / "card.json").write_text('{"format_version": 1, "class_id": 5, "conc',
                                      encoding="utf-8")
    # A worker's temporary folder: not a class.
    (root / "classes" / ".class_9.tmp-123-abcd").mkdir()
    site = write_site(root, class_ids=[*CLASSES, UNREADABLE, NEVER_STARTED], title="Demo <site>")
    return root, site


class _Page(html.parser.HTMLParser):
    """Every link and id of a page, its scripts, inputs and the cards' attributes."""

    def __init__(self):
        super().__init__()
        self.links, self.ids, self.scripts, self.inputs, self.cards = [], set(), [], [], {}
        self.concepts, self.headings, self._heading = [], {}, None
        self._card, self._depth, self._card_depth = None, 0, None  # the card being read

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        if tag == "div":
            self._depth += 1
        self.links.extend(attrs[key] for key in ("href", "src") if key in attrs)
        if "id" in attrs:
            self.ids.add(attrs["id"])
        if tag == "script":
            self.scripts.append(attrs)
        if tag == "input":
            self.inputs.append(attrs)
        if attrs.get("class") == "card":
            self._card, self._card_depth = int(attrs["id"].removeprefix("class-")), self._depth
            self.cards[self._card] = attrs
        if attrs.get("class") == "concept":
            self.concepts.append((self._card, attrs))
        if tag == "h2" and self._card is not None:
            self._heading = self._card
            self.headings[self._card] = {"text": "", "links": []}
        if tag == "a" and self._heading is not None:
            self.headings[self._heading]["links"].append(attrs["href"])

    def handle_endtag(self, tag):
        if tag == "h2":
            self._heading = None
        if tag == "div":
            if self._depth == self._card_depth:
                self._card = self._card_depth = None
            self._depth -= 1

    def handle_data(self, data):
        if self._heading is not None:
            self.headings[self._heading]["text"] += data


def _parse(path):
    page = _Page()
    page.feed(path.read_text(encoding="utf-8"))
    page.close()
    return page


def _pages(root):
    return [root / "index.html", *sorted(root.glob("classes/class_*/report.html"))]


def test_every_link_resolves_and_no_page_reaches_outside(out):
    root, _ = out
    pages = _pages(root)
    assert len(pages) == 1 + len(CLASSES) - 1  # the index and three reports
    parsed = {path: _parse(path) for path in pages}
    checked = 0
    for path, page in parsed.items():
        text = path.read_text(encoding="utf-8")
        assert not re.search(r"https?://", text, re.IGNORECASE), path
        for link in page.links:
            checked += 1
            if link.startswith("data:"):
                assert link.startswith("data:image/png;base64,")
                continue
            target, _, fragment = link.partition("#")
            assert not target.startswith(("/", "//")) and ":" not in target, link
            if not target:  # an in-page anchor
                assert fragment in page.ids, (path, link)
                continue
            resolved = (path.parent / target).resolve()
            assert resolved.is_file(), (path, link)
            assert root.resolve() in resolved.parents  # within the site folder
            if fragment:
                assert fragment in parsed[resolved].ids, (path, link)
    assert checked > 40


def test_index_has_a_search_box_and_an_inline_filter(out):
    root, _ = out
    page = _parse(root / "index.html")
    assert [i.get("id") for i in page.inputs] == ["search"]
    assert page.scripts == [{}]  # one script, inline (no src)
    text = (root / "index.html").read_text(encoding="utf-8")
    script = text[text.index("<script>"):text.index("</script>")]
    assert "getElementById('search')" in script and "data-search" in script
    # Every shown class can be found by its id and by its lower-case name.
    assert sorted(page.cards) == [0, 1, 2, 7]
    assert page.cards[1]["data-search"] == "1 trouser"
    assert page.cards[7]["data-search"] == f"7 {TRICKY_NAME.lower()}"


def test_shown_importances_are_the_estimators(out, crafts):
    root, site = out
    page = _parse(root / "index.html")
    text = (root / "index.html").read_text(encoding="utf-8")
    for class_id, craft in crafts.items():
        order = np.argsort(-craft.importances_, kind="stable")[:3]
        shown = [attrs for card, attrs in page.concepts if card == class_id]
        assert [int(a["data-concept"]) for a in shown] == order.tolist()
        np.testing.assert_allclose([float(a["data-importance"]) for a in shown],
                                   craft.importances_[order], rtol=1e-6)
        for concept_id in order:
            assert f"C{concept_id} <b>{craft.importances_[concept_id]:.3g}</b>" in text
        card = json.loads((root / "classes" / f"class_{class_id}" / "card.json").read_text())
        np.testing.assert_allclose(card["importances"], craft.importances_, rtol=1e-6)
        assert site["classes"][str(class_id)]["status"] == "ok"


def test_card_needs_no_model_and_holds_the_strongest_crops(crafts):
    craft = copy.copy(crafts[1])
    craft.input_to_latent_model = craft.latent_to_logit_model = None  # a card needs no model
    card = class_card(craft, n_concepts=2, n_thumbnails=3)
    assert json.loads(json.dumps(card, allow_nan=False)) == card
    assert card["class_id"] == 1 and card["class_name"] == "class 1"
    assert card["n_images"] == 24 and card["n_crops"] == 24 * 4 and card["n_concepts"] == 4
    top = int(np.argmax(craft.importances_))
    first = card["concepts"][0]
    assert first["concept_id"] == top and first["rank"] == 0
    positive = craft.importances_[craft.importances_ > 0].sum()
    # The card divides in float64; the estimator holds float32 importances.
    assert first["share"] == pytest.approx(craft.importances_[top] / positive, rel=1e-6)
    prefix = "data:image/png;base64,"
    assert first["thumbnails"].startswith(prefix)
    strip = Image.open(io.BytesIO(base64.b64decode(first["thumbnails"][len(prefix):])))
    # Three 14 px crops enlarged twice (the largest integer factor within 40 px), 1 px gaps.
    side = (site_module.THUMBNAIL_SIZE // PATCH_SIZE) * PATCH_SIZE
    assert strip.size == (3 * side + 2, side)
    # Its first tile is the crop where the concept is strongest, cut from the fitted image.
    best = int(np.argmax(craft.crops_u_[:, top]))
    image, y, x, size = craft.crop_boxes_[best]
    crop = craft.images_[image, y:y + size, x:x + size, 0]
    tile = np.asarray(strip.convert("L"))[:side:2, :side:2] / 255.0  # undo the 2x nearest
    np.testing.assert_allclose(tile, crop, atol=0.5 / 255 + 1e-6)  # images in [0, 1]: as is


def test_card_refuses_an_estimator_without_importances(crafts):
    craft = copy.copy(crafts[0])
    craft.importances_ = None
    with pytest.raises(ValueError, match=r"Call `craft.estimate_importance\(\)` first\."):
        class_card(craft)
    with pytest.raises(ValueError, match="must be a fitted CraftTf"):
        class_card(CraftTf(None, None))
    with pytest.raises(TypeError, match="`n_concepts` must be an int, got float 2.0."):
        class_card(crafts[0], n_concepts=2.0)


def test_card_files_sit_together_in_the_class_folder(out):
    root, _ = out
    folder = root / "classes" / "class_0"
    card = json.loads((folder / "card.json").read_text())
    strips = {c["thumbnails"] for c in card["concepts"]}
    assert strips == {f"card_concept_{c['concept_id']}.png" for c in card["concepts"]}
    assert strips <= set(os.listdir(folder))
    assert {"report.html", "summary.json", "concept_bank.npz"} <= set(os.listdir(folder))
    assert not [name for name in os.listdir(folder.parent) if name.startswith(".class_0")]


def test_a_new_card_replaces_the_old_ones_strips(crafts, tmp_path):
    folder = tmp_path / "class_7"
    write_class_card(crafts[7], folder, n_concepts=3)
    (folder / "notes.txt").write_text("the user's", encoding="utf-8")
    card = write_class_card(crafts[7], folder, n_concepts=1)
    top = card["concepts"][0]["concept_id"]
    assert sorted(os.listdir(folder)) == sorted(
        ["card.json", "concept_bank.npz", f"card_concept_{top}.png", "notes.txt"])
    with np.load(folder / "concept_bank.npz") as data:
        np.testing.assert_array_equal(data["concept_bank_w"], crafts[7].concept_bank_w_)
        assert int(data["class_id"]) == 7


def test_similarity_matrix_is_symmetric_with_ones_on_the_diagonal(out, crafts):
    root, site = out
    with np.load(root / "similarity.npz") as data:
        similarity, class_ids = data["similarity"], data["class_ids"]
    assert class_ids.tolist() == list(CLASSES) == site["similarity"]["class_ids"]
    np.testing.assert_array_equal(similarity, similarity.T)
    np.testing.assert_array_equal(np.diag(similarity), 1.0)
    off = similarity[~np.eye(len(CLASSES), dtype=bool)]
    assert np.all((off >= 0) & (off < 1))  # non-negative banks, different classes
    expected = concept_bank_similarity([crafts[k].concept_bank_w_ for k in CLASSES],
                                       [crafts[k].importances_ for k in CLASSES])
    np.testing.assert_allclose(similarity, expected, rtol=1e-6)
    # The listed neighbours are the matrix's best, in order.
    row = similarity[0].copy()
    row[0] = -1
    listed = [entry["class_id"] for entry in site["classes"]["0"]["similar"]]
    assert listed == [CLASSES[i] for i in np.argsort(-row)[:3]]
    assert "files" in site and site["files"]["similarity"] == "similarity.npz"
    assert json.loads((root / "site.json").read_text()) == site


def _brute_force_similarity(banks, importances):
    n = len(banks)
    directed = np.zeros((n, n))
    for a in range(n):
        weights = np.maximum(importances[a], 0) / np.maximum(importances[a], 0).sum()
        unit_a = banks[a] / np.linalg.norm(banks[a], axis=1, keepdims=True)
        for b in range(n):
            unit_b = banks[b] / np.linalg.norm(banks[b], axis=1, keepdims=True)
            directed[a, b] = weights @ (unit_a @ unit_b.T).max(axis=1)
    return (directed + directed.T) / 2


@pytest.mark.parametrize("block_bytes", [1, 2**30])  # one class per block, or all at once
def test_similarity_matches_its_definition_for_banks_of_several_ranks(rng, block_bytes):
    banks = [rng.uniform(size=(r, 12)) - 0.3 for r in (3, 5, 4, 1, 5)]  # signed: semi-NMF
    importances = [rng.uniform(size=len(bank)) for bank in banks]
    similarity = concept_bank_similarity(banks, importances, block_bytes=block_bytes)
    np.testing.assert_allclose(similarity, _brute_force_similarity(banks, importances),
                               atol=1e-6)
    uniform = concept_bank_similarity(banks, None, weighting="uniform")
    ones = [np.ones(len(bank)) for bank in banks]
    np.testing.assert_allclose(uniform, _brute_force_similarity(banks, ones), atol=1e-6)


def test_similarity_refuses_banks_of_different_layers(rng):
    with pytest.raises(ValueError, match=r"must share one number of channels .* got \[4, 6\]"):
        concept_bank_similarity([rng.uniform(size=(2, 4)), rng.uniform(size=(2, 6))])
    with pytest.raises(ValueError, match="`weighting` must be one of 'importance', 'uniform'"):
        concept_bank_similarity([rng.uniform(size=(2, 4))], weighting="max")


def _fake_class(root, class_id, bank, importances, name, png=None):
    """A card and bank as write_class_card leaves them, without fitting anything."""
    folder = root / "classes" / f"class_{class_id}"
    folder.mkdir(parents=True)
    order = np.argsort(-importances, kind="stable")[:3]
    card = {"format_version": 1, "class_id": class_id, "class_name": name, "n_images": 10,
            "n_concepts": len(bank), "concepts": [
                {"concept_id": int(i), "rank": rank, "importance": float(importances[i]),
                 "share": float(importances[i] / importances.sum()),
                 "thumbnails": None if png is None else f"card_concept_{i}.png"}
                for rank, i in enumerate(order)]}
    (folder / "card.json").write_text(json.dumps(card), encoding="utf-8")
    np.savez(folder / "concept_bank.npz", concept_bank_w=bank, importances=importances)
    for i in order if png is not None else ():
        (folder / f"card_concept_{i}.png").write_bytes(png)


def test_planted_classes_rank_each_other_first(tmp_path, rng):
    bank = np.zeros((4, 16))
    bank[:, :8] = rng.uniform(size=(4, 8))
    orthogonal = np.zeros((3, 16))
    orthogonal[:, 8:] = rng.uniform(size=(3, 8))  # other channels: cosine 0 with every concept
    other = rng.uniform(size=(5, 16))
    _fake_class(tmp_path, 0, bank, rng.uniform(0.1, 1, size=4), "twin a")
    _fake_class(tmp_path, 1, bank[[2, 0, 3, 1]], rng.uniform(0.1, 1, size=4), "twin b")
    _fake_class(tmp_path, 2, orthogonal, rng.uniform(0.1, 1, size=3), "orthogonal")
    _fake_class(tmp_path, 3, other, rng.uniform(0.1, 1, size=5), "mixed")
    site = write_site(tmp_path, top_similar=3)
    first = {k: site["classes"][str(k)]["similar"][0] for k in range(4)}
    assert first[0]["class_id"] == 1 and first[1]["class_id"] == 0
    assert first[0]["similarity"] == pytest.approx(1.0, abs=1e-6)
    # The twins share every concept, each with its permuted copy (cosine 1).
    pairs = {(i, j) for i, j, _ in first[0]["shared"]}
    assert pairs <= {(0, 1), (1, 3), (2, 0), (3, 2)} and len(pairs) == 3
    with np.load(tmp_path / "similarity.npz") as data:
        similarity = data["similarity"]
    np.testing.assert_allclose(similarity[2, :2], 0.0, atol=1e-6)
    assert 0.2 < similarity[2, 3] < 1.0  # "mixed" has weight on the orthogonal channels
    assert shared_concepts(bank, orthogonal) == []  # cosine 0: nothing in common
    assert site["classes"]["2"]["similar"][-1]["shared"] == []


def test_missing_and_unreadable_classes_are_listed(out):
    root, site = out
    assert site["missing"] == [UNREADABLE, NEVER_STARTED]
    assert site["classes"][str(NEVER_STARTED)]["status"] == "missing"
    assert site["classes"][str(UNREADABLE)]["status"] == "unreadable"
    assert "not valid JSON" in site["classes"][str(UNREADABLE)]["reason"]
    page = _parse(root / "index.html")
    assert "missing" in page.ids
    text = (root / "index.html").read_text(encoding="utf-8")
    missing = text[text.index('<h2 id="missing">'):]
    assert "Missing classes (2)" in missing
    assert all(f"#{k}:" in missing for k in (UNREADABLE, NEVER_STARTED))
    # The class with a card but no report is shown, its name without a link.
    assert page.headings[NO_REPORT]["links"] == []
    assert page.headings[1]["links"] == ["classes/class_1/report.html"]
    assert site["classes"][str(NO_REPORT)]["report"] is None


def test_names_are_escaped(out):
    root, _ = out
    text = (root / "index.html").read_text(encoding="utf-8")
    assert TRICKY_NAME not in text and "<b>&" not in text
    assert html.escape(TRICKY_NAME) in text
    assert "<title>Demo &lt;site&gt;</title>" in text
    page = _parse(root / "index.html")
    assert page.headings[7]["text"].startswith(TRICKY_NAME)  # the reader sees the name as is


def test_heatmap_is_drawn_for_a_few_classes(out):
    root, _ = out
    text = (root / "index.html").read_text(encoding="utf-8")
    match = re.search(r'alt="class similarity heatmap" src="data:image/png;base64,([^"]+)"',
                      text)
    assert match
    heatmap = Image.open(io.BytesIO(base64.b64decode(match.group(1))))
    assert min(heatmap.size) > 200


def test_index_of_a_thousand_classes_grows_linearly(tmp_path, rng):
    # A real 40 px strip as the thumbnail files, so the page holds what a real run's would.
    strip = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, size=(40, 163, 3), dtype=np.uint8)).save(strip, "PNG")
    n_classes = 1000
    for class_id in range(n_classes):
        _fake_class(tmp_path, class_id, rng.uniform(size=(20, 64)).astype(np.float32),
                    rng.uniform(size=20), f"class name number {class_id}", strip.getvalue())
    start = time.perf_counter()
    site = write_site(tmp_path, top_similar=5)
    elapsed = time.perf_counter() - start
    size = os.path.getsize(tmp_path / "index.html")
    # Budget 4 kB per class: its header, 3 concept rows (~300 B) and 5 similar classes with
    # 3 shared pairs each (~350 B) weigh about 2.5 kB. Listing every pair of classes, even at
    # 20 bytes a pair, would be 20 MB; inlining the strips, 3 x 20 kB per class, 60 MB.
    assert size < 4000 * n_classes, size
    page = _parse(tmp_path / "index.html")
    assert len(page.cards) == n_classes
    assert sum(link.endswith(".png") for link in page.links) == 3 * n_classes
    assert "class similarity heatmap" not in (tmp_path / "index.html").read_text()
    assert all(len(entry["similar"]) == 5 for entry in site["classes"].values())
    assert elapsed < 20, elapsed  # seconds, on 2 shared cores; a few in practice


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")

# Appended to a copy of the index: types into the search box once the page has loaded and
# records which cards stay visible.
_TYPE_SCRIPT = """<script>
window.addEventListener('load', function () {
  var box = document.getElementById('search');
  box.value = 'TROUSER'; box.dispatchEvent(new Event('input'));
  var shown = [];
  document.querySelectorAll('.card').forEach(function (card) {
    if (card.offsetParent !== null) { shown.push(card.id); }
  });
  var pre = document.createElement('pre'); pre.id = 'shown-cards';
  pre.textContent = JSON.stringify([shown, document.getElementById('shown').textContent]);
  document.body.appendChild(pre);
});
</script>"""


@pytest.mark.skipif(CHROMIUM is None, reason="needs a headless Chromium (apt-get install chromium)")
def test_search_filters_the_cards_in_a_browser(out):
    root, _ = out
    page = (root / "index.html").read_text(encoding="utf-8")
    probe = root / "probe.html"  # beside the index, so its relative links still resolve
    probe.write_text(page.replace("</body>", _TYPE_SCRIPT + "</body>"), encoding="utf-8")
    try:
        dom = subprocess.run(
            [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
             "--virtual-time-budget=5000", "--dump-dom", probe.as_uri()],
            capture_output=True, text=True, timeout=120, check=True, cwd=root).stdout
    finally:
        probe.unlink()
    match = re.search(r'<pre id="shown-cards">(.*?)</pre>', dom, re.S)
    assert match, dom[-500:]
    shown, count = json.loads(html.unescape(match.group(1)))
    assert shown == ["class-1"] and count == "1"
