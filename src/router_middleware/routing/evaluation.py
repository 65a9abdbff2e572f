"""RouteLLM's routing metrics for a difficulty scorer: APGR, CPT(50%), CPT(80%), beside a random router.

Definitions (as restated in the shared routing data's SOURCES.txt): thresholds at the deciles of the
scores plus both ends; each threshold sends prompts scoring >= t to the strong model, giving a point
(share of calls to strong, mean quality). PGR = (quality - weak) / (strong - weak). CPT(x) is the
share of strong calls needed to reach PGR = x (linear interpolation). APGR is the area under the
quality curve over the strong share, normalized between the weak-only and strong-only areas.
"""

from __future__ import annotations

import csv
import io
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

from ..errors import RouterMiddlewareError
from ..files import read_text

TRUE = {"true", "1", "yes", "1.0"}
FALSE = {"false", "0", "no", "0.0", ""}


@dataclass(frozen=True)
class Example:
    prompt: str
    weak: float
    strong: float


def _value(raw: str | None, column: str, where: str) -> float:
    text = (raw or "").strip()
    if text.lower() in TRUE:
        return 1.0
    if text.lower() in FALSE:
        return 0.0
    try:
        return float(text)
    except ValueError:
        raise RouterMiddlewareError(f"{where}: column {column!r} is {text!r}, not a number or true/false") from None


def load_examples(paths: Sequence[str | Path], weak: str, strong: str) -> list[Example]:
    csv.field_size_limit(1 << 30)
    examples = []
    for path in paths:
        reader = csv.DictReader(io.StringIO(read_text(path, RouterMiddlewareError)))
        if not reader.fieldnames:
            raise RouterMiddlewareError(f"{path}: empty file (no header row)")
        missing = [c for c in ("prompt", weak, strong) if c not in reader.fieldnames]
        if missing:
            raise RouterMiddlewareError(f"{path}: missing column(s) {missing}; found {reader.fieldnames}")
        for line, row in enumerate(reader, start=2):
            where = f"{path}: line {line}"
            examples.append(Example(row["prompt"], _value(row[weak], weak, where), _value(row[strong], strong, where)))
    if not examples:
        raise RouterMiddlewareError(f"no rows to evaluate in {', '.join(map(str, paths))} (only a header)")
    return examples


def _points(scores: Sequence[float], examples: Sequence[Example]) -> list[tuple[float, float]]:
    ordered = sorted(scores)
    n = len(ordered)
    thresholds = {ordered[min(n - 1, int(n * q / 10))] for q in range(1, 10)}
    thresholds |= {min(ordered), float("inf")}
    points = []
    for t in sorted(thresholds):
        strong = [s >= t for s in scores]
        share = sum(strong) / n
        quality = sum(e.strong if use else e.weak for e, use in zip(examples, strong, strict=True)) / n
        points.append((share, quality))
    points.append((0.0, sum(e.weak for e in examples) / n))
    points.append((1.0, sum(e.strong for e in examples) / n))
    return sorted(set(points))


def _cpt(points: Sequence[tuple[float, float]], weak: float, strong: float, target: float) -> float:
    gap = strong - weak
    previous = None
    for share, quality in points:
        pgr = (quality - weak) / gap if gap else 1.0
        if pgr >= target:
            if previous is None:
                return share
            (s0, p0) = previous
            return s0 + (share - s0) * ((target - p0) / (pgr - p0) if pgr != p0 else 0.0)
        previous = (share, pgr)
    return 1.0


def metrics(scores: Sequence[float], examples: Sequence[Example]) -> dict[str, float]:
    points = _points(scores, examples)
    weak = sum(e.weak for e in examples) / len(examples)
    strong = sum(e.strong for e in examples) / len(examples)
    area = sum((s1 - s0) * (q0 + q1) / 2 for (s0, q0), (s1, q1) in zip(points, points[1:], strict=False))
    apgr = (area - weak) / (strong - weak) if strong != weak else 1.0
    return {"apgr": apgr, "cpt50": _cpt(points, weak, strong, 0.5), "cpt80": _cpt(points, weak, strong, 0.8),
            "weak_quality": weak, "strong_quality": strong}


def route_eval(examples: Sequence[Example], scorer: Callable[[str], float], *, seeds: int = 20) -> dict[str, float]:
    ours = metrics([scorer(e.prompt) for e in examples], examples)
    randoms = []
    for seed in range(seeds):
        rng = random.Random(seed)
        randoms.append(metrics([rng.random() for _ in examples], examples)["apgr"])
    return {**ours, "random_apgr": sum(randoms) / len(randoms), "n": len(examples)}
