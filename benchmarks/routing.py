"""Difficulty routing quality on RouteLLM's data: our heuristic and fitted scorers, a random router,
litellm's complexity router.

    .venv/bin/python benchmarks/routing.py [--embeddings] [--sample N]

Each router gives every prompt a score; RouteLLM's metrics (APGR, CPT(50%), CPT(80%)) are computed
with the same code as `router-middleware route-eval`. GSM8K and all of MMLU: the weak model is
Mixtral-8x7B, the strong one GPT-4 (per-prompt correctness from RouteLLM's evaluation), and the
fitted scorer is fitted on arena-bench alone. arena-bench (300 prompts, GPT-4-judged 1-10 scores of
14 models): two pairs, the fitted scorer by 5-fold cross-validation by prompt (each prompt scored by
a fit that never saw it; fitted on the other folds' judgments of all 14 models). "fitted" is the
core path (no extra); with --embeddings (needs the semantic extra), "fitted + embeddings" rows add
the embedding path (MiniLM embeddings of the 15,600 prompts take half an hour on two cores the first
time; they are cached in EMBEDDING_CACHE, default /tmp/router-middleware-routing-embeddings.npz).
Last rows: the bundled file (fitted on arena-bench, GSM8K and MMLU minus the prompts with
crc32 % 10 == 0) on those held-out tenths. litellm's ComplexityRouter is used through its
rule-based classifier (its continuous score). Last: the p50 time to score one request. `--sample N`
(a smoke run) keeps the first N prompts of GSM8K and MMLU (all of arena-bench).
"""

from __future__ import annotations

import argparse
import hashlib
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
from router_middleware.routing.fitted import embeddings_installed, load_fitted, local_embed  # noqa: E402
from router_middleware.routing.fitting import cross_validated, fit_router, held_out, load_judgments  # noqa: E402

DATA = Path(os.environ.get("ROUTER_MIDDLEWARE_SHARED", Path(__file__).resolve().parents[2] / "shared")) / "data"
DATA = DATA / "routing"
ARENA = DATA / "arena-bench" / "arena_bench_v1.csv"
WEAK, STRONG = "mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"
ARENA_PAIRS = (("Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"), ("gpt-3.5-turbo", "gpt-4-0314"))
CACHE = Path(os.environ.get("EMBEDDING_CACHE", "/tmp/router-middleware-routing-embeddings.npz"))


class CachedEmbed:
    """local_embed with a file cache by SHA-1 of the text (embedding 15,000 prompts takes minutes)."""

    def __init__(self) -> None:
        import numpy as np

        self.np = np
        self.known: dict[str, list[float]] = {}
        if CACHE.exists():
            with np.load(CACHE) as data:
                self.known = {k: [float(x) for x in data[k]] for k in data.files}
        self.added = False

    def __call__(self, texts: Sequence[str]) -> list[list[float]]:
        keys = [hashlib.sha1(t.encode()).hexdigest() for t in texts]
        missing = list(dict.fromkeys(t for t, k in zip(texts, keys, strict=True) if k not in self.known))
        if missing:
            for text, vector in zip(missing, local_embed(missing), strict=True):
                self.known[hashlib.sha1(text.encode()).hexdigest()] = vector
            self.added = True
        return [self.known[k] for k in keys]

    def save(self) -> None:
        if self.added:
            self.np.savez(CACHE, **{k: self.np.asarray(v, dtype=self.np.float32) for k, v in self.known.items()})


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
        timing = "-" if "cross-validated" in router or "embeddings" in router else f"{per * 1e6:.0f} us"
        print(f"| {name} | {router} | {m['apgr']:.3f} | {m['cpt50']:.1%} | {m['cpt80']:.1%} | {timing} |")
    randoms = [metrics([random.Random(s).random() for _ in examples], examples) for s in range(20)]
    mean = {k: sum(r[k] for r in randoms) / len(randoms) for k in ("apgr", "cpt50", "cpt80")}
    print(f"| {name} | random (mean of 20) | {mean['apgr']:.3f} | {mean['cpt50']:.1%} | {mean['cpt80']:.1%} | - |")
    apgr["random"] = mean["apgr"]
    return apgr


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--embeddings", action="store_true", help="add the embedding path (semantic extra)")
    parser.add_argument("--sample", type=int, default=0, help="only the first N prompts of GSM8K and MMLU")
    args = parser.parse_args(argv)
    sample = slice(args.sample or None)
    print(f"routing benchmark, {time.strftime('%Y-%m-%d')}\n")
    print("| data (weak vs strong) | router | APGR | CPT(50%) | CPT(80%) | scoring time per prompt |")
    print("|---|---|---|---|---|---|")
    theirs = litellm_scorer()
    if args.embeddings and not embeddings_installed():
        print("--embeddings needs the semantic extra: pip install 'router-middleware[semantic]'", file=sys.stderr)
        return 2
    embed = CachedEmbed() if args.embeddings else None
    summary = []
    arena = load_judgments(ARENA)
    prompts = [j.prompt for j in arena]
    cv = {"fitted (5-fold cross-validated)": cross_validated(arena, prompts)}
    if embed is not None:
        cv["fitted + embeddings (5-fold cross-validated)"] = cross_validated(arena, prompts, embed=embed)
    for weak, strong in ARENA_PAIRS:
        examples = load_examples([ARENA], weak, strong)
        assert [e.prompt for e in examples] == prompts
        got = rows(f"arena-bench (n={len(examples)}) {weak} vs {strong}", examples, {
            **{name: (lambda scores=scores: scores) for name, scores in cv.items()},
            "heuristic (score_text)": lambda ex=examples: [score_text(e.prompt) for e in ex],
            "litellm complexity_router": lambda ex=examples: [theirs(e.prompt) for e in ex]})
        summary.append(f"arena {weak}: " + "/".join(f"{v:.3f}" for v in got.values()))
    fit = fit_router([arena], embed=embed).scorer
    core = fit.with_embeddings(False)
    data = {"GSM8K": [DATA / "gsm8k_responses.csv"], "MMLU": sorted((DATA / "mmlu").glob("*.csv"))}
    for name, paths in data.items():
        examples = load_examples(paths, WEAK, STRONG)[sample]
        routers = {"fitted (on arena-bench)": lambda ex=examples: [core.difficulty(e.prompt) for e in ex]}
        if embed is not None:
            routers["fitted + embeddings (on arena-bench)"] = lambda ex=examples: [
                fit.difficulty(e.prompt, v) for e, v in zip(ex, embed([e.prompt for e in ex]), strict=True)]
        got = rows(f"{name} (n={len(examples):,}) Mixtral-8x7B vs gpt-4-1106-preview", examples, {
            **routers,
            "heuristic (score_text)": lambda ex=examples: [score_text(e.prompt) for e in ex],
            "litellm complexity_router": lambda ex=examples: [theirs(e.prompt) for e in ex]})
        summary.append(f"{name}: " + "/".join(f"{v:.3f}" for v in got.values()))
    bundled = load_fitted()
    for name, paths in data.items():
        examples = [e for e in load_examples(paths, WEAK, STRONG)[sample] if held_out(e.prompt, 10)]
        routers = {"bundled file, core": lambda ex=examples: [bundled.difficulty(e.prompt) for e in ex]}
        if embed is not None and bundled.embedding is not None:
            routers["bundled file + embeddings"] = lambda ex=examples: [
                bundled.difficulty(e.prompt, v) for e, v in zip(ex, embed([e.prompt for e in ex]), strict=True)]
        rows(f"{name} held-out tenth (n={len(examples):,}), fit saw the other nine tenths", examples, {
            **routers, "heuristic (score_text)": lambda ex=examples: [score_text(e.prompt) for e in ex]})
    if embed is not None:
        embed.save()
    timings: dict[str, list[float]] = {"fitted (core)": [], "heuristic": []}
    topical = fit.with_embeddings(True) if embed is not None else None
    if topical is not None:
        topical.difficulty("warm up the embedder")
        timings["fitted + embeddings (embedding each request)"] = []
    for prompt in prompts:
        for label, call in (("fitted (core)", lambda p=prompt: core.difficulty(p)),
                            ("heuristic", lambda p=prompt: score_request([{"role": "user", "content": p}])),
                            ("fitted + embeddings (embedding each request)",
                             lambda p=prompt: topical.difficulty(p) if topical else None)):
            if label in timings:
                started = time.perf_counter()
                call()
                timings[label].append(time.perf_counter() - started)
    print("\nscoring one arena-bench prompt, p50 (p90): " + "; ".join(
        f"{label} {statistics.median(t) * 1e3:.3f} ms ({statistics.quantiles(t, n=10)[-1] * 1e3:.3f} ms)"
        for label, t in timings.items()))
    print("summary: APGR " + "/".join(k.split(" (")[0] for k in ("fitted", *(["fitted + embeddings"] if embed else []),
                                                                  "heuristic", "litellm", "random"))
          + ": " + "; ".join(summary))
    return 0


if __name__ == "__main__":
    sys.exit(main())
