"""Fit the difficulty scorer (:mod:`.fitted`) from judged prompts.

Input: CSV files with a ``prompt`` column and one score column per model (numbers or true/false;
columns holding other text, such as responses, are skipped; empty cells are unjudged). Scores are
normalized per file to 0..1 (kept as they are when already in 0..1, else by the file's min and max).
Then: a model's strength is its mean score; a prompt's difficulty target is the mean, over the
models judged on it, of (strength - score). The core path (pure Python) is a weighted least-squares
line of that target on logit(heuristic score); with an embedder (the ``semantic`` extra), a
weighted ridge regression (numpy, penalty ``RIDGE``) of what that line leaves unexplained on the
prompts' MiniLM embeddings adds the embedding path. ``a`` and ``b`` of
P(good enough) = sigmoid(a * (s - d) + b) are fitted by logistic regression on every
(prompt, model) judgment, for each path. Each source (a command-line argument: a file, or all the
files of a folder or glob) weighs the same in total, so 14,000 MMLU rows do not drown 300 arena
prompts.
"""

from __future__ import annotations

import csv
import io
import math
import zlib
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

from ..errors import RouterMiddlewareError
from ..files import read_text
from .evaluation import FALSE, TRUE
from .fitted import Embed, EmbeddingTerm, FittedScorer, heuristic_logit, model_key, sigmoid

RIDGE = 3.0  # penalty of the embedding term (in prompts of mean weight)
MIN_SLOPE = 1e-3  # the heuristic always orders prompts (a fit never turns it around)


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
    reader = csv.DictReader(io.StringIO(read_text(path, RouterMiddlewareError)))
    names = list(reader.fieldnames or [])
    if "prompt" not in names:
        raise RouterMiddlewareError(f"{path}: missing column 'prompt'; found {names}")
    rows = list(reader)
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


def _line(x: Sequence[float], y: Sequence[float], w: Sequence[float]) -> tuple[float, float]:
    """Weighted least squares y ~ intercept + slope * x, the slope at least ``MIN_SLOPE``."""
    total = sum(w)
    mx = sum(wi * xi for wi, xi in zip(w, x, strict=True)) / total
    my = sum(wi * yi for wi, yi in zip(w, y, strict=True)) / total
    sxx = sum(wi * (xi - mx) ** 2 for wi, xi in zip(w, x, strict=True))
    sxy = sum(wi * (xi - mx) * (yi - my) for wi, xi, yi in zip(w, x, y, strict=True))
    slope = max(MIN_SLOPE, sxy / sxx if sxx > 0 else 0.0)
    return my - slope * mx, slope


def _fit_embedding(vectors: Sequence[Sequence[float]], residual: Sequence[float],
                   weights: Sequence[float]) -> EmbeddingTerm:
    """Weighted ridge regression residual ~ bias + weights . vector (the bias unpenalized)."""
    import numpy as np

    x = np.asarray(vectors, dtype=np.float64)
    r = np.asarray(residual, dtype=np.float64)
    w = np.asarray(weights, dtype=np.float64)
    w = w * len(w) / w.sum()  # mean weight 1, so RIDGE means the same whatever the weights
    mx, mr = np.average(x, axis=0, weights=w), float(np.average(r, weights=w))
    xc = x - mx
    beta = np.linalg.solve(xc.T @ (xc * w[:, None]) + RIDGE * np.eye(x.shape[1]), xc.T @ (w * (r - mr)))
    return EmbeddingTerm(tuple(round(float(v), 6) for v in beta), round(mr - float(mx @ beta), 6), 1.0, 0.0)


def fit_router(sources: Sequence[Sequence[Judged]], names: Sequence[str] = (), *, hold_out: int = 0,
               embed: Embed | None = None) -> Fit:
    """Fit a :class:`FittedScorer` on ``sources`` (each a list of judged prompts); prompts in the
    ``held_out(prompt, hold_out)`` slice are left out. ``embed``: an embedder (e.g.
    :func:`.fitted.local_embed`) to fit the embedding path too; ``None``: the core path alone."""
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
    logits = [heuristic_logit(j.prompt) for j in data]
    weights = [j.weight for j in data]

    def calibrated(difficulty: Sequence[float]) -> tuple[float, float]:
        a, b = _calibrate([(strength[m] - difficulty[i], v, j.weight) for i, j in enumerate(data)
                           for m, v in j.scores.items()])
        return round(a, 4), round(b, 4)

    intercept, slope = _line(logits, target, weights)
    a, b = calibrated([intercept + slope * x for x in logits])
    term = None
    if embed is not None:
        vectors = embed([j.prompt for j in data])
        core = [intercept + slope * x for x in logits]
        term = _fit_embedding(vectors, [t - c for t, c in zip(target, core, strict=True)], weights)
        ta, tb = calibrated([c + term.correction(v) for c, v in zip(core, vectors, strict=True)])
        term = replace(term, a=ta, b=tb)
    scorer = FittedScorer(round(intercept, 6), round(slope, 6),
                          {m: round(s, 4) for m, s in sorted(strength.items())}, a, b, term)
    described = [{"source": str(n), "prompts": len(s)} for n, s in zip(names, kept, strict=False)]
    return Fit(scorer, len(data), described)


def cross_validated(examples: Sequence[Judged], prompts: Sequence[str], folds: int = 5,
                    extra: Sequence[Sequence[Judged]] = (), embed: Embed | None = None) -> list[float]:
    """Difficulty of each of ``prompts`` from a fit that never saw it: ``folds`` folds by position
    (prompt i is in fold i % folds), each fitted on the other folds of ``examples`` plus ``extra``;
    with ``embed``, by the embedding path."""
    by_prompt = {j.prompt: k for k, j in enumerate(examples)}
    out = [math.nan] * len(prompts)
    for fold in range(folds):
        train = [j for k, j in enumerate(examples) if k % folds != fold]
        scorer = fit_router([train, *extra], embed=embed).scorer
        for i, p in enumerate(prompts):
            if by_prompt.get(p, -1) % folds == fold:
                out[i] = scorer.difficulty(p, embed([p])[0] if embed is not None else None)
    return out
