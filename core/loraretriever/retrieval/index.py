"""The Chroma index of adapter card vectors: embedded, in-memory or a shared ``chroma run`` server.

Vectors are unit length and compared by cosine similarity: the collection uses Chroma's
``cosine`` space (distance ``1 - cos``), chosen on purpose so that the similarities the router
reports are plain cosines in [-1, 1] and thresholds (``min_similarity``) mean the same for every
embedder. Chroma's default embedding function is never used (it would download a model): every
vector comes from :class:`loraretriever.retrieval.embedder.Embedder`, and the collection is created and
opened with ``embedding_function=None``.

The embedder's name, dimension and instruction are recorded in the collection's metadata; opening
an index built by another embedder is an error whose fix is ``loraretriever reindex``.

The index holds nothing that the cards do not: an embedded index that is corrupt when opened is set
aside (``.<dir>.corrupt``) and opened empty, and one deleted, replaced or corrupted under a running
process is reopened by :meth:`LoraIndex.repair`; the router then fills it again from the cards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import sqlite3
import uuid
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from filelock import FileLock, Timeout

from loraretriever.errors import UnavailableError
from loraretriever.retrieval.cards import AdapterCard, RetrievalError
from loraretriever.retrieval.filters import BUILTIN_KEYS, chroma_where

__all__ = [
    "DEFAULT_COLLECTION",
    "DISTANCE",
    "ChromaError",
    "LoraIndex",
    "claim_embedded_index",
    "forget_embedded_client",
    "index_damage",
    "open_chroma_client",
    "set_aside_index",
    "throwaway_collection_name",
]

logger = logging.getLogger(__name__)

DEFAULT_COLLECTION = "loraretriever-adapters"
DISTANCE = "cosine"
INDEX_FORMAT = 1
_CHUNK = 2048  # rows per Chroma write; stays under its max batch size
_CLAIMED: dict[Path, FileLock] = {}  # embedded index directories this process holds


class ChromaError(RetrievalError, UnavailableError):
    """Chroma itself failed under an index operation (a broken database, a server that is down),
    as opposed to a bad request (a 503); an embedded index can be repaired from the cards."""

    status = 503


def open_chroma_client(
    path: str | Path | None = None,
    *,
    host: str | None = None,
    port: int = 8000,
    ephemeral: bool = False,
    create: bool = True,
    discard_corrupt: bool = False,
) -> Any:
    """A Chroma client: ``PersistentClient(path)``, ``HttpClient(host, port)`` or ``EphemeralClient()``.

    Args:
        path: The directory of an embedded, on-disk index.
        host: The host of a shared server started with ``chroma run --path DIR --port PORT``.
        port: That server's port.
        ephemeral: An in-memory index (tests, throwaway evaluations).
        create: For ``path``: create the directory if it is missing (else it is an error).
        discard_corrupt: For ``path``: set a corrupt index aside (to ``.<dir>.corrupt`` beside it,
            replacing an earlier one) and open an empty one, for a caller that refills it from cards.

    Raises:
        RetrievalError: a path that is a file, a missing directory with ``create=False``, a corrupt
            index (without ``discard_corrupt``), or a server that does not answer.
    """
    import chromadb
    from chromadb.config import Settings

    chosen = sum([path is not None, host is not None, ephemeral])
    if chosen != 1:
        raise RetrievalError(
            f"choose exactly one Chroma index: path= (embedded), host= (server) or ephemeral=True; got "
            f"path={path!r}, host={host!r}, ephemeral={ephemeral!r}."
        )
    settings = Settings(anonymized_telemetry=False, allow_reset=False)
    if ephemeral:
        return chromadb.EphemeralClient(settings=settings)
    if host is not None:
        try:
            client = chromadb.HttpClient(host=host, port=int(port), settings=settings)
            client.heartbeat()
        except Exception as err:  # connection refused, timeouts, bad responses
            raise RetrievalError(
                f"the Chroma server at {host}:{port} does not answer ({type(err).__name__}: {err}). Fix: start "
                f"it with `chroma run --path DIR --host {host} --port {port}`, or check host and port."
            ) from err
        return client
    directory = Path(path).expanduser()
    if directory.exists() and not directory.is_dir():
        raise RetrievalError(f"index path {str(directory)!r} is a file, not a directory. Fix: pass a directory.")
    if not directory.exists():
        if not create:
            raise RetrievalError(
                f"index directory {str(directory)!r} does not exist. Fix: check the path, or rebuild it from "
                "the cards with `loraretriever reindex`."
            )
        directory.mkdir(parents=True, exist_ok=True)
    claim_embedded_index(directory)
    if not (directory / "chroma.sqlite3").exists():  # deleted under this process: not its cached copy
        forget_embedded_client(directory)
    try:
        client = chromadb.PersistentClient(path=str(directory), settings=settings)
        client.heartbeat()
        client.list_collections()
    except Exception as err:
        if discard_corrupt:
            logger.warning(
                "the index %s is corrupt (%s: %s); it is set aside and rebuilt from the cards",
                directory,
                type(err).__name__,
                err,
            )
            set_aside_index(directory)
            return open_chroma_client(directory, create=True)
        raise RetrievalError(
            f"the index directory {str(directory)!r} could not be opened; it looks corrupt "
            f"({type(err).__name__}: {err}). Fix: delete the directory and run `loraretriever reindex` "
            "(the index is rebuilt from the cards, which are the source of truth)."
        ) from err
    return client


def forget_embedded_client(directory: str | Path) -> None:
    """Drops Chroma's in-process cache of the embedded index at ``directory``.

    Chroma keeps one "system" per path for the life of the process, holding the open database and
    the vectors in memory; a new client for the same path would reuse it even after the files
    were deleted or replaced. Stopping and forgetting it makes the next client read the directory.
    """
    # Private API of chromadb 1.5 (SharedSystemClient's class-level caches); checked in tests.
    from chromadb.api.shared_system_client import SharedSystemClient

    for key in {str(directory), str(Path(directory).expanduser())}:
        system = SharedSystemClient._identifier_to_system.pop(key, None)
        SharedSystemClient._identifier_to_refcount.pop(key, None)
        if system is not None:
            with contextlib.suppress(Exception):  # a broken database may fail to close cleanly
                system.stop()


def set_aside_index(directory: Path) -> None:
    """Moves an embedded index to ``.<dir>.corrupt`` beside it (replacing an earlier one) and
    leaves an empty directory, which the next open fills again from the cards."""
    forget_embedded_client(directory)
    aside = directory.with_name(f".{directory.name}.corrupt")
    if aside.exists():
        shutil.rmtree(aside)
    directory.rename(aside)
    directory.mkdir()


def index_damage(directory: str | Path) -> str | None:
    """Why the embedded index at ``directory`` cannot be read, or None when its database passes
    SQLite's own check (read-only: safe beside a process that has it open). A missing index is
    not damage: the next open builds it."""
    database = Path(directory).expanduser() / "chroma.sqlite3"
    if not database.is_file():
        return None
    try:
        with contextlib.closing(sqlite3.connect(f"file:{database}?mode=ro", uri=True)) as connection:
            verdict = [row[0] for row in connection.execute("PRAGMA quick_check")]
    except sqlite3.Error as err:
        return f"{database} is not a readable database ({err})"
    return None if verdict == ["ok"] else f"{database} fails SQLite's check: {'; '.join(verdict[:3])}"


def _database_identity(directory: Path) -> tuple[int, int] | None:
    try:
        stat = os.stat(directory / "chroma.sqlite3")
    except OSError:
        return None
    return stat.st_dev, stat.st_ino


def claim_embedded_index(directory: Path) -> None:
    """Claims an embedded index for this process, for as long as it lives.

    Chroma's embedded index serves one process: each process caches the vectors in memory, so a
    second one would route on a stale index and write over the first one's changes. Processes that
    share a pool share its index through a Chroma server instead (``chroma run``).

    Raises:
        RetrievalError: another process holds it, naming the fix.
    """
    key = directory.resolve()
    if key in _CLAIMED:
        return
    lock = FileLock(key.parent / f".{key.name}.lock", timeout=0, thread_local=False)
    try:
        lock.acquire()
    except Timeout:
        raise RetrievalError(
            f"the index {str(directory)!r} is open in another process, and Chroma's embedded index serves one "
            f"process. Fix: share it through a Chroma server (`chroma run --path {directory}`, then "
            "chroma_host= / --chroma-host), or stop the other process."
        ) from None
    _CLAIMED[key] = lock


class LoraIndex:
    """One Chroma collection of card vectors (id = adapter name), for one embedder.

    Args:
        client: From :func:`open_chroma_client`.
        embedder_name: :attr:`Embedder.name`; recorded on creation, checked on open.
        dim: The vector dimension; recorded and checked likewise.
        instruction: The embedder's instruction prefix; recorded and checked likewise.
        collection: The collection name (several pools can share one server).
        where: Describes the index in error messages.
        directory: The directory of an embedded index, which makes it repairable (:meth:`repair`).

    Raises:
        RetrievalError: the collection was built by another embedder (fix: ``reindex``), or Chroma failed.

    Example:
        >>> index = LoraIndex(open_chroma_client(ephemeral=True), embedder_name="toy", dim=2,
        ...                   collection="doctest-index")
        >>> index.upsert([AdapterCard("a", ["x"]), AdapterCard("b", ["y"])], np.eye(2, dtype=np.float32))
        >>> [(name, round(sim, 3)) for name, sim in index.query(np.array([[0.8, 0.6]]), 2)[0]]
        [('a', 0.8), ('b', 0.6)]
        >>> index.drop()
    """

    def __init__(
        self,
        client: Any,
        *,
        embedder_name: str,
        dim: int,
        instruction: str = "",
        collection: str = DEFAULT_COLLECTION,
        where: str | None = None,
        directory: str | Path | None = None,
    ) -> None:
        self.client = client
        self.directory = None if directory is None else Path(directory).expanduser()
        self.embedder_name = embedder_name
        self.dim = int(dim)
        self.instruction = instruction
        self.collection_name = collection
        self.where = where or f"Chroma collection {collection!r}"
        self._known_keys: set[str] | None = None
        self._collection = self._open_collection()
        self._identity = None if self.directory is None else _database_identity(self.directory)

    # -- opening -----------------------------------------------------------------------------
    def _expected_metadata(self) -> dict[str, Any]:
        return {
            "embedder": self.embedder_name,
            "embedder_dim": self.dim,
            "instruction": self.instruction,
            "distance": DISTANCE,
            "format": INDEX_FORMAT,
        }

    def _open_collection(self) -> Any:
        with self._chroma("open the collection"):
            collection = self.client.get_or_create_collection(
                self.collection_name,
                embedding_function=None,  # never Chroma's default (it downloads a model)
                configuration={"hnsw": {"space": DISTANCE}},
                metadata=self._expected_metadata(),
            )
        meta = dict(collection.metadata or {})
        recorded = (meta.get("embedder"), meta.get("embedder_dim"), meta.get("instruction", ""))
        expected = (self.embedder_name, self.dim, self.instruction)
        if recorded != expected:
            raise RetrievalError(
                f"{self.where} was built with embedder {recorded[0]!r} (dim {recorded[1]}, instruction "
                f"{recorded[2]!r}), but this router uses {expected[0]!r} (dim {expected[1]}, instruction "
                f"{expected[2]!r}); their vectors cannot be compared. Fix: run `loraretriever reindex` (or "
                "Router.reindex()) to rebuild the index with this embedder, or use the embedder it was built with."
            )
        space = ((collection.configuration or {}).get("hnsw") or {}).get("space", meta.get("hnsw:space"))
        if space not in (None, DISTANCE):
            raise RetrievalError(
                f"{self.where} uses distance {space!r}, not {DISTANCE!r}. Fix: `loraretriever reindex` rebuilds it."
            )
        return collection

    @contextlib.contextmanager
    def _chroma(self, action: str) -> Iterator[None]:
        """Turns Chroma's and the transport's exceptions into a RetrievalError naming the index."""
        try:
            yield
        except RetrievalError:
            raise
        except Exception as err:
            raise ChromaError(
                f"could not {action} in {self.where} ({type(err).__name__}: {err}). Fix: check that the "
                "index directory is intact or the Chroma server is running; `loraretriever reindex` rebuilds "
                "the index from the cards."
            ) from err

    # -- reading -----------------------------------------------------------------------------
    def count(self) -> int:
        with self._chroma("count adapters"):
            return int(self._collection.count())

    def digests(self) -> dict[str, str]:
        """Adapter name -> the digest of the card its vector was built from."""
        out: dict[str, str] = {}
        keys: set[str] = set(BUILTIN_KEYS)
        with self._chroma("list adapters"):
            total = self._collection.count()
            for offset in range(0, total, _CHUNK):
                page = self._collection.get(include=["metadatas"], limit=_CHUNK, offset=offset)
                for name, meta in zip(page["ids"], page["metadatas"], strict=True):
                    out[name] = (meta or {}).get("card_digest", "")
                    keys.update(meta or {})
        self._known_keys = keys - {"card_digest"}
        return out

    def names(self) -> set[str]:
        return set(self.digests())

    def known_filter_keys(self, refresh: bool = False) -> set[str]:
        """Metadata keys a filter may name: ``name``, ``domain`` and ``tag.<key>`` of indexed cards."""
        if self._known_keys is None or refresh:
            self.digests()
        return set(self._known_keys or BUILTIN_KEYS)

    def query(
        self, vectors: np.ndarray, k: int, *, where: Mapping[str, Any] | None = None
    ) -> list[list[tuple[str, float]]]:
        """The ``k`` nearest adapters of each vector as ``(name, cosine similarity)``, best first.

        ``where`` is a Chroma filter over the flat card metadata (see :meth:`chroma_where`).
        """
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.ndim != 2 or vectors.shape[1] != self.dim:
            raise RetrievalError(f"query vectors have shape {vectors.shape}; expected (n, {self.dim}).")
        if len(vectors) == 0 or k < 1:
            return [[] for _ in range(len(vectors))]
        with self._chroma("query"):
            result = self._collection.query(
                query_embeddings=vectors, n_results=int(k), where=dict(where) if where else None, include=["distances"]
            )
        return [
            [(name, 1.0 - float(distance)) for name, distance in zip(ids, distances, strict=True)]
            for ids, distances in zip(result["ids"], result["distances"], strict=True)
        ]

    # -- changing ----------------------------------------------------------------------------
    def upsert(self, cards: Sequence[AdapterCard], vectors: np.ndarray) -> None:
        """Adds or replaces the vectors of ``cards`` (row ``i`` of ``vectors`` is card ``i``'s)."""
        vectors = np.asarray(vectors, dtype=np.float32)
        if vectors.shape != (len(cards), self.dim):
            raise RetrievalError(
                f"{len(cards)} cards need vectors of shape ({len(cards)}, {self.dim}), not {vectors.shape}."
            )
        with self._chroma("write adapters"):
            for start in range(0, len(cards), _CHUNK):
                chunk = cards[start : start + _CHUNK]
                self._collection.upsert(
                    ids=[card.name for card in chunk],
                    embeddings=vectors[start : start + _CHUNK],
                    metadatas=[card.metadata() for card in chunk],
                )
        if self._known_keys is not None:
            for card in cards:
                self._known_keys.update(set(card.metadata()) - {"card_digest"})

    def delete(self, names: Sequence[str]) -> None:
        """Removes adapters from the index (names not in it are ignored)."""
        names = list(names)
        with self._chroma("delete adapters"):
            for start in range(0, len(names), _CHUNK):
                self._collection.delete(ids=names[start : start + _CHUNK])

    def drop(self) -> None:
        """Deletes the whole collection (a later use of this object is an error)."""
        with self._chroma("delete the collection"):
            self.client.delete_collection(self.collection_name)

    def rebuild(self) -> None:
        """Drops the collection and creates it again, empty, for the current embedder."""
        with self._chroma("delete the collection"), contextlib.suppress(ValueError, KeyError):
            if self.collection_name in {c if isinstance(c, str) else c.name for c in self.client.list_collections()}:
                self.client.delete_collection(self.collection_name)
        self._known_keys = None
        self._collection = self._open_collection()

    # -- repair ------------------------------------------------------------------------------
    def changed_on_disk(self) -> bool:
        """An embedded index whose database file was deleted or replaced since it was opened
        (one ``stat``; always False for a server or in-memory index)."""
        return self.directory is not None and _database_identity(self.directory) != self._identity

    def repair(self) -> None:
        """Reopens an embedded index from its directory, after its files were deleted, replaced or
        corrupted under this process; an unreadable one is set aside and opened empty (the caller
        refills it from the cards).

        Raises:
            RetrievalError: the index is not an embedded one (a server's is repaired on the server).
        """
        if self.directory is None:
            raise RetrievalError(f"{self.where} is not an embedded index; repair it where it is served.")
        forget_embedded_client(self.directory)
        self.client = open_chroma_client(self.directory, discard_corrupt=True)
        self._known_keys = None
        self._collection = self._open_collection()
        self._identity = _database_identity(self.directory)
        logger.warning("the index %s was reopened after a change on disk", self.directory)

    # -- filters -----------------------------------------------------------------------------
    def chroma_where(self, filter: Mapping[str, Any] | None) -> dict[str, Any] | None:
        """A user filter as Chroma's ``where`` over this index's card metadata (see :func:`chroma_where`).

        Example:
            >>> index = LoraIndex(open_chroma_client(ephemeral=True), embedder_name="toy", dim=2,
            ...                   collection="doctest-where")
            >>> index.upsert([AdapterCard("a", ["x"], tags={"customer": "a"})], np.eye(2)[:1])
            >>> index.chroma_where({"customer": "a", "domain": {"$in": ["nli"]}})
            {'$and': [{'tag.customer': 'a'}, {'domain': {'$in': ['nli']}}]}
            >>> index.drop()
        """
        return chroma_where(filter, self.known_filter_keys)


def throwaway_collection_name(prefix: str = "loraretriever-tmp") -> str:
    """A unique collection name, for indexes that are dropped after use."""
    return f"{prefix}-{uuid.uuid4().hex[:12]}"
