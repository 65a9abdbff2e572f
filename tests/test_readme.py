"""Every python snippet in README.md and docs/*.md runs, and every YAML block loads, so the
documentation cannot drift from the code."""

from __future__ import annotations

import re

import pytest
import yaml

from router_middleware import load_config

from .conftest import ROOT

README = (ROOT / "README.md").read_text()
DOCS = "\n".join(path.read_text() for path in sorted((ROOT / "docs").glob("*.md")))
INTEGRATION_READMES = sorted((ROOT / "integrations").glob("*/README.md"))
PYTHON_BLOCKS = re.findall(r"```python\n(.*?)```", README + DOCS, re.S)
# Integration snippets set process-wide state (global OpenTelemetry providers, litellm callbacks):
# each runs in its own interpreter.
INTEGRATION_BLOCKS = [(path.parent.name, block) for path in INTEGRATION_READMES
                      for block in re.findall(r"```python\n(.*?)```", path.read_text(), re.S)]
YAML_BLOCKS = re.findall(r"```yaml\n(.*?)```", README + DOCS, re.S)


def test_readme_has_snippets() -> None:
    assert len(PYTHON_BLOCKS) >= 2 and YAML_BLOCKS


@pytest.mark.parametrize("code", PYTHON_BLOCKS, ids=lambda c: c.splitlines()[0][:40])
def test_python_snippet_runs(code: str) -> None:
    import asyncio

    from router_middleware import wire

    asyncio.run(wire.drain_callbacks())  # litellm's logging of earlier tests' calls: not for a snippet's logger
    exec(compile(code, "README.md or docs/", "exec"), {})


@pytest.mark.parametrize(("folder", "code"), INTEGRATION_BLOCKS, ids=lambda v: str(v).splitlines()[0][:40])
def test_integration_snippet_runs(folder: str, code: str) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "OPENAI_API_KEY": "sk-test"}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300,
                          cwd=ROOT)
    assert done.returncode == 0, f"integrations/{folder}/README.md: {done.stderr[-2000:]}"


@pytest.mark.parametrize("text", YAML_BLOCKS)
def test_yaml_config_is_valid(text: str) -> None:
    load_config(yaml.safe_load(text))


def test_readme_commands_are_the_ci_commands() -> None:
    ci = (ROOT / ".ci" / "run").read_text()
    assert ".venv/bin/python -m pytest" in README and ".venv/bin/python -m pytest" in ci
    assert "pip install -e '.[all]'" in README and "pip install -e '.[all]'" in ci


@pytest.mark.parametrize(("script", "args", "expected"), [
    ("integrations/langchain/chain.py", [], ["model=gpt-4o-mini"]),
    ("integrations/langchain/agent.py", [], [
        "ToolMessage: 70 degrees and sunny in San Francisco", "What the middleware did (2 model calls)",
        "routing:route, window:trim", "trimming saved $0.000", "unrelated to the weather question",
        # the middleware's pick, and the model the recording answered with (it answers whatever is asked)
        "call 1: 'agent' routed to gpt-4o-mini (the recording's answer came from gpt-3.5-turbo-0125)",
        "call 2: 'agent' routed to gpt-4o-mini (the recording's answer came from gpt-3.5-turbo)"]),
])
def test_integration_examples_run(script: str, args: list[str], expected: list[str]) -> None:
    import os
    import subprocess
    import sys

    env = {**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}
    done = subprocess.run([sys.executable, str(ROOT / script), *args], capture_output=True, text=True, env=env,
                          timeout=300, cwd=ROOT)
    assert done.returncode == 0, done.stderr[-2000:]
    for text in expected:
        assert text in done.stdout


def test_proxy_router_config_loads() -> None:
    config = load_config(ROOT / "integrations" / "litellm-proxy" / "router.yaml")
    proxy = yaml.safe_load((ROOT / "integrations" / "litellm-proxy" / "config.yaml").read_text())
    names = {m["model_name"] for m in proxy["model_list"]}
    assert set(config.routing.deployments) <= names and "coder" in names


def test_every_docs_page_is_listed_and_every_relative_link_resolves() -> None:
    """The README and docs/README.md list each page of docs/; a link to a file that moved fails here."""
    pages = sorted(path.name for path in (ROOT / "docs").glob("*.md") if path.name != "README.md")
    index = (ROOT / "docs" / "README.md").read_text()
    assert pages and all(f"](docs/{name})" in README and f"]({name})" in index for name in pages)
    for path in [ROOT / "README.md", *(ROOT / "docs").glob("*.md"), *INTEGRATION_READMES]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", path.read_text()):
            if "://" not in target:
                assert (path.parent / target).exists(), f"{path.relative_to(ROOT)}: {target} does not exist"
