"""Token and cost accounts of replayed calls, and the accountant that prices one plan."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..catalog import ModelInfo
from ..pricing import price
from ..tokens import REQUEST_OVERHEAD, Calibration, TokenCounter, message_key
from ..types import Cost, Plan, Usage
from .cachesim import PromptCacheSim


@dataclass
class Account:
    input_tokens: int = 0
    cached_tokens: int = 0
    cache_write_tokens: int = 0
    output_tokens: int = 0
    reasoning_tokens: int = 0
    cost_usd: float = 0.0
    max_request_tokens: int = 0

    unpriced_calls: int = 0  # calls whose model has no price: the cost is unknown, never $0

    @property
    def cost(self) -> float | None:
        """The total cost, or None when any call could not be priced."""
        return None if self.unpriced_calls else self.cost_usd

    def add(self, usage: Usage, cost: float | None) -> None:
        self.max_request_tokens = max(self.max_request_tokens, usage.input_tokens)
        self.input_tokens += usage.input_tokens
        self.cached_tokens += usage.cache_read_tokens
        self.cache_write_tokens += usage.cache_write_tokens
        self.output_tokens += usage.output_tokens
        self.reasoning_tokens += usage.reasoning_tokens
        if cost is None:
            self.unpriced_calls += 1
        else:
            self.cost_usd += cost

    def merge(self, other: Account) -> None:
        for name in self.__dataclass_fields__:
            if name == "max_request_tokens":
                self.max_request_tokens = max(self.max_request_tokens, other.max_request_tokens)
            elif name != "without_usage":
                setattr(self, name, getattr(self, name) + getattr(other, name))

    def as_dict(self) -> dict[str, float | int | None]:
        return {
            "input_tokens": self.input_tokens,
            "cached_tokens": self.cached_tokens,
            "cache_write_tokens": self.cache_write_tokens,
            "output_tokens": self.output_tokens,
            "reasoning_tokens": self.reasoning_tokens,
            "max_request_tokens": self.max_request_tokens,
            "cost_usd": None if self.cost is None else round(self.cost, 6),
            "unpriced_calls": self.unpriced_calls,
        }


@dataclass
class Recorded(Account):
    """What the provider reported: the calls recorded with usage (``calls``), and the steps of those
    recorded without it (``without_usage``, not merged: only whole sessions are summed)."""

    reported_cost_usd: float = 0.0
    unreported_calls: int = 0  # calls recorded with usage but no cost
    calls: int = 0
    without_usage: list[int] = field(default_factory=list)

    @property
    def complete(self) -> bool:
        """Did every call record usage (and was there one)? Only then is it comparable to the baseline."""
        return self.calls > 0 and not self.without_usage

    @property
    def partial(self) -> bool:
        """Did some calls record usage and some not (a session that recorded none is a chat log)?"""
        return self.calls > 0 and bool(self.without_usage)

    def add(self, usage: Usage, cost: float | None) -> None:
        super().add(usage, cost)
        self.calls += 1

    def as_dict(self) -> dict[str, float | int | None]:
        data = super().as_dict()
        data["priced_usd"] = data.pop("cost_usd")
        data["cost_usd"] = None if self.unreported_calls else round(self.reported_cost_usd, 6)
        data["unreported_calls"] = self.unreported_calls
        data["calls_without_usage"] = len(self.without_usage)
        return data


@dataclass
class Accountant:
    """Token and cost accounting of plans for one session and one account."""

    counter: TokenCounter
    calibration: Calibration
    info: ModelInfo | None
    cache: PromptCacheSim

    def account(self, plan: Plan, reply_key: str, output: int, reasoning: int) -> tuple[Usage, Cost]:
        keys = [message_key(m) for m in plan.messages]
        raw = REQUEST_OVERHEAD + self.counter.tools(plan.params.get("tools"))
        prefix: list[int] = []
        for message, key in zip(plan.messages, keys, strict=True):
            raw += self.counter.message(message, key)
            prefix.append(self.calibration.apply(raw))
        total = prefix[-1] if prefix else self.calibration.apply(raw)
        hit = self.cache.request(keys, prefix, plan.messages, reply_key=reply_key)
        usage = Usage(total, output, min(hit.read, total), hit.write, reasoning, source="estimated")
        return usage, price(usage, self.info)
