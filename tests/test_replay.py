"""The replay command on the real shared sessions: output shape and simulator fidelity."""

from __future__ import annotations

import json

import pytest

from router_middleware import Decision, Pipeline, Plan, PolicyState
from router_middleware.cli import bundled_sessions, main
from router_middleware.replay import load_session, replay

KEYS = {"sessions", "calls", "recorded", "baseline", "optimized", "integrity_violations", "retention", "per_session"}


@pytest.fixture(scope="module")
def full_replay(agent_session_paths):
    return replay([load_session(p) for p in agent_session_paths], Pipeline()).as_dict()


def test_cli_json_shape(agent_session_paths, capsys) -> None:
    assert main(["replay", *map(str, agent_session_paths[:2]), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert KEYS <= data.keys()
    assert data["sessions"] == 2 and len(data["per_session"]) == 2
    assert {"input_tokens", "cached_tokens", "cost_usd", "priced_usd"} <= data["recorded"].keys()
    assert {"input_tokens", "cached_tokens", "cost_usd"} <= data["baseline"].keys()
    assert isinstance(data["integrity_violations"], int) and isinstance(data["retention"], float)


def test_baseline_input_within_5_percent_per_model(full_replay) -> None:
    for model, stats in full_replay["fidelity"].items():
        assert stats["baseline_over_recorded_input"] == pytest.approx(1.0, abs=0.05), model


def test_deepseek_cached_share_within_3_points(full_replay) -> None:
    stats = full_replay["fidelity"]["deepseek/deepseek-chat"]
    assert abs(stats["baseline_cached_share"] - stats["recorded_cached_share"]) <= 0.03


def test_gemini_cached_share_within_5_points(full_replay) -> None:
    """Gemini's implicit cache: 2048-token steps and a 94% hit rate, measured on the recordings."""
    stats = full_replay["fidelity"]["openrouter/google/gemini-3-pro-preview"]
    assert abs(stats["baseline_cached_share"] - stats["recorded_cached_share"]) <= 0.05


def test_cache_sim_hit_rate_and_unit() -> None:
    from router_middleware.catalog import CacheRules
    from router_middleware.replay.cachesim import PromptCacheSim

    sim = PromptCacheSim(CacheRules(min_tokens=2048, unit=2048, hit_rate=0.5))
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    assert sim.request(["a"], [5000], messages[:1]).read == 0
    assert sim.request(["a", "b"], [5000, 6000], messages).read == 2048  # 4096 cached, credited at 50%


def test_recorded_priced_matches_reported(full_replay) -> None:
    for model, stats in full_replay["fidelity"].items():
        tolerance = 0.01 if model.startswith("deepseek") else 0.05
        assert stats["priced_over_reported_cost"] == pytest.approx(1.0, abs=tolerance), model


def test_pass_through_keeps_everything(full_replay) -> None:
    assert full_replay["integrity_violations"] == 0
    assert full_replay["retention"] == 1.0
    assert full_replay["optimized"] == full_replay["baseline"]
    assert full_replay["calls"] == sum(len(load_session(p["path"]).calls) for p in full_replay["per_session"])


@pytest.mark.parametrize("provider_cache", [True, False])
def test_a_trimming_policy_shows_up_in_the_accounts(provider_cache) -> None:
    class DropMiddle:
        """Keep system, task and the last 4 messages (a deliberately naive window)."""

        name = "naive-window"

        def __call__(self, plan: Plan, state: PolicyState) -> Plan:
            if len(plan.messages) <= 8:
                return plan
            tail = list(plan.messages[-4:])
            while tail and tail[0].get("role") == "tool":
                tail.pop(0)
            return plan.decide(Decision(self.name, "trim", "test"), messages=[*plan.messages[:2], *tail])

    session = load_session(bundled_sessions()[0])
    report = replay([session], Pipeline(policies=[DropMiddle()]), provider_cache=provider_cache).as_dict()
    assert report["optimized"]["input_tokens"] < 0.6 * report["baseline"]["input_tokens"]
    assert report["integrity_violations"] == 0
    assert report["retention"] < 1.0
    assert report["per_session"][0]["decisions"]["naive-window:trim"] > 0
    if not provider_cache:
        assert report["baseline"]["cached_tokens"] == 0


def test_demo_runs_offline(capsys) -> None:
    assert main(["demo"]) == 0
    out = capsys.readouterr().out
    assert "baseline" in out and "optimized" in out and "total" in out


# --- context targets (default config on agents, 4k budget on chats) -----------------------------

@pytest.fixture(scope="module")
def default_replay(agent_session_paths):
    from router_middleware.replay import replay as run

    sessions = [load_session(p) for p in agent_session_paths]
    pipeline = Pipeline.from_config({})
    return run(sessions, pipeline).as_dict(), run(sessions, pipeline, provider_cache=False).as_dict()


def test_default_context_targets_on_agent_sessions(default_replay) -> None:
    cached, uncached = default_replay
    base, opt = cached["baseline"], cached["optimized"]
    assert cached["integrity_violations"] == 0
    assert cached["retention"] >= 0.98
    assert opt["input_tokens"] <= 0.70 * base["input_tokens"]
    assert opt["cost_usd"] <= 0.92 * base["cost_usd"]
    for session in cached["per_session"]:
        assert session["optimized"]["cost_usd"] <= session["baseline"]["cost_usd"] + 1e-9, session["id"]
    assert uncached["optimized"]["cost_usd"] <= 0.70 * uncached["baseline"]["cost_usd"]
    assert uncached["baseline"]["cached_tokens"] == 0


def test_calibration_cuts_the_token_error(full_replay) -> None:
    for model, stats in full_replay["fidelity"].items():
        assert stats["prompt_tokens_mae_calibrated"] < 0.15 * stats["prompt_tokens_mae_raw"], model


def test_chat_sessions_with_a_4k_budget(capsys) -> None:
    from .conftest import ROOT, SHARED

    chats = sorted((SHARED / "data" / "chat-sessions").glob("*.json"))
    if not chats:
        pytest.skip("shared chat sessions not found")
    config = ROOT / "benchmarks" / "configs" / "chat-4k.yaml"
    assert main(["replay", *map(str, chats), "--config", str(config), "--json", "--compact"]) == 0
    data = json.loads(capsys.readouterr().out)
    base, opt = data["baseline"], data["optimized"]
    assert data["per_session"][0]["model"] == "deepseek/deepseek-chat"
    assert opt["max_request_tokens"] <= 4000
    assert data["retention"] >= 0.97  # README: 0.976 (0.9548 went unnoticed under a 0.95 bound)
    assert data["integrity_violations"] == 0
    assert opt["input_tokens"] <= 0.40 * base["input_tokens"]
    assert opt["cost_usd"] <= base["cost_usd"]


def test_replay_reports_reasoning_recorded_vs_capped(agent_session_paths) -> None:
    from router_middleware.replay import replay as run

    sessions = [load_session(p) for p in agent_session_paths if p.name.startswith("gemini")][:3]
    config = {"context": {"enabled": False}, "reasoning": {"rules": [
        {"when": {"step_kind": ["plan"]}, "budget_tokens": 0},
        {"when": {"step_kind": ["observe"]}, "budget_tokens": 50}]}}
    report = run(sessions, Pipeline.from_config(config), model="anthropic/claude-sonnet-4-5").as_dict()
    recorded, optimized = report["recorded"]["reasoning_tokens"], report["optimized"]["reasoning_tokens"]
    assert recorded > 0 and optimized < recorded
    assert report["optimized"]["output_tokens"] == report["baseline"]["output_tokens"] - (recorded - optimized)
    assert report["optimized"]["cost_usd"] < report["baseline"]["cost_usd"]


# --- routed replay (--route) ----------------------------------------------------------------------

CHEAP, STRONG = "deepseek/deepseek-chat", "openrouter/google/gemini-3-pro-preview"
AUTO = {"context": {"enabled": False}, "routing": {
    "aliases": {"cheap": [CHEAP], "strong": [STRONG]},
    "tiers": [{"max_score": 0.7, "alias": "cheap"}, {"max_score": 1.0, "alias": "strong"}],
    "affinity": {"enabled": False}, "escalation": {"enabled": False}}}  # each call by its own score


def test_routed_replay_counts_calls_switches_and_costs() -> None:
    sessions = [load_session(p) for p in bundled_sessions()]
    data = replay(sessions, Pipeline.from_config(AUTO), route="auto").as_dict()
    total = data["routed"]
    assert total["models"] == [CHEAP, STRONG]
    assert sum(total["calls_per_model"].values()) == total["calls"] == data["calls"]
    assert all(n > 0 for n in total["calls_per_model"].values())  # both tiers are used
    assert total["switches"] >= 1
    assert total["switches"] == sum(s["routed"]["switches"] for s in data["per_session"])
    assert total["median_switches_per_session"] >= 0 and total["sessions"] == len(sessions)
    for key in ("cost_usd", "cache_lost_usd"):
        assert total[key] == pytest.approx(sum(s["routed"][key] for s in data["per_session"]), abs=1e-5)
    assert total["cache_lost_usd"] > 0  # a switch back finds a colder cache than always-that-model
    for model in (CHEAP, STRONG):
        assert total["always"][model]["cost_usd"] is not None
    assert total["always"][CHEAP]["cost_usd"] < total["always"][STRONG]["cost_usd"]
    assert total["routed"]["cost_usd"] == total["cost_usd"]


@pytest.mark.parametrize("model", [CHEAP, STRONG])
def test_routed_replay_on_one_model_equals_always_that_model(model) -> None:
    config = {"context": {"enabled": False}, "routing": {"aliases": {"only": [model]}}}
    session = load_session(bundled_sessions()[0])
    total = replay([session], Pipeline.from_config(config), route="only").as_dict()["routed"]
    assert total["calls_per_model"] == {model: len(session.calls)}
    assert total["switches"] == 0 and total["cache_lost_usd"] == 0
    assert total["routed"] == total["always"][model]


def test_routed_replay_remembers_the_session_so_the_cache_rule_applies() -> None:
    """Replay keeps each session's last route as the bookkeeper would store it: with affinity on, a
    recorded Gemini session (its observations are user turns, so its score moves call by call)
    switches less, loses less cache and costs less than routed call by call."""
    from .conftest import SHARED

    path = SHARED / "data" / "agent-sessions" / "gemini-3-pro__django__django-12155.json"
    if not path.exists():
        pytest.skip(f"{path} not present")
    sessions = [load_session(path)]
    free = replay(sessions, Pipeline.from_config(AUTO), route="auto").as_dict()["routed"]
    sticky_config = {**AUTO, "routing": {**AUTO["routing"], "affinity": {"enabled": True}}}
    data = replay(sessions, Pipeline.from_config(sticky_config), route="auto").as_dict()
    sticky = data["routed"]
    assert sticky["switches"] < free["switches"]
    assert sticky["cache_lost_usd"] < free["cache_lost_usd"]
    assert sticky["cost_usd"] < free["cost_usd"]


def test_routed_replay_takes_an_alias_with_its_floor_suffix(capsys, tmp_path) -> None:
    """``--route coder:floor`` was refused as "not an alias ... (known: ..., coder, ...)", though calls,
    RoutedChatModel and the proxy take it: the cheapest target is tried first, as a call is routed."""
    config = {"context": {"enabled": False}, "routing": {"aliases": {"coder": [STRONG, CHEAP]}}}
    session = load_session(bundled_sessions()[0])
    ordered = replay([session], Pipeline.from_config(config), route="coder").as_dict()["routed"]
    floor = replay([session], Pipeline.from_config(config), route="coder:floor").as_dict()["routed"]
    assert ordered["calls_per_model"][STRONG] == floor["calls_per_model"][CHEAP] == len(session.calls)
    assert floor["alias"] == "coder:floor" and floor["cost_usd"] < ordered["cost_usd"]
    path = tmp_path / "router.yaml"
    path.write_text(f"routing:\n  aliases:\n    coder: [{STRONG}, {CHEAP}]\n")
    assert main(["replay", bundled_sessions()[0], "--config", str(path), "--route", "coder:flor"]) == 2
    assert "--route 'coder:flor': an alias takes ':floor' or ':nitro', not ':flor'" in capsys.readouterr().err
    assert main(["replay", bundled_sessions()[0], "--config", str(path), "--route", "x:free"]) == 2  # said first
    assert "--route 'x:free' is not an alias of the config's routing section" in capsys.readouterr().err


@pytest.mark.parametrize("route", ["qwen2.5-coder:7b", "qwen2.5-coder:7b:floor"])
def test_routed_replay_takes_an_alias_named_with_a_colon(route) -> None:
    """``--route qwen2.5-coder:7b`` (an alias named with a colon, as calls take it) was refused as not
    an alias (known: qwen2.5-coder:7b): the route was split at its first colon (review57b)."""
    from router_middleware.replay.routed import route_models

    routing = Pipeline.from_config({"routing": {"aliases": {"qwen2.5-coder:7b": [STRONG, CHEAP]}}}).config.routing
    assert route_models(routing, route) == [STRONG, CHEAP]


def test_replay_without_route_has_no_routed_block() -> None:
    data = replay([load_session(bundled_sessions()[0])], Pipeline.from_config(AUTO)).as_dict()
    assert "routed" not in data and "routed" not in data["per_session"][0]


def test_route_cli_table_and_errors(capsys) -> None:
    from .conftest import ROOT

    config = str(ROOT / "benchmarks" / "configs" / "auto.yaml")
    assert main(["replay", *bundled_sessions(), "--config", config, "--route", "auto"]) == 0
    out = capsys.readouterr().out
    assert "routed through 'auto'" in out and "deepseek-chat alone" in out and "switches" in out
    assert max(len(line) for line in out.splitlines()) <= 80
    assert main(["replay", bundled_sessions()[0], "--config", config, "--route", "nope"]) == 2
    assert "--route 'nope' is not an alias" in capsys.readouterr().err
    assert main(["replay", bundled_sessions()[0], "--route", "coder"]) == 2  # no --config: no aliases at all
    assert "(it has none: pass --config with routing.aliases)" in capsys.readouterr().err


def test_demo_with_a_bad_config_says_so_before_its_banner(tmp_path, capsys) -> None:
    bad = tmp_path / "bad.yaml"
    bad.write_text("routing: {alias: {}}\n")
    assert main(["demo", "--config", str(bad)]) == 2
    out, err = capsys.readouterr()
    assert out == "" and "did you mean 'aliases'?" in err


def test_a_planned_request_that_breaks_tool_call_integrity_is_named_by_session_step_and_message() -> None:
    """The count alone says something broke; the table says where, to start debugging from."""
    import re

    from router_middleware.cli.tables import replay_table

    class DropFirstToolCall:
        name = "drop"

        def __call__(self, plan: Plan, state: PolicyState) -> Plan:
            messages = list(plan.messages)
            first = next((i for i, m in enumerate(messages) if m.get("tool_calls")), None)
            return plan if first is None else plan.override(messages=messages[:first] + messages[first + 1:])

    report = replay([load_session(p) for p in bundled_sessions()], Pipeline(policies=[DropFirstToolCall()]))
    broken = [s for s in report.sessions if s.integrity_violations]
    assert broken and all(re.fullmatch(r"step \d+: message \d+: .+", s.first_violation) for s in broken)
    assert f"  {broken[0].id}, {broken[0].first_violation}" in replay_table(report, "title", "config")
    assert report.as_dict()["per_session"][report.sessions.index(broken[0])]["first_violation"]


def test_a_recording_with_content_parts_no_request_may_carry_still_loads_and_replays(tmp_path) -> None:
    """A recording is never sent, so the checks on what litellm would break on sending (a string part, an
    image part whose URL was redacted) do not refuse it: one such session aborted a whole replay."""
    session = json.loads(open(bundled_sessions()[0]).read())
    first = next(m for m in session["messages"] if m.get("role") == "user")
    first["content"] = [{"type": "text", "text": "see"}, "a bare string", {"type": "image_url"}]
    path = tmp_path / "redacted.json"
    path.write_text(json.dumps(session))
    loaded = load_session(path)
    assert loaded.messages[session["messages"].index(first)]["content"][1] == "a bare string"
    assert replay([loaded], Pipeline()).as_dict()["calls"] == len(loaded.calls)


def test_a_session_with_one_call_without_usage_keeps_the_others_and_says_so(tmp_path, capsys) -> None:
    """One call recorded without usage made the whole session's recorded account vanish, silently:
    `recorded` null and no fidelity, with nothing said. Now the calls with usage are kept, the one
    without is counted and named, and the session is left out of the recorded total (its baseline
    covers every call, so a partial recorded account would not compare)."""
    session = json.loads(open(bundled_sessions()[0]).read())
    calls = len(session["calls"])
    del session["calls"][40]["usage"]
    path = tmp_path / "one-missing.json"
    path.write_text(json.dumps(session))
    whole = replay([load_session(bundled_sessions()[0])], Pipeline()).as_dict()
    assert main(["replay", str(path), "--json"]) == 0
    out, err = capsys.readouterr()
    data = json.loads(out)
    recorded = data["per_session"][0]["recorded"]
    assert recorded["calls_without_usage"] == 1
    assert 0 < recorded["input_tokens"] < whole["recorded"]["input_tokens"]
    assert data["recorded"]["sessions_left_out"] == 1 and data["recorded"]["calls_without_usage"] == 1
    assert data["fidelity"] == {} and whole["recorded"]["calls_without_usage"] == 0
    assert f"{path}: call 40 has no usage (1 of {calls} calls)" in err
    assert main(["replay", str(path)]) == 0
    out, _ = capsys.readouterr()
    assert f"1 call of {calls} recorded no usage (call 40)" in " ".join(out.split())
