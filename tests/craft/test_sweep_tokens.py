"""The layer x rank sweep on a vision transformer's token layers (tests/_vit.py).

Every figure of a candidate must be the one a direct ``CraftTf`` fit at that layer and rank
gives (same images, same seed, same token options): the sweep adds no maths of its own.
"""

import warnings

import numpy as np
import pytest

import xcraft
from tests._vit import trained_vit
from xcraft.craft.sweep import SWEEP_FIELDS, sweep

LAYERS = ("patch_embedding", "tokens", "block1")  # a 4-D map, then two (n, 65, 32) token layers
RANKS = (2, 4, 6)
OPTIONS = {"n_seeds": 2, "patch_size": 16, "batch_size": 64, "random_state": 0}


@pytest.fixture(scope="module")
def vit():
    model, images, labels, _, _, _ = trained_vit()
    return model, images[np.flatnonzero(labels == 1)[:32]]


@pytest.fixture(scope="module")
def swept(vit):
    model, images = vit
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        result = sweep(model, LAYERS, images, 1, ranks=RANKS, cls_token="exclude", **OPTIONS)
    return result, [str(w.message) for w in caught]


def _direct(model, layer, images, rank, **tokens):
    """The sweep's first fit of a candidate, done by hand."""
    craft = xcraft.CraftTf.from_model(model, layer, number_of_concepts=rank, patch_size=16,
                                      patches_per_image=10, solver="auto", batch_size=64,
                                      random_state=0, verbose=False, **tokens)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the semi-NMF notice of solver="auto"
        craft.fit(images, class_id=1)
    return craft


def _relative_error(craft):
    a = craft.crop_activations_
    return np.linalg.norm(a - craft.crops_u_ @ craft.concept_bank_w_) / np.linalg.norm(a)


@pytest.mark.slow  # the 18-fit token sweep: ~15 s
def test_every_candidate_of_the_token_model_is_measured(swept):
    result, _ = swept
    assert [(r["layer"], r["rank"]) for r in result["rows"]] == [
        (layer, rank) for layer in LAYERS for rank in RANKS]
    for row in result["rows"]:
        assert set(row) == set(SWEEP_FIELDS)
        assert 0 < row["relative_error"] < 1 and 0 <= row["top1_agreement"] <= 1
        assert -1 - 1e-6 <= row["stability"] <= 1 + 1e-6 and np.isfinite(row["logit_r2"])
    assert sorted(result["split"]["fitted"] + result["split"]["held_out"]) == list(range(32))
    assert len(result["split"]["held_out"]) == 8  # a quarter of 32


@pytest.mark.slow  # the 18-fit token sweep: ~15 s
@pytest.mark.parametrize("layer, rank", [("tokens", 6), ("block1", 4), ("patch_embedding", 2)])
def test_a_candidate_is_what_a_direct_fit_gives(vit, swept, layer, rank):
    model, images = vit
    result, _ = swept
    row = next(r for r in result["rows"] if (r["layer"], r["rank"]) == (layer, rank))
    tokens = {"cls_token": "exclude"} if layer != "patch_embedding" else {}
    craft = _direct(model, layer, images[result["split"]["fitted"]], rank, **tokens)
    np.testing.assert_allclose(row["relative_error"], _relative_error(craft), rtol=1e-6)

    # The logit fidelity from the estimator's own transform of the held-out images: every
    # token (the CLS token too) rebuilt from its coefficients, then the rest of the model.
    held_out = images[result["split"]["held_out"]]
    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    original = h(g(held_out)).numpy()
    rebuilt = h(np.tensordot(craft.transform(held_out), craft.concept_bank_w_, axes=1)).numpy()
    target, estimate = original[:, 1], rebuilt[:, 1]
    r2 = 1 - np.sum((target - estimate) ** 2) / np.sum((target - target.mean()) ** 2)
    # R² divides by the small spread of one class's logit: float32 round-off of two paths.
    np.testing.assert_allclose(row["logit_r2"], r2, rtol=1e-3, atol=1e-3)
    assert row["top1_agreement"] == np.mean(original.argmax(1) == rebuilt.argmax(1))


@pytest.mark.slow  # the 18-fit token sweep: ~15 s
def test_monotonicity_is_what_the_errors_say_and_is_warned_about(swept):
    result, messages = swept
    for layer in LAYERS:
        errors = [r["relative_error"] for r in result["rows"] if r["layer"] == layer]
        rose = bool(np.any(np.diff(errors) > 1e-3 * max(errors) + 1e-6))  # the documented slack
        assert result["monotone"][layer] is (not rose)
        warned = any(f"At layer {layer!r} the reconstruction error rose" in m for m in messages)
        assert warned is rose


@pytest.mark.slow  # the 18-fit token sweep: ~15 s
def test_cls_token_reaches_the_fits(vit, swept):
    model, images = vit
    result, _ = swept
    kept = sweep(model, ["block1"], images, 1, ranks=(4,), cls_token="keep",
                 **{**OPTIONS, "n_seeds": 1})
    (row,) = kept["rows"]
    direct = _direct(model, "block1", images[kept["split"]["fitted"]], 4, cls_token="keep")
    np.testing.assert_allclose(row["relative_error"], _relative_error(direct), rtol=1e-6)
    excluded = next(r for r in result["rows"] if (r["layer"], r["rank"]) == ("block1", 4))
    # The pooled crops differ by the CLS token (1 token of 65), so the errors must differ.
    assert abs(row["relative_error"] - excluded["relative_error"]) > 1e-6
    assert np.isnan(row["stability"])  # one seed


def test_bad_token_options_are_refused(vit):
    model, images = vit
    with pytest.raises(ValueError, match=r"`token_grid=\(7, 7\)` holds 49 patch tokens, but the "
                                         r"split layer's 65 tokens minus 1 leading token\(s\) "
                                         r"leave 64\."):
        sweep(model, ["block1"], images[:8], 1, ranks=(2,), cls_token="exclude",
              token_grid=(7, 7), n_seeds=1, patch_size=16)
    with pytest.raises(TypeError, match=r"`cls_token` must be one of 'auto', 'exclude', 'keep' "
                                        r"or an int count of leading tokens, got float 1\.0\."):
        sweep(model, ["block1"], images[:8], 1, cls_token=1.0)
