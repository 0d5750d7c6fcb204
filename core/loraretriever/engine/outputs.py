"""Tokens to text, off the step thread: incremental detokenisation, stop strings, the final
:class:`~loraretriever.engine.requests.Completion`, and the callers' callbacks.

The step thread only samples tokens and ends a request at EOS or ``max_new_tokens``
(:meth:`RequestState.append_token <loraretriever.engine.requests.RequestState.append_token>`),
then posts each step's tokens here. Inline (the default, :meth:`Engine.run
<loraretriever.engine.engine.Engine.run>`) they are turned into text at once; once
:meth:`OutputProcessor.start` ran (the engine's worker thread does it) a thread of its own does
it, as vLLM's frontend detokenises apart from its engine core, so callers' callbacks and
per-row Python never lengthen a step. A stop string found in the text marks the request
``stopped``; the engine drops its row at its next step (tokens it sampled meanwhile are not part of
the text or of ``completion_tokens``). Events and errors of a request reach its callbacks in the
order they were produced.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from loraretriever.engine.requests import Completion, FinishReason, RequestState, StreamEvent

__all__ = ["OutputProcessor", "TokenEvent"]

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class TokenEvent:
    """One row's result of one step: the token it kept (None for an EOS that ended it) and why it
    ended on the step thread, if it did."""

    state: RequestState
    token: int | None
    ended: FinishReason | None = None


@dataclass(frozen=True)
class _Error:
    state: RequestState
    error: BaseException


class OutputProcessor:
    """Turns the engine's tokens into text and events, inline or on a thread of its own.

    Args:
        tokenizer: The model's tokenizer.

    Example:
        >>> outputs = OutputProcessor(tokenizer)  # doctest: +SKIP
        >>> outputs.start()  # from now on, a thread detokenises  # doctest: +SKIP
    """

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self._queue: queue.SimpleQueue | None = None
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()

    @property
    def threaded(self) -> bool:
        return self._thread is not None

    def start(self) -> None:
        """Processes what is posted from now on on a thread of its own (idempotent)."""
        with self._lock:
            if self._thread is None or not self._thread.is_alive():
                self._queue = queue.SimpleQueue()
                self._thread = threading.Thread(target=self._loop, name="loraretriever-outputs", daemon=True)
                self._thread.start()

    def stop(self) -> None:
        """Processes what was posted, then goes back to processing inline."""
        with self._lock:
            thread, self._thread = self._thread, None
            if thread is not None:
                self._queue.put(None)
                if thread is not threading.current_thread():
                    thread.join(timeout=60)

    def drain(self) -> None:
        """Returns once everything posted so far has been processed."""
        if self._thread is None:
            return
        done = threading.Event()
        self._queue.put(done)
        done.wait()

    def post(self, events: Sequence[TokenEvent]) -> None:
        """One step's tokens (in row order)."""
        if self._thread is not None:
            self._queue.put(list(events))
        else:
            self._process(events)

    def post_error(self, state: RequestState, error: BaseException) -> None:
        """A request's failure, delivered after the events posted before it."""
        if self._thread is not None:
            self._queue.put([_Error(state, error)])
        else:
            self._process([_Error(state, error)])

    def _loop(self) -> None:
        while True:
            item = self._queue.get()
            if item is None:
                return
            if isinstance(item, threading.Event):
                item.set()
                continue
            self._process(item)

    def _process(self, items: Sequence[TokenEvent | _Error]) -> None:
        for item in items:
            state = item.state
            if isinstance(item, _Error):
                if state.on_error is not None and state.done is None:
                    _call(state, state.on_error, item.error)
                continue
            if state.done is not None:
                continue  # tokens sampled after a stop string
            try:
                event = self._advance(state, item)
            except Exception as error:  # detokenising this row failed: only this request
                logger.exception("turning request %d's tokens into text failed", state.index)
                state.stopped = True
                if state.error is None and state.done is None:
                    state.error = error
                    if state.on_error is not None:
                        _call(state, state.on_error, error)
                continue
            if event is not None and state.on_event is not None:
                _call(state, state.on_event, event)

    def _advance(self, state: RequestState, event: TokenEvent) -> StreamEvent | None:
        """Adds one token's text; returns the text that can be shown now, and the end if reached."""
        cfg = state.config
        finish, stop_sequence = event.ended, None
        if event.token is not None:
            state.detokenized += 1
            previous = len(state.text)
            state.text += _new_text(self.tokenizer, state)
            hit = _find_stop(state.text, cfg.stop, previous)
            if hit is not None:
                position, stop_sequence = hit
                state.text = state.text[:position]
                finish = "stop"
                state.stopped = True
                if state.finished_at is None:
                    state.finished_at = time.perf_counter()
        if finish is None:
            shown = state.text[: len(state.text) - _held_back(state.text, cfg.stop)]
            if len(shown) > len(state.emitted) and shown.startswith(state.emitted):
                delta = shown[len(state.emitted) :]
                state.emitted = shown
                return StreamEvent(state.index, delta)
            return None
        if stop_sequence is None:
            state.text += _new_text(self.tokenizer, state, flush=True)  # bytes of a character cut off at the end
        state.done = Completion(
            text=state.text,
            finish_reason=finish,
            prompt_tokens=len(state.prompt_ids),
            completion_tokens=state.detokenized,
            cached_tokens=state.cached_tokens,
            routing=state.routing,
            stop_sequence=stop_sequence,
            truncated_prompt=state.truncated,
        )
        delta = state.text[len(state.emitted) :]
        state.emitted = state.text
        return StreamEvent(state.index, delta, state.done)


def _call(state: RequestState, callback: Callable[[Any], None], value: Any) -> None:
    """A caller's callback; one that raises fails only its own request."""
    try:
        callback(value)
    except Exception as error:
        logger.warning("a callback of request %d raised", state.index, exc_info=True)
        state.stopped = True
        if state.error is None and state.on_error is not None and callback is not state.on_error:
            state.error = error
            try:
                state.on_error(error)
            except Exception:
                logger.exception("the error callback of request %d raised", state.index)


def _new_text(tokenizer: PreTrainedTokenizerBase, row: RequestState, flush: bool = False) -> str:
    """The text the newest tokens complete. Only a short window of ids is decoded (incremental
    detokenisation, as in TGI and vLLM), so a step costs the same at token 5 and token 500; a partial
    UTF-8 character waits for its remaining bytes unless ``flush``. Only ``ids[:detokenized]`` are
    read: the step thread may have appended more."""
    end = row.detokenized
    prefix = tokenizer.decode(row.ids[row.prefix_offset : row.read_offset], skip_special_tokens=True)
    full = tokenizer.decode(row.ids[row.prefix_offset : end], skip_special_tokens=True)
    if len(full) > len(prefix) and (flush or not full.endswith("\ufffd")):
        row.prefix_offset, row.read_offset = row.read_offset, end
        return full[len(prefix) :]
    return ""


def _find_stop(text: str, stops: tuple[str, ...], previous: int) -> tuple[int, str] | None:
    """The earliest stop string in ``text``; only looks where the newest token can have completed one."""
    best = None
    for stop in stops:
        position = text.find(stop, max(0, previous - len(stop) + 1))
        if position != -1 and (best is None or position < best[0]):
            best = (position, stop)
    return best


def _held_back(text: str, stops: tuple[str, ...]) -> int:
    """How many trailing characters to hold back: a possible stop-string start or a partial character."""
    hold = 1 if text.endswith("\ufffd") else 0
    for stop in stops:
        for size in range(min(len(stop) - 1, len(text)), 0, -1):
            if text.endswith(stop[:size]):
                hold = max(hold, size)
                break
    return hold
