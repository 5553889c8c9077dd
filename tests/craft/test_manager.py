import numpy as np
import pytest

from tests import _synthetic
from xcraft.craft.manager import CraftManagerTf
from xcraft.plumbing.split import split_model


@pytest.fixture(scope="module")
def labelled_set():
    """Two classes by construction: red-motif images (class 0), green-only images (class 1)."""
    red, _ = _synthetic.make_motif_images(12, motifs=("red",), seed=4)
    green, _ = _synthetic.make_motif_images(12, motifs=("green",), seed=5)
    images = np.concatenate([red, green])
    labels = np.repeat([0, 1], 12)
    return images, labels


@pytest.fixture(scope="module")
def split():
    # A heavy red weight makes every red-motif image predicted as class 0, the rest as class 1.
    return split_model(_synthetic.make_motif_model(red_weight=20.0), _synthetic.FEATURE_LAYER)


def _manager(split, images, labels, **kwargs):
    g, h = split
    return CraftManagerTf(g, h, images, labels, number_of_concepts=2, patch_size=12,
                          random_state=0, verbose=False, **kwargs)


def test_labels_choose_the_images(split, labelled_set):
    images, labels = labelled_set
    manager = _manager(split, images, labels).fit()
    assert sorted(manager.craft_instances) == [0, 1]
    np.testing.assert_array_equal(manager.craft_instances[1].images_, images[12:])
    importances = manager.estimate_importance(nb_design=8)
    assert set(importances) == {0, 1} and importances[0].shape == (2,)


def test_predictions_choose_the_images(split, labelled_set):
    images, labels = labelled_set
    manager = _manager(split, images, np.zeros(len(images), int), use_predictions=True,
                       list_of_class_of_interest=[0, 1])
    predictions = manager.compute_predictions()
    np.testing.assert_array_equal(predictions, labels)
    manager.fit()
    for class_id in (0, 1):
        np.testing.assert_array_equal(manager.craft_instances[class_id].images_,
                                      images[predictions == class_id])
    by_labels = _manager(split, images, np.zeros(len(images), int))
    assert list(by_labels.craft_instances) == [0]  # labels alone: one class


def test_executor_is_used(split, labelled_set):
    images, labels = labelled_set
    calls = []

    def executor(function, items):
        items = list(items)
        calls.append(items)
        return map(function, items)

    _manager(split, images, labels, executor=executor).fit(nb_samples_per_class=4)
    assert calls == [[0, 1]]


def test_a_thread_pool_gives_the_in_turn_results(split, labelled_set):
    import concurrent.futures

    images, labels = labelled_set
    in_turn = _manager(split, images, labels, executor="inprocess").fit(nb_samples_per_class=6)
    with concurrent.futures.ThreadPoolExecutor(2) as pool:
        threaded = _manager(split, images, labels, executor=pool).fit(nb_samples_per_class=6)
        importances = threaded.estimate_importance(nb_design=8)
    expected = in_turn.estimate_importance(nb_design=8)
    for class_id in (0, 1):
        np.testing.assert_allclose(threaded.craft_instances[class_id].concept_bank_w_,
                                   in_turn.craft_instances[class_id].concept_bank_w_,
                                   rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(importances[class_id], expected[class_id], rtol=1e-4,
                                   atol=1e-6)


def test_executors_of_other_processes_point_to_explain_classes(split, labelled_set):
    import concurrent.futures
    import multiprocessing

    images, labels = labelled_set
    with pytest.raises(ValueError, match="explain_classes"):
        _manager(split, images, labels, executor="ray").fit(nb_samples_per_class=4)
    pool = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(
        "spawn"))
    with pool, pytest.raises(ValueError, match="explain_classes"):
        _manager(split, images, labels, executor=pool).fit(nb_samples_per_class=4)
    with pytest.raises(TypeError, match="executor"):
        _manager(split, images, labels, executor="dask").fit(nb_samples_per_class=4)


def test_save_load(split, labelled_set, tmp_path):
    images, labels = labelled_set
    manager = _manager(split, images, labels).fit(nb_samples_per_class=6)
    manager.estimate_importance(nb_design=8)
    manager.save(tmp_path / "m")
    g, h = split
    loaded = CraftManagerTf.load(tmp_path / "m", g, h, images)
    for class_id in (0, 1):
        np.testing.assert_array_equal(loaded.craft_instances[class_id].importances,
                                      manager.craft_instances[class_id].importances)
    # A user's folder is refused, then written into with overwrite=True, its files kept.
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.md").write_text("keep")
    with pytest.raises(ValueError, match=r"which holds other files \(notes.md\)"):
        manager.save(mine)
    manager.save(mine, overwrite=True)
    manager.save(mine)  # an earlier manager result now: replaced, notes kept
    assert (mine / "notes.md").read_text() == "keep"
    assert sorted(p.name for p in mine.iterdir()) == ["class_0", "class_1", "labels.npz",
                                                      "manager.json", "notes.md"]
    (tmp_path / "m" / "labels.npz").write_bytes(b"")
    with pytest.raises(ValueError, match=r"labels.npz' is not a readable npz archive"):
        CraftManagerTf.load(tmp_path / "m", g, h, images)


def test_bad_labels(split, labelled_set):
    images, _ = labelled_set
    with pytest.raises(ValueError, match=r"`labels` must have shape \(24,\) or \(24, n_classes\)"):
        _manager(split, images, np.zeros(5, int))


def test_class_without_images(split, labelled_set):
    images, labels = labelled_set
    manager = _manager(split, images, labels, list_of_class_of_interest=[0, 1, 2])
    with pytest.raises(ValueError, match=r"holds class 2, but no input is labelled 2\."):
        manager.fit()
