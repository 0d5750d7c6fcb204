"""Pool admin over HTTP: ``POST /v1/adapters`` adds an adapter, ``DELETE /v1/adapters/{name}`` removes one.

Admin changes the pool that every request routes over, so it is off unless the server has an API
key (403), and needs this process's engine (a ``--backend`` router has none: 400). Library errors
become OpenAI errors naming the field at fault (a taken name is a 409 on ``name``).
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from loraretriever.pool.adapter import AdapterExistsError
from loraretriever.server.errors import APIError, from_library_error
from loraretriever.server.protocol import AdapterRequest
from loraretriever.server.state import ServerState
from loraretriever.serving.routed_lm import RoutedLM

__all__ = ["add_adapter", "admin_engine", "remove_adapter"]


def admin_engine(state: ServerState) -> RoutedLM:
    """The engine whose pool admin changes; refused without an API key or on a router-only server."""
    if state.config.api_key is None:
        raise APIError(403, "pool admin is off: start the server with --api-key to add or remove adapters.")
    return state.engine()


async def add_adapter(state: ServerState, body: AdapterRequest) -> dict[str, Any]:
    """Adds ``body.source`` to the pool under ``body.name`` (or its own); the new model's entry."""
    lm = admin_engine(state)
    try:
        name = await asyncio.to_thread(lm.add_adapter, body.source, body.card, name=body.name)
    except AdapterExistsError as error:
        raise from_library_error(error, param="name") from None
    except Exception as error:
        raise from_library_error(error, param="source") from None
    return {"id": name, "object": "model", "created": int(time.time()), "owned_by": "loraretriever"}


async def remove_adapter(state: ServerState, name: str) -> dict[str, Any]:
    """Removes the adapter ``name`` from the pool (404 if no process sharing the pool stored it)."""
    lm = admin_engine(state)
    await asyncio.to_thread(lm.sync_pool)
    if name not in lm.pool:
        raise APIError(404, f"no adapter named {name!r}; GET /v1/models lists them.", param="name")
    try:
        await asyncio.to_thread(lm.remove_adapter, name)
    except Exception as error:
        raise from_library_error(error) from None
    return {"id": name, "object": "model", "deleted": True}
