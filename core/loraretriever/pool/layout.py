"""Every path of a pool directory, named once: no other module spells one.

::

    POOL_DIR/
      pool.json                  the manifest (base model, embedder, prompt format)
      adapters/<name>/           PEFT's own files: adapter_config.json, adapter_model.safetensors
      cards/<name>.json          what the router knows of each adapter (the source of truth of the index)
      index/                     Chroma, a cache of the cards
      gates/<name>/              LoRA-Flow and MeteoRA gates
      confidence.json            the routing confidence fitted by `loraretriever calibrate`
      quarantine/<name>/         a damaged entry's files and reason.txt
      .generation, .pool.lock    changes across processes
      .intents/<name>.json       a change under way
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

__all__ = ["MANIFEST_FILE", "PoolLayout"]

MANIFEST_FILE = "pool.json"


@dataclass(frozen=True)
class PoolLayout:
    """The paths of the pool directory ``root``.

    Example:
        >>> PoolLayout("/srv/pool").card("sst2")
        PosixPath('/srv/pool/cards/sst2.json')
    """

    root: Path

    def __init__(self, root: str | Path) -> None:
        object.__setattr__(self, "root", Path(root).expanduser())

    @property
    def manifest(self) -> Path:
        return self.root / MANIFEST_FILE

    @property
    def adapters(self) -> Path:
        return self.root / "adapters"

    @property
    def cards(self) -> Path:
        return self.root / "cards"

    @property
    def index(self) -> Path:
        return self.root / "index"

    @property
    def gates(self) -> Path:
        return self.root / "gates"

    @property
    def confidence(self) -> Path:
        return self.root / "confidence.json"

    @property
    def quarantine(self) -> Path:
        return self.root / "quarantine"

    @property
    def generation(self) -> Path:
        return self.root / ".generation"

    @property
    def lock(self) -> Path:
        return self.root / ".pool.lock"

    @property
    def intents(self) -> Path:
        return self.root / ".intents"

    def adapter(self, name: str) -> Path:
        return self.adapters / name

    def card(self, name: str) -> Path:
        return self.cards / f"{name}.json"

    def intent(self, name: str) -> Path:
        return self.intents / f"{name}.json"
