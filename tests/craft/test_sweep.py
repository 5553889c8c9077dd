"""The layer x rank sweep: its figures on planted and embedded models, and its rule."""

import numpy as np
import pytest

from tests import _synthetic
from xcraft.craft.sweep import SWEEP_FIELDS, _matched_cosine, _recommend, sweep


@pytest.fixture(scope="module")
def planted():
    images, _ = _synthetic.make_motif_images(n_images=40, size=32, seed=0)
    model = _synthetic.make_motif_model()
    result = sweep(model, ["conv", _synthetic.FEATURE_LAYER], images, 0, ranks=(1, 3, 6),
                   n_seeds=2, patch_size=16, random_state=0)
    return result


def test_every_candidate_is_measured(planted):
    rows = planted["rows"]
    assert [(r["layer"], r["rank"]) for r in rows] == [
        (layer, rank) for layer in ("conv", _synthetic.FEATURE_LAYER) for rank in (1, 3, 6)]
    for row in rows:
        assert set(row) == set(SWEEP_FIELDS)
        assert 0 <= row["relative_error"] <= 1 and 0 <= row["top1_agreement"] <= 1
        assert -1 - 1e-6 <= row["stability"] <= 1 + 1e-6


def test_the_planted_rank_reconstructs_and_keeps_every_decision(planted):
    # The motif model's features are three channel groups (red, blue, gray), each a fixed
    # pattern: three concepts rebuild the layer, one cannot.
    at = {(r["layer"], r["rank"]): r for r in planted["rows"]}
    three, one = at[(_synthetic.FEATURE_LAYER, 3)], at[(_synthetic.FEATURE_LAYER, 1)]
    assert three["relative_error"] < 1e-3 < one["relative_error"]
    assert three["top1_agreement"] == 1.0 and three["logit_r2"] > 0.9
    assert three["stability"] > 0.99
    assert planted["monotone"][_synthetic.FEATURE_LAYER]
    assert planted["recommendation"]["layer"] == _synthetic.FEATURE_LAYER


def test_matched_cosine_undoes_permutation_and_scale(rng):
    w = rng.uniform(size=(4, 9))
    np.testing.assert_allclose(_matched_cosine(w, 3.0 * w[[2, 0, 3, 1]]), 1.0)
    assert _matched_cosine(w, rng.uniform(size=(4, 9))) < 0.999


def test_the_rule_prefers_the_latest_layer_then_the_smallest_rank():
    def row(layer, rank, agreement, stability):
        return {"layer": layer, "rank": rank, "top1_agreement": agreement,
                "stability": stability, "logit_r2": 0.5}

    order = {"early": 0, "late": 1}
    rows = [row("early", 5, 1.0, 0.9), row("late", 5, 0.9, 0.9), row("late", 10, 0.97, 0.85),
            row("late", 20, 1.0, 0.5)]
    assert _recommend(rows, 0.95, 0.8, order) == {"layer": "late", "rank": 10, "qualified": True}
    assert _recommend(rows, 0.99, 0.95, order)["qualified"] is False


def test_bad_arguments():
    images, _ = _synthetic.make_motif_images(n_images=4, size=32, seed=0)
    model = _synthetic.make_motif_model()
    with pytest.raises(ValueError, match=r"`layers` must name at least one layer"):
        sweep(model, [], images, 0)
    with pytest.raises(ValueError, match=r"`images` must leave at least 2 images to fit"):
        sweep(model, ["conv"], images[:2], 0)
