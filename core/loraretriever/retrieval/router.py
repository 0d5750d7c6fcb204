"""The input-aware router: per prompt, the adapters whose cards are nearest, with weights.

:class:`Router` joins an :class:`~loraretriever.retrieval.embedder.Embedder`, a Chroma
:class:`~loraretriever.retrieval.index.LoraIndex` and a :class:`~loraretriever.retrieval.cards.CardStore`. It can
follow a live :class:`~loraretriever.pool.lora_pool.LoraPool` (adding or removing an adapter updates the
index at once) or work from cards alone (no base model needed, as in ``eval-retrieval``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from loraretriever.engine.routing import GATED_MODES, Routing
from loraretriever.errors import NotFoundError
from loraretriever.pool.layout import PoolLayout
from loraretriever.pool.manifest import read_manifest, update_manifest
from loraretriever.retrieval.candidates import fetch_size, make_routing, nearest
from loraretriever.retrieval.cards import AdapterCard, CardStore, RetrievalError
from loraretriever.retrieval.confidence import Confidence
from loraretriever.retrieval.embedder import Embedder
from loraretriever.retrieval.index import (
    DEFAULT_COLLECTION,
    ChromaError,
    LoraIndex,
    open_chroma_client,
    throwaway_collection_name,
)
from loraretriever.retrieval.options import RouteOptions

if TYPE_CHECKING:
    from loraretriever.pool.lora_pool import LoraPool

__all__ = ["Router"]

logger = logging.getLogger(__name__)
T = TypeVar("T")

_EMBED_CHUNK = 256  # cards embedded per pass when (re)indexing


class Router:
    """Routes prompts to adapters by the similarity of prompt and card embeddings.

    Args:
        embedder: Embeds prompts and cards.
        index: The Chroma index of card vectors (built with this embedder).
        store: The cards, the source of truth the index follows.
        pool: If given, only adapters in the pool are routable and new cards must name pool
            adapters (the index still holds every card: processes that share a pool share it).
        options: Routing defaults.
        reconcile: Bring the index in line with the cards now.
        confidence: The calibrated confidence of this pool and embedder, which
            ``uncertain='soup'`` / ``'base'`` need (:mod:`~loraretriever.retrieval.confidence`).

    Example:
        >>> router = Router.from_cards([AdapterCard("sst2", ["a great movie", "dull and boring"]),
        ...                             AdapterCard("wmt16_deen", ["Translate to English: Guten Tag"])])
        >>> [routing.adapters for routing in router.route(["what a fantastic film!"], top_k=1)]
        [('sst2',)]
        >>> router.close()
    """

    def __init__(
        self,
        embedder: Embedder,
        index: LoraIndex,
        store: CardStore,
        *,
        pool: LoraPool | None = None,
        options: RouteOptions | None = None,
        reconcile: bool = True,
        drop_index_on_close: bool = False,
        confidence: Confidence | None = None,
    ) -> None:
        if (index.embedder_name, index.dim) != (embedder.name, embedder.dim):
            raise RetrievalError(
                f"the index is for embedder {index.embedder_name!r} (dim {index.dim}) but the router's embedder is "
                f"{embedder.name!r} (dim {embedder.dim}). Fix: open the index with this embedder."
            )
        if confidence is not None and confidence.embedder != embedder.name:
            raise RetrievalError(
                f"the confidence calibration is for embedder {confidence.embedder!r}, not {embedder.name!r}; "
                "similarities of another embedder do not fit it. Fix: `loraretriever calibrate` again."
            )
        self.confidence = confidence
        self.embedder = embedder
        self.index = index
        self.store = store
        self.options = _retrieval_options(RouteOptions.coerce(options))
        self.pool: LoraPool | None = None
        self._stale = False
        self._drop_index_on_close = drop_index_on_close
        if pool is not None:
            self.attach(pool, reconcile=False)
        if reconcile:
            self.reconcile()

    # -- construction ------------------------------------------------------------------------
    @classmethod
    def open(
        cls,
        pool_dir: str | Path,
        *,
        embedder: Embedder | str | Path | None = None,
        chroma_path: str | Path | None = None,
        host: str | None = None,
        port: int = 8000,
        collection: str = DEFAULT_COLLECTION,
        pool: LoraPool | None = None,
        options: RouteOptions | None = None,
        reindex: bool = False,
        store: CardStore | None = None,
    ) -> Router:
        """Opens the router of a pool directory: cards in ``POOL_DIR/cards``, index in ``POOL_DIR/index``.

        Args:
            pool_dir: The pool's directory (created if missing).
            embedder: An :class:`Embedder`, or a model id / directory for one (default: all-MiniLM-L6-v2).
            chroma_path: Where the embedded index lives (default ``POOL_DIR/index``).
            host: Use the shared Chroma server at ``host:port`` instead (``chroma run --path DIR``).
            port: The server's port.
            collection: The collection name (one per pool on a shared server).
            pool: The live pool to follow, if any.
            options: Routing defaults.
            reindex: Drop and rebuild the index (after changing the embedder).
            store: The card store of ``POOL_DIR/cards``, if the caller already opened it (its
                parsed cards are reused).

        Raises:
            RetrievalError: a corrupt index, a server that is down, or an index built with another
                embedder (fix: ``reindex=True`` / ``loraretriever reindex``).
        """
        pool_dir = Path(pool_dir).expanduser()
        if pool_dir.exists() and not pool_dir.is_dir():
            raise RetrievalError(f"pool directory {str(pool_dir)!r} is a file, not a directory.")
        if store is None:
            store = CardStore(PoolLayout(pool_dir).cards)
        elif store.directory != PoolLayout(pool_dir).cards:
            raise RetrievalError(f"store= is {store!r}, not the card store of {str(pool_dir)!r}.")
        if not isinstance(embedder, Embedder):
            embedder = Embedder(embedder)
        if host is not None:
            client, where = open_chroma_client(host=host, port=port), f"Chroma server {host}:{port} ({collection!r})"
        else:
            path = Path(chroma_path) if chroma_path is not None else PoolLayout(pool_dir).index
            # The cards are the source of truth: a corrupt index is set aside and rebuilt from them.
            client, where = open_chroma_client(path, discard_corrupt=True), f"index {str(path)!r}"
        index = _open_index(
            client, embedder, collection, where, rebuild=reindex, directory=path if host is None else None
        )
        _record_embedder(pool_dir, embedder)
        return cls(embedder, index, store, pool=pool, options=options, confidence=_pool_confidence(pool_dir, embedder))

    @classmethod
    def from_cards(
        cls,
        cards: Sequence[AdapterCard],
        *,
        embedder: Embedder | str | Path | None = None,
        options: RouteOptions | None = None,
        confidence: Confidence | None = None,
    ) -> Router:
        """A throwaway router over in-memory cards and an in-memory index (dropped by :meth:`close`)."""
        if not isinstance(embedder, Embedder):
            embedder = Embedder(embedder)
        store = CardStore(None)
        store.put_all(list(cards))
        client = open_chroma_client(ephemeral=True)
        index = _open_index(client, embedder, throwaway_collection_name(), "throwaway in-memory index")
        return cls(embedder, index, store, options=options, drop_index_on_close=True, confidence=confidence)

    def close(self) -> None:
        """Drops a throwaway index; a persistent one is kept."""
        if self._drop_index_on_close:
            self.index.drop()
            self._drop_index_on_close = False

    def __enter__(self) -> Router:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- the pool ----------------------------------------------------------------------------
    def attach(self, pool: LoraPool, *, reconcile: bool = True) -> None:
        """Follows ``pool``: only its adapters are routable, from the moment they are added or removed."""
        self.pool = pool
        pool.subscribe(self._on_pool_event)
        if reconcile:
            self.reconcile()

    def _on_pool_event(self, event: str, name: str) -> None:
        # The index holds every card (processes that share a pool share its index); the pool only
        # decides what this process may route to, so its changes never touch the index.
        if event == "added" and name not in self.store:
            logger.info("adapter %r has no card yet, so it is not routable until Router.register(card)", name)

    def routable(self) -> set[str]:
        """The adapters the router may return: those with a card (and in the pool, if it follows one)."""
        names = set(self.store.names)
        if self.pool is not None:
            names &= set(self.pool.names)
        return names

    # -- cards -------------------------------------------------------------------------------
    def register(self, card: AdapterCard | Mapping[str, Any]) -> None:
        """Adds or replaces an adapter's card: saved to the store first, then indexed.

        Raises:
            RetrievalError: a bad card, or one for an adapter that is not in the followed pool.
        """
        if not isinstance(card, AdapterCard):
            card = AdapterCard.from_dict(card)
        if self.pool is not None and card.name not in self.pool:
            raise RetrievalError(
                f"card for unknown adapter {card.name!r}: the pool has no adapter of that name "
                f"({len(self.pool)} adapters). Fix: pool.add(...) the adapter first, or check the name."
            )
        self.store.put(card)
        try:
            self._with_index(lambda: self._index_cards([card]))
        except RetrievalError as err:
            self._stale = True
            raise RetrievalError(f"{err} (The card is saved; the index catches up on the next reconcile.)") from err

    def unregister(self, name: str) -> None:
        """Removes an adapter's card and its vector (the adapter itself stays in the pool)."""
        if name not in self.store:
            raise NotFoundError(
                f"no card named {name!r}; known: {', '.join(self.store.names[:10]) or 'none'}.", param="name"
            )
        self._with_index(lambda: self.index.delete([name]))
        self.store.remove(name)

    def reconcile(self) -> dict[str, list[str]]:
        """Makes the index hold exactly the cards, each from its current version. Only a card's
        removal removes its vector: an adapter this process has not loaded may be another's.

        Returns:
            ``{"added": [...], "updated": [...], "removed": [...]}`` (adapter names).
        """
        if self.index.changed_on_disk():
            self.index.repair()
        return self._with_index(self._reconcile, reconciles=False)

    def _reconcile(self) -> dict[str, list[str]]:
        names = set(self.store.names)
        indexed = self.index.digests()
        cards = {name: self.store.get(name) for name in names}
        added = sorted(name for name in names if name not in indexed)
        updated = sorted(name for name in names if name in indexed and indexed[name] != cards[name].digest)
        removed = sorted(name for name in indexed if name not in names)
        if removed:
            self.index.delete(removed)
        todo = [cards[name] for name in added + updated]
        self._index_cards(todo)
        self._stale = False
        if added or updated or removed:
            logger.info("index reconciled: %d added, %d updated, %d removed", len(added), len(updated), len(removed))
        return {"added": added, "updated": updated, "removed": removed}

    def reindex(self) -> int:
        """Rebuilds the index from the cards with the current embedder; returns the number indexed."""
        self._with_index(self.index.rebuild, reconciles=False)
        return len(self.reconcile()["added"])

    def _with_index(self, call: Callable[[], T], *, reconciles: bool = True) -> T:
        """Runs ``call``; if an embedded index fails under it, repairs the index (refilled from the
        cards) and runs it once more. A second failure is raised."""
        try:
            return call()
        except ChromaError as err:
            if self.index.directory is None:
                raise
            logger.warning("the index failed (%s); repairing it from the cards and retrying", err)
        self.index.repair()
        if reconciles:
            self._reconcile()
        return call()

    def _index_cards(self, cards: Sequence[AdapterCard]) -> None:
        for start in range(0, len(cards), _EMBED_CHUNK):
            chunk = list(cards[start : start + _EMBED_CHUNK])
            self.index.upsert(chunk, self.embedder.embed_samples([card.samples for card in chunk]))

    # -- routing -----------------------------------------------------------------------------
    def route(
        self, prompts: Sequence[str] | str, options: RouteOptions | Mapping[str, Any] | None = None, **overrides: Any
    ) -> list[Routing]:
        """Chooses the adapters of each prompt.

        Args:
            prompts: The prompts (embedded in batches).
            options: The routing options (default: the router's); see
                :class:`~loraretriever.retrieval.options.RouteOptions`. ``filter`` is a card metadata
                filter (see :meth:`LoraIndex.chroma_where`); ``exclude`` one list of names for all
                prompts or one per prompt (the paper's out-of-domain protocol excludes each prompt's
                own task); below ``min_similarity`` a prompt gets the base model, with
                ``Routing.fallback`` saying why.
            **overrides: Options to change for this call, by name (``top_k=2``, ``filter={...}``).

        Returns:
            One :class:`~loraretriever.engine.routing.Routing` per prompt, best adapter first.

        Raises:
            RetrievalError: options a router cannot honour (a gated mode, pinned adapters) or bad ones;
                an empty prompt.

        Example:
            >>> router.route(["Is this review positive? 'loved it'"], top_k=2)  # doctest: +SKIP
            [Routing(adapters=('sst2', 'imdb'), weights=(0.5, 0.5), similarities=(0.71, 0.66), ...)]
        """
        if isinstance(prompts, str):
            prompts = [prompts]
        prompts = list(prompts)
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, str) or not prompt.strip():
                raise RetrievalError(f"prompt {i} is {prompt!r:.40}; routing needs some text to embed.")
        opts = _retrieval_options(
            (self.options if options is None else RouteOptions.coerce(options)).replace(**overrides)
        )
        excludes = opts.excludes_for(len(prompts))
        if self._stale or self.index.changed_on_disk():
            self.reconcile()
        chroma_where = self._with_index(lambda: self.index.chroma_where(opts.filter))
        if not prompts:
            return []
        routable = self.routable()
        vectors = self.embedder.embed(prompts)
        size = fetch_size(opts)
        candidates = self._with_index(lambda: nearest(self.index, vectors, size, chroma_where, excludes, routable))
        domains = None
        if opts.uncertain == "soup" and opts.soup_of == "domain":
            names = {name for found in candidates for name, _ in found}  # each card read once per call
            domains = {name: self.store.get(name).domain for name in names}
        return [make_routing(found, opts, bool(routable), self.confidence, domains) for found in candidates]

    def __repr__(self) -> str:
        return f"Router({self.embedder.name!r}, {self.index.where}, {len(self.store)} cards)"


def _open_index(
    client: Any,
    embedder: Embedder,
    collection: str,
    where: str,
    *,
    rebuild: bool = False,
    directory: Path | None = None,
) -> LoraIndex:
    if rebuild:  # drop the old collection first, so that its embedder is not checked
        try:
            client.delete_collection(collection)
        except Exception as err:  # no such collection: nothing to drop
            logger.debug("no collection %r to drop (%s)", collection, err)
    return LoraIndex(
        client,
        embedder_name=embedder.name,
        dim=embedder.dim,
        instruction=embedder.instruction,
        collection=collection,
        where=where,
        directory=directory,
    )


def _record_embedder(pool_dir: Path, embedder: Embedder) -> None:
    """The pool's manifest names the embedder its index was built with (once the index opened with
    it, so after a reindex too)."""
    recorded = {"id": embedder.label, "name": embedder.name, "dimension": embedder.dim}
    if read_manifest(pool_dir).get("embedder") == recorded:
        return
    try:
        update_manifest(pool_dir, embedder=recorded)
    except OSError as error:  # a read-only pool still routes
        logger.warning("could not record the embedder in the manifest of %s: %s", pool_dir, error)


def _pool_confidence(pool_dir: Path, embedder: Embedder) -> Confidence | None:
    """The pool's calibration, if it has one that fits ``embedder``. A corrupt file or one fitted for
    another embedder leaves routing uncalibrated (a warning; ``uncertain`` then names the fix) rather
    than the pool unopenable."""
    path = PoolLayout(pool_dir).confidence
    if not path.exists():
        return None
    try:
        confidence = Confidence.load(path)
    except RetrievalError as err:
        logger.warning("%s; uncertain='soup'/'base' are off until it is rewritten", err)
        return None
    if confidence.embedder != embedder.name:
        logger.warning(
            "%s was calibrated for embedder %r, not %r: uncertain='soup'/'base' are off until "
            "`loraretriever calibrate` runs again",
            path,
            confidence.embedder,
            embedder.name,
        )
        return None
    return confidence


def _retrieval_options(options: RouteOptions) -> RouteOptions:
    """``options`` if a router can honour them: it retrieves, it holds no gates and pins nothing."""
    if options.mode in GATED_MODES:
        raise RetrievalError(
            f"mode={options.mode!r} needs a gate, which a Router does not hold: route with RoutedLM.route(mode="
            f"{options.mode!r}), or with Router mode='mixture' and set the gate on the routings."
        )
    if options.adapters is not None:
        raise RetrievalError(
            f"adapters={options.adapters!r} pins adapters, which a Router retrieves. Fix: use Routing.pinned(...) "
            "or RoutedLM.route(adapters=...)."
        )
    return options
