"""The engine's worker thread (EngineLoop) with a real Engine on a tiny Llama: arrivals prepared
together, joining a running batch, isolation of a failing prepare, cancellation, close."""

from __future__ import annotations

import threading
from concurrent.futures import CancelledError

import pytest

from loraretriever import Routing
from loraretriever.engine.engine import Engine, EngineConfig
from loraretriever.engine.requests import GenerationConfig
from loraretriever.engine.worker import EngineLoop, QueuedRequest


class Preparer:
    """Routes every request to the base model; fails those whose payload is "bad"; can be held."""

    def __init__(self) -> None:
        self.batches: list[list[str]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, requests) -> None:
        self.release.wait(10)
        self.batches.append([q.payload for q in requests])
        for q in requests:
            if q.payload == "bad":
                q.state.fail(ValueError("bad options"))
            else:
                q.state.routing = Routing.base()


@pytest.fixture
def engine(tiny_lm, smol_tokenizer):
    return Engine(tiny_lm, smol_tokenizer, None, EngineConfig(max_batch_tokens=64))


def queued(engine, payload, n=4, stream=False):
    import queue

    state = engine.new_request(f"Say {payload}:", GenerationConfig(max_new_tokens=n, ignore_eos=True), payload=payload)
    return QueuedRequest(state, deltas=queue.SimpleQueue() if stream else None)


def test_requests_submitted_together_are_prepared_together_and_answered(engine):
    prepare = Preparer()
    loop = EngineLoop(engine, prepare, max_wait_ms=0)
    requests = loop.submit([queued(engine, str(i)) for i in range(5)])
    assert all(r.future.result(30).completion_tokens == 4 for r in requests)
    assert prepare.batches == [["0", "1", "2", "3", "4"]]
    assert engine.busy_periods == 1 and max(r.state.batch_rows for r in requests) == 5
    loop.close()


def test_arrivals_while_the_engine_runs_join_the_running_batch(engine):
    prepare = Preparer()
    loop = EngineLoop(engine, prepare, max_wait_ms=0)
    first = loop.submit([queued(engine, "first", n=40)])[0]
    while not first.state.ids:  # it is decoding
        pass
    later = loop.submit([queued(engine, "later", n=3)])[0]
    assert later.future.result(30).completion_tokens == 3
    assert not first.future.done(), "the newcomer finished while the first request was still decoding"
    assert later.state.batch_rows == 2
    assert first.future.result(30).completion_tokens == 40 and engine.busy_periods == 1
    loop.close()


def test_a_request_that_fails_to_prepare_fails_alone(engine):
    loop = EngineLoop(engine, Preparer(), max_wait_ms=0)
    bad, good = loop.submit([queued(engine, "bad"), queued(engine, "good", stream=True)])
    with pytest.raises(ValueError, match="bad options"):
        bad.future.result(30)
    assert "".join(good.iter_deltas()) == good.future.result(30).text
    loop.close()
    with pytest.raises(RuntimeError, match="closed"):
        loop.submit([queued(engine, "late")])


def test_a_cancelled_or_abandoned_request_frees_its_slot(engine):
    loop = EngineLoop(engine, Preparer(), max_wait_ms=0)
    long, other = loop.submit([queued(engine, "long", n=50, stream=True), queued(engine, "other", n=50)])
    deltas = long.iter_deltas()
    next(deltas)
    deltas.close()  # a client that goes away mid-stream
    with pytest.raises(CancelledError):
        long.future.result(30)
    other.future.cancel()  # asyncio-style cancel of the future
    assert other.state.cancelled
    loop.close()
    assert engine.running is None and len(long.state.ids) < 50 and len(other.state.ids) < 50


def test_bad_settings_are_refused(engine):
    with pytest.raises(ValueError, match="max_wait_ms=-1"):
        EngineLoop(engine, max_wait_ms=-1)
