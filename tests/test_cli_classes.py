"""`xcraft explain --classes / --all-classes`: a resumable many-class run and its site."""

import contextlib
import io
import json
import os

import keras
import numpy as np
import pytest
from PIL import Image

from xcraft.cli import main
from xcraft.cli_classes import FolderClassImages, parse_classes
from xcraft.craft.runner import load_run


def _run(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in argv])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def model_path(tmp_path_factory):
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(4, name="logits")(x)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def npz_path(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "images.npz"
    labels = np.repeat([0, 1, 3], 6)
    np.savez(path, images=rng.integers(0, 256, size=(18, 16, 16, 3), dtype=np.uint8),
             labels=labels)
    return path


def _args(model, images, out, *extra):
    return ["explain", "--model", model, "--layer", "pool", "--images", images, "--out", out,
            "--number-of-concepts", "2", "--nb-design", "4", "--n-bootstrap", "0",
            "--patch-size", "8", "--no-fidelity", "--quiet", *extra]


def test_parse_classes_reads_ranges_and_lists():
    assert parse_classes("0-3,7, 9") == [0, 1, 2, 3, 7, 9]
    assert parse_classes("5,5,2") == [5, 2]
    for bad in ("3-1", "a", "", "-2"):
        with pytest.raises(Exception, match="--classes"):
            parse_classes(bad)


def test_all_classes_of_an_npz_then_a_rerun_skips_them(model_path, npz_path, tmp_path):
    out = tmp_path / "run"
    code, stdout, stderr = _run(_args(model_path, npz_path, out, "--all-classes"))
    assert code == 0, stderr
    assert "3 classes explained, 0 already done, 0 failed" in stdout
    run = json.loads((out / "run.json").read_text())
    assert run["done"] == [0, 1, 3]  # the labelled classes; class 2 has no image
    index = (out / "index.html").read_text()
    assert all(f"classes/class_{k}/report.html" in index for k in (0, 1, 3))
    craft = load_run(out, 3, model=keras.models.load_model(model_path))
    assert len(craft.images_) == 6
    code, stdout, _ = _run(_args(model_path, npz_path, out, "--all-classes"))
    assert code == 0 and "0 classes explained, 3 already done" in stdout
    assert not (out / ".work").exists()  # worker copies are gone once every class is done


def test_class_subfolders_are_classes_in_sorted_order(model_path, tmp_path):
    rng = np.random.default_rng(1)
    root = tmp_path / "images"
    for name in ("b_second", "a_first"):
        (root / name).mkdir(parents=True)
        for i in range(4):
            Image.fromarray(rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)).save(
                root / name / f"{i}.png")
    out = tmp_path / "run"
    code, _, stderr = _run(_args(model_path, root, out, "--classes", "0-1"))
    assert code == 0, stderr
    cards = {k: json.loads((out / "classes" / f"class_{k}" / "card.json").read_text())
             for k in (0, 1)}
    assert cards[0]["class_name"] == "a_first" and cards[1]["class_name"] == "b_second"
    source = FolderClassImages(str(root), ("a_first", "b_second"), (16, 16), 3, "0-1", 10)
    images = source(1)
    assert images.shape == (4, 16, 16, 3) and 0.0 <= images.min() and images.max() <= 1.0
    before = source.fingerprint(1)
    Image.fromarray(np.zeros((20, 20, 3), np.uint8)).save(root / "b_second" / "0.png")
    os.utime(root / "b_second" / "0.png", ns=(1, 1))
    assert source.fingerprint(1) != before and source.fingerprint(0) == source.fingerprint(0)
    code, stdout, _ = _run(_args(model_path, root, out, "--classes", "0-1"))
    assert code == 0 and "1 classes explained, 1 already done" in stdout  # only the changed


@pytest.mark.parametrize("extra, message", [
    (("--classes", "1", "--class-id", "1"), "exactly one of"),
    (("--class-id", "1", "--workers", "2"), "--workers"),
    (("--classes", "0-9"), "the model has 4 outputs"),
    (("--classes", "2"), "labelled 2"),
    (("--classes", "1", "--class-name", "x"), "--class-name"),
])
def test_bad_many_class_options_give_one_error_line(model_path, npz_path, tmp_path, extra,
                                                    message):
    code, _, stderr = _run(_args(model_path, npz_path, tmp_path / "run", *extra))
    assert code == 2
    assert message in stderr and stderr.count("\n") == 1, stderr


def test_demo_all_classes_writes_the_site_of_the_ten_classes(tmp_path):
    out = tmp_path / "site"
    code, stdout, stderr = _run(["demo", "--all-classes", "--images-per-class", "6",
                                 "--number-of-concepts", "2", "--nb-design", "4",
                                 "--n-bootstrap", "0", "--sub-concepts", "0", "--no-fidelity",
                                 "--quiet", "--out", out])
    assert code == 0, stderr
    assert "10 classes explained" in stdout
    site = json.loads((out / "site.json").read_text())
    assert site["missing"] == []
    names = [json.loads((out / "classes" / f"class_{k}" / "card.json").read_text())["class_name"]
             for k in range(10)]
    assert names[1] == "Trouser" and names[9] == "Ankle boot"
