"""Read real cassettes independently of litellm: the request to replay and the usage recorded."""

from __future__ import annotations

import gzip
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import yaml


@dataclass
class Interaction:
    provider: str
    request: dict[str, Any]
    uri: str
    response_text: str


def _body_text(body: Any) -> str:
    raw = body.get("string") if isinstance(body, dict) else body
    if isinstance(raw, bytes):
        try:
            raw = gzip.decompress(raw)
        except OSError:
            pass
        return raw.decode()
    return str(raw)


def interactions(path: Path) -> list[Interaction]:
    data = yaml.safe_load(path.read_text())
    out = []
    for item in data["interactions"]:
        uri = item["request"]["uri"]
        provider = "anthropic" if "anthropic.com" in uri else "openai"
        out.append(Interaction(provider, json.loads(item["request"]["body"]), uri,
                               _body_text(item["response"]["body"])))
    return out


def _sse_payloads(text: str) -> list[dict[str, Any]]:
    payloads = []
    for line in text.splitlines():
        line = line.strip()
        if line.startswith("data:"):
            data = line[5:].strip()
            if data and data != "[DONE]":
                payloads.append(json.loads(data))
    return payloads


def recorded_usage(item: Interaction) -> dict[str, int] | None:
    """Usage as the provider recorded it, in our convention (cache and reasoning included)."""
    text = item.response_text
    if item.provider == "anthropic":
        if text.lstrip().startswith("{"):
            usage = json.loads(text)["usage"]
        else:
            usage = {}
            for payload in _sse_payloads(text):
                if payload.get("type") == "message_start":
                    usage.update(payload["message"]["usage"])
                elif payload.get("type") == "message_delta":
                    usage.update(payload.get("usage") or {})
        read = usage.get("cache_read_input_tokens") or 0
        write = usage.get("cache_creation_input_tokens") or 0
        return {"input_tokens": usage["input_tokens"] + read + write, "output_tokens": usage["output_tokens"],
                "cache_read_tokens": read, "cache_write_tokens": write}
    if text.lstrip().startswith("{"):
        usage = json.loads(text).get("usage")
    else:
        usage = next((p["usage"] for p in reversed(_sse_payloads(text)) if p.get("usage")), None)
    if not usage:
        return None
    details = usage.get("prompt_tokens_details") or {}
    completion = usage.get("completion_tokens_details") or {}
    return {"input_tokens": usage["prompt_tokens"], "output_tokens": usage["completion_tokens"],
            "cache_read_tokens": details.get("cached_tokens") or 0,
            "reasoning_tokens": completion.get("reasoning_tokens") or 0}


def recorded_model(item: Interaction) -> str:
    text = item.response_text
    if text.lstrip().startswith("{"):
        return str(json.loads(text)["model"])
    for payload in _sse_payloads(text):
        if "model" in payload:
            return str(payload["model"])
        if payload.get("type") == "message_start":
            return str(payload["message"]["model"])
    raise AssertionError("no model in the recorded response")


def completion_kwargs(item: Interaction) -> dict[str, Any]:
    """The ``completion`` keyword arguments that reproduce the recorded request."""
    body = dict(item.request)
    if item.provider == "openai":
        kwargs = {k: v for k, v in body.items() if k in ("model", "messages", "tools", "stream", "reasoning_effort")}
        parsed = urlparse(item.uri)
        if parsed.hostname != "api.openai.com":
            kwargs["api_base"] = f"{parsed.scheme}://{parsed.netloc}/v1"
        return kwargs
    messages = list(body["messages"])
    if body.get("system"):
        messages.insert(0, {"role": "system", "content": body["system"]})
    kwargs = {"model": f"anthropic/{body['model']}", "messages": messages, "max_tokens": body["max_tokens"]}
    if body.get("stream"):
        kwargs["stream"] = True
    if body.get("thinking"):
        kwargs["thinking"] = body["thinking"]
    if body.get("tools"):
        kwargs["tools"] = [{"type": "function", "function": {"name": t["name"], "description": t["description"],
                                                             "parameters": t["input_schema"]}} for t in body["tools"]]
    return kwargs


def capturing_vcr() -> tuple[Any, list[dict[str, Any]]]:
    """A vcr that replays a cassette whatever the body, and keeps each body litellm really sent."""
    import vcr

    sent: list[dict[str, Any]] = []

    def capture(live: Any, recorded: Any) -> None:
        sent.append(json.loads(live.body))

    replayer = vcr.VCR(record_mode="none", decode_compressed_response=True,
                       match_on=["method", "scheme", "host", "port", "path", "capture"])
    replayer.register_matcher("capture", capture)
    return replayer, sent
