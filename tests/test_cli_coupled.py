"""``xcraft coupled``, run in-process through ``main`` on the embedded demo and on a tiny model."""

import base64
import contextlib
import io
import json
import re

import keras
import numpy as np
import pytest
from PIL import Image

from xcraft.cli import build_parser, main
from xcraft.cli_coupled import FIT_DIR
from xcraft.coupled import CoupledNMF, build_blocks
from xcraft.coupled.analysis import top_examples
from xcraft.coupled.io import load_coupled
from xcraft.datasets import load_demo_data, load_demo_model

# Small enough for a few seconds per run: 200 of the 2000 demo images, 20 per class.
DEMO_ARGS = ["coupled", "--n-images", "200", "-d", "4", "--max-iter", "30", "--n-top", "3",
             "--quiet"]


def _run(argv):
    """Run the command, returning (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def _error(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("xcraft: error: ")
    return lines[0][len("xcraft: error: "):]


def _report_images(out):
    page = (out / "coupled_report.html").read_text(encoding="utf-8")
    sources = re.findall(r'<img alt="([^"]+)" src="data:image/png;base64,([^"]+)"', page)
    for _, data in sources:
        Image.open(io.BytesIO(base64.b64decode(data, validate=True))).verify()
    return [alt for alt, _ in sources]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("coupled") / "report"
    code, stdout, stderr = _run([*DEMO_ARGS, "--out", out])
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def rgb_model(tmp_path_factory):
    """A tiny RGB classifier saved as .keras: conv0 -> pool -> conv1 -> gap -> 3 logits."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv0")(inputs)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.Conv2D(6, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path


def test_demo_writes_the_report_the_summary_and_the_fit(demo_run):
    code, stdout, stderr, out = demo_run
    assert code == 0, stderr
    assert stderr == ""  # --quiet
    summary = json.loads((out / "coupled_summary.json").read_text(encoding="utf-8"))
    entry = summary["coupled"]
    assert entry["n_examples"] == 200 and entry["n_components"] == 4
    assert list(entry["blocks"]) == ["pixels", "pool1", "pool2"]
    assert [entry["blocks"][n]["columns"] for n in entry["blocks"]] == [784, 6272, 3136]
    assert entry["classes"]["names"][1] == "Trouser"
    assert entry["classes"]["knn_agreement"] > 3 * entry["classes"]["knn_chance"]
    assert summary["settings"]["n_components"] == 4 and "print_summary" not in summary["settings"]
    assert _report_images(out) == [
        "class mass of the factors", "top images of the factors", "pixel masks of the factors",
        "factor similarity per layer", "cosine eigenvalues across layers"]
    # The printed summary: every block's error, the purity, where the files went.
    for name, block in entry["blocks"].items():
        assert re.search(rf"{name}\s+{block['columns']}\s+{block['relative_error']:.3f}", stdout)
    assert f"factor purity: mean {entry['classes']['mean_purity']:.3f}" in stdout
    assert str(out / "coupled_report.html") in stdout and str(out / FIT_DIR) in stdout


def test_the_saved_fit_is_the_fit_of_the_stated_settings(demo_run):
    code, _, stderr, out = demo_run
    assert code == 0, stderr
    loaded, blocks = load_coupled(out / FIT_DIR)
    summary = json.loads((out / "coupled_summary.json").read_text(encoding="utf-8"))["coupled"]
    # The report and the saved fit describe the same estimator, to the last bit.
    assert loaded.block_errors_ == {n: b["relative_error"] for n, b in summary["blocks"].items()}
    np.testing.assert_array_equal(top_examples(loaded.examples_, k=3), summary["top_examples"])
    assert blocks.sources == {"pixels": "pixels", "pool1": "pool1", "pool2": "pool2"}
    assert blocks.shapes["pool1"] == (14, 14, 32)
    # And that estimator is what the options say: 200 evenly spaced images, d = 4, seed 0.
    images, _, _ = load_demo_data()
    keep = np.linspace(0, len(images) - 1, 200).round().astype(int)
    again = CoupledNMF(4, max_iter=30, random_state=0).fit(
        build_blocks(load_demo_model(), ["pool1", "pool2"], images[keep]))
    assert loaded.get_params() == again.get_params()
    np.testing.assert_allclose(loaded.examples_, again.examples_, rtol=1e-5, atol=1e-7)
    for name, w in again.components_.items():
        np.testing.assert_allclose(loaded.components_[name], w, rtol=1e-5, atol=1e-7)


def test_a_second_run_replaces_the_first_in_place(demo_run):
    code, _, stderr, out = demo_run
    assert code == 0, stderr
    code, stdout, stderr = _run(["coupled", "--n-images", "40", "-d", "2", "--max-iter", "3",
                                 "--no-pixels", "--layers", "pool2", "--quiet", "--out", out])
    assert code == 0, stderr
    loaded, _ = load_coupled(out / FIT_DIR)
    assert list(loaded.components_) == ["pool2"] and loaded.examples_.shape == (40, 2)


def test_a_bad_layer_is_refused_naming_the_valid_ones(tmp_path):
    code, stdout, stderr = _run(["coupled", "--layers", "pool1", "nope", "--quiet",
                                 "--out", tmp_path / "o"])
    assert code == 2 and stdout == ""
    message = _error(stderr)
    assert message.startswith("--layers: `layers` entry 'nope': `layer` must be one of the "
                              "model's layers (")
    assert all(name in message for name in ("conv1", "pool1", "pool2", "fc1", "logits"))
    assert not (tmp_path / "o").exists()


def test_a_signed_layer_is_refused_pointing_to_post_relu_layers(tmp_path):
    code, _, stderr = _run(["coupled", "--layers", "logits", "--n-images", "20", "--quiet",
                            "--out", tmp_path / "o"])
    assert code == 2
    message = _error(stderr)
    assert "layer 'logits' must be non-negative for the coupled NMF" in message
    assert "Post-ReLU layers of the model: " in message and "'pool2'" in message


def test_a_user_model_on_class_folders(rgb_model, tmp_path):
    rng = np.random.default_rng(0)
    for name in ("cats", "dogs"):
        folder = tmp_path / "images" / name
        folder.mkdir(parents=True)
        for i in range(6):
            pixels = rng.integers(0, 256, size=(20, 20, 3), dtype=np.uint8)  # resized to 12
            Image.fromarray(pixels).save(folder / f"{i}.png")
    out = tmp_path / "out"
    code, stdout, stderr = _run(["coupled", "--model", rgb_model, "--layers", "conv0", "conv1",
                                 "--images", tmp_path / "images", "--preprocess=-1-1", "-d", "3",
                                 "--max-iter", "10", "--pool", "avg", "--weights", "uniform",
                                 "--rank-curve", "2", "3", "--quiet", "--out", out])
    assert code == 0, stderr
    entry = json.loads((out / "coupled_summary.json").read_text(encoding="utf-8"))["coupled"]
    assert list(entry["blocks"]) == ["pixels_r", "pixels_g", "pixels_b", "conv0", "conv1"]
    assert entry["blocks"]["conv1"]["columns"] == 6  # avg pooling: one column per channel
    assert set(entry["blocks"][n]["weight"] for n in entry["blocks"]) == {1.0}
    assert entry["classes"]["names"] == ["cats", "dogs"]
    assert entry["rank_curve"]["ranks"] == [2, 3]
    assert "rank curve: d=2: " in stdout and "cats" in stdout
    loaded, blocks = load_coupled(out / FIT_DIR)
    assert blocks.pool == "avg" and loaded.solver == "hals"


def test_an_npz_with_labels_class_names_and_block_weights(rgb_model, tmp_path):
    rng = np.random.default_rng(1)
    path = tmp_path / "images.npz"
    np.savez(path, images=rng.integers(0, 256, size=(15, 12, 12, 3), dtype=np.uint8),
             labels=np.arange(15) % 3)
    weights = ["pixels_r=1", "pixels_g=1", "pixels_b=1", "conv1=2.5"]
    code, stdout, stderr = _run(["coupled", "--model", rgb_model, "--layers", "conv1",
                                 "--images", path, "--class-names", "a", "b", "c", "-d", "2",
                                 "--max-iter", "5", "--solver", "mu", "--weights", *weights,
                                 "--quiet", "--out", tmp_path / "out"])
    assert code == 0, stderr
    loaded, _ = load_coupled(tmp_path / "out" / FIT_DIR)
    assert loaded.weights_ == {"pixels_r": 1.0, "pixels_g": 1.0, "pixels_b": 1.0, "conv1": 2.5}
    assert loaded.solver == "mu"
    summary = json.loads((tmp_path / "out" / "coupled_summary.json").read_text("utf-8"))
    assert summary["coupled"]["classes"]["names"] == ["a", "b", "c"]


@pytest.mark.parametrize(("extra", "message"), [
    (["--model", "m.keras"], r"--model needs --layers: the layers to analyse \(after a ReLU\)\."),
    (["--preprocess", "0-1"], r"--preprocess applies to --images files; the embedded images"),
    (["--rank-curve", "5", "3"], r"--rank-curve must be increasing without repeats, got 5 3\."),
    (["--n-images", "5", "-d", "6"],
     r"--n-components must be <= min\(images, block columns\) = 5, got 6\."),
    (["--n-images", "5", "-d", "2", "--weights", "pixels=1", "pool2=2"],
     r"--weights must give BLOCK=ALPHA for exactly the blocks pixels, pool1, pool2; unknown "
     r"\[\], missing \['pool1'\]\."),
    (["--n-images", "5", "-d", "2", "--weights", "uniform", "pool2=2"],
     r"--weights must be one of frobenius, uniform alone, or BLOCK=ALPHA for every block"),
    (["--images", "missing.npz"], r"the images path 'missing.npz' does not exist\."),
    (["--class-names", "a"], r"--class-names must name the 10 classes 0\.\.9, got 1 names\."),
])
def test_bad_options_are_refused_in_one_line(extra, message, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    code, _, stderr = _run(["coupled", "--quiet", "--out", tmp_path / "o", *extra])
    assert code == 2
    assert re.search(message, _error(stderr)), stderr


@pytest.mark.parametrize("value", ["heavy", "pool1=-1", "=2", "pool1=x"])
def test_malformed_weights_are_usage_errors(value, capsys):
    assert main(["coupled", "--weights", value]) == 2
    assert "must be 'frobenius', 'uniform' or BLOCK=ALPHA with ALPHA > 0" in capsys.readouterr().err


def test_help_explains_every_option():
    code, stdout, _ = _run(["coupled", "--help"])
    assert code == 0
    commands = next(a for a in build_parser()._actions if a.dest == "command")
    for action in commands.choices["coupled"]._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in stdout
    code, stdout, _ = _run(["--help"])
    assert code == 0 and "coupled" in stdout
