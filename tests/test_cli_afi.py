"""``xcraft afi``, run in-process on the shipped demo model with tiny settings."""

import argparse
import json

import numpy as np
import pytest
from PIL import Image

from xcraft.cli import CliError
from xcraft.cli_afi import add_afi_command
from xcraft.datasets import load_demo_data


def _parse(argv):
    parser = argparse.ArgumentParser(prog="xcraft")
    add_afi_command(parser.add_subparsers(dest="command"))
    return parser.parse_args(argv)


@pytest.fixture(scope="module")
def probe_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("afi_cli")
    images, labels, _ = load_demo_data()
    for name, class_id in (("trousers", 1), ("bags", 8)):
        folder = root / "probes" / name
        folder.mkdir(parents=True)
        for i, image in enumerate(images[labels == class_id][:6]):
            Image.fromarray(np.uint8(np.round(image[..., 0] * 255))).save(folder / f"{i}.png")
    random = np.uint8(np.round(images[labels == 0][:12] * 255))
    np.savez(root / "random.npz", images=random)
    return root


def test_afi_command_writes_the_report(probe_dirs, tmp_path, capsys):
    argv = ["afi", "--model", "demo", "--layers", "pool2", "fc1", "--class-id", "1",
            "--max-images", "12", "--max-steps", "40", "--probes", str(probe_dirs / "probes"),
            "--random", str(probe_dirs / "random.npz"), "--n-permutations", "20",
            "--n-random-sets", "2", "--impression-steps", "3", "--out", str(tmp_path / "out"),
            "--quiet", "--save"]
    args = _parse(argv)
    summary = args.run(args, argv)
    args.print_summary(summary, args.out, 1.0)
    written = json.loads((tmp_path / "out" / "afi_summary.json").read_text())
    assert written["afi"]["class_id"] == 1
    assert set(written["afi"]["channel_importance"]) == {"pool2", "fc1"}
    names = [c["name"] for c in written["afi"]["concepts"]["concepts"]]
    assert sorted(names) == ["bags", "trousers"]
    assert (tmp_path / "out" / "afi_report.html").is_file()
    assert (tmp_path / "out" / "afi_estimator" / "arrays.npz").is_file()
    out = capsys.readouterr().out
    assert "flip rate" in out and "trousers" in out


def test_probes_without_random_is_refused(probe_dirs, tmp_path):
    argv = ["afi", "--model", "demo", "--layers", "pool2", "--class-id", "1",
            "--probes", str(probe_dirs / "probes"), "--out", str(tmp_path)]
    args = _parse(argv)
    with pytest.raises(CliError, match=r"--probes and --random go together"):
        args.run(args, argv)


def test_images_required_for_a_model_file(tmp_path):
    argv = ["afi", "--model", str(tmp_path / "m.keras"), "--layers", "x", "--class-id", "0"]
    args = _parse(argv)
    with pytest.raises(CliError, match=r"does not exist"):
        args.run(args, argv)
