"""Behind the real LiteLLM proxy, a call's ``user`` and ``tenant`` are its proxy key's: the key's
``user_id`` and ``team_id`` (litellm writes them into the request's metadata, having removed any the
client sent), over the labels the client names. The keys here come from the proxy's own
``custom_auth`` hook (its virtual keys need a database), each bound to a user and a team as a virtual
key is; the master key belongs to nobody, and its calls keep the client's labels. The upstream
replays OpenAI's recorded answer (tests/fault_server.py, ``/healthy``)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from .conftest import service_missing
from .fault_server import fault_server
from .litellm_proxy import PROXY_DIR, proxy_missing, running_proxy
from .test_litellm_logger import _proxy_rows

KEYS = """
from litellm.proxy._types import UserAPIKeyAuth

KEYS = {"sk-alice": ("alice", "team-a"), "sk-bob": ("bob", "team-b"), "sk-ci": (None, "team-c")}


async def auth(request, api_key):
    if api_key == "sk-proxy-master":
        return UserAPIKeyAuth(api_key=api_key, user_id="default_user_id")
    user, team = KEYS[api_key]
    return UserAPIKeyAuth(api_key=api_key, user_id=user, team_id=team)
"""

# A call reserves about 35 tokens (its prompt and max_tokens 20) and spends 34 (the recording's usage):
# a user's second call does not fit in 60.
ROUTER = """
app: coding-agent
store: sqlite:///{tmp}/store.db
routing:
  aliases: {{coder: [coder-cheap]}}
  budgets: [{{name: per-user, scope: user, tokens: 60}}]
ledger: {{url: 'sqlite:///{tmp}/ledger.db'}}
"""


def _ask(base: str, key: str, **fields: Any) -> int:
    body = {"model": "coder", "max_tokens": 20, "messages": [{"role": "user", "content": "Tell me a joke"}], **fields}
    request = urllib.request.Request(f"{base}/v1/chat/completions", json.dumps(body).encode(),
                                     {"Authorization": f"Bearer {key}", "Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(request, timeout=60) as answer:
            answer.read()
            return answer.status
    except urllib.error.HTTPError as error:
        return error.code


def test_a_proxy_key_s_user_and_team_label_its_calls_over_what_the_client_names(tmp_path: Path) -> None:
    """Before, only the client's labels were read: alice, over her budget, was served again by naming
    another user in her request's metadata (or its OpenAI ``user`` field), and her rows said whatever
    tenant she claimed. Now her key's user holds her budget, and her rows carry her key's user and team;
    a team's key with no user cannot name one (it spent alice's budget in a first version)."""
    if (why := proxy_missing()) is not None:
        service_missing(why)
    (tmp_path / "router.yaml").write_text(ROUTER.format(tmp=tmp_path))
    (tmp_path / "team_keys.py").write_text(KEYS)
    config = (PROXY_DIR / "config.yaml").read_text()
    (tmp_path / "config.yaml").write_text(config.replace("general_settings:\n",
                                                         "general_settings:\n  custom_auth: team_keys.auth\n"))
    with fault_server() as (upstream, _seen):
        env = {"CHEAP_API_BASE": f"{upstream}/healthy/v1", "STRONG_API_BASE": f"{upstream}/healthy/v1",
               "CHEAP_API_KEY": "x", "STRONG_API_KEY": "x", "ROUTER_MIDDLEWARE_CONFIG": str(tmp_path / "router.yaml")}
        with running_proxy(tmp_path, env, tmp_path / "config.yaml") as base:
            statuses = [
                _ask(base, "sk-alice", metadata={"user": "bob", "tenant": "acme"}),
                _ask(base, "sk-alice", metadata={"user": "dave"}),  # her budget is full, whoever she names
                _ask(base, "sk-alice", user="erin"),
                _ask(base, "sk-bob", metadata={"user": "alice"}),  # bob's budget is his own
                _ask(base, "sk-ci", metadata={"user": "alice"}),  # a team's key names no user: no user's budget
                _ask(base, "sk-proxy-master", metadata={"user": "frank"}),  # the master key's calls: the client's
                _ask(base, "sk-proxy-master", metadata={"user": "frank"}),
                _ask(base, "sk-proxy-master", metadata={"user": "grace"}),
            ]
            rows = _proxy_rows(tmp_path, ("user_id", "tenant", "ended"), 5)
    assert statuses == [200, 429, 429, 200, 200, 200, 429, 200]
    assert [tuple(r.values()) for r in rows] == [("alice", "team-a", "complete"), ("bob", "team-b", "complete"),
                                                 (None, "team-c", "complete"), ("frank", None, "complete"),
                                                 ("grace", None, "complete")]


def _request(user: str | None = "bob", tenant: str | None = "acme", key_user: str | None = "alice",
             key_team: str | None = None, end_user: str | None = None) -> dict[str, Any]:
    """A chat request as the proxy hands it to the hook: the client's labels in ``metadata``, where the
    proxy also wrote its key's (as litellm_pre_call_utils.add_user_api_key_auth_to_request_metadata)."""
    metadata = {k: v for k, v in (("user", user), ("tenant", tenant)) if v is not None}
    metadata |= {"user_api_key_user_id": key_user, "user_api_key_team_id": key_team}
    return {"model": "coder", "messages": [{"role": "user", "content": "hi"}], "metadata": metadata,
            **({"user": end_user} if end_user else {})}


@pytest.mark.parametrize(("mode", "request_", "labels"), [
    ("only", _request(), {"user": "alice"}),
    ("first", _request(), {"user": "alice", "tenant": "acme"}),
    ("off", _request(), {"user": "bob", "tenant": "acme"}),
    ("only", _request(user=None, end_user="customer-7", key_user=None, key_team="team-c"), {"tenant": "team-c"}),
    ("first", _request(user=None, end_user="customer-7", key_user=None, key_team="team-c"),
     {"user": "customer-7", "tenant": "team-c"}),
    ("only", _request(key_user="default_user_id"), {"user": "bob", "tenant": "acme"}),  # the master key
])
def test_proxy_key_labels_says_whose_user_and_tenant_label_a_keyed_call(mode, request_, labels) -> None:
    """``proxy.key_labels``: ``only`` the key's (the default: a client cannot choose who pays), ``first``
    the key's over the client's, the client's where the key lacks one (a service's team key passing
    its customers as OpenAI's ``user``), ``off`` the client's alone."""
    from router_middleware import Pipeline
    from router_middleware.litellm import RouterLogger

    logger = RouterLogger(Pipeline.from_config({"proxy": {"key_labels": mode}}), proxy=True)
    found = logger._labels(request_)
    assert {k: found[k] for k in ("user", "tenant") if k in found} == labels


def test_two_users_whose_runs_open_alike_have_sessions_of_their_own() -> None:
    """The proxy derives a run's session from its opening messages: two developers who open with the
    same prompt shared one session (its budget, its prompt cache key), one refused for the other's
    spend. Their user and tenant now keep them apart; unlabelled runs keep the session they had."""
    from router_middleware import Pipeline
    from router_middleware.litellm import RouterLogger, run_labels

    logger = RouterLogger(Pipeline.from_config({}), proxy=True)
    alice, carol = (logger._labels(_request(user=None, tenant=None, key_user=k), derive=True)["session_id"]
                    for k in ("alice", "carol"))
    master = logger._labels(_request(user=None, tenant=None, key_user="default_user_id"), derive=True)
    assert alice != carol and master["session_id"] == run_labels([{"role": "user", "content": "hi"}])["session_id"]


def test_a_client_label_the_key_replaces_is_said_once_per_key_with_both_values() -> None:
    """Said once per process it named neither value, and a second key's clients went unsaid."""
    import structlog

    from router_middleware import Pipeline
    from router_middleware.litellm import RouterLogger

    logger = RouterLogger(Pipeline.from_config({}), proxy=True)
    with structlog.testing.capture_logs() as logs:
        for team in ("said-t1", "said-t2", "said-t2"):
            logger._labels(_request(user="bob", tenant="acme", key_user=None, key_team=team))
    said = [(e["label"], e["key"], e["claimed"]) for e in logs if e["event"] == "proxy_label_from_key"]
    assert said == [("user", None, "bob"), ("tenant", "said-t1", "acme"), ("user", None, "bob"),
                    ("tenant", "said-t2", "acme")]
