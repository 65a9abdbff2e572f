"""The bookkeeper: every write to shared state goes through here.

A call's budget claims (and its expected reasoning, on its session's reasoning budget) are held
together with its first attempt's quotas in one atomic step (later attempts take their quotas
alone); after the call its budgets, quota tokens and reasoning spend settle in one batch (one round
trip on Redis), or are released or given back; a hold whose settlement never reached the store lapses.
Failures and successes are counted for the circuit breaker, speed averages updated, summaries kept,
and a ledger row queued per call. Admission and settlement are two-phase (what to write, then what
the store answered), so a call's lifecycle can hand those writes to a sync or an async store. Only
admission may fail a call (``BudgetExceeded``, or a store error while budgets are claimed); every
other write that fails is logged and the call goes on: the middleware never makes an answered call
fail.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from functools import partial
from typing import Any

from ..accounting import measured_context_saving, routing_saving
from ..catalog import Catalog
from ..config import ReasoningConfig, RoutingConfig
from ..errors import PartialWrite, StoreUnavailable, UnreadableCounter
from ..ids import unique_id
from ..ledger import LedgerWriter, from_outcome
from ..params import choices_asked
from ..reasoning.levels import DEFAULT_BUDGETS
from ..routing.affinity import session_route
from ..routing.fallback import counts_toward_cooldown
from ..routing.quotas import Quota
from ..stores import Prefetch, Store, StoreView
from ..stores.base import (
    Addition,
    Average,
    Bounded,
    Countdown,
    Hold,
    Owned,
    Put,
    Refusal,
    Release,
    Sample,
    Within,
    defer,
    number,
    store_name,
)
from ..stores.views import Kept
from ..telemetry import log
from ..types import AgentContext, Cost, Decision, Outcome, Plan, Usage
from ..wire import response_headers
from . import budgets, health, quotas
from .budgets import Claim, Reservation
from .health import Probe
from .keys import (
    BUDGET,
    COOLDOWN,
    INPUT_RATIO,
    OUTPUT,
    QUOTA,
    REASONING,
    SESSION_ROUTE,
    SUMMARY,
    SUMMARY_CLAIM,
)
from .quotas import Taken


class Probing(str):
    """Why an attempt was refused its target: the target is half-open after a cooldown and another
    call holds its probe (:func:`.health.probe_claim`)."""


class StepDown(str):
    """Why the call's reasoning reservation did not fit its session's budget: plan the call again (the
    reasoning policy then reads the reservations of the session's other calls and picks a lower level)."""


RECENT_REPLIES = 50  # reply sizes kept per model and app for the learned estimates (no expiry: bounded)
SUMMARY_CLAIM_S = 120.0  # how long one call may take to write a span's summary before another may


@dataclass
class Held:
    """What one call holds in the store until it ends: its budget reservation and the current
    attempt's quota."""

    reservation: Reservation | None = None
    quota: tuple[Taken, tuple[Quota, ...]] | None = None
    counted: int = 0  # the prompt tokens counted locally for the estimate (0: none was made)
    probe: Probe | None = None  # the current attempt's claim on a half-open target's probe


@dataclass
class Admission:
    """An attempt's quota windows (``entries``), the call's budget claims (``holds``) and the
    provider's view of the attempt's quotas (``left``, counted down where it is), to add at once."""

    claims: list[Claim]
    found: tuple[Quota, ...]
    tokens: int
    views: tuple[quotas.ViewClaim, ...]  # after the holds, in add_within's refusal order
    windows: tuple[quotas.WindowClaim, ...]  # tuples: a call waiting on its admission holds fewer objects
    probe: Probe | None = None  # the attempt's claim on a half-open target's probe (after the windows)
    probe_s: float = 0.0

    @property
    def entries(self) -> list[Within]:
        return [w.within for w in self.windows]

    @property
    def holds(self) -> list[Hold]:
        return [c.held for c in self.claims]

    @property
    def left(self) -> list[Countdown]:
        return [v.countdown for v in self.views]

    @property
    def owned(self) -> list[Owned]:
        return [health.probe_claim(self.probe, self.probe_s)] if self.probe is not None else []

    def unanswered(self, held: Held) -> None:
        """The store may have taken this admission, but its answer never came: ``held`` keeps its
        budget claims and its probe claim, so the call's release ends them (the claim only while it is
        its own)."""
        if self.claims:  # a later attempt's top-up (dearer than the call's first) adds to the reservation
            held.reservation = Reservation((held.reservation.claims if held.reservation else []) + self.claims)
        held.probe = self.probe

    def taken(self, held: Held) -> None:
        """The store took this admission: ``held`` keeps what :meth:`unanswered` keeps, and the
        attempt's quota windows (to settle, or give back)."""
        self.unanswered(held)
        if self.found:
            held.quota = (quotas.took(self.windows, self.tokens), self.found)


@dataclass
class Settlement:
    """A finished call's store writes (``additions``, ``samples``, ``releases``, ``averages``,
    ``puts``), and what :meth:`Bookkeeper.settled` does after them."""

    outcome: Outcome
    answer: Any
    complete: bool
    additions: list[Addition] = field(default_factory=list)
    samples: list[Sample] = field(default_factory=list)
    releases: list[Release] = field(default_factory=list)  # the reservation's holds, ended
    averages: list[Average] = field(default_factory=list)  # the answering target's speed
    puts: list[Put] = field(default_factory=list)  # the provider's view of the call's quotas
    lapse_s: float = 0.0  # how long the holds count if the releases never reach the store
    error: BaseException | None = None  # what cut a stream short (its ledger row names it)
    probe: Probe | None = None  # the call's claim on the probe of the half-open target it tried
    closed: list[str] = field(default_factory=list)  # the closed budgets' counters among the releases

    @property
    def writes(self) -> bool:
        return bool(self.additions or self.samples or self.releases or self.averages or self.puts)

    def batch(self, bounded: Sequence[Bounded] = ()) -> tuple[list[Addition], list[Sample], list[Release],
                                                             Sequence[Bounded], list[Average], list[Put], list[str]]:
        """``add_many``'s arguments for these writes and ``bounded`` (a response-cache entry)."""
        return self.additions, self.samples, self.releases, bounded, self.averages, self.puts, self.closed


class Bookkeeper:
    def __init__(self, store: Store, routing: RoutingConfig, catalog: Catalog,
                 ledger: LedgerWriter | None = None, *, fresh_s: float = 0.0,
                 cooldown_view: Mapping[str, float] | None = None, reasoning: ReasoningConfig | None = None,
                 budget_view: Mapping[str, float] | None = None) -> None:
        """``fresh_s``: how long values that may lag (recent reply sizes) are kept in the process;
        ``cooldown_view``, ``budget_view``: the cooldowns and budget totals as the routing policy reads
        them (keys without the prefix)."""
        self.store = store
        self.routing = routing
        self.reasoning = reasoning or ReasoningConfig()
        self.catalog = catalog
        self.ledger = ledger
        self.fresh_s = fresh_s
        self._failed: dict[str, float] = {}  # targets this process saw fail since their last success
        self._unapplied: set[str] = set()  # budgets already logged as not applying to a call
        self._saying = threading.Lock()  # calls plan on litellm's threads and the event loop at once
        self._recent: Kept[list[float]] = Kept(fresh_s)  # recent reply sizes, kept in the process
        self._cooldowns = cooldown_view if cooldown_view is not None else StoreView(store, COOLDOWN, number)
        self._spent = budget_view
        # Reply sizes are learned only where an estimate is reserved: budgets and token limits.
        self.served: Mapping[str, str] = {}  # names the adapter serves -> their models (Engine.serve)
        self.groups: Mapping[str, str] = {}  # a served name -> the served name it stands for (Engine.serve)
        self.learns = bool(routing.budgets) or any(limit.tpm or limit.tpd for limit in routing.limits.values())
        self._caching: set[str] = set()  # targets whose provider reported a prompt-cache read (context_saving)

    def context_saving(self, outcome: Outcome) -> float | None:
        """What the context policies saved ``outcome``'s call (:func:`.accounting.measured_context_saving`),
        its untouched history read from the provider's cache only where its target's provider has
        reported a cache read in this process (this call's included): an OpenAI-compatible endpoint
        that caches nothing had the untouched history priced as cache reads, and trimming that cut the
        bill by three quarters said it had cost more."""
        plan = outcome.plan
        tokens = plan.context_tokens if plan is not None else None
        if plan is not None and tokens is not None and tokens.cached and outcome.usage.source == "provider":
            target = plan.deployment or plan.model
            if outcome.usage.cache_read_tokens > 0:
                self._caching.add(target)  # a set's add: atomic under the GIL
            elif target not in self._caching:
                outcome = replace(outcome, plan=plan.override(context_tokens=replace(tokens, cached=False)))
        return measured_context_saving(outcome, self.catalog)

    def recent(self, prefix: str, model: str, app: str | None, fetched: Prefetch | None = None) -> list[float]:
        """Recent reply facts of ``model`` for ``app``: ``keys.OUTPUT`` (output tokens) or
        ``keys.INPUT_RATIO`` (reported / counted prompt tokens), as ``fetched`` for the call if it
        was (see :meth:`want_recent`). A failing store reads as none."""
        key = f"{prefix}{model}:{app or '-'}"
        if fetched is not None and key in fetched.lists:
            return fetched.lists[key]
        kept, seen, renew = self._recent.get(key)
        if kept and not renew and seen is not None:
            return seen
        try:
            found = self.store.samples(key)
        except Exception as exc:  # noqa: BLE001
            log.warning("store_read_failed", key=key, error_type=type(exc).__name__)
            return seen if seen is not None else []
        self._recent.keep(key, found)
        return found

    def want_recent(self, plan: Plan, fetched: Prefetch) -> None:
        """Note in ``fetched`` the recent reply facts :meth:`recent` would read from the store for
        ``plan`` (none where budgets and token limits do not learn them, or the process keeps them)."""
        if self.learns:
            for prefix in (OUTPUT, INPUT_RATIO):
                fetched.want_list(f"{prefix}{plan.model}:{plan.call.context.app or '-'}", self._recent)

    # -- before an attempt -----------------------------------------------------------------------

    def claims(self, context: AgentContext, *, usd: float, tokens: int) -> list[Claim]:
        """The budget claims of a call estimated at ``usd`` and ``tokens`` (none without budgets)."""
        if not self.routing.budgets:
            return []
        return budgets.claims(self.routing.budgets, context, usd=usd, tokens=tokens, now=time.time(),
                              hold=unique_id(), first=self._first_unapplied)

    def _unpriced(self, reservation: Reservation, model: str) -> None:
        """Say once per budget and model that a USD budget counted nothing for a call: ``model`` has no
        price and nothing was reserved for it (its estimate, on a model of no price, was 0), so its calls
        pass the USD limit while its token limit still counts them."""
        for claim in reservation.claims:
            if claim.unit == "usd" and not claim.amount and self._first_unapplied(f"{claim.name}\0{model}"):
                log.warning("budget_usd_unpriced", budget=claim.name, model=model,
                            why=f"{model} has no price: its calls add nothing to the budget's USD limit (a token "
                                f"limit still counts them); price it in the config, models: {{{model}: "
                                "{input_per_mtok: ..., output_per_mtok: ...}} (USD per million tokens); said once "
                                "per budget and model")

    def _first_unapplied(self, name: str) -> bool:
        """Whether budget ``name`` (or a budget and a model) is yet to be logged as not applying, noting
        that it now is (checked and noted in one step, so concurrent calls log it once)."""
        with self._saying:
            if name in self._unapplied:
                return False
            self._unapplied.add(name)
            return True

    def reasoning_claim(self, plan: Plan) -> list[Claim]:
        """The reasoning the call is expected to spend (its level's tokens), held on its session's
        budget while it runs so that the session's concurrent calls see it. It fits while the level's
        tokens are at most half of what is left (the reasoning policy's rule): the limit is the budget
        less them. None without a session budget, or at level none."""
        budget, session = self.reasoning.session_budget_tokens, plan.call.context.session_id
        decision = next((d for d in reversed(plan.decisions)
                         if d.policy == "reasoning" and "session_remaining_tokens" in d.attributes), None)
        if budget is None or not session or decision is None:
            return []
        levels = {**DEFAULT_BUDGETS, **self.reasoning.level_budgets}
        asked, level = decision.attributes.get("budget_tokens"), decision.attributes["level"]
        amount = float(asked if isinstance(asked, int) else next((v for k, v in levels.items() if k == level), 0))
        if not amount:
            return []
        return [Claim(REASONING + session, amount, budget - amount, None, "reasoning", "reasoning", unique_id(),
                      self.reasoning.reservation_ttl_s)]

    def admission(self, found: tuple[Quota, ...], tokens: int,
                  claims: list[Claim], probe: str | None = None) -> Admission | None:
        """What admitting an attempt asks of the store (it reads none): ``None`` (nothing: no quota, no
        budget, no ``probe`` of a half-open target to claim), or an :class:`Admission` whose
        ``entries``, ``holds``, ``owned`` and ``left`` go to the store's ``add_within`` in one atomic
        step (see :meth:`admitted`); its probe claim carries a token unique to the attempt."""
        if not found and not claims and probe is None:
            return None
        return Admission(claims, found, tokens, quotas.view_claims(found, tokens),
                         quotas.window_claims(found, tokens, time.time()),
                         None if probe is None else Probe(probe, unique_id().encode()), self.routing.cooldown.probe_s)

    def admitted(self, held: Held, admission: Admission, refusal: Refusal | None) -> str | None:
        """The store's answer to ``admission``: hold what was taken, or say why not (a
        :class:`Probing` when another call holds the target's probe). Raises ``BudgetExceeded``
        naming the budget."""
        claims, windows = admission.claims, admission.windows
        if refusal is not None:
            index, total = refusal
            if index < len(windows):
                return quotas.refused(windows[index], total)
            index -= len(windows)
            if admission.probe is not None:
                if index == 0:
                    return Probing("half-open after its cooldown: another call is probing it")
                index -= 1
            if index >= len(claims):
                return quotas.viewed(admission.views[index - len(claims)])
            claim = claims[index]
            if claim.unit == "reasoning":
                return StepDown(f"session reasoning budget: {claim.amount:g} tokens more do not fit in half of what "
                                f"is left ({total:g} of {claim.limit + claim.amount:g} held or spent)")
            raise budgets.refused(claim, total)
        admission.taken(held)
        self._saw_spend((claim.key, claim.amount) for claim in claims)
        return None

    def replaces(self, admission: Admission, unreadable: UnreadableCounter) -> bool:
        """Whether to take out the value ``unreadable`` names (:meth:`replace`) and admit again: a
        quota window's, a hold set's, a provider view's, a reasoning budget's, or the counter of a
        budget with ``on_store_error: open`` (it counted nothing while the value was there), not the
        counter of a ``closed`` budget: its calls are refused until it is deleted (the spend it stood
        for is unknown here; the ledger has it)."""
        closed = {b.name for b in self.routing.budgets if b.on_store_error == "closed"}
        return not any(c.key == unreadable.key and c.unit != "reasoning" and c.name in closed
                       for c in admission.claims)

    def replace(self, unreadable: UnreadableCounter) -> None:
        """Take out the value an admission could not read, so the key counts from 0 again."""
        then = ("the budget counts from 0 again (the spend it held is in the ledger)"
                if unreadable.key.startswith(BUDGET) and not unreadable.key.endswith("#held")
                else "the key counts from 0 again")
        health.replace(self.store, unreadable, then)

    def admission_failed(self, held: Held, admission: Admission, error: Exception) -> None:
        """The store failed: a budget with ``on_store_error: closed`` refuses the call
        (:class:`StoreUnavailable`); otherwise, and with quotas only, the call is admitted (logged) and
        keeps its claims, so its settlement adds what it spent (in full: its holds are not in the
        store, or lapse) if the store answers by then, and its probe claim, which may be there: it ends
        it (only while it is its own)."""
        closed = {b.name for b in self.routing.budgets if b.on_store_error == "closed"}
        refusing = sorted({c.name for c in admission.claims if c.unit != "reasoning"} & closed)
        if refusing:  # named: the budget whose counter the store could not read, else every closed one
            owner = [c.name for c in admission.claims if c.key == getattr(error, "key", None) and c.name in closed]
            names = ", ".join(map(repr, owner[:1] or refusing))
            raise StoreUnavailable(f"budget{'s' if len(owner[:1] or refusing) > 1 else ''} {names}: the store "
                                   f"{store_name(self.store)} failed the call's admission ({type(error).__name__}: "
                                   f"{str(error)[:160]}); on_store_error: closed refuses the call") from error
        quota = not admission.claims or (isinstance(error, UnreadableCounter) and error.key.startswith(QUOTA))
        log.warning("quota_store_failed" if quota else "budget_store_failed",
                    error_type=type(error).__name__, error=str(error)[:200], admitted=True)
        admission.unanswered(held)

    # -- after an attempt or a call --------------------------------------------------------------

    def attempt_unmade(self, held: Held) -> None:
        """Give back all an attempt took of its quotas, its request and its tokens, and the probe it
        held: it was never made."""
        self._end_probe(held)
        if held.quota is not None:
            taken, _ = held.quota
            held.quota = None
            self._add("quota_store_failed", quotas.give_back(taken))

    def tried(self, held: Held, error: BaseException, spent: Outcome | None = None, when: float | None = None) -> None:
        """The attempt's try failed with ``error`` and the adapter ran its model again (a retry inside
        the adapter's model call) at ``when`` (``time.time()``; default now): the try keeps the request
        it took, its tokens given back, or settled at what ``spent`` used, as :meth:`attempt_failed`
        leaves a failed attempt's; the next try takes a request and the attempt's token estimate in the
        windows of ``when``, as the pipeline's own retry of a target is admitted, but counted rather
        than admitted (it was under way: nothing could refuse it). It counts toward no cooldown; the
        provider's view is read from ``error``."""
        if held.quota is None:
            return
        taken, found = held.quota
        additions = (quotas.give_back(taken, requests=False) if spent is None
                     else quotas.settlement(taken, spent.usage.total_tokens))
        windows = quotas.window_claims(found, taken.tokens, time.time() if when is None else when)
        next_try = quotas.took(windows, taken.tokens)
        held.quota = (next_try, found)
        self._add("quota_store_failed", [*additions, *next_try.keys])
        self._observe(found, error)

    def attempt_failed(self, held: Held, target: str, error: BaseException, spent: Outcome | None = None) -> None:
        """Give back the attempt's quota tokens, or settle them at what ``spent`` used (an attempt that
        broke off partway: the provider counted those tokens, as its budget is charged them), and
        count the failure toward ``target``'s cooldown (unless it was the request's own fault or a
        cancellation, :func:`~.routing.fallback.counts_toward_cooldown`): a probe's failure opens its
        circuit again at once."""
        if held.quota is not None:
            taken, found = held.quota
            held.quota = None
            self._add("quota_store_failed", quotas.give_back(taken, requests=False) if spent is None
                      else quotas.settlement(taken, spent.usage.total_tokens))
            self._observe(found, error)
        self.target_failed(held, target, error)

    def target_failed(self, held: Held, target: str, error: BaseException) -> None:
        """Count ``error`` toward ``target``'s cooldown, as :meth:`attempt_failed` does, with no quota
        to give back (a stream the provider broke off after its first chunks: it is settled at what
        it sent); and toward the cooldown of the name ``target`` stands for (:attr:`groups`)."""
        if not counts_toward_cooldown(error):
            self._end_probe(held)
            return
        probed, held.probe = held.probe, None
        names = _names(target, self.groups.get(target), probed)
        for name in names:
            self._failed[name] = time.time()

        def count(name: str, probed: Probe | None) -> None:
            try:
                cooldown = self.routing.cooldown
                until = (health.open_circuit(self.store, name, cooldown, time.time(), probe=probed) if probed
                         else health.note_failure(self.store, name, cooldown, time.time()))
                if until is not None:
                    self._saw_cooldown(name, until)
                    log.warning("model_cooling_down", model=name, seconds=cooldown.cooldown_s,
                                probe=probed is not None)
            except Exception as exc:  # noqa: BLE001 - a store problem must not fail the call
                log.warning("cooldown_store_failed", error_type=type(exc).__name__)

        for name in names:  # a probe reopens the circuit it probed (whatever the alias map says now)
            defer(partial(count, name, probed if probed is not None and probed.target == name else None))

    def release(self, held: Held) -> None:
        """The call made no billable attempt (or failed for good): give its reservation back (and the
        probe its attempt held)."""
        self._end_probe(held)
        reservation, held.reservation = held.reservation, None
        if reservation is not None:
            given = budgets.release(reservation)
            self._guard("budget_store_failed", self.store.add_many, [], (), given, closed=budgets.closed(reservation))
            self._saw_spend((key, actual - amount) for key, _, amount, actual, _ in given)

    def settlement(self, outcome: Outcome, held: Held | None = None, answer: Any = None, *,
                   complete: bool = True, error: BaseException | None = None) -> Settlement:
        """What settling a finished call writes: budgets and quotas to the actual usage, the session's
        reasoning spend, the reply's size, the target's speed averages, the provider's view of the
        call's quotas and the session's route (one ``add_many``: one round trip on Redis). Then
        :meth:`settled`. ``complete=False`` (a stream cut short, by ``error`` if given) settles the
        budget and quota only (and its ledger row)."""
        usage = outcome.usage
        done = Settlement(outcome, answer, complete, error=error)
        reasoning = usage.reasoning_tokens if complete else 0
        reserved = False  # the session's reasoning was held: its release adds what was spent
        if held is not None:
            reservation, held.reservation = held.reservation, None
            if reservation is not None:
                summaries = outcome.plan.summary_cost_usd if outcome.plan else 0.0
                usd = outcome.cost.total_usd + summaries if outcome.cost.total_usd is not None else None
                if usd is None:
                    self._unpriced(reservation, outcome.plan.model if outcome.plan else outcome.model)
                done.releases += budgets.settlement(reservation, usd=usd, tokens=usage.total_tokens,
                                                    reasoning=reasoning or 0)
                done.closed += budgets.closed(reservation)
                done.lapse_s = max(c.hold_s for c in reservation.claims)
                reserved = any(c.unit == "reasoning" for c in reservation.claims)
            if held.quota is not None:
                taken, found = held.quota
                held.quota = None
                done.additions += quotas.settlement(taken, usage.total_tokens)
                done.puts = quotas.provider_left(found, response_headers(answer), time.time())
            done.probe, held.probe = held.probe, None
        plan = outcome.plan
        session = plan.call.context.session_id if plan else None
        if complete and session and usage.reasoning_tokens and not reserved:
            done.additions.append((REASONING + session, float(usage.reasoning_tokens), None))
        if complete and self.learns and plan is not None and usage.source in ("provider", "estimated"):
            name = f"{plan.model}:{plan.call.context.app or '-'}"
            if usage.output_tokens:  # one answer's: a request for n shares its output among them
                done.samples.append((OUTPUT + name, usage.output_tokens / choices_asked(plan.params), RECENT_REPLIES,
                                     None))
            if held is not None and held.counted and usage.input_tokens:
                done.samples.append((INPUT_RATIO + name, usage.input_tokens / held.counted, RECENT_REPLIES, None))
        if complete and plan is not None and self.routing.aliases:
            if usage.source == "provider":  # a count litellm made says nothing of the provider's speed
                done.averages = health.speed_averages(plan.deployment or plan.model, usage.output_tokens,
                                                      outcome.latency_s, outcome.time_to_first_token_s)
            done.puts += self._route_put(outcome)
        return done

    def settled(self, done: Settlement) -> None:
        """After the settlement's writes: target health (a complete answer only), and the call's ledger
        row (every paid call's, a stream cut short too). Never raises."""
        self._saw_spend((key, actual - amount) for key, _, amount, actual, _ in done.releases)
        plan = done.outcome.plan
        if done.complete and plan is not None and self.routing.aliases:
            target = plan.deployment or plan.model
            self._answered(target, probed=done.probe)
        elif done.probe is not None:  # it says nothing of the target's health: another call may probe it
            self._guard("cooldown_store_failed", health.end_probe, self.store, done.probe)
        self.record(done.outcome, error=done.error)

    def settle(self, outcome: Outcome, held: Held | None = None, answer: Any = None, *,
               complete: bool = True, error: BaseException | None = None,
               bounded: Sequence[Bounded] = ()) -> tuple[Outcome, Exception | None]:
        """:meth:`settlement`, its writes with ``bounded`` (a response-cache entry on the same store) in
        one ``add_many``, and :meth:`settled` (sync). Never raises: the outcome (with a decision if the
        writes failed, :meth:`settle_failed`), and what the store raised, if it did (``bounded`` was
        then not written)."""
        done = self.settlement(outcome, held, answer, complete=complete, error=error)
        failed = None
        if done.writes or bounded:
            try:
                self.store.add_many(*done.batch(bounded))
            except Exception as exc:  # noqa: BLE001 - bookkeeping never fails the user's call
                failed = exc
                if not (isinstance(exc, PartialWrite) and exc.settled):  # else the cache's entry failed alone
                    self.settle_failed(done, exc)
        self.settled(done)
        return done.outcome, failed

    def settle_observed(self, outcome: Outcome, *, complete: bool = True,
                        error: BaseException | None = None) -> Outcome:
        """:meth:`settle` a call made outside the lifecycle and seen once it ended (litellm's events
        of a call no hook planned, a chat model the LangChain handler observes), or an attempt that
        broke off partway before the call went on (``complete=False``, ``error``): what it spent is
        added to the budgets that apply to it (claims of nothing, settled at the actual amounts)."""
        plan = outcome.plan
        claims = self.claims(plan.call.context, usd=0.0, tokens=0) if plan is not None else []
        held = Held(Reservation(claims)) if claims else None
        return self.settle(outcome, held, complete=complete, error=error)[0]

    def settle_failed(self, done: Settlement, error: Exception) -> None:
        """The settlement's writes did not reach the store: log it, and put a decision on the call's
        outcome (its ledger row still records the cost). Its budget holds lapse after their
        ``reservation_ttl_s``; the budget counters never learn what the call spent. Nothing where the
        settlement wrote nothing of its own (only a response-cache entry)."""
        if not done.writes:
            return
        held = {key.removeprefix(BUDGET): amount for key, _, amount, _, _ in done.releases}
        log.warning("settle_failed", error_type=type(error).__name__, error=str(error)[:200], held=held,
                    lapses_in_s=done.lapse_s)
        reason = f"the store did not take the settlement ({type(error).__name__})"
        if held:
            reason += f"; the reservation stops counting within {done.lapse_s:g} s"
        plan = done.outcome.plan
        if plan is not None:
            done.outcome = replace(done.outcome, plan=plan.decide(Decision("budget", "settle-failed", reason)))

    def _saw_cooldown(self, target: str, raw: bytes | None) -> None:
        """What this process wrote of ``target``'s cooldown (``None``: closed), kept in its view of the
        cooldowns: its next calls act on it at once, not once the view reads the store again."""
        if isinstance(self._cooldowns, StoreView):
            self._cooldowns.kept.keep(target, raw)

    def _saw_spend(self, changes: Iterable[tuple[str, float]]) -> None:
        """What this process added to budget totals (a reservation; a settlement's or release's
        difference from it), kept in its view of them: its next calls see their own spend at once (a
        soft limit's downgrade), every other process's once the view reads the store again."""
        if not isinstance(self._spent, StoreView):
            return
        for key, change in changes:
            if change and key.startswith(BUDGET):
                self._spent.kept.amend(key.removeprefix(BUDGET), partial(_plus, change))

    def _end_probe(self, held: Held) -> None:
        probe, held.probe = held.probe, None
        if probe is not None:
            self._guard("cooldown_store_failed", health.end_probe, self.store, probe)

    def _observe(self, found: tuple[Quota, ...], answer: Any) -> None:
        puts = quotas.provider_left(found, response_headers(answer), time.time())
        if not puts and isinstance(answer, BaseException):
            puts = quotas.free_blocked(found, answer)
        if puts:
            self._guard("quota_store_failed", self.store.add_many, [], puts=puts)

    def _add(self, event: str, additions: list[Addition]) -> None:
        if additions:
            self._guard(event, self.store.add_many, additions)

    def _answered(self, target: str, *, probed: Probe | None = None) -> None:
        """A success clears the failure count of ``target`` and of the name it stands for (only after
        a failure this process saw: no round trip while all is well); after a probe (``probed``), it
        closes the circuit probed and ``target``'s own."""
        for name in _names(target, self.groups.get(target), probed):
            closes = probed is not None and name in (target, probed.target)
            if self._failed.pop(name, None) is not None or closes:
                self._guard("cooldown_store_failed", health.note_success, self.store, name, probed=closes)
            if closes:
                self._saw_cooldown(name, None)

    def _route_put(self, outcome: Outcome) -> list[Put]:
        """A session routed through tiers: what remembers the target that answered (its prompt cache is
        there now) and its escalation, for ``routing.affinity.ttl_s``, set by the settlement's write.
        None after a response-cache hit (no provider saw the prompt), nor after a fallback (its plan
        has no route decision: the record of the last routed call stays)."""
        plan = outcome.plan
        record = session_route(plan) if plan is not None and outcome.usage.source != "cache" else None
        if plan is None or record is None:
            return []
        return [(SESSION_ROUTE + str(plan.call.context.session_id), record.encode(), self.routing.affinity.ttl_s)]

    def summary_claim(self, key: str) -> list[Within]:
        """The store entry that makes one call, across processes, the writer of span ``key``'s summary
        (``add_within`` refuses the others until the claim expires)."""
        return [(SUMMARY_CLAIM + key, 1.0, 1.0, SUMMARY_CLAIM_S)]

    def keep_summary(self, key: str, text: str, fetched: Prefetch | None = None) -> None:
        """Store a span's summary (and note it in the call's ``fetched`` reads: its next plan sees it)."""
        self._guard("store_write_failed", self.store.set, SUMMARY + key, text.encode())
        if fetched is not None:
            fetched.values[SUMMARY + key] = text.encode()

    # -- the ledger ------------------------------------------------------------------------------

    def record(self, outcome: Outcome, *, error: BaseException | None = None, cached_usd: float | None = None) -> None:
        """Queue the call's ledger row (written on a background thread). A response-cache hit saved
        ``cached_usd`` (what the call it answers for cost; unknown: all its plan's saving), the rest
        of its plan's saving is the context policies'."""
        if self.ledger is None:
            return
        plan = outcome.plan
        saved = plan.estimated_savings_usd if plan else 0.0
        by_cache = (saved if cached_usd is None else cached_usd) if outcome.usage.source == "cache" else 0.0
        measured = self.context_saving(outcome)
        by_context = saved - by_cache if measured is None else measured
        by_routing = 0.0
        if plan is not None and (baseline := self._baseline_model(plan.call.model)) != plan.model:
            by_routing = routing_saving(outcome, self.catalog.resolve(baseline))
        self.ledger.append(from_outcome(outcome, saved_context=by_context, saved_cache=by_cache,
                                        saved_routing=by_routing, error=error))

    def _baseline_model(self, requested: str) -> str:
        """The model a call naming ``requested`` would have gone to without routing."""
        target = self.routing.baseline_target(requested)
        deployment = self.routing.deployments.get(target)
        return deployment.model if deployment else self.served.get(target, target)

    def record_failure(self, plan: Plan, error: BaseException, provider: str | None = None) -> None:
        """The ledger row of a call that failed for good (no usage, cost unknown); ``provider``: the
        one its span names, where the adapter knows it (else the catalog's for its model)."""
        if self.ledger is not None:
            failed = Outcome(model=plan.model, provider=provider or self.catalog.provider(plan.model),
                             usage=Usage(source="none"), cost=Cost.unknown(), plan=plan)
            self.record(failed, error=error)

    @staticmethod
    def _guard(event: str, write: Any, *args: Any, **kwargs: Any) -> None:
        """Make a write whose failure is only logged (queued while a step runs on an event loop: see
        :func:`~router_middleware.stores.base.defer`)."""
        def run() -> None:
            try:
                write(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - bookkeeping never fails the user's call
                log.warning(event, error_type=type(exc).__name__, error=str(exc)[:200])

        defer(run)


__all__ = ["Admission", "Bookkeeper", "Claim", "Held", "Probing", "Reservation", "Settlement", "StepDown", "Taken"]


def _plus(change: float, raw: bytes | None) -> bytes | None:
    """A kept budget total (``None``: none stored yet, 0) with ``change`` added; one it cannot read as
    it was (the view says it is unreadable)."""
    try:
        return repr((number(raw) if raw is not None else 0.0) + change).encode()
    except (TypeError, ValueError, OverflowError):
        return raw


def _names(target: str, group: str | None, probe: Probe | None) -> tuple[str, ...]:
    """Whose health an attempt at ``target`` speaks for: it, the name it stands for, and the circuit its
    ``probe`` claimed (kept even if the alias map changed since)."""
    names = (target,) if group is None else (target, group)
    return names if probe is None or probe.target in names else (*names, probe.target)
