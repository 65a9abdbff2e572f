"""What reaches the provider behind the real LiteLLM proxy, with router-middleware's hook and
without it: a client asking for a ``model_name`` of the proxy (Cline set up with the proxy's name
for a model, not a routing alias) must send what it sends without the hook, when no rule asks for
a change. The upstream is tests/capture_server.py, which records each request body (and answers
500: nothing here imitates a provider's answer)."""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from router_middleware import Pipeline

from .capture_server import capture_server
from .conftest import service_missing
from .litellm_proxy import proxy_missing, running_proxy

MODELS = {"g5": "openai/gpt-5-mini", "sonnet": "anthropic/claude-sonnet-4-5", "flash": "gemini/gemini-2.5-flash",
          "ds": "deepseek/deepseek-chat"}
TOOLS = [{"type": "function", "function": {"name": "bash", "description": "run a command", "parameters": {
    "type": "object", "properties": {"cmd": {"type": "string"}}, "required": ["cmd"]}}}]
MESSAGES = [{"role": "system", "content": "You are Cline, a coding agent."},
            {"role": "user", "content": [{"type": "text", "text": "<task>list the files</task>"}]},
            {"role": "assistant", "content": "I'll list them.", "tool_calls": [
                {"id": "call_1", "type": "function", "function": {"name": "bash", "arguments": '{"cmd": "ls"}'}}]},
            {"role": "tool", "tool_call_id": "call_1", "content": "a.py\nb.py"}]
REQUEST = {"messages": MESSAGES, "tools": TOOLS, "stream": True, "stream_options": {"include_usage": True},
           "reasoning_effort": "high"}
OURS = ("prompt_cache_key", "metadata")  # what the hook adds: a cache key, its labels


def _config(upstream: str, hook: bool) -> str:
    lines = ["model_list:"]
    for name, model in MODELS.items():
        lines += [f"  - model_name: {name}", "    litellm_params:", f"      model: {model}",
                  f"      api_base: {upstream}", "      api_key: sk-upstream"]
    lines += ["litellm_settings:", "  drop_params: true", "  num_retries: 0"]
    lines += ["  callbacks: router_hook.handler"] if hook else []
    lines += ["general_settings:", "  master_key: os.environ/LITELLM_MASTER_KEY"]
    return "\n".join(lines) + "\n"


def _sent(tmp_path: Path, hook: bool, keyed: set[str] | None = None) -> dict[str, dict[str, Any]]:
    """Per model_name, the body the provider got for ``REQUEST`` (``keyed``: gets the names whose body
    carried a ``prompt_cache_key``)."""
    folder = tmp_path / ("hook" if hook else "bare")
    folder.mkdir()
    (folder / "router.yaml").write_text("app: wire\n")
    found: dict[str, dict[str, Any]] = {}
    with capture_server() as (upstream, bodies):
        (folder / "config.yaml").write_text(_config(upstream, hook))
        with running_proxy(folder, {"ROUTER_MIDDLEWARE_CONFIG": str(folder / "router.yaml")},
                           folder / "config.yaml") as base:
            for name in MODELS:
                bodies.clear()
                request = urllib.request.Request(f"{base}/v1/chat/completions",
                                                 json.dumps({"model": name, **REQUEST}).encode(),
                                                 {"Authorization": "Bearer sk-proxy-master",
                                                  "Content-Type": "application/json"})
                with pytest.raises(urllib.error.HTTPError):  # the capture server answers 500
                    urllib.request.urlopen(request, timeout=60)
                assert len(bodies) == 1, (name, bodies)
                found[name] = {k: v for k, v in bodies[0].items() if k not in OURS}
                if keyed is not None and "prompt_cache_key" in bodies[0]:
                    keyed.add(name)
    return found


def test_a_proxy_model_name_gets_the_request_it_gets_without_the_hook(tmp_path) -> None:
    """Before, the hook planned the call for the name itself (``g5``), a model it knew nothing of:
    the client's ``reasoning_effort`` was dropped as unsupported for every model, so gpt-5-mini,
    Claude (its thinking budget), Gemini (its thinkingConfig) and DeepSeek (its thinking switch)
    answered without the reasoning asked for. Now the hook plans it for the model the name stands for, as the proxy's router sends it."""
    if (why := proxy_missing()) is not None:
        service_missing(why)
    keyed: set[str] = set()
    bare, hooked = _sent(tmp_path, hook=False), _sent(tmp_path, hook=True, keyed=keyed)
    assert keyed == set()  # the model_list's api_base is no OpenAI endpoint: no prompt_cache_key (Groq's 400)
    assert bare["g5"]["reasoning_effort"] == "high"  # what a direct call sends, for each provider
    assert bare["sonnet"]["thinking"]["type"] == "enabled"
    assert bare["flash"]["generationConfig"]["thinkingConfig"]["thinkingBudget"] > 0
    assert bare["ds"]["thinking"] == {"type": "enabled"}
    assert hooked == bare


def test_a_name_the_adapter_serves_is_planned_as_its_model_and_sent_under_its_name() -> None:
    """:meth:`Engine.serve`: the plan is made for the model behind the name (the reasoning policy
    keeps the effort a reasoning model accepts), and names the name as its deployment (what is sent,
    whose quotas and cooldown count); an alias of the config keeps its routing."""
    pipeline = Pipeline.from_config({"routing": {"aliases": {"coder": ["g5"]}}})
    pipeline.serve({"g5": "openai/gpt-5-mini", "coder": "openai/gpt-4o-mini"})
    plan = pipeline.plan(pipeline.make_call("g5", MESSAGES, None, {"reasoning_effort": "high"}))
    assert (plan.model, plan.deployment, plan.params["reasoning_effort"]) == ("openai/gpt-5-mini", "g5", "high")
    routed = pipeline.plan(pipeline.make_call("coder", MESSAGES, None, {}))
    assert (routed.model, routed.deployment) == ("openai/gpt-5-mini", "g5")
    assert pipeline.model_of("g5") == "openai/gpt-5-mini" and pipeline.model_of("coder") == "coder"


def test_the_proxy_s_model_for_a_name_is_its_base_model_and_a_known_name_is_never_made_unknown(monkeypatch) -> None:
    """Read from a real ``litellm.Router`` as the proxy's: an Azure deployment is judged by its
    ``model_info.base_model`` (as litellm prices it), and a name the catalog knows (``gpt-4o``) whose
    deployment's model it does not (an Azure deployment's own name) keeps being judged by its name."""
    import litellm

    from router_middleware import wire
    from router_middleware.litellm import RouterLogger

    def deployment(name: str, model: str, **info: str) -> dict[str, Any]:
        return {"model_name": name, "model_info": info, "litellm_params": {
            "model": model, "api_key": "k", "api_base": "http://127.0.0.1:9", "api_version": "2024-06-01"}}

    router = litellm.Router(model_list=[deployment("azure-4o", "azure/my-gpt4o", base_model="azure/gpt-4o"),
                                        deployment("gpt-4o", "azure/prod-gpt4o-east"),
                                        deployment("g5", "openai/gpt-5-mini")])
    monkeypatch.setattr(wire, "proxy_router", lambda: router)
    logger = RouterLogger(Pipeline.from_config({}), proxy=True)
    assert logger._proxy_names() is not None  # read, and the engine told
    engine = logger.pipeline
    assert [engine.model_of(n) for n in ("azure-4o", "gpt-4o", "g5")] == ["azure/gpt-4o", "gpt-4o", "openai/gpt-5-mini"]


def test_behind_the_proxy_a_model_name_on_another_endpoint_gets_no_prompt_cache_key(monkeypatch) -> None:
    """The hook reads each model_name's ``api_base`` from the proxy's router: an OpenAI model on Groq's
    endpoint gets no ``prompt_cache_key`` (Groq answers 400 "property 'prompt_cache_key' is
    unsupported": every request failed where the bare proxy's went through); one on OpenAI's API, or
    with no ``api_base``, gets the session's."""
    import asyncio

    import litellm

    from router_middleware import wire
    from router_middleware.litellm import RouterLogger

    def deployment(name: str, **base: str) -> dict[str, Any]:
        return {"model_name": name, "litellm_params": {"model": "openai/gpt-oss-120b", "api_key": "k", **base}}

    groq = "https://api.groq.com/openai/v1"
    from litellm.litellm_core_utils.credential_accessor import CredentialAccessor
    from litellm.types.utils import CredentialItem

    CredentialAccessor.upsert_credentials([CredentialItem(credential_name="groq-cred", credential_info={},
                                                          credential_values={"api_base": groq, "api_key": "k"})])
    router = litellm.Router(model_list=[deployment("groq", api_base=groq), deployment("groq-base-url", base_url=groq),
                                        deployment("groq-credential", litellm_credential_name="groq-cred"),
                                        deployment("unknown-credential", litellm_credential_name="nowhere"),
                                        deployment("mixed"), deployment("mixed", api_base=groq),  # load-balanced
                                        deployment("oai", api_base="https://api.openai.com/v1"), deployment("plain")])
    monkeypatch.setattr(wire, "proxy_router", lambda: router)
    logger = RouterLogger(Pipeline.from_config({}), proxy=True)

    def keyed(name: str) -> bool:
        data = {"model": name, "messages": MESSAGES, "litellm_call_id": f"call-{name}"}
        changed = asyncio.run(logger.async_pre_call_hook(None, None, data, "acompletion"))
        return "prompt_cache_key" in changed

    assert [keyed(name) for name in ("groq", "groq-base-url", "groq-credential", "unknown-credential", "mixed", "oai",
                                     "plain")] == [False, False, False, False, False, True, True]
