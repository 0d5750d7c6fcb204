"""The confidence-aware router: a calibration fitted on real MiniLM similarities, and the blends
it drives (toward a soup of the nearest adapters, or toward the base model)."""

from __future__ import annotations

import json

import pytest

from loraretriever.cli import main
from loraretriever.pool.layout import PoolLayout
from loraretriever.retrieval.cards import CardStore, RetrievalError
from loraretriever.retrieval.confidence import Confidence, calibrate, calibrate_router
from loraretriever.retrieval.options import RouteOptions
from loraretriever.retrieval.router import Router

# Prompts of the toy cards' tasks that are none of the cards' own samples.
KNOWN = [
    ("sentiment", "Was this customer happy or unhappy? 'The soup was cold and the waiter was rude.'"),
    ("sentiment", "Positive or negative review: 'I would happily watch this movie again tomorrow.'"),
    ("translate_de", "Translate into German: I am reading a very long book."),
    ("translate_de", "How do you say 'good morning, my friend' in German?"),
    ("nli", "Premise: The cat sleeps on the sofa. Hypothesis: The cat is awake. Entailment or contradiction?"),
    ("nli", "Sentence 1: A woman rides a bike. Sentence 2: A person is cycling. Entailment, neutral or contradiction?"),
    ("closed_qa", "Answer the question: who painted the Mona Lisa?"),
    ("closed_qa", "Question: what is the capital city of Australia? Answer:"),
]
QUERIES = [{"task": task, "inputs": text} for task, text in KNOWN]


@pytest.fixture
def router(toy_cards, minilm):
    with Router.from_cards(toy_cards, embedder=minilm) as router:
        yield router


def test_calibration_tells_a_known_task_from_an_unknown_one(router):
    confidence = calibrate_router(router, QUERIES)
    assert confidence.embedder == router.embedder.name and confidence.fitted_on["profiles"] == 2 * len(KNOWN)
    texts = [q["inputs"] for q in QUERIES]
    known = router.route(texts, top_k=2)
    unknown = router.route(texts, top_k=2, exclude=[[q["task"]] for q in QUERIES])  # own adapter gone
    assert [r.adapters[0] for r in known] == [q["task"] for q in QUERIES]
    sure = [confidence.probability(r.similarities) for r in known]
    unsure = [confidence.probability(r.similarities) for r in unknown]
    assert all(a > b for a, b in zip(sure, unsure, strict=True))  # each prompt: surer with its own adapter
    assert sum(p > 0.5 for p in sure) + sum(p < 0.5 for p in unsure) >= 13  # of 16


def test_an_unsure_prompt_gets_the_soup_or_the_base_model(router):
    router.confidence = calibrate_router(router, QUERIES)
    known, unknown = KNOWN[2][1], "Write a haiku about autumn leaves falling in the rain."
    profiles = router.route([known, unknown], top_k=2)
    assert (
        router.confidence.probability(profiles[0].similarities)
        > 0.5
        > router.confidence.probability(profiles[1].similarities)
    )
    kept, soup = router.route([known, unknown], top_k=1, uncertain="soup", soup_k=3)
    assert kept == router.route([known], top_k=1)[0]  # a confident prompt keeps its routing
    assert soup.mode == "fusion" and soup.adapters == profiles[1].adapters + soup.adapters[2:]
    assert len(soup.adapters) == 3 and soup.weights == pytest.approx((1 / 3,) * 3)
    assert soup.fallback.startswith(f"unsure of {profiles[1].adapters[0]} (confidence 0.")
    kept, base = router.route([known, unknown], top_k=1, uncertain="base")
    assert kept.adapters == ("translate_de",) and base.adapters == () and "unsure of" in base.fallback


def test_confidence_errors_name_the_fix(router, tmp_path, minilm, toy_cards):
    with pytest.raises(RetrievalError, match="loraretriever calibrate"):
        router.route([KNOWN[0][1]], uncertain="soup")
    with pytest.raises(RetrievalError, match="pins them"):
        RouteOptions(adapters=["sentiment"], uncertain="soup")
    with pytest.raises(RetrievalError, match="gates them"):
        RouteOptions(mode="flow", uncertain="base")
    with pytest.raises(RetrievalError, match="soup_k=0"):
        RouteOptions(soup_k=0)
    with pytest.raises(RetrievalError, match="uncertain='maybe'"):
        RouteOptions(uncertain="maybe")
    with pytest.raises(ValueError, match="at least 2 prompts whose top-1 is right"):
        calibrate([[0.9, 0.1], [0.5, 0.4]], [True, False], "e")
    bad = PoolLayout(tmp_path).confidence
    bad.write_text("{not json")
    with pytest.raises(RetrievalError, match="is unreadable"):
        Confidence.load(bad)
    with pytest.raises(RetrievalError, match="for embedder 'other'"):
        Router.from_cards(toy_cards, embedder=minilm, confidence=Confidence((1.0, 1.0), 0.0, "other"))


def test_calibrate_command_writes_the_pools_confidence(tmp_path, toy_cards, capsys, caplog):
    pool_dir = tmp_path / "pool"
    CardStore(pool_dir / "cards").put_all(toy_cards)
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps(QUERIES))
    assert main(["calibrate", "--pool", str(pool_dir), "--queries", str(queries), "--json"]) == 0
    written = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert written["fitted_on"]["profiles"] == 16 and (PoolLayout(pool_dir).confidence).exists()
    reopened = Router.open(pool_dir)
    assert reopened.confidence == Confidence.load(PoolLayout(pool_dir).confidence)
    prompts = [KNOWN[2][1], "Write a haiku about autumn leaves falling in the rain."]
    flags = ["--top-k", "1", "--uncertain", "soup", "--soup-k", "3", "--json"]
    assert main(["route", "--pool", str(pool_dir), *prompts, *flags]) == 0
    known, unknown = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert known["adapters"] == ["translate_de"] and len(unknown["adapters"]) == 3 and unknown["mode"] == "fusion"
    odd = ["calibrate", "--pool", str(pool_dir), "--queries", str(queries), "--query-split", "odd", "--json"]
    assert main(odd) == 0  # the half a fine-tuned embedder was not trained on: one prompt per task
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["fitted_on"]["profiles"] == 8
    fold = tmp_path / "fold.txt"
    fold.write_text("nli\n")
    assert main(["calibrate", "--pool", str(pool_dir), "--queries", str(queries), "--tasks-file", str(fold)]) == 0
    assert "'profiles': 4" in capsys.readouterr().out  # nli's 2 prompts, each with and without its adapter
    assert main(["calibrate", "--pool", str(pool_dir), "--queries", str(tmp_path / "missing.json")]) == 2
    (PoolLayout(pool_dir).confidence).write_text("{half a fi")  # a corrupt calibration: the pool still opens
    with caplog.at_level("WARNING", logger="loraretriever.retrieval.router"):
        uncalibrated = Router.open(pool_dir)
    assert uncalibrated.confidence is None and "is unreadable" in caplog.text
    assert uncalibrated.route([prompts[0]], top_k=1)[0].adapters == ("translate_de",)
    with pytest.raises(RetrievalError, match="loraretriever calibrate"):
        uncalibrated.route([prompts[0]], uncertain="soup")


def test_a_domain_soup_takes_the_family_of_the_nearest(toy_cards, minilm):
    from loraretriever.retrieval.cards import AdapterCard

    reviews = [
        AdapterCard("imdb", ["Movie review: a tender, funny film. Positive or negative?"], domain="sentiment"),
        AdapterCard("yelp", ["Restaurant review: cold food, slow service. Positive or negative?"], domain="sentiment"),
    ]
    never_sure = Confidence((0.0, 0.0), -5.0, minilm.name)  # every prompt unsure: always the soup
    with Router.from_cards([*toy_cards, *reviews], embedder=minilm, confidence=never_sure) as router:
        prompt = "Review: the hotel room was spotless and the staff lovely. Positive or negative?"
        nearest = router.route([prompt], top_k=6)[0].adapters
        by_domain = router.route([prompt], uncertain="soup", soup_k=6, soup_of="domain")[0]
        by_rank = router.route([prompt], uncertain="soup", soup_k=6)[0]
    assert set(nearest[:3]) >= {"imdb", "yelp"}  # two of the three nearest are sentiment cards
    assert set(by_domain.adapters) == {"sentiment", "imdb", "yelp"} and by_domain.mode == "fusion"
    assert by_rank.adapters == nearest  # soup_of="nearest": the soup_k nearest, whatever their family
