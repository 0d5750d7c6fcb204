"""``loraretriever bench scale``: serving from pools of 100 to 10,000 stored LoRAs in bounded memory.

For each pool size N, the benchmark writes N real PEFT adapter directories (random non-zero
weights, ranks drawn from ``ranks``, q and v projections, float16 safetensors: what PEFT saves),
once, under ``root``. Then, in each of ``rounds`` rounds and in turns:

* ``resident``: the smallest pool with every adapter loaded before the clock starts and no cache
  budget, the reference;
* each N: the pool directory opened cold (:func:`~loraretriever.serving.adapters.open_pool_dir`
  registers the adapters from their headers; nothing is loaded) with a host cache of
  ``host_cache_gb``, then a ``cold`` workload (the caches empty) and a ``warm`` one (another draw of
  the same law) after the adapters of ``warmup_requests`` more requests of the same law went
  through the caches: the steady state of a server that has served that many.

The workload: ``requests`` prompts arriving at once, each routed to ``k`` distinct adapters drawn
by popularity following a Zipf law (exponent ``zipf_s``; popularity ranks shuffled over the
names), ``new_tokens`` tokens each, through the continuous-batching engine. Reported per N: open
seconds, process RSS after the run, host cache hit rate, loads from disk and their latency (a cold
miss), throughput, TTFT p50/p99; and the ratios the targets need. The base RSS is the process's
after the base model served the same workload with no adapters.
"""

from __future__ import annotations

import gc
import json
import os
import random
import statistics
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from loraretriever.engine.base_model import load_base_model
from loraretriever.engine.composer import Composer
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig
from loraretriever.engine.routing import Routing
from loraretriever.evaluation.workload import PROMPT_SUBJECTS, PROMPT_TEMPLATES
from loraretriever.pool.adapter import CONFIG_FILE, SAFETENSORS_FILE
from loraretriever.pool.home import loraretriever_home
from loraretriever.pool.layout import PoolLayout
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.serving.adapters import open_pool_dir

__all__ = ["rss_bytes", "run_scale_benchmark", "write_pool", "zipf_routings"]

TARGET_MODULES = ("q_proj", "v_proj")
_DONE = ".written"


def write_pool(model: nn.Module, pool_dir: Path, n: int, ranks: Sequence[int], seed: int) -> Path:
    """Writes ``n`` PEFT LoRA adapters of ``model`` under ``pool_dir/adapters/`` (float16
    safetensors and ``adapter_config.json``), unless a finished write of the same spec is there."""
    spec = {"n": n, "ranks": list(ranks), "seed": seed, "targets": list(TARGET_MODULES)}
    marker = pool_dir / _DONE
    if marker.is_file() and json.loads(marker.read_text()) == spec:
        return pool_dir
    generator = torch.Generator().manual_seed(seed)
    rng = random.Random(seed)
    layers = [(name, m) for name, m in model.named_modules() if name.rsplit(".", 1)[-1] in TARGET_MODULES]
    for i in range(n):
        directory = PoolLayout(pool_dir).adapter(f"lora{i:05d}")
        if (directory / SAFETENSORS_FILE).is_file():
            continue
        directory.mkdir(parents=True, exist_ok=True)
        rank = rng.choice(list(ranks))
        state = {}
        for name, module in layers:
            state[f"base_model.model.{name}.lora_A.weight"] = (
                torch.randn(rank, module.in_features, generator=generator) / module.in_features**0.5
            ).half()
            state[f"base_model.model.{name}.lora_B.weight"] = (
                torch.randn(module.out_features, rank, generator=generator) * 0.02
            ).half()
        config = {"peft_type": "LORA", "r": rank, "lora_alpha": 2 * rank, "target_modules": list(TARGET_MODULES)}
        (directory / CONFIG_FILE).write_text(json.dumps(config))
        save_file(state, str(directory / SAFETENSORS_FILE))
    marker.write_text(json.dumps(spec))
    return pool_dir


def zipf_routings(
    names: Sequence[str], count: int, k: int, s: float, seed: int, popularity_seed: int = 0
) -> list[Routing]:
    """``count`` mixtures of ``k`` distinct adapters, each drawn with probability proportional to
    ``1 / rank**s`` of its popularity rank. The ranks are a shuffle of ``names`` seeded by
    ``popularity_seed`` (one law per pool), the draws are seeded by ``seed``."""
    order = list(names)
    random.Random(popularity_seed).shuffle(order)
    weights = torch.tensor([1.0 / (i + 1) ** s for i in range(len(order))], dtype=torch.float64)
    generator = torch.Generator().manual_seed(seed)
    picks = [torch.multinomial(weights, k, replacement=False, generator=generator).tolist() for _ in range(count)]
    return [Routing.pinned([order[i] for i in row]) for row in picks]


def rss_bytes() -> int:
    """The process's resident set size (after handing freed heap back to the OS)."""
    gc.collect()
    from loraretriever.serving.memory import return_freed_memory

    return_freed_memory()
    with open("/proc/self/statm") as statm:
        return int(statm.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _serve(model, tokenizer, pool: LoraPool, routings: list[Routing], prompts: list[str], new_tokens: int) -> dict:
    composer = Composer(model, pool)
    try:
        engine = Engine(model, tokenizer, composer, EngineConfig(max_batch_size=32))
        config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
        start = time.perf_counter()
        requests = [
            engine.new_request(p, config, r, index=i) for i, (p, r) in enumerate(zip(prompts, routings, strict=True))
        ]
        engine.run(requests)
        elapsed = time.perf_counter() - start
    finally:
        composer.remove_hooks()
    failed = [r for r in requests if r.error is not None]
    if failed:
        raise RuntimeError(f"{len(failed)} requests failed, the first: {failed[0].error!r}")
    ttft = [r.first_token_at - start for r in requests]
    tokens = sum(r.done.completion_tokens for r in requests)
    return {"tokens_per_s": round(tokens / elapsed, 2), **_p50_p99(ttft, "ttft", 3)}


def _p50_p99(values: Sequence[float], label: str, digits: int) -> dict[str, float | None]:
    """``{label}_p50_s`` and ``{label}_p99_s`` of ``values`` (None for none)."""
    ordered = sorted(values)
    pick = lambda q: round(ordered[min(len(ordered) - 1, int(len(ordered) * q))], digits) if ordered else None  # noqa: E731
    return {f"{label}_p50_s": pick(0.5), f"{label}_p99_s": pick(0.99)}


def _prefixed(values: dict, prefix: str) -> dict:
    return {f"{prefix}{key}": value for key, value in values.items()}


def run_scale_benchmark(
    sizes: Sequence[int] = (100, 1000, 10_000),
    ranks: Sequence[int] = (4, 5, 6, 7, 8),
    requests: int = 64,
    new_tokens: int = 16,
    k: int = 3,
    zipf_s: float = 1.1,
    host_cache_gb: float = 0.5,
    rounds: int = 2,
    warmup_requests: int = 2000,
    root: str | Path | None = None,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    """Runs the benchmark (see the module docstring) and returns its JSON-ready result."""
    torch.manual_seed(seed)
    model, tokenizer = load_base_model()
    root = Path(root) if root is not None else loraretriever_home() / "bench-scale"
    budget = int(host_cache_gb * 2**30)
    rng = random.Random(seed)
    prompts = [rng.choice(PROMPT_TEMPLATES).format(rng.choice(PROMPT_SUBJECTS)) for _ in range(requests)]
    pools = {}
    for n in sorted(set(sizes)):
        started = time.perf_counter()
        pools[n] = write_pool(model, root / f"pool_{n}", n, ranks, seed)
        log(f"pool of {n}: ready in {time.perf_counter() - started:.1f} s ({pools[n]})")
    disk = {
        n: sum(f.stat().st_size for f in PoolLayout(p).adapters.glob(f"*/{SAFETENSORS_FILE}")) for n, p in pools.items()
    }

    # the base model serving the same workload, no adapters: warms kernels and the allocator, and
    # its RSS is the base the adapters' memory is measured against
    empty = LoraPool(model)
    base_served = _serve(model, tokenizer, empty, [Routing.base()] * requests, prompts, new_tokens)
    del empty
    base_rss = rss_bytes()
    log(f"base model, no adapters: {base_served}, RSS {base_rss / 2**30:.2f} GiB")
    smallest = min(sizes)
    runs: dict[str, list[dict]] = {}

    def phase(pool: LoraPool, names: list[str], workload_seed: int) -> dict:
        """One workload on ``pool``, with the cache's hits and loads during it."""
        cache, loads_before = pool.host_cache, pool.loads
        hits, misses = cache.hits, cache.misses
        routings = zipf_routings(names, requests, k, zipf_s, workload_seed, popularity_seed=seed)
        served = _serve(model, tokenizer, pool, routings, prompts, new_tokens)
        lookups = cache.hits - hits + cache.misses - misses
        loads = pool.loads - loads_before
        latest = list(pool.recent_load_seconds)[-loads:] if loads else []
        served.update(host_hit_rate=round((cache.hits - hits) / lookups, 4) if lookups else None, loads=loads)
        served.update(_p50_p99(latest, "load", 5))
        return served

    for round_index in range(rounds):
        # each round: a first workload right after the pool opens (cold caches), then a second,
        # another draw of the same law (the steady state a running server sees)
        cold_seed, warm_seed = seed + 2 * round_index, seed + 2 * round_index + 1
        resident = LoraPool(model)
        open_pool_dir(resident, pools[smallest])
        for name in resident.names:
            resident.get(name)
        served = phase(resident, resident.names, warm_seed)
        runs.setdefault("resident", []).append(served)
        log(f"round {round_index + 1}: resident {smallest}: {served}")
        del resident
        for n in sizes:
            gc.collect()
            started = time.perf_counter()
            pool = LoraPool(model, host_cache_bytes=budget)
            opened = open_pool_dir(pool, pools[n])
            open_seconds = time.perf_counter() - started
            names = pool.names
            run = {"open_seconds": round(open_seconds, 3), "registered": len(opened["loaded"])}
            run.update(_prefixed(phase(pool, names, cold_seed), "cold_"))
            started = time.perf_counter()
            stream = zipf_routings(names, warmup_requests, k, zipf_s, seed + 1000 + round_index, popularity_seed=seed)
            for routing in stream:
                for name in routing.adapters:  # the caches as a server leaves them after these requests
                    pool.get(name)
            run["warmup_seconds"] = round(time.perf_counter() - started, 2)
            run.update(_prefixed(phase(pool, names, warm_seed), "warm_"))
            run.update(rss_bytes=rss_bytes(), host_cache_bytes=pool.host_cache.nbytes)
            pool.close()
            del pool
            runs.setdefault(str(n), []).append(run)
            log(f"round {round_index + 1}: pool of {n}: {run}")

    def median(label: str, key: str) -> float | None:
        values = [run[key] for run in runs[label] if run.get(key) is not None]
        return round(statistics.median(values), 4) if values else None

    per_size = {}
    for n in sizes:
        label = str(n)
        per_size[label] = {key: median(label, key) for key in runs[label][0]}
        per_size[label]["disk_bytes"] = disk[n]
        for state in ("cold", "warm"):  # the median of per-round ratios: each compares runs made in turns
            ratios = [
                r[f"{state}_tokens_per_s"] / ref["tokens_per_s"]
                for r, ref in zip(runs[label], runs["resident"], strict=True)
            ]
            per_size[label][f"{state}_throughput_vs_resident"] = round(statistics.median(ratios), 3)
    largest = str(max(sizes))
    rss_limit = base_rss + budget + 2**30
    result = {
        "benchmark": "scale",
        "model": type(model).__name__,
        "sizes": list(sizes),
        "ranks": list(ranks),
        "targets": list(TARGET_MODULES),
        "stored_dtype": "float16",
        "requests": requests,
        "new_tokens": new_tokens,
        "k": k,
        "zipf_s": zipf_s,
        "host_cache_bytes": budget,
        "rounds": rounds,
        "warmup_requests": warmup_requests,
        "threads": torch.get_num_threads(),
        "base_rss_bytes": base_rss,
        "base_model_no_adapters": base_served,
        "resident": {key: median("resident", key) for key in runs["resident"][0]},
        "by_size": per_size,
        "runs": runs,
        "targets_met": {
            "open_seconds_at_largest<10": per_size[largest]["open_seconds"] < 10,
            "rss_at_largest<=base+cache+1GiB": per_size[largest]["rss_bytes"] <= rss_limit,
            "warm_throughput_at_largest>=0.9x_resident": per_size[largest]["warm_throughput_vs_resident"] >= 0.9,
        },
        "notes": (
            "Cards are not written: routing is the Zipf draw, so this measures the pool's memory tiers; the "
            "router's cost at 10,000 LoRAs is bench retrieval's. Adapter files were just written, so a cold "
            "miss reads the OS page cache, not the disk."
        ),
    }
    return result
