"""The engine's rooms on their own: the scheduler's plans (policy, no model), the batched sampler
against transformers' logits processors and against each row alone, and the output processor on
its own thread giving what it gives inline."""

from __future__ import annotations

import threading
import time

import pytest
import torch
from transformers import RepetitionPenaltyLogitsProcessor, TemperatureLogitsWarper, TopPLogitsWarper

from loraretriever import Routing
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig, RequestState
from loraretriever.engine.sampler import Sampler
from loraretriever.engine.scheduler import MIN_CHUNK, Scheduler
from loraretriever.engine.worker import EngineLoop, QueuedRequest


def state(length: int, **config) -> RequestState:
    return RequestState(list(range(1, length + 1)), GenerationConfig(**config), Routing.base())


# -- scheduler ---------------------------------------------------------------------------------
def test_the_oldest_request_leads_and_takes_the_closest_lengths_within_the_budget():
    scheduler = Scheduler(EngineConfig(max_batch_size=8, max_batch_tokens=40))
    oldest, near, far, short, nearer = state(10), state(12), state(60), state(4), state(11)
    scheduler.add([oldest, near, far, short, nearer])
    plan = scheduler.schedule(decoding=0, prefilling=None)
    assert plan.admitted == [oldest, nearer, near]  # 3 x 12 padded tokens fit 40, a 4th row would not
    assert plan.prefill_tokens == 12 and list(scheduler.waiting) == [far, short]
    # decoding rows take their tokens from the budget: the long prompt is chunked, never below MIN_CHUNK
    assert scheduler.schedule(decoding=60, prefilling=(60, 0, 1)).prefill_tokens == MIN_CHUNK
    assert scheduler.schedule(decoding=4, prefilling=(60, 0, 1)).prefill_tokens == 40 - 4
    assert scheduler.schedule(decoding=4, prefilling=(60, 48, 1)).prefill_tokens == 60 - 48


def test_no_admission_when_the_batch_is_full_and_static_waits_for_an_empty_engine():
    continuous = Scheduler(EngineConfig(max_batch_size=2))
    continuous.add([state(5)])
    assert continuous.schedule(decoding=2, prefilling=None).admitted == []
    static = Scheduler(EngineConfig(max_batch_size=4, policy="static"))
    static.add([state(5), state(50)])
    assert static.schedule(decoding=1, prefilling=None).admitted == []
    plan = static.schedule(decoding=0, prefilling=None)
    assert len(plan.admitted) == 2 and plan.prefill_tokens == 50  # one pass, whatever the budget


def test_a_failed_group_comes_back_first_and_one_by_one():
    scheduler = Scheduler(EngineConfig(max_batch_size=8, max_batch_tokens=512))
    a, b, later = state(5), state(6), state(5)
    scheduler.add([later])
    scheduler.retry_alone([a, b])
    assert scheduler.schedule(decoding=0, prefilling=None).admitted == [a]
    assert scheduler.schedule(decoding=0, prefilling=None).admitted == [b]
    assert scheduler.schedule(decoding=0, prefilling=None).admitted == [later]


# -- sampler -----------------------------------------------------------------------------------
SETTINGS = [
    {},
    {"repetition_penalty": 1.3},
    {"temperature": 0.7, "seed": 1},
    {"temperature": 1.2, "top_p": 0.5, "seed": 2, "repetition_penalty": 0.8},
    {"temperature": 0.9, "top_p": 0.9, "seed": 3},
]


def rows(seeded: bool = True) -> list[RequestState]:
    made = []
    for i, settings in enumerate(SETTINGS):
        request = state(3 + i, **settings)
        request.ids = [40 + i, 7]
        if "seed" in settings and seeded:
            request.rng = torch.Generator().manual_seed(settings["seed"])
        made.append(request)
    return made


def test_a_batch_samples_what_each_row_samples_alone():
    logits = torch.randn(len(SETTINGS), 97, generator=torch.Generator().manual_seed(0))
    together = Sampler(grammars=None)(rows(), logits.clone()).ids
    alone = [Sampler(grammars=None)([r], logits[i : i + 1].clone()).ids[0] for i, r in enumerate(rows())]
    assert together == alone


def test_penalty_temperature_and_top_p_are_transformers_processors():
    logits = torch.randn(len(SETTINGS), 97, generator=torch.Generator().manual_seed(1))
    requests = rows()
    ours = logits.clone()
    Sampler(grammars=None)(requests, ours)  # penalties are applied in place
    for i, request in enumerate(requests):
        cfg = request.config
        seen = torch.tensor([request.prompt_ids + request.ids])
        expected = RepetitionPenaltyLogitsProcessor(cfg.repetition_penalty)(seen, logits[i : i + 1].clone())
        if cfg.repetition_penalty != 1.0:
            assert not torch.equal(expected, logits[i : i + 1])
        torch.testing.assert_close(ours[i : i + 1], expected, rtol=0, atol=0)
    # the distribution a sampled row draws from is transformers' temperature then top-p
    from loraretriever.engine.sampler import _probabilities

    sampled = [i for i, r in enumerate(requests) if r.config.temperature > 0]
    probs = _probabilities(ours, sampled, requests)
    for k, i in enumerate(sampled):
        cfg = requests[i].config
        warped = TemperatureLogitsWarper(cfg.temperature)(None, ours[i : i + 1].clone())
        if cfg.top_p < 1.0:
            warped = TopPLogitsWarper(cfg.top_p)(None, warped)
        drawn = probs[k : k + 1] / probs[k].sum()  # torch.multinomial normalises the weights it is given
        torch.testing.assert_close(drawn, torch.softmax(warped, -1), rtol=1e-5, atol=1e-7)
        assert (probs[k] > 0).sum() < 97 if cfg.top_p < 1.0 else (probs[k] > 0).all()


def test_the_same_seed_draws_the_same_tokens_and_a_non_finite_row_is_flagged():
    logits = torch.randn(len(SETTINGS), 97, generator=torch.Generator().manual_seed(2))
    first = Sampler(grammars=None)(rows(), logits.clone()).ids
    assert Sampler(grammars=None)(rows(), logits.clone()).ids == first
    broken = logits.clone()
    broken[1, 5] = float("nan")
    assert Sampler(grammars=None)(rows(), broken).finite == [True, False, True, True, True]


# -- output processor --------------------------------------------------------------------------
@pytest.fixture
def engine(tiny_lm, smol_tokenizer):
    return Engine(tiny_lm, smol_tokenizer, None, EngineConfig(max_batch_tokens=128))


def test_the_output_thread_gives_the_inline_texts_and_runs_the_callbacks_off_the_step_thread(engine):
    configs = [
        GenerationConfig(max_new_tokens=12, ignore_eos=True),
        GenerationConfig(max_new_tokens=12, ignore_eos=True, stop=(" ",)),
        GenerationConfig(max_new_tokens=12, ignore_eos=True, stop=("e",)),
    ]
    prompts = ["The cat sat on", "Once upon a time", "Numbers: one two"]
    inline = engine.run([engine.new_request(p, c, Routing.base()) for p, c in zip(prompts, configs, strict=True)])
    assert any(r.done.stop_sequence for r in inline), "a stop string must end one row for this test to check it"

    threads: set[str] = set()

    def slowly(event, callback) -> None:  # a slow caller lets the step thread run ahead of the text
        threads.add(threading.current_thread().name)
        time.sleep(0.02)
        callback(event)

    loop = EngineLoop(engine, max_wait_ms=50)
    queued = [
        QueuedRequest(engine.new_request(p, c, Routing.base(), index=i))
        for i, (p, c) in enumerate(zip(prompts, configs, strict=True))
    ]
    for q in queued:
        callback = q.state.on_event
        q.state.on_event = lambda event, callback=callback: slowly(event, callback)
    loop.submit(queued)
    threaded = [q.future.result(60) for q in queued]
    loop.close()
    assert [(c.text, c.completion_tokens, c.stop_sequence) for c in threaded] == [
        (r.done.text, r.done.completion_tokens, r.done.stop_sequence) for r in inline
    ]
    assert threads == {"loraretriever-outputs"}
    assert not engine.outputs.threaded  # closing the loop brings the processor back inline
