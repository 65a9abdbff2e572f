"""Model-written summaries of dropped spans: the request to send, and where the answer is kept.

The window policy stays pure: it asks for a summary by adding a :class:`SummaryJob` to the plan and
uses the offline digest meanwhile. The pipeline sends the request below (through litellm, with a
cheap model), stores the answer under the span's hash, and plans again, so this call and every later
call of the session reuse the same summary instead of paying for it again.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from ..messages import text_of
from ..types import SummaryJob

INSTRUCTIONS = (
    "You compress the earlier part of a conversation so that an assistant can continue it without the "
    "original messages. Keep: the goal, decisions taken and why, file paths, commands and their key "
    "results, names and places, and open questions. Drop pleasantries and repeated output. Be concise."
)


SIDE_CALL = "router_middleware_side_call"  # metadata key marking a call the pipeline makes itself


SUMMARY_TIMEOUT_S = 15.0  # the call waits this long at most for a summary, then sends the digest


SUMMARY_OUTPUT = 600  # max_tokens of a summary
_PROMPT_OVERHEAD = 200  # the instructions and the message framing, in tokens (rounded up)


def summary_request(job: SummaryJob, model: str, params: Mapping[str, Any], call_timeout: Any = None, *,
                    window: int | None = None, count: Callable[[str], int] | None = None) -> dict[str, Any]:
    """litellm kwargs of the summary call; its metadata marks it as the pipeline's own (``SIDE_CALL``),
    so a ``RouterLogger`` does not account it a second time: it is in the row of the call it serves.
    The call waits for it: it gives up after ``SUMMARY_TIMEOUT_S`` (or ``summary_params.timeout``), never
    after the call's own ``timeout`` (``call_timeout``), and is not retried (a summary model that hangs
    made a call wait three times its timeout, or for ever without one; the digest serves then). With
    the summary model's input ``window`` and a token ``count``, a span too big for it is sent without
    its middle (:func:`fit_transcript`), not refused by the provider after a wait."""
    transcript = "\n\n".join(f"[{m.get('role')}] {text_of(m)}" for m in job.messages)
    if window is not None and count is not None:
        # an output cap near the window (a request the provider refuses anyway) leaves half of it
        transcript = fit_transcript(transcript, window - min(_output(params), window // 2) - _PROMPT_OVERHEAD, count)
    metadata = {**(params.get("metadata") or {}), SIDE_CALL: True}  # no string: litellm may forward those
    return {
        "model": model,
        "messages": [{"role": "system", "content": INSTRUCTIONS},
                     {"role": "user", "content": f"Summarize these {len(job.messages)} messages:\n\n{transcript}"}],
        "max_tokens": SUMMARY_OUTPUT,
        "temperature": 0,
        "max_retries": 0,
        "num_retries": 0,
        **params,
        "metadata": metadata,
    } | _within(params.get("timeout", SUMMARY_TIMEOUT_S), call_timeout)


def _output(params: Mapping[str, Any]) -> int:
    """The output the summary call asks room for: ``summary_params``' own cap where it sets one (the
    larger, if both), else ``SUMMARY_OUTPUT``."""
    caps = [v for k in ("max_tokens", "max_completion_tokens")
            if isinstance(v := params.get(k), int) and not isinstance(v, bool) and v > 0]
    return max(caps, default=SUMMARY_OUTPUT)


def fit_transcript(transcript: str, room: int, count: Callable[[str], int]) -> str:
    """``transcript`` within ``room`` tokens: over it, its middle is left out (said so in its place),
    keeping the span's start (the task) and end (the latest decisions), with a tenth to spare for a
    provider that counts more."""
    if len(transcript.encode()) <= room:  # a token is at least one byte: it fits uncounted
        return transcript
    cut, tokens, half = transcript, count(transcript), len(transcript) // 2
    while tokens > room and half > 0:  # counted again after each cut: what is kept may be denser than the rest
        half = max(0, min(half - 1, int(2 * half * room / tokens * 0.9) // 2))
        cut = (f"{transcript[:half]}\n\n[... {len(transcript) - 2 * half:,} characters left out here: the span is "
               f"over the summary model's window ...]\n\n{transcript[len(transcript) - half:]}")
        tokens = count(cut)
    return cut


def _within(timeout: Any, call_timeout: Any) -> dict[str, Any]:
    """The summary's ``timeout``, cut to the call's own when that is shorter (numbers of seconds)."""
    numbers = [t for t in (timeout, call_timeout) if isinstance(t, int | float) and not isinstance(t, bool) and t > 0]
    return {"timeout": min(numbers)} if numbers else {}


def summary_text(response: Any) -> str | None:
    """The summary a litellm response carries, or ``None``."""
    choices = getattr(response, "choices", None) or []
    text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
    return text.strip() if isinstance(text, str) and text.strip() else None
