"""save_coupled / load_coupled: exact round trip, layouts with index maps, refusals."""

import json
import os

import keras
import numpy as np
import pytest

from xcraft.coupled import CoupledNMF, build_blocks
from xcraft.coupled.io import load_coupled, save_coupled


@pytest.fixture(scope="module")
def fitted():
    model = keras.Sequential([keras.Input((4, 4, 1)),
                              keras.layers.Conv2D(2, 3, activation="relu", name="conv"),
                              keras.layers.Flatten(),
                              keras.layers.Dense(3, activation="relu", name="dense")])
    images = np.random.default_rng(0).uniform(size=(20, 4, 4, 1)).astype("float32")
    blocks = build_blocks(model, ["conv", "dense"], images)
    blocks["dense"] += 0.01  # no all-zero column (a dead unit) in so small a model
    estimator = CoupledNMF(3, weights={"pixels": 1.0, "conv": 2.5, "dense": 0.5}, max_iter=30,
                           random_state=0).fit(blocks)
    return estimator, blocks


def _assert_equal(loaded, saved):
    np.testing.assert_array_equal(loaded.examples_, saved.examples_)
    assert loaded.examples_.dtype == saved.examples_.dtype
    assert list(loaded.components_) == list(saved.components_)
    for name in saved.components_:
        np.testing.assert_array_equal(loaded.components_[name], saved.components_[name])
    np.testing.assert_array_equal(loaded.history_, saved.history_)
    assert loaded.weights_ == saved.weights_
    assert loaded.block_errors_ == saved.block_errors_
    assert loaded.n_iter_ == saved.n_iter_ and loaded.n_features_in_ == saved.n_features_in_
    assert loaded.get_params() == saved.get_params()


def test_round_trip_is_exact_with_the_layout(fitted, tmp_path):
    estimator, blocks = fitted
    save_coupled(estimator, tmp_path / "fit", blocks=blocks)
    loaded, layout = load_coupled(tmp_path / "fit")
    _assert_equal(loaded, estimator)
    assert layout.shapes == blocks.shapes and layout.channels == blocks.channels
    for name in blocks:
        np.testing.assert_array_equal(layout.index_map(name), blocks.index_map(name))
    # The loaded estimator works: transform of the training blocks gives F again.
    np.testing.assert_allclose(loaded.transform(blocks), estimator.transform(blocks))


def test_round_trip_without_layout_and_overwrite_of_an_earlier_result(fitted, tmp_path):
    estimator, _ = fitted
    save_coupled(estimator, tmp_path / "fit")
    save_coupled(estimator, tmp_path / "fit")  # an earlier result is replaced
    loaded, layout = load_coupled(tmp_path / "fit")
    _assert_equal(loaded, estimator)
    assert layout is None
    assert sorted(os.listdir(tmp_path)) == ["fit"]  # no temporary left behind


def test_nested_layer_names_are_safe(tmp_path):
    rng = np.random.default_rng(1)
    blocks = {"base/conv": rng.uniform(size=(10, 4)), "pixels": rng.uniform(size=(10, 5))}
    estimator = CoupledNMF(2, max_iter=5, random_state=0).fit(blocks)
    save_coupled(estimator, tmp_path / "fit")
    _assert_equal(load_coupled(tmp_path / "fit")[0], estimator)


def _edit_metadata(path, **changes):
    metadata_path = path / "metadata.json"
    metadata = json.loads(metadata_path.read_text())
    metadata.update(changes)
    metadata_path.write_text(json.dumps(metadata))


def test_refuses_what_it_did_not_write(fitted, tmp_path):
    estimator, _ = fitted
    with pytest.raises(ValueError, match=r"`path` must be a directory written by `save_coupled`"
                                         r", got .*, which has no metadata.json\."):
        load_coupled(tmp_path)
    save_coupled(estimator, tmp_path / "fit")
    _edit_metadata(tmp_path / "fit", kind="AfI")
    with pytest.raises(ValueError, match=r"`path` must be a CoupledNMF result, got .*, whose "
                                         r"metadata.json describes a 'AfI'\."):
        load_coupled(tmp_path / "fit")
    _edit_metadata(tmp_path / "fit", kind="CoupledNMF", format_version=99)
    with pytest.raises(ValueError, match=r"saved in format version 99, newer than this xcraft"):
        load_coupled(tmp_path / "fit")


def test_refuses_corrupt_or_mismatched_files(fitted, tmp_path):
    estimator, blocks = fitted
    save_coupled(estimator, tmp_path / "fit", blocks=blocks)
    arrays = tmp_path / "fit" / "arrays.npz"
    content = dict(np.load(arrays))
    np.savez(arrays, **{**content, "components/1": content["components/1"][:, :-1]})
    with pytest.raises(ValueError, match=r"is inconsistent: the components of block 'conv' must "
                                         r"have shape \(3, 8\), got \(3, 7\)\. It is corrupt"):
        load_coupled(tmp_path / "fit")
    np.savez(arrays, **{k: a for k, a in content.items() if k != "index/2"})
    with pytest.raises(ValueError, match=r"arrays.npz lacks \['index/2'\]"):
        load_coupled(tmp_path / "fit")
    np.savez(arrays, **{**content, "index/1": content["index/1"][::-1]})
    with pytest.raises(ValueError, match=r"the saved index map of block 'conv' does not match"):
        load_coupled(tmp_path / "fit")
    arrays.write_bytes(b"PK\x03\x04 truncated")
    with pytest.raises(ValueError, match=r"is not a readable npz archive of plain arrays"):
        load_coupled(tmp_path / "fit")
    (tmp_path / "fit" / "metadata.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"is not valid JSON"):
        load_coupled(tmp_path / "fit")


def test_save_checks_its_arguments(fitted, tmp_path):
    estimator, blocks = fitted
    with pytest.raises(ValueError, match=r"`blocks` must describe the fitted blocks "
                                         r"\['pixels', 'conv', 'dense'\], got \['pixels'\]\."):
        save_coupled(estimator, tmp_path / "a", blocks=build_blocks(
            keras.Sequential([keras.Input((4, 4, 1)), keras.layers.ReLU()]), [],
            np.ones((2, 4, 4, 1), "float32")))
    with pytest.raises(TypeError, match=r"`blocks` must be the Blocks returned by build_blocks"):
        save_coupled(estimator, tmp_path / "a", blocks=dict(blocks))
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "mine.txt").write_text("keep")
    with pytest.raises(ValueError, match=r"`path` must be a new name, an empty directory or an "
                                         r"earlier result"):
        save_coupled(estimator, tmp_path / "notes")
    with pytest.raises(Exception, match=r"not fitted yet"):
        save_coupled(CoupledNMF(2), tmp_path / "b")
