"""The README's set-up commands and quickstart must stay true."""

import pathlib
import re

ROOT = pathlib.Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text(encoding="utf-8")


def test_ci_runs_the_readme_test_command():
    bash_blocks = re.findall(r"```bash\n(.*?)```", README, flags=re.S)
    test_command = next(block.strip() for block in bash_blocks if "pytest" in block)
    ci_script = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_command in ci_script.splitlines()


def test_quickstart_runs_as_written(capsys):
    code = re.search(r"## Quickstart\n\n```python\n(.*?)```", README, flags=re.S).group(1)
    namespace = {}
    exec(compile(code, "README.md", "exec"), namespace)  # noqa: S102 - our own README
    craft, maps = namespace["craft"], namespace["maps"]
    assert maps.shape == (4, 6, 28, 28)
    assert namespace["importances"].shape == (6,)
    assert namespace["child"] is craft.children_[int(namespace["importances"].argmax())]
    assert capsys.readouterr().out.strip()
