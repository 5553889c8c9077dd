import json
import os

import keras
import numpy as np
import pytest

from tests import _synthetic
from xcraft.craft import io
from xcraft.craft.estimator import CraftTf
from xcraft.plumbing.split import split_model


@pytest.fixture(scope="module")
def fitted_tree():
    images, _ = _synthetic.make_motif_images(16, motifs=("red", "green"), seed=2)
    model = _synthetic.make_parts_model()
    craft = CraftTf.from_model(model, _synthetic.FEATURE_LAYER, number_of_concepts=2,
                               patch_size=12, random_state=3, verbose=False)
    craft.fit(images, class_id=0)
    craft.estimate_importance(nb_design=8)
    craft.decompose(0, "parts", number_of_concepts=2, percentile=50, nb_design=8)
    return craft, images, model


def _assert_same_tree(loaded, saved):
    """Nested dicts and lists equal, numbers to float round-off (pytest.approx is flat only)."""
    assert type(loaded) is type(saved) or np.isscalar(loaded) and np.isscalar(saved)
    if isinstance(saved, dict):
        assert loaded.keys() == saved.keys()
        for key in saved:
            _assert_same_tree(loaded[key], saved[key])
    elif isinstance(saved, (list, tuple)):
        assert len(loaded) == len(saved)
        for item_loaded, item_saved in zip(loaded, saved, strict=True):
            _assert_same_tree(item_loaded, item_saved)
    else:
        assert loaded == pytest.approx(saved, rel=1e-12, nan_ok=True)


def test_save_load_reproduces_everything(fitted_tree, tmp_path):
    craft, images, model = fitted_tree
    craft.save(tmp_path / "result")
    loaded = CraftTf.load(tmp_path / "result", craft.input_to_latent_model,
                          craft.latent_to_logit_model, model=model)
    np.testing.assert_array_equal(loaded.transform(images[:4]), craft.transform(images[:4]))
    np.testing.assert_array_equal(loaded.importances, craft.importances)
    np.testing.assert_array_equal(loaded.concept_attribution_maps(images[:2]),
                                  craft.concept_attribution_maps(images[:2]))
    np.testing.assert_array_equal(loaded.crops_u, craft.crops_u)
    np.testing.assert_array_equal(loaded.factorization.crops, craft.factorization.crops)
    np.testing.assert_array_equal(loaded.sensitivity.most_important_concepts,
                                  craft.sensitivity.most_important_concepts)
    assert loaded.get_params(deep=False).keys() == craft.get_params(deep=False).keys()
    assert loaded.factorization.class_id == 0
    child, loaded_child = craft.children_[0], loaded.children_[0]
    np.testing.assert_array_equal(loaded_child.concept_bank_w, child.concept_bank_w)
    np.testing.assert_array_equal(loaded_child.importances, child.importances)
    _assert_same_tree(loaded_child.refinement_, child.refinement_)
    # Importances recomputed from the loaded state equal the originals bit for bit.
    np.testing.assert_array_equal(loaded.estimate_importance(nb_design=8),
                                  craft.estimate_importance(nb_design=8))


def test_saved_files_hold_no_pickle(fitted_tree, tmp_path):
    craft, _, _ = fitted_tree
    craft.save(tmp_path / "r")
    with np.load(tmp_path / "r" / io.ARRAYS_FILE, allow_pickle=False) as data:
        assert all(data[name].dtype != object for name in data.files)
    metadata = json.loads((tmp_path / "r" / io.METADATA_FILE).read_text())
    assert metadata["layer"] == _synthetic.FEATURE_LAYER and metadata["class_id"] == 0
    assert metadata["params"]["random_state"] == 3 and "tensorflow" in metadata["versions"]


def test_interrupted_save_leaves_previous_result_intact(fitted_tree, tmp_path, monkeypatch):
    craft, _, _ = fitted_tree
    target = tmp_path / "result"
    craft.save(target)
    before = sorted(os.listdir(target))

    def crash(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(io.np, "savez_compressed", crash)
    with pytest.raises(KeyboardInterrupt):
        craft.save(target)
    assert sorted(os.listdir(target)) == before
    assert sorted(os.listdir(tmp_path)) == ["result"]  # no temporary directory left behind
    with pytest.raises(KeyboardInterrupt):
        craft.save(tmp_path / "fresh")
    assert not (tmp_path / "fresh").exists()


def test_newer_format_is_refused(fitted_tree, tmp_path):
    craft, _, _ = fitted_tree
    craft.save(tmp_path / "r")
    path = tmp_path / "r" / io.METADATA_FILE
    metadata = json.loads(path.read_text())
    metadata["format_version"] = io.FORMAT_VERSION + 1
    path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=r"saved in format version 2, newer than this xcraft"):
        CraftTf.load(tmp_path / "r", craft.input_to_latent_model, craft.latent_to_logit_model)


def test_children_need_the_model(fitted_tree, tmp_path):
    craft, _, _ = fitted_tree
    craft.save(tmp_path / "r")
    with pytest.raises(ValueError, match=r"`model` must be given to load the decompositions"):
        CraftTf.load(tmp_path / "r", craft.input_to_latent_model, craft.latent_to_logit_model)


def test_not_a_result(tmp_path):
    with pytest.raises(ValueError, match=r"`path` must be a directory written by `save`"):
        CraftTf.load(tmp_path, None, None)


def test_load_refuses_other_models(fitted_tree, tmp_path):
    craft, _, _ = fitted_tree
    craft.save(tmp_path / "r")
    g, h = craft.input_to_latent_model, craft.latent_to_logit_model
    with pytest.raises(ValueError, match=r"are not the ones it was saved with: "
                                         r"input_to_latent_model: .*Pass the same g and h, or "
                                         r"`strict=False`"):
        CraftTf.load(tmp_path / "r", h, h)
    assert g is not h


def test_load_notices_changed_weights(fitted_tree, tmp_path):
    craft, _, model = fitted_tree
    craft.save(tmp_path / "r")
    clone = keras.models.clone_model(model)  # same layers and shapes, fresh weights
    g, h = split_model(clone, _synthetic.FEATURE_LAYER)
    with pytest.raises(ValueError, match=r"input_to_latent_model: weight values differ"):
        CraftTf.load(tmp_path / "r", g, h, model=clone)
    with pytest.warns(UserWarning, match=r"weight values differ.*Loaded anyway \(strict=False\)"):
        loaded = CraftTf.load(tmp_path / "r", g, h, model=clone, strict=False)
    np.testing.assert_array_equal(loaded.concept_bank_w, craft.concept_bank_w)


def _rewrite_arrays(path, **changes):
    arrays = dict(np.load(path / io.ARRAYS_FILE))
    for name, value in changes.items():
        if value is None:
            arrays.pop(name)
        else:
            arrays[name] = value
    np.savez_compressed(path / io.ARRAYS_FILE, **arrays)


@pytest.mark.parametrize(
    ("change", "message"),
    [
        (lambda a: {"concept_bank_w_": None}, r"it lacks concept_bank_w_"),
        (lambda a: {"crop_boxes_": a["crop_boxes_"] + [0, 100, 0, 0]},
         r"crop_boxes_ point outside the 16 saved images"),
        (lambda a: {"crops_u_": a["crops_u_"][:, :1]}, r"crops_u_ .* must be \(n_crops, 2\)"),
        (lambda a: {"concept_bank_w_": a["concept_bank_w_"] * np.nan},
         r"concept_bank_w_ holds NaN"),
        (lambda a: {"importances_": np.ones(5)}, r"importances_ has shape \(5,\), expected"),
    ],
    ids=["missing", "boxes", "shapes", "nan", "importances"],
)
def test_inconsistent_arrays_are_refused_naming_the_file(fitted_tree, tmp_path, change, message):
    craft, _, model = fitted_tree
    craft.save(tmp_path / "r")
    _rewrite_arrays(tmp_path / "r", **change(dict(np.load(tmp_path / "r" / io.ARRAYS_FILE))))
    with pytest.raises(ValueError, match=r"The file .*arrays.npz' is inconsistent: " + message):
        CraftTf.load(tmp_path / "r", craft.input_to_latent_model, craft.latent_to_logit_model,
                     model=model)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m["params"].update(number_of_concepts=7),
         r"metadata says number_of_concepts = 7, concept_bank_w_ has 2 rows"),
        (lambda m: m.pop("params"), r"must hold `params` as a JSON dict, got nothing"),
        (lambda m: m.update(format_version="1"),
         r"must have an integer `format_version` >= 1, got '1'"),
        (lambda m: m.pop("format_version"),
         r"must have an integer `format_version` >= 1, got None"),
    ],
    ids=["rank", "params", "version-string", "version-missing"],
)
def test_inconsistent_metadata_is_refused(fitted_tree, tmp_path, edit, message):
    craft, _, model = fitted_tree
    craft.save(tmp_path / "r")
    path = tmp_path / "r" / io.METADATA_FILE
    metadata = json.loads(path.read_text())
    edit(metadata)
    path.write_text(json.dumps(metadata))
    with pytest.raises(ValueError, match=message):
        CraftTf.load(tmp_path / "r", craft.input_to_latent_model, craft.latent_to_logit_model,
                     model=model)


@pytest.mark.parametrize(("name", "content", "message"), [
    (io.ARRAYS_FILE, b"", r"arrays.npz' is not a readable npz archive"),
    (io.ARRAYS_FILE, b"PK\x03\x04\x14", r"arrays.npz' is not a readable npz archive"),
    (io.METADATA_FILE, b"{", r"metadata.json' is not valid JSON"),
    (io.METADATA_FILE, b"[]", r"metadata.json' must hold a JSON object, got a JSON list"),
], ids=["empty-npz", "truncated-npz", "bad-json", "json-list"])
def test_corrupt_files_give_one_sentence(fitted_tree, tmp_path, name, content, message):
    craft, _, model = fitted_tree
    craft.save(tmp_path / "r")
    (tmp_path / "r" / name).write_bytes(content)
    with pytest.raises(ValueError, match=message):
        CraftTf.load(tmp_path / "r", craft.input_to_latent_model, craft.latent_to_logit_model,
                     model=model)


def test_save_never_replaces_a_users_directory(fitted_tree, tmp_path):
    craft, _, model = fitted_tree
    folder = tmp_path / "my_project"
    folder.mkdir()
    (folder / "train.py").write_text("print('mine')")
    with pytest.raises(ValueError, match=r"which holds other files \(train.py\)"):
        craft.save(folder)
    assert os.listdir(folder) == ["train.py"]
    craft.save(folder, overwrite=True)
    assert (folder / "train.py").read_text() == "print('mine')"
    craft.save(folder)  # now an xcraft result: replaced again, the user's file still kept
    assert sorted(os.listdir(folder)) == sorted([*io.OWN_NAMES, "train.py"])
    loaded = CraftTf.load(folder, craft.input_to_latent_model, craft.latent_to_logit_model,
                          model=model)
    np.testing.assert_array_equal(loaded.concept_bank_w, craft.concept_bank_w)


def test_decompositions_of_a_softmax_model_load_in_the_same_process(tmp_path):
    """The case of every pretrained classifier: `from_model` explains the logits of a model
    ending in a softmax, and loading again in the same process (where Keras numbers the new
    input layers input_layer_2, ...) must re-split the given classifier the same way."""
    images, _ = _synthetic.make_motif_images(12, motifs=("red", "green"), seed=4)
    logits = _synthetic.make_parts_model()
    probabilities = keras.Model(
        logits.inputs, keras.layers.Activation("softmax", name="probs")(logits.outputs[0]))
    with pytest.warns(UserWarning, match="explains its logits"):
        craft = CraftTf.from_model(probabilities, _synthetic.FEATURE_LAYER,
                                   number_of_concepts=2, patch_size=12, random_state=1,
                                   verbose=False)
    craft.fit(images, class_id=0)
    craft.decompose(0, "parts", number_of_concepts=2, percentile=50, nb_design=8)
    craft.save(tmp_path / "result")
    g, h = split_model(probabilities, _synthetic.FEATURE_LAYER)  # not the logits: refused
    with pytest.raises(ValueError, match="are not the ones it was saved with"):
        CraftTf.load(tmp_path / "result", g, h, model=probabilities)
    loaded = CraftTf.load(tmp_path / "result", craft.input_to_latent_model,
                          craft.latent_to_logit_model, model=probabilities)
    child, loaded_child = craft.children_[0], loaded.children_[0]
    np.testing.assert_array_equal(loaded_child.concept_bank_w, child.concept_bank_w)
    np.testing.assert_allclose(loaded_child.latent_to_logit_model(
        loaded_child.input_to_latent_model(images[:3])), child.latent_to_logit_model(
        child.input_to_latent_model(images[:3])), rtol=1e-6, atol=1e-6)
