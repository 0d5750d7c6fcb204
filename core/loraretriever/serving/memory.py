"""Process memory: handing the heap that closed LMs freed back to the operating system.

glibc's malloc keeps freed memory in its arenas for reuse (each thread that allocates, such as an
engine's worker thread, has one of its own) instead of returning it to the OS, so a process that
builds and drops LLM objects grows by tens of MB each time with nothing leaked. ``malloc_trim``
gives the free part of the arenas back. Kept apart from :class:`~loraretriever.serving.routed_lm.RoutedLM`
because it is about the process, not the model: a no-op off Linux and where libc is not glibc (musl).
"""

from __future__ import annotations

import ctypes
import gc
import sys
import threading

__all__ = ["return_freed_memory"]


def return_freed_memory() -> None:
    """Hands the heap that a closed LM's adapters, caches and worker thread freed back to the OS,
    a moment later (a finalizer runs before the garbage collector frees what the LM held). glibc
    keeps freed memory in its arenas (the worker thread has one of its own), so without this a
    process that builds and drops LLM objects grows by tens of MB each time, with nothing leaked.

    Returns at once: a daemon timer runs ``gc.collect()`` then ``malloc_trim(0)`` half a second
    later. Does nothing off Linux or where libc is not glibc (no ``malloc_trim``)."""
    if not sys.platform.startswith("linux"):
        return
    try:
        trim = ctypes.CDLL("libc.so.6").malloc_trim
    except (OSError, AttributeError):  # not glibc (musl): nothing to do
        return

    def collect_and_trim() -> None:
        gc.collect()  # what the LM held in reference cycles (router, index client) goes first
        trim(0)

    timer = threading.Timer(0.5, collect_and_trim)
    timer.daemon = True
    timer.start()
