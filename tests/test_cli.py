"""The command line as a newcomer meets it: conventional flags, readable tables, unknown prices shown
as unknown, an idempotent replay ledger, and one-line errors (exit code 2) naming the file or option."""

from __future__ import annotations

import json
import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest

from router_middleware import MissingExtra, Pipeline, __version__
from router_middleware.cli import bundled_sessions, main
from router_middleware.ledger import open_ledger

from .conftest import SHARED

CHATS = sorted((SHARED / "data" / "chat-sessions").glob("*.json"))[:2]


def run(capsys, *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def unknown_model_session(tmp_path: Path, calls: int = 3, ts: list[float] | None = None) -> Path:
    data = json.loads(Path(bundled_sessions()[0]).read_text())
    data["id"], data["model"], data["calls"] = "unpriced", "nobody/unknown-model-1", data["calls"][:calls]
    for i, call in enumerate(data["calls"]):
        call["model"] = None
        if ts:
            call["ts"] = ts[i]
    path = tmp_path / "unpriced.json"
    path.write_text(json.dumps(data))
    return path


def test_version_help_and_python_dash_m(capsys) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["--version"])
    assert exit_info.value.code == 0 and capsys.readouterr().out.strip() == f"router-middleware {__version__}"
    with pytest.raises(SystemExit):
        main(["--help"])
    help_text = capsys.readouterr().out
    for command in ("demo", "replay", "report", "ledger", "route-eval", "fit-router"):
        assert command in help_text
    assert "``" not in help_text  # the docstring's markup is not shown
    done = subprocess.run([sys.executable, "-m", "router_middleware", "--version"], capture_output=True, text=True,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"}, timeout=120)
    assert done.returncode == 0 and done.stdout.strip() == f"router-middleware {__version__}"


@pytest.mark.parametrize(("argv", "said"), [
    (["replay", "x", "--jsn"], "router-middleware replay: error: unrecognized arguments: --jsn"),
    (["ledger", "drain", "--ledger", "x", "--bad"], "router-middleware ledger drain: error: unrecognized arguments: --bad"),
    (["replay", "x", "--compact"], "router-middleware replay: error: --compact shapes the --json output: give --json too"),
])
def test_a_command_s_wrong_argument_gets_that_command_s_usage(argv, said, capsys) -> None:
    """A trial: a flag a command does not take got the top level's usage; ``--compact`` without
    ``--json`` was ignored."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and err.strip().splitlines()[-1] == said
    assert err.startswith(f"usage: router-middleware {argv[0]}")


@pytest.mark.skipif(not CHATS, reason="shared chat sessions not present")
def test_replay_table_labels_sessions_without_recorded_usage(capsys) -> None:
    code, out, _ = run(capsys, "replay", *map(str, CHATS), "--config", "benchmarks/configs/chat-4k.yaml")
    assert code == 0
    lines = out.splitlines()
    assert max(len(line) for line in lines if "SOURCES" not in line) <= 80
    for path in CHATS:
        session = json.loads(path.read_text())
        block = lines.index(next(line for line in lines if line.startswith(session["id"])))
        assert lines[block].split()[1] == "baseline"  # no recorded row: the first row carries the label
        assert lines[block + 2].startswith(f"{len(session['calls']):,} calls")
    total = next(i for i, line in enumerate(lines) if line.startswith("total"))
    assert lines[total + 1].startswith("2 sessions") and "optimized" in lines[total + 1]
    assert "retention" in out and "benchmarks/configs/chat-4k.yaml" in out


def test_demo_is_readable_at_80_columns_and_says_what_next(capsys) -> None:
    code, out, _ = run(capsys, "demo")
    assert code == 0
    assert all(len(line) <= 80 for line in out.splitlines() if "SOURCES" not in line)
    assert "deepseek-chat" in out and "gemini-3-pro-preview" in out  # the model of each session
    assert "optimized (the default config)" in out and "vs baseline" in out
    sources = next(line for line in out.splitlines() if "SOURCES" in line).split(": ", 1)[1]
    assert Path(sources).is_file()
    assert "router-middleware report --ledger" in out


def test_unknown_prices_are_unknown_never_zero(tmp_path, capsys) -> None:
    session = unknown_model_session(tmp_path)
    code, out, err = run(capsys, "replay", str(session))
    assert code == 0 and "unknown" in out and "$0.0000" not in out
    assert "no price for model 'openrouter/nobody/unknown-model-1' (sessions unpriced)" in err
    code, out, _ = run(capsys, "replay", str(session), "--json")
    data = json.loads(out)
    assert data["optimized"]["cost_usd"] is None and data["optimized"]["unpriced_calls"] == 3
    assert data["per_session"][0]["price_source"] == "unknown"
    code, _, err = run(capsys, "replay", str(session), "--model", "typo-model")
    assert code == 2 and "--model 'typo-model' has no price" in err and err.count("\n") == 1


def test_replay_model_typo_suggests_the_close_names(tmp_path, capsys) -> None:
    session = unknown_model_session(tmp_path, calls=1)
    code, _, err = run(capsys, "replay", str(session), "--model", "gpt-4o-minii")
    assert code == 2 and err.count("\n") == 1
    assert "--model 'gpt-4o-minii' has no price" in err and "did you mean 'gpt-4o-mini'" in err
    config = tmp_path / "c.yaml"  # a name of the config's models: section is known too
    config.write_text("models:\n  house-model-7b: {input_per_mtok: 0.1, output_per_mtok: 0.2}\n")
    code, _, err = run(capsys, "replay", str(session), "--config", str(config), "--model", "house-modle-7b")
    assert code == 2 and "did you mean 'house-model-7b'" in err


def test_ledger_keeps_unknown_cost_unknown(tmp_path, capsys) -> None:
    ledger = tmp_path / "l.db"
    assert run(capsys, "replay", str(unknown_model_session(tmp_path)), "--ledger", str(ledger))[0] == 0
    db = open_ledger(str(ledger))
    assert db.query("SELECT COUNT(*), COUNT(cost_usd), COUNT(baseline_cost_usd) FROM calls") == [(3, 0, 0)]
    db.close()
    code, out, _ = run(capsys, "report", "--ledger", str(ledger))
    assert code == 0 and "3 calls have no price" in " ".join(out.split()) and "unknown" in out
    assert "cost unknown (unknown without the middleware)" in " ".join(out.split())  # said $0.0000 at the top


def test_report_json_and_html_keep_unknown_cost_unknown(tmp_path, capsys) -> None:
    """The text report said unknown where --json said cost_usd 0 and --html "$0.0000", for a model with
    no price: a dashboard reading the JSON showed those calls as free."""
    ledger = tmp_path / "l.db"
    assert run(capsys, "replay", str(unknown_model_session(tmp_path)), "--ledger", str(ledger))[0] == 0
    code, out, _ = run(capsys, "report", "--ledger", str(ledger), "--json")
    data = json.loads(out)
    for row in (data["totals"], *data["by_model"], *data["by_provider"]):
        assert row["unpriced_calls"] == 3 and row["cost_usd"] is None and row["baseline_cost_usd"] is None
    html = tmp_path / "r.html"
    assert run(capsys, "report", "--ledger", str(ledger), "--html", str(html))[0] == 0
    page = html.read_text()
    assert "cost unknown vs unknown without the middleware" in page and "$0.0000" not in page
    assert "<td>unknown</td>" in page


def test_replay_says_each_config_typo_once_and_an_alias_target_with_no_price(tmp_path, capsys) -> None:
    """Found by a newcomer trial: the replay's baseline pipeline said the config's problems a second
    time; an alias target with no price was never said (replay makes no call through the engine);
    ``openai/gpt-4o-minii`` was told ``gmi/openai/gpt-4o-mini``, not ``openai/gpt-4o-mini``."""
    import structlog

    config = tmp_path / "typos.yaml"
    config.write_text("routing:\n  deployments:\n    d: {model: openai/gpt-4o-minii}\n"
                      "  aliases:\n    coder: [d, gpt-4o-minii]\n")
    with structlog.testing.capture_logs() as logs:
        code, _, err = run(capsys, "replay", bundled_sessions()[0], "--config", str(config), "--route", "coder")
    assert code == 0
    (said,) = [e for e in logs if e["event"] == "unpriced_deployment_model"]
    assert said["did_you_mean"][0] == "openai/gpt-4o-mini"
    assert ("router-middleware: warning: routing.aliases.coder: no price for 'gpt-4o-minii' (a typo?): its routed "
            "calls' costs show as unknown; did you mean 'gpt-4o-mini'") in err


def test_a_report_of_a_range_with_no_calls_says_so_in_one_line(tmp_path, capsys) -> None:
    """It printed "0 calls," and seven empty tables (found by a newcomer trial)."""
    ledger = tmp_path / "l.db"
    assert run(capsys, "replay", str(unknown_model_session(tmp_path)), "--ledger", str(ledger))[0] == 0
    code, out, _ = run(capsys, "report", "--ledger", str(ledger), "--since", "2030-01-01")
    assert code == 0 and out == "0 calls: the ledger has none in this range (see --since and --until)\n"


def test_replay_into_a_ledger_twice_replaces_rows_with_recorded_or_past_times(tmp_path, capsys) -> None:
    ledger = tmp_path / "l.db"
    recorded_ts = [1_700_000_000.0, 1_700_000_060.0, 1_700_000_120.0]
    paths = [*bundled_sessions(), str(unknown_model_session(tmp_path, ts=recorded_ts))]
    before = time.time()
    for _ in range(2):
        code, _, err = run(capsys, "replay", *paths, "--ledger", str(ledger), "--json")
        assert code == 0 and f"to the ledger sqlite:///{ledger}" in err
    db = open_ledger(str(ledger))
    calls = db.query("SELECT COUNT(*), COUNT(DISTINCT call_id), MAX(ts) FROM calls WHERE session != 'unpriced'")[0]
    assert calls[0] == calls[1] == 93 and calls[2] <= before + 60  # 93 replayed calls, once; never in the future
    assert [r[0] for r in db.query("SELECT ts FROM calls WHERE session = 'unpriced' ORDER BY ts")] == recorded_ts
    db.close()


def test_report_and_replay_share_one_baseline(tmp_path, capsys) -> None:
    ledger = tmp_path / "l.db"
    code, out, _ = run(capsys, "replay", *bundled_sessions(), "--ledger", str(ledger), "--json")
    replayed = json.loads(out)
    code, out, _ = run(capsys, "report", "--ledger", str(ledger), "--json")
    totals = json.loads(out)["totals"]
    assert totals["baseline_cost_usd"] == pytest.approx(replayed["baseline"]["cost_usd"], abs=1e-6)
    assert totals["cost_usd"] == pytest.approx(replayed["optimized"]["cost_usd"], abs=1e-6)


def test_the_report_tables_stay_readable_at_80_columns(tmp_path, capsys, monkeypatch) -> None:
    """Piped (a CI log), rich draws 80 columns: headers and numbers stay whole, a long name folds."""
    ledger = tmp_path / "l.db"
    run(capsys, "replay", *bundled_sessions(), "--ledger", str(ledger), "--json")
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "report", "--ledger", str(ledger))
    assert code == 0 and max(map(len, out.splitlines())) <= 80
    header = next(line for line in out.splitlines() if line.lstrip().startswith("model "))
    assert header.split() == ["model", "calls", "input", "cached", "output", "reasoning", "cost", "baseline"]
    assert "$0.1273" in out and "634,631" in out  # numbers whole: a model row of the bundled sessions


def test_the_report_wraps_a_long_model_name_after_a_separator(tmp_path, capsys, monkeypatch) -> None:
    """At 80 columns a long model id wraps after '/', '-' or ':' (rich's fold cut it mid-word:
    'openrouter/an' 'thropic/claud' ...), and the numbers beside it stay whole."""
    from router_middleware.ledger import LedgerRecord

    long_name = "openrouter/anthropic/claude-3.5-sonnet:beta"
    ledger = tmp_path / "l.db"
    db = open_ledger(str(ledger))
    db.insert([LedgerRecord(ts=time.time(), model=m, requested_model=m, input_tokens=1_234_567, output_tokens=98_765,
                            cost_usd=12.3456) for m in (long_name, "gpt-4o-mini")])
    db.close()
    monkeypatch.setenv("COLUMNS", "80")
    code, out, _ = run(capsys, "report", "--ledger", str(ledger))
    assert code == 0 and max(map(len, out.splitlines())) <= 80
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:1] == ["model"]) + 2
    rows = lines[start:next(i for i in range(start, len(lines)) if not lines[i].strip())]  # the by-model table
    first = next(i for i, line in enumerate(rows) if line.split()[0].startswith("openrouter/"))
    pieces = [rows[first].split()[0]] + [line.strip() for line in rows[first + 1:] if len(line.split()) == 1]
    assert "".join(pieces) == long_name and len(pieces) > 1
    assert all(piece[-1] in "/-:" for piece in pieces[:-1]), pieces  # a break only after a separator
    assert rows[first].split()[1:] == ["1", "1,234,567", "0", "98,765", "0", "$12.3456", "$0.0000"]


def test_the_report_counts_failed_calls_and_shows_a_cheap_call_s_cost(tmp_path, capsys, monkeypatch) -> None:
    from router_middleware.ledger import LedgerRecord

    ledger = tmp_path / "l.db"
    db = open_ledger(str(ledger))
    db.insert([LedgerRecord(ts=time.time(), model="gpt-4o-mini-2024-07-18", requested_model="coder",
                            target="openai/gpt-4o-mini", input_tokens=9, output_tokens=20, cost_usd=0.0000135),
               LedgerRecord(ts=time.time(), model="openai/gpt-4o-mini", requested_model="coder",
                            target="openai/gpt-4o-mini", error="RateLimitError", ended="failed"),
               LedgerRecord(ts=time.time(), model="gpt-4o-mini", requested_model="gpt-4o-mini", input_tokens=9,
                            cost_usd=0.0000014, error="StreamLeft", ended="stopped")])  # an older row: no target
    db.close()
    monkeypatch.setenv("COLUMNS", "160")
    code, out, _ = run(capsys, "report", "--ledger", str(ledger))
    assert code == 0 and out.startswith("3 calls (1 failed, 1 stopped by their caller), cost $0.000015 (")
    # by the model each call was sent to, with the answered calls sent there (the provider names its
    # answers otherwise); a stream its caller left is no failure
    assert "failed calls by target: openai/gpt-4o-mini 1 of 2" in out
    monkeypatch.setenv("COLUMNS", "80")  # too narrow for the headline: a phrase a line, none cut in two
    out = run(capsys, "report", "--ledger", str(ledger))[1]
    assert out.splitlines()[:3] == ["3 calls (1 failed, 1 stopped by their caller),",
                                    "cost $0.000015 ($0.0000 without the middleware),",
                                    "response-cache hit rate 0.0%"]
    code, out, _ = run(capsys, "report", "--ledger", str(ledger), "--json")
    totals = json.loads(out)["totals"]
    assert (totals["failed_calls"], totals["stopped_calls"], totals["unpriced_calls"]) == (1, 1, 0)
    assert run(capsys, "report", "--ledger", str(ledger), "--html", str(tmp_path / "r.html"))[0] == 0
    page = (tmp_path / "r.html").read_text()  # the HTML report says the same
    assert "<p>3 calls (1 failed, 1 stopped by their caller)," in page and "<th>stopped calls</th>" in page


def test_a_model_with_no_price_costs_unknown_in_the_report(tmp_path, capsys, monkeypatch) -> None:
    """Its answered calls have no price, and one of its calls was stopped before any token came (no
    cost either, nothing used): its cost is unknown, never $0."""
    from router_middleware.ledger import LedgerRecord

    ledger = tmp_path / "l.db"
    db = open_ledger(str(ledger))
    db.insert([LedgerRecord(ts=time.time(), model="my-local-llm", requested_model="my-local-llm", input_tokens=900,
                            output_tokens=300),
               LedgerRecord(ts=time.time(), model="my-local-llm", requested_model="my-local-llm", error="StreamLeft",
                            ended="stopped")])
    db.close()
    monkeypatch.setenv("COLUMNS", "120")
    code, out, _ = run(capsys, "report", "--ledger", str(ledger))
    row = next(line for line in out.splitlines() if line.lstrip().startswith("my-local-llm"))
    assert code == 0 and row.split()[-2:] == ["unknown", "unknown"], row
    assert "1 call has no price (model my-local-llm)" in out


def test_report_on_a_missing_ledger_is_an_error_and_creates_nothing(tmp_path, capsys) -> None:
    code, _, err = run(capsys, "report", "--ledger", str(tmp_path / "nope.db"))
    assert code == 2 and "no ledger at" in err and not (tmp_path / "nope.db").exists()


def _errors(tmp_path: Path) -> list[tuple[list[str], str]]:
    not_db = tmp_path / "notes.txt"
    not_db.write_text("hello")
    ledger = tmp_path / "ok.db"
    open_ledger(str(ledger)).close()
    empty, latin, bad_yaml = tmp_path / "empty.csv", tmp_path / "latin.csv", tmp_path / "bad.yaml"
    empty.write_text("")
    latin.write_bytes(b"prompt,a,b\ncaf\xe9,1,0\n")
    bad_yaml.write_text("routing:\n  aliases:\n    auto: [a\n  x: 1\n")
    (tmp_path / "folder").mkdir()
    return [
        (["route-eval", str(tmp_path / "missing.csv"), "--weak", "a", "--strong", "b"], "missing.csv: no such file or folder"),
        (["route-eval", str(tmp_path / "folder"), "--weak", "a", "--strong", "b"], "a folder with no .csv files"),
        (["route-eval", str(tmp_path / "*.nothing"), "--weak", "a", "--strong", "b"], "no CSV files matched"),
        (["route-eval", str(empty), "--weak", "a", "--strong", "b"], "empty.csv: empty file (no header row)"),
        (["route-eval", str(latin), "--weak", "a", "--strong", "b"], "latin.csv: not UTF-8 text (byte 0xe9"),
        (["report", "--ledger", str(tmp_path / "no" / "such" / "x.db")], "no ledger at"),
        (["report", "--ledger", "mysql://u@host/db"], "unsupported scheme 'mysql'"),
        (["report", "--ledger", str(not_db)], "notes.txt' is not a SQLite database"),
        (["report", "--ledger", "postgresql://u:secret@127.0.0.1:1/db"], "cannot open the PostgreSQL ledger"),
        (["report", "--ledger", str(ledger), "--html", str(tmp_path / "no" / "r.html")], "does not exist"),
        (["report", "--ledger", str(ledger), "--since", "yesterday"], "--since 'yesterday': expected a date"),
        (["replay", *bundled_sessions(), "--ledger", str(tmp_path / "no" / "x.db")], "cannot be opened"),
        # config refuses a scheme without '//' (read as a file path: sqlite:y.db was a file of that name)
        (["replay", *bundled_sessions(), "--ledger", f"sqlite:{tmp_path}/y.db"], "'sqlite:' with no '//' after it"),
        (["report", "--ledger", "sqlite:///"], "this one names no file"),
        (["replay", *bundled_sessions(), "--config", str(bad_yaml)],
         "bad.yaml: line 4, column 4: not valid YAML: expected ',' or ']'"),
    ]


def test_errors_are_one_line_naming_the_file_or_option(tmp_path, capsys) -> None:
    for argv, expected in _errors(tmp_path):
        started = time.perf_counter()
        code, out, err = run(capsys, *argv)
        assert code == 2, argv
        assert err.startswith("router-middleware: error: ") and err.count("\n") == 1, (argv, err)
        assert expected in err, (argv, err)
        assert "secret" not in err
        if argv[0] == "replay":
            assert time.perf_counter() - started < 20 and out == ""  # refused before replaying


def test_route_eval_warns_when_both_models_score_the_same(tmp_path, capsys) -> None:
    same = tmp_path / "same.csv"
    same.write_text("prompt,a,b\nx,1,1\ny,0,0\n")
    code, out, err = run(capsys, "route-eval", str(same), "--weak", "a", "--strong", "b")
    assert code == 0 and "APGR and CPT are meaningless" in err
    assert out.startswith("heuristic scorer, 2 prompts: APGR")  # which scorer the numbers are of


@pytest.mark.parametrize(("config", "extra", "module"), [
    ({"store": "redis://127.0.0.1:1/0"}, "redis", "redis"),
    ({"ledger": {"url": "postgresql://u@127.0.0.1:1/db"}}, "postgres", "psycopg"),
    ({"cache": {"enabled": True, "semantic": {"enabled": True}}}, "semantic", None),
])
def test_a_missing_extra_is_named_at_config_load(monkeypatch, config, extra, module) -> None:
    import importlib.util

    from router_middleware import semantic

    missing = module or semantic.LOCAL_MODEL_MODULES[0]
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == missing else real(name, *a))
    with pytest.raises(MissingExtra, match=rf"pip install 'router-middleware\[{extra}\]'"):
        Pipeline.from_config(config)


def test_litellm_imported_first_warns_and_prices_stay_on_the_bundled_map(monkeypatch) -> None:
    import litellm
    from litellm.litellm_core_utils import get_model_cost_map as loader

    from router_middleware import _env, catalog

    monkeypatch.delenv("LITELLM_LOCAL_MODEL_COST_MAP", raising=False)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        _env.prepare_litellm_env()
    assert any("LITELLM_LOCAL_MODEL_COST_MAP=True" in str(w.message) for w in caught)
    monkeypatch.setattr(loader, "get_model_cost_map_source_info", lambda: {"source": "remote"})
    monkeypatch.setattr(litellm, "model_cost", {"remote-only-model": {"input_cost_per_token": 1.0}})
    prices = catalog._cost_map.__wrapped__()  # the function under its process-wide cache
    assert "remote-only-model" not in prices and "gpt-4o" in prices
    monkeypatch.setattr(loader, "get_model_cost_map_source_info", lambda: {"source": "local"})
    assert catalog._cost_map.__wrapped__() is litellm.model_cost  # litellm loaded the bundled map itself


@pytest.mark.parametrize("app_imports_litellm", [True, False])
def test_an_application_s_own_litellm_keeps_its_debug_setting(app_imports_litellm) -> None:
    """An application that imported litellm and set ``suppress_debug_info`` keeps its setting (before,
    each pipeline call set it back to True); where the package imports litellm, the banner litellm
    prints on each failed call is off. The package's own probe of a name litellm cannot place (a
    config's alias target) prints nothing either way (litellm prints its provider list there)."""
    first = "import litellm; litellm.suppress_debug_info = False; " if app_imports_litellm else ""
    script = (f"{first}import router_middleware as rm, sys; "
              "rm.Pipeline.from_config({'routing': {'aliases': {'local': ['llama3-local']}}}); "
              "rm.Pipeline().completion(model='gpt-4o-mini', messages=[{'role': 'user', 'content': 'hi'}], "
              "mock_response='ok'); print(sys.modules['litellm'].suppress_debug_info)")
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120,
                          env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == [str(not app_imports_litellm)]


def test_a_reader_that_leaves_the_pipe_early_gets_no_traceback(tmp_path, capsys) -> None:
    """``report --json | head -c 10``: the reader closes the pipe before the report is written; the
    command ends quietly with status 1 (as other command-line tools do), with no traceback."""
    ledger = tmp_path / "l.db"
    assert run(capsys, "replay", str(unknown_model_session(tmp_path)), "--ledger", str(ledger))[0] == 0
    read, write = os.pipe()
    os.close(read)  # the reader has left before anything is written
    try:
        done = subprocess.run([sys.executable, "-m", "router_middleware", "report", "--ledger", str(ledger), "--json"],
                              stdout=write, stderr=subprocess.PIPE, text=True, timeout=120,
                              env={**os.environ, "LITELLM_LOCAL_MODEL_COST_MAP": "True"})
    finally:
        os.close(write)
    assert (done.returncode, done.stderr) == (1, "")


def test_the_replay_table_keeps_a_long_session_id_whole_on_more_lines() -> None:
    """A session id longer than the label column wraps after a separator onto the block's next lines
    (it was cut with '…', so two long ids that began alike read the same); the account rows beside
    it stay as they were, and every line stays within 80 columns."""
    from router_middleware.cli.tables import WIDTHS, _block

    session = "cline-2025-06-01T12:30:00-refactor-the-parser"
    rows = [("baseline", "1,000", "0%", "$0.0100", ""), ("optimized", "800", "0%", "$0.0080", "x0.800")]
    lines = _block([session, "gpt-4o-mini", "12 calls"], rows)
    labels = [line[:WIDTHS[0]].rstrip() for line in lines]
    assert "".join(labels[:-2]) == session and len(labels) > 3 and "…" not in "".join(lines)
    assert labels[-2:] == ["gpt-4o-mini", "12 calls"] and all(len(line) <= 80 for line in lines)
    assert lines[0].split()[1:] == ["baseline", "1,000", "0%", "$0.0100"]
    assert all(label[-1] in "-:" for label in labels[:-3])  # broken only after a separator


@pytest.mark.parametrize("store", ["sqlite", "redis"])
def test_budgets_says_what_each_budget_has_spent_or_holds_and_what_is_left(store, tmp_path, capsys, request) -> None:
    """An operator could see how much of a budget was left only by reading the store's keys. ``budgets``
    reads each budget's counter for the labels given (what the calls spent, and what calls in flight
    hold), its limit and what is left; a budget whose scope they do not name says which option does."""
    import json

    from router_middleware import Pipeline

    url = f"sqlite:///{tmp_path / 'store.db'}" if store == "sqlite" else request.getfixturevalue("redis_url")
    config = tmp_path / "router.yaml"
    config.write_text(f"app: coder\nstore: {url}\nrouting:\n  budgets:\n"
                      "    - {name: per-user, scope: user, tokens: 1000, window_s: 86400}\n"
                      "    - {name: team, scope: tenant, usd: 5}\n")
    pipeline = Pipeline.from_config(str(config))
    spent = [pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}],
                                 mock_response="ok", context={"user": user, "tenant": "acme"}).usage.total_tokens
             for user in ("ann", "ann", "bo")]
    pipeline.close()
    capsys.readouterr()  # the calls' own log lines, where an earlier test had structlog print them
    code, out, _ = run(capsys, "budgets", "--config", str(config), "--user", "ann", "--tenant", "acme", "--json")
    rows = {r["budget"]: r for r in json.loads(out)}
    assert code == 0 and rows["per-user"]["whose"] == "ann" and rows["per-user"]["spent_or_held"] == sum(spent[:2])
    assert rows["per-user"]["left"] == 1000 - sum(spent[:2]) and 0 < rows["per-user"]["resets_in_s"] <= 86400
    assert rows["team"]["whose"] == "acme" and 0 < rows["team"]["spent_or_held"] < 0.001
    assert rows["team"]["resets_in_s"] is None  # no window: it never starts over
    code, out, _ = run(capsys, "budgets", "--config", str(config))
    assert code == 0 and "(pass --user)" in out and "(pass --tenant)" in out


def test_budgets_refuses_a_config_it_cannot_read_budgets_from(tmp_path, capsys) -> None:
    """A memory store, no budgets, a store no call has used (none is made), a Redis that does not answer:
    one line each, exit code 2."""
    config = tmp_path / "router.yaml"
    config.write_text("routing: {budgets: [{name: day, usd: 1}]}\n")
    code, _, err = run(capsys, "budgets", "--config", str(config))
    assert code == 2 and "store 'memory://' lives in the process that makes the calls" in err
    config.write_text("app: x\n")
    code, _, err = run(capsys, "budgets", "--config", str(config))
    assert code == 2 and "the config has no routing.budgets" in err
    config.write_text(f"store: sqlite:///{tmp_path / 'none.db'}\nrouting: {{budgets: [{{name: day, usd: 1}}]}}\n")
    code, _, err = run(capsys, "budgets", "--config", str(config))
    assert code == 2 and "no store at sqlite:///" in err and not (tmp_path / "none.db").exists()  # none made
    ledger = tmp_path / "ledger.db"  # the ledger given as the store, by mistake: it got the store's tables
    assert run(capsys, "replay", bundled_sessions()[0], "--ledger", str(ledger))[0] == 0
    config.write_text(f"store: sqlite:///{ledger}\nrouting: {{budgets: [{{name: day, usd: 1}}]}}\n")
    code, _, err = run(capsys, "budgets", "--config", str(config))
    assert code == 2 and "is not a router-middleware store (no kv table): left as it is" in err
    with sqlite3.connect(ledger) as db:
        assert not db.execute("SELECT name FROM sqlite_master WHERE name IN ('kv', 'holds', 'lists')").fetchall()
    from .conftest import _free_port

    config.write_text(f"store: redis://127.0.0.1:{_free_port()}/0\nrouting: {{budgets: [{{name: day, usd: 1}}]}}\n")
    code, _, err = run(capsys, "budgets", "--config", str(config))
    assert code == 2 and "ConnectionError" in err and "Traceback" not in err


def test_report_and_drain_leave_a_database_that_is_no_ledger_as_it_is(tmp_path, capsys) -> None:
    """``report`` on an empty file, or on another program's SQLite database, added the ledger's tables
    to it and said "0 calls"; ``ledger drain`` took any URL scheme and said "nothing to drain"."""
    import sqlite3

    empty, other = tmp_path / "empty.db", tmp_path / "other.db"
    empty.touch()
    with sqlite3.connect(other) as db:
        db.execute("CREATE TABLE foo (x INTEGER)")
    for path in (empty, other):
        before = path.read_bytes()
        code, _, err = run(capsys, "report", "--ledger", str(path))
        assert code == 2 and "is not a router-middleware ledger (no calls table)" in err
        assert path.read_bytes() == before
    for url in ("mysql://u@db/ledger", "ftp://x/y"):
        code, out, err = run(capsys, "ledger", "drain", "--ledger", url)
        assert code == 2 and "unsupported scheme" in err and "nothing to drain" not in out


def test_replay_reports_a_session_with_no_calls(tmp_path, capsys) -> None:
    """Its ``--json`` report divided by its zero calls (a ZeroDivisionError's traceback)."""
    session = json.loads(Path(bundled_sessions()[0]).read_text())
    path = tmp_path / "no-calls.json"
    path.write_text(json.dumps({**session, "calls": []}))
    code, out, err = run(capsys, "replay", str(path), "--json")
    assert code == 0 and json.loads(out)["calls"] == 0 and "Traceback" not in err


def test_a_ledger_file_named_like_a_scheme_is_a_file_path() -> None:
    """A review: the check for a scheme missing its '//' refused a bare file name close to one
    (``sqlitedb``, ``postgres``), a ledger file that report and drain had opened before."""
    from router_middleware.urls import ledger_url_problem

    assert ledger_url_problem("sqlitedb") is None and ledger_url_problem("postgres") is None
    assert "with no '//' after it" in (ledger_url_problem("sqlite:x.db") or "")
