"""Hashed text features for the fitted difficulty scorer, in pure Python (no numpy, no torch).

A prompt becomes a sparse vector: lower-cased word unigrams and bigrams hashed (CRC-32) into
``HASH_DIM`` buckets with log-scaled counts, L2-normalized, plus a few dense signals in the last
slots (the hand-set heuristic's score and its length, code, trace, number, mathematics, reasoning and
multiple-choice counts). Only the first ``MAX_CHARS`` characters are read, so a long prompt costs
the same as a medium one.
"""

from __future__ import annotations

import math
import re
import zlib

from . import difficulty as heuristic

HASH_DIM = 1 << 13
MAX_CHARS = 4000
_TOKEN = re.compile(r"[a-z]+|\d+|[^\sa-z\d]")
DENSE = ("heuristic", "log_words", "code", "trace", "numbers", "math", "reasoning", "choices")
DIM = HASH_DIM + len(DENSE)
Features = dict[int, float]


def _bucket(gram: str) -> int:
    return zlib.crc32(gram.encode("utf-8")) % HASH_DIM


def text_features(text: str) -> Features:
    """The sparse feature vector of ``text``: bucket index -> value."""
    text = text[:MAX_CHARS]
    words = _TOKEN.findall(text.lower())
    counts: dict[int, int] = {}
    for gram in (*words, *(f"{a} {b}" for a, b in zip(words, words[1:], strict=False))):
        bucket = _bucket(gram)
        counts[bucket] = counts.get(bucket, 0) + 1
    out: Features = {b: 1.0 + math.log(c) for b, c in counts.items()}
    norm = math.sqrt(sum(v * v for v in out.values())) or 1.0
    out = {b: v / norm for b, v in out.items()}
    dense = (
        heuristic.score_text(text),
        math.log10(max(1, len(text.split()))) / 3,
        min(3, len(heuristic._CODE.findall(text))) / 3,
        1.0 if heuristic._TRACE.search(text) else 0.0,
        min(8, len(heuristic._NUMBER.findall(text))) / 8,
        min(10, len(heuristic._MATH.findall(text))) / 10,
        min(3, len(heuristic._REASON.findall(text))) / 3,
        1.0 if heuristic._CHOICES.search(text) else 0.0,
    )
    for offset, value in enumerate(dense):
        if value:
            out[HASH_DIM + offset] = value
    return out
