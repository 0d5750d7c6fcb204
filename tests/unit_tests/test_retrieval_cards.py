"""Adapter cards and their on-disk store: validation, formats, atomic writes."""

from __future__ import annotations

import json

import pytest

from loraretriever.retrieval.cards import (
    MAX_CARD_SAMPLES,
    MAX_SAMPLE_CHARS,
    AdapterCard,
    CardStore,
    RetrievalError,
    load_paper_cards,
)
from loraretriever.retrieval.queries import load_queries


def test_card_samples_are_bounded_by_cutting_never_by_refusing(caplog):
    assert len(AdapterCard("ok", ["x" * MAX_SAMPLE_CHARS] * MAX_CARD_SAMPLES).samples) == MAX_CARD_SAMPLES
    assert not caplog.records
    many = AdapterCard("many", [f"sample {i}" for i in range(100_000)])
    assert many.samples == tuple(f"sample {i}" for i in range(MAX_CARD_SAMPLES))
    assert "has 100000 samples; keeping the first 256" in caplog.text
    long = AdapterCard("long", ["short", "y" * 14_369])
    assert long.samples == ("short", "y" * MAX_SAMPLE_CHARS)
    assert "cut 1 sample(s) over 8,000 characters (the longest 14,369)" in caplog.text
    # what is stored is the cut card: it reads back the same
    assert AdapterCard.from_dict(long.to_dict()) == long


def test_the_papers_cards_with_a_long_sample_load_whole(flan48, tmp_path, caplog):
    """A review as long as the 14,369-character email a user's data held (the paper's longest
    sample, an imdb_reviews one, has 3,761): every card loads, that sample cut."""
    entries = json.loads((flan48 / "lora_samples.json").read_text())
    (imdb,) = [entry for entry in entries if entry["model_name"] == "imdb_reviews"]
    review = "\n\n".join(sample["inputs"] for sample in imdb["sample"])
    assert len(review) > 14_369
    imdb["sample"][0]["inputs"] = review[:14_369]
    (tmp_path / "lora_samples.json").write_text(json.dumps(entries))
    cards = {card.name: card for card in load_paper_cards(tmp_path / "lora_samples.json")}
    assert len(cards) == 48
    assert cards["imdb_reviews"].samples[0] == review[:MAX_SAMPLE_CHARS]
    assert "card 'imdb_reviews': cut 1 sample(s) over 8,000 characters (the longest 14,369)" in caplog.text


def test_card_checks_name_samples_and_tags():
    with pytest.raises(RetrievalError, match="no samples"):
        AdapterCard("sst2", [])
    with pytest.raises(RetrievalError, match="not one string"):
        AdapterCard("sst2", "a single string")
    for samples, kind in ((None, "NoneType"), (3, "int"), ({"a": "b"}, "dict")):  # found by the fuzz test
        with pytest.raises(RetrievalError, match=f"not {kind}"):
            AdapterCard.from_dict({"name": "sst2", "samples": samples})
    with pytest.raises(RetrievalError, match="sample 1"):
        AdapterCard("sst2", ["ok", "  "])
    with pytest.raises(RetrievalError, match="card name"):
        AdapterCard("../escape", ["x"])
    with pytest.raises(RetrievalError, match="tag key 'bad key'"):
        AdapterCard("sst2", ["x"], tags={"bad key": "v"})
    with pytest.raises(RetrievalError, match="tag key 'domain'"):
        AdapterCard("sst2", ["x"], tags={"domain": "v"})
    with pytest.raises(RetrievalError, match="must be a string"):
        AdapterCard("sst2", ["x"], tags={"customer": 3})


def test_card_formats_and_digest():
    card = AdapterCard("sst2", ["a", "b"], description="movie reviews", domain="sentiment", tags={"customer": "a"})
    assert AdapterCard.from_dict(card.to_dict()) == card
    paper = AdapterCard.from_dict({"model_name": "sst2", "sample": [{"inputs": "a", "targets": "x"}, {"inputs": "b"}]})
    assert paper.samples == ("a", "b") and paper.name == "sst2"
    assert card.metadata() == {"name": "sst2", "domain": "sentiment", "tag.customer": "a", "card_digest": card.digest}
    assert AdapterCard("sst2", ["a", "c"]).digest != AdapterCard("sst2", ["a", "b"]).digest
    assert AdapterCard("sst2", ["a"], tags={"t": "1"}).digest != AdapterCard("sst2", ["a"]).digest
    with pytest.raises(RetrievalError, match="unknown fields"):
        AdapterCard.from_dict({"name": "x", "samples": ["a"], "colour": "red"})
    with pytest.raises(RetrievalError, match="has no 'inputs'"):
        AdapterCard.from_dict({"model_name": "x", "sample": [{"text": "a"}]})


def test_card_store_persists_atomically(tmp_path):
    store = CardStore(tmp_path / "pool" / "cards")
    card = AdapterCard("sst2", ["a"], tags={"customer": "a"})
    store.put(card)
    store.put(AdapterCard("imdb", ["b"]))
    reopened = CardStore(tmp_path / "pool" / "cards", create=False)
    assert reopened.names == ["imdb", "sst2"] and reopened.get("sst2") == card and "sst2" in reopened
    assert not list((tmp_path / "pool" / "cards").glob(".*"))  # no temp files left behind
    reopened.remove("imdb")
    assert store.names == ["sst2"]
    with pytest.raises(KeyError, match="no card named 'imdb'"):
        store.get("imdb")


def test_card_store_errors(tmp_path):
    with pytest.raises(RetrievalError, match="does not exist"):
        CardStore(tmp_path / "missing", create=False)
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetrievalError, match="is a file"):
        CardStore(tmp_path / "file")
    store = CardStore(tmp_path / "cards")
    (tmp_path / "cards" / "broken.json").write_text("{not json")
    with pytest.raises(RetrievalError, match="not valid JSON"):
        store.get("broken")


def test_memory_store():
    store = CardStore(None)
    store.put(AdapterCard("a", ["x"]))
    assert store.names == ["a"] and len(store) == 1
    store.remove("a")
    assert store.names == []


def test_paper_files(tmp_path):
    path = tmp_path / "cards.json"
    path.write_text(json.dumps([{"model_name": "a", "sample": [{"inputs": "x"}]}, {"name": "b", "samples": ["y"]}]))
    assert [card.name for card in load_paper_cards(path)] == ["a", "b"]
    path.write_text(json.dumps([{"model_name": "a", "sample": [{"inputs": "x"}]}] * 2))
    with pytest.raises(RetrievalError, match="two cards named 'a'"):
        load_paper_cards(path)
    path.write_text(json.dumps([{"model_name": "a", "sample": []}]))
    with pytest.raises(RetrievalError, match="no samples"):
        load_paper_cards(path)
    path.write_text(json.dumps({"not": "a list"}))
    with pytest.raises(RetrievalError, match="JSON list"):
        load_paper_cards(path)
    pool = tmp_path / "pool"
    CardStore(pool / "cards").put_all([AdapterCard("b", ["y"]), AdapterCard("a", ["x", "z"])])
    for source in (pool, pool / "cards"):  # a pool or its card directory
        assert [(card.name, card.samples) for card in load_paper_cards(source)] == [("a", ("x", "z")), ("b", ("y",))]
    (pool / "empty").mkdir()
    with pytest.raises(RetrievalError, match="holds no cards"):
        load_paper_cards(pool / "empty")
    with pytest.raises(RetrievalError, match="does not exist"):
        load_queries(tmp_path / "nope.json")
    path.write_text(json.dumps([{"inputs": "x"}]))
    with pytest.raises(RetrievalError, match="needs 'inputs' and 'task'"):
        load_queries(path)


def test_real_paper_files(flan48):
    cards = load_paper_cards(flan48 / "lora_samples.json")
    queries = load_queries(flan48 / "test_dev.json")
    assert len(cards) == 48 and all(len(card.samples) == 20 for card in cards)
    assert {q["task"] for q in queries} == {card.name for card in cards}


def test_pool_files_get_the_modes_of_plain_files_not_private_ones(tmp_path, tiny_adapters):
    import stat

    from loraretriever.pool.directory import store_adapter

    store = CardStore(tmp_path / "pool" / "cards")
    store.put(AdapterCard("sst2", ["a"]))
    stored = store_adapter(tmp_path / "pool", tiny_adapters["qv"], "qv")
    (tmp_path / "plain.json").write_text("{}")  # what open() and mkdir() give under this umask
    (tmp_path / "plain").mkdir()
    mode = lambda path: stat.S_IMODE(path.stat().st_mode)  # noqa: E731
    assert mode(tmp_path / "pool" / "cards" / "sst2.json") == mode(tmp_path / "plain.json")
    assert mode(stored) == mode(tmp_path / "plain")
