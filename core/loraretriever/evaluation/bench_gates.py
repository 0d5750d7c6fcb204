"""``loraretriever bench gates``: throughput of the learned per-token gates against the mixture.

On the default base model, 32 prompts x 32 new tokens, random LoRAs (r=8 on q, k, v, o):

* ``mixture_k3``: the retrieval mixture (fixed weights), the reference;
* ``flow_k3``: the same 3 LoRAs per row, weighted per token by a LoRA-Flow gate;
* ``meteora_top2``: a MeteoRA gate over the whole pool, top-2 LoRAs per token;
* ``mixed``: a batch whose rows alternate mixture, flow and meteora (one pass);

each with pools of 8 and 64 LoRAs. Gates are random (their values do not change the cost). The LoRA
work per token is bounded by k (flow) or the top-k (meteora); the MeteoRA gate itself computes one
logit per pool adapter per token, which is what grows with the pool.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence

import torch

from loraretriever.engine.base_model import load_base_model
from loraretriever.engine.composer import Composer
from loraretriever.engine.gates import FlowGate, FlowGateConfig, MeteoraGate, MeteoraGateConfig
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import GenerationConfig
from loraretriever.engine.routing import Routing
from loraretriever.evaluation.workload import (
    PROMPT_SUBJECTS,
    PROMPT_TEMPLATES,
    lora_config,
    random_lora_state_dict,
    tokens_per_second,
)
from loraretriever.pool.lora_pool import LoraPool

__all__ = ["run_gates_benchmark"]


def run_gates_benchmark(
    batch_size: int = 32,
    new_tokens: int = 32,
    pool_sizes: Sequence[int] = (8, 64),
    rank: int = 8,
    seed: int = 0,
    log: Callable[[str], None] = print,
) -> dict:
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_base_model()
    prompts = [rng.choice(PROMPT_TEMPLATES).format(rng.choice(PROMPT_SUBJECTS)) for _ in range(batch_size)]
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)
    plain = Generator(model, tokenizer)
    results: dict[str, float] = {
        "base": tokens_per_second(lambda: sum(c.completion_tokens for c in plain.generate(prompts, config=config)))
    }
    log(f"base: {results['base']:.1f} tokens/s")
    for size in pool_sizes:
        pool = LoraPool(model)
        for i in range(size):
            pool.add_state_dict(f"lora{i:04d}", lora_config(rank), random_lora_state_dict(model, rank, generator))
        composer = Composer(model, pool)
        flow = FlowGate(FlowGateConfig(3, model.config.hidden_size, model.config.num_hidden_layers))
        torch.nn.init.normal_(flow.weight, std=0.05)
        modules = {m: model.get_submodule(m).in_features for n in pool.names for m in pool.get(n).modules}
        moe = MeteoraGate(MeteoraGateConfig(tuple(pool.names), {n: pool.get(n).digest for n in pool.names}, modules))
        for gate in (flow, moe):
            gate.requires_grad_(False)
        composer.gates.register("flow", flow)
        composer.gates.register("moe", moe)
        sets = [rng.sample(pool.names, 3) for _ in range(batch_size)]
        by_method = {
            "mixture_k3": [Routing.pinned(s) for s in sets],
            "flow_k3": [Routing(tuple(s), (1 / 3,) * 3, mode="flow", gate="flow") for s in sets],
            "meteora_top2": [Routing.meteora("moe")] * batch_size,
        }
        kinds = list(by_method)
        by_method["mixed"] = [by_method[kinds[i % len(kinds)]][i] for i in range(batch_size)]
        engine = Generator(model, tokenizer, composer)
        for method, routings in by_method.items():
            key = f"{method}_pool_{size}"
            with torch.inference_mode():
                results[key] = tokens_per_second(
                    lambda r=routings, e=engine: sum(c.completion_tokens for c in e.generate(prompts, r, config))
                )
            log(f"{key}: {results[key]:.1f} tokens/s")
        composer.remove_hooks()
    base = results["base"]
    return {
        "benchmark": "gates",
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "rank": rank,
        "threads": torch.get_num_threads(),
        "tokens_per_s": {k: round(v, 2) for k, v in results.items()},
        "ratio_to_base": {k: round(v / base, 3) for k, v in results.items()},
    }
