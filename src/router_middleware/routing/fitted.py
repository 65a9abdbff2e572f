"""The fitted difficulty scorer: a prompt difficulty d(prompt) from a linear model over hashed text
features, per-model strengths s(model), and P(model good enough) = sigmoid(a * (s - d) + b).

Strengths and d share one scale: a model's mean normalized score (0..1) over the judged prompts,
and a prompt's expected shortfall below each model's mean. A model the file does not know gets its
strength from the config (``routing.scorer.strength``). The file is read lazily, once per path.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

from ..errors import RouterMiddlewareError
from .features import DIM, HASH_DIM, text_features

FORMAT = "router-middleware/fitted-difficulty"
BUNDLED = "bundled"


def model_key(name: str) -> str:
    """The name strengths are matched by: the part after the last ``/``, lower-cased."""
    return name.rsplit("/", 1)[-1].lower()


def sigmoid(x: float) -> float:
    return 1.0 / (1.0 + math.exp(-max(-60.0, min(60.0, x))))


@dataclass(frozen=True)
class FittedScorer:
    weights: dict[int, float]
    bias: float
    strength: dict[str, float]  # by model_key
    a: float
    b: float
    source: str = ""

    def difficulty(self, text: str) -> float:
        return self.bias + sum(self.weights.get(i, 0.0) * v for i, v in text_features(text).items())

    def strength_of(self, model: str, overrides: dict[str, float] | None = None) -> float | None:
        """The config's strength for ``model`` (exact name, then key), else the fitted one, else None."""
        for table in (overrides or {}, {model_key(k): v for k, v in (overrides or {}).items()}, self.strength):
            for name in (model, model_key(model)):
                if name in table:
                    return table[name]
        return None

    def p_good(self, difficulty: float, strength: float) -> float:
        """P(a model of this strength is good enough on a prompt of this difficulty)."""
        return sigmoid(self.a * (strength - difficulty) + self.b)

    def mean_strength(self) -> float:
        return sum(self.strength.values()) / len(self.strength)

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, "version": 1, "hash_dim": HASH_DIM, "dim": DIM, "bias": self.bias,
                "a": self.a, "b": self.b, "strength": self.strength,
                "weights": {str(i): w for i, w in sorted(self.weights.items())}}


def _parse(data: Any, where: str) -> FittedScorer:
    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise RouterMiddlewareError(f"{where}: not a fitted router file (no \"format\": \"{FORMAT}\")")
    if data.get("hash_dim") != HASH_DIM or data.get("dim") != DIM:
        raise RouterMiddlewareError(f"{where}: fitted for other features (hash_dim {data.get('hash_dim')}, "
                                    f"this version uses {HASH_DIM}); refit it with fit-router")
    try:
        weights = {int(k): float(v) for k, v in data["weights"].items()}
        strength = {str(k): float(v) for k, v in data["strength"].items()}
        scorer = FittedScorer(weights, float(data["bias"]), strength, float(data["a"]), float(data["b"]), where)
    except (KeyError, TypeError, ValueError, AttributeError) as exc:
        raise RouterMiddlewareError(f"{where}: malformed fitted router file ({type(exc).__name__}: {exc})") from None
    if not strength or any(not 0 <= i < DIM for i in weights):
        raise RouterMiddlewareError(f"{where}: malformed fitted router file (no strengths or a weight index "
                                    f"outside 0..{DIM - 1})")
    return scorer


@lru_cache(maxsize=8)
def _load(path: str) -> FittedScorer:
    try:
        text = Path(path).read_text(encoding="utf-8")
    except OSError as exc:
        raise RouterMiddlewareError(f"{path}: cannot read the fitted router file ({exc.strerror})") from None
    except UnicodeDecodeError:
        raise RouterMiddlewareError(f"{path}: the fitted router file is not UTF-8 JSON") from None
    try:
        data = json.loads(text)
    except ValueError as exc:
        raise RouterMiddlewareError(f"{path}: the fitted router file is not valid JSON ({exc})") from None
    return _parse(data, path)


def bundled_path() -> str:
    return str(resources.files("router_middleware") / "data" / "router-fit.json")


def load_fitted(path: str | None = None) -> FittedScorer:
    """The fitted scorer in ``path`` (``None`` or ``"bundled"``: the one shipped in the package)."""
    return _load(bundled_path() if path in (None, BUNDLED) else str(Path(path).resolve()))
