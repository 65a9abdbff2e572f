"""Every python snippet in README.md runs, so the documentation cannot drift from the code."""

from __future__ import annotations

import re

import pytest
import yaml

from router_middleware import load_config

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README, re.S)
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README, re.S)


def test_readme_has_snippets() -> None:
    assert len(PYTHON_BLOCKS) >= 2 and YAML_BLOCKS


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.splitlines()[0][:40])
def test_python_snippet_runs(code: str) -> None:
    exec(compile(code, "README.md", "exec"), {})


@pytest.mark.parametrize("text", YAML_BLOCKS)
def test_yaml_config_is_valid(text: str) -> None:
    load_config(yaml.safe_load(text))


def test_readme_commands_are_the_ci_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
    assert "pip install -e '.[all]'" in README and "pip install -e '.[all]'" in ci
