"""AfI save / load: identical arrays, no pickle, a different model refused."""

import json

import keras
import numpy as np
import pytest

from tests.afi.test_occluder import _colour_model
from xcraft.afi import AfI


@pytest.fixture(scope="module")
def fitted():
    model = _colour_model()
    rng = np.random.default_rng(1)
    images = rng.uniform(0.0, 1.0, size=(6, 8, 8, 3)).astype(np.float32)
    images[..., 0] = rng.uniform(0.8, 1.0, size=(6, 8, 8))
    afi = AfI(model, layers=["colours", "gap"], learning_rate=0.05, max_steps=50,
              random_state=0).fit(images, 0)
    probes = {"red": images[:3], "plain": np.full((3, 8, 8, 3), 0.5, np.float32)}
    afi.concept_importance(probes, rng.uniform(size=(6, 8, 8, 3)).astype(np.float32),
                           n_random_sets=2, random_set_size=3, n_permutations=10)
    return afi


def test_round_trip_gives_identical_arrays(fitted, tmp_path):
    fitted.save(tmp_path / "afi")
    loaded = AfI.load(tmp_path / "afi", fitted.model)
    np.testing.assert_array_equal(loaded.delta_, fitted.delta_)
    for layer in fitted.layers_:
        np.testing.assert_array_equal(loaded.neuron_importance_[layer],
                                      fitted.neuron_importance_[layer])
        np.testing.assert_array_equal(loaded.channel_importance_[layer],
                                      fitted.channel_importance_[layer])
    for key, value in fitted.history_.items():
        np.testing.assert_array_equal(loaded.history_[key], value)
    assert loaded.flip_rate_ == fitted.flip_rate_
    assert loaded.get_params(deep=False) | {"model": None} == \
        fitted.get_params(deep=False) | {"model": None, "input_range": [0.0, 1.0]}
    np.testing.assert_array_equal(loaded.concept_importance_.p_values,
                                  fitted.concept_importance_.p_values)
    assert loaded.concept_importance_.names == ["red", "plain"]
    np.testing.assert_array_equal(loaded.concept_importance_.response_shift,
                                  fitted.concept_importance_.response_shift)
    response = loaded.meta_detector("colours")(np.ones((1, 8, 8, 3), np.float32)).numpy()
    np.testing.assert_allclose(response, 1.0, rtol=1e-6)
    metadata = json.loads((tmp_path / "afi" / "metadata.json").read_text())
    assert metadata["kind"] == "AfI" and metadata["class_id"] == 0
    with np.load(tmp_path / "afi" / "arrays.npz", allow_pickle=False) as data:
        assert "delta_" in data.files


def test_another_model_is_refused(fitted, tmp_path):
    fitted.save(tmp_path / "afi")
    other = keras.models.clone_model(fitted.model)
    with pytest.raises(ValueError, match=r"`model` must be the model the result was fitted on"):
        AfI.load(tmp_path / "afi", other)


def test_a_foreign_directory_is_refused(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must be a directory written by `AfI.save`"):
        AfI.load(tmp_path, keras.Sequential())
