"""`xcraft sweep` on a transformer's token layer: --cls-token, --token-grid and report.html."""

import contextlib
import io
import json
import re

import numpy as np
import pytest

from tests._vit import trained_vit
from xcraft.cli import main
from xcraft.craft.sweep import sweep


def _run(argv):
    stdout, stderr = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(stdout), contextlib.redirect_stderr(stderr):
        code = main([str(arg) for arg in argv])
    return code, stdout.getvalue(), stderr.getvalue()


@pytest.fixture(scope="module")
def vit_files(tmp_path_factory):
    model, images, labels, _, _, _ = trained_vit()
    folder = tmp_path_factory.mktemp("vit")
    model.save(folder / "vit.keras")
    chosen = images[np.flatnonzero(labels == 1)[:24]]
    np.savez(folder / "images.npz", images=chosen)
    return model, chosen, folder


def test_the_sweep_command_on_a_token_layer_writes_the_direct_sweep_and_its_page(vit_files,
                                                                                  tmp_path):
    model, images, folder = vit_files
    code, stdout, stderr = _run([
        "sweep", "--model", folder / "vit.keras", "--images", folder / "images.npz",
        "--class-id", "1", "--layers", "block1", "--ranks", "2", "4", "--seeds", "2",
        "--patch-size", "16", "--cls-token", "1", "--token-grid", "8", "8",
        "--out", tmp_path / "sweep", "--quiet"])
    assert code == 0, stderr
    saved = json.loads((tmp_path / "sweep" / "sweep.json").read_text())
    # One CLS token excluded on an 8 x 8 grid is what "exclude" means at this layer.
    direct = sweep(model, ["block1"], images, 1, ranks=(2, 4), n_seeds=2, patch_size=16,
                   cls_token="exclude")
    for got, expected in zip(saved["rows"], direct["rows"], strict=True):
        assert (got["layer"], got["rank"]) == (expected["layer"], expected["rank"])
        np.testing.assert_allclose(got["relative_error"], expected["relative_error"], rtol=1e-5)
        assert got["top1_agreement"] == expected["top1_agreement"]
    assert saved["recommendation"] == direct["recommendation"]
    page = (tmp_path / "sweep" / "report.html").read_text()
    best = direct["recommendation"]
    assert re.search(r"<strong>(Recommended: layer|No candidate met the rule; the best available "
                     rf"is layer) <code>block1</code> with {best['rank']} concepts", page)
    assert page.count("<tr") == 3 and 'src="data:image/png;base64,' in page
    assert f"layer {best['layer']!r} with {best['rank']} concepts" in stdout


def test_a_bad_cls_token_is_one_error_line(vit_files, tmp_path):
    _, _, folder = vit_files
    code, _, stderr = _run([
        "sweep", "--model", folder / "vit.keras", "--images", folder / "images.npz",
        "--class-id", "1", "--layers", "block1", "--cls-token", "first",
        "--out", tmp_path / "sweep"])
    lines = [line for line in stderr.splitlines() if line.strip()]
    assert code != 0 and len(lines) == 1
    assert lines[0] == ("xcraft: error: `cls_token` must be one of 'auto', 'exclude', 'keep' or "
                        "an int count of leading tokens, got 'first'.")
    assert not (tmp_path / "sweep").exists()


def test_one_seed_writes_strict_json(vit_files, tmp_path):
    _, _, folder = vit_files
    code, _, stderr = _run([
        "sweep", "--model", folder / "vit.keras", "--images", folder / "images.npz",
        "--class-id", "1", "--layers", "block1", "--ranks", "2", "--seeds", "1",
        "--patch-size", "16", "--out", tmp_path / "sweep", "--quiet"])
    assert code == 0, stderr
    text = (tmp_path / "sweep" / "sweep.json").read_text()
    assert "NaN" not in text  # a NaN would make the file unreadable outside Python
    (row,) = json.loads(text)["rows"]
    assert row["stability"] is None and 0 < row["relative_error"] < 1
    assert "<td class=\"num\">–</td>" in (tmp_path / "sweep" / "report.html").read_text()
