"""The server's state: the LM it answers with (or why it is not there yet) and the requests in flight.

One :class:`ServerState` per app, shared by every route: the model loads in a thread while the server
answers 503, and the count of pending requests bounds the queue (429 past ``max_pending``) and feeds
the queue-depth metric. Kept apart from the routes so that readiness and queue accounting are read
in one place.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable

from loraretriever.server.backend import Forwarder
from loraretriever.server.config import ServerConfig
from loraretriever.server.errors import APIError
from loraretriever.server.metrics import ServerMetrics
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["Served", "ServerState"]

logger = logging.getLogger(__name__)

Served = RoutedLM | Forwarder
"""What a server answers with: this engine, or a router in front of another engine."""


class ServerState:
    """The loaded LM (or why it is not there yet) and the requests in flight."""

    def __init__(self, source: Served | Callable[[], Served], config: ServerConfig) -> None:
        self.config = config
        self.lm: Served | None = source if isinstance(source, RoutedLM | Forwarder) else None
        self._load = None if self.lm is not None else source
        self.load_error: BaseException | None = None
        self.pending = 0
        self._lock = threading.Lock()
        self.metrics = ServerMetrics(self._queue_depth, self._running)

    def start_loading(self) -> None:
        if self.lm is not None or self._load is None:
            return

        def load() -> None:
            try:
                self.lm = self._load()
            except BaseException as error:  # reported by /health and every call
                logger.exception("loading the model failed")
                self.load_error = error

        threading.Thread(target=load, name="loraretriever-load", daemon=True).start()

    def ready(self) -> Served:
        if self.lm is not None:
            return self.lm
        if self.load_error is not None:
            raise APIError(503, f"the model failed to load: {self.load_error}. Fix the server's options and restart.")
        raise APIError(503, "the model is loading; retry shortly.", headers={"Retry-After": "5"})

    def reserve(self, count: int) -> None:
        with self._lock:
            if self.pending + count > self.config.max_pending:
                raise APIError(
                    429,
                    f"the server holds {self.pending} requests (max_pending={self.config.max_pending}); retry later.",
                    headers={"Retry-After": str(self.config.retry_after_s)},
                )
            self.pending += count

    def release(self, count: int = 1) -> None:
        with self._lock:
            self.pending -= count

    def engine(self) -> RoutedLM:
        lm = self.ready()
        if isinstance(lm, Forwarder):
            raise APIError(400, "this server only routes (--backend); pool admin runs on a server without --backend.")
        return lm

    def _running(self) -> float:
        running = self.lm.engine.running if isinstance(self.lm, RoutedLM) else None
        return float(len(running)) if running is not None else 0.0

    def _queue_depth(self) -> float:
        return max(float(self.pending) - self._running(), 0.0)
