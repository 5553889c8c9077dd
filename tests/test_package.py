"""Package-level promises: the public names, lazy imports, matplotlib kept to plotting."""

import subprocess
import sys

import xcraft


def test_public_names_resolve():
    for name in xcraft.__all__:
        assert getattr(xcraft, name) is not None
    assert xcraft.__version__ == "0.1.0"
    assert set(dir(xcraft)) >= set(xcraft.__all__)


def test_import_is_lazy():
    code = "import sys, xcraft; print('tensorflow' in sys.modules or 'matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match=r"module 'xcraft' has no attribute 'nope'"):
        xcraft.nope  # noqa: B018
