"""How the server treats its callers: plain settings, importable without the `serve` extra (the
CLI declares its flags from them)."""

from __future__ import annotations

from dataclasses import dataclass, field

from loraretriever.errors import InvalidOptionError

__all__ = ["ServerConfig"]


@dataclass(frozen=True)
class ServerConfig:
    """How the server treats its callers.

    Example:
        >>> ServerConfig(max_pending=64).default_max_tokens
        256
    """

    api_key: str | None = field(
        default=None, metadata={"help": "Bearer key every /v1 call must carry; also enables pool admin."}
    )
    max_pending: int = field(
        default=256, metadata={"help": "Choices queued or decoding at once; beyond it a request gets 429."}
    )
    default_max_tokens: int = field(default=256, metadata={"help": "max_tokens when a request sets none."})
    retry_after_s: int = field(default=1, metadata={"help": "The Retry-After of a 429."})

    def __post_init__(self) -> None:
        for name in ("max_pending", "default_max_tokens", "retry_after_s"):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < 1:
                raise InvalidOptionError(f"{name}={value!r} must be a positive integer.", param=name)
        if self.api_key is not None and not self.api_key.strip():
            raise InvalidOptionError("api_key is empty; pass a real key or None.")
