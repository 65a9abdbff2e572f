"""The fitted difficulty scorer: a prompt difficulty d(prompt), per-model strengths s(model), and
P(model good enough) = sigmoid(a * (s - d) + b).

d is a fitted function of the hand-set heuristic (:func:`.difficulty.score_text`):

- core (no extra needed, pure Python): d = intercept + slope * logit(heuristic), so it ranks prompts
  as the heuristic does and adds what the heuristic lacks: a scale shared with the strengths, hence
  a probability per model pair;
- with embeddings (the ``semantic`` extra, opt-in as ``routing.scorer.embeddings``): the same plus a
  linear correction on the request's MiniLM embedding, fitted (ridge) to what the heuristic line
  leaves unexplained. Under cross-validation it ranks arena-bench (chat) prompts better than the
  heuristic, and GSM8K and MMLU prompts worse when fitted on arena-bench alone
  (benchmarks/RESULTS.md), hence opt-in.

Strengths and d share one scale: a model's mean normalized score (0..1) over the judged prompts,
and a prompt's expected shortfall below each model's mean. A model the file does not know gets its
strength from the config (``routing.scorer.strength``). The file is read lazily, once per path.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from functools import cache, lru_cache
from importlib import resources
from importlib.util import find_spec
from pathlib import Path
from typing import Any

from ..errors import RouterMiddlewareError
from ..files import read_json
from . import difficulty as heuristic

FORMAT = "router-middleware/fitted-difficulty"
VERSION = 2
BUNDLED = "bundled"
EMBEDDER = "all-MiniLM-L6-v2"
Embed = Callable[[Sequence[str]], list[list[float]]]


def model_key(name: str) -> str:
    """The name strengths are matched by: the part after the last ``/``, lower-cased."""
    return name.rsplit("/", 1)[-1].lower()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


def heuristic_logit(text: str) -> float:
    """logit of the heuristic's score: the feature both paths share (its sigmoid undone)."""
    p = min(1 - 1e-6, max(1e-6, heuristic.score_text(text)))
    return math.log(p / (1 - p))


@cache
def embeddings_installed() -> bool:
    """Whether the ``semantic`` extra (onnxruntime, tokenizers, the MiniLM weights) is importable."""
    from ..semantic import LOCAL_MODEL_MODULES

    return all(find_spec(name) is not None for name in LOCAL_MODEL_MODULES)


def local_embed(texts: Sequence[str]) -> list[list[float]]:
    from .. import minilm

    return minilm.embed(texts)


@dataclass(frozen=True)
class EmbeddingTerm:
    """The embedding path's correction: d += weights . embedding + bias, with its own calibration."""

    weights: tuple[float, ...]
    bias: float
    a: float
    b: float

    def correction(self, vector: Sequence[float]) -> float:
        return self.bias + sum(w * x for w, x in zip(self.weights, vector, strict=True))

    def as_dict(self) -> dict[str, Any]:
        return {"embedder": EMBEDDER, "dim": len(self.weights), "bias": self.bias, "a": self.a, "b": self.b,
                "weights": list(self.weights)}


@dataclass(frozen=True)
class FittedScorer:
    intercept: float
    slope: float
    strength: dict[str, float]  # by model_key
    a: float
    b: float
    embedding: EmbeddingTerm | None = None
    source: str = ""
    use_embeddings: bool = False  # add the embedding term (when the file has one and the extra is installed)
    embed: Embed = local_embed

    @property
    def embedding_path(self) -> bool:
        """Whether :meth:`difficulty` embeds the text (else: the core path, heuristic only)."""
        return self.embedding is not None and self.use_embeddings and (self.embed is not local_embed
                                                                    or embeddings_installed())

    def with_embeddings(self, on: bool = True, embed: Embed | None = None) -> FittedScorer:
        return replace(self, use_embeddings=on, embed=embed or self.embed)

    def difficulty(self, text: str, vector: Sequence[float] | None = None) -> float:
        """d(text); ``vector``: the text's embedding, when the caller has it already."""
        core = self.intercept + self.slope * heuristic_logit(text)
        if self.embedding is not None and (vector is not None or self.embedding_path):
            return core + self.embedding.correction(vector if vector is not None else self.embed([text])[0])
        return core

    def strength_of(self, model: str, overrides: dict[str, float] | None = None) -> float | None:
        """The config's strength for ``model`` (exact name, then key), else the fitted one, else None."""
        for table in (overrides or {}, {model_key(k): v for k, v in (overrides or {}).items()}, self.strength):
            for name in (model, model_key(model)):
                if name in table:
                    return table[name]
        return None

    def p_good(self, difficulty: float, strength: float) -> float:
        """P(a model of this strength is good enough on a prompt of this difficulty), calibrated for
        the path :meth:`difficulty` takes."""
        a, b = (self.embedding.a, self.embedding.b) if self.embedding is not None and self.embedding_path \
            else (self.a, self.b)
        return sigmoid(a * (strength - difficulty) + b)

    def mean_strength(self) -> float:
        return sum(self.strength.values()) / len(self.strength)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": VERSION, "intercept": self.intercept, "slope": self.slope,
                "a": self.a, "b": self.b, "strength": self.strength,
                "embedding": self.embedding.as_dict() if self.embedding is not None else None}


def _embedding(data: Any) -> EmbeddingTerm | None:
    if data is None:
        return None
    if data.get("embedder") != EMBEDDER:
        raise ValueError(f"embedding fitted with {data.get('embedder')!r}, this version embeds with {EMBEDDER}")
    weights = tuple(float(x) for x in data["weights"])
    if len(weights) != int(data["dim"]):
        raise ValueError(f"embedding: {len(weights)} weights for dim {data['dim']}")
    return EmbeddingTerm(weights, float(data["bias"]), float(data["a"]), float(data["b"]))


def _parse(data: Any, where: str) -> FittedScorer:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RouterMiddlewareError(f"{where}: not a fitted router file (no \"format\": \"{FORMAT}\")")
    if data.get("version") != VERSION:
        raise RouterMiddlewareError(f"{where}: a version {data.get('version')} fitted router file, this version reads "
                                    f"{VERSION}; refit it with fit-router")
    try:
        strength = {str(k): float(v) for k, v in data["strength"].items()}
        scorer = FittedScorer(float(data["intercept"]), float(data["slope"]), strength, float(data["a"]),
                              float(data["b"]), _embedding(data.get("embedding")), where)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RouterMiddlewareError(f"{where}: malformed fitted router file ({type(exc).__name__}: {exc})") from None
    if not strength:
        raise RouterMiddlewareError(f"{where}: malformed fitted router file (no strengths)")
    return scorer


@lru_cache(maxsize=8)
def _load(path: str) -> FittedScorer:
    return _parse(read_json(path, RouterMiddlewareError, "the fitted router file"), path)


def bundled_path() -> str:
    return str(resources.files("router_middleware") / "data" / "router-fit.json")


def load_fitted(path: str | None = None, embeddings: bool = False) -> FittedScorer:
    """The fitted scorer in ``path`` (``None`` or ``"bundled"``: the one shipped in the package);
    ``embeddings``: add its embedding term when it has one and the ``semantic`` extra is installed."""
    scorer = _load(bundled_path() if path in (None, BUNDLED) else str(Path(path).resolve()))
    return scorer.with_embeddings() if embeddings else scorer
