"""explain_classes: executors that agree bit for bit, resume after a kill, failures kept apart."""

import concurrent.futures
import html.parser
import json
import multiprocessing
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from xcraft.craft.runner import DONE_FILE, RUN_FILE, explain_classes, load_run
from xcraft.datasets import DEMO_LAYER, load_demo_data, load_demo_model

CLASSES = [1, 7, 8]
SETTINGS = dict(images_per_class=24, number_of_concepts=4, patch_size=12, nb_design=8,
                report_params={"fidelity": False}, progress=False)
COMPARED = ("concept_bank_w_", "crops_u_", "importances_", "crop_boxes_")


def _threads():
    """TensorFlow's default pool size in this process, which a worker must match bit for bit."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()


@pytest.fixture(scope="module")
def demo():
    images, labels, names = load_demo_data()
    keep = np.isin(labels, CLASSES)
    return load_demo_model(), images[keep], labels[keep], names


@pytest.fixture(scope="module")
def reference(demo, tmp_path_factory):
    model, images, labels, names = demo
    out = tmp_path_factory.mktemp("reference") / "run"
    result = explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, class_names=names,
                             **SETTINGS)
    return out, result


def _assert_same_classes(first, second, model, classes=CLASSES):
    for class_id in classes:
        a = load_run(first, class_id, model=model)
        b = load_run(second, class_id, model=model)
        for name in COMPARED:
            np.testing.assert_array_equal(getattr(a, name), getattr(b, name),
                                          err_msg=f"class {class_id}, {name}")


def test_run_writes_every_class_a_report_a_card_and_the_site(reference, demo):
    out, result = reference
    model = demo[0]
    assert result.done == CLASSES and result.skipped == [] and result.failed == {}
    run = json.loads((out / RUN_FILE).read_text())
    assert run["status"] == "finished" and run["done"] == CLASSES
    for class_id in CLASSES:
        folder = out / "classes" / f"class_{class_id}"
        for name in ("report.html", "summary.json", "card.json", DONE_FILE):
            assert (folder / name).is_file(), (class_id, name)
        craft = load_run(out, class_id, model=model)
        assert craft.class_id_ == class_id
        assert craft.concept_bank_w_.shape[0] == 4
        card = json.loads((folder / "card.json").read_text())
        top = card["concepts"][0]
        assert top["importance"] == pytest.approx(float(np.max(craft.importances_)), rel=1e-6)
    index = (out / "index.html").read_text()
    for class_id in CLASSES:
        assert f"classes/class_{class_id}/report.html" in index


class _Links(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.links = []

    def handle_starttag(self, tag, attrs):
        self.links += [value for name, value in attrs if name in ("href", "src") and value]


def test_every_link_of_the_site_resolves_and_nothing_is_external(reference):
    out, _ = reference
    pages = [out / "index.html", *sorted(out.glob("classes/class_*/report.html"))]
    assert len(pages) == 1 + len(CLASSES)
    for page in pages:
        text = page.read_text(encoding="utf-8")
        assert "http://" not in text and "https://" not in text, page
        parser = _Links()
        parser.feed(text)
        for link in parser.links:
            if link.startswith(("data:", "#")):
                continue
            target = (page.parent / link.split("#")[0]).resolve()
            assert target.is_file(), (page, link)


def test_one_class_alone_equals_the_same_class_in_a_run(reference, demo, tmp_path):
    # Each class depends only on its own images and the seed, not on the order or company.
    model, images, labels, names = demo
    out, _ = reference
    explain_classes(model, DEMO_LAYER, images, labels, [8], tmp_path / "alone", **SETTINGS)
    _assert_same_classes(out, tmp_path / "alone", model, classes=[8])


@pytest.mark.slow  # two spawned interpreters that each import TensorFlow: ~18 s
def test_spawned_process_pool_gives_the_in_process_results_bit_for_bit(reference, demo,
                                                                         tmp_path):
    model, images, labels, names = demo
    out, _ = reference
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=context) as pool:
        result = explain_classes(model, DEMO_LAYER, images, labels, CLASSES, tmp_path / "pool",
                                 class_names=names, executor=pool, cpus_per_worker=_threads(),
                                 **SETTINGS)
    assert result.done == CLASSES and result.failed == {}
    # The in-memory model crossed the process boundary as one file saved under .work, which
    # goes once every class is done.
    assert not (tmp_path / "pool" / ".work").exists()
    _assert_same_classes(out, tmp_path / "pool", model)


def test_rerun_skips_done_classes_and_redoes_changed_or_unfinished_ones(reference, demo,
                                                                          tmp_path):
    model, images, labels, _ = demo
    out = tmp_path / "run"
    shutil.copytree(reference[0], out)
    again = explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, **SETTINGS)
    assert again.done == [] and again.skipped == CLASSES
    os.remove(out / "classes" / "class_7" / DONE_FILE)  # as if its save had never finished
    partial = explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, **SETTINGS)
    assert partial.done == [7] and partial.skipped == [1, 8]
    _assert_same_classes(reference[0], out, model)
    changed = explain_classes(model, DEMO_LAYER, images, labels, [1], out,
                              **{**SETTINGS, "nb_design": 4})
    assert changed.done == [1] and changed.skipped == []
    other_images = images.copy()
    other_images[labels == 8] = other_images[labels == 8][::-1]
    moved = explain_classes(model, DEMO_LAYER, other_images, labels, [7, 8], out, **SETTINGS)
    assert moved.skipped == [7] and moved.done == [8]


def _images_failing_for_7(class_id, _cache={}):  # noqa: B006 - a per-process memo on purpose
    if class_id == 7:
        raise OSError("the disk holding class 7 is gone")
    if not _cache:
        images, labels, _ = load_demo_data()
        _cache.update(images=images, labels=labels)
    return _cache["images"][_cache["labels"] == class_id][:24]


def test_a_failing_class_is_reported_with_its_id_and_the_others_are_kept(demo, tmp_path,
                                                                          capsys):
    model = demo[0]
    settings = {key: value for key, value in SETTINGS.items() if key != "images_per_class"}
    result = explain_classes(model, DEMO_LAYER, _images_failing_for_7, None, CLASSES,
                             tmp_path / "run", **settings)
    assert result.done == [1, 8]
    assert list(result.failed) == [7] and "disk holding class 7" in result.failed[7]
    assert "class 7" in capsys.readouterr().err
    run = json.loads((tmp_path / "run" / RUN_FILE).read_text())
    assert list(run["failed"]) == ["7"] and run["done"] == [1, 8]
    assert not (tmp_path / "run" / "classes" / "class_7").exists()
    site = json.loads((tmp_path / "run" / "site.json").read_text())
    assert 7 in site["missing"]


KILLED_RUN = textwrap.dedent("""
    import sys
    import numpy as np
    from xcraft.craft.runner import explain_classes
    from xcraft.datasets import DEMO_LAYER, load_demo_data, load_demo_model
    images, labels, names = load_demo_data()
    keep = np.isin(labels, {classes})
    explain_classes(load_demo_model(), DEMO_LAYER, images[keep], labels[keep], {classes},
                    sys.argv[1], **{settings})
""")


def test_sigkill_loses_only_the_class_in_flight_and_the_rerun_finishes(reference, demo,
                                                                       tmp_path):
    model, images, labels, _ = demo
    out = tmp_path / "run"
    settings = {**SETTINGS, "site": False}
    script = KILLED_RUN.format(classes=CLASSES, settings=repr(settings))
    child = subprocess.Popen([sys.executable, "-c", script, str(out)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    first = out / "classes" / "class_1" / DONE_FILE
    deadline = time.monotonic() + 240
    while not first.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)
    assert first.exists(), "the child run never finished its first class"
    child.send_signal(signal.SIGKILL)
    child.wait()
    finished = sorted(int(name.split("_")[1]) for name in os.listdir(out / "classes")
                      if name.startswith("class_"))
    assert 1 in finished and len(finished) < len(CLASSES)  # killed mid-run
    for name in os.listdir(out / "classes"):
        if name.startswith("class_"):  # every visible class is whole
            assert (out / "classes" / name / DONE_FILE).is_file()
    resumed = explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, **settings)
    assert resumed.skipped == finished
    assert sorted(resumed.done) == sorted(set(CLASSES) - set(finished))
    assert not [name for name in os.listdir(out / "classes") if ".tmp-" in name]
    _assert_same_classes(reference[0], out, model)


@pytest.mark.slow
def test_ray_actors_give_the_in_process_results_bit_for_bit(reference, demo, tmp_path):
    ray = pytest.importorskip("ray")
    model, images, labels, names = demo
    path = tmp_path / "model.keras"
    model.save(path)
    try:
        result = explain_classes(str(path), DEMO_LAYER, images, labels, CLASSES,
                                 tmp_path / "ray", class_names=names, executor="ray",
                                 num_workers=1, cpus_per_worker=_threads(), **SETTINGS)
    finally:
        ray.shutdown()
    assert result.done == CLASSES and result.failed == {}
    _assert_same_classes(reference[0], tmp_path / "ray", model)


def test_bad_arguments_are_refused_before_any_class_runs(demo, tmp_path):
    model, images, labels, _ = demo
    out = tmp_path / "run"
    with pytest.raises(ValueError, match="executor"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, executor="dask")
    with pytest.raises(TypeError, match="executor"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, executor=map)
    fork = concurrent.futures.ProcessPoolExecutor(1, mp_context=multiprocessing.get_context(
        "fork"))
    with fork, pytest.raises(ValueError, match="spawn"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out, executor=fork)
    with pytest.raises(ValueError, match="labels"):
        explain_classes(model, DEMO_LAYER, images, None, CLASSES, out)
    with pytest.raises(ValueError, match="no image is labelled 3"):
        explain_classes(model, DEMO_LAYER, images, labels, [1, 3], out)
    with pytest.raises(TypeError, match="random_state"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out,
                        random_state=np.random.default_rng(0))
    with pytest.raises(ValueError, match="does not exist"):
        explain_classes(str(tmp_path / "missing.keras"), DEMO_LAYER, images, labels, CLASSES,
                        out)
    with pytest.raises(ValueError, match="craft_params"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, out,
                        craft_params={"patch_size": 3})
    (tmp_path / "foreign").mkdir()
    (tmp_path / "foreign" / "notes.txt").write_text("mine")
    with pytest.raises(ValueError, match="other files"):
        explain_classes(model, DEMO_LAYER, images, labels, CLASSES, tmp_path / "foreign")
    assert not out.exists()
