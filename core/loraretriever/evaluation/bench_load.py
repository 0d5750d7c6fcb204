"""``bench load``: many concurrent streaming clients against a real ``loraretriever serve``.

Each client is an ``openai.AsyncOpenAI`` stream of ``/v1/chat/completions`` with ``model="auto"``;
prompts are the test inputs of the pool's BIG-bench tasks (``data/bigbench``), cycled. Every
response is checked: the stream ended with a finish reason, its text is what the usage counts,
and its routing is the library's routing of the same prompt (a :class:`Router` over the same
cards, in memory). Without ``url`` the benchmark starts its own server on 127.0.0.1 and stops it.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import random
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from loraretriever.engine.extras import import_optional
from loraretriever.pool.layout import PoolLayout
from loraretriever.retrieval.cards import CardStore
from loraretriever.retrieval.router import Router
from loraretriever.server.local import LocalServer

__all__ = ["run_load_benchmark"]


def run_load_benchmark(
    pool_dir: str | Path,
    *,
    url: str | None = None,
    api_key: str = "sk-bench",
    clients: int = 64,
    requests: int = 128,
    max_tokens: int = 32,
    splits: str | Path = "data/bigbench",
    seed: int = 0,
    timeout_s: float = 600.0,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Runs ``requests`` streamed chat completions, ``clients`` at a time; returns the figures."""
    pool_dir = Path(pool_dir).expanduser()
    cards = CardStore(PoolLayout(pool_dir).cards).all()
    tasks = {card.name for card in cards}
    prompts = []
    for path in sorted(Path(splits).glob("*.json")):
        split = json.loads(path.read_text())
        if split.get("task") in tasks:
            prompts += [example["inputs"] for example in split["test"][:8]]
    random.Random(seed).shuffle(prompts)
    prompts = [prompts[i % len(prompts)] for i in range(requests)]
    with Router.from_cards(cards) as router:
        expected = router.route(prompts)

    workdir = Path(tempfile.mkdtemp(prefix="loraretriever-load-"))
    server = None
    if url is None:  # its own server, over a copy (the pool's embedded index stays free)
        source, copy = PoolLayout(pool_dir), PoolLayout(workdir / "pool")
        shutil.copytree(source.adapters, copy.adapters)
        shutil.copytree(source.cards, copy.cards)
        if source.manifest.is_file():  # the server opens the copy with the pool's own model
            shutil.copy(source.manifest, copy.manifest)
        server = LocalServer(workdir / "pool", workdir, "--max-batch-size", str(clients), "--log-level", "warning",
                             api_key=api_key)  # fmt: skip
    try:
        target = url or server.url
        log(f"load: {requests} streamed requests, {clients} at a time, against {target}")
        started = time.perf_counter()
        outcomes = asyncio.run(_drive(target, api_key, prompts, clients, max_tokens, timeout_s))
        wall_s = time.perf_counter() - started
    finally:
        if server is not None:
            server.stop()
        shutil.rmtree(workdir, ignore_errors=True)

    failures = [o["error"] for o in outcomes if "error" in o]
    done = [o for o in outcomes if "error" not in o]
    complete = [o for o in done if o["finish_reason"] in ("stop", "length") and o["text_tokens_ok"]]
    routed = [o for o, want in zip(outcomes, expected, strict=True) if o.get("adapters") == list(want.adapters)]
    tokens = sum(o["completion_tokens"] for o in done)
    ttft = [o["ttft_s"] for o in done]
    itl = [gap for o in done for gap in o["gaps_s"]]
    return {
        "benchmark": "load",
        "clients": clients,
        "requests": requests,
        "max_tokens": max_tokens,
        "wall_s": round(wall_s, 2),
        "failed": len(failures),
        "errors": failures[:5],
        "complete": len(complete),
        "correctly_routed": len(routed),
        "completion_tokens": tokens,
        "tokens_per_s": round(tokens / wall_s, 2),
        "requests_per_s": round(len(done) / wall_s, 3),
        "ttft_s": _percentiles(ttft),
        "itl_s": _percentiles(itl),
        "all_complete_and_routed": len(complete) == len(routed) == requests,
    }


async def _drive(url: str, api_key: str, prompts: list[str], clients: int, max_tokens: int, timeout_s: float):
    openai = import_optional("openai")

    limit = asyncio.Semaphore(clients)
    async with openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key, max_retries=0, timeout=timeout_s) as client:

        async def one(prompt: str) -> dict[str, Any]:
            async with limit:
                sent = time.perf_counter()
                arrivals, text, outcome = [], "", {}
                try:
                    stream = await client.chat.completions.create(
                        model="auto",
                        messages=[{"role": "user", "content": prompt}],
                        max_tokens=max_tokens,
                        temperature=0,
                        stream=True,
                        stream_options={"include_usage": True},
                    )
                    async for chunk in stream:
                        for choice in chunk.choices:
                            if choice.delta.content:
                                arrivals.append(time.perf_counter())
                                text += choice.delta.content
                            if getattr(choice, "routing", None) is not None:
                                outcome["adapters"] = choice.routing["adapters"]
                            if choice.finish_reason is not None:
                                outcome["finish_reason"] = choice.finish_reason
                        if chunk.usage is not None:
                            outcome["completion_tokens"] = chunk.usage.completion_tokens
                except Exception as error:  # counted, never raised: one failure must not hide the rest
                    return {"error": f"{type(error).__name__}: {error}"}
                outcome.setdefault("finish_reason", None)
                outcome.setdefault("completion_tokens", 0)
                outcome["text_tokens_ok"] = bool(text) == (outcome["completion_tokens"] > 0)
                outcome["ttft_s"] = (arrivals[0] if arrivals else time.perf_counter()) - sent
                outcome["gaps_s"] = [b - a for a, b in itertools.pairwise(arrivals)]
                return outcome

        return await asyncio.gather(*(one(p) for p in prompts))


def _percentiles(values: list[float]) -> dict[str, float | None]:
    if not values:
        return {"p50": None, "p99": None}
    ordered = sorted(values)
    return {
        "p50": round(statistics.median(ordered), 4),
        "p99": round(ordered[min(len(ordered) - 1, int(0.99 * len(ordered)))], 4),
    }
