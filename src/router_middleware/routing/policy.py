"""The routing policy: resolve an alias to candidates, drop those that cannot serve the request, order
the rest by the strategy, and record why each candidate won or lost.

Strategies: ``ordered`` (the alias's order), ``price`` (cheapest for this request: its own token
estimate at the input, cache-read and output prices), ``throughput`` / ``latency`` (exponentially
weighted averages of observed output tokens/s and time to first token, kept in the store),
``weighted`` (weighted random order, for load spreading), ``difficulty`` (the request's difficulty
score picks a tier alias). OpenRouter-style suffixes work on any alias: ``coder:floor`` sorts by
price, ``coder:nitro`` by observed throughput (falling back to the alias order when nothing has been
observed yet). With ``free_tier.prefer``, an OpenRouter candidate's ``:free`` variant is tried
first while the free quota lasts; targets whose quota (free tier, ``limits``, or what the provider's
headers said is left) is used up are rejected like any other candidate, so the call goes on to the
next one. A candidate refused only for cooling down stays a last resort: it follows the others in the
plan's fallbacks (the one whose cooldown ends first, first), so a call whose usable candidates all
fail is still sent where a direct call would go; when every candidate is refused and some only for
cooling down, the one of those whose cooldown ends first is tried first.

A candidate's window is judged on the request as it would be sent there: with ``fit`` (the context
policy, which the assembly passes when both are configured), a request over a candidate's window is
first trimmed for that candidate, and only what still does not fit rejects it.

Through tiers (``auto`` or the ``difficulty`` strategy), a session (``session_id``) has a floor and
a memory (:mod:`.affinity`): ``step_kind_tiers`` and an escalation after a failed step set the
lowest tier the step may use, and the target that answered the session's last call (read through
``PolicyState.sessions``) keeps the session unless it cannot serve the step, sits below that floor,
or a switch pays back within ``affinity.horizon_calls`` calls (``routing:stay`` / ``routing:switch``).
"""

from __future__ import annotations

import difflib
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from ..config import RoutingConfig
from ..errors import MaxTokensError, NoRouteError, RequestError
from ..fit import takes_n
from ..params import output_cap
from ..policies import Policy, PolicyState
from ..reasoning.signals import failure_signal, infer_step_kind
from ..reasoning.translate import REASONING_PARAMS, can_reason
from ..types import NO_CIRCUITS, Circuits, Decision, History, Plan, SessionRoute
from ..wire import param_rules
from .affinity import Escalation, escalation, switch
from .budgets import over_soft_limit
from .difficulty import request_text, score_request
from .fitted import load_fitted
from .quotas import exhausted, free_variant, quotas_for


def _uses_images(plan: Plan) -> bool:
    messages = plan.messages
    if isinstance(messages, History):  # kept with the history: weighed once however many candidates ask
        return messages.derived("uses_images", lambda: _has_images(messages))
    return _has_images(messages)


def _has_images(messages: Sequence[Mapping[str, Any]]) -> bool:
    for message in messages:
        content = message.get("content")
        if isinstance(content, list) and any(
            isinstance(p, Mapping) and p.get("type") in ("image_url", "image", "input_image") for p in content
        ):
            return True
    return False


def _cooled_until(name: str, state: PolicyState) -> float | None:
    """When ``name``'s cooldown ends, or that of the name it stands for (``state.groups``: the proxy's
    ``model_group_alias``), whichever is later; ``None`` when neither was cooled."""
    own = state.cooldowns.get(name)
    group = state.groups.get(name) if state.groups else None
    theirs = state.cooldowns.get(group) if group else None
    return own if theirs is None else theirs if own is None else max(own, theirs)


def _circuit(name: str, state: PolicyState) -> str:
    """Whose probe a call to half-open ``name`` claims: that of the name it stands for while that
    one's cooldown is on record (one probe for both names), else its own."""
    group = state.groups.get(name) if state.groups else None
    return group if group is not None and state.cooldowns.get(group) is not None else name


def _remembered(state: PolicyState, session_id: str) -> SessionRoute | None:
    """The session's last route, or ``None`` (none within its TTL, or a value this version cannot read)."""
    try:
        return state.sessions.get(session_id)
    except (ValueError, KeyError, TypeError):
        return None


SUFFIXES = {"floor": "price", "nitro": "throughput"}  # OpenRouter's shortcuts, on an alias


def _bad_suffix(requested: str, suffix: str) -> RequestError:
    close = difflib.get_close_matches(suffix, list(SUFFIXES), n=1, cutoff=0.5)
    hint = f"; did you mean ':{close[0]}'?" if close else ""
    return RequestError(f"model {requested!r}: an alias takes ':floor' (the cheapest target first) or ':nitro' "
                        f"(the fastest first), not ':{suffix}'{hint}")


@dataclass(frozen=True)
class Session:
    """A tiered call's session: its last route, whether it is remembered (``tracked``), and the lowest
    tier index this step needs (``floor``, -1: any) with why."""

    previous: SessionRoute | None
    tracked: bool
    floor: int
    floor_why: str
    escalation: Escalation


@dataclass(frozen=True)
class RoutingPolicy:
    config: RoutingConfig = field(default_factory=RoutingConfig)
    name: str = "routing"
    fit: Policy | None = None  # the context policy: what a candidate would be sent, for its window

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        requested = plan.call.model
        alias, _, suffix = self.config.split_route(requested)
        soft = None if state.pinned else over_soft_limit(self.config.budgets, state.budget_spent,
                                                         plan.call.context, state.now)
        downgrade = ""
        if soft is not None and soft.downgrade_to and alias != soft.downgrade_to:
            downgrade = f"budget {soft.name!r} past its soft limit: downgraded to {soft.downgrade_to}; "
            alias, suffix = soft.downgrade_to, ""
        if alias in self.config.deployments:  # a named deployment (also how fallbacks are re-planned)
            target = self.config.deployments[alias]
            return plan.decide(Decision(self.name, "deployment", f"deployment {alias} ({target.model})"),
                               model=target.model, deployment=alias)
        if plan.deployment == requested and not downgrade:  # the adapter's own model of that name (Engine.plan)
            return plan
        if alias not in self.config.aliases and not (alias == "auto" and self.config.tiers):
            return plan
        if suffix and suffix not in SUFFIXES:
            raise _bad_suffix(requested, suffix)
        strategy = SUFFIXES.get(suffix) or self.config.strategy.get(alias, "ordered")
        session: Session | None = None
        if alias == "auto" or strategy == "difficulty":
            index, score = self._tier(plan)
            scored = self.config.tiers[index]
            above = " (above every tier's max_score: the last)" if score > scored.max_score else ""
            note = f"difficulty {score:.2f} -> tier {scored.alias}{above}; "
            session = self._session(plan, state, index)
            if session.floor > index:
                index = session.floor
                note += f"{session.floor_why} -> tier {self.config.tiers[index].alias}; "
            alias = self.config.tiers[index].alias
            strategy = SUFFIXES.get(suffix) or self.config.strategy.get(alias, "ordered")  # auto:floor: cheapest
            plan = plan.decide(session.escalation.decision) if session.escalation.decision else plan
        else:
            note = ""
        note = downgrade + note
        candidates = self._candidates(alias)
        rejections: dict[str, str] = {}
        usable = []
        first = self._model(candidates[0], state) if candidates else requested
        estimate = state.tokens(first, plan.messages,
                                plan.params.get("tools"), plan.call.context.session_id)
        for model in candidates:
            why = self._rejection(model, plan, state, estimate)
            if why:
                rejections[model] = why
            else:
                usable.append(model)
        if not usable:
            capped = [m for m in candidates if rejections[m].startswith(_CAPS)
                      and self._rejection(m, plan, state, estimate, windowed=False) is None]
            usable, probe = self._probe(candidates, rejections, plan, state, estimate, capped)
            if not usable:
                if capped or all(why.startswith(_CAPS) for why in rejections.values()):
                    raise MaxTokensError(requested, rejections)  # the request's own cap: a 400
                raise NoRouteError(requested, rejections)
            note += probe
            rejections.pop(usable[0])
        ranked = self._rank(usable, strategy, plan, state, estimate)
        last = self._last_resort(candidates, rejections, ranked, plan, state, estimate)
        reason = f"{note}{strategy} strategy chose {ranked[0]} among {len(usable)} of {len(candidates)}"
        kept: Decision | None = None
        if session is not None and session.previous is not None and self.config.affinity.enabled \
                and session.previous.target != ranked[0]:
            ranked, kept = self._affinity(session, ranked, plan, state, estimate)
            if kept.action == "stay":
                reason += f"; the session stays on {ranked[0]}"
        chosen = ranked[0]
        lost = {m: "ranked lower" for m in ranked[1:]}
        rejections.update({m: f"{rejections[m]}: a last resort" for m in last})
        if kept is not None and kept.action == "stay":
            lost[ranked[1]] = f"ranked first; the session's cache is on {chosen}"
        attributes: dict[str, str | int | float | bool] = {
            "alias": alias, "strategy": strategy, "candidates": len(candidates),
            "considered": "; ".join([f"{chosen}: chosen"] + [f"{m}: {w}" for m, w in {**lost, **rejections}.items()]),
        }
        # cooled down before: probed. The call's admission claims the probe of whichever it tries
        # (health.probe_claim): its own, or that of the name it stands for
        half_open = {m: _circuit(m, state) for m in ranked if _cooled_until(m, state) is not None}
        if half_open:
            attributes["half_open"] = "; ".join(half_open)
            shared = [m for m, circuit in half_open.items() if circuit != m]
            if shared:
                attributes["group_probes"] = "; ".join(shared)
        if last:  # after a half-open target another call probes, too (the admission goes back to it first)
            attributes["last_resort"] = "; ".join(last)
        circuits = Circuits(half_open, tuple(last)) if half_open or last else NO_CIRCUITS
        if session is not None and session.tracked:  # what the bookkeeper remembers for the session's next call
            tier = session.previous.tier if kept is not None and kept.action == "stay" and session.previous else alias
            attributes.update(session_tier=tier, escalated_to=session.escalation.escalated,
                              good_steps=session.escalation.good)
        model = self._model(chosen, state)
        plan = plan.decide(Decision(self.name, "route", reason, attributes), model=model,
                           deployment=chosen if model != chosen or chosen in self.config.deployments else None,
                           fallbacks=(*ranked[1:], *last), circuits=circuits)
        return plan.decide(kept) if kept is not None else plan

    def _last_resort(self, candidates: Sequence[str], rejections: Mapping[str, str], ranked: Sequence[str],
                     plan: Plan, state: PolicyState, estimate: int) -> list[str]:
        """The candidates refused only for cooling down, not ``ranked``, soonest back first: tried after
        every other (a half-open one another call probes included: see ``CallLifecycle._admit``), as a
        direct call would be sent to them."""
        until = {m: _cooled_until(m, state) or 0.0 for m in candidates if m in rejections and m not in ranked}
        cooling = [m for m, end in until.items() if end > state.now
                   and self._rejection(m, plan, state, estimate, cooled=False) is None]
        return sorted(cooling, key=until.__getitem__)

    def _session(self, plan: Plan, state: PolicyState, free: int) -> Session:
        """The session's last route (one store read) and the lowest tier this step needs: its step
        kind's (``step_kind_tiers``) or an escalation's."""
        config, context = self.config, plan.call.context
        tracked = bool(context.session_id) and (config.affinity.enabled or config.escalation.enabled)
        previous = _remembered(state, context.session_id) if tracked and context.session_id else None
        floor, why = -1, ""
        if config.step_kind_tiers:
            kind = context.step_kind or infer_step_kind(plan.messages)
            wanted = config.tier_index(config.step_kind_tiers.get(kind, ""))
            if wanted is not None:
                floor, why = wanted, f"step kind {kind}"
        step = Escalation()
        if tracked and config.escalation.enabled:
            held = self._held_tier(previous) if previous is not None else None
            step = escalation([t.alias for t in config.tiers], free if held is None else held,
                              previous.escalated if previous else "", previous.good if previous else 0,
                              failure_signal(plan.messages, context), config.escalation.return_after)
            if step.floor > floor:
                floor, why = step.floor, "escalated"
        return Session(previous, tracked, floor, why, step)

    def _held_tier(self, previous: SessionRoute) -> int | None:
        """The index of the tier the session's last call was routed at (if it still lists its target),
        else of the first tier listing the target; ``None`` when no tier does."""
        index = self.config.tier_index(previous.tier)
        if index is not None and previous.target in self._candidates(previous.tier):
            return index
        return next((i for i, t in enumerate(self.config.tiers) if previous.target in self._candidates(t.alias)),
                    None)

    def _affinity(self, session: Session, ranked: list[str], plan: Plan, state: PolicyState,
                  estimate: int) -> tuple[list[str], Decision]:
        """Keep the session on the target that holds its cache (first in the returned order) unless it
        cannot serve this step, is below the tier the step needs, or a switch pays back."""
        assert session.previous is not None
        held, new = session.previous.target, ranked[0]
        held_tier = self._held_tier(session.previous)
        why = None if held_tier is None else self._rejection(held, plan, state, estimate)
        if held_tier is None or why:
            reason = f"leave {held}: {why or 'it is in no tier now'}"
            return ranked, Decision(self.name, "switch", reason, {"from": held, "to": new})
        held_info = state.catalog.resolve(self._model(held, state))
        new_info = state.catalog.resolve(self._model(new, state))
        if held_info is None or new_info is None:
            unknown = held if held_info is None else new
            if held_tier < session.floor:
                return ranked, Decision(self.name, "switch", f"move up from {held} to {new} ({session.floor_why})")
            return [held, *(m for m in ranked if m != held)], Decision(
                self.name, "stay", f"stay on {held}: {unknown} has no price, so a switch cannot be judged")
        move = switch(held, held_info, new, new_info, tokens=estimate, horizon=self.config.affinity.horizon_calls,
                      output=self._output(plan),
                      provider_cache=state.provider_cache)
        if held_tier < session.floor:
            return ranked, Decision(self.name, "switch", f"move up from {held} to {new} ({session.floor_why}): "
                                                         f"{move.numbers(verdict=False)}", move.attributes())
        if move.pays:
            return ranked, Decision(self.name, "switch", f"switch from {held} to {new}: it {move.numbers()}",
                                    move.attributes())
        return [held, *(m for m in ranked if m != held)], Decision(
            self.name, "stay", f"stay on {held}: a switch to {new} {move.numbers()}", move.attributes())

    def _output(self, plan: Plan) -> int:
        """The output a candidate is judged with (its price, a token quota, a switch's payback): the
        request's cap (``max_tokens`` or ``max_completion_tokens``), else ``default_output_tokens``."""
        cap = output_cap(plan.params)
        return cap[1] if cap is not None else self.config.default_output_tokens

    def _model(self, target: str, state: PolicyState) -> str:
        """The model behind ``target``: a deployment's, a name the adapter serves (``state.served``), or itself."""
        deployment = self.config.deployments.get(target)
        return deployment.model if deployment else state.served.get(target, target)

    def _candidates(self, alias: str) -> list[str]:
        """The alias's targets, each preferred OpenRouter model preceded by its ``:free`` variant."""
        free = self.config.free_tier
        out: list[str] = []
        for name in self.config.aliases.get(alias, ()):
            if name not in self.config.deployments and free.applies_to(name):
                out.append(free_variant(name))
            out.append(name)
        return list(dict.fromkeys(out))

    def _tier(self, plan: Plan) -> tuple[int, float]:
        """The index of the first tier whose score is within its ``max_score``. Heuristic: one
        difficulty score for all tiers; fitted: each tier's score is P(its model is not good enough on
        this request)."""
        scorer = self.config.scorer
        if scorer.fitted is None:
            score = score_request(plan.messages, plan.call.tools, plan.call.context.step_kind)
            scores = [score] * len(self.config.tiers)
        else:
            fitted = load_fitted(scorer.fitted, scorer.embeddings)
            difficulty = fitted.difficulty(request_text(plan.messages))
            scores = []
            for tier in self.config.tiers:
                strength = fitted.strength_of(self.config.tier_model(tier), scorer.strength)
                scores.append(1.0 - fitted.p_good(difficulty, fitted.mean_strength() if strength is None else strength))
        for index, (tier, score) in enumerate(zip(self.config.tiers, scores, strict=True)):
            if score <= tier.max_score:
                return index, score
        return len(self.config.tiers) - 1, scores[-1]

    def _probe(self, candidates: list[str], rejections: Mapping[str, str], plan: Plan, state: PolicyState,
               estimate: int, capped: Sequence[str]) -> tuple[list[str], str]:
        """When every candidate is refused, the one to try anyway, and why (refusing would make the
        call worse than sending it directly, and the provider decides): of those refused only for
        cooling down, the one whose cooldown ends first (the provider may be back); else, unless one
        would serve the request with a lower output cap (``capped``: the request's fault), of those
        refused only because the messages look too big for their window (an estimate: the provider
        counts), the largest window. Else nothing: the caller raises ``NoRouteError`` or, when
        ``capped`` names any, ``MaxTokensError``."""
        cooling = self._last_resort(candidates, rejections, (), plan, state, estimate)
        if cooling:
            first = cooling[0]
            return [first], (f"every candidate is cooling down: {first} is tried anyway (its cooldown ends first, "
                             f"in {(_cooled_until(first, state) or state.now) - state.now:.0f}s); ")
        if rejections and all(why.startswith(_ONE_ANSWER) for why in rejections.values()):
            # no target gives several answers: routed as for one, then fitted (n dropped where litellm
            # drops it, else a RequestError, as litellm refuses it)
            return list(candidates), f"no target takes n={plan.params.get('n')}: routed as for one answer; "
        oversized = [m for m in candidates if not rejections[m].startswith(_CAPS)
                     and self._rejection(m, plan, state, estimate, windowed=False) is None]
        if capped or not oversized:  # a smaller window would be tried while a larger one refuses only the cap
            return [], ""
        largest = max(oversized,
                      key=lambda m: getattr(state.catalog.resolve(self._model(m, state)), "max_input_tokens", 0))
        return [largest], (f"the request looks too big for every candidate's window: {largest}, the largest, is "
                           f"tried anyway (the provider counts; {rejections[largest]}); ")

    def _rejection(self, name: str, plan: Plan, state: PolicyState, estimate: int, *,
                   cooled: bool = True, windowed: bool = True) -> str | None:
        cooling = _cooled_until(name, state) if cooled else None
        if cooling is not None and cooling > state.now:
            whose = "" if state.cooldowns.get(name) == cooling else f"{state.groups[name]} "  # the name it stands for
            return f"{whose}cooling down for {cooling - state.now:.0f}s after repeated failures"
        model = self._model(name, state)
        quotas = quotas_for(name, model, self.config, state.groups.get(name) if state.groups else None)
        if quotas:
            why = exhausted(quotas, state.quotas, state.now, estimate + self._output(plan))
            if why:
                return why
        provider = state.catalog.provider(model) or ""
        if self.config.allow_providers and provider not in self.config.allow_providers:
            return f"provider {provider or '?'} not allowed"
        if provider in self.config.deny_providers:
            return f"provider {provider} denied"
        info = state.catalog.resolve(model)
        facts: Mapping[str, Any] = state.catalog.facts(model)
        if windowed and info is not None and info.max_input_tokens:
            why = self._over_window(model, plan, state, estimate, info.max_input_tokens)
            if why:
                return why
        if plan.params.get("tools") and facts.get("supports_function_calling") is False:
            return "does not support tools"
        if facts.get("supports_vision") is False and _uses_images(plan):
            return "does not support images"
        if plan.params.get("response_format") and facts.get("supports_response_schema") is False:
            return "does not support response_format"
        answers = plan.params.get("n")
        if isinstance(answers, int) and answers > 1 and not takes_n(param_rules(model)):
            return f"{_ONE_ANSWER} (n={answers})"
        if any(k in plan.params for k in REASONING_PARAMS) and self.config.require_reasoning_support \
                and not can_reason(model, info, provider):
            return "does not support reasoning"
        return None

    def _over_window(self, model: str, plan: Plan, state: PolicyState, estimate: int, window: int) -> str | None:
        """Why ``model``'s input ``window`` cannot hold the request (plus its ``max_tokens`` or
        ``max_completion_tokens``), judged after ``fit`` has trimmed it for ``model`` when the
        untrimmed ``estimate`` is too large; else ``None``. When the messages fit and only the cap does
        not, the reason starts with the cap's name (the request's fault: see :func:`_no_route`)."""
        cap = output_cap(plan.params)
        output = cap[1] if cap is not None else 0
        if estimate + output <= window:
            return None
        trimmed = estimate
        if self.fit is not None:
            sent = self.fit(plan.override(model=model), state)
            trimmed = state.tokens(model, sent.messages, sent.params.get("tools"), plan.call.context.session_id)
            if trimmed + output <= window:
                return None
        if cap is not None and trimmed < window:
            return f"{cap[0]} {output:,} with the ~{trimmed:,}-token request exceeds the window of {window:,}"
        if self.fit is None:
            return f"request needs ~{estimate + output:,} tokens, window is {window:,}"
        return (f"request needs ~{trimmed + output:,} tokens after the context policy trimmed it "
                f"(~{estimate + output:,} before), window is {window:,}")

    def _rank(self, models: Sequence[str], strategy: str, plan: Plan, state: PolicyState, estimate: int) -> list[str]:
        if strategy == "price":
            output = self._output(plan)

            def cost(name: str) -> float:
                info = state.catalog.resolve(self._model(name, state))  # :free is priced 0
                if info is None:
                    return math.inf
                read = info.cache_read if info.cache_read is not None else info.input
                cached = estimate * self.config.expected_cache_share
                return (estimate - cached) * info.input + cached * read + output * info.output

            return sorted(models, key=lambda m: (cost(m), models.index(m)))
        if strategy == "throughput":
            speeds = {m: state.throughput.get(m) for m in models}
            return sorted(models, key=lambda m: (-(speeds[m] or 0.0), models.index(m)))
        if strategy == "latency":
            delays = {m: state.latency.get(m) for m in models}
            return sorted(models, key=lambda m: (delays[m] if delays[m] is not None else math.inf, models.index(m)))
        if strategy == "weighted":
            # Weighted random order (without replacement) for load spreading; seeded by the call and
            # the planning time, so a plan is reproducible from its inputs.
            rng = random.Random(f"{state.now}:{plan.call.context.session_id}:{len(plan.messages)}")
            remaining = list(models)
            order = []
            while remaining:
                weights = [max(0.0, self.config.weights.get(m, 1.0)) for m in remaining]
                pick = rng.choices(remaining, weights=weights)[0] if sum(weights) > 0 else remaining[0]
                order.append(pick)
                remaining.remove(pick)
            return order
        return list(models)


_ONE_ANSWER = "gives one answer a call"  # how a rejection for n starts
_CAPS = ("max_tokens ", "max_completion_tokens ")  # how a rejection the request's own cap caused starts



__all__ = ["NoRouteError", "RoutingPolicy"]
