"""The BatchingQueue alone, with a plain batch runner: batches, order, size limits, isolation."""

from __future__ import annotations

import threading

import pytest

from loraretriever.engine.scheduler import BatchingQueue


class Recorder:
    """Answers each request with its payload doubled; fails any batch holding a payload of -1."""

    def __init__(self) -> None:
        self.batches: list[list[int]] = []
        self.release = threading.Event()
        self.release.set()

    def __call__(self, requests) -> None:
        self.release.wait(5)
        payloads = [r.payload for r in requests]
        self.batches.append(payloads)
        if -1 in payloads:
            raise RuntimeError("bad batch")
        for r in requests:
            r.push(f"{r.payload}")
            r.finish(r.payload * 2)


def test_requests_submitted_together_form_one_batch_split_at_the_size_limit():
    runner = Recorder()
    q = BatchingQueue(runner, max_batch_size=4, max_wait_ms=0)
    requests = q.submit_many(list(range(10)))
    assert [r.future.result(5) for r in requests] == [2 * i for i in range(10)]
    assert runner.batches == [[0, 1, 2, 3], [4, 5, 6, 7], [8, 9]]
    q.close()


def test_requests_arriving_while_a_batch_runs_share_the_next_one():
    runner = Recorder()
    q = BatchingQueue(runner, max_batch_size=8, max_wait_ms=50)
    runner.release.clear()  # hold the first batch so that the next ones queue up behind it
    first = q.submit(0)
    later = [q.submit(i) for i in range(1, 6)]
    runner.release.set()
    assert first.future.result(5) == 0 and [r.future.result(5) for r in later] == [2, 4, 6, 8, 10]
    assert sum(len(b) for b in runner.batches) == 6 and len(runner.batches) <= 2
    q.close()


def test_a_failing_batch_fails_its_own_requests_and_the_worker_goes_on():
    runner = Recorder()
    q = BatchingQueue(runner, max_batch_size=2, max_wait_ms=0)
    bad = q.submit_many([-1, 5])
    with pytest.raises(RuntimeError, match="bad batch"):
        bad[1].future.result(5)
    streamed = q.submit(7, stream=True)
    assert list(streamed.iter_deltas()) == ["7"] and streamed.future.result(5) == 14
    q.close()
    with pytest.raises(RuntimeError, match="closed"):
        q.submit(1)


def test_bad_settings_are_refused():
    with pytest.raises(ValueError, match="max_batch_size=0"):
        BatchingQueue(Recorder(), max_batch_size=0)
    with pytest.raises(ValueError, match="max_wait_ms=-1"):
        BatchingQueue(Recorder(), max_wait_ms=-1)
