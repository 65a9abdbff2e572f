"""The engine: the components built from a config, and every decision about a call that is not
part of one call's lifecycle (as httpx's base client): how a call is made from user input, how it
is planned and re-planned for a fallback, and how a plan becomes litellm's keyword arguments."""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from . import wire
from .assembly import assemble, unpriced_target
from .bookkeeping.keys import INPUT_RATIO, OUTPUT
from .config import Config, load_config
from .context.breakpoints import count_marks, uses_explicit_cache
from .context.summarize import SIDE_CALL, summary_request
from .errors import MissingKeyError
from .fit import fit_history_plan, fit_plan
from .lifecycle import Answers, CallLifecycle, Reader, RoutersOwn
from .memo import conversation_of
from .messages import nonempty, repair_messages, validate_messages
from .params import check_model, check_params, choices_asked, output_cap, usage_asked
from .policies import Policy, PolicyState, apply_policies
from .pricing import price
from .reasoning.policy import thinking_budget
from .routing.budgets import input_estimate, output_estimate
from .stores import MemoryStore, Prefetch, Store
from .stores.views import Sink, view_fields
from .telemetry import CallTrace
from .telemetry.tracing import SideCall
from .tokens import encoder_for
from .types import AgentContext, Call, ContextTokens, Decision, Plan, SummaryJob, Usage

# Providers that send a final usage chunk only when asked with stream_options.include_usage.
_USAGE_CHUNK_PROVIDERS = frozenset({
    "openai", "azure", "deepseek", "openrouter", "text-completion-openai", "anthropic", "gemini", "vertex_ai",
})


_KINDS, _READS_PER_KIND = 1024, 64
# How long a provider keeps a prompt's prefix cached after its last request: five minutes, the least
# of OpenAI's and Anthropic's defaults (DeepSeek keeps it hours; Anthropic's 1-hour cache is asked for).
PROMPT_CACHE_S = 300.0
_CONVERSATIONS = 10_000  # conversations remembered as sent (then the least recently sent go)


def _conversation(plan: Plan) -> tuple[str, int] | None:
    """The key of ``plan``'s conversation at its target: the target (deployment, else model) and a hash
    of the session, else of the conversation's opening (:func:`.memo.conversation_of`); ``None`` for a
    text that cannot be hashed."""
    call = plan.call
    try:
        return plan.deployment or plan.model, hash(call.context.session_id or conversation_of(call.messages))
    except TypeError:
        return None


def _kind(call: Call) -> tuple[str | None, ...]:
    """What decides which store keys planning reads: the model asked for and the context's labels
    (budgets are scoped by app, tenant, session or user; reasoning and affinity by session)."""
    context = call.context
    return call.model, context.app, context.session_id, context.user, context.tenant


class Engine:
    """Holds the components (``config``, ``catalog``, ``policies``, ``store``, ``state``,
    ``telemetry``, ``ledger``, ``cache``, and ``books``, the :class:`~.bookkeeping.Bookkeeper`)."""

    def __init__(self, config: Config | Mapping[str, Any] | str | Path | None = None, *,
                 policies: Sequence[Policy] | None = None) -> None:
        """``config``: a :class:`Config`, or what :func:`~.config.load_config` reads (a dict, a YAML or
        JSON path; a bad one raises ``ConfigError``); ``None`` is the pass-through."""
        parts = assemble(config if config is None or isinstance(config, Config) else load_config(config), policies)
        self.config = parts.config
        self.catalog = parts.catalog
        self.policies = parts.policies
        self.store = parts.store
        self.state = parts.state
        self.telemetry = parts.telemetry
        self.ledger = parts.ledger
        self.cache = parts.cache
        self.books = parts.books
        self.summaries = self.state.summaries
        self.reasoning_spent = self.state.reasoning_spent
        self._timed = bool(self.config.routing.aliases or self.config.routing.budgets)
        # A store outside this process can block: the async drivers keep it off the event loop.
        self.store_blocks = any(not isinstance(s, MemoryStore) for s in self._stores())
        # Such a store is read ahead of each plan (one fetch), never by the policies themselves.
        self.prefetching = not isinstance(self.store, MemoryStore)
        self._reads: dict[tuple[str | None, ...], dict[str, tuple[bool, Sink]]] = {}  # see reads_of
        # (target, conversation) -> when it last answered one of the conversation's requests here
        self._sent: OrderedDict[tuple[str, int], float] = OrderedDict()
        self._sent_lock = threading.Lock()
        self._views = view_fields(self.state)  # the state's fields a prefetch reads through
        self._unpriced = parts.unpriced  # said at the first call, but the names an adapter serves by then
        self.shadowed: dict[str, str] = {}  # a name the adapter serves that is also an alias -> its model (serve)

    def serve(self, models: Mapping[str, str], endpoints: Mapping[str, str] | None = None,
              groups: Mapping[str, str] | None = None) -> None:
        """Names the adapter sends to (the LiteLLM proxy's model names), each with the model it
        stands for. A call or a fallback naming one that is no alias or deployment of the config is
        planned, priced and judged as that model (its window, reasoning, parameters) and sent under
        its name, as a deployment of the config is; its quotas and cooldown are the name's. A name the
        catalog knows whose model it does not (an Azure deployment's own name) stays judged by its name.
        ``endpoints``: where the adapter sends some of the names (a base URL, over the config's
        deployment's own, and added to those told before), which decides whether a call there gets a
        ``prompt_cache_key``. ``groups``: names that stand for another name the adapter serves (the
        proxy's ``model_group_alias``): a call sent to one (under its own name) also counts toward
        the quotas and cooldown of the name it stands for, and is not sent while that one cools down
        (else an alias would pass the quotas of the name it stands for, and hide its failures)."""
        routes, known = set(self.config.routing.route_names()), self.catalog.resolve
        self.state.groups = self.books.groups = {name: group for name, group in (groups or {}).items() if name != group}
        judged = {name: model for name, model in models.items()
                  if name != model and (known(model) is not None or known(name) is None)}
        self.state.served = {name: model for name, model in judged.items() if name not in routes}
        deployments = self.config.routing.deployments
        self.shadowed = {name: model for name, model in judged.items() if name in routes and name not in deployments}
        self.books.served = self.state.served
        if endpoints:  # in place: the telemetry settings share the map (spans' ``server.address``)
            self.state.endpoints.update(endpoints)

    def make_call(self, model: str, messages: Sequence[Any], context: AgentContext | Mapping[str, Any] | None,
                  params: Mapping[str, Any], *, litellm_sends: bool = True) -> Call:
        """A validated :class:`Call`, its ``user`` the request's OpenAI ``user`` field where ``context``
        names none; raises ``MessageError`` or ``RequestError`` naming the bad input.
        With ``messages.repair_tool_calls``, broken tool-call integrity is mended instead, and the
        call carries a ``messages:repair`` decision saying what was changed. ``litellm_sends=False``:
        another client sends it (an agent's own chat model), so content parts and tools litellm would
        refuse pass."""
        if self.config.app and isinstance(context, Mapping) and context.get("app") is None:
            context = {**context, "app": self.config.app}  # built once, not built and then replaced
        ctx = AgentContext.coerce(context)
        if ctx.app is None and self.config.app:
            ctx = replace(ctx, app=self.config.app)
        if ctx.user is None and isinstance(user := params.get("user"), str) and user:
            ctx = replace(ctx, user=user)  # OpenAI's own field names the end user the request is for
        if not self.config.messages.repair_tool_calls:
            return Call.create(check_model(model), nonempty(validate_messages(messages, parts=litellm_sends)),
                               check_params(params, litellm_sends=litellm_sends), ctx)
        valid, repairs = repair_messages(messages, parts=litellm_sends)
        nonempty(valid)
        decisions = [Decision("messages", "repair", repairs.describe(), {
            "dropped_results": len(repairs.dropped), "placeholder_results": len(repairs.answered),
            "tool_call_ids": ",".join(p.call_id for p in (*repairs.dropped, *repairs.answered))})] if repairs else []
        return Call.create(check_model(model), valid, check_params(params, litellm_sends=litellm_sends), ctx, decisions)

    def plan(self, call: Call, state: PolicyState | None = None, prefetch: Prefetch | None = None,
             pinned: bool = False, served: bool = False) -> Plan:
        """Apply the policies to ``call`` (no I/O: store-backed state is read through views, or through
        ``prefetch``, which never reads the store), then fit the params to the chosen model
        (:mod:`.fit`). ``pinned``: the caller sends its own model whatever the plan names, so no
        budget's soft limit downgrades it (:attr:`.PolicyState.pinned`). Raises ``NoRouteError`` when
        no candidate of an alias can serve the call, and ``RequestError`` for an alias suffix other
        than ``:floor`` or ``:nitro``. ``served``: the call names the adapter's own model of that name
        (:meth:`serve`), which an alias of the config shadows otherwise (the proxy router's own fallback)."""
        state = state or self.state
        changes = {} if prefetch is None else prefetch.views(state, self._views if state is self.state else None)
        if self._timed:
            changes["now"] = time.time()
        if pinned:
            changes["pinned"] = True
        if changes:
            state = state.but(**changes)  # one copy per plan
        plan = Plan.from_call(call)
        model = state.served.get(call.model) if state.served else None
        if model is None and served:
            model = self.shadowed.get(call.model)
        if model is not None:  # routing leaves a plan sent to the name it was asked for
            plan = plan.override(model=model, deployment=call.model)
        plan = apply_policies(plan, self.policies, state)
        return self._history_fitted(fit_plan(plan, wire.param_rules(plan.model),
                                              drops=choices_asked(plan.params) > 1 and wire.drops_params()))

    def replan(self, call: Call, target: str, decision: Decision, prefetch: Prefetch | None = None,
               served: bool = False) -> Plan:
        """The plan for a later attempt at ``target``, still recording what the caller asked for.
        ``target`` was chosen already (a fallback, a downgrade's alias): no soft limit moves it again.
        ``served``: ``target`` is the adapter's model of that name, not an alias (:meth:`plan`)."""
        plan = self.plan(call.override(model=target), prefetch=prefetch, pinned=True, served=served)
        plan = plan.override(call=call).decide(decision)
        return self._history_fitted(plan)

    def _history_fitted(self, plan: Plan) -> Plan:
        """``plan`` with its history fitted to its provider (:func:`.fit.fit_history`) when the router
        picked its model (an alias's target, a fallback, a tier); as it is when the caller named it."""
        if plan.model == self.model_of(plan.call.model):
            return plan
        return fit_history_plan(plan, self.catalog.provider(plan.model))

    def reads_of(self, call: Call) -> dict[str, tuple[bool, Sink]]:
        """The store keys that planning the last call like ``call`` (same model and context labels,
        session included) looked up: a new call fetches those the process does not keep before it
        is planned."""
        return self._reads.get(_kind(call), {})

    def remember_reads(self, call: Call, reads: dict[str, tuple[bool, Sink]]) -> None:
        """Keep ``reads``, what planning ``call`` looked up, for the next call like it (replacing what
        the last one looked up; a few dozen keys at most). A thousand kinds of call are kept, then the
        table starts over."""
        kind = _kind(call)
        keys = dict(list(reads.items())[:_READS_PER_KIND])  # a copy: the call's later replans add to ``reads``
        if len(self._reads) >= _KINDS and kind not in self._reads:
            self._reads.clear()
        self._reads[kind] = keys

    def start(self, call: Call, *, read: Reader | None = None, usable: Callable[[str], bool] | None = None,
              unusable: str = "not among the adapter's models", cache: bool = True, answers: Answers | None = None,
              fallback: bool = True, follow: tuple[str, ...] = (), caller_sends: bool = True,
              plan: Plan | None = None, sends_refused: Callable[[Exception], bool] | None = None,
              reroutes: bool = True, charges_timeouts: bool = True,
              routers_own: RoutersOwn | None = None) -> CallLifecycle:
        """The lifecycle of ``call``; drive its :meth:`~CallLifecycle.run` (see :mod:`.drivers`)."""
        if self._unpriced:
            self._say_unpriced()
        return CallLifecycle(self, call, read=read, usable=usable, unusable=unusable, cache=cache, answers=answers,
                             fallback=fallback, follow=follow, caller_sends=caller_sends, plan=plan,
                             sends_refused=sends_refused, reroutes=reroutes, charges_timeouts=charges_timeouts,
                             routers_own=routers_own)

    def _say_unpriced(self) -> None:
        """Say which alias targets have no price, once, at the first call: by then an adapter has said
        which names it serves (:meth:`serve`: the proxy's model names, the agent middleware's
        ``models``), and those are priced as the model each stands for."""
        unpriced, self._unpriced = self._unpriced, ()
        for alias, target in unpriced:
            if target not in self.state.served:
                unpriced_target(self.config, alias, target)

    def launch(self, plan: Plan, side_calls: Sequence[SideCall] = ()) -> tuple[Plan, CallTrace]:
        """The first attempt's plan with its context saving estimated (:meth:`context_priced`), and the
        call's trace (with the ``side_calls`` made for it)."""
        before, after = self.trimmed(plan)
        plan = self.context_priced(plan, before, after)
        return plan, CallTrace.start(self.telemetry, plan, self.catalog.provider(plan.model), before, after,
                                     side_calls=side_calls)

    def context_priced(self, plan: Plan, before: int | None = None, after: int | None = None) -> Plan:
        """``plan`` (an attempt's: the first, or a fallback's) with the context saving estimated: the
        tokens the policies kept out (``before`` less ``after``: :meth:`trimmed`), counted only when
        they changed the messages, and what the ledger measures the saving from."""
        if before is None or after is None:
            before, after = self.trimmed(plan)
        if not (before or after):
            return plan
        warm = self.state.provider_cache and self._sent_lately(plan)
        return plan.override(estimated_savings_usd=self.saving(plan.model, before - after),
                             context_tokens=self._context_tokens(plan, before, after, warm))

    def model_of(self, target: str) -> str:
        """The model id behind a routing target (a model id, a deployment name, or a name the adapter
        serves: :meth:`serve`)."""
        deployment = self.config.routing.deployments.get(target)
        return deployment.model if deployment else self.state.served.get(target, target)

    def request(self, plan: Plan, *, failover: bool = False) -> dict[str, Any]:
        """litellm kwargs for ``plan``: a deployment adds its endpoint, key (from the environment) and
        timeout (``MissingKeyError`` when its key's variable is unset or empty); a stream asks for the
        final usage chunk where the provider needs asking. ``failover``: another target follows this
        attempt, so the provider SDK's own retries are off unless the call sets ``max_retries`` (the
        OpenAI SDK retries twice, waiting out a Retry-After of up to a minute, before the call could
        fail over; the last target keeps them, as a direct call has them). Its metadata
        marks it as the pipeline's own (``SIDE_CALL``): a registered ``RouterLogger`` does not account
        it a second time. The mark is no string, which litellm never sends on (its preview features
        pass a call's string metadata to OpenAI)."""
        request = plan.request()
        request["metadata"] = {**(request.get("metadata") or {}), SIDE_CALL: True}
        deployment = self.config.routing.deployments.get(plan.deployment or "")
        if deployment is not None:
            if deployment.api_base:
                request["api_base"] = deployment.api_base
            if deployment.api_key_env:
                key = os.environ.get(deployment.api_key_env)
                if not key:  # litellm would send the provider's default key to this endpoint
                    raise MissingKeyError(plan.deployment or "", deployment.api_key_env)
                request["api_key"] = key
            if deployment.timeout_s:
                request.setdefault("timeout", deployment.timeout_s)
        if self.adds_usage_chunk(plan):
            request["stream_options"] = {"include_usage": True}
        if failover:
            request.setdefault("max_retries", 0)
        return request

    def adds_usage_chunk(self, plan: Plan) -> bool:
        """Whether :meth:`request` asks for a stream's final usage chunk that the caller did not ask
        for (the call's stream then reads it without yielding it)."""
        return bool(plan.params.get("stream")) and "stream_options" not in plan.params \
            and self.catalog.provider(plan.model) in _USAGE_CHUNK_PROVIDERS

    def usage_chunk_asked(self, plan: Plan) -> bool:
        """Is litellm asked for a stream's final usage chunk (by the caller, or by :meth:`request`)?
        Only that chunk carries the whole call's usage: a provider's own chunks may each carry part of
        it (input tokens in one, output tokens in a later one)."""
        return self.adds_usage_chunk(plan) or usage_asked(plan.params)

    def request_size(self, plan: Plan, fetched: Prefetch | None = None) -> tuple[int, int, int]:
        """Prompt tokens counted locally, and the estimates to reserve: prompt and output tokens, learned
        from this model's recent replies for the app once there are enough (output capped by
        ``max_tokens``; see ``routing.budgets.output_estimate`` and ``input_estimate``). A ``max_tokens``
        the caller did not give (the reasoning policy's, to fit a thinking budget) caps nothing: until
        replies are learned, the output reserved is ``default_output_tokens`` plus that budget. A request
        for ``n`` answers reserves ``n`` times the output of one."""
        counted = self.state.request_tokens(plan)
        routing, books, app = self.config.routing, self.books, plan.call.context.app
        sent, default = output_cap(plan.params), routing.default_output_tokens
        if sent is not None and output_cap(plan.call.params) is None:
            sent, default = None, default + (thinking_budget(plan.params) or 0)
        cap, answers = (sent[1] if sent is not None else None), choices_asked(plan.params)
        if not books.learns:
            return counted, counted, (cap or default) * answers
        share = routing.output_percentile
        output = output_estimate(books.recent(OUTPUT, plan.model, app, fetched), max_tokens=cap, default=default,
                                 share=share)
        ratios = books.recent(INPUT_RATIO, plan.model, app, fetched)
        return counted, input_estimate(counted, ratios, share=share), output * answers

    def estimate_usd(self, plan: Plan, tokens: int, output: int) -> float:
        """The cost of ``tokens`` in and ``output`` out on the plan's model (0 when it has no price)."""
        return price(Usage(tokens, output), self.catalog.resolve(plan.model)).total_usd or 0.0

    def trimmed(self, plan: Plan) -> tuple[int, int]:
        """The tokens of the call's messages and of the plan's, where the policies changed them; else 0, 0."""
        if plan.messages == plan.call.messages:
            return 0, 0
        session = plan.call.context.session_id
        return (self.state.tokens(plan.model, plan.call.messages, plan.call.tools, session),
                self.state.tokens(plan.model, plan.messages, plan.params.get("tools"), session))

    def _sent_lately(self, plan: Plan) -> bool:
        """Whether ``plan``'s target (its deployment, else its model: each endpoint's cache is its own)
        answered a request of the plan's conversation in the last :data:`PROMPT_CACHE_S` in this
        process (:meth:`sent`): then its provider still holds that request's prompt cached."""
        key = _conversation(plan)
        if key is None:  # a text that cannot be a key: unknown, taken as sent (the saving is not overstated)
            return True
        last = self._sent.get(key)
        return last is not None and time.monotonic() - last <= PROMPT_CACHE_S

    def sent(self, plan: Plan) -> None:
        """Note that ``plan``'s target took a request of its conversation (it answered, or began to):
        its provider has cached the prompt. The least recently noted go first past
        :data:`_CONVERSATIONS`."""
        if not self.state.provider_cache:
            return
        key = _conversation(plan)
        if key is None:
            return
        with self._sent_lock:
            self._sent[key] = time.monotonic()
            self._sent.move_to_end(key)
            while len(self._sent) > _CONVERSATIONS:
                self._sent.popitem(last=False)

    def _context_tokens(self, plan: Plan, before: int, after: int, warm: bool) -> ContextTokens:
        """What the ledger's context saving is priced from (:func:`.pricing.context_saving`): the
        untouched history as read from the provider's cache only where an earlier request of the
        conversation went there lately (``warm``)."""
        history = plan.call.messages
        last = next((i for i in range(len(history) - 1, -1, -1) if history[i].get("role") == "assistant"), 0)
        fresh = self.state.tokens(plan.model, history[last:], None, plan.call.context.session_id) if last else before
        cached = warm and (not uses_explicit_cache(plan.model) or bool(count_marks(history, plan.call.tools)))
        return ContextTokens(before, after, min(fresh, before), cached)

    def saving(self, model: str, tokens: int) -> float:
        """Tokens not sent, valued at the cache-read price (what they would most likely have cost)."""
        info = self.catalog.resolve(model)
        if info is None or tokens <= 0:
            return 0.0
        return tokens * (info.cache_read if info.cache_read is not None else info.input)

    def summary_request(self, job: SummaryJob, call_timeout: Any = None) -> dict[str, Any]:
        """The summary call's litellm kwargs, its transcript within the summary model's window."""
        settings = self.config.context
        info = self.catalog.resolve(settings.summary_model)
        window = info.max_input_tokens if info is not None else None
        return summary_request(job, settings.summary_model, settings.summary_params, call_timeout, window=window,
                               count=encoder_for(settings.summary_model) if window else None)

    def close(self) -> None:
        """Flush the ledger, close the response cache's and the engine's stores (call at shutdown)."""
        if self.ledger is not None:
            self.ledger.close()
        for store in self._stores():
            store.close()

    async def aclose(self) -> None:
        """:meth:`close` from a coroutine, on the loop that made the calls: a Redis store's asyncio
        client is closed there; the ledger is flushed in a worker thread."""
        if self.ledger is not None:
            await asyncio.to_thread(self.ledger.close)
        for store in self._stores():
            closer = getattr(store, "aclose", None)
            if closer is not None:
                await closer()
            else:
                await asyncio.to_thread(store.close)

    def _stores(self) -> list[Store]:
        """The engine's store and the response cache's, each once."""
        stores = {id(self.store): self.store}
        if self.cache is not None:
            stores.setdefault(id(self.cache.store), self.cache.store)
        return list(stores.values())
