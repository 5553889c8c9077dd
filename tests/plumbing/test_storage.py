"""Atomic result directories: nothing lost, never half-written, stale temporaries cleaned."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from xcraft.plumbing import storage
from xcraft.plumbing.storage import atomic_directory, load_npz, read_json, recover_previous

MARKER = "metadata.json"
OWN = ("arrays.npz", MARKER, "children")


def _write_result(path, value, **kwargs):
    with atomic_directory(path, marker=MARKER, own_names=OWN, **kwargs) as tmp:
        with open(os.path.join(tmp, MARKER), "w") as file:
            json.dump({"format_version": 1, "value": value}, file)
        np.savez(os.path.join(tmp, "arrays.npz"), x=np.full(3, value))


def _value(path):
    return read_json(os.path.join(path, MARKER))["value"]


def test_replaces_an_earlier_result_and_keeps_the_users_files(tmp_path):
    target = tmp_path / "result"
    _write_result(target, 1)
    (target / "notes.txt").write_text("mine")
    (target / "children").mkdir()  # the old result's own: not carried over
    _write_result(target, 2)
    assert _value(target) == 2
    assert (target / "notes.txt").read_text() == "mine"
    assert sorted(os.listdir(target)) == ["arrays.npz", MARKER, "notes.txt"]
    assert sorted(os.listdir(tmp_path)) == ["result"]


def test_refuses_a_directory_that_is_not_a_result(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.png").write_bytes(b"\x89PNG")
    with pytest.raises(ValueError, match=r"`path` must be a new name, an empty directory or an "
                                         r"earlier result, got .*photos.*, which holds other "
                                         r"files \(cat.png\)"):
        _write_result(target, 1)
    assert os.listdir(target) == ["cat.png"]
    assert sorted(os.listdir(tmp_path)) == ["photos"]


def test_overwrite_writes_there_and_keeps_every_file(tmp_path):
    target = tmp_path / "photos"
    target.mkdir()
    (target / "cat.png").write_bytes(b"\x89PNG")
    _write_result(target, 5, overwrite=True)
    assert _value(target) == 5 and (target / "cat.png").read_bytes() == b"\x89PNG"


def test_overwrite_never_replaces_a_users_file_of_a_result_name(tmp_path):
    target = tmp_path / "mine"
    target.mkdir()
    (target / "arrays.npz").write_bytes(b"user data")
    with pytest.raises(ValueError, match=r"`path` holds 'arrays.npz', a name the result writes"):
        _write_result(target, 1, overwrite=True)
    assert (target / "arrays.npz").read_bytes() == b"user data"
    assert sorted(os.listdir(tmp_path)) == ["mine"]


def test_refuses_an_existing_file(tmp_path):
    (tmp_path / "f").write_text("x")
    with pytest.raises(ValueError, match=r"`path` must be a directory or a new name, got the "
                                         r"existing file"):
        _write_result(tmp_path / "f", 1)


@pytest.mark.parametrize("exchange", [True, False], ids=["renameat2", "fallback"])
def test_a_failure_at_the_swap_keeps_the_old_result(tmp_path, monkeypatch, exchange):
    target = tmp_path / "result"
    _write_result(target, 1)
    if not exchange:
        monkeypatch.setattr(storage, "_exchange", lambda first, second: False)
    real_replace = os.replace

    def replace_then_die(src, dst):
        real_replace(src, dst)
        raise KeyboardInterrupt  # dies right after the first rename of the swap

    monkeypatch.setattr(storage.os, "replace", replace_then_die)
    if exchange and storage._RENAMEAT2 is not None:
        _write_result(target, 2)  # one atomic exchange, no os.replace: no window at all
        assert _value(target) == 2
    else:
        with pytest.raises(KeyboardInterrupt):
            _write_result(target, 2)
        assert _value(target) == 1
    assert sorted(os.listdir(tmp_path)) == ["result"]


def test_a_result_moved_aside_by_a_killed_save_is_restored(tmp_path):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"],
                          capture_output=True, text=True, check=True)
    target = tmp_path / "result"
    _write_result(target, 7)
    # What a SIGKILL between the fallback's two renames leaves: no `result`, the old one aside.
    os.rename(target, tmp_path / f".result.previous-{dead.stdout.strip()}-0a1b")
    with pytest.warns(UserWarning, match=r"Restored the result at .*result' from "
                                         r"'.result.previous-"):
        assert recover_previous(target)
    assert _value(target) == 7
    assert not recover_previous(target)  # nothing left to restore


def test_sigkill_during_saves_never_loses_the_result_and_later_saves_clean_up(tmp_path):
    target = tmp_path / "result"
    _write_result(target, 0)
    script = textwrap.dedent(f"""
        import json, os, sys
        import numpy as np
        from xcraft.plumbing.storage import atomic_directory
        i = 0
        while True:
            i += 1
            with atomic_directory({str(target)!r}, marker="metadata.json") as tmp:
                np.savez(os.path.join(tmp, "arrays.npz"), x=np.zeros(200_000))
                with open(os.path.join(tmp, "metadata.json"), "w") as f:
                    json.dump({{"format_version": 1, "value": i}}, f)
            if i == 1:
                print("saving", flush=True)
    """)
    for delay in (0.05, 0.13, 0.3):
        process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE)
        assert process.stdout.readline().strip() == b"saving"
        time.sleep(delay)
        os.kill(process.pid, signal.SIGKILL)
        process.wait()
        recover_previous(target)  # what every load does first
        assert isinstance(_value(target), int)
        assert set(load_npz(target / "arrays.npz")) == {"x"}
    _write_result(target, 99)
    assert _value(target) == 99
    assert sorted(os.listdir(tmp_path)) == ["result"]  # the killed runs' temporaries are gone


def test_temporaries_of_a_live_process_are_left_alone(tmp_path):
    live = tmp_path / f".result.tmp-{os.getpid()}-abcd"
    live.mkdir()
    _write_result(tmp_path / "result", 1)
    assert live.exists()


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"{not json", r"is not valid JSON"),
        (b"[1, 2]", r"must hold a JSON object, got a JSON list"),
    ],
)
def test_read_json_names_the_file(tmp_path, content, message):
    (tmp_path / "m.json").write_bytes(content)
    with pytest.raises(ValueError, match=message):
        read_json(tmp_path / "m.json")


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", b"garbage"],
                         ids=["empty", "truncated", "garbage"])
def test_load_npz_names_the_file(tmp_path, content):
    (tmp_path / "a.npz").write_bytes(content)
    with pytest.raises(ValueError, match=r"The file .*a.npz' is not a readable npz archive"):
        load_npz(tmp_path / "a.npz")


def test_load_npz_refuses_pickled_objects(tmp_path):
    np.savez(tmp_path / "a.npz", x=np.array([{"evil": 1}], dtype=object))
    with pytest.raises(ValueError, match=r"is not a readable npz archive of plain arrays"):
        load_npz(tmp_path / "a.npz")
