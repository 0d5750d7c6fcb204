"""``loraretriever serve``: the OpenAI-compatible server over a pool directory.

The server listens at once and answers 503 (``GET /health``: ``loading``) until the model and
pool are loaded, so an orchestrator can tell a loading replica from a dead one.
"""

from __future__ import annotations

import argparse
import logging
import os
from pathlib import Path

from loraretriever.cli import fail
from loraretriever.cli.config_flags import add_config_arguments, config_options_from
from loraretriever.cli.route_flags import add_route_arguments, route_options_from
from loraretriever.retrieval.cards import RetrievalError

__all__ = ["register"]


def register(subparsers: argparse._SubParsersAction) -> None:
    from loraretriever.engine.engine import EngineConfig
    from loraretriever.server.config import ServerConfig

    parser = subparsers.add_parser(
        "serve",
        help="An OpenAI-compatible server (chat and text completions, streaming) that routes every prompt.",
        description="Serves /v1/chat/completions, /v1/completions, /v1/models, /v1/adapters, /health and "
        "/metrics. model='auto' routes each prompt; model='<adapter>' pins one.",
    )
    parser.add_argument("--pool", required=True, help="The pool directory (adapters/, cards/, index/, gates/).")
    parser.add_argument(
        "--model",
        default=None,
        help="Base model: hub id or path (default: the one the pool records in pool.json, else the packaged SmolLM2).",
    )
    parser.add_argument("--host", default="127.0.0.1", help="Interface to listen on (0.0.0.0 for every one).")
    parser.add_argument("--port", type=int, default=8000)
    parser.add_argument(
        "--api-key",
        default=os.environ.get("LORARETRIEVER_API_KEY") or None,
        help="Bearer key for every /v1 call; enables pool admin (default: $LORARETRIEVER_API_KEY).",
    )
    parser.add_argument("--chroma-host", default=None, help="Share the index on a `chroma run` server.")
    parser.add_argument("--chroma-port", type=int, default=8000)
    parser.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:N or mps.")
    parser.add_argument("--dtype", default="auto", help="auto, float32, bfloat16 or float16.")
    parser.add_argument(
        "--host-cache-gb", type=float, default=None, help="Adapters held in memory, in GiB (default: no limit)."
    )
    parser.add_argument(
        "--device-cache-gb", type=float, default=None, help="Adapters held on the GPU, in GiB (default: no limit)."
    )
    parser.add_argument(
        "--backend",
        default=None,
        metavar="URL",
        help="Route only: forward each request to this OpenAI-compatible engine (vLLM --enable-lora, LoRAX, "
        "another serve) with model set to the routed adapter; loads no model here.",
    )
    parser.add_argument("--backend-model", default=None, help="The backend's base model name (default: its first).")
    parser.add_argument("--backend-api-key", default=os.environ.get("LORARETRIEVER_BACKEND_API_KEY") or None)
    parser.add_argument("--ray", action="store_true", help="Serve through Ray Serve replicas (see --replicas).")
    parser.add_argument("--replicas", type=int, default=1, help="With --ray: copies of the server, one process each.")
    parser.add_argument("--ray-address", default=None, help="With --ray: a running cluster (default: a local one).")
    parser.add_argument("--replica-cpus", type=float, default=1.0, help="With --ray: CPUs reserved per replica.")
    parser.add_argument("--log-level", default="info", choices=["debug", "info", "warning", "error"])
    add_config_arguments(parser, ServerConfig, "server (see ServerConfig)", skip=("api_key",))
    add_config_arguments(parser, EngineConfig, "engine (see EngineConfig)")
    add_route_arguments(parser)
    parser.set_defaults(handler=_run)


def _run(args: argparse.Namespace) -> int:
    import uvicorn

    from loraretriever.engine.engine import EngineConfig
    from loraretriever.pool.layout import PoolLayout
    from loraretriever.retrieval.cards import CardStore
    from loraretriever.retrieval.router import Router
    from loraretriever.server.app import create_app
    from loraretriever.server.backend import Forwarder
    from loraretriever.server.config import ServerConfig
    from loraretriever.serving.adapters import ready_pool_dir
    from loraretriever.serving.routed_lm import RoutedLM

    pool = Path(args.pool).expanduser()
    if not pool.is_dir():
        return fail(f"--pool {args.pool!r} is not a directory; pass a pool directory (adapters/, cards/).")
    if not 0 < args.port < 65536:
        return fail(f"--port {args.port} is not a port number (1-65535).")
    if args.backend is not None and not args.backend.startswith(("http://", "https://")):
        return fail(f"--backend {args.backend!r} is not a URL; pass e.g. http://127.0.0.1:8001.")
    if args.replicas < 1 or (args.replicas > 1 and not args.ray):
        return fail(f"--replicas {args.replicas} needs --ray and a positive count.")
    if args.ray and args.replicas > 1 and args.chroma_host is None:
        return fail(
            "replicas share the pool's index through a Chroma server (an embedded index serves one process). "
            f"Fix: `chroma run --path {pool / 'index'} --port 8001` and pass --chroma-host 127.0.0.1 --chroma-port 8001."
        )
    try:
        route_defaults = route_options_from(args)
        engine_options = config_options_from(args, EngineConfig)
        config = ServerConfig(api_key=args.api_key, **config_options_from(args, ServerConfig, skip=("api_key",)))
    except (RetrievalError, ValueError) as error:
        return fail(str(error))

    def forwarder() -> Forwarder:
        cards = CardStore(PoolLayout(pool).cards)
        ready_pool_dir(pool, cards)  # a bad card is quarantined, not the end of the server
        router = Router.open(pool, host=args.chroma_host, port=args.chroma_port, store=cards)
        return Forwarder(
            router,
            pool,
            args.backend,
            base_model=args.backend_model,
            api_key=args.backend_api_key,
            route_defaults=route_defaults,
        )

    def load() -> RoutedLM:
        return RoutedLM.from_pretrained(
            args.model,
            pool_dir=pool,
            device=args.device,
            dtype=args.dtype,
            chroma_host=args.chroma_host,
            chroma_port=args.chroma_port,
            **engine_options,
            host_cache_gb=args.host_cache_gb,
            device_cache_gb=args.device_cache_gb,
            route_defaults=route_defaults,
        )

    logging.basicConfig(level=args.log_level.upper(), format="%(levelname)s %(name)s: %(message)s")
    source = forwarder if args.backend else load
    if args.ray:
        from loraretriever.server.ray_serve import serve_replicas

        serve_replicas(
            source,
            config,
            replicas=args.replicas,
            host=args.host,
            port=args.port,
            num_cpus=args.replica_cpus,
            address=args.ray_address,
        )
        return 0
    uvicorn.run(create_app(source, config), host=args.host, port=args.port, log_level=args.log_level)
    return 0
