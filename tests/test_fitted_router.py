"""The fitted difficulty router: fit-router, its file, the config that points at it, strengths."""

from __future__ import annotations

import csv
import json

import pytest

from router_middleware import ConfigError, Pipeline
from router_middleware.cli import main
from router_middleware.routing import fitted as fitted_module
from router_middleware.routing import load_examples, metrics, score_text
from router_middleware.routing.fitted import bundled_path, heuristic_logit, load_fitted
from router_middleware.routing.fitting import fit_router, held_out, load_judgments

from .conftest import SHARED

EASY = ["Say hello to {}.", "What colour is {}?", "Translate '{}' to French.", "Write one word about {}."]
HARD = ["Prove that the sum over {} of primes diverges, step by step.",
        "Derive the closed form of the recurrence for {} and analyze its complexity.",
        "Design a lock-free queue for {} and prove it is linearizable.",
        "Calculate the eigenvalues of the matrix for {} and explain why they are real."]
THINGS = ["cats", "rivers", "tables", "clouds", "trains", "apples", "stones", "birds", "lamps", "ships"]


def write_judgments(path, rows) -> None:
    with open(path, "w", newline="", encoding="utf-8") as handle:
        writer = csv.writer(handle)
        writer.writerow(["prompt", "small-model", "big-model", "small-model_response"])
        writer.writerows(rows)


def small_csv(tmp_path):
    rows = [(t.format(x), 9, 10, "an answer") for t in EASY for x in THINGS]
    rows += [(t.format(x), 2, 9, "an answer, with a comma") for t in HARD for x in THINGS]
    path = tmp_path / "judged.csv"
    write_judgments(path, rows)
    return path


def test_fit_router_writes_a_file_that_loads_and_scores(tmp_path, capsys) -> None:
    out = tmp_path / "fit.json"
    assert main(["fit-router", str(small_csv(tmp_path)), "--out", str(out)]) == 0
    assert "fitted on 80 prompts" in capsys.readouterr().out
    scorer = load_fitted(str(out))
    assert set(scorer.strength) == {"small-model", "big-model"}  # the response column is not a model
    assert scorer.strength["small-model"] < scorer.strength["big-model"]
    easy, hard = scorer.difficulty("Say hello to dogs."), scorer.difficulty("Prove that the eigenvalues are real.")
    assert easy < hard
    weak = scorer.strength["small-model"]
    assert scorer.p_good(easy, weak) > 0.5 > scorer.p_good(hard, weak)
    assert main(["route-eval", str(small_csv(tmp_path)), "--weak", "small-model", "--strong", "big-model",
                 "--scorer", f"fitted:{out}", "--json"]) == 0
    # the core path ranks as the heuristic does, which puts the hard templates first here (APGR 0.6875);
    # a wiring check of --scorer fitted:FILE, not a measure of quality
    assert json.loads(capsys.readouterr().out)["apgr"] == pytest.approx(0.6875, abs=0.005)


@pytest.mark.parametrize(("header", "row", "message"), [
    (["text", "a", "b"], ["hi", "1", "2"], "missing column 'prompt'"),
    (["prompt", "answer"], ["hi", "hello there"], "no model score columns"),
])
def test_fit_router_errors_are_one_line(tmp_path, capsys, header, row, message) -> None:
    path = tmp_path / "bad.csv"
    with open(path, "w", newline="", encoding="utf-8") as handle:
        csv.writer(handle).writerows([header, row])
    assert main(["fit-router", str(path), "--out", str(tmp_path / "o.json")]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and message in err and str(path) in err
    assert not (tmp_path / "o.json").exists()


@pytest.mark.parametrize("every", ["-2", "1"])
def test_a_hold_out_that_leaves_out_nothing_or_everything_is_refused(tmp_path, capsys, every) -> None:
    """``--hold-out -2`` was taken, nothing held out, and the file said ``crc32(prompt) % -2 == 0``
    (found by a newcomer trial); ``1`` failed later with "no judged prompts", not naming the flag."""
    out = tmp_path / "o.json"
    assert main(["fit-router", str(small_csv(tmp_path)), "--out", str(out), "--hold-out", every]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and f"--hold-out {every}: expected 0 (keep every prompt) or 2 or more" in err
    assert not out.exists()


def test_shipped_file_beats_random_on_its_held_out_slice() -> None:
    """The bundled fit left out prompts whose CRC-32 is divisible by 10 (its 'held_out' field)."""
    assert json.loads(open(bundled_path(), encoding="utf-8").read())["held_out"] == "crc32(prompt) % 10 == 0"
    folder = SHARED / "data" / "routing" / "mmlu"
    if not folder.is_dir():
        pytest.skip("shared routing data not found")
    examples = [e for e in load_examples(sorted(folder.glob("*.csv")), "mistralai/Mixtral-8x7B-Instruct-v0.1",
                                         "gpt-4-1106-preview") if held_out(e.prompt, 10)]
    assert len(examples) == 1389
    scorer = load_fitted()
    result = metrics([scorer.difficulty(e.prompt) for e in examples], examples)
    # the core path ranks as the heuristic does: 0.557 (random 0.5)
    assert result["apgr"] > 0.52


def test_config_with_a_missing_or_garbled_file(tmp_path) -> None:
    def config(path):
        return {"routing": {"scorer": {"fitted": str(path)}}}

    with pytest.raises(ConfigError, match=r"routing.scorer.*nope.json: cannot read the fitted router file"):
        Pipeline.from_config(config(tmp_path / "nope.json"))
    garbled = tmp_path / "garbled.json"
    garbled.write_text('{"format": ')
    with pytest.raises(ConfigError, match="garbled.json: the fitted router file is not valid JSON"):
        Pipeline.from_config(config(garbled))
    other = tmp_path / "other.json"
    other.write_text('{"weights": {}}')
    with pytest.raises(ConfigError, match="other.json: not a fitted router file"):
        Pipeline.from_config(config(other))
    with pytest.raises(ConfigError, match="strength of 'x' is 3"):
        Pipeline.from_config({"routing": {"scorer": {"strength": {"x": 3}}}})


def tiered(strength: dict[str, float] | None) -> Pipeline:
    scorer: dict[str, object] = {"fitted": "bundled"}
    if strength is not None:
        scorer["strength"] = strength
    return Pipeline.from_config({"routing": {
        "aliases": {"cheap": ["openai/brand-new-mini"], "strong": ["gpt-4-1106-preview"]},
        "tiers": [{"max_score": 0.4, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}],
        "scorer": scorer}, "context": {"enabled": False}, "cache": {"enabled": False}})


def test_unknown_model_generalizes_through_its_configured_strength() -> None:
    with pytest.raises(ConfigError, match="no strength for 'openai/brand-new-mini'"):
        tiered(None)
    prompt = [{"role": "user", "content": "Explain how a hash map handles collisions, with an example."}]
    chosen = {}
    for strength in (0.2, 0.95):
        p = tiered({"openai/brand-new-mini": strength})
        plan = p.plan(p.make_call("auto", prompt, {"session_id": "s"}, {}))
        chosen[strength] = plan.model
    assert chosen == {0.2: "gpt-4-1106-preview", 0.95: "openai/brand-new-mini"}


def fake_embed(texts):
    """A stand-in embedder: 'prove' and 'design' prompts point one way, the rest another."""
    return [[1.0, 0.0] if ("Prove" in t or "Design" in t) else [0.0, 1.0] for t in texts]


def test_core_path_ranks_as_the_heuristic_does(tmp_path) -> None:
    scorer = fit_router([load_judgments(small_csv(tmp_path))]).scorer
    assert scorer.embedding is None and scorer.slope > 0
    texts = ["hi", "Say hello to dogs.", "Why is the sky blue? Explain step by step.", "def f(x):\n    return x",
             "Calculate 12 * 7 + 3 and explain why.", "Prove that sqrt(2) is irrational, step by step."]
    by_heuristic = sorted(texts, key=score_text)
    assert sorted(texts, key=scorer.difficulty) == by_heuristic
    for t in texts:
        assert scorer.difficulty(t) == pytest.approx(scorer.intercept + scorer.slope * heuristic_logit(t))


def test_embedding_term_is_added_only_when_asked_and_available(tmp_path, monkeypatch) -> None:
    fit = fit_router([load_judgments(small_csv(tmp_path))], embed=fake_embed).scorer
    term = fit.embedding
    assert term is not None and len(term.weights) == 2
    assert term.weights[0] > term.weights[1]  # the 'hard' direction raises difficulty beyond the heuristic line
    text = "Design a cache for cats and prove it is correct."
    core = fit.intercept + fit.slope * heuristic_logit(text)
    assert fit.difficulty(text) == pytest.approx(core)  # off by default: the core path
    on = fit.with_embeddings(True, fake_embed)
    assert on.embedding_path
    assert on.difficulty(text) == pytest.approx(core + term.bias + term.weights[0])
    assert on.p_good(0.5, 0.7) == pytest.approx(fitted_module.sigmoid(term.a * 0.2 + term.b))
    assert fit.p_good(0.5, 0.7) == pytest.approx(fitted_module.sigmoid(fit.a * 0.2 + fit.b))
    # the file keeps the term; without the semantic extra the scorer falls back to the core path
    path = tmp_path / "fit.json"
    path.write_text(json.dumps(fit.as_dict()))
    loaded = load_fitted(str(path), embeddings=True)
    assert loaded.embedding == term
    monkeypatch.setattr(fitted_module, "embeddings_installed", lambda: False)
    assert not loaded.embedding_path
    assert loaded.difficulty(text) == pytest.approx(core)
    assert loaded.p_good(0.5, 0.7) == pytest.approx(fitted_module.sigmoid(fit.a * 0.2 + fit.b))


def test_embeddings_config_needs_a_term_and_the_extra(tmp_path, monkeypatch) -> None:
    plain = tmp_path / "plain.json"
    plain.write_text(json.dumps(fit_router([load_judgments(small_csv(tmp_path))]).scorer.as_dict()))
    with pytest.raises(ConfigError, match="plain.json' has no embedding term"):
        Pipeline.from_config({"routing": {"scorer": {"fitted": str(plain), "embeddings": True}}})
    with pytest.raises(ConfigError, match="applies to a fitted scorer only"):
        Pipeline.from_config({"routing": {"scorer": {"embeddings": True}}})
    with_term = tmp_path / "term.json"
    with_term.write_text(json.dumps(fit_router([load_judgments(small_csv(tmp_path))], embed=fake_embed)
                                    .scorer.as_dict()))
    monkeypatch.setattr(fitted_module, "embeddings_installed", lambda: False)
    with pytest.raises(ConfigError, match="needs the semantic extra"):
        Pipeline.from_config({"routing": {"scorer": {"fitted": str(with_term), "embeddings": True}}})


def test_a_version_1_file_asks_for_a_refit(tmp_path) -> None:
    old = tmp_path / "old.json"
    old.write_text(json.dumps({"format": "router-middleware/fitted-difficulty", "version": 1, "weights": {}}))
    with pytest.raises(ConfigError, match="version 1 fitted router file.*refit it with fit-router"):
        Pipeline.from_config({"routing": {"scorer": {"fitted": str(old)}}})


def test_route_eval_embeddings_needs_a_term(tmp_path, capsys) -> None:
    out = tmp_path / "fit.json"
    assert main(["fit-router", str(small_csv(tmp_path)), "--out", str(out), "--no-embeddings"]) == 0
    assert "no embedding term (--no-embeddings)" in capsys.readouterr().out
    assert main(["route-eval", str(small_csv(tmp_path)), "--weak", "small-model", "--strong", "big-model",
                 "--scorer", f"fitted:{out}", "--embeddings"]) == 2
    assert "has no embedding term" in capsys.readouterr().err


def test_policy_adds_the_embedding_term_when_configured(tmp_path, monkeypatch) -> None:
    from router_middleware import minilm

    path = tmp_path / "term.json"
    path.write_text(json.dumps(fit_router([load_judgments(small_csv(tmp_path))], embed=fake_embed).scorer.as_dict()))
    seen: list[str] = []

    def far_in_the_hard_direction(texts):
        seen.extend(texts)
        return [[50.0, 0.0] for _ in texts]

    monkeypatch.setattr(minilm, "embed", far_in_the_hard_direction)
    prompt = [{"role": "user", "content": "Say hello to dogs."}]
    chosen = {}
    for embeddings in (False, True):
        p = Pipeline.from_config({"routing": {
            "aliases": {"cheap": ["small-model"], "strong": ["big-model"]},
            "tiers": [{"max_score": 0.5, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}],
            "scorer": {"fitted": str(path), "embeddings": embeddings}},
            "context": {"enabled": False}, "cache": {"enabled": False}})
        chosen[embeddings] = p.plan(p.make_call("auto", prompt, {"session_id": "s"}, {})).model
    assert seen == ["Say hello to dogs."]  # embedded once, only when configured
    assert chosen == {False: "small-model", True: "big-model"}
