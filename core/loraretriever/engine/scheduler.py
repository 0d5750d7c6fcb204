"""Coalescing concurrent single requests into batched generations.

Callers in many threads (or asyncio tasks) submit one prompt each; a worker thread takes the first
waiting request, keeps collecting for up to ``max_wait_ms`` or until ``max_batch_size`` requests,
and runs them as ONE batch. Every caller gets exactly its own row (a future), and streaming callers
get their row's text deltas as they are produced.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BatchingQueue", "QueuedRequest"]

_DONE = object()


@dataclass
class QueuedRequest:
    """One caller's request waiting for a batch."""

    payload: Any  # what the batch runner needs (prompt, settings)
    future: Future = field(default_factory=Future)
    deltas: queue.SimpleQueue | None = None  # set for streaming callers
    enqueued_at: float = field(default_factory=time.perf_counter)

    def push(self, delta: str) -> None:
        if self.deltas is not None and delta:
            self.deltas.put(delta)

    def finish(self, result: Any = None, error: BaseException | None = None) -> None:
        if self.future.done():
            return
        if error is not None:
            self.future.set_exception(error)
        else:
            self.future.set_result(result)
        if self.deltas is not None:
            self.deltas.put(_DONE)

    def iter_deltas(self) -> Iterator[str]:
        """Yields the text deltas, then raises the request's error if it failed."""
        assert self.deltas is not None
        while (item := self.deltas.get()) is not _DONE:
            yield item
        self.future.result()  # re-raises a failure


BatchRunner = Callable[[Sequence[QueuedRequest]], None]
"""Runs one batch; must call ``finish`` on every request (``push`` for streamed text)."""


class BatchingQueue:
    """Merges requests arriving within ``max_wait_ms`` into batches of at most ``max_batch_size``.

    Args:
        run_batch: Runs a batch and finishes each request.
        max_batch_size: The most requests in one batch.
        max_wait_ms: How long the first request of a batch waits for company.
    """

    def __init__(self, run_batch: BatchRunner, *, max_batch_size: int = 32, max_wait_ms: float = 10.0) -> None:
        if not isinstance(max_batch_size, int) or max_batch_size < 1:
            raise ValueError(f"max_batch_size={max_batch_size!r} must be a positive integer.")
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} must be >= 0.")
        self.run_batch = run_batch
        self.max_batch_size = max_batch_size
        self.max_wait_s = max_wait_ms / 1000.0
        self._queue: queue.SimpleQueue[list[QueuedRequest] | None] = queue.SimpleQueue()
        self._carry: list[QueuedRequest] = []  # arrived together with the last batch, beyond its size
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, payload: Any, *, stream: bool = False) -> QueuedRequest:
        """Queues one request; returns it (``.future`` for the result, ``.iter_deltas()`` to stream)."""
        return self.submit_many([payload], stream=stream)[0]

    def submit_many(self, payloads: Sequence[Any], *, stream: bool = False) -> list[QueuedRequest]:
        """Queues requests that arrive together: they reach the batch runner together, in order
        (split only at ``max_batch_size``)."""
        if self._closed:
            raise RuntimeError("the request queue is closed; create a new RoutedLM.")
        requests = [QueuedRequest(p, deltas=queue.SimpleQueue() if stream else None) for p in payloads]
        self._ensure_worker()
        self._queue.put(requests)
        return requests

    def close(self) -> None:
        """Stops the worker after the batches already queued."""
        self._closed = True
        if self._worker is not None:
            self._queue.put(None)
            self._worker.join(timeout=60)

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self._worker = threading.Thread(target=self._loop, name="loraretriever-batcher", daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        stop = False
        while not stop or self._carry:
            if self._carry:
                batch, self._carry = self._carry, []
            else:
                first = self._queue.get()
                if first is None:
                    return
                batch = list(first)
            deadline = time.perf_counter() + self.max_wait_s
            while len(batch) < self.max_batch_size and not stop:
                remaining = deadline - time.perf_counter()
                try:
                    item = self._queue.get(timeout=remaining) if remaining > 0 else self._queue.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stop = True
                else:
                    batch += item
            batch, self._carry = batch[: self.max_batch_size], batch[self.max_batch_size :] + self._carry
            try:
                self.run_batch(batch)
            except BaseException as error:  # never let the worker die with callers waiting
                for request in batch:
                    request.finish(error=error)
