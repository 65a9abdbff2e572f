"""Difficulty routing quality on RouteLLM's data: our scorer, a random router, litellm's complexity router.

    .venv/bin/python benchmarks/routing.py

Each router gives every prompt a score; RouteLLM's metrics (APGR, CPT(50%), CPT(80%)) are computed
with the same code as `router-middleware route-eval` on GSM8K and on all of MMLU, where the weak
model is Mixtral-8x7B and the strong one GPT-4 (per-prompt correctness from RouteLLM's evaluation).
litellm's ComplexityRouter is used through its rule-based classifier (its continuous score).
"""

from __future__ import annotations

import os
import random
import sys
import time
import warnings
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from router_middleware.routing import load_examples, metrics, score_text  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"


def litellm_scorer():  # type: ignore[no-untyped-def]
    from litellm.router_strategy.complexity_router.complexity_router import ComplexityRouter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = ComplexityRouter(model_name="bench", litellm_router_instance=None,  # type: ignore[call-arg]
                                  complexity_router_config={"tiers": {"SIMPLE": "w", "MEDIUM": "w",
                                                                      "COMPLEX": "s", "REASONING": "s"}})
    return lambda prompt: float(router.classify(prompt)[1])


def main() -> int:
    sets = {"GSM8K": [DATA / "gsm8k_responses.csv"], "MMLU": sorted((DATA / "mmlu").glob("*.csv"))}
    ours_vs = []
    print(f"routing benchmark, {time.strftime('%Y-%m-%d')}: weak {WEAK}, strong {STRONG}\n")
    print("| data | router | APGR | CPT(50%) | CPT(80%) | scoring time per prompt |")
    print("|---|---|---|---|---|---|")
    theirs = litellm_scorer()
    for name, paths in sets.items():
        examples = load_examples(paths, WEAK, STRONG)
        rows = {}
        for router, scorer in (("router-middleware", score_text), ("litellm complexity_router", theirs)):
            started = time.perf_counter()
            scores = [scorer(e.prompt) for e in examples]
            per = (time.perf_counter() - started) / len(examples)
            rows[router] = metrics(scores, examples)
            m = rows[router]
            print(f"| {name} (n={len(examples):,}) | {router} | {m['apgr']:.3f} | {m['cpt50']:.1%} | "
                  f"{m['cpt80']:.1%} | {per * 1e6:.0f} us |")
        randoms = [metrics([random.Random(s).random() for _ in examples], examples) for s in range(20)]
        mean = {k: sum(r[k] for r in randoms) / len(randoms) for k in ("apgr", "cpt50", "cpt80")}
        print(f"| {name} (n={len(examples):,}) | random (mean of 20) | {mean['apgr']:.3f} | {mean['cpt50']:.1%} | "
              f"{mean['cpt80']:.1%} | - |")
        ours_vs.append(f"{name} APGR ours/litellm/random {rows['router-middleware']['apgr']:.3f}/"
                       f"{rows['litellm complexity_router']['apgr']:.3f}/{mean['apgr']:.3f}")
    print("\nsummary: " + "; ".join(ours_vs))
    return 0


if __name__ == "__main__":
    sys.exit(main())
