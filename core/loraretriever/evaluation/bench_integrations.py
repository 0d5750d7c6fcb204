"""``loraretriever bench integrations``: batching through the LangChain and LlamaIndex fronts.

On the default base model with a routed pool (random LoRAs with cards, a real MiniLM router):

* LangChain: ``.batch()`` of 32 mixed prompts (one generation) against a loop of ``invoke``;
* LlamaIndex: 16 concurrent ``acomplete`` calls (coalesced) against 16 sequential ``complete``.

Every call generates exactly ``new_tokens`` tokens (``ignore_eos``), so the work is the same.
"""

from __future__ import annotations

import asyncio
import random
import time

import torch

from loraretriever.engine.base_model import load_base_model
from loraretriever.evaluation.workload import PROMPT_SUBJECTS, PROMPT_TEMPLATES, task_pool
from loraretriever.retrieval.router import Router
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["run_integrations_benchmark"]


def run_integrations_benchmark(
    batch_size: int = 32, concurrent: int = 16, new_tokens: int = 16, seed: int = 0, log=print
) -> dict:
    from langchain_loraretriever import LoraRetrieverLLM
    from llamaindex_loraretriever import LoraRetrieverLLM as LlamaIndexLLM

    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_base_model()
    pool, cards = task_pool(model, generator)
    router = Router.from_cards(cards)
    lm = RoutedLM(model, tokenizer, pool, router, max_batch_size=max(batch_size, concurrent), max_wait_ms=20)
    prompts = [rng.choice(PROMPT_TEMPLATES).format(rng.choice(PROMPT_SUBJECTS)) for _ in range(batch_size)]
    settings = {"max_new_tokens": new_tokens, "ignore_eos": True}

    llm = LoraRetrieverLLM(lm=lm, **{k: v for k, v in settings.items() if k == "max_new_tokens"})
    llm.batch(prompts[:4], ignore_eos=True)  # warm-up
    start = time.perf_counter()
    llm.batch(prompts, ignore_eos=True)
    batch_s = time.perf_counter() - start
    log(f"langchain .batch({batch_size}): {batch_s:.2f} s")
    start = time.perf_counter()
    for prompt in prompts:
        llm.invoke(prompt, ignore_eos=True)
    loop_s = time.perf_counter() - start
    log(f"langchain invoke loop ({batch_size}): {loop_s:.2f} s")

    index_llm = LlamaIndexLLM(lm, max_new_tokens=new_tokens, chat_template=False)
    few = prompts[:concurrent]

    async def together():
        return await asyncio.gather(*(index_llm.acomplete(p, ignore_eos=True) for p in few))

    before = lm.generations
    start = time.perf_counter()
    asyncio.run(together())
    concurrent_s = time.perf_counter() - start
    generations = lm.generations - before
    log(f"llamaindex {concurrent} concurrent acomplete: {concurrent_s:.2f} s in {generations} generation(s)")
    start = time.perf_counter()
    for prompt in few:
        index_llm.complete(prompt, ignore_eos=True)
    sequential_s = time.perf_counter() - start
    log(f"llamaindex {concurrent} sequential complete: {sequential_s:.2f} s")
    lm.close()
    router.close()
    return {
        "benchmark": "integrations",
        "new_tokens": new_tokens,
        "threads": torch.get_num_threads(),
        "langchain": {
            "prompts": batch_size,
            "batch_s": round(batch_s, 3),
            "invoke_loop_s": round(loop_s, 3),
            "speedup": round(loop_s / batch_s, 2),
            "target_speedup": 5.0,
        },
        "llamaindex": {
            "calls": concurrent,
            "concurrent_acomplete_s": round(concurrent_s, 3),
            "generations_for_concurrent_calls": generations,
            "sequential_complete_s": round(sequential_s, 3),
            "speedup": round(sequential_s / concurrent_s, 2),
            "target_speedup": 4.0,
        },
    }
