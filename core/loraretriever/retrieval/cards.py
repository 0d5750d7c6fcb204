"""Adapter cards: what a retriever knows about each LoRA, and their store on disk.

A card holds an adapter's name, sample inputs (at least one; the paper uses 20) and optional
description, domain and string tags (``{"customer": "a"}``). The :class:`CardStore` keeps one JSON
file per card under a pool directory; it is the source of truth the Chroma index is rebuilt from.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import logging
import os
import re
import tempfile
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from loraretriever.errors import InvalidOptionError, NotFoundError
from loraretriever.pool.adapter import AdapterError, check_adapter_name
from loraretriever.pool.home import with_umask
from loraretriever.pool.layout import PoolLayout

logger = logging.getLogger(__name__)

__all__ = [
    "MAX_CARD_SAMPLES",
    "MAX_SAMPLE_CHARS",
    "AdapterCard",
    "CardStore",
    "RetrievalError",
    "check_task_names",
    "load_paper_cards",
    "read_json",
]

# A card's size is bounded by cutting, never by refusing real data (an email of 14,369 characters
# is one sample of the paper's aeslc task): the embedder reads only a sample's first few hundred tokens.
MAX_CARD_SAMPLES = 256  # the first ones are kept: embedding them all keeps adding a card to seconds on a CPU
MAX_SAMPLE_CHARS = 8_000  # a longer sample is cut to its first MAX_SAMPLE_CHARS characters

_TAG_KEY = re.compile(r"^[A-Za-z][A-Za-z0-9_\-]{0,63}$")
RESERVED_TAG_KEYS = frozenset({"name", "domain", "card_digest"})


class RetrievalError(InvalidOptionError):
    """Bad retrieval input or state (cards, filters, index). The message names the value and the fix."""


@dataclass(frozen=True)
class AdapterCard:
    """What the retriever knows about one adapter.

    Example:
        >>> card = AdapterCard("sst2", ["great movie!", "a dull plot"], domain="sentiment", tags={"customer": "a"})
        >>> card.metadata()["tag.customer"], len(card.samples)
        ('a', 2)
        >>> AdapterCard("sst2", [])  # doctest: +IGNORE_EXCEPTION_DETAIL
        Traceback (most recent call last):
        ...
        loraretriever.retrieval.cards.RetrievalError: card 'sst2' has no samples; a card needs at least one sample input (the paper uses 20).
    """

    name: str = field(metadata={"help": "The adapter's name in the pool."})
    samples: tuple[str, ...] = field(metadata={"help": "Sample inputs of the adapter's task (>= 1)."})
    description: str | None = field(default=None, metadata={"help": "Free text, shown to people, not embedded."})
    domain: str | None = field(default=None, metadata={"help": "Task family, e.g. 'sentiment'; filterable."})
    tags: dict[str, str] = field(default_factory=dict, metadata={"help": "String labels; filterable by key."})

    def __post_init__(self) -> None:
        try:
            check_adapter_name(self.name)
        except AdapterError as err:
            raise RetrievalError(f"card name: {err}") from None
        if isinstance(self.samples, str):
            raise RetrievalError(f"card {self.name!r}: samples must be a list of strings, not one string.")
        if not isinstance(self.samples, Sequence):  # None, a number or a mapping from a hand-edited card file
            raise RetrievalError(
                f"card {self.name!r}: samples must be a list of strings, not {type(self.samples).__name__} "
                f"({self.samples!r:.60})."
            )
        samples = tuple(self.samples)
        if not samples:
            raise RetrievalError(
                f"card {self.name!r} has no samples; a card needs at least one sample input (the paper uses 20)."
            )
        if len(samples) > MAX_CARD_SAMPLES:
            logger.warning(
                "card %r has %d samples; keeping the first %d (every sample is embedded when the card is added; "
                "the paper uses 20)",
                self.name,
                len(samples),
                MAX_CARD_SAMPLES,
            )
            samples = samples[:MAX_CARD_SAMPLES]
        for i, sample in enumerate(samples):
            if not isinstance(sample, str) or not sample.strip():
                raise RetrievalError(f"card {self.name!r}: sample {i} ({sample!r:.60}) must be a non-empty string.")
        long = [i for i, sample in enumerate(samples) if len(sample) > MAX_SAMPLE_CHARS]
        if long:
            logger.warning(
                "card %r: cut %d sample(s) over %s characters (the longest %s) to their first %s; the embedder "
                "reads only the first few hundred tokens",
                self.name,
                len(long),
                f"{MAX_SAMPLE_CHARS:,}",
                f"{max(len(samples[i]) for i in long):,}",
                f"{MAX_SAMPLE_CHARS:,}",
            )
            samples = tuple(sample[:MAX_SAMPLE_CHARS] for sample in samples)
        object.__setattr__(self, "samples", samples)
        for attr in ("description", "domain"):
            value = getattr(self, attr)
            if value is not None and not isinstance(value, str):
                raise RetrievalError(f"card {self.name!r}: {attr}={value!r} must be a string or None.")
        if not isinstance(self.tags, Mapping):
            raise RetrievalError(f"card {self.name!r}: tags={self.tags!r} must be a dict of strings.")
        for key, value in self.tags.items():
            if not isinstance(key, str) or not _TAG_KEY.match(key) or key in RESERVED_TAG_KEYS:
                raise RetrievalError(
                    f"card {self.name!r}: tag key {key!r} is not allowed: use a letter then letters, digits, "
                    f"'_' or '-' (at most 64), and none of {sorted(RESERVED_TAG_KEYS)}."
                )
            if not isinstance(value, str):
                raise RetrievalError(f"card {self.name!r}: tag {key!r}={value!r} must be a string.")
        object.__setattr__(self, "tags", dict(sorted(self.tags.items())))

    @functools.cached_property
    def digest(self) -> str:
        """A hash of the whole card; the index re-reads a card whose digest changed."""
        return hashlib.sha256(json.dumps(self.to_dict(), sort_keys=True).encode()).hexdigest()[:16]

    def metadata(self) -> dict[str, str]:
        """Flat metadata for the index: ``name``, ``domain``, ``tag.<key>`` and the card digest."""
        meta = {"name": self.name, "card_digest": self.digest}
        if self.domain is not None:
            meta["domain"] = self.domain
        meta.update({f"tag.{key}": value for key, value in self.tags.items()})
        return meta

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "description": self.description,
            "domain": self.domain,
            "tags": dict(self.tags),
            "samples": list(self.samples),
        }

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> AdapterCard:
        """Reads :meth:`to_dict`'s format, or the paper's ``{"model_name", "sample": [{"inputs"}]}``."""
        if not isinstance(data, Mapping):
            raise RetrievalError(f"a card must be a JSON object, not {type(data).__name__}: {data!r:.80}.")
        if "model_name" in data and "name" not in data:
            return cls(
                name=data["model_name"],
                samples=tuple(_paper_inputs(data.get("sample"), data["model_name"])),
                domain=data.get("domain"),
            )
        unknown = set(data) - {"name", "description", "domain", "tags", "samples"}
        if unknown:
            raise RetrievalError(
                f"card {data.get('name')!r} has unknown fields {sorted(unknown)}; expected name, samples, "
                "description, domain, tags."
            )
        if "name" not in data or "samples" not in data:
            raise RetrievalError(f"card {data!r:.80} needs 'name' and 'samples'.")
        return cls(
            name=data["name"],
            samples=tuple(data["samples"]) if isinstance(data["samples"], list) else data["samples"],
            description=data.get("description"),
            domain=data.get("domain"),
            tags=data.get("tags") or {},
        )


def _paper_inputs(samples: Any, name: str) -> list[str]:
    if not isinstance(samples, list):
        raise RetrievalError(f"card {name!r}: 'sample' must be a list of {{'inputs': ...}} objects.")
    out = []
    for i, sample in enumerate(samples):
        if not isinstance(sample, Mapping) or "inputs" not in sample:
            raise RetrievalError(f"card {name!r}: sample {i} ({sample!r:.60}) has no 'inputs'.")
        out.append(sample["inputs"])
    return out


def read_json(path: str | Path, what: str) -> Any:
    path = Path(path)
    if not path.is_file():
        raise RetrievalError(f"{what} file {str(path)!r} does not exist.")
    try:
        return json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise RetrievalError(f"{what} file {str(path)!r} is not valid JSON ({err}).") from err


def check_task_names(tasks: Iterable[str], cards: Sequence[AdapterCard]) -> set[str]:
    """``tasks`` as a set, once every name is known to have a card.

    Raises:
        RetrievalError: names without a card (a typo in a tasks file would silently drop a task).
    """
    wanted = set(tasks)
    names = {card.name for card in cards}
    unknown = sorted(wanted - names)
    if unknown:
        raise RetrievalError(f"tasks {unknown[:5]} have no card; the cards are {sorted(names)[:5]}...")
    return wanted


def load_paper_cards(path: str | Path) -> list[AdapterCard]:
    """Reads cards from a JSON list in the paper's format (``lora_samples.json``) or ours, or from a
    pool (``POOL/cards``) or card directory.

    Example:
        >>> cards = load_paper_cards("../shared/data/loraretriever-flan48/lora_samples.json")  # doctest: +SKIP
        >>> len(cards), len(cards[0].samples)  # doctest: +SKIP
        (48, 20)
        >>> len(load_paper_cards("pools/bigbench"))  # doctest: +SKIP
        29
    """
    path = Path(path)
    if path.is_dir():
        cards_dir = PoolLayout(path).cards
        store = CardStore(cards_dir if cards_dir.is_dir() else path, create=False)
        cards = store.all()
        if not cards:
            raise RetrievalError(f"directory {str(path)!r} holds no cards (<name>.json, or a pool's cards/).")
        return cards
    data = read_json(path, "cards")
    if not isinstance(data, list):
        raise RetrievalError(f"cards file {str(path)!r} must hold a JSON list of cards, not {type(data).__name__}.")
    cards = [AdapterCard.from_dict(item) for item in data]
    seen: set[str] = set()
    for card in cards:
        if card.name in seen:
            raise RetrievalError(f"cards file {str(path)!r} has two cards named {card.name!r}.")
        seen.add(card.name)
    return cards


class CardStore:
    """Cards as JSON files, ``DIRECTORY/<name>.json``, written atomically (temp file + rename).

    ``CardStore(None)`` keeps the cards in memory instead (throwaway evaluations, tests).

    Example:
        >>> store = CardStore(None)
        >>> store.put(AdapterCard("sst2", ["great movie!"]))
        >>> store.names, "sst2" in store
        (['sst2'], True)
    """

    def __init__(self, directory: str | Path | None, *, create: bool = True) -> None:
        self.directory = None if directory is None else Path(directory).expanduser()
        self._memory: dict[str, AdapterCard] | None = {} if directory is None else None
        self._listing: tuple[int, list[str]] | None = None  # (directory mtime, names): saves a listing per route
        # name -> (the file's stat signature, its card): a file is parsed once until it changes
        self._parsed: dict[str, tuple[tuple[int, int, int], AdapterCard]] = {}
        if self.directory is None:
            return
        if self.directory.exists() and not self.directory.is_dir():
            raise RetrievalError(f"card directory {str(self.directory)!r} is a file, not a directory.")
        if not self.directory.exists():
            if not create:
                raise RetrievalError(
                    f"card directory {str(self.directory)!r} does not exist. Fix: check the pool directory, "
                    "or create it by registering a card."
                )
            self.directory.mkdir(parents=True, exist_ok=True)

    def __repr__(self) -> str:
        where = "memory" if self.directory is None else str(self.directory)
        return f"CardStore({where!r}, {len(self)} cards)"

    def _path(self, name: str) -> Path:
        try:
            check_adapter_name(name)
        except AdapterError as err:
            raise RetrievalError(str(err)) from None
        assert self.directory is not None
        return self.directory / f"{name}.json"

    @property
    def names(self) -> list[str]:
        if self._memory is not None:
            return sorted(self._memory)
        assert self.directory is not None
        mtime = self.directory.stat().st_mtime_ns
        # Trust the cached listing only for a directory unchanged for a second (timestamp granularity).
        if self._listing is None or self._listing[0] != mtime or time.time_ns() - mtime < 1_000_000_000:
            names = sorted(p.stem for p in self.directory.glob("*.json") if not p.name.startswith("."))
            self._listing = (mtime, names)
        return list(self._listing[1])

    def __contains__(self, name: object) -> bool:
        if self._memory is not None:
            return name in self._memory
        assert self.directory is not None
        return isinstance(name, str) and (self.directory / f"{name}.json").is_file()

    def __len__(self) -> int:
        return len(self.names)

    def __iter__(self) -> Iterator[AdapterCard]:
        return iter(self.all())

    def get(self, name: str) -> AdapterCard:
        if self._memory is not None:
            if name not in self._memory:
                raise NotFoundError(f"no card named {name!r} (there are {len(self._memory)}).", param="name")
            return self._memory[name]
        path = self._path(name)
        try:
            stat = path.stat()
        except OSError:
            stat = None
        if stat is None or not path.is_file():
            self._parsed.pop(name, None)
            raise NotFoundError(
                f"no card named {name!r} in {str(self.directory)!r} (it has {len(self)}).", param="name"
            )
        # Writes replace the file (a new inode), so inode, size and mtime tell a changed card.
        signature = (stat.st_ino, stat.st_size, stat.st_mtime_ns)
        cached = self._parsed.get(name)
        if cached is not None and cached[0] == signature:
            return cached[1]
        card = AdapterCard.from_dict(read_json(path, "card"))
        if card.name != name:
            raise RetrievalError(f"card file {str(path)!r} holds a card named {card.name!r}; rename one of them.")
        self._parsed[name] = (signature, card)
        return card

    def all(self) -> list[AdapterCard]:
        return [self.get(name) for name in self.names]

    def put(self, card: AdapterCard) -> None:
        """Writes (or replaces) a card; readers never see a half-written file."""
        if not isinstance(card, AdapterCard):
            raise RetrievalError(f"expected an AdapterCard, got {type(card).__name__}.")
        if self._memory is not None:
            self._memory[card.name] = card
            return
        path = self._path(card.name)
        fd, tmp = tempfile.mkstemp(prefix=f".{card.name}.", suffix=".tmp", dir=self.directory)
        try:
            with os.fdopen(fd, "w") as handle:
                json.dump(card.to_dict(), handle, indent=1, ensure_ascii=False)
                handle.flush()
                os.fsync(handle.fileno())
            with_umask(tmp)
            os.replace(tmp, path)
            self._listing = None
        except BaseException:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise

    def put_all(self, cards: Sequence[AdapterCard]) -> None:
        for card in cards:
            self.put(card)

    def remove(self, name: str) -> None:
        """Deletes a card; ``KeyError`` if there is none of that name."""
        if self._memory is not None:
            if name not in self._memory:
                raise NotFoundError(f"no card named {name!r}.", param="name")
            del self._memory[name]
            return
        path = self._path(name)
        if not path.is_file():
            raise NotFoundError(f"no card named {name!r} in {str(self.directory)!r}.", param="name")
        path.unlink()
        self._listing = None
        self._parsed.pop(name, None)
