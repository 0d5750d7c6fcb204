"""Embedder, Chroma index and router with the real all-MiniLM-L6-v2 and a real (embedded) Chroma."""

from __future__ import annotations

import numpy as np
import pytest

from loraretriever.engine.routing import Routing
from loraretriever.retrieval.cards import AdapterCard, RetrievalError
from loraretriever.retrieval.embedder import DEFAULT_INSTRUCTION, Embedder, EmbedderError
from loraretriever.retrieval.index import LoraIndex, open_chroma_client, throwaway_collection_name
from loraretriever.retrieval.options import RouteOptions
from loraretriever.retrieval.router import Router

SENTIMENT = "Is this review positive or negative? An absolutely wonderful, moving film."
GERMAN = "Translate to German: my brother lives in a small house by the sea."


# -- embedder ----------------------------------------------------------------------------------
def test_embedder_unit_vectors_and_instruction(minilm):
    vectors = minilm.embed([SENTIMENT, GERMAN])
    assert vectors.shape == (2, 384) and vectors.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=1), 1.0, atol=1e-5)
    assert minilm.instruction == DEFAULT_INSTRUCTION
    assert minilm.name.startswith("all-MiniLM-L6-v2@") and minilm.dim == 384
    plain = minilm.model.encode([DEFAULT_INSTRUCTION + SENTIMENT], normalize_embeddings=True)
    np.testing.assert_allclose(vectors[0], plain[0], atol=1e-5)
    assert minilm.embed([]).shape == (0, 384)


def test_card_vector_is_normalised_mean(minilm):
    samples = ["first sample text", "a second, different sample", "third"]
    card_vector = minilm.embed_samples([samples])[0]
    mean = minilm.embed(samples).mean(axis=0)
    np.testing.assert_allclose(card_vector, mean / np.linalg.norm(mean), atol=1e-5)
    with pytest.raises(EmbedderError, match="is empty"):
        minilm.embed_samples([[]])


def test_embedder_bad_sources(tmp_path):
    with pytest.raises(EmbedderError, match="does not exist"):
        Embedder(tmp_path / "missing")
    (tmp_path / "file").write_text("x")
    with pytest.raises(EmbedderError, match="is a file"):
        Embedder(tmp_path / "file")
    with pytest.raises(EmbedderError, match="could not load"):
        Embedder(tmp_path)  # an empty directory is no model


def test_embedder_accepts_a_loaded_model(minilm):
    again = Embedder(minilm.model, instruction="")
    assert again.dim == 384 and again.name.split("@")[1] == minilm.name.split("@")[1]


# -- index -------------------------------------------------------------------------------------
def _index(dim: int = 3, **kwargs) -> LoraIndex:
    kwargs.setdefault("collection", throwaway_collection_name("test"))
    return LoraIndex(open_chroma_client(ephemeral=True), embedder_name="toy", dim=dim, **kwargs)


def test_index_cosine_similarity_and_where():
    index = _index()
    cards = [AdapterCard(n, ["x"], domain=d, tags=t) for n, d, t in [("a", "nli", {"customer": "a"}), ("b", "qa", {})]]
    index.upsert(cards, np.eye(3, dtype=np.float32)[:2])
    query = np.array([[3.0, 4.0, 0.0]]) / 5.0
    assert [(n, round(s, 4)) for n, s in index.query(query, 5)[0]] == [("a", 0.6), ("b", 0.8)][::-1]
    assert index._collection.configuration["hnsw"]["space"] == "cosine"
    assert index.chroma_where({"customer": "a"}) == {"tag.customer": "a"}
    assert [n for n, _ in index.query(query, 5, where=index.chroma_where({"customer": "a"}))[0]] == ["a"]
    assert [n for n, _ in index.query(query, 5, where=index.chroma_where({"domain": {"$in": ["qa"]}}))[0]] == ["b"]
    with pytest.raises(RetrievalError, match="unknown filter key 'custmer'.*'customer'"):
        index.chroma_where({"custmer": "a"})
    with pytest.raises(RetrievalError, match=r"\$gt"):
        index.chroma_where({"customer": {"$gt": "a"}})
    assert index.digests() == {"a": cards[0].digest, "b": cards[1].digest}
    index.delete(["a"])
    assert index.names() == {"b"}
    index.drop()


def test_index_records_embedder_and_refuses_another():
    client = open_chroma_client(ephemeral=True)
    name = throwaway_collection_name("test")
    LoraIndex(client, embedder_name="model-a@1", dim=3, collection=name)
    with pytest.raises(RetrievalError, match=r"built with embedder 'model-a@1'.*reindex"):
        LoraIndex(client, embedder_name="model-b@2", dim=3, collection=name)
    with pytest.raises(RetrievalError, match="dim 3"):
        LoraIndex(client, embedder_name="model-a@1", dim=4, collection=name)
    client.delete_collection(name)


def test_open_chroma_client_errors(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(RetrievalError, match="is a file"):
        open_chroma_client(tmp_path / "file")
    with pytest.raises(RetrievalError, match="does not exist.*reindex"):
        open_chroma_client(tmp_path / "missing", create=False)
    corrupt = tmp_path / "corrupt"
    corrupt.mkdir()
    (corrupt / "chroma.sqlite3").write_bytes(b"\x00garbage" * 4096)
    with pytest.raises(RetrievalError, match="looks corrupt.*reindex"):
        open_chroma_client(corrupt)
    with pytest.raises(RetrievalError, match="does not answer.*chroma run"):
        open_chroma_client(host="127.0.0.1", port=9)  # nothing listens on the discard port
    with pytest.raises(RetrievalError, match="exactly one"):
        open_chroma_client(tmp_path, ephemeral=True)


# -- router ------------------------------------------------------------------------------------
@pytest.fixture
def router(minilm, toy_cards):
    with Router.from_cards(toy_cards, embedder=minilm) as router:
        yield router


def test_routes_prompts_to_their_task(router):
    routings = router.route([SENTIMENT, GERMAN, "Who painted the Mona Lisa?"], top_k=1)
    assert [r.adapters for r in routings] == [("sentiment",), ("translate_de",), ("closed_qa",)]
    assert all(isinstance(r, Routing) and r.mode == "mixture" for r in routings)


def test_uniform_and_softmax_weights(router):
    uniform = router.route(SENTIMENT, top_k=3)[0]
    assert uniform.weights == pytest.approx((1 / 3,) * 3)
    assert list(uniform.similarities) == sorted(uniform.similarities, reverse=True)
    sharp = router.route(SENTIMENT, top_k=3, weighting="softmax", routing_temperature=0.01)[0]
    soft = router.route(SENTIMENT, top_k=3, weighting="softmax", routing_temperature=10.0)[0]
    assert sum(sharp.weights) == pytest.approx(1.0) and sharp.weights[0] > 0.9
    assert max(soft.weights) - min(soft.weights) < 0.05
    sims = np.array(sharp.similarities)
    expected = np.exp((sims - sims.max()) / 0.01)
    assert sharp.weights == pytest.approx(tuple(expected / expected.sum()))
    text = str(uniform)
    assert text.startswith("mixture: sentiment 0.33 (sim ") and text.count("(sim") == 3


def test_min_similarity_falls_back_to_base_model(router):
    routing = router.route(SENTIMENT, top_k=3, min_similarity=0.99)[0]
    assert routing.is_base and "no adapter with similarity >= 0.99 (best: sentiment" in routing.fallback
    assert str(routing).startswith("base model (no adapter with similarity")
    some = router.route(SENTIMENT, top_k=4, min_similarity=0.6)[0]
    assert 1 <= len(some.adapters) < 4 and all(s >= 0.6 for s in some.similarities)
    assert sum(some.weights) == pytest.approx(1.0)


def test_exclude_and_filters(router):
    excluded = router.route([SENTIMENT, GERMAN], top_k=2, exclude=[["sentiment"], ["translate_de"]])
    assert "sentiment" not in excluded[0].adapters and "translate_de" not in excluded[1].adapters
    assert all(len(r.adapters) == 2 for r in excluded)
    everywhere = router.route([SENTIMENT, GERMAN], top_k=4, exclude=["nli"])
    assert all("nli" not in r.adapters and len(r.adapters) == 3 for r in everywhere)
    customer_a = router.route(GERMAN, top_k=4, filter={"customer": "a"})[0]
    assert set(customer_a.adapters) == {"sentiment", "nli"}
    assert router.route(GERMAN, filter={"domain": "translation"})[0].adapters == ("translate_de",)
    with pytest.raises(RetrievalError, match="unknown filter key 'tenant'"):
        router.route(GERMAN, filter={"tenant": "a"})
    with pytest.raises(RetrievalError, match="one list per prompt"):
        router.route([SENTIMENT, GERMAN], exclude=[["a"]])
    nothing = router.route(GERMAN, filter={"customer": "nobody"})[0]
    assert nothing.is_base and nothing.fallback == "no routable adapter matched"


def test_route_options_are_checked(router):
    with pytest.raises(RetrievalError, match="top_k=0"):
        router.route(SENTIMENT, top_k=0)
    with pytest.raises(RetrievalError, match="weighting='max'"):
        router.route(SENTIMENT, weighting="max")
    with pytest.raises(RetrievalError, match="routing_temperature=0"):
        RouteOptions(routing_temperature=0)
    with pytest.raises(RetrievalError, match="min_similarity=2"):
        router.route(SENTIMENT, min_similarity=2)
    assert router.route([]) == []
    assert router.route(SENTIMENT, top_k=50)[0].adapters.__len__() == 4  # more than there are


def test_batched_embedding_matches_single(router):
    prompts = [SENTIMENT, GERMAN] * 9
    batched = router.route(prompts)
    assert [r.adapters for r in batched] == [router.route(p)[0].adapters for p in prompts[:2]] * 9


def test_router_fetches_more_when_the_nearest_neighbours_are_not_routable(minilm):
    """The 8 nearest cards are indexed but no longer routable (their cards are gone, the index lags):
    the router keeps fetching until it has top_k routable adapters."""
    near = [
        AdapterCard(f"review{i}", [f"Is this review positive or negative? Film number {i} was great."])
        for i in range(8)
    ]
    far = [AdapterCard("german", [GERMAN]), AdapterCard("french", ["Translate to French: the cat sleeps."])]
    with Router.from_cards(near + far, embedder=minilm) as router:
        for card in near:
            router.store.remove(card.name)  # the index still holds their vectors
        routing = router.route(SENTIMENT, top_k=2)[0]
        assert set(routing.adapters) == {"german", "french"}
