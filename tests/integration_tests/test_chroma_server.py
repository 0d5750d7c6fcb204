"""Replicas sharing one pool index through a real `chroma run` server; a server that is down."""

from __future__ import annotations

import pytest

from loraretriever.retrieval.cards import AdapterCard, RetrievalError
from loraretriever.retrieval.index import throwaway_collection_name
from loraretriever.retrieval.router import Router

GERMAN = "Translate to German: my brother lives in a small house by the sea."


def test_replicas_share_the_server_index(chroma_server, tmp_path, minilm, toy_cards):
    collection = throwaway_collection_name("replicas")
    pool_dir = tmp_path / "shared-pool"  # the cards: one directory on storage both replicas mount
    server = {"host": chroma_server.host, "port": chroma_server.port, "collection": collection}
    replica_a = Router.open(pool_dir, embedder=minilm, **server)
    replica_b = Router.open(pool_dir, embedder=minilm, **server)
    assert replica_b.route(GERMAN)[0].is_base  # nothing registered yet

    for card in toy_cards:
        replica_a.register(card)
    assert replica_b.index.count() == 4
    assert replica_b.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)
    assert set(replica_b.route(GERMAN, top_k=4, filter={"customer": "a"})[0].adapters) == {"sentiment", "nli"}

    replica_b.unregister("translate_de")
    assert "translate_de" not in replica_a.route(GERMAN, top_k=4)[0].adapters
    replica_b.register(AdapterCard("tagged", ["Translate to German: see you soon"], tags={"region": "eu"}))
    assert replica_a.route(GERMAN, filter={"region": "eu"})[0].adapters == ("tagged",)  # a key new to replica a

    # The server keeps the index: a third replica opens it without re-embedding anything.
    replica_c = Router.open(pool_dir, embedder=minilm, **server)
    assert replica_c.reconcile() == {"added": [], "updated": [], "removed": []}
    replica_c.index.drop()


def test_server_down_is_a_clear_error(start_chroma_server, tmp_path, minilm, toy_cards):
    with pytest.raises(RetrievalError, match=r"does not answer.*chroma run --path"):
        Router.open(tmp_path / "pool", embedder=minilm, host="127.0.0.1", port=9)

    server = start_chroma_server()
    router = Router.open(tmp_path / "pool", embedder=minilm, host=server.host, port=server.port)
    router.register(toy_cards[1])
    server.stop()
    with pytest.raises(RetrievalError, match=f"127.0.0.1:{server.port}"):
        router.route(GERMAN)
    with pytest.raises(RetrievalError, match="card is saved"):
        router.register(toy_cards[0])
    assert set(router.store.names) == {"translate_de", "sentiment"}  # no registration lost
