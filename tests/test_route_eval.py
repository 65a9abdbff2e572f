"""route-eval: RouteLLM's metrics for the difficulty scorer, checked on constructed and real data."""

from __future__ import annotations

import json

import pytest

from router_middleware import RouterMiddlewareError
from router_middleware.cli import main
from router_middleware.routing import load_examples, metrics, route_eval, score_request, score_text
from router_middleware.routing.evaluation import Example

from .conftest import SHARED

WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def test_oracle_random_and_inverse_routers() -> None:
    examples = [Example(f"p{i}", weak=float(i % 2), strong=1.0) for i in range(1000)]
    oracle = metrics([1.0 - e.weak for e in examples], examples)  # strong only where weak fails
    assert oracle["apgr"] > 0.7 and oracle["cpt50"] == pytest.approx(0.25, abs=0.03)
    inverse = metrics([e.weak for e in examples], examples)
    assert inverse["apgr"] < 0.3
    result = route_eval(examples, lambda prompt: 0.5)
    assert result["random_apgr"] == pytest.approx(0.5, abs=0.03) and result["n"] == 1000


def test_scorer_orders_obvious_cases() -> None:
    easy = score_text("Say hi.")
    hard = score_text("Prove step by step why this recursion terminates and analyze its complexity:\n"
                      "```python\ndef f(n):\n    return f(n - 1) + f(n - 2) if n > 1 else n\n```", tools=3)
    assert 0 <= easy < hard <= 1
    trace = "Traceback (most recent call last):\n  File 'a.py', line 3\nValueError: bad"
    assert score_request([{"role": "user", "content": trace}]) > score_request([{"role": "user", "content": "ok"}])
    assert score_text("list files", step_kind="plan") > score_text("list files", step_kind="observe")


def test_bad_csv_names_the_problem(tmp_path) -> None:
    path = tmp_path / "x.csv"
    path.write_text("prompt,a,b\nhello,true,maybe\n")
    with pytest.raises(RouterMiddlewareError, match=r"x.csv: line 2: column 'b' is 'maybe'"):
        load_examples([path], "a", "b")
    with pytest.raises(RouterMiddlewareError, match="missing column"):
        load_examples([path], "a", "c")


def test_cli_on_the_real_gsm8k_data(capsys) -> None:
    path = SHARED / "data" / "routing" / "gsm8k_responses.csv"
    if not path.exists():
        pytest.skip("shared routing data not found")
    assert main(["route-eval", str(path), "--weak", WEAK, "--strong", STRONG, "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert set(data) >= {"apgr", "cpt50", "cpt80", "random_apgr", "n"}
    assert data["n"] == 1319
    assert data["random_apgr"] == pytest.approx(0.5, abs=0.03)
    assert data["apgr"] > data["random_apgr"]  # measured 0.576: better than random, not by much
