import numpy as np
import pytest

from tests import _synthetic
from xcraft.craft.estimator import CraftTf
from xcraft.craft.recursion import ConceptTree, refinement_metrics, select_strong_crops
from xcraft.plumbing.split import split_model

PART_GROUPS = {"red": slice(0, 4), "green": slice(4, 8)}  # channels of the "parts" layer


@pytest.fixture(scope="module")
def parts_data():
    images, boxes = _synthetic.make_motif_images(48, motifs=("red", "green"), seed=1)
    return images, boxes, _synthetic.make_parts_model()


@pytest.fixture(scope="module")
def parent(parts_data):
    images, _, model = parts_data
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                               patch_size=12, random_state=0, verbose=False)
    craft.fit(images, class_id=0)
    craft.estimate_importance(nb_design=16)
    return craft


def _object_concept(craft):
    return int(np.argmax(craft.concept_bank_w_[:, : _synthetic.N_PER_GROUP].sum(axis=1)))


@pytest.fixture(scope="module")
def child(parent):
    return parent.decompose(_object_concept(parent), "parts", number_of_concepts=2, percentile=70,
                            nb_design=16)


def _overlap(boxes, name, crop_boxes):
    motif = boxes[name][crop_boxes[:, 0]]
    y, x, s = crop_boxes[:, 1], crop_boxes[:, 2], crop_boxes[:, 3]
    dy = np.minimum(y + s, motif[:, 0] + motif[:, 2]) - np.maximum(y, motif[:, 0])
    dx = np.minimum(x + s, motif[:, 1] + motif[:, 3]) - np.maximum(x, motif[:, 1])
    return np.clip(dy, 0, None) * np.clip(dx, 0, None)


def test_deep_layer_merges_the_parts(parent):
    # One deep concept holds both parts: that is what makes the decomposition necessary.
    assert parent.importances[_object_concept(parent)] > 0.9


def test_decomposition_separates_the_parts(parts_data, parent, child):
    _, boxes, _ = parts_data
    crop_boxes = parent.crop_boxes[child.parent_crop_indices_]
    red, green = _overlap(boxes, "red", crop_boxes), _overlap(boxes, "green", crop_boxes)
    w = child.concept_bank_w
    red_sub = int(np.argmax(w[:, PART_GROUPS["red"]].sum(1) - w[:, PART_GROUPS["green"]].sum(1)))
    green_sub = 1 - red_sub
    only_red, only_green = (red > 16) & (green == 0), (green > 16) & (red == 0)
    assert only_red.sum() >= 10 and only_green.sum() >= 10
    u = child.crops_u
    assert np.mean(u[only_red, red_sub] > u[only_red, green_sub]) > 0.9
    assert np.mean(u[only_green, green_sub] > u[only_green, red_sub]) > 0.9


def test_refinement_is_measured(child):
    metrics = child.refinement_
    assert metrics["coherence_gain"] > 0.1  # sub-concepts' crops are more alike than the parent's
    assert 0.0 <= metrics["relative_reconstruction_error"] < 0.3
    assert child.importances.shape == (2,) and child.importances.sum() > 0.5


def test_parent_tracks_child_and_tree_paths(parent, child):
    object_concept = _object_concept(parent)
    assert parent.children_[object_concept] is child
    tree = ConceptTree(parent)
    paths = [node.path for node in tree]
    assert f"C{object_concept} → C{object_concept}.0" in paths
    assert len(paths) == 4 and tree.depth == 1
    node = tree.node(f"C{object_concept} -> C{object_concept}.1")
    assert node.craft is child and node.importance == pytest.approx(child.importances[1])
    assert node.top_crops(3).shape == (3, 32, 32, 3)
    as_dict = tree.to_dict()
    top = as_dict["concepts"][0]
    assert top["concept_id"] == object_concept and len(top["children"]) == 2
    assert top["refinement"]["coherence_gain"] == child.refinement_["coherence_gain"]


def test_depth_two_tree(parts_data, child):
    grandchild = child.decompose(0, _synthetic.EARLY_LAYER, number_of_concepts=2, percentile=50,
                                 estimate_importance=False)
    tree = ConceptTree(child)
    assert grandchild.concept_bank_w.shape == (2, 3)  # pixels: RGB channels
    assert any(node.depth == 1 for node in tree)


def test_percentile_selection():
    u = np.column_stack([np.arange(100.0), np.zeros(100)])
    selected = select_strong_crops(u, 0, percentile=90)
    np.testing.assert_array_equal(selected, np.arange(99, 89, -1))
    assert len(select_strong_crops(u, 1, percentile=90)) == 0  # never-active concept: nothing


def test_refinement_metrics_against_direct_formulas(rng):
    a = rng.uniform(size=(6, 4))
    u = rng.uniform(size=(6, 2))
    w = rng.uniform(size=(2, 4))
    metrics = refinement_metrics(a, u, w, n_top=3)
    unit = a / np.linalg.norm(a, axis=1, keepdims=True)
    sims = unit @ unit.T
    np.testing.assert_allclose(metrics["parent_coherence"], sims[~np.eye(6, dtype=bool)].mean())
    top = np.argsort(-u[:, 1])[:3]
    sub = sims[np.ix_(top, top)]
    np.testing.assert_allclose(metrics["child_coherence"][1], sub[~np.eye(3, dtype=bool)].mean())
    np.testing.assert_allclose(metrics["relative_reconstruction_error"],
                               np.linalg.norm(a - u @ w) / np.linalg.norm(a))


def test_later_layer_is_refused(parts_data):
    images, _, model = parts_data
    craft = CraftTf.from_model(model, "parts", number_of_concepts=2, patch_size=12,
                               random_state=0, verbose=False)
    craft.fit(images[:8])
    with pytest.raises(ValueError, match=r"`layer` must come before the parent's split layer "
                       r"'parts', got 'features'\."):
        craft.decompose(0, "features")


def test_decompose_needs_the_model_when_built_from_g_and_h(parts_data):
    images, _, model = parts_data
    g, h = split_model(model, _synthetic.FEATURE_LAYER)
    craft = CraftTf(g, h, number_of_concepts=2, patch_size=12, random_state=0, verbose=False)
    craft.fit(images[:16])
    with pytest.raises(ValueError, match=r"`decompose` needs the full model .* Pass `model=`"):
        craft.decompose(0, "parts")
    child = craft.decompose(0, "parts", model=model, number_of_concepts=2, percentile=50,
                            estimate_importance=False)
    explicit = craft.decompose(0, split=split_model(model, "parts"), number_of_concepts=2,
                               percentile=50, estimate_importance=False)
    np.testing.assert_array_equal(child.concept_bank_w, explicit.concept_bank_w)  # deterministic


def test_bad_concept_id(parent):
    with pytest.raises(ValueError, match=r"`concept_id` must be in \[0, 1\], got 5\."):
        parent.decompose(5, "parts")


def test_subconcept_maps_locate_their_part(parts_data, parent, child):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    images, boxes, _ = parts_data
    object_concept = _object_concept(parent)
    tree = ConceptTree(parent)
    parent_maps, child_maps = tree.attribution_maps(images[:6], f"C{object_concept}")
    assert parent_maps.shape == (6, 32, 32) and child_maps.shape == (6, 2, 32, 32)
    w = child.concept_bank_w
    red_sub = int(np.argmax(w[:, PART_GROUPS["red"]].sum(1) - w[:, PART_GROUPS["green"]].sum(1)))
    def share_in_red_box(maps):
        shares = []
        for i in range(6):
            y, x, h, wd = boxes["red"][i]
            region = np.zeros((32, 32), bool)
            region[y : y + h, x : x + wd] = True
            shares.append(maps[i][region].sum() / max(maps[i].sum(), 1e-12))
        return np.mean(shares)

    red_share = share_in_red_box(child_maps[:, red_sub])
    # The box is 6.25 % of the image; the sub-concepts also carry the gray background channels,
    # so their maps are spread, but the red one concentrates on the red part, the green one not.
    assert red_share > 2 * 0.0625
    assert red_share > 2 * share_in_red_box(child_maps[:, 1 - red_sub])
    figure = tree.plot_attribution_maps(images[0], f"C{object_concept}")
    assert figure.axes
    plt.close(figure)
    with pytest.raises(ValueError, match=r"`path` must name a decomposed concept"):
        tree.attribution_maps(images[:1], f"C{1 - object_concept}")


def test_crop_counts_do_not_depend_on_the_scale_of_the_concepts(rng):
    # NMF leaves each concept's scale free: (s U_i)(W_i / s) is the same factorisation. The
    # concept a crop is counted for must not change with s (a raw argmax of U did).
    from types import SimpleNamespace

    u, w = rng.uniform(size=(200, 3)), rng.uniform(size=(3, 5))
    scale = np.array([1.0, 10.0, 0.1])

    def counts(u, w):
        craft = SimpleNamespace(crops_u_=u, concept_bank_w_=w, importances_=None, class_id_=0,
                                children_={})
        return {node["concept_id"]: node["n_crops"] for node in
                ConceptTree(craft).to_dict()["concepts"]}

    assert counts(u, w) == counts(u * scale, w / scale[:, None])
    assert sum(counts(u, w).values()) == len(u)
    # Planted: crop 0 is mostly concept 2 in activation terms, with the smallest raw coefficient.
    u_planted = np.array([[0.3, 0.2, 0.1]])
    w_planted = np.diag([1.0, 1.0, 10.0])
    assert counts(u_planted, w_planted) == {0: 0, 1: 0, 2: 1}
