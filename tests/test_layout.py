"""The folder is the architecture: shared maths and plumbing below, one folder per method above.

DESIGN.md's rules, checked on the source with ``ast`` (imports inside functions count too):
``ops`` imports nothing of xcraft but validation (and ``_tensorflow``, the quiet import of
TensorFlow every TensorFlow module goes through); ``plumbing`` builds on ``ops`` only; a method
folder (``craft``, ``afi``, ``coupled``) imports ``ops`` and ``plumbing``, never another method's
internals (CRAFT may call AfI's public package names); only ``viz`` imports matplotlib; and the
module graph has no cycle.
"""

import ast
import pathlib
import subprocess
import sys

import pytest

import xcraft

PACKAGE = pathlib.Path(xcraft.__file__).parent
METHODS = ("craft", "afi", "coupled")


def _module_name(path):
    parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


MODULES = {_module_name(path): path for path in sorted(PACKAGE.rglob("*.py"))}


def _imports(name):
    """Every module ``name`` imports, absolute; ``from a import b`` also counts a.b if a module."""
    path = MODULES[name]
    package = name if path.name == "__init__.py" else name.rpartition(".")[0]
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(anchor + ([base] if base else []))
            found.add(base)
            found |= {f"{base}.{a.name}" for a in node.names if f"{base}.{a.name}" in MODULES}
    return found


def _xcraft_imports(name):
    return {module for module in _imports(name) if module.split(".")[0] == "xcraft"} - {"xcraft"}


def _area(module):
    parts = module.split(".")
    return parts[1] if len(parts) > 1 else ""


@pytest.mark.parametrize("name", [m for m in MODULES if _area(m) == "ops"])
def test_ops_import_only_validation(name):
    allowed = ("ops", "_validation", "_tensorflow")
    outside = {m for m in _xcraft_imports(name) if _area(m) not in allowed}
    assert outside == set(), f"{name} imports {sorted(outside)}"


@pytest.mark.parametrize("name", [m for m in MODULES if _area(m) == "plumbing"])
def test_plumbing_builds_on_ops_only(name):
    allowed = ("ops", "plumbing", "_validation", "_tensorflow")
    outside = {m for m in _xcraft_imports(name) if _area(m) not in allowed}
    assert outside == set(), f"{name} imports {sorted(outside)}"


@pytest.mark.parametrize("name", [m for m in MODULES if _area(m) in METHODS])
def test_method_folders_do_not_reach_into_each_other(name):
    own = _area(name)
    foreign = {
        m for m in _xcraft_imports(name)
        if _area(m) in METHODS and _area(m) != own
        # CRAFT may offer AfI's importance, through the package's public names only.
        and not (own == "craft" and m == "xcraft.afi")
    }
    assert foreign == set(), f"{name} imports {sorted(foreign)}"
    assert not {m for m in _xcraft_imports(name) if _area(m) == "cli"}


def test_only_viz_imports_matplotlib():
    importers = {
        name for name in MODULES if any(m.startswith("matplotlib") for m in _imports(name))
    }
    assert importers and {_area(name) for name in importers} == {"viz"}


def test_module_graph_has_no_cycle():
    graph = {name: {m for m in _xcraft_imports(name) if m in MODULES} for name in MODULES}
    state = {}

    def visit(node, stack):
        state[node] = "open"
        for nxt in sorted(graph[node]):
            # A package's __init__ is run by importing any of its modules: not an edge back.
            if nxt == node or node.startswith(nxt + "."):
                continue
            if state.get(nxt) == "open":
                cycle = stack[stack.index(nxt):] + [nxt]
                pytest.fail(f"import cycle: {' -> '.join(cycle)}")
            if nxt not in state:
                visit(nxt, [*stack, nxt])
        state[node] = "done"

    for name in sorted(graph):
        if name not in state:
            visit(name, [name])


def test_every_module_imports_in_a_fresh_interpreter():
    names = [m for m in MODULES if not m.endswith("__main__")]
    code = "import importlib, sys\nfor name in sys.argv[1:]:\n    importlib.import_module(name)\n"
    result = subprocess.run([sys.executable, "-c", code, *names], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def test_method_folders_are_visible_from_the_tree():
    for folder in ("ops", "plumbing", *METHODS, "viz"):
        assert (PACKAGE / folder / "__init__.py").is_file()
        assert ast.get_docstring(ast.parse((PACKAGE / folder / "__init__.py").read_text()))
    assert (PACKAGE / "cli.py").is_file()
