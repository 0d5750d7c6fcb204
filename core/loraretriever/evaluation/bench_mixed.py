"""The ``mixed`` workload of ``bench serve``: real prompt lengths, answers of mixed length.

Prompts are drawn from the paper's ``test_dev.json`` (tens to thousands of characters, in the
chat template), routed by a real MiniLM router over a pool of random LoRAs, and answered greedily
until EOS or ``max_new_tokens``, so answers have their natural, mixed lengths. Two measurements:

* ``batch_vs_loop``: one LangChain ``.batch()`` of all prompts against a loop of ``invoke``;
* ``continuous`` / ``static``: Poisson arrivals at three rates (fractions of the capacity measured
  by the ``.batch()``), each request streamed; throughput, time to first token and inter-token
  latency (the gaps between a request's streamed deltas; p50, p99) for the continuous engine and
  for whole static batches.
"""

from __future__ import annotations

import random
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from loraretriever.engine.requests import GenerationConfig
from loraretriever.retrieval.queries import load_queries
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["run_mixed_benchmark"]


def run_mixed_benchmark(
    make_lm: Callable[..., RoutedLM],
    queries: str | Path,
    *,
    prompts: int = 32,
    max_new_tokens: int = 64,
    rate_fractions: Sequence[float] = (0.3, 0.6, 0.9),
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs both measurements; ``make_lm(policy=...)`` builds a RoutedLM over the same model and pool."""
    from langchain_loraretriever import LoraRetrieverLLM

    rng = random.Random(seed)
    pool_of_prompts = [q["inputs"] for q in load_queries(queries)]
    chosen = rng.sample(pool_of_prompts, prompts)
    settings = {"max_new_tokens": max_new_tokens, "chat_template": True}

    lm = make_lm(policy="continuous")
    llm = LoraRetrieverLLM(lm=lm, **settings)
    llm.batch(chosen[:2])  # warm-up
    start = time.perf_counter()
    batched = llm.batch(chosen, config={"max_concurrency": prompts})
    batch_s = time.perf_counter() - start
    log(f"mixed: .batch({prompts}) {batch_s:.2f} s")
    start = time.perf_counter()
    looped = [llm.invoke(p) for p in chosen]
    loop_s = time.perf_counter() - start
    log(f"mixed: invoke loop {loop_s:.2f} s ({loop_s / batch_s:.2f}x)")
    templated = GenerationConfig(chat_template=True)
    lengths = [len(lm.engine.encode(p, templated)) for p in chosen]
    answers = [len(lm.tokenizer(text, add_special_tokens=False)["input_ids"]) for text in batched]
    lm.close()

    capacity = prompts / batch_s  # requests per second the engine served in the .batch()
    out: dict[str, Any] = {
        "prompts": prompts,
        "prompt_chars": _summary([len(p) for p in chosen]),
        "prompt_tokens": {**_summary(lengths), "total": sum(lengths)},
        "answer_tokens": {**_summary(answers), "total": sum(answers)},  # the answers re-tokenized
        "max_new_tokens": max_new_tokens,
        "batch_s": round(batch_s, 3),
        "invoke_loop_s": round(loop_s, 3),
        "batch_vs_loop": round(loop_s / batch_s, 2),
        "same_outputs": batched == looped,
        "capacity_requests_per_s": round(capacity, 3),
        "continuous": {},
        "static": {},
    }
    for fraction in rate_fractions:
        rate = fraction * capacity
        gaps = [random.Random(seed + 1 + i).expovariate(rate) for i in range(prompts)]
        for policy in ("continuous", "static"):
            lm = make_lm(policy=policy)
            lm.complete(chosen[0], max_new_tokens=2)  # warm-up
            stats = _poisson_run(lm, chosen, gaps, settings)
            lm.close()
            stats["rate_requests_per_s"] = round(rate, 3)
            out[policy][f"rate_{fraction:g}"] = stats
            log(
                f"mixed {policy} at {rate:.2f} req/s: {stats['throughput_tokens_per_s']:.1f} tokens/s, "
                f"TTFT p50 {stats['ttft_s']['p50']:.2f} s p99 {stats['ttft_s']['p99']:.2f} s, "
                f"ITL p99 {stats['itl_s']['p99']:.3f} s"
            )
    top = f"rate_{max(rate_fractions):g}"
    cont, stat = out["continuous"][top], out["static"][top]
    out["targets_met"] = {
        "batch_vs_loop>=3": out["batch_vs_loop"] >= 3,
        "continuous_ttft_p99<=static/3": cont["ttft_s"]["p99"] <= stat["ttft_s"]["p99"] / 3,
        "continuous_throughput>=static": cont["throughput_tokens_per_s"] >= stat["throughput_tokens_per_s"],
    }
    return out


def _poisson_run(lm: RoutedLM, prompts: Sequence[str], gaps: Sequence[float], settings: dict) -> dict[str, Any]:
    """Submits ``prompts`` at the given inter-arrival gaps, streams each, and times its tokens."""
    records: list[dict[str, Any]] = []
    threads = []

    def consume(deltas, queued, submitted: float) -> None:
        times = []
        for _ in deltas:
            times.append(time.perf_counter())
        result = queued.future.result()
        records.append({"submitted": submitted, "times": times, "tokens": result.completion_tokens})

    start = time.perf_counter()
    due = start
    for prompt, gap in zip(prompts, gaps, strict=True):
        due += gap
        time.sleep(max(0.0, due - time.perf_counter()))
        submitted = time.perf_counter()
        deltas, queued = lm.stream_with_result(prompt, **settings)
        thread = threading.Thread(target=consume, args=(deltas, queued, submitted), daemon=True)
        thread.start()
        threads.append(thread)
    for thread in threads:
        thread.join()
    end = max(r["times"][-1] if r["times"] else r["submitted"] for r in records)
    ttft = [r["times"][0] - r["submitted"] for r in records if r["times"]]
    itl = [b - a for r in records for a, b in zip(r["times"], r["times"][1:], strict=False)]
    return {
        "requests": len(records),
        "completion_tokens": sum(r["tokens"] for r in records),
        "throughput_tokens_per_s": round(sum(r["tokens"] for r in records) / (end - start), 2),
        "ttft_s": _percentiles(ttft),
        "itl_s": _percentiles(itl),
    }


def _percentiles(values: Sequence[float]) -> dict[str, float]:
    if not values:
        return {"p50": 0.0, "p99": 0.0}
    ordered = sorted(values)
    pick = lambda q: ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]  # noqa: E731
    return {"p50": round(pick(0.5), 4), "p99": round(pick(0.99), 4)}


def _summary(values: Sequence[int]) -> dict[str, float]:
    return {"min": min(values), "median": statistics.median(values), "max": max(values)}
