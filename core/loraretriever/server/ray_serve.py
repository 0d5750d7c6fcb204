"""``serve --ray --replicas N``: the same app, one copy per Ray Serve replica.

Each replica is a process with its own model and engine; Ray's proxy spreads requests over them.
Replicas share the pool directory (a change made through one bumps its generation, and every
replica loads it before its next routing) and the index (a ``chroma run`` server: an embedded
index serves one process).
"""

from __future__ import annotations

import logging
import signal
import threading
from collections.abc import Callable

from loraretriever.engine.extras import import_optional
from loraretriever.errors import InvalidOptionError
from loraretriever.server.app import Served, create_app
from loraretriever.server.config import ServerConfig

__all__ = ["serve_replicas"]

logger = logging.getLogger(__name__)


class LoraRetrieverReplica:
    """One Ray Serve replica: the FastAPI app is built on the replica (``serve.ingress`` builder)."""


def serve_replicas(
    load: Callable[[], Served],
    config: ServerConfig,
    *,
    replicas: int,
    host: str = "127.0.0.1",
    port: int = 8000,
    num_cpus: float = 1.0,
    address: str | None = None,
) -> None:
    """Starts (or joins, with ``address``) a Ray cluster and serves ``replicas`` copies until stopped.

    Args:
        load: Builds one replica's LM (called on each replica).
        config: The server's settings.
        replicas: How many copies.
        host: Where Ray's HTTP proxy listens.
        port: Its port.
        num_cpus: CPUs Ray reserves per replica.
        address: A running cluster (``ray start --head``); default: a local one for this process.
    """
    if not isinstance(replicas, int) or replicas < 1:
        raise InvalidOptionError(f"replicas={replicas!r} must be a positive integer.", param="replicas")
    ray = import_optional("ray")
    serve = import_optional("ray.serve")

    ray.init(address=address, include_dashboard=False, log_to_driver=False)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    try:
        serve.start(http_options={"host": host, "port": port})
        ingress = serve.ingress(lambda: create_app(load, config))(LoraRetrieverReplica)
        deployment = serve.deployment(
            ingress,
            name="loraretriever",
            num_replicas=replicas,
            ray_actor_options={"num_cpus": num_cpus},
            max_ongoing_requests=max(config.max_pending, 1),
        )
        serve.run(deployment.bind(), name="loraretriever", route_prefix="/", blocking=False)
        logger.info("serving %d replicas at http://%s:%d", replicas, host, port)
        stop.wait()
    finally:
        serve.shutdown()
        ray.shutdown()
