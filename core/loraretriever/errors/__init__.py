"""The errors this library raises on purpose, typed by what they mean.

Every one is a :class:`LoraRetrieverError` that carries the HTTP status it answers with and, where
one option or value is at fault, its name (``param``), so the server maps an error by its type
alone (a bug's ``KeyError`` or ``ValueError`` is a 500, never a "not found" or a "bad request").
Each also keeps the built-in base its callers have long caught (``ValueError`` for a bad option,
``KeyError`` for an unknown name, ``TimeoutError`` for a busy pool).

Example:
    >>> error = InvalidOptionError("temperature=-1 must be >= 0.", param="temperature")
    >>> (error.status, error.param, isinstance(error, ValueError))
    (400, 'temperature', True)
"""

from __future__ import annotations

from typing import ClassVar

__all__ = [
    "ConflictError",
    "InvalidOptionError",
    "InvalidTypeError",
    "LoraRetrieverError",
    "NotFoundError",
    "PoolBusyError",
    "PromptTooLongError",
    "UnavailableError",
]


class LoraRetrieverError(Exception):
    """Base of the library's errors: a message that names the bad value and the fix, the HTTP
    ``status`` it answers with, OpenAI's error ``code``, and the offending ``param`` if one is."""

    status: ClassVar[int] = 500
    code: ClassVar[str | None] = None

    def __init__(self, message: str = "", *, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param

    def __str__(self) -> str:  # KeyError's repr-quoting would hide the message
        return str(self.args[0]) if self.args else ""


class InvalidOptionError(LoraRetrieverError, ValueError):
    """An option or value that cannot be honoured (400)."""

    status = 400


class InvalidTypeError(InvalidOptionError, TypeError):
    """An argument of the wrong kind, or one a call does not take (400)."""


class PromptTooLongError(InvalidOptionError):
    """A prompt over the limit (413)."""

    status = 413
    code = "context_length_exceeded"


class NotFoundError(LoraRetrieverError, KeyError):
    """A name that does not exist: an adapter, a model (404)."""

    status = 404
    code = "model_not_found"


class ConflictError(LoraRetrieverError):
    """A change that contradicts what is stored: a taken name, another model's pool (409)."""

    status = 409


class PoolBusyError(LoraRetrieverError, TimeoutError):
    """Another process held the pool directory's lock for too long (503; retry)."""

    status = 503


class UnavailableError(LoraRetrieverError):
    """A service this call needs does not answer: a Chroma server, a backend engine (503)."""

    status = 503
