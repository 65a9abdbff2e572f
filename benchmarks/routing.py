"""Difficulty routing quality on RouteLLM's data: our heuristic and fitted scorers, a random router,
litellm's complexity router.

    .venv/bin/python benchmarks/routing.py

Each router gives every prompt a score; RouteLLM's metrics (APGR, CPT(50%), CPT(80%)) are computed
with the same code as `router-middleware route-eval`. GSM8K and all of MMLU: the weak model is
Mixtral-8x7B, the strong one GPT-4 (per-prompt correctness from RouteLLM's evaluation), and the
fitted scorer is fitted on arena-bench alone. arena-bench (300 prompts, GPT-4-judged 1-10 scores of
14 models): two pairs, the fitted scorer by 5-fold cross-validation by prompt (each prompt scored by
a fit that never saw it; fitted on the other folds' judgments of all 14 models). litellm's
ComplexityRouter is used through its rule-based classifier (its continuous score). Last: the p50
time to score one request with the fitted scorer.
"""

from __future__ import annotations

import os
import random
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path

os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")

from router_middleware.routing import load_examples, metrics, score_request, score_text  # noqa: E402
from router_middleware.routing.evaluation import Example  # noqa: E402
from router_middleware.routing.fitting import cross_validated, fit_router, load_judgments  # noqa: E402

DATA = Path(__file__).resolve().parents[2] / "shared" / "data" / "routing"
ARENA = DATA / "arena-bench" / "arena_bench_v1.csv"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
ARENA_PAIRS = (("Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"), ("gpt-3.5-turbo", "gpt-4-0314"))


def litellm_scorer():  # type: ignore[no-untyped-def]
    from litellm.router_strategy.complexity_router.complexity_router import ComplexityRouter

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        router = ComplexityRouter(model_name="bench", litellm_router_instance=None,  # type: ignore[call-arg]
                                  complexity_router_config={"tiers": {"SIMPLE": "w", "MEDIUM": "w",
                                                                      "COMPLEX": "s", "REASONING": "s"}})
    return lambda prompt: float(router.classify(prompt)[1])


def rows(name: str, examples: Sequence[Example], routers: dict[str, Callable[[], list[float]]]) -> dict[str, float]:
    apgr = {}
    for router, scores_of in routers.items():
        started = time.perf_counter()
        scores = scores_of()
        per = (time.perf_counter() - started) / len(examples)
        m = metrics(scores, examples)
        apgr[router] = m["apgr"]
        timing = f"{per * 1e6:.0f} us" if "cross-validated" not in router else "-"
        print(f"| {name} | {router} | {m['apgr']:.3f} | {m['cpt50']:.1%} | {m['cpt80']:.1%} | {timing} |")
    randoms = [metrics([random.Random(s).random() for _ in examples], examples) for s in range(20)]
    mean = {k: sum(r[k] for r in randoms) / len(randoms) for k in ("apgr", "cpt50", "cpt80")}
    print(f"| {name} | random (mean of 20) | {mean['apgr']:.3f} | {mean['cpt50']:.1%} | {mean['cpt80']:.1%} | - |")
    apgr["random"] = mean["apgr"]
    return apgr


def main() -> int:
    print(f"routing benchmark, {time.strftime('%Y-%m-%d')}\n")
    print("| data (weak vs strong) | router | APGR | CPT(50%) | CPT(80%) | scoring time per prompt |")
    print("|---|---|---|---|---|---|")
    theirs = litellm_scorer()
    summary = []
    arena = load_judgments(ARENA)
    prompts = [j.prompt for j in arena]
    folds = cross_validated(arena, prompts)
    for weak, strong in ARENA_PAIRS:
        examples = load_examples([ARENA], weak, strong)
        assert [e.prompt for e in examples] == prompts
        got = rows(f"arena-bench (n={len(examples)}) {weak} vs {strong}", examples, {
            "fitted (5-fold cross-validated)": lambda: folds,
            "heuristic (score_text)": lambda ex=examples: [score_text(e.prompt) for e in ex],
            "litellm complexity_router": lambda ex=examples: [theirs(e.prompt) for e in ex]})
        summary.append(f"arena {weak}: " + "/".join(f"{v:.3f}" for v in got.values()))
    scorer = fit_router([arena]).scorer
    for name, paths in {"GSM8K": [DATA / "gsm8k_responses.csv"], "MMLU": sorted((DATA / "mmlu").glob("*.csv"))}.items():
        examples = load_examples(paths, WEAK, STRONG)
        got = rows(f"{name} (n={len(examples):,}) Mixtral-8x7B vs gpt-4-1106-preview", examples, {
            "fitted (on arena-bench)": lambda ex=examples: [scorer.difficulty(e.prompt) for e in ex],
            "heuristic (score_text)": lambda ex=examples: [score_text(e.prompt) for e in ex],
            "litellm complexity_router": lambda ex=examples: [theirs(e.prompt) for e in ex]})
        summary.append(f"{name}: " + "/".join(f"{v:.3f}" for v in got.values()))
    times = []
    for prompt in prompts:
        messages = [{"role": "user", "content": prompt}]
        started = time.perf_counter()
        scorer.difficulty(prompt)
        times.append(time.perf_counter() - started)
        score_request(messages)  # the heuristic, for comparison below
    heuristic = []
    for prompt in prompts:
        started = time.perf_counter()
        score_text(prompt)
        heuristic.append(time.perf_counter() - started)
    print(f"\nscoring one arena-bench prompt: fitted p50 {statistics.median(times) * 1e3:.3f} ms "
          f"(p90 {statistics.quantiles(times, n=10)[-1] * 1e3:.3f} ms), heuristic p50 "
          f"{statistics.median(heuristic) * 1e3:.3f} ms")
    print("summary: APGR fitted/heuristic/litellm/random: " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
