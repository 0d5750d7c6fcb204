"""RoutedLM on a tiny Llama: one generation per batch, coalesced concurrent calls, streaming, errors."""

from __future__ import annotations

import asyncio
import threading

import pytest

from loraretriever import LoraPool, Routing
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import gather_while_ticking

PROMPTS = [f"Question {i}: what comes after {i}?" for i in range(16)]


class FixedRouter:
    """A router at the edge of these tests: routes by a keyword, as a retriever would by similarity."""

    def __init__(self) -> None:
        self.calls = 0

    def route(self, prompts, options):
        self.calls += 1
        mode = options.mode
        return [
            Routing(("a", "b"), (0.7, 0.3), mode=mode) if "1" in p else Routing(("b",), (1.0,), mode=mode)
            for p in prompts
        ]


@pytest.fixture(scope="module")
def lm(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    pool = LoraPool(tiny_lm)
    for name, path in tiny_lm_adapters.items():
        pool.add(path, name=name)
    lm = RoutedLM(tiny_lm, smol_tokenizer, pool, FixedRouter(), max_batch_size=16, max_wait_ms=200)
    lm.generation = lm.generation.__class__(max_new_tokens=6)
    yield lm
    lm.close()


def test_generate_is_one_batched_generation_with_routings(lm):
    before = lm.generations
    results = lm.generate(PROMPTS[:8])
    assert lm.generations == before + 1
    assert all(r.batch_size == 8 and r.completion_tokens == 6 for r in results)
    assert results[1].routing.adapters == ("a", "b") and results[2].routing.adapters == ("b",)
    for i in (1, 2):
        assert lm.generate([PROMPTS[i]])[0].text == results[i].text


def test_pinned_adapters_and_modes_per_call(lm):
    pinned = lm.generate(PROMPTS[:2], adapters=["a"], mode="single")
    assert all(r.routing.adapters == ("a",) and r.routing.mode == "single" for r in pinned)
    alone = lm.generate_routed(PROMPTS[:2], [Routing.pinned(["a"], mode="single")] * 2)
    assert [r.text for r in pinned] == [r.text for r in alone]
    # The router gives PROMPTS[1] ("a" 0.7, "b" 0.3): fusion and mixture of it are different models.
    fused, mixed = (lm.generate(PROMPTS[1:2], mode=mode)[0] for mode in ("fusion", "mixture"))
    assert (fused.routing.mode, mixed.routing.mode) == ("fusion", "mixture")
    for result in (fused, mixed):
        assert result.text == lm.generate_routed(PROMPTS[1:2], [result.routing])[0].text
    assert fused.text != mixed.text


def test_one_batch_mixes_requests_with_different_options(lm):
    """Concurrent calls with different routing options share ONE generation; each row is what
    that call alone gives."""
    calls = [
        (PROMPTS[1], {}),
        (PROMPTS[2], {"adapters": ["a"]}),
        (PROMPTS[3], {"adapters": ["a", "b"], "adapter_weights": [0.2, 0.8], "mode": "fusion"}),
        (PROMPTS[4], {"mode": "single"}),
    ]
    alone = [lm.generate([p], **options)[0] for p, options in calls]
    before = lm.generations
    queued = [lm.submit(p, **options) for p, options in calls]
    together = [q.future.result() for q in queued]
    assert lm.generations == before + 1 and {r.batch_size for r in together} == {4}
    assert [r.routing for r in together] == [r.routing for r in alone]
    assert [r.text for r in together] == [r.text for r in alone]
    assert together[2].routing.weights == (0.2, 0.8)


def test_concurrent_thread_calls_are_coalesced_and_each_gets_its_own_answer(lm):
    expected = {p: r.text for p, r in zip(PROMPTS, lm.generate(PROMPTS), strict=True)}
    before = lm.generations
    answers: dict[str, str] = {}
    barrier = threading.Barrier(len(PROMPTS))

    def call(prompt: str) -> None:
        barrier.wait()
        answers[prompt] = lm.complete(prompt).text

    threads = [threading.Thread(target=call, args=(p,)) for p in PROMPTS]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert answers == expected
    assert lm.generations - before < len(PROMPTS)


def test_concurrent_async_calls_are_coalesced_without_blocking_the_loop(lm):
    expected = [r.text for r in lm.generate(PROMPTS)]
    before = lm.generations

    results, ticks = asyncio.run(gather_while_ticking([lm.acomplete(p) for p in PROMPTS]))
    assert [r.text for r in results] == expected
    assert lm.generations - before < len(PROMPTS)
    assert ticks > 0, "the event loop kept running while the batch generated"


def test_streaming_callers_share_batches(lm):
    expected = [r.text for r in lm.generate(PROMPTS[:4])]
    chunks: dict[int, list[str]] = {}

    def call(i: int) -> None:
        chunks[i] = list(lm.stream(PROMPTS[i]))

    threads = [threading.Thread(target=call, args=(i,)) for i in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert ["".join(chunks[i]) for i in range(4)] == expected
    assert any(len(c) > 1 for c in chunks.values())

    async def astream():
        return [d async for d in lm.astream(PROMPTS[0])]

    assert "".join(asyncio.run(astream())) == expected[0]


def test_a_bad_request_fails_alone(lm):
    good = lm.submit(PROMPTS[1])
    with pytest.raises(KeyError, match="no adapter named 'ghost'"):
        lm.submit(PROMPTS[2], adapters=["ghost"])
    assert good.future.result().text == lm.generate(PROMPTS[1:2])[0].text


def test_bad_input_is_a_clear_error(lm):
    with pytest.raises(ValueError, match="prompt 0 is empty"):
        lm.complete("  ")
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        lm.generate(["fine", ""])
    with pytest.raises(TypeError, match=r"unknown argument\(s\) \['temprature'\]"):
        lm.generate(["fine"], temprature=0.5)
    with pytest.raises(ValueError, match="mode='blend'"):
        lm.generate(["fine"], mode="blend")
    with pytest.raises(KeyError, match=r"adapters=\['ghost'\]: no adapter named 'ghost'") as raised:
        lm.generate(["fine"], adapters=["ghost"])
    assert raised.value.param == "adapters"  # the option the caller passed (found by the request fuzz test)


def test_chat_messages_use_the_template_and_route_on_the_last_user_message(lm):
    chat = [
        {"role": "user", "content": "hello"},
        {"role": "assistant", "content": "hi"},
        {"role": "user", "content": PROMPTS[1]},
    ]
    result = lm.generate([chat])[0]
    assert result.routing.adapters == ("a", "b")  # routed on PROMPTS[1], which holds a "1"
    single_turn = lm.generate([[{"role": "user", "content": PROMPTS[2]}]])[0]
    assert single_turn.text == lm.generate([PROMPTS[2]], chat_template=True)[0].text
    assert single_turn.prompt_tokens > lm.generate([PROMPTS[2]])[0].prompt_tokens
    with pytest.raises(ValueError, match="prompt 0 has no non-empty user message"):
        lm.generate([[{"role": "system", "content": "be brief"}]])
    with pytest.raises(ValueError, match="needs 'role' and 'content'"):
        lm.generate([[{"text": "hi"}]])


def test_add_adapter_rolls_back_when_the_router_refuses_the_card(tiny_lm, smol_tokenizer, tiny_lm_adapters, tmp_path):
    from loraretriever.pool.directory import adapter_dirs
    from loraretriever.retrieval.cards import RetrievalError

    class RefusingRouter(FixedRouter):
        def register(self, card):
            raise RetrievalError(f"index is down (card {card.name!r})")

    lm = RoutedLM(tiny_lm, smol_tokenizer, LoraPool(tiny_lm), RefusingRouter())
    lm.pool_dir = tmp_path
    try:
        with pytest.raises(RetrievalError, match="index is down"):
            lm.add_adapter(tiny_lm_adapters["a"], card={"samples": ["one sample"]}, name="new")
        assert "new" not in lm.pool and "new" not in adapter_dirs(tmp_path)
        assert lm.add_adapter(tiny_lm_adapters["a"], name="new") == "new"  # no card: nothing to refuse
        assert "new" in lm.pool and "new" in adapter_dirs(tmp_path)
    finally:
        lm.close()


BAD_REQUESTS = {
    "lone surrogate": ("bad \ud800 text", {}, "not valid Unicode"),
    "huge max_new_tokens": (PROMPTS[0], {"max_new_tokens": 10**9}, "max_new_tokens=1000000000 is over the limit"),
    "too long with truncation=error": (" ".join(PROMPTS), {"truncation": "error"}, "truncation='left'"),
    "seed of the wrong type": (PROMPTS[0], {"seed": "x"}, "seed='x' must be an integer"),
    "unknown adapter": (PROMPTS[0], {"adapters": ["ghost"]}, "ghost"),
    "unknown option": (PROMPTS[0], {"temprature": 0.5}, "temprature"),
}


@pytest.mark.parametrize("kind", sorted(BAD_REQUESTS))
def test_one_bad_request_among_eight_concurrent_good_ones_fails_alone(lm, kind):
    prompt, options, message = BAD_REQUESTS[kind]
    alone = {p: lm.complete(p).text for p in PROMPTS[:8]}
    outcomes: dict[str, object] = {}
    start = threading.Barrier(9)

    def call(key: str, prompt: str, kwargs: dict) -> None:
        start.wait(10)
        try:
            outcomes[key] = lm.complete(prompt, **kwargs).text
        except Exception as error:
            outcomes[key] = error

    threads = [threading.Thread(target=call, args=(p, p, {})) for p in PROMPTS[:8]]
    threads.append(threading.Thread(target=call, args=("bad", prompt, options)))
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(60)
    assert isinstance(outcomes["bad"], Exception) and message in str(outcomes["bad"])
    assert {p: outcomes[p] for p in PROMPTS[:8]} == alone


def test_an_abandoned_async_stream_cancels_its_request(lm):
    from concurrent.futures import CancelledError

    async def first_delta_then_leave():
        deltas, queued = lm.astream_with_result(PROMPTS[3], max_new_tokens=40, ignore_eos=True)
        first = await deltas.__anext__()
        await deltas.aclose()
        return first, queued

    first, queued = asyncio.run(first_delta_then_leave())
    assert first
    assert queued.state.cancelled
    with pytest.raises(CancelledError):
        queued.future.result(10)
    assert len(queued.state.ids) < 40
