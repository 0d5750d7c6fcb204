"""The continuous-batching engine on a tiny Llama with real PEFT adapters: joins and leaves between
steps, chunked prefill, limits, per-request isolation, cancellation."""

from __future__ import annotations

import gc
import weakref

import pytest

from loraretriever import Composer, LoraPool, Routing
from loraretriever.engine import model_runner
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.gates import FlowGate, FlowGateConfig
from loraretriever.engine.requests import GenerationConfig, RequestError

PROMPTS = [
    "Translate to French: the cat sleeps.",
    "Is this review positive? A fine film.",
    "Name a colour:",
    "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen",
]
ROUTINGS = [
    Routing.pinned(["a"]),
    Routing(("b", "a"), (0.6, 0.4), mode="fusion"),
    Routing.base(),
    Routing.pinned(["a", "b"]),
]


def composer_over_adapters(tiny_lm, adapters):
    """A composer over a new pool of ``adapters``; its hooks are removed when the fixture ends."""
    pool = LoraPool(tiny_lm)
    for name, path in adapters.items():
        pool.add(path, name=name)
    composer = Composer(tiny_lm, pool)
    yield composer
    composer.remove_hooks()


@pytest.fixture(scope="module")
def composer(tiny_lm, tiny_lm_adapters):
    yield from composer_over_adapters(tiny_lm, tiny_lm_adapters)


@pytest.fixture
def own_composer(tiny_lm, tiny_lm_adapters):
    """A composer over a pool of its own, for tests that remove adapters from it."""
    yield from composer_over_adapters(tiny_lm, tiny_lm_adapters)


def make(engine: Engine, prompts=PROMPTS, routings=ROUTINGS, lengths=(6, 12, 9, 4)):
    return [
        engine.new_request(p, GenerationConfig(max_new_tokens=n, ignore_eos=True), r, index=i)
        for i, (p, r, n) in enumerate(zip(prompts, routings, lengths, strict=True))
    ]


def texts(requests):
    return [r.done.text for r in requests]


def test_continuous_and_static_give_each_request_what_it_gets_alone(tiny_lm, smol_tokenizer, composer):
    static = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(policy="static"))
    alone = [
        texts(static.run(make(static, [p], [r], [n])))[0]
        for p, r, n in zip(PROMPTS, ROUTINGS, (6, 12, 9, 4), strict=True)
    ]
    assert len(set(alone)) == 4
    assert texts(static.run(make(static))) == alone
    # a small token budget: the prompts are prefilled in several groups while earlier ones decode
    continuous = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=20))
    assert texts(continuous.run(make(continuous))) == alone
    assert continuous.steps < static.steps  # the four alone took 4 runs; together fewer steps in all


def test_requests_join_a_running_batch_and_leave_it_as_they_finish(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=64))
    first = make(engine, PROMPTS[:1], ROUTINGS[:1], [12])
    engine.add(first)
    for _ in range(3):
        engine.step()
    assert first[0].ids and not first[0].finished
    later = make(engine, PROMPTS[1:3], ROUTINGS[1:3], [3, 5])
    engine.add(later)
    engine.step()  # decodes `first`, prefills the two newcomers, which join
    assert len(engine.running) == 3
    while not all(r.finished for r in later):
        engine.step()
    assert len(engine.running) == 1 and not first[0].finished  # the short ones left, the long one goes on
    engine.run(first)
    reference = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(policy="static"))
    for i, (request, n) in enumerate(zip(first + later, (12, 3, 5), strict=True)):
        assert request.done.text == reference.run(make(reference, [PROMPTS[i]], [ROUTINGS[i]], [n]))[0].done.text


def test_a_long_prompt_is_prefilled_in_chunks_while_others_decode(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=20))
    short = make(engine, PROMPTS[2:3], ROUTINGS[2:3], [10])
    engine.add(short)
    engine.step()
    long = make(engine, [PROMPTS[3] * 2], [ROUTINGS[3]], [2])
    assert len(long[0].prompt_ids) > 20
    engine.add(long)
    decoded_while_prefilling = 0
    while engine.prefilling is not None or engine.waiting:
        before = len(short[0].ids)
        engine.step()
        decoded_while_prefilling += len(short[0].ids) - before
        assert long[0].prefilled <= len(long[0].prompt_ids)
    assert decoded_while_prefilling >= 2, "the short request kept decoding during the long prefill"
    engine.run(long + short)
    static = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(policy="static"))
    assert long[0].done.text == static.run(make(static, [PROMPTS[3] * 2], [ROUTINGS[3]], [2]))[0].done.text


def test_limits_are_checked_per_request_with_errors_that_name_them(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_prompt_tokens=10, max_new_tokens_limit=20))
    with pytest.raises(RequestError, match="max_new_tokens=21 is over the limit of 20"):
        engine.new_request("hi", GenerationConfig(max_new_tokens=21))
    with pytest.raises(RequestError, match=r"prompt 3 has \d+ tokens but the limit is 10.*truncation='left'"):
        engine.new_request(PROMPTS[3], GenerationConfig(max_new_tokens=4, truncation="error"), index=3)
    with pytest.warns(UserWarning, match="oldest tokens were dropped"):
        cut = engine.new_request(PROMPTS[3], GenerationConfig(max_new_tokens=4))
    assert cut.truncated and len(cut.prompt_ids) == 10
    with pytest.raises(RequestError, match="not valid Unicode.*surrogate"):
        engine.new_request("bad \ud800 text", GenerationConfig())
    with pytest.raises(ValueError, match="seed='x' must be an integer"):
        GenerationConfig(seed="x")
    with pytest.raises(ValueError, match="max_batch_tokens=0"):
        EngineConfig(max_batch_tokens=0)
    with pytest.raises(ValueError, match="policy='eager'"):
        EngineConfig(policy="eager")


class _RaisingGate(FlowGate):
    """A user's gate with a bug: it raises on every input (a true edge: user code)."""

    def forward(self, layer, hidden, prior):
        raise RuntimeError("gate bug")


@pytest.mark.parametrize("policy", ["continuous", "static"])
def test_a_request_whose_forward_pass_raises_fails_alone(tiny_lm, smol_tokenizer, composer, policy):
    composer.gates.register("broken", _RaisingGate(FlowGateConfig(k=2, hidden_size=32, num_layers=2)))
    try:
        engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=256, policy=policy))
        bad = Routing(("a", "b"), (0.5, 0.5), mode="flow", gate="broken")
        routings = [ROUTINGS[0], bad, ROUTINGS[1], ROUTINGS[2]]
        requests = make(engine, PROMPTS, routings, (5, 5, 5, 5))
        engine.run(requests)
        assert isinstance(requests[1].error, RequestError) and "gate bug" in str(requests[1].error)
        assert "prompt 1" in str(requests[1].error)
        good = [r for i, r in enumerate(requests) if i != 1]
        reference = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(policy="static"))
        expected = reference.run(
            make(reference, [PROMPTS[i] for i in (0, 2, 3)], [routings[i] for i in (0, 2, 3)], (5, 5, 5))
        )
        assert texts(good) == texts(expected)
    finally:
        composer.gates.unregister("broken")


def test_an_unknown_adapter_fails_only_its_own_request(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer)
    requests = make(engine, PROMPTS[:2], [Routing.pinned(["ghost"]), ROUTINGS[1]], (3, 3))
    engine.run(requests)
    assert "ghost" in str(requests[0].error) and requests[1].done.completion_tokens == 3


def test_a_cancelled_request_frees_its_slot_at_the_next_step(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer)
    requests = make(engine, PROMPTS[:2], ROUTINGS[:2], (30, 6))
    engine.add(requests)
    engine.step()
    engine.step()
    assert len(engine.running) == 2
    requests[0].cancel()
    engine.step()
    assert len(engine.running) == 1 and isinstance(requests[0].error, Exception)
    engine.run(requests[1:])
    assert requests[1].done.completion_tokens == 6 and len(requests[0].ids) < 30


def test_sampled_rows_are_seeded_per_request_whatever_joins(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=24))
    sampled = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=7, ignore_eos=True)
    alone = engine.run([engine.new_request(PROMPTS[0], sampled, ROUTINGS[0])])[0].done.text
    crowd = [
        engine.new_request(p, sampled if i == 0 else GenerationConfig(max_new_tokens=4), r, index=i)
        for i, (p, r) in enumerate(zip(PROMPTS, ROUTINGS, strict=True))
    ]
    engine.run(crowd)
    assert crowd[0].done.text == alone
    other = engine.run(
        [
            engine.new_request(
                PROMPTS[0], GenerationConfig(max_new_tokens=8, temperature=1.0, seed=8, ignore_eos=True), ROUTINGS[0]
            )
        ]
    )
    assert other[0].done.text != alone


def test_admission_starts_with_the_oldest_and_groups_close_prompt_lengths(tiny_lm, smol_tokenizer, composer):
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=40))
    words = [3, 12, 3, 4]  # prompt lengths, in arrival order
    requests = [
        engine.new_request(" ".join(["cat"] * n), GenerationConfig(max_new_tokens=2), Routing.base(), index=i)
        for i, n in enumerate(words)
    ]
    engine.add(requests)
    engine.step()
    first = [r.index for r in engine.running.requests] if engine.running else []
    assert 0 in first and 1 not in first, "the oldest goes first and takes the short ones, not the long one"
    assert sorted(first) == [0, 2, 3]
    engine.run(requests)
    assert all(r.done.completion_tokens == 2 for r in requests)


def test_a_waiting_request_keeps_an_adapter_removed_before_it_runs(tiny_lm, smol_tokenizer, own_composer):
    engine = Engine(tiny_lm, smol_tokenizer, own_composer, EngineConfig())
    expected = texts(engine.run(make(engine, PROMPTS[:1], ROUTINGS[:1], (6,))))
    waiting = make(engine, PROMPTS[:1], ROUTINGS[:1], (6,))
    engine.add(waiting)  # queued with adapter "a" ...
    own_composer.pool.remove("a")  # ... which leaves the pool before the request is admitted
    assert texts(engine.run(waiting)) == expected
    late = make(engine, PROMPTS[:1], ROUTINGS[:1], (6,))
    engine.add(late)  # added after the removal: it fails alone, naming the adapter
    engine.run(late)
    assert isinstance(late[0].error, KeyError) and "'a'" in str(late[0].error)


def test_a_request_routed_to_an_adapter_removed_before_its_hold_is_routed_again(tiny_lm, smol_tokenizer, own_composer):
    engine = Engine(tiny_lm, smol_tokenizer, own_composer, EngineConfig())
    on_b = texts(engine.run(make(engine, PROMPTS[:1], [Routing.pinned(["b"])], (6,))))
    chosen = Routing(("a",), (1.0,), similarities=(0.9,))  # as a router returns it
    rerouted, unlucky, other = make(engine, PROMPTS[:1] * 3, [chosen, chosen, ROUTINGS[2]], (6, 6, 6))
    rerouted.reroute = lambda: Routing(("b",), (1.0,), similarities=(0.8,))

    def router_down() -> Routing:
        raise RuntimeError("the index is gone")

    unlucky.reroute = router_down
    own_composer.pool.remove("a")  # between their routing and their hold
    engine.run([rerouted, unlucky, other])
    assert rerouted.done.routing.adapters == ("b",) and rerouted.done.text == on_b[0]
    assert rerouted.done.routing.fallback == "routed again: a left the pool"
    assert isinstance(unlucky.error, KeyError) and "'a'" in str(unlucky.error)
    assert other.done.completion_tokens == 6


def test_finished_batches_free_their_kv_cache_without_the_cycle_collector(
    tiny_lm, smol_tokenizer, composer, monkeypatch
):
    """A batch's KV buffers must go when the batch does: left to Python's cycle collector, a long
    run's resident memory grew by gigabytes (5-turn chats over the demo pool were killed at 24 GiB)."""
    made: list[tuple[str, weakref.ref]] = []

    def tracked(cls):
        class Tracked(cls):
            def __init__(self, *args, **kwargs) -> None:
                super().__init__(*args, **kwargs)
                made.append((cls.__name__, weakref.ref(self)))

        return Tracked

    monkeypatch.setattr(model_runner, "PrefillKV", tracked(model_runner.PrefillKV))
    monkeypatch.setattr(model_runner, "RunningKV", tracked(model_runner.RunningKV))
    gc.collect()
    gc.disable()
    try:
        engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_tokens=20))
        for _ in range(3):
            engine.run(make(engine))
        assert {kind for kind, _ in made} == {"PrefillKV", "RunningKV"} and engine.running is None
        alive = [kind for kind, ref in made if ref() is not None]
        assert alive == [], f"finished batches' caches still alive: {alive}"
    finally:
        gc.enable()


def test_the_running_kv_cache_grows_by_rows_as_requests_join_not_to_the_batch_limit(tiny_lm, smol_tokenizer, composer):
    """One long prompt alone held ``max_batch_size`` rows of its length (32 x 2,600 columns of KV,
    4 GB zero-filled on SmolLM2: half of a long prompt's time went to it)."""
    engine = Engine(tiny_lm, smol_tokenizer, composer, EngineConfig(max_batch_size=32))
    alone = make(engine, PROMPTS[:1], ROUTINGS[:1], [4])
    engine.add(alone)
    while engine.running is None:
        engine.step()
    assert engine.running.kv._k[0].shape[0] == 1
    engine.run(alone)
    requests = make(engine)
    engine.add(requests[:1])
    while engine.running is None:
        engine.step()
    engine.add(requests[1:])
    while len(engine.running) < 4:
        engine.step()
    assert engine.running.kv._k[0].shape[0] in (2, 4)  # doubled, never the limit of 32
    assert texts(engine.run(requests)) == [
        texts(engine.run(make(engine, [p], [r], [n])))[0]
        for p, r, n in zip(PROMPTS, ROUTINGS, (6, 12, 9, 4), strict=True)
    ]
