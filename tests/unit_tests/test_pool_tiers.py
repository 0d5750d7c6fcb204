"""A pool larger than its memory: stored adapters registered from their headers, loaded into a
byte-budgeted host cache on use, pinned while a request holds them, checked at their first load."""

from __future__ import annotations

import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from loraretriever import AdapterError, Composer, LoraPool, Routing
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig
from loraretriever.pool.directory import quarantined
from loraretriever.pool.layout import PoolLayout
from loraretriever.serving.adapters import open_pool_dir
from tests.conftest import save_peft_adapter

NAMES = [f"s{i}" for i in range(5)]


@pytest.fixture(scope="module")
def pool_dir(tiny_lm, tmp_path_factory) -> Path:
    """A pool directory of five real PEFT adapters of the tiny LM, of different ranks and targets."""
    root = tmp_path_factory.mktemp("tiered_pool")
    targets = [["q_proj", "v_proj"], ["o_proj"], ["q_proj", "k_proj"], ["gate_proj"], ["v_proj", "down_proj"]]
    for i, name in enumerate(NAMES):
        save_peft_adapter(tiny_lm, PoolLayout(root).adapter(name), r=2 + 2 * (i % 3), seed=10 + i, targets=targets[i])
    return root


def registered(model, root: Path, **budgets) -> LoraPool:
    pool = LoraPool(model, **budgets)
    for name in NAMES:
        pool.register(PoolLayout(root).adapter(name), name=name)
    return pool


def test_registering_reads_no_weights_and_eviction_spares_held_adapters(tiny_lm, pool_dir):
    pool = registered(tiny_lm, pool_dir)
    sizes = {n: pool.stored(n).nbytes for n in NAMES}
    assert len(pool) == 5 and len(pool.host_cache) == 0, "nothing loaded at registration"
    budget = max(sizes.values())  # room for one adapter
    pool = registered(tiny_lm, pool_dir, host_cache_bytes=budget)
    hold = pool.hold(["s0"])
    held = hold.adapters()["s0"]
    for name in NAMES[1:]:
        assert pool.get(name).nbytes == sizes[name], "held as stored on disk"
    assert pool.host_cache.evictions >= 3
    assert "s0" in pool.host_cache and pool.get("s0") is held, "a held adapter is never evicted"
    hold.release()
    biggest = max(NAMES[1:], key=sizes.get)  # fills the budget alone
    assert sizes[biggest] == budget
    pool.get(biggest)
    assert "s0" not in pool.host_cache and pool.host_cache.nbytes <= budget, "released: evicted first"


def test_a_pool_larger_than_its_cache_gives_the_outputs_of_an_all_resident_pool(tiny_lm, smol_tokenizer, pool_dir):
    prompts = ["Name a colour:", "Translate to French: the cat sleeps.", "one two three", "Is it good? Yes", "Hi"] * 2
    routings = [
        Routing.pinned(["s0", "s1"]),
        Routing(("s2", "s3"), (0.7, 0.3), mode="fusion"),
        Routing.pinned(["s4"], mode="single"),
        Routing.pinned(["s1", "s2", "s4"]),
        Routing.pinned(["s3", "s0"]),
    ] * 2
    resident = LoraPool(tiny_lm)
    for name in NAMES:
        resident.add(PoolLayout(pool_dir).adapter(name), name=name)
    two = sorted(resident.stored(n).nbytes for n in NAMES)[-2:]
    small = registered(tiny_lm, pool_dir, host_cache_bytes=sum(two))
    outputs = {}
    for label, pool in (("resident", resident), ("small", small)):
        composer = Composer(tiny_lm, pool)
        try:
            engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_size=2))
            requests = [
                engine.new_request(p, GenerationConfig(max_new_tokens=6, ignore_eos=True), r, index=i)
                for i, (p, r) in enumerate(zip(prompts, routings, strict=True))
            ]
            engine.run(requests)
            assert all(r.error is None for r in requests), [r.error for r in requests]
            outputs[label] = [r.ids for r in requests]
        finally:
            composer.remove_hooks()
    assert small.host_cache.evictions > 0 and small.cache_stats()["loads"] > len(NAMES), "adapters were reloaded"
    assert small.host_cache.nbytes <= sum(two)
    assert outputs["small"] == outputs["resident"]
    assert len({tuple(ids) for ids in outputs["resident"][:5]}) == 5, "the routings differ"


def test_a_corrupt_file_found_at_first_load_fails_only_the_requests_that_need_it(
    tiny_lm, smol_tokenizer, pool_dir, tmp_path
):
    import shutil

    root = shutil.copytree(pool_dir, tmp_path / "pool")
    weights_file = PoolLayout(root).adapter("s2") / "adapter_model.safetensors"
    weights = load_file(weights_file)
    key = next(k for k in weights if "lora_B" in k)
    weights[key] = torch.full_like(weights[key], float("nan"))  # same shapes: the header still reads
    save_file(weights, weights_file)
    pool = LoraPool(tiny_lm)
    opened = open_pool_dir(pool, root)
    assert "s2" in opened["loaded"] and not opened["quarantined"], "opening reads headers, not weights"
    composer = Composer(tiny_lm, pool)
    try:
        engine = Engine(tiny_lm, smol_tokenizer, composer)
        routings = [Routing.pinned(["s0"]), Routing.pinned(["s2", "s1"]), Routing.pinned(["s1"]), Routing.base()]
        requests = [
            engine.new_request("Name a colour:", GenerationConfig(max_new_tokens=4, ignore_eos=True), r, index=i)
            for i, r in enumerate(routings)
        ]
        engine.run(requests)
    finally:
        composer.remove_hooks()
    assert isinstance(requests[1].error, AdapterError) and "'s2'" in str(requests[1].error)
    assert "NaN" in str(requests[1].error)
    assert [r.done.completion_tokens for i, r in enumerate(requests) if i != 1] == [4, 4, 4]
    assert "s2" not in pool and "s2" in quarantined(root), "the broken adapter left the pool and its files moved"
    assert not (PoolLayout(root).adapter("s2")).exists()


class SlowDiskPool(LoraPool):
    """A pool whose disk takes ``delay`` seconds to read adapter ``slow`` (the edge mocked: latency)."""

    def __init__(self, *args, slow: str, delay: float, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.slow, self.delay = slow, delay

    def _read(self, stored):
        if stored.name == self.slow:
            time.sleep(self.delay)
        return super()._read(stored)


@pytest.mark.parametrize("max_load_wait", [5.0, 0.0])
def test_a_request_with_loaded_adapters_goes_first_within_max_load_wait(
    tiny_lm, smol_tokenizer, pool_dir, max_load_wait
):
    pool = SlowDiskPool(tiny_lm, slow="s0", delay=0.5)
    for name in NAMES:
        pool.register(PoolLayout(pool_dir).adapter(name), name=name)
    pool.get("s1")  # loaded before the requests come
    composer = Composer(tiny_lm, pool)
    try:
        engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_load_wait=max_load_wait))
        config = GenerationConfig(max_new_tokens=3, ignore_eos=True)
        cold, warm = (engine.new_request("Name a colour:", config, Routing.pinned([n])) for n in ("s0", "s1"))
        engine.run([cold, warm])
    finally:
        composer.remove_hooks()
    assert cold.done.completion_tokens == warm.done.completion_tokens == 3
    if max_load_wait:  # the older request's adapter was still loading: the younger one went first
        assert warm.first_token_at < cold.first_token_at
    else:  # no waiting allowed: first come, first served
        assert cold.first_token_at <= warm.first_token_at


def test_off_the_cpu_a_device_cache_holds_copies_under_its_own_budget(pool_dir):
    from transformers import LlamaForCausalLM

    from tests.conftest import TINY_CONFIG

    with torch.device("meta"):  # any device but the CPU: a tensor left behind would fail the plan there
        model = LlamaForCausalLM(TINY_CONFIG).eval()
    names = ["s0", "s2"]  # adapters of the tiny Llama's shapes (the tiny LM shares them but its vocabulary)
    pool = LoraPool(model, device_cache_bytes=1)  # room for none: each use copies again
    for name in names:
        pool.register(PoolLayout(pool_dir).adapter(name), name=name)
    for name in names:
        assert {w.A.device.type for w in pool.get(name).modules.values()} == {"meta"}
    assert pool.device_cache.evictions >= 1 and len(pool.host_cache) == 2, "host copies stay, device ones go"
    assert pool.cache_stats()["loads"] == 2, "read from disk once each"
    plan = Composer(model, pool).build_plan([Routing.pinned(names)])
    assert {p.A_t.device.type for p in plan.layers.values()} == {"meta"}


def test_routed_lm_takes_cache_budgets_and_refuses_a_bad_one(tiny_lm, smol_tokenizer, pool_dir):
    from loraretriever import RoutedLM

    with pytest.raises(ValueError, match=r"host_cache_gb=-1 must be a number of GiB >= 0"):
        RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=pool_dir, embedder=None, host_cache_gb=-1)
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=pool_dir, embedder=None, host_cache_gb=0.0001)
    try:
        assert lm.pool.host_cache.budget_bytes == int(0.0001 * 2**30) and len(lm.pool.host_cache) == 0
        results = lm.generate(["Name a colour:"] * 3, adapters=["s0", "s4"], max_new_tokens=2)
        assert [r.completion_tokens for r in results] == [2, 2, 2]
        assert results[0].routing.adapters == ("s0", "s4")
        assert 0 < lm.pool.host_cache.nbytes <= lm.pool.host_cache.budget_bytes
    finally:
        lm.close()
