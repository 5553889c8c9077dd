"""Concept importance, class impressions, evaluations and the CRAFT bridge on planted motifs."""

import numpy as np
import pytest

from tests.afi import _planted
from xcraft.afi import AfI, occluder_concept_importance
from xcraft.afi.evaluation import distillation_test, gradient_channel_importance, ssc_sdc_curves


@pytest.fixture(scope="session")
def planted():
    model = _planted.train_model(seed=0)
    images, labels, masks = _planted.make_dataset(300, seed=1)
    afi = AfI(model, layers=["conv1", "conv2"], max_steps=200, random_state=0)
    afi.fit(images[labels == 1][:60], 1)
    probes = {name: _planted.probe_set(name, 20, seed=i)
              for i, name in enumerate(_planted.COLOURS)}
    random_images = _planted.background(np.random.default_rng(5), 60)
    return {"model": model, "afi": afi, "images": images, "labels": labels, "masks": masks,
            "probes": probes, "random": random_images}


@pytest.fixture(scope="session")
def planted_scores(planted):
    return planted["afi"].concept_importance(planted["probes"], planted["random"],
                                             layers=["conv2"], n_random_sets=3,
                                             n_permutations=200)


def test_the_planted_model_learnt_the_task(planted):
    logits = planted["model"].predict(planted["images"], verbose=0)
    assert np.mean(np.argmax(logits, axis=1) == planted["labels"]) > 0.95
    assert planted["afi"].flip_rate_["clean"] == 1.0


def test_class_motifs_score_above_distractors(planted_scores):
    result = planted_scores
    score = dict(zip(result.names, result.mean, strict=True))
    p_value = dict(zip(result.names, result.p_value, strict=True))
    assert min(score["red"], score["blue"]) > max(score["green"], score["black"])
    assert p_value["red"] < 0.01 and p_value["blue"] < 0.01
    assert p_value["green"] > 0.05
    shift = dict(zip(result.names, result.response_shift.mean(axis=1), strict=True))
    assert shift["red"] > 0 and shift["blue"] > 0  # the class's motifs excite its detector
    # Black is not asserted: a dark square lowers the background's response, and the MMD is
    # two-sided, so a concept that suppresses the meta-detector differs from random images too.
    np.testing.assert_allclose(result.scores.sum(axis=0), 1.0)
    assert result.scores.shape == result.p_values.shape == (4, 3)
    assert result.std.shape == (4,) and np.all(result.std >= 0)
    assert set(result.as_dict()["concepts"][0]) >= {"name", "score", "p_value", "interval"}


def test_concept_scores_are_seeded(planted):
    kwargs = {"layers": ["conv2"], "n_random_sets": 2, "n_permutations": 20, "random_state": 4}
    probes = {"red": planted["probes"]["red"], "green": planted["probes"]["green"]}
    first = planted["afi"].concept_importance(probes, planted["random"], **kwargs)
    second = planted["afi"].concept_importance(probes, planted["random"], **kwargs)
    np.testing.assert_array_equal(first.p_values, second.p_values)
    np.testing.assert_array_equal(first.mmd, second.mmd)


@pytest.mark.parametrize("probes, match", [
    ({"red": "one"}, r"`concepts\['red'\]` must hold at least 2 probe images for the MMD, got 1"),
    ({}, r"`concepts` must hold at least one concept"),
])
def test_bad_probe_sets_are_refused(planted, probes, match):
    probes = {k: planted["probes"]["red"][:1] if v == "one" else v for k, v in probes.items()}
    with pytest.raises(ValueError, match=match):
        planted["afi"].concept_importance(probes, planted["random"], n_permutations=5)


def test_class_impression_raises_the_meta_detector_and_is_seeded(planted):
    afi = planted["afi"]
    image = afi.class_impression("conv2", n_steps=40, random_state=1)
    again = afi.class_impression("conv2", n_steps=40, random_state=1)
    np.testing.assert_array_equal(image, again)
    assert image.shape == (16, 16, 3) and image.min() >= 0.0 and image.max() <= 1.0
    detector = afi.meta_detector("conv2")
    start = afi.class_impression("conv2", n_steps=0, random_state=1)
    assert detector(image[None]).numpy().mean() > 5 * detector(start[None]).numpy().mean()


def test_distillation_students_separate_the_class(planted):
    result = distillation_test(planted["afi"], planted["images"], planted["labels"],
                               random_state=0)
    assert result["afi"] > 0.9 and 0.5 <= result["gradient"] <= 1.0
    assert result["n_test"] == 90


def test_gradient_importance_is_normalised(planted):
    positives = planted["images"][planted["labels"] == 1][:20]
    weights = gradient_channel_importance(planted["model"], "conv2", positives, 1)
    assert weights.shape == (8,) and weights.max() == 1.0 and weights.min() >= 0.0


def test_ssc_sdc_curves_on_located_motifs(planted):
    keep = planted["labels"] == 1
    masks = {name: mask[keep] for name, mask in planted["masks"].items()}
    curves = ssc_sdc_curves(planted["model"], planted["images"][keep], masks,
                            ["red", "blue", "green"], 1, baseline=0.4)
    # Both class motifs are needed: sufficiency at 2 concepts, destruction at 1.
    np.testing.assert_array_equal(curves["ssc"], [0.0, 0.0, 1.0, 1.0])
    np.testing.assert_array_equal(curves["sdc"], [1.0, 0.0, 0.0, 0.0])


def test_occluder_concept_importance_is_the_clipped_mean_drop(planted):
    afi = planted["afi"]
    images = planted["images"][planted["labels"] == 1][:10]
    detector = afi.meta_detector("conv1")

    def coefficients(batch):  # two "concepts": the meta-detector and its negative
        response = detector(batch).numpy().reshape(len(batch), -1).mean(axis=1)
        return np.stack([response, -response], axis=1)

    scores = occluder_concept_importance(afi.delta_, images, coefficients, input_range=(0, 1),
                                         batch_size=4)
    occluded = np.clip(images - afi.delta_, 0, 1)
    drop = (coefficients(images) - coefficients(occluded)).mean(axis=0)
    np.testing.assert_allclose(scores, np.maximum(drop, 0), rtol=1e-5, atol=1e-7)
    assert scores[0] > 0 and scores[1] == 0.0


def test_bridge_refuses_a_delta_of_another_shape(planted):
    with pytest.raises(ValueError, match=r"`delta` must have the images' shape"):
        occluder_concept_importance(np.zeros((3, 3, 3)), planted["random"], lambda x: x)
