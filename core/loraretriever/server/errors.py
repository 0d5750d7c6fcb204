"""Errors in OpenAI's JSON shape, and which status each library error gets.

``{"error": {"message", "type", "param", "code"}}``: 400 bad options, 401 no or a wrong API key,
403 pool admin without a configured key, 404 an unknown model or adapter, 409 an adapter name
already stored, 413 a prompt over the limit, 429 a full queue (with ``Retry-After``), 503 while
the model loads.
"""

from __future__ import annotations

from typing import Any

from loraretriever.errors import LoraRetrieverError, PromptTooLongError

__all__ = ["APIError", "from_library_error", "unknown_model"]

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    409: "conflict_error",
    413: "invalid_request_error",
    429: "rate_limit_error",
    500: "server_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error response: ``status``, a message that names the value and the fix, and OpenAI's fields."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {
            "error": {
                "message": self.message,
                "type": _TYPES.get(self.status, "invalid_request_error"),
                "param": self.param,
                "code": self.code,
            }
        }


def unknown_model(name: str) -> APIError:
    """The 404 of a ``model`` that is neither ``auto`` nor a served adapter."""
    return APIError(
        404,
        f"the model {name!r} does not exist: use 'auto' to route, or an adapter GET /v1/models lists.",
        param="model",
        code="model_not_found",
    )


def from_library_error(error: BaseException, param: str | None = None) -> APIError:
    """The response for an error the library raised for one request, by its type alone: a
    :class:`~loraretriever.errors.LoraRetrieverError` answers with its own status and param; any
    other exception is a bug (500), whatever its base class. ``param``: the request field to name
    when the error names none."""
    if isinstance(error, APIError):
        return error
    if isinstance(error, PromptTooLongError):  # the library's fix (truncation=) is not an API field
        message = str(error).split("; shorten it")[0] + "; shorten the prompt or lower max_tokens."
        return APIError(error.status, message, param=error.param or "messages", code=error.code)
    if isinstance(error, LoraRetrieverError):
        return APIError(error.status, str(error), param=error.param or param, code=error.code)
    return APIError(500, f"{type(error).__name__}: {error}")
