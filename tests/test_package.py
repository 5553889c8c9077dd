"""Package-level promises: the public names, lazy imports, matplotlib kept to plotting."""

import ast
import pathlib
import subprocess
import sys

import xcraft

PACKAGE = pathlib.Path(xcraft.__file__).parent


def test_public_names_resolve():
    for name in xcraft.__all__:
        assert getattr(xcraft, name) is not None
    assert xcraft.__version__ == "0.1.0"
    assert set(dir(xcraft)) >= set(xcraft.__all__)


def test_import_is_lazy():
    code = "import sys, xcraft; print('tensorflow' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


def test_unknown_attribute():
    import pytest

    with pytest.raises(AttributeError, match=r"module 'xcraft' has no attribute 'nope'"):
        xcraft.nope  # noqa: B018


def _all_imports(path):
    names = []
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names += [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
    return names


def test_only_plots_imports_matplotlib():
    # STYLE.md: plots.py is the only matplotlib importer, even inside functions.
    importers = {
        path.name
        for path in PACKAGE.glob("*.py")
        if any(name.startswith("matplotlib") for name in _all_imports(path))
    }
    assert importers == {"plots.py"}
