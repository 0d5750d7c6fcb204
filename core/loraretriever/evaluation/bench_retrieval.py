"""``loraretriever bench retrieval``: routing latency of a batch of prompts over a large LoRA index.

The index holds ``--loras`` cards (10,000 by default) whose vectors are random unit vectors (the
index size is what matters, not their content); the prompts are real ones, embedded by the real
embedder. Times are medians over ``--repeats`` runs after a warm-up, in milliseconds:
``embed_ms`` (the embedder), ``query_ms`` (Chroma), ``route_ms`` (``Router.route`` end to end:
embedding + query + weighting).
"""

from __future__ import annotations

import platform
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

from loraretriever.retrieval.cards import AdapterCard, CardStore, RetrievalError

__all__ = ["run_benchmark"]

_FALLBACK_PROMPTS = [
    "Is the sentiment of this review positive or negative? The plot was thin but the acting superb.",
    "Translate to German: The committee will meet again next week to discuss the budget.",
    "Premise: A man is playing a guitar on stage. Hypothesis: A person performs music. Does the premise entail it?",
    "Answer the question: what is the capital city of Australia?",
    "Write a sentence about a restaurant: name = The Eagle, food = French, area = riverside.",
    "Do these two sentences mean the same thing? 'He left early.' 'He departed before the others.'",
    "Which ending is most plausible? She put the kettle on the stove and ...",
    "Read the passage and answer: The Nile flows north into the Mediterranean. Where does the Nile end?",
]


def _prompts(queries_file: str | None, batch: int, seed: int) -> list[str]:
    if queries_file:
        from loraretriever.retrieval.queries import load_queries

        pool = [query["inputs"] for query in load_queries(queries_file)]
    else:
        pool = list(_FALLBACK_PROMPTS)
    rng = np.random.default_rng(seed)
    return [pool[i] for i in rng.choice(len(pool), size=batch, replace=len(pool) < batch)]


def run_benchmark(
    *,
    loras: int = 10_000,
    batch: int = 32,
    top_k: int = 3,
    repeats: int = 10,
    queries_file: str | None = None,
    embedder: Any = None,
    max_seq_length: int | None = None,
    embed_batch_size: int = 16,
    device: str = "cpu",
    ephemeral: bool = False,
    seed: int = 0,
    generation_tokens: int = 32,
) -> dict[str, Any]:
    """Builds the index, routes ``repeats`` batches and returns the timings (see the module doc)."""
    import torch

    from loraretriever.retrieval.embedder import Embedder
    from loraretriever.retrieval.index import LoraIndex, open_chroma_client, throwaway_collection_name
    from loraretriever.retrieval.router import Router

    if loras < 1 or batch < 1 or repeats < 1:
        raise RetrievalError(f"--loras, --batch and --repeats must be positive (got {loras}, {batch}, {repeats}).")
    model = embedder if isinstance(embedder, Embedder) else None
    if model is None:
        model = Embedder(embedder, batch_size=embed_batch_size, device=device, max_seq_length=max_seq_length)
    prompts = _prompts(queries_file, batch, seed)
    rng = np.random.default_rng(seed)
    vectors = rng.standard_normal((loras, model.dim)).astype(np.float32)
    vectors /= np.linalg.norm(vectors, axis=1, keepdims=True)
    cards = [AdapterCard(f"lora-{i:05d}", ("synthetic",), tags={"shard": str(i % 10)}) for i in range(loras)]
    store = CardStore(None)
    store.put_all(cards)

    with tempfile.TemporaryDirectory(prefix="loraretriever-bench-") as scratch:
        client = open_chroma_client(ephemeral=True) if ephemeral else open_chroma_client(Path(scratch) / "index")
        index = LoraIndex(
            client,
            embedder_name=model.name,
            dim=model.dim,
            instruction=model.instruction,
            collection=throwaway_collection_name("bench"),
        )
        started = time.perf_counter()
        index.upsert(cards, vectors)  # digests match the cards: reconcile has nothing to do
        build_s = time.perf_counter() - started
        router = Router(model, index, store)

        embed_ms, query_ms, route_ms = [], [], []
        for i in range(repeats + 2):  # two warm-up rounds
            t0 = time.perf_counter()
            query_vectors = model.embed(prompts)
            t1 = time.perf_counter()
            index.query(query_vectors, top_k)
            t2 = time.perf_counter()
            routings = router.route(prompts, top_k=top_k)
            t3 = time.perf_counter()
            if i >= 2:
                embed_ms.append((t1 - t0) * 1000)
                query_ms.append((t2 - t1) * 1000)
                route_ms.append((t3 - t2) * 1000)
        assert len(routings) == batch and all(len(r.adapters) == top_k for r in routings)
        index.drop()

    def p90(values: list[float]) -> float:
        return round(float(np.percentile(values, 90)), 2)

    generation_ms = _generation_ms(prompts, generation_tokens) if generation_tokens else None
    routing = (
        {
            "generation_tokens": generation_tokens,
            "generation_ms": round(generation_ms, 1),
            "routing_over_generation": round(statistics.median(route_ms) / generation_ms, 4),
            "routing_over_generation_target": 0.10,
            "meets_routing_over_generation": statistics.median(route_ms) / generation_ms <= 0.10,
        }
        if generation_ms
        else {}
    )

    return {
        "bench": "retrieval",
        "loras": loras,
        "batch": batch,
        "top_k": top_k,
        "route_ms": round(statistics.median(route_ms), 2),
        "route_p90_ms": p90(route_ms),
        "embed_ms": round(statistics.median(embed_ms), 2),
        "query_ms": round(statistics.median(query_ms), 2),
        "query_p90_ms": p90(query_ms),
        "target_ms": 50,
        "meets_target": statistics.median(route_ms) <= 50,
        "index_build_s": round(build_s, 2),
        "index": "in-memory" if ephemeral else "embedded PersistentClient",
        "embedder": model.name,
        "max_seq_length": model.model.max_seq_length,
        "embed_batch_size": model.batch_size,
        "prompts": "file" if queries_file else "built-in",
        "device": device,
        "torch_threads": torch.get_num_threads(),
        "cpu": platform.processor() or platform.machine(),
        "repeats": repeats,
        **routing,
    }


def _generation_ms(prompts: list[str], new_tokens: int) -> float:
    """Milliseconds to generate ``new_tokens`` tokens for every prompt in one batch on the default
    base model with no adapters (a lower bound of a routed generation, so the ratio to it is an upper
    bound of routing's share); the faster of two runs, after a warm-up."""
    from loraretriever.engine.base_model import load_base_model
    from loraretriever.engine.generation import Generator
    from loraretriever.engine.requests import GenerationConfig
    from loraretriever.engine.routing import Routing

    model, tokenizer = load_base_model()
    generator = Generator(model, tokenizer)
    generator.generate(prompts[:2], [Routing.base()] * 2, GenerationConfig(max_new_tokens=2))
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True, truncation="left")
    best = float("inf")
    for _ in range(2):
        started = time.perf_counter()
        generator.generate(prompts, [Routing.base()] * len(prompts), config)
        best = min(best, time.perf_counter() - started)
    return best * 1000
