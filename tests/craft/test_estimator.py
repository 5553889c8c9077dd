import keras
import numpy as np
import pytest
import scipy.optimize

from tests import _synthetic
from xcraft.craft.estimator import CraftTf
from xcraft.plumbing.split import split_model

N_CONCEPTS = 3


def _group_mass(concept_bank):
    """(r, 2): share of each concept's red+blue mass in the red and in the blue channels."""
    n = _synthetic.N_PER_GROUP
    red = concept_bank[:, :n].sum(axis=1)
    blue = concept_bank[:, n : 2 * n].sum(axis=1)
    total = np.maximum(red + blue, 1e-12)
    return np.stack([red / total, blue / total], axis=1)


@pytest.fixture(scope="module")
def fitted(motif_set, motif_model):
    images, boxes = motif_set
    craft = CraftTf.from_model(
        motif_model,
        _synthetic.FEATURE_LAYER,
        number_of_concepts=N_CONCEPTS,
        patch_size=12,
        patches_per_image=10,
        random_state=0,
        verbose=False,
    )
    result = craft.fit(images, class_id=0)
    return craft, result, images, boxes


def test_fit_returns_xplique_tuple(fitted):
    craft, (crops, crops_u, concept_bank_w), images, _ = fitted
    assert crops.shape == (len(images) * 10, 32, 32, 3)
    assert crops_u.shape == (len(images) * 10, N_CONCEPTS)
    assert concept_bank_w.shape == (N_CONCEPTS, 3 * _synthetic.N_PER_GROUP)
    assert craft.factorization.crops_u is crops_u
    np.testing.assert_array_equal(craft.concept_bank_w, concept_bank_w)
    assert craft.crop_boxes.shape == (len(crops), 4)


def test_concepts_separate_the_planted_motifs(fitted):
    craft, _, _, _ = fitted
    mass = _group_mass(craft.concept_bank_w)
    red_concept, blue_concept = mass[:, 0].argmax(), mass[:, 1].argmax()
    assert red_concept != blue_concept
    assert mass[red_concept, 0] > 0.95 and mass[blue_concept, 1] > 0.95


def test_motif_crops_map_to_their_concept(fitted):
    craft, (_, crops_u, _), _, boxes = fitted
    mass = _group_mass(craft.concept_bank_w)
    red_concept, blue_concept = mass[:, 0].argmax(), mass[:, 1].argmax()

    def overlap(name):
        motif = boxes[name][craft.crop_boxes[:, 0]]  # (n_crops, 4) motif box of the crop's image
        y, x, s = craft.crop_boxes[:, 1], craft.crop_boxes[:, 2], craft.crop_boxes[:, 3]
        dy = np.minimum(y + s, motif[:, 0] + motif[:, 2]) - np.maximum(y, motif[:, 0])
        dx = np.minimum(x + s, motif[:, 1] + motif[:, 3]) - np.maximum(x, motif[:, 1])
        return np.clip(dy, 0, None) * np.clip(dx, 0, None)

    red_overlap, blue_overlap = overlap("red"), overlap("blue")
    only_red = (red_overlap > 16) & (blue_overlap == 0)
    only_blue = (blue_overlap > 16) & (red_overlap == 0)
    assert only_red.sum() > 20 and only_blue.sum() > 20
    assert np.mean(crops_u[only_red, red_concept] > crops_u[only_red, blue_concept]) > 0.95
    assert np.mean(crops_u[only_blue, blue_concept] > crops_u[only_blue, red_concept]) > 0.95
    # The coefficient grows with the visible motif area.
    assert np.corrcoef(red_overlap, crops_u[:, red_concept])[0, 1] > 0.8


def test_same_seed_same_concepts(motif_set, motif_model):
    images, _ = motif_set
    kwargs = dict(number_of_concepts=N_CONCEPTS, patch_size=12, random_state=7, verbose=False)
    first = CraftTf.from_model(motif_model, _synthetic.FEATURE_LAYER, **kwargs)
    second = CraftTf.from_model(motif_model, _synthetic.FEATURE_LAYER, **kwargs)
    _, u1, w1 = first.fit(images[:16])
    _, u2, w2 = second.fit(images[:16])
    np.testing.assert_array_equal(w1, w2)
    np.testing.assert_array_equal(u1, u2)
    np.testing.assert_array_equal(first.crop_boxes, second.crop_boxes)


def test_transform_matches_scipy_nnls(fitted):
    craft, _, images, _ = fitted
    u = craft.transform(images[:3])
    activations = craft.input_to_latent_model(images[:3]).numpy()
    assert u.shape == (3, *activations.shape[1:3], N_CONCEPTS)
    w = craft.concept_bank_w.astype(np.float64)
    rows = activations.reshape(-1, activations.shape[-1]).astype(np.float64)
    expected = np.stack([scipy.optimize.nnls(w.T, row)[0] for row in rows])
    np.testing.assert_allclose(u.reshape(-1, N_CONCEPTS), expected, atol=1e-4)


def test_transform_of_pooled_activations(fitted):
    craft, _, images, _ = fitted
    pooled = craft.input_to_latent_model(images[:4]).numpy().mean(axis=(1, 2))
    u = craft.transform(None, activations=pooled)
    assert u.shape == (4, N_CONCEPTS)
    w = craft.concept_bank_w.astype(np.float64)
    expected = np.stack([scipy.optimize.nnls(w.T, row.astype(np.float64))[0] for row in pooled])
    np.testing.assert_allclose(u, expected, atol=1e-4)


def test_global_importance_ranks_the_driving_motif(motif_set):
    images, _ = motif_set
    model = _synthetic.make_motif_model(blue_weight=0.0)
    craft = CraftTf.from_model(
        model, _synthetic.FEATURE_LAYER, number_of_concepts=N_CONCEPTS, patch_size=12,
        random_state=0, verbose=False,
    )
    craft.fit(images[:24], class_id=0)
    importances = craft.estimate_importance(nb_design=32)
    mass = _group_mass(craft.concept_bank_w)
    red_concept, blue_concept = mass[:, 0].argmax(), mass[:, 1].argmax()
    assert importances.argmax() == red_concept
    assert importances[blue_concept] < 0.05 * importances[red_concept]
    assert craft.sensitivity.most_important_concepts[0] == red_concept
    np.testing.assert_array_equal(craft.importances, importances)
    local = craft.estimate_importance(images[:1], nb_design=32)
    assert local.shape == (N_CONCEPTS,) and local.argmax() == red_concept
    np.testing.assert_array_equal(craft.importances, importances)  # local leaves global alone
    # The whole head, unfolded, scores the same perturbations: same indices up to rounding.
    unfolded = craft.estimate_importance(images[:1], nb_design=32, fold_head=False)
    np.testing.assert_allclose(unfolded, local, rtol=1e-4, atol=1e-6)


# ------------------------------------------------------------------------------ bad input
@pytest.fixture(scope="module")
def tiny_split(tiny_model):
    return split_model(tiny_model, "conv")


def _craft(tiny_split, **kwargs):
    g, h = tiny_split
    kwargs.setdefault("number_of_concepts", 2)
    kwargs.setdefault("patch_size", 8)
    return CraftTf(g, h, verbose=False, **kwargs)


def test_unfitted_transform(tiny_split, rng):
    with pytest.raises(Exception, match=r"This CraftTf instance is not fitted yet\. Call `fit`"):
        _craft(tiny_split).transform(rng.uniform(size=(1, 16, 16, 3)))


def test_too_few_crops(tiny_split, rng):
    craft = _craft(tiny_split, number_of_concepts=30, patches_per_image=2)
    message = r"`number_of_concepts` must be <= the number of crops \(4\)"
    with pytest.raises(ValueError, match=message):
        craft.fit(rng.uniform(size=(2, 16, 16, 3)))


def test_patch_larger_than_images(tiny_split, rng):
    message = r"`patch_size` must be <= the image size \(16×16\), got 20"
    with pytest.raises(ValueError, match=message):
        _craft(tiny_split, patch_size=20).fit(rng.uniform(size=(2, 16, 16, 3)))


def test_images_with_nan(tiny_split, rng):
    images = rng.uniform(size=(2, 16, 16, 3))
    images[0, 0, 0, 0] = np.nan
    with pytest.raises(ValueError, match=r"`inputs` must be finite, got 1 NaN or infinite"):
        _craft(tiny_split).fit(images)


def test_images_of_wrong_rank(tiny_split, rng):
    with pytest.raises(ValueError, match=r"got shape \(16, 16, 3\)\. For a single image pass"):
        _craft(tiny_split).fit(rng.uniform(size=(16, 16, 3)))


def test_images_of_wrong_size(tiny_split, rng):
    message = r"`inputs` must have shape \(batch, 16, 16, 3\) to match"
    with pytest.raises(ValueError, match=message):
        _craft(tiny_split).fit(rng.uniform(size=(2, 20, 20, 3)))


def test_images_of_wrong_dtype(tiny_split):
    with pytest.raises(TypeError, match=r"`inputs` must hold real numbers, got dtype <U1\."):
        _craft(tiny_split).fit(np.full((2, 16, 16, 3), "a"))


def test_class_id_outside_logits(tiny_split, rng):
    with pytest.raises(ValueError, match=r"`class_id` must be in \[0, 2\] \(the model has 3"):
        _craft(tiny_split).fit(rng.uniform(size=(2, 16, 16, 3)), class_id=3)


def test_negative_activations_name_the_layer(rng):
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, name="linear_conv")(inputs)
    outputs = keras.layers.Dense(2)(keras.layers.GlobalAveragePooling2D()(x))
    model = keras.Model(inputs, outputs)
    craft = CraftTf.from_model(model, "linear_conv", number_of_concepts=2, patch_size=8,
                               verbose=False)
    with pytest.raises(ValueError, match=r"layer 'linear_conv' must be non-negative for NMF, got a "
                       r"minimum of -[0-9.]+.*after a ReLU"):
        craft.fit(rng.uniform(-1, 1, size=(3, 16, 16, 3)))


def test_bad_constructor_argument(tiny_split, rng):
    with pytest.raises(ValueError, match=r"`crops` must be one of 'random', 'grid', got 'tiles'\."):
        _craft(tiny_split, crops="tiles").fit(rng.uniform(size=(2, 16, 16, 3)))
    with pytest.raises(TypeError, match=r"`number_of_concepts` must be an int, got float 2.0\."):
        _craft(tiny_split, number_of_concepts=2.0).fit(rng.uniform(size=(2, 16, 16, 3)))


def test_bootstrap_intervals_are_stored(fitted):
    craft, _, _, _ = fitted
    importances = craft.estimate_importance(nb_design=16, n_bootstrap=50, random_state=1)
    low, high = craft.sensitivity.intervals
    assert np.all(low <= importances + 1e-6) and np.all(importances <= high + 1e-6)
    assert np.all(high - low >= 0)


def test_fidelity_sobol_beats_random_on_planted_model(motif_set):
    images, _ = motif_set
    model = _synthetic.make_motif_model(blue_weight=0.0)
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=N_CONCEPTS,
                               patch_size=12, random_state=0, verbose=False)
    craft.fit(images[:16], class_id=0)
    result = craft.concept_fidelity(nb_design=16, n_random=20)
    assert result.aucs["deletion"]["sobol"] <= result.aucs["deletion"]["random"]
    assert result.aucs["insertion"]["sobol"] >= result.aucs["insertion"]["random"]
    # Deleting every concept leaves the head's score of a zero activation (bias 0 here).
    np.testing.assert_allclose(result.curves["deletion"]["sobol"][-1], 0.0, atol=1e-6)
    assert craft.importances is None  # fidelity does not overwrite the stored importances
