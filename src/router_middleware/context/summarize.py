"""Model-written summaries of dropped spans: the request to send, and where the answer is kept.

The window policy stays pure: it asks for a summary by adding a :class:`SummaryJob` to the plan and
uses the offline digest meanwhile. The pipeline sends the request below (through litellm, with a
cheap model), stores the answer under the span's hash, and plans again, so this call and every later
call of the session reuse the same summary instead of paying for it again.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..messages import text_of
from ..types import SummaryJob

INSTRUCTIONS = (
    "You compress the earlier part of a conversation so that an assistant can continue it without the "
    "original messages. Keep: the goal, decisions taken and why, file paths, commands and their key "
    "results, names and places, and open questions. Drop pleasantries and repeated output. Be concise."
)


SIDE_CALL = "router_middleware_side_call"  # metadata key marking a call the pipeline makes itself


def summary_request(job: SummaryJob, model: str, params: Mapping[str, Any]) -> dict[str, Any]:
    """litellm kwargs of the summary call; its metadata marks it as the pipeline's own (``SIDE_CALL``),
    so a ``RouterLogger`` does not account it a second time: it is in the row of the call it serves."""
    transcript = "\n\n".join(f"[{m.get('role')}] {text_of(m)}" for m in job.messages)
    metadata = {**(params.get("metadata") or {}), SIDE_CALL: True}  # no string: litellm may forward those
    return {
        "model": model,
        "messages": [{"role": "system", "content": INSTRUCTIONS},
                     {"role": "user", "content": f"Summarize these {len(job.messages)} messages:\n\n{transcript}"}],
        "max_tokens": 600,
        "temperature": 0,
        **params,
        "metadata": metadata,
    }


def summary_text(response: Any) -> str | None:
    """The summary a litellm response carries, or ``None``."""
    choices = getattr(response, "choices", None) or []
    text = getattr(getattr(choices[0], "message", None), "content", None) if choices else None
    return text.strip() if isinstance(text, str) and text.strip() else None
