"""The one bridge from a blocking iterator (a stream of text deltas) to an async iterator."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Iterator
from typing import TypeVar

__all__ = ["iterate_in_thread"]

T = TypeVar("T")
_DONE = object()


async def iterate_in_thread(items: Iterator[T]) -> AsyncIterator[T]:
    """Yields ``items`` without blocking the event loop: each ``next`` runs in a worker thread.

    Example:
        >>> async def collect():
        ...     return [x async for x in iterate_in_thread(iter("abc"))]
        >>> asyncio.run(collect())
        ['a', 'b', 'c']
    """
    finished = False
    try:
        while (item := await asyncio.to_thread(next, items, _DONE)) is not _DONE:
            yield item  # type: ignore[misc]
        finished = True
    finally:
        close = getattr(items, "close", None)
        if not finished and close is not None:  # a consumer that stopped early (or was cancelled)
            await asyncio.to_thread(close)  # e.g. cancels the request behind a stream of deltas
