"""CRAFT on a small vision transformer trained here on planted motifs.

The ViT (Conv2D patch embedding, a learned CLS token and position embeddings, two encoder
blocks of LayerNorm + MultiHeadAttention + GELU MLP, the class read from the CLS token) learns
"red and blue squares both present" from images where a red, a blue and a green (distractor)
square each appear with probability 1/2. Its first encoder block's output is a signed
(n, 65, 32) token layer: semi-NMF there must find the red and the blue squares, i.e. some
concept's map must correlate with each motif's mask far better than random concepts' maps do.
"""

import numpy as np
import pytest

import xcraft
from tests._vit import MOTIFS, SIZE, trained_vit
from xcraft.craft.attribution import concept_attribution_maps

N_CONCEPTS = 6
SPLIT = "block1"


@pytest.fixture(scope="module")
def vit():
    model, test_x, test_y, test_masks, accuracy, seconds = trained_vit()
    print(f"\nViT: {model.count_params()} weights, trained in {seconds:.1f} s, "
          f"held-out accuracy {accuracy:.3f}")
    return model, test_x, test_y, test_masks, accuracy


@pytest.fixture(scope="module")
def craft(vit):
    model, images, labels, masks, _ = vit
    chosen = np.flatnonzero(labels == 1)[:48]
    craft = xcraft.CraftTf.from_model(model, SPLIT, number_of_concepts=N_CONCEPTS, batch_size=64,
                                      patch_size=16, solver="semi-nmf", random_state=0,
                                      verbose=False)
    craft.fit(images[chosen], class_id=1)
    craft.estimate_importance(nb_design=16)
    return craft, images[chosen], masks[chosen]


def _correlations(maps, masks):
    """Mean Pearson correlation of every concept's map with every motif's mask: (r, motifs).

    Averaged over the images holding the motif; a constant map counts as 0.
    """
    n_images, n_maps = maps.shape[:2]
    flat_maps = maps.reshape(n_images, n_maps, -1).astype(np.float64)
    flat_masks = masks.reshape(n_images, masks.shape[1], -1).astype(np.float64)
    centred_maps = flat_maps - flat_maps.mean(-1, keepdims=True)
    centred_masks = flat_masks - flat_masks.mean(-1, keepdims=True)
    numerator = np.einsum("icp,imp->icm", centred_maps, centred_masks)
    norms = (np.linalg.norm(centred_maps, axis=-1)[:, :, None]
             * np.linalg.norm(centred_masks, axis=-1)[:, None, :])
    correlation = np.divide(numerator, norms, out=np.zeros_like(numerator), where=norms > 0)
    present = masks.any(axis=(2, 3))  # (n, motifs)
    return (correlation * present[:, None]).sum(0) / np.maximum(present.sum(0), 1)


def test_the_vit_learns_the_planted_rule(vit):
    assert vit[4] >= 0.9


def test_the_split_layer_is_a_signed_token_layer(craft):
    craft, _, _ = craft
    assert craft.token_layout_ == xcraft.plumbing.tokens.TokenLayout(65, 1, (8, 8), False)
    assert craft.solver_ == "semi-nmf" and craft.concept_bank_w_.min() < 0


@pytest.mark.parametrize("method", ["coefficients", "gradcam"])
def test_semi_nmf_at_the_first_block_finds_the_planted_motifs(craft, method):
    craft, images, masks = craft
    maps = craft.concept_attribution_maps(images, method=method)  # (n, r, 32, 32)
    found = _correlations(maps, masks).max(axis=0)  # (motifs,): the best concept per motif
    rng = np.random.default_rng(0)
    g = craft.input_to_latent_model
    # Random concepts: signed Gaussian banks of the same shape, 5 of them. A random concept's
    # map (the mean over them) is the bar. The best of 6 random directions is printed too: the
    # squares dominate this layer's activations, so some random direction already follows
    # them (r ~ 0.65 here), and only a modest margin over it is asserted.
    random = np.stack([
        _correlations(concept_attribution_maps(
            images, g, rng.normal(size=craft.concept_bank_w_.shape).astype(np.float32),
            method=method), masks)
        for _ in range(5)])  # (banks, r, motifs)
    random_best, random_one = random.max(axis=1).mean(axis=0), random.mean(axis=(0, 1))
    for name, value, best, one in zip(MOTIFS, found, random_best, random_one, strict=True):
        print(f"{method}: {name} square: best concept r = {value:.2f}; random concepts: best "
              f"of {N_CONCEPTS} r = {best:.2f}, one r = {one:.2f}")
    # Red and blue decide the class; green is a distractor the class's images carry at random.
    for motif in (0, 1):
        assert found[motif] > max(0.6, random_one[motif] + 0.4, random_best[motif])


def test_importances_and_every_map_method_run(craft):
    craft, images, _ = craft
    importances = craft.importances
    print(f"\nglobal importances {np.round(importances, 3)}")
    assert importances.shape == (N_CONCEPTS,) and np.all(np.isfinite(importances))
    assert np.all((importances >= 0) & (importances <= 1)) and importances.max() > 0.1
    local = craft.estimate_importance(images[:2], nb_design=8, method="occlusion")
    assert local.shape == (N_CONCEPTS,) and np.all(np.isfinite(local))
    figure = craft.plot_image_concepts(images[0], nb_most_important_concepts=3,
                                       method="gradcam")
    assert len(figure.axes) >= 4


@pytest.mark.slow
@pytest.mark.parametrize("method", ["saliency", "gradient_input", "rise"])
def test_gradient_and_black_box_maps_of_the_vit(craft, method):
    craft, images, masks = craft
    options = {"n_masks": 256} if method == "rise" else {}
    maps = craft.concept_attribution_maps(images[:8], method=method, **options)
    assert maps.shape == (8, N_CONCEPTS, SIZE, SIZE) and np.all(np.isfinite(maps))
    found = _correlations(maps, masks[:8]).max(axis=0)
    print(f"{method}: best concept r per motif "
          f"{dict(zip(MOTIFS, np.round(found, 2).tolist(), strict=True))}")
    assert np.abs(maps).max() > 0


@pytest.mark.slow
def test_gradcam_at_an_earlier_token_layer(craft):
    craft, images, masks = craft
    # The embedding's output (CLS + 64 patch tokens): Grad-CAM there, through block 1.
    maps = craft.concept_attribution_maps(images[:8], method="gradcam", gradcam_layer="tokens")
    assert maps.shape == (8, N_CONCEPTS, SIZE, SIZE) and np.all(np.isfinite(maps))
    found = _correlations(maps, masks[:8]).max(axis=0)
    print(f"gradcam at 'tokens': best concept r per motif "
          f"{dict(zip(MOTIFS, np.round(found, 2).tolist(), strict=True))}")
    assert found[0] > 0.3 and found[1] > 0.3


@pytest.mark.slow
def test_report_save_load_and_decomposition_of_a_token_layer(craft, tmp_path):
    from xcraft.viz.report import write_report

    craft, images, _ = craft
    craft.save(tmp_path / "vit")
    loaded = xcraft.CraftTf.load(tmp_path / "vit", craft.input_to_latent_model,
                                 craft.latent_to_logit_model)
    np.testing.assert_allclose(loaded.transform(images[:2]), craft.transform(images[:2]))
    child = craft.decompose(int(np.argmax(craft.importances)), layer="tokens",
                            number_of_concepts=3, percentile=70, nb_design=8)
    assert child.token_layout_ == craft.token_layout_  # the embedding layer: 65 tokens too
    assert np.all(np.isfinite(child.importances))
    write_report({1: craft}, tmp_path / "report", fidelity=True, n_map_images=2,
                 n_map_concepts=2, map_method="gradcam")
    html = (tmp_path / "report" / "report.html").read_text()
    assert "<img" in html
