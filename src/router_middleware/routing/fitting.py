"""Fit the difficulty scorer (:mod:`.fitted`) from judged prompts, in pure Python.

Input: CSV files with a ``prompt`` column and one score column per model (numbers or true/false;
columns holding other text, such as responses, are skipped; empty cells are unjudged). Scores are
normalized per file to 0..1 (kept as they are when already in 0..1, else by the file's min and max).
Then: a model's strength is its mean score; a prompt's difficulty target is the mean, over the
models judged on it, of (strength - score); a ridge regression over :mod:`.features` predicts that
target from the text (conjugate gradients on sparse rows); ``a`` and ``b`` of
P(good enough) = sigmoid(a * (s - d) + b) are fitted by logistic regression on out-of-fold
difficulties (two folds), so the probabilities are not those of prompts the model has seen. Each
source (a command-line argument: a file, or all the files of a folder or glob) weighs the same in
total, so 14,000 MMLU rows do not drown 300 arena prompts.
"""

from __future__ import annotations

import csv
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ..errors import RouterMiddlewareError
from .evaluation import FALSE, TRUE
from .features import DIM, text_features
from .fitted import FittedScorer, model_key, sigmoid

RIDGE = 3.0
CG_STEPS = 40


@dataclass(frozen=True)
class Judged:
    prompt: str
    scores: dict[str, float]  # model_key -> normalized score
    weight: float = 1.0


@dataclass
class Fit:
    scorer: FittedScorer
    rows: int
    sources: list[dict[str, object]] = field(default_factory=list)


def held_out(prompt: str, every: int) -> bool:
    """Whether ``prompt`` is in the fixed held-out slice (CRC-32 of the prompt divisible by ``every``)."""
    return every > 0 and zlib.crc32(prompt.encode("utf-8")) % every == 0


def _number(text: str) -> float | None:
    low = text.strip().lower()
    if low in TRUE:
        return 1.0
    if low in FALSE - {""}:
        return 0.0
    try:
        return float(low)
    except ValueError:
        return None


def load_judgments(path: str | Path) -> list[Judged]:
    """The judged prompts of one CSV file, scores normalized to 0..1."""
    csv.field_size_limit(1 << 30)
    try:
        with open(path, newline="", encoding="utf-8") as handle:
            reader = csv.DictReader(handle)
            names = list(reader.fieldnames or [])
            if "prompt" not in names:
                raise RouterMiddlewareError(f"{path}: missing column 'prompt'; found {names}")
            rows = list(reader)
    except UnicodeDecodeError:
        raise RouterMiddlewareError(f"{path}: not UTF-8 text; save it as UTF-8") from None
    except OSError as exc:
        raise RouterMiddlewareError(f"{path}: cannot read ({exc.strerror})") from None
    columns: dict[str, list[float | None]] = {}
    for name in names:
        if name == "prompt":
            continue
        cells = [(row.get(name) or "").strip() for row in rows]
        values = [_number(c) if c else None for c in cells]
        if any(c and v is None for c, v in zip(cells, values, strict=True)) or all(v is None for v in values):
            continue  # text (e.g. responses) or empty: not a model's scores
        columns[name] = values
    if not columns:
        raise RouterMiddlewareError(f"{path}: no model score columns (numbers or true/false) besides 'prompt'; "
                                    f"found {names}")
    seen = [v for values in columns.values() for v in values if v is not None]
    low, high = (0.0, 1.0) if min(seen) >= 0 and max(seen) <= 1 else (min(seen), max(seen))
    span = (high - low) or 1.0
    out = []
    for i, row in enumerate(rows):
        scores = {model_key(n): (value - low) / span for n, v in columns.items() if (value := v[i]) is not None}
        if scores and row["prompt"].strip():
            out.append(Judged(row["prompt"], scores))
    return out


def _ridge(rows: Sequence[list[tuple[int, float]]], y: Sequence[float], w: Sequence[float],
           lam: float = RIDGE) -> tuple[dict[int, float], float]:
    """Weighted ridge regression by conjugate gradients: (X'WX + lam I) beta = X'W(y - mean)."""
    total = sum(w)
    mean = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / total
    scale = len(y) / total  # mean weight 1, so lam means the same whatever the weights

    def normal(v: list[float]) -> list[float]:
        out = [lam * x for x in v]
        for row, wi in zip(rows, w, strict=True):
            dot = sum(v[i] * x for i, x in row) * wi * scale
            if dot:
                for i, x in row:
                    out[i] += dot * x
        return out

    rhs = [0.0] * DIM
    for row, wi, yi in zip(rows, w, y, strict=True):
        for i, x in row:
            rhs[i] += wi * scale * (yi - mean) * x
    beta = [0.0] * DIM
    r, p = rhs[:], rhs[:]
    rr = sum(x * x for x in r)
    start = rr
    for _ in range(CG_STEPS):
        if rr <= 1e-12 * start or rr == 0:
            break
        q = normal(p)
        alpha = rr / sum(a * b for a, b in zip(p, q, strict=True))
        beta = [b + alpha * x for b, x in zip(beta, p, strict=True)]
        r = [a - alpha * x for a, x in zip(r, q, strict=True)]
        new = sum(x * x for x in r)
        p = [a + (new / rr) * x for a, x in zip(r, p, strict=True)]
        rr = new
    return {i: b for i, b in enumerate(beta) if abs(b) > 1e-7}, mean


def _predict(weights: dict[int, float], bias: float, row: list[tuple[int, float]]) -> float:
    return bias + sum(weights.get(i, 0.0) * x for i, x in row)


def _calibrate(points: Sequence[tuple[float, float, float]]) -> tuple[float, float]:
    """Logistic regression y ~ sigmoid(a * x + b) with soft labels and weights, by Newton steps."""
    a, b = 1.0, 0.0
    for _ in range(30):
        ga = gb = haa = hab = hbb = 0.0
        for x, y, w in points:
            p = sigmoid(a * x + b)
            g, h = w * (p - y), w * max(p * (1 - p), 1e-9)
            ga, gb = ga + g * x, gb + g
            haa, hab, hbb = haa + h * x * x, hab + h * x, hbb + h
        haa += 1e-6
        det = haa * hbb - hab * hab
        if det <= 0:
            break
        da, db = (hbb * ga - hab * gb) / det, (haa * gb - hab * ga) / det
        a, b = a - da, b - db
        if abs(da) + abs(db) < 1e-9:
            break
    return a, b


def fit_router(sources: Sequence[Sequence[Judged]], names: Sequence[str] = (), *, hold_out: int = 0) -> Fit:
    """Fit a :class:`FittedScorer` on ``sources`` (each a list of judged prompts); prompts in the
    ``held_out(prompt, hold_out)`` slice are left out."""
    kept = [[j for j in source if not held_out(j.prompt, hold_out)] for source in sources]
    if not any(kept):
        raise RouterMiddlewareError("no judged prompts to fit on")
    per_source = sum(len(s) for s in kept) / sum(1 for s in kept if s)
    data = [Judged(j.prompt, j.scores, per_source / len(s)) for s in kept for j in s]
    sums: dict[str, list[float]] = {}
    for j in data:
        for m, v in j.scores.items():
            acc = sums.setdefault(m, [0.0, 0.0])
            acc[0], acc[1] = acc[0] + j.weight * v, acc[1] + j.weight
    strength = {m: s / n for m, (s, n) in sums.items()}
    target = [sum(strength[m] - v for m, v in j.scores.items()) / len(j.scores) for j in data]
    rows = [sorted(text_features(j.prompt).items()) for j in data]
    weights = [j.weight for j in data]
    out_of_fold = [0.0] * len(data)
    for fold in (0, 1):
        train = [i for i in range(len(data)) if i % 2 != fold]
        beta, bias = _ridge([rows[i] for i in train], [target[i] for i in train], [weights[i] for i in train])
        for i in range(fold, len(data), 2):
            out_of_fold[i] = _predict(beta, bias, rows[i])
    a, b = _calibrate([(strength[m] - out_of_fold[i], v, j.weight) for i, j in enumerate(data)
                       for m, v in j.scores.items()])
    beta, bias = _ridge(rows, target, weights)
    scorer = FittedScorer({i: round(w, 6) for i, w in beta.items() if abs(w) >= 1e-6}, round(bias, 6),
                          {m: round(s, 4) for m, s in sorted(strength.items())}, round(a, 4), round(b, 4))
    described = [{"source": str(n), "prompts": len(s)} for n, s in zip(names, kept, strict=False)]
    return Fit(scorer, len(data), described)


def cross_validated(examples: Sequence[Judged], prompts: Sequence[str], folds: int = 5,
                    extra: Sequence[Sequence[Judged]] = ()) -> list[float]:
    """Difficulty of each of ``prompts`` from a fit that never saw it: ``folds`` folds by position
    (prompt i is in fold i % folds), each fitted on the other folds of ``examples`` plus ``extra``."""
    by_prompt = {j.prompt: k for k, j in enumerate(examples)}
    out = [math.nan] * len(prompts)
    for fold in range(folds):
        train = [j for k, j in enumerate(examples) if k % folds != fold]
        scorer = fit_router([train, *extra]).scorer
        for i, p in enumerate(prompts):
            if by_prompt.get(p, -1) % folds == fold:
                out[i] = scorer.difficulty(p)
    return out
