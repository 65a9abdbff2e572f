"""Semantic response cache (extra ``semantic``): a paraphrase of an earlier last user turn is a hit.

Scope: like the exact cache (app and tenant), and further by everything else in the request (model,
earlier messages, tools, sampling parameters), so only the last user turn may differ. Within a scope
the nearest stored turn by cosine similarity of embeddings is a hit when it reaches ``threshold``
*and* both turns contain the same numbers: "16 eggs" and "18 eggs" embed almost identically but
have different answers (see benchmarks/RESULTS.md for the measured precision with and without this
guard). Embeddings come from all-MiniLM-L6-v2 run locally on onnxruntime (loaded offline) or litellm's
``embedding`` call; vectors live in the configured store.
"""

from __future__ import annotations

import base64
import hashlib
import json
import math
import re
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from .cache import keyed_params, namespace
from .messages import text_of
from .stores import Store
from .telemetry import log
from .types import Plan

_NUMBER = re.compile(r"\d+(?:[.,]\d+)*")


class Embedder(Protocol):
    def __call__(self, texts: Sequence[str]) -> list[list[float]]: ...


def local_embedder(texts: Sequence[str]) -> list[list[float]]:
    """all-MiniLM-L6-v2 (int8 ONNX on onnxruntime, see :mod:`.minilm`), normalized vectors."""
    from . import minilm

    return minilm.embed(texts)


def litellm_embedder(model: str) -> Embedder:
    def embed(texts: Sequence[str]) -> list[list[float]]:
        import litellm

        response = litellm.embedding(model=model, input=list(texts))
        vectors = [item["embedding"] for item in response.data]
        return [_normalize(v) for v in vectors]

    return embed


def _normalize(vector: Sequence[float]) -> list[float]:
    norm = math.sqrt(sum(x * x for x in vector)) or 1.0
    return [x / norm for x in vector]


def numbers(text: str) -> list[str]:
    return sorted(_NUMBER.findall(text))


def last_user_text(plan: Plan) -> str | None:
    if not plan.messages or plan.messages[-1].get("role") != "user":
        return None
    return text_of(plan.messages[-1])


def scope_of(plan: Plan) -> str:
    material = {
        "model": plan.model,
        "before": [dict(m) for m in plan.messages[:-1]],
        "params": keyed_params(plan.params),
    }
    blob = json.dumps(material, sort_keys=True, ensure_ascii=True, default=str)
    return f"{namespace(plan)}:sem:{hashlib.sha256(blob.encode()).hexdigest()[:32]}"


def _pack(vector: Sequence[float]) -> str:
    import struct

    return base64.b64encode(struct.pack(f"{len(vector)}f", *vector)).decode()


def _unpack(blob: str) -> list[float]:
    import struct

    raw = base64.b64decode(blob)
    return list(struct.unpack(f"{len(raw) // 4}f", raw))


@dataclass
class SemanticMatch:
    cache_key: str
    similarity: float


class SemanticIndex:
    def __init__(self, store: Store, embed: Embedder, *, threshold: float = 0.9, max_per_scope: int = 200,
                 ttl_s: float = 3600.0, number_guard: bool = True) -> None:
        self.store = store
        self.embed = embed
        self.threshold = threshold
        self.max_per_scope = max_per_scope
        self.ttl_s = ttl_s
        self.number_guard = number_guard

    def find(self, plan: Plan) -> SemanticMatch | None:
        text = last_user_text(plan)
        if text is None:
            return None
        scope = scope_of(plan)
        try:
            index = json.loads(self.store.get(f"{scope}:index") or b"[]")
            if not index:
                return None
            query = self.embed([text])[0]
            wanted = numbers(text)
            best: SemanticMatch | None = None
            for entry_id in index:
                raw = self.store.get(f"{scope}:e:{entry_id}")
                if raw is None:
                    continue
                entry = json.loads(raw)
                if self.number_guard and entry["numbers"] != wanted:
                    continue
                similarity = sum(a * b for a, b in zip(query, _unpack(entry["vector"]), strict=False))
                if similarity >= self.threshold and (best is None or similarity > best.similarity):
                    best = SemanticMatch(entry["key"], similarity)
            return best
        except Exception as exc:  # noqa: BLE001 - a broken index is a miss
            log.warning("semantic_lookup_failed", error_type=type(exc).__name__, error=str(exc)[:200])
            return None

    def add(self, plan: Plan, cache_key: str) -> None:
        text = last_user_text(plan)
        if text is None:
            return
        scope = scope_of(plan)
        try:
            entry_id = uuid.uuid4().hex[:16]
            vector = self.embed([text])[0]
            self.store.set(f"{scope}:e:{entry_id}", json.dumps(
                {"vector": _pack(vector), "numbers": numbers(text), "key": cache_key}).encode(), ttl_s=self.ttl_s)
            for _ in range(20):  # optimistic append; concurrent writers retry
                current = self.store.get(f"{scope}:index")
                index = json.loads(current or b"[]")
                index = [*index, entry_id][-self.max_per_scope:]
                if self.store.compare_and_set(f"{scope}:index", current, json.dumps(index).encode(), self.ttl_s):
                    return
        except Exception as exc:  # noqa: BLE001 - a failed write only loses a future hit
            log.warning("semantic_write_failed", error_type=type(exc).__name__, error=str(exc)[:200])
