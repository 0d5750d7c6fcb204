"""Router-only serving: route each request here, generate on another OpenAI-compatible engine.

``loraretriever serve --backend URL`` loads no model: it routes each prompt with the pool's cards
(the same :class:`~loraretriever.retrieval.router.Router` and options as the library) and
forwards the request to an engine that serves the pool's LoRAs by name (vLLM ``--enable-lora
--lora-modules name=path``, LoRAX, or a ``loraretriever serve``), with ``model`` set to the routed
adapter. One adapter per request is what those engines do, so this mode routes in ``single``
mode; mixtures, fusion and gates need this project's engine (``serve`` without ``--backend``).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import httpx
from fastapi.responses import JSONResponse, Response, StreamingResponse

from loraretriever.engine.routing import Routing
from loraretriever.errors import InvalidOptionError
from loraretriever.pool.directory import adapter_dirs
from loraretriever.retrieval.options import RouteOptions
from loraretriever.retrieval.router import Router
from loraretriever.server.errors import APIError, unknown_model
from loraretriever.server.protocol import AUTO_MODEL, ChatCompletionRequest, CompletionRequest

__all__ = ["Forwarder"]


class Forwarder:
    """Routes here and forwards to ``backend``.

    Args:
        router: Routes prompts over the pool's cards.
        pool_dir: The pool directory (its adapters are the names the backend must serve).
        backend: The engine's base URL, e.g. ``http://gpu-1:8000`` (``/v1/...`` is appended).
        base_model: The backend's name for the base model, for prompts no adapter fits
            (default: the first model the backend lists).
        api_key: The backend's key, if it has one.
        route_defaults: Routing defaults (``mode`` must be ``single``).
        timeout_s: How long to wait for the backend.
    """

    def __init__(
        self,
        router: Router,
        pool_dir: str | Path,
        backend: str,
        *,
        base_model: str | None = None,
        api_key: str | None = None,
        route_defaults: RouteOptions | dict[str, Any] | None = None,
        timeout_s: float = 600.0,
    ) -> None:
        self.router, self.pool_dir = router, Path(pool_dir).expanduser()
        self.route_defaults = RouteOptions.coerce(
            {"mode": "single", **dict(RouteOptions.coerce(route_defaults).given())}
        )
        _check_single(self.route_defaults)
        self.backend = backend.rstrip("/")
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self.client = httpx.AsyncClient(base_url=self.backend, headers=headers, timeout=timeout_s)
        self.base_model = base_model or self._first_backend_model(headers, timeout_s)

    def _first_backend_model(self, headers: dict[str, str], timeout_s: float) -> str:
        try:
            listed = httpx.get(f"{self.backend}/v1/models", headers=headers, timeout=min(timeout_s, 30.0))
            listed.raise_for_status()
            return listed.json()["data"][0]["id"]
        except (httpx.HTTPError, KeyError, IndexError, ValueError) as error:
            raise InvalidOptionError(
                f"the backend {self.backend} did not list its models ({error}). Fix: check --backend, or name its "
                "base model with --backend-model."
            ) from error

    @property
    def names(self) -> list[str]:
        """The adapters requests may be routed or pinned to: stored ones with a card."""
        return sorted(set(adapter_dirs(self.pool_dir)) & set(self.router.store.names))

    async def close(self) -> None:
        await self.client.aclose()

    async def forward(self, path: str, body: ChatCompletionRequest | CompletionRequest) -> Response:
        """Routes ``body``, forwards it to the backend with the routed adapter as ``model``, and
        returns the backend's answer with each choice's ``routing`` added."""
        routing = await self._route(body)
        payload = body.model_dump(exclude_unset=True, exclude={"routing"})
        payload["model"] = routing.adapters[0] if not routing.is_base else self.base_model
        if body.stream:
            return await self._stream(path, payload, routing)
        response = await self.client.post(path, json=payload)
        data = _json(response)
        if response.status_code == 200:
            for choice in data.get("choices", []):
                choice["routing"] = routing.to_dict()
            data["model"] = body.model
        return JSONResponse(data, status_code=response.status_code)

    async def _route(self, body: ChatCompletionRequest | CompletionRequest) -> Routing:
        options = body.route_options()
        if body.model != AUTO_MODEL:
            if body.model not in self.names:
                raise unknown_model(body.model)
            return Routing.pinned([body.model], mode="single")
        try:
            opts = self.route_defaults.replace(**options)
            _check_single(opts)
        except ValueError as error:
            raise APIError(400, str(error), param="routing") from None
        texts = _texts(body)
        routings = await asyncio.to_thread(self.router.route, texts, opts)
        chosen = {r.adapters[:1] for r in routings}
        if len(chosen) > 1:
            raise APIError(
                400,
                f"the {len(texts)} prompts route to different adapters ({sorted(a for c in chosen for a in c)}); a "
                "backend takes one model per request, so send them as separate requests.",
                param="prompt",
            )
        return routings[0]

    async def _stream(self, path: str, payload: dict[str, Any], routing: Routing) -> Response:
        request = self.client.build_request("POST", path, json=payload)
        response = await self.client.send(request, stream=True)
        if response.status_code != 200:
            await response.aread()
            await response.aclose()
            return JSONResponse(_json(response), status_code=response.status_code)

        async def events() -> AsyncIterator[str]:
            started: set[int] = set()
            try:
                async for line in response.aiter_lines():
                    if not line.startswith("data: ") or line == "data: [DONE]":
                        if line:
                            yield line + "\n\n"
                        continue
                    chunk = json.loads(line[6:])
                    for choice in chunk.get("choices", []):
                        if choice.get("index") not in started:
                            started.add(choice.get("index"))
                            choice["routing"] = routing.to_dict()
                    yield f"data: {json.dumps(chunk, ensure_ascii=False)}\n\n"
            finally:
                await response.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _check_single(options: RouteOptions) -> None:
    if options.mode != "single":
        raise InvalidOptionError(
            f"mode={options.mode!r} composes several adapters per prompt, which a one-adapter engine behind "
            "--backend cannot do. Fix: use mode='single', or serve without --backend (this engine does every mode).",
            param="mode",
        )


def _texts(body: ChatCompletionRequest | CompletionRequest) -> list[str]:
    if isinstance(body, CompletionRequest):
        return [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
    users = [m.text() for m in body.messages if m.role == "user"]
    return [users[-1] if users else body.messages[-1].text()]  # a chat is routed by its last user message


def _json(response: httpx.Response) -> dict[str, Any]:
    try:
        return response.json()
    except ValueError:
        return APIError(502, f"the backend answered {response.status_code} with a body that is not JSON.").body()
