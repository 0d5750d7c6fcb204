"""The engine's worker thread: callers in many threads (or asyncio tasks) submit requests, one
thread steps the :class:`~loraretriever.engine.engine.Engine` (and the engine's output processor
turns tokens into text on a thread of its own, so callers' callbacks never lengthen a step).

A submitted request gets a :class:`QueuedRequest`: a future for its result and, for streaming
callers, a queue of text deltas. Between steps the worker takes what arrived, lets the layer above
prepare it (``prepare``: routing, for ``RoutedLM``) and adds it to the engine, so new requests
join the running batch at the next step. When the engine is idle, the first arrival waits up to
``max_wait_ms`` for company, so requests that arrive together are routed and prefilled together.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import queue
import threading
import time
from collections.abc import AsyncIterator, Callable, Iterator, Sequence
from concurrent.futures import Future
from dataclasses import dataclass, field
from typing import Any

from loraretriever.engine.engine import Engine, cancelled_error
from loraretriever.engine.requests import RequestState, StreamEvent

__all__ = ["EngineLoop", "LoopDeltas", "Prepare", "QueuedRequest"]

logger = logging.getLogger(__name__)

_DONE = object()

Prepare = Callable[[Sequence["QueuedRequest"]], None]
"""Readies newly arrived requests (sets ``state.routing``) or fails them (``state.fail``)."""


class LoopDeltas:
    """A queue of text deltas that the engine's thread fills and an asyncio event loop drains
    (no thread is parked per stream, so thousands of streams cost nothing while they wait).

    Args:
        loop: The event loop of the consumer (default: the running one).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self.loop = loop or asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()

    def put(self, item: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the consumer's loop has closed: nobody listens any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)


@dataclass(eq=False)
class QueuedRequest:
    """One caller's request: the engine's state, a future for its result, and streamed text."""

    state: RequestState
    future: Future = field(default_factory=Future)
    deltas: queue.SimpleQueue | LoopDeltas | None = None  # set for streaming callers (threads / asyncio)
    enqueued_at: float = field(default_factory=time.perf_counter)
    make_result: Callable[[QueuedRequest], Any] | None = None  # the future's value from the state
    admitted_at: float | None = None  # when it was prepared and handed to the engine
    route_s: float = 0.0  # the routing of the arrivals it came with

    def __post_init__(self) -> None:
        self.state.on_event = self._on_event
        self.state.on_error = self._on_error
        # a caller that gives up (asyncio cancel, closed stream) frees the request's slot
        self.future.add_done_callback(lambda f: self.state.cancel() if f.cancelled() else None)

    @property
    def payload(self) -> Any:
        return self.state.payload

    def cancel(self) -> None:
        """Drops the request: its slot is freed at the engine's next step."""
        self.state.cancel()
        self.future.cancel()

    def iter_deltas(self) -> Iterator[str]:
        """Yields the text deltas, then raises the request's error if it failed. Closing the
        iterator early cancels the request."""
        assert isinstance(self.deltas, queue.SimpleQueue), "a LoopDeltas stream is read with aiter_deltas()"
        finished = False
        try:
            while (item := self.deltas.get()) is not _DONE:
                yield item
            finished = True
        finally:
            if not finished:
                self.cancel()
        self.future.result()  # re-raises a failure

    async def aiter_deltas(self) -> AsyncIterator[str]:
        """:meth:`iter_deltas` for a :class:`LoopDeltas` stream: awaits each delta on the event
        loop. Closing it early (or cancelling its task) cancels the request."""
        assert isinstance(self.deltas, LoopDeltas), "a thread-queue stream is read with iter_deltas()"
        finished = False
        try:
            while (item := await self.deltas.queue.get()) is not _DONE:
                yield item
            finished = True
        finally:
            if not finished:
                self.cancel()
        self.future.result()  # re-raises a failure

    def _on_event(self, event: StreamEvent) -> None:
        if self.deltas is not None and event.delta:
            self.deltas.put(event.delta)
        if event.completion is not None:
            if not self.future.done():
                result = self.make_result(self) if self.make_result is not None else event.completion
                self.future.set_result(result)
            if self.deltas is not None:
                self.deltas.put(_DONE)

    def _on_error(self, error: BaseException) -> None:
        if not self.future.done():
            self.future.set_exception(error)
        if self.deltas is not None:
            self.deltas.put(_DONE)


class EngineLoop:
    """Runs an engine in a worker thread for concurrent callers.

    Args:
        engine: The engine to step.
        prepare: Readies each batch of new arrivals before they join (or fails them).
        max_wait_ms: How long the first request to an idle engine waits for others.
    """

    def __init__(self, engine: Engine, prepare: Prepare | None = None, *, max_wait_ms: float = 10.0) -> None:
        if not max_wait_ms >= 0:
            raise ValueError(f"max_wait_ms={max_wait_ms!r} must be >= 0.")
        self.engine = engine
        self.prepare = prepare
        self.max_wait_s = max_wait_ms / 1000.0
        self._intake: queue.SimpleQueue[list[QueuedRequest] | None] = queue.SimpleQueue()
        self._worker: threading.Thread | None = None
        self._start_lock = threading.Lock()
        self._closed = False

    def submit(self, requests: Sequence[QueuedRequest]) -> list[QueuedRequest]:
        """Queues requests that arrive together: they are prepared and admitted together, in order."""
        if self._closed:
            raise RuntimeError("the engine loop is closed; create a new RoutedLM.")
        requests = list(requests)
        self._ensure_worker()
        self._intake.put(requests)
        return requests

    def close(self) -> None:
        """Stops the worker once every queued request has finished."""
        self._closed = True
        if self._worker is not None:
            self._intake.put(None)
            if self._worker is not threading.current_thread():  # a GC finalizer may run on the worker
                self._worker.join(timeout=60)
            self.engine.outputs.stop()

    def _ensure_worker(self) -> None:
        with self._start_lock:
            if self._worker is None or not self._worker.is_alive():
                self.engine.outputs.start()  # text and callbacks off this worker's steps
                self._worker = threading.Thread(target=self._loop, name="loraretriever-engine", daemon=True)
                self._worker.start()

    def _loop(self) -> None:
        stopping = False
        while True:
            arrived: list[QueuedRequest] = []
            if not self.engine.has_work:
                if stopping:
                    return
                first = self._intake.get()
                if first is None:
                    return
                arrived += first
                deadline = time.perf_counter() + self.max_wait_s
                while (remaining := deadline - time.perf_counter()) > 0:
                    try:
                        item = self._intake.get(timeout=remaining)
                    except queue.Empty:
                        break
                    if item is None:
                        stopping = True
                        break
                    arrived += item
            while True:  # whatever else arrived since the last step joins now
                try:
                    item = self._intake.get_nowait()
                except queue.Empty:
                    break
                if item is None:
                    stopping = True
                else:
                    arrived += item
            try:
                self._admit(arrived)
                if self.engine.has_work:
                    self.engine.step()
            except BaseException as error:  # never let the worker die with callers waiting
                logger.exception("the engine failed; failing the requests it held")
                self._fail_everything(error)

    def _admit(self, arrived: list[QueuedRequest]) -> None:
        live = [q for q in arrived if not q.state.cancelled]
        for queued in arrived:
            if queued.state.cancelled:
                queued.state.fail(cancelled_error())
        if not live:
            return
        if self.prepare is not None:
            self.prepare(live)
        self.engine.add([q.state for q in live if not q.state.finished])

    def _fail_everything(self, error: BaseException) -> None:
        self.engine.fail_all(error)
