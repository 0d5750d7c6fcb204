"""The prefix cache keyed by routing: later requests with the same composition and prompt head
reuse its KV, answer exactly as without it, and never get another routing's KV."""

from __future__ import annotations

import pytest
import torch

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.prefix_cache import PrefixCache, composition_key
from loraretriever.engine.requests import GenerationConfig
from tests.conftest import save_peft_adapter

BLOCK = 4  # small blocks: the tiny model's prompts are a few dozen tokens
PROMPTS = [
    "one two three four five six seven eight nine ten eleven twelve",
    "Translate to French: the cat sleeps on the warm mat by the door.",
    "Is this review positive? A fine film with a slow start.",
]


@pytest.fixture(scope="module")
def composer(tiny_lm, tmp_path_factory):
    """Two adapters that differ only on v_proj (the same q_proj): their KV differs, their queries not."""
    root = tmp_path_factory.mktemp("prefix_adapters")
    pool = LoraPool(tiny_lm)
    pool.add(save_peft_adapter(tiny_lm, root / "v1", r=4, seed=1, targets=["v_proj"]), name="v1")
    pool.add(save_peft_adapter(tiny_lm, root / "v2", r=4, seed=2, targets=["v_proj"]), name="v2")
    composer = Composer(tiny_lm, pool)
    yield composer
    composer.remove_hooks()


def engine_with(tiny_lm, tokenizer, composer, cached: bool, **config) -> Engine:
    engine = Engine(tiny_lm, tokenizer, composer, EngineConfig(prefix_cache_gb=1.0 if cached else 0, **config))
    if cached:  # the same cache with small blocks
        engine.prefix_cache = engine.runner.prefix_cache = PrefixCache(1 << 30, block_tokens=BLOCK)
    return engine


def run(engine, prompts, routings, new_tokens=8):
    requests = [
        engine.new_request(p, GenerationConfig(max_new_tokens=new_tokens, ignore_eos=True), r, index=i)
        for i, (p, r) in enumerate(zip(prompts, routings, strict=True))
    ]
    return [r.done for r in engine.run(requests)]


ROUTINGS = [Routing.pinned(["v1"]), Routing(("v1", "v2"), (0.7, 0.3)), Routing.base()]


def test_a_repeated_prompt_reuses_its_head_and_answers_exactly_as_without_the_cache(tiny_lm, smol_tokenizer, composer):
    plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
    cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
    expected = run(plain, PROMPTS, ROUTINGS)
    first = run(cached, PROMPTS, ROUTINGS)
    assert [c.cached_tokens for c in first] == [0, 0, 0]
    again = run(cached, PROMPTS, ROUTINGS)
    for done, want in zip(again, expected, strict=True):
        # every full block but the one holding the last prompt token (its logits start the answer)
        assert done.cached_tokens == (done.prompt_tokens - 1) // BLOCK * BLOCK > 0
        assert done.text == want.text
    assert [c.text for c in first] == [c.text for c in expected]
    stats = cached.prefix_cache.stats
    assert stats.hit_tokens == sum(c.cached_tokens for c in again)
    assert stats.queried_tokens == sum(c.prompt_tokens for c in first + again)


def test_the_next_turn_reuses_the_previous_prompt_and_answer(tiny_lm, smol_tokenizer, composer):
    """An agent's next call re-sends the conversation: the KV of the last call's prompt and of its
    answer is already there."""
    cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
    plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
    routing = [Routing.pinned(["v2"])]
    first = run(cached, PROMPTS[:1], routing, new_tokens=12)[0]
    turn = PROMPTS[0] + first.text + " and then?"
    second = run(cached, [turn], routing)[0]
    answered = len(smol_tokenizer(PROMPTS[0] + first.text).input_ids)
    assert second.cached_tokens >= answered - 2 * BLOCK, (second.cached_tokens, answered)
    assert second.cached_tokens > first.prompt_tokens  # the answer's KV too, not only the prompt's
    assert second.text == run(plain, [turn], routing)[0].text


def test_a_cached_head_never_crosses_routings(tiny_lm, smol_tokenizer, composer, tmp_path):
    """v1 and v2 differ on v_proj: a head cached under one would give the other wrong values."""
    cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
    plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
    run(cached, PROMPTS[:1], [Routing.pinned(["v1"])])
    for routing in (
        Routing.pinned(["v2"]),
        Routing(("v1", "v2"), (0.5, 0.5)),
        Routing(("v1", "v2"), (0.6, 0.4)),
        Routing(("v1", "v2"), (0.5, 0.5), mode="fusion"),
        Routing.base(),
    ):
        done = run(cached, PROMPTS[:1], [routing])[0]
        assert done.cached_tokens == 0, routing
        assert done.text == run(plain, PROMPTS[:1], [routing])[0].text
    assert run(cached, PROMPTS[:1], [Routing.pinned(["v1"])])[0].cached_tokens > 0


def test_an_adapter_replaced_under_its_name_misses(tiny_lm, smol_tokenizer, tmp_path):
    pool = LoraPool(tiny_lm)
    pool.add(save_peft_adapter(tiny_lm, tmp_path / "old", r=4, seed=3, targets=["v_proj"]), name="task")
    composer = Composer(tiny_lm, pool)
    try:
        cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
        routing = [Routing.pinned(["task"])]
        run(cached, PROMPTS[:1], routing)
        assert run(cached, PROMPTS[:1], routing)[0].cached_tokens > 0
        pool.remove("task")
        pool.add(save_peft_adapter(tiny_lm, tmp_path / "new", r=4, seed=4, targets=["v_proj"]), name="task")
        replaced = run(cached, PROMPTS[:1], routing)[0]
        assert replaced.cached_tokens == 0
        plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
        assert replaced.text == run(plain, PROMPTS[:1], routing)[0].text
    finally:
        composer.remove_hooks()


def test_a_request_cancelled_mid_prefill_leaves_nothing_in_the_cache(tiny_lm, smol_tokenizer, composer):
    engine = engine_with(tiny_lm, smol_tokenizer, composer, cached=True, max_batch_tokens=20)
    decoding = engine.new_request(PROMPTS[2], GenerationConfig(max_new_tokens=30, ignore_eos=True), Routing.base())
    engine.add([decoding])
    while engine.running is None:  # a decoding row keeps the long prompt's prefill in chunks
        engine.step()
    stored = engine.prefix_cache.stats.stored_blocks
    long = engine.new_request(PROMPTS[0] * 3, GenerationConfig(max_new_tokens=4), ROUTINGS[1], index=1)
    engine.add([long])
    engine.step()
    assert engine.prefilling is not None and 0 < long.prefilled < len(long.prompt_ids)
    long.cancel()
    engine.step()
    assert long.error is not None and engine.prefilling is None
    assert engine.prefix_cache.stats.stored_blocks == stored
    chain = engine.prefix_cache.chain(long.prefix_key, long.prompt_ids)
    assert engine.prefix_cache.match(chain) == 0


def test_eviction_keeps_the_budget_and_drops_tails_before_heads():
    block = torch.zeros(2, 1, 1, 2, 4)  # (2, layers, heads, block_tokens, dim)
    cache = PrefixCache(budget_bytes=3 * block.nbytes, block_tokens=2)
    first = cache.chain("base", [1, 2, 3, 4])
    second = cache.chain("base", [9, 8, 7, 6])
    cache.store(first, torch.cat([block, block + 1], dim=3))
    cache.store(second, torch.cat([block + 2, block + 3], dim=3))
    assert cache.nbytes <= cache.budget_bytes and len(cache) == 3
    assert cache.match(second) == 2  # the newest chain whole
    assert cache.match(first) == 1  # the older chain lost its tail, not its head
    assert cache.stats.evicted_blocks == 1
    head = cache.lookup(first)
    assert head.shape[3] == 2 and torch.equal(head, block)
    cache.store(cache.chain("base", [5, 5, 5, 5, 5, 5]), torch.cat([block] * 3, dim=3))
    assert cache.nbytes <= cache.budget_bytes
    assert cache.match(first) == 0 and cache.match(second) == 0  # least recently used out first


def test_a_chain_longer_than_the_budget_keeps_its_head():
    block = torch.zeros(2, 1, 1, 2, 4)
    cache = PrefixCache(budget_bytes=2 * block.nbytes, block_tokens=2)
    chain = cache.chain("base", list(range(8)))
    cache.store(chain, torch.cat([block] * 4, dim=3))
    assert cache.match(chain) == 2 and cache.nbytes == cache.budget_bytes


def test_the_composition_key_names_everything_the_kv_depends_on():
    digests = {"a": "1", "b": "2"}
    keys = {
        composition_key(routing, digests, version)
        for routing, version in [
            (Routing.pinned(["a"]), None),
            (Routing.pinned(["b"]), None),
            (Routing(("a", "b"), (0.5, 0.5)), None),
            (Routing(("a", "b"), (0.6, 0.4)), None),
            (Routing(("a", "b"), (0.5, 0.5), mode="fusion"), None),
            (Routing(("a", "b"), (0.5, 0.5), mode="fusion", fusion="ties"), None),
            (Routing(("a", "b"), (0.5, 0.5), mode="fusion", fusion="ties", density=0.3), None),
            (Routing(("a", "b"), (0.5, 0.5), mode="flow", gate="g"), 1),
            (Routing(("a", "b"), (0.5, 0.5), mode="flow", gate="g"), 2),
            (Routing.base(), None),
        ]
    }
    assert len(keys) == 10
    assert composition_key(Routing.pinned(["a"]), {"a": "1"}) != composition_key(Routing.pinned(["a"]), {"a": "9"})
    # single uses the first adapter alone at weight 1, whatever its retrieval weights
    assert composition_key(Routing(("a", "b"), (0.9, 0.1), mode="single"), digests) == composition_key(
        Routing(("a", "b"), (0.6, 0.4), mode="single"), digests
    )


def test_prefix_cache_gb_is_checked():
    with pytest.raises(ValueError, match="prefix_cache_gb=-1"):
        EngineConfig(prefix_cache_gb=-1)


def assert_cached_head_gives_full_prefill_logits(model, tokenizer, composer, routing: Routing) -> None:
    plain = engine_with(model, tokenizer, composer, cached=False)
    cached = engine_with(model, tokenizer, composer, cached=True)
    _, expected = first_token_logits(plain, PROMPTS[1], routing)
    first_token_logits(cached, PROMPTS[1], routing)
    request, logits = first_token_logits(cached, PROMPTS[1], routing)
    assert request.cached_tokens > 0
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)


def first_token_logits(engine: Engine, prompt: str, routing: Routing):
    """Prefills one request through the engine's model runner: the request and its last prompt
    token's logits."""
    request = engine.new_request(prompt, GenerationConfig(max_new_tokens=1), routing)
    with torch.inference_mode():
        engine.runner.start_prefill([request])
        total, done, _ = engine.runner.progress()
        done = engine.runner.prefill(total - done)  # the whole rest in one pass
    return request, done.logits[0]


@pytest.mark.parametrize("routing", ROUTINGS, ids=["single", "mixture", "base"])
def test_a_cached_head_gives_the_logits_of_a_full_prefill(tiny_lm, smol_tokenizer, composer, routing):
    """Greedy texts of a tiny model hide small errors; the logits after a cached head do not."""
    assert_cached_head_gives_full_prefill_logits(tiny_lm, smol_tokenizer, composer, routing)


def test_requests_admitted_together_share_a_head_one_computes(tiny_lm, smol_tokenizer, composer):
    """n choices of one prompt, and concurrent calls with one system prompt: the first computes the
    shared head, the others are prefilled right after it and find it cached."""
    plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
    cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
    system = "You answer tersely and cite the rule. "
    prompts = [PROMPTS[0]] * 3 + [system + PROMPTS[1], system + PROMPTS[2]]
    routings = [ROUTINGS[1]] * 3 + [ROUTINGS[0]] * 2
    done = run(cached, prompts, routings)
    assert [d.text for d in done] == [d.text for d in run(plain, prompts, routings)]
    assert done[0].cached_tokens == 0
    assert done[1].cached_tokens == done[2].cached_tokens == (done[0].prompt_tokens - 1) // BLOCK * BLOCK
    shared = len(smol_tokenizer(system).input_ids) // BLOCK * BLOCK
    first, second = sorted((done[3].cached_tokens, done[4].cached_tokens))  # whichever went first
    assert first == 0 and second >= shared > 0


def test_kv_that_cannot_be_kept_turns_the_cache_off_and_serves_on(tiny_lm, smol_tokenizer, composer, monkeypatch):
    """A model whose layers keep KV of different shapes cannot be cut into blocks: its requests are
    served as without a cache, none fails."""
    from loraretriever.engine import kv

    def unstackable(*args, **kwargs):
        raise RuntimeError("stack expects each tensor to be equal size")

    monkeypatch.setattr(kv, "_stack_rows", unstackable)
    cached = engine_with(tiny_lm, smol_tokenizer, composer, cached=True)
    plain = engine_with(tiny_lm, smol_tokenizer, composer, cached=False)
    done = run(cached, PROMPTS, ROUTINGS) + run(cached, PROMPTS, ROUTINGS)
    assert cached.runner.prefix_cache is None
    assert [d.text for d in done] == [d.text for d in run(plain, PROMPTS, ROUTINGS)] * 2
    assert all(d.cached_tokens == 0 for d in done)


@pytest.mark.parametrize("family", ["qwen2", "mistral"])
def test_other_architectures_get_the_logits_of_a_full_prefill(smol_tokenizer, tmp_path, family):
    """Qwen2 (biased q/k/v) and Mistral (a sliding window shorter than the prompt), each with a real
    PEFT adapter on v_proj."""
    from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

    shape = dict(
        vocab_size=len(smol_tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    )  # fmt: skip
    torch.manual_seed(0)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**shape)).eval()
    else:
        model = MistralForCausalLM(MistralConfig(**shape, sliding_window=8)).eval()
    pool = LoraPool(model)
    pool.add(save_peft_adapter(model, tmp_path / "v", r=4, seed=5, targets=["v_proj"]), name="v")
    composer = Composer(model, pool)
    try:
        for routing in (Routing.pinned(["v"]), Routing.base()):
            assert_cached_head_gives_full_prefill_logits(model, smol_tokenizer, composer, routing)
    finally:
        composer.remove_hooks()
