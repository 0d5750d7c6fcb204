"""A router on disk and on a live pool: persistence, reconciliation after crashes, embedder changes."""

from __future__ import annotations

import logging

import pytest

from loraretriever.pool.layout import PoolLayout
from loraretriever.pool.lora_pool import LoraPool
from loraretriever.retrieval.cards import AdapterCard, CardStore, RetrievalError
from loraretriever.retrieval.embedder import Embedder
from loraretriever.retrieval.router import Router

SENTIMENT = "Is this review positive or negative? An absolutely wonderful, moving film."
GERMAN = "Translate to German: my brother lives in a small house by the sea."


def test_router_persists_and_reconciles_after_crashes(tmp_path, minilm, toy_cards):
    pool_dir = tmp_path / "pool"
    router = Router.open(pool_dir, embedder=minilm)
    for card in toy_cards[1:]:
        router.register(card)
    assert router.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)
    assert sorted(CardStore(PoolLayout(pool_dir).cards).names) == sorted(card.name for card in toy_cards[1:])

    # Crash after the card was written but before the index was: routable again on open.
    store = CardStore(PoolLayout(pool_dir).cards)
    store.put(toy_cards[0])
    # Crash after the card was removed but before the index entry was: never routed, dropped on open.
    (PoolLayout(pool_dir).card("closed_qa")).unlink()
    assert all("closed_qa" not in r.adapters for r in router.route([SENTIMENT, "Who wrote Hamlet?"], top_k=4))
    # A card edited behind the router's back is re-embedded on open.
    store.put(AdapterCard("nli", ["Translate to German: good night", "Translate to German: thank you"]))

    reopened = Router.open(pool_dir, embedder=minilm)
    assert router.reconcile() == {"added": [], "updated": [], "removed": []}  # done by the reopen already
    assert reopened.index.names() == {"sentiment", "translate_de", "nli"}
    assert reopened.route(SENTIMENT, top_k=1)[0].adapters == ("sentiment",)
    assert set(reopened.route(GERMAN, top_k=2)[0].adapters) == {"translate_de", "nli"}

    reopened.unregister("nli")
    assert "nli" not in reopened.store and "nli" not in reopened.index.names()
    with pytest.raises(KeyError, match="no card named 'nli'"):
        reopened.unregister("nli")


def test_reconcile_reports_changes(tmp_path, minilm, toy_cards):
    router = Router.open(tmp_path / "pool", embedder=minilm)
    router.store.put_all(toy_cards[:2])
    router.index.delete(["nothing-here"])
    assert router.reconcile() == {"added": ["sentiment", "translate_de"], "updated": [], "removed": []}
    router.store.put(AdapterCard("sentiment", ["new sample"], tags={"customer": "c"}))
    router.store.remove("translate_de")
    assert router.reconcile() == {"added": [], "updated": ["sentiment"], "removed": ["translate_de"]}
    assert router.route(SENTIMENT, filter={"customer": "c"})[0].adapters == ("sentiment",)


def test_other_embedder_is_an_error_until_reindexed(tmp_path, minilm, toy_cards):
    Router.open(tmp_path / "pool", embedder=minilm).register(toy_cards[0])
    other = Embedder(minilm.model, instruction="Represent this for retrieval: ")
    with pytest.raises(RetrievalError, match=r"built with embedder .*reindex"):
        Router.open(tmp_path / "pool", embedder=other)
    rebuilt = Router.open(tmp_path / "pool", embedder=other, reindex=True)
    assert rebuilt.index.names() == {"sentiment"} and rebuilt.route(SENTIMENT)[0].adapters == ("sentiment",)
    assert rebuilt.reindex() == 1


def test_pool_directory_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetrievalError, match="is a file"):
        Router.open(tmp_path / "file")


def test_live_pool_updates_the_index_at_once(tmp_path, minilm, toy_cards, tiny_model, tiny_adapters, caplog):
    cards = {card.name: card for card in toy_cards}
    pool = LoraPool(tiny_model)
    router = Router.open(tmp_path / "pool", embedder=minilm, pool=pool)
    with pytest.raises(RetrievalError, match="card for unknown adapter 'sentiment'.*pool.add"):
        router.register(cards["sentiment"])
    assert "sentiment" not in router.store

    pool.add(tiny_adapters["qv"], name="sentiment")
    router.register(cards["sentiment"])
    with caplog.at_level(logging.INFO, logger="loraretriever.retrieval.router"):
        pool.add(tiny_adapters["all"], name="translate_de")
    assert "'translate_de' has no card yet" in caplog.text
    assert router.route(GERMAN, top_k=3)[0].adapters == ("sentiment",)  # the only routable one
    router.register(cards["translate_de"])
    assert router.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)

    pool.remove("translate_de")  # unroutable at once; its card (and vector) stay for a later re-add
    assert router.index.names() == {"sentiment", "translate_de"}
    assert router.route(GERMAN, top_k=3)[0].adapters == ("sentiment",)
    pool.add(tiny_adapters["all"], name="translate_de")
    assert router.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)

    # Another process with fewer adapters loaded: it routes to its own, and its reconcile keeps
    # the vectors of the adapters it lacks (they may be another process's).
    pool2 = LoraPool(tiny_model)
    pool2.add(tiny_adapters["qv"], name="sentiment")
    router2 = Router.open(tmp_path / "pool", embedder=minilm, pool=pool2)
    assert router2.routable() == {"sentiment"} and router2.route(GERMAN, top_k=3)[0].adapters == ("sentiment",)
    assert router2.reconcile()["removed"] == [] and router2.index.names() == {"sentiment", "translate_de"}


def test_failed_index_write_never_loses_a_registration(tmp_path, minilm, toy_cards, tiny_model, tiny_adapters):
    pool = LoraPool(tiny_model)
    pool.add(tiny_adapters["qv"], name="sentiment")
    router = Router.open(tmp_path / "pool", embedder=minilm, pool=pool)
    router.register(toy_cards[0])

    def broken(*args, **kwargs):
        raise RetrievalError("could not write adapters in the index (server down)")

    real_upsert, real_delete = router.index.upsert, router.index.delete
    router.index.upsert = router.index.delete = broken
    pool.add(tiny_adapters["all"], name="translate_de")  # the pool change happens despite the index
    assert "translate_de" in pool
    with pytest.raises(RetrievalError, match="card is saved"):
        router.register(toy_cards[1])
    assert "translate_de" in router.store
    pool.remove("sentiment")
    router.index.upsert, router.index.delete = real_upsert, real_delete
    # The next routing reconciles first: the registered adapter is routable, the removed one gone.
    assert router.route(GERMAN, top_k=3)[0].adapters == ("translate_de",)
    assert router.index.names() == {"sentiment", "translate_de"}  # a card's vector goes with the card


def test_a_pool_records_its_prompt_format_and_the_lm_follows_it(tiny_lm, smol_tokenizer, minilm, tmp_path):
    from loraretriever.pool.adapter import AdapterError
    from loraretriever.pool.manifest import prompt_format, record_prompt_format
    from loraretriever.serving.routed_lm import RoutedLM

    pool_dir = tmp_path / "pool"
    assert prompt_format(pool_dir) is None
    record_prompt_format(pool_dir, "chat")
    assert prompt_format(pool_dir) == "chat"
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=pool_dir, embedder=minilm, max_wait_ms=0)
    try:
        assert lm.prompt_format == "chat" and lm.generation.chat_template
        (ours,) = lm.generate(["Say hi."], max_new_tokens=4)
        assert ours.text == lm.generate(["Say hi."], max_new_tokens=4, chat_template=True)[0].text
        assert ours.prompt_tokens > lm.generate(["Say hi."], max_new_tokens=4, chat_template=False)[0].prompt_tokens
    finally:
        lm.close()
    with pytest.raises(ValueError, match="prompt_format='jinja'"):
        record_prompt_format(pool_dir, "jinja")
    (pool_dir / "pool.json").write_text('{"prompt_format": "jinja"}')
    with pytest.raises(AdapterError, match="prompt_format='jinja' is not one of"):
        prompt_format(pool_dir)


def test_a_broken_adapter_or_card_is_quarantined_and_the_rest_serves(tiny_lm, smol_tokenizer, minilm, toy_pool_dir):
    from loraretriever.pool.directory import quarantined
    from loraretriever.serving.routed_lm import RoutedLM

    (toy_pool_dir / "adapters" / "nli" / "adapter_model.safetensors").write_bytes(b"not safetensors")
    (toy_pool_dir / "cards" / "closed_qa.json").write_text("{ half a card")
    with RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm, max_wait_ms=0) as lm:
        assert sorted(lm.pool.names) == ["closed_qa", "sentiment", "translate_de"]
        assert sorted(lm.router.store.names) == ["sentiment", "translate_de"] == sorted(lm.router.index.digests())
        (result,) = lm.generate(["Translate to German: good night"], max_new_tokens=2)
        assert result.routing.adapters and "nli" not in result.routing.adapters
    reasons = quarantined(toy_pool_dir)
    assert set(reasons) == {"nli", "closed_qa"}
    assert "does not load" in reasons["nli"] and "cannot be read" in reasons["closed_qa"]
    assert (toy_pool_dir / "quarantine" / "nli" / "adapter" / "adapter_config.json").is_file()
    assert (toy_pool_dir / "quarantine" / "nli" / "card.json").is_file()  # its card left with it


def _indexed_on_disk(index_dir) -> int:
    """The vectors a fresh process would find in an embedded index (Chroma's in-process cache dropped)."""
    from loraretriever.retrieval.index import forget_embedded_client, open_chroma_client

    forget_embedded_client(index_dir)
    client = open_chroma_client(index_dir, create=False)
    return sum(collection.count() for collection in client.list_collections())


def test_a_corrupt_index_is_set_aside_and_rebuilt_from_the_cards(tmp_path, minilm, toy_cards):
    from loraretriever.retrieval.index import forget_embedded_client

    pool_dir = tmp_path / "pool"
    Router.open(pool_dir, embedder=minilm).store.put_all(toy_cards)
    forget_embedded_client(pool_dir / "index")
    (pool_dir / "index" / "chroma.sqlite3").write_bytes(b"\x00garbage" * 4096)

    router = Router.open(pool_dir, embedder=minilm)  # used to raise "looks corrupt"
    assert router.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)
    assert (pool_dir / ".index.corrupt" / "chroma.sqlite3").read_bytes().startswith(b"\x00garbage")
    assert router.reindex() == len(toy_cards)
    assert _indexed_on_disk(pool_dir / "index") == len(toy_cards)


@pytest.mark.parametrize("damage", ["deleted", "overwritten"])
def test_an_index_damaged_under_a_running_router_is_rebuilt_in_place(tmp_path, minilm, toy_cards, damage):
    import shutil

    pool_dir = tmp_path / "pool"
    router = Router.open(pool_dir, embedder=minilm)
    for card in toy_cards[:3]:
        router.register(card)
    assert router.route(GERMAN, top_k=1)[0].adapters == ("translate_de",)
    if damage == "deleted":
        shutil.rmtree(pool_dir / "index")
    else:  # the same file, garbage inside: only a failing Chroma call shows it
        (pool_dir / "index" / "chroma.sqlite3").write_bytes(b"\x00garbage" * 4096)

    router.register(toy_cards[3])  # used to fail: "attempt to write a readonly database"
    assert router.route("Who wrote the play Hamlet?", top_k=1)[0].adapters == ("closed_qa",)
    assert router.route(SENTIMENT, top_k=1)[0].adapters == ("sentiment",)
    # On disk, not only in this process's memory: a fresh process finds every card's vector.
    assert _indexed_on_disk(pool_dir / "index") == len(toy_cards)
    again = Router.open(pool_dir, embedder=minilm)  # and a second router in the same process works
    assert again.reconcile() == {"added": [], "updated": [], "removed": []}


def test_opening_a_pool_parses_each_card_once(tiny_lm, smol_tokenizer, minilm, toy_pool_dir, monkeypatch):
    from loraretriever.serving.routed_lm import RoutedLM

    parsed = []
    real = AdapterCard.from_dict.__func__
    monkeypatch.setattr(
        AdapterCard, "from_dict", classmethod(lambda cls, data: parsed.append(data["name"]) or real(cls, data))
    )
    with RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm) as lm:
        assert sorted(parsed) == sorted(lm.router.store.names) and len(parsed) == 4
        lm.router.reconcile()
        assert len(parsed) == 4  # unchanged files are not parsed again

        # A card changed behind the store (another process) is read anew.
        CardStore(PoolLayout(toy_pool_dir).cards).put(AdapterCard("nli", ["Translate to German: good night"]))
        assert lm.router.store.get("nli").samples == ("Translate to German: good night",)
        assert lm.router.reconcile()["updated"] == ["nli"]
