"""Answers generated ahead, in one batch, for calls that will ask for them one at a time.

A framework's ``batch()`` (LangChain's) runs one ``invoke`` per input so that its callbacks,
tracing, caching and ``return_exceptions`` behave as it defines them. Generating inside each invoke
would lose the batch; so the batch's prompts are generated first as one call
(:meth:`Prefetched.generate`), each answer is kept under its prompt and call options, and each
invoke takes its own (:meth:`Prefetched.take`) instead of generating. The integration decides only
which inputs to prefetch (its cache may already hold some); the batching itself lives here.
"""

from __future__ import annotations

import json
import logging
import threading
from collections import deque
from collections.abc import Mapping, Sequence
from typing import Any

from loraretriever.engine.requests import Prompt
from loraretriever.serving.runner import Result

__all__ = ["Prefetched"]

logger = logging.getLogger(__name__)


class Prefetched:
    """Results generated ahead, each waiting for the one call with its prompt and options (a
    prompt sent twice in a batch waits twice, in order).

    Args:
        lm: Generates the batch (a :class:`~loraretriever.serving.routed_lm.RoutedLM`).

    Example:
        >>> ahead = Prefetched(lm)  # doctest: +SKIP
        >>> keys = ahead.generate(["Is 2 prime?", "Translate: cat"], {"max_new_tokens": 8})  # doctest: +SKIP
        >>> ahead.take("Is 2 prime?", {"max_new_tokens": 8}).text  # doctest: +SKIP
        'Yes.'
    """

    def __init__(self, lm: Any) -> None:
        self.lm = lm
        self._results: dict[str, deque[Result]] = {}
        self._lock = threading.Lock()

    def generate(self, prompts: Sequence[Prompt], call: Mapping[str, Any], group: int | None = None) -> list[str]:
        """Generates ``prompts`` with the call options ``call``, ``group`` at a time (default: all as
        one call), and keeps each answer for its call; returns their keys (for :meth:`drop`). A
        group that fails keeps nothing: each of its calls then generates alone and raises its own
        error, as it would have without a batch."""
        keys: list[str] = []
        group = group or len(prompts) or 1
        for start in range(0, len(prompts), group):
            chunk = list(prompts[start : start + group])
            try:
                results = self.lm.generate(chunk, **call)
            except Exception:
                logger.debug("a prefetched group of %d failed; its calls run alone", len(chunk), exc_info=True)
                continue
            with self._lock:
                for prompt, result in zip(chunk, results, strict=True):
                    key = _key(prompt, call)
                    self._results.setdefault(key, deque()).append(result)
                    keys.append(key)
        return keys

    def take(self, prompt: Prompt, call: Mapping[str, Any]) -> Result | None:
        """The answer kept for this prompt and options (once), or None."""
        return self._pop(_key(prompt, call))

    def drop(self, keys: Sequence[str]) -> None:
        """Forgets the answers of ``keys`` that no call took (e.g. served from a cache)."""
        for key in keys:
            self._pop(key)

    def _pop(self, key: str) -> Result | None:
        with self._lock:
            waiting = self._results.get(key)
            if not waiting:
                return None
            result = waiting.popleft()
            if not waiting:
                del self._results[key]
            return result


def _key(prompt: Prompt, call: Mapping[str, Any]) -> str:
    return json.dumps([prompt, call], sort_keys=True, default=str)
