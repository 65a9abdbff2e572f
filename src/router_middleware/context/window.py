"""Dropping whole blocks: a cache-friendly window, and OpenRouter's middle-out.

Both drop atomic blocks only (see :mod:`.structure`), so they never orphan a tool result, and both
keep the head (everything before the first assistant turn) and the last block, and the user's latest
words whole where they fit; the window keeps the user's current turn (the user messages the history
ends with) where it fits, middle-out drops it after everything else.
"""

from __future__ import annotations

import hashlib
from bisect import bisect_left
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from ..params import output_cap
from ..policies import PolicyState
from ..tokens import REQUEST_OVERHEAD, message_key
from ..types import Decision, Message, Plan, SummaryJob
from .digest import span_digest
from .structure import blocks, head_length, is_standing, last_instruction, standing_instructions

SUMMARY_MARKER = "[Summary of"


def context_limit(plan: Plan, state: PolicyState, *, asked: bool = True) -> int | None:
    """The model's input window minus the output it may produce (this request's ``max_tokens``, or with
    ``asked=False`` the model's own, the same for every request), or ``None`` if unknown."""
    info = state.catalog.resolve(plan.model)
    if info is None or not info.max_input_tokens:
        return None
    cap = output_cap(plan.params) if asked else None
    output = cap[1] if cap is not None else min(info.max_output_tokens or 4096, 8192)
    window = info.max_input_tokens
    # Some catalogs list the total context as max_input_tokens: never plan past window - output.
    return max(1024, window - output) if output < window else window


def span_key(messages: Sequence[Message]) -> str:
    digest = hashlib.blake2b(digest_size=12)
    for message in messages:
        digest.update(message_key(message).encode())
    return digest.hexdigest()


_STEP_FLOOR = 0.2  # of the watermark: the least a cut level moves by


def _is_chat(messages: Sequence[Message]) -> bool:
    return not any(m.get("role") == "tool" or m.get("tool_calls") for m in messages)


@dataclass(frozen=True)
class Window:
    """Keep the head and the most recent blocks: high/low watermarks, cut in stable steps.

    Nothing happens until the request exceeds ``watermark_tokens`` (the high watermark; defaults to
    ``budget_tokens``, the hard limit, or the model's window). Then the oldest
    blocks after the head are dropped in whole steps so that about ``keep`` x budget tokens of recent
    history remain (the low watermark): the cut level is a multiple of a fixed step over the history's
    cumulative size, so it stays put between cuts and the provider's cache keeps hitting (the step is
    at least a fifth of the watermark where what that cut keeps fits the hard limit, so a big head
    does not make every call cut anew). The dropped
    span is replaced by a stored model-written summary when there is one (``summarize=True`` asks the
    pipeline to write it), else by an offline digest (names and open questions for chats, file paths
    for agents), followed by the span's system and developer messages (the latest, within
    ``digest_share`` of the budget) and the message holding the user's latest words, whole, where they
    fit (the step leaves room for them). For chats the kept turns start on a user turn; the user's
    current turn (the user messages the history ends with) is not dropped where it fits the hard limit,
    nor, in an agent's history, the block before it (the tool results its words answer).
    A cut that would not pay back its cache re-read within ``max_payback_calls`` calls is skipped while
    the request still fits ``budget_tokens`` and the model's window.
    """

    budget_tokens: int | None = None
    watermark_tokens: int | None = None
    keep: float = 0.05
    digest: bool = True
    digest_share: float = 0.1
    summarize: bool = False
    max_payback_calls: float | None = 2.0
    name: str = "window"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        hard = self.budget_tokens
        window = context_limit(plan, state)
        if window is not None:
            hard = min(hard, window) if hard is not None else window
        budget = self.watermark_tokens or hard
        if budget is None:
            return plan
        steady = context_limit(plan, state, asked=False)  # not this request's max_tokens: cuts stay put
        capped = False
        if steady is not None and budget > steady:  # a watermark over the model's window would never cut enough
            budget, capped = steady, True
        messages = plan.messages
        tools = plan.params.get("tools")
        total = state.tokens(plan.model, messages, tools, plan.call.context.session_id)
        if total <= budget:
            return self._over_window(plan, total, window)
        head = head_length(messages)
        profile = state.profile(plan.model, messages)
        units = blocks(messages, head, profile)
        if len(units) <= 1:
            return self._over_window(plan, total, window)
        totals = profile.totals  # totals[i]: the tokens of messages[:i]; the blocks begin at head
        fixed = REQUEST_OVERHEAD + state.counter(plan.model).tools(tools) + totals[head]
        reserve = int(budget * self.digest_share) if self.digest else 0
        low = max(int(budget * self.keep), self._min_keep(plan, state))
        room = budget - fixed - reserve - low
        # The user's latest words, once a cut drops them, are kept whole after the filler (not in its
        # digest), so the model still reads the task it works on: the step leaves room for them, so a
        # cut level keeps them or not for as long as it lasts (and the request stays under the
        # watermark); words over half that room go to the digest (cut to 1,000 characters).
        said = last_instruction(messages, head)
        said_tokens = totals[said + 1] - totals[said] if said is not None and said < units[-1][0] else 0
        if said_tokens > room // 2:
            said_tokens = 0
        step = max(1, int(0.9 * (room - said_tokens)))
        chat = _is_chat(messages)
        droppable = totals[units[-1][0]] - totals[head]  # every block but the last
        # The user's current turn stays whole where it fits the hard limit, and in an agent's history
        # so does the block its words answer (the latest tool results).
        turn = _turn_block(messages, units)
        standing_most = int(budget * self.digest_share)  # the span's kept instructions, at most

        def fits(block: int, extra: int = 0) -> bool:
            return hard is None or fixed + reserve + extra + totals[len(messages)] - totals[units[block][0]] <= hard

        kept_from = turn if fits(turn) else len(units) - 1
        if not chat and kept_from == turn > 0 and messages[-1].get("role") == "user" and fits(turn - 1, standing_most):
            kept_from = turn - 1

        def cut_at(step: int) -> int:
            """The fewest whole blocks (never the last) whose tokens reach a multiple of ``step``."""
            level = max(0, droppable - low) // step * step
            cut = 0 if level <= 0 else min(len(units) - 1, 1 + bisect_left(
                units, totals[head] + level, key=lambda unit: totals[unit[1]]))
            if chat:
                while 0 < cut < len(units) - 1 and messages[units[cut][0]].get("role") != "user":
                    cut += 1
            return min(cut, kept_from)

        cut = cut_at(step)
        # A head near the watermark leaves a step of a few hundred tokens: a cut on nearly every call,
        # and the provider's cache would stop hitting. A wider step is taken where what its cut keeps
        # (with the span's kept instructions, and the user's words at their most) fits the hard limit: the request
        # then sits over the watermark, under the hard limit, between cuts.
        floor = int(_STEP_FLOOR * budget)
        if hard is not None:
            floor = min(floor, int(0.9 * (hard - fixed - reserve - low - said_tokens)))
        if floor > step:
            wider = cut_at(floor)
            held = self._standing(messages[head:units[wider][0]], budget, plan, state)[1] if wider else 0
            most = total - totals[units[wider][0]] + totals[head] + reserve + held + said_tokens
            if hard is None or most <= hard:
                cut = wider
        dropped_tokens = totals[units[cut][0]] - totals[head]
        if cut == 0:
            return self._over_window(plan, total, window)
        start = units[cut][0]
        dropped: Sequence[Message] = messages[head:start]
        standing, standing_tokens = self._standing(dropped, budget, plan, state)  # kept, after the filler
        dropped_tokens -= standing_tokens
        words: list[Message] = []
        words_tokens = said_tokens if said is not None and said < start else 0
        if hard is not None and total - dropped_tokens + words_tokens + reserve > hard:  # the last block is
            words_tokens = 0  # that big: the digest carries them
        if said is not None and words_tokens:
            words, dropped_tokens = [messages[said]], dropped_tokens - words_tokens
            dropped = [*messages[head:said], *messages[said + 1:start]]
        span = ("span", profile.chain[head], profile.chain[start], start - head, bool(words))  # names dropped
        filler, jobs, how = self._filler(dropped, span, chat, reserve, plan, state, latest=not words)
        kept = [*messages[:head], *filler, *standing, *words, *messages[start:]]
        payback = self._payback_calls(plan, state, filler, low + standing_tokens + words_tokens, dropped_tokens)
        must_fit = hard is not None and total > hard
        limit = self.max_payback_calls
        if payback is not None and limit is not None and payback > limit and not must_fit:
            return plan.decide(Decision(
                self.name, "keep", f"over {budget} tokens, but trimming would pay back its cache re-read only "
                f"after {payback:.1f} calls (limit {limit})",
                {"payback_calls": round(payback, 2), "budget_tokens": budget}))
        trimmed = plan.decide(
            Decision(self.name, "trim", f"dropped {len(dropped) - len(standing)} messages "
                     f"(~{dropped_tokens} tokens) over the {budget}-token watermark"
                     f"{' (the model input window, below the one set)' if capped else ''}; replaced by {how}"
                     + (f"; kept {len(standing)} system or developer messages from them" if standing else "")
                     + ("; kept the user's latest words from them, whole" if words else ""),
                     {"dropped_messages": len(dropped) - len(standing), "dropped_tokens": dropped_tokens,
                      "budget_tokens": budget,
                      "payback_calls": round(payback, 2) if payback is not None else 0.0}),
            messages=kept,
            summary_jobs=(*plan.summary_jobs, *jobs),
        )
        return self._over_window(trimmed, total - dropped_tokens, window)

    def _over_window(self, plan: Plan, tokens: int, window: int | None) -> Plan:
        """Say so when what is kept (the head and the last block at least) still exceeds the model's
        window: the provider will refuse it, and no trimming can help (a routed call's alias skips
        such a model before this)."""
        if window is None or tokens <= window:
            return plan
        return plan.decide(Decision(
            self.name, "over-window", f"~{tokens} tokens stay over {plan.model}'s {window}-token input window "
            "(its head and last block cannot be dropped): the provider will likely refuse the request",
            {"tokens": tokens, "window_tokens": window}))

    def _standing(self, dropped: Sequence[Message], budget: int, plan: Plan,
                  state: PolicyState) -> tuple[list[Message], int]:
        """The system and developer messages of the ``dropped`` span kept (:func:`standing_instructions`):
        the latest, within ``digest_share`` of ``budget`` (an agent's per-step notes would otherwise grow
        with the session, in the part of the request nothing drops), and their tokens."""
        share, kept, total = int(budget * self.digest_share), [], 0
        for message in reversed(standing_instructions(dropped)):
            tokens = state.message_tokens(plan.model, message)
            if total + tokens > share:
                break
            kept.append(message)
            total += tokens
        return kept[::-1], total

    def _min_keep(self, plan: Plan, state: PolicyState) -> int:
        """Never cut below the provider's minimum cacheable prompt, or no later call would hit the cache."""
        if not state.provider_cache:
            return 0
        info = state.catalog.resolve(plan.model)
        return int(info.cache.min_tokens * 1.1) if info else 0

    def _payback_calls(
        self, plan: Plan, state: PolicyState, filler: Sequence[Message], low: int, dropped: int,
    ) -> float | None:
        """Calls until a cut pays back, judged as of the call that first reached this cut level (so the
        verdict does not change while the level stays): the digest and the low-watermark tail are
        re-read at the full (or cache-write) price once, and every call reads ``dropped`` fewer cached
        tokens. ``None`` when there is no cache discount (always worth it)."""
        info = state.catalog.resolve(plan.model)
        prices = info.cache_prices() if info is not None and state.provider_cache else None
        if prices is None:
            return None
        read, rewrite = prices
        digest = sum(state.message_tokens(plan.model, m) for m in filler)
        saving = read * max(1, dropped - digest)
        return (rewrite - read) * (digest + low) / saving

    def _filler(
        self, dropped: Sequence[Message], fast: tuple[object, ...], chat: bool, reserve: int, plan: Plan,
        state: PolicyState, *, latest: bool = True,
    ) -> tuple[list[dict[str, Any]], list[SummaryJob], str]:
        """What stands for ``dropped`` (``fast``: its span's key), the summary jobs to ask for, and its
        name; ``latest`` off: the user's latest words are kept apart, so the digest leaves them out."""
        if not self.digest:
            return [], [], "nothing"
        if self.summarize:
            key = state.memo((*fast, "key"), lambda: span_key(dropped))
            summary = state.summaries.get(key)
            if summary:
                text = f"{SUMMARY_MARKER} {len(dropped)} earlier messages]\n{summary}"
                return [{"role": "user", "content": text}], [], "a stored summary"
            jobs = [SummaryJob(key, tuple(dropped))]
        else:
            jobs = []

        def digest() -> dict[str, Any]:
            limit = 40 if not chat else 120
            while True:
                message = {"role": "user", "content": span_digest(dropped, chat=chat, max_names=limit,
                                                                  max_paths=limit, latest=latest)}
                if limit <= 5 or state.message_tokens(plan.model, message) <= reserve:
                    return message
                limit //= 2

        tokenizer = state.counter(plan.model).tokenizer  # the same digest for every model that counts alike
        return [state.memo((*fast, "digest", chat, reserve, tokenizer), digest)], jobs, "an offline digest"


@dataclass(frozen=True)
class MiddleOut:
    """OpenRouter's middle-out: drop blocks from the middle until the request fits.

    ``budget_tokens`` defaults to the model's window minus its output; ``max_messages`` keeps half of
    the allowed messages from each end, as OpenRouter does for providers with message-count limits.
    """

    budget_tokens: int | None = None
    max_messages: int | None = None
    name: str = "middle-out"

    def __call__(self, plan: Plan, state: PolicyState) -> Plan:
        budget = self.budget_tokens or context_limit(plan, state)
        messages = plan.messages
        if self.max_messages is None or len(messages) <= self.max_messages:
            tokens = state.tokens(plan.model, messages, plan.params.get("tools"), plan.call.context.session_id)
            if budget is None or tokens <= budget:
                return plan
        head = head_length(messages)
        profile = state.profile(plan.model, messages)
        units = blocks(messages, head, profile)
        sizes = [profile.totals[e] - profile.totals[b] for b, e in units]
        # Raw local counts throughout (the head from the same profile as the blocks), calibrated only
        # when compared with the budget, which is in the provider's tokens.
        fixed = REQUEST_OVERHEAD + state.counter(plan.model).tools(plan.params.get("tools")) + profile.totals[head]
        total = fixed + sum(sizes)
        count = len(messages)
        keep = list(range(len(units)))
        session = plan.call.context.session_id

        def too_big() -> bool:
            over_tokens = budget is not None and state.calibrated(total, session) > budget
            over_count = self.max_messages is not None and count > self.max_messages
            return over_tokens or over_count

        said = last_instruction(messages, head)
        # the blocks holding only system or developer messages go late, the rest of the user's current
        # turn (a paste before the question) later; the user's latest words are not dropped, as the
        # last block is not, unless the request is over the model's input window without them
        late = {i: 1 for i, (b, e) in enumerate(units) if is_standing(messages, b, e)}
        late.update({i: 2 for i in range(_turn_block(messages, units), len(units))})
        kept_whole = {i for i, (b, e) in enumerate(units) if said is not None and b <= said < e}
        late.update({i: 3 for i in kept_whole})
        window = context_limit(plan, state)  # over it the provider refuses: they are dropped last, then

        def over_window() -> bool:
            return window is not None and state.calibrated(total, session) > window

        while too_big() and (victim := _victim(keep, late, kept_whole if not over_window() else set())) is not None:
            dropped = keep.pop(victim)
            total -= sizes[dropped]
            count -= units[dropped][1] - units[dropped][0]
        limits = " and ".join([*([f"{budget} tokens"] if budget is not None else []),
                               *([f"{self.max_messages} messages"] if self.max_messages is not None else [])])
        # the head, the user's latest words and the last turn are never dropped: a request they alone
        # put over is sent, and said so
        words = ", the user's latest words" if any(i in kept_whole for i in keep[:-1]) else ""
        over = (f"; still over: the head{words} and the last turn alone are "
                f"~{state.calibrated(total, session)} tokens in {count} messages") if too_big() else ""
        if len(keep) == len(units):
            if not over:
                return plan
            return plan.decide(Decision(self.name, "over-budget", f"nothing to drop to fit {limits}{over}",
                                        {"budget_tokens": budget or 0}))
        kept = [*messages[:head]]
        for index in keep:
            begin, end = units[index]
            kept.extend(messages[begin:end])
        removed = len(messages) - len(kept)
        return plan.decide(
            Decision(self.name, "trim", f"dropped {removed} messages from the middle to fit {limits}{over}",
                     {"dropped_messages": removed, "budget_tokens": budget or 0}),
            messages=kept,
        )


def _victim(keep: Sequence[int], late: Mapping[int, int], kept_whole: set[int]) -> int | None:
    """Where in ``keep`` (block indices) the next block to drop is, or ``None``: none but the last block
    and ``kept_whole`` are left. Among those ``late`` ranks lowest (0 unless given), the nearest to
    the middle, before it first."""
    middle = (len(keep) - 1) // 2
    droppable = [at for at in range(len(keep) - 1) if keep[at] not in kept_whole]
    if not droppable:
        return None
    return min(droppable, key=lambda at: (late.get(keep[at], 0), abs(at - middle), at > middle))


def _turn_block(messages: Sequence[Message], units: Sequence[tuple[int, int]]) -> int:
    """The index in ``units`` of the first block of the user's current turn: the user messages the
    history ends with (a paste, then the question about it), else the last block."""
    first = len(messages)
    while first > 0 and messages[first - 1].get("role") == "user":
        first -= 1
    at = bisect_left(units, first, key=lambda unit: unit[0])
    return at if at < len(units) and units[at][0] == first else len(units) - 1
