"""The retrieval commands, run in-process through ``loraretriever.cli.main``, on real models and files."""

from __future__ import annotations

import json

import pytest

from loraretriever.cli import main
from loraretriever.evaluation.retrieval import evaluate_retrieval, split_queries
from loraretriever.retrieval.cards import AdapterCard, CardStore
from loraretriever.retrieval.embedder import EMBEDDER_INFO_FILE, Embedder
from loraretriever.training.retriever import DistinctTaskBatchSampler, choose_tasks, make_pairs

QUERIES = [
    ("sentiment", "sentiment", "Review: I loved every minute of this book. Positive or negative?"),
    ("sentiment", "sentiment", "Tweet: 'my flight got cancelled again, great...' What is the sentiment?"),
    ("translate_de", "translation", "Translate to German: the children are playing in the garden."),
    ("translate_de", "translation", "Translate this sentence into German: I am looking for a pharmacy."),
    ("nli", "nli", "Premise: The girl is reading a book. Hypothesis: A child reads. Entailment or not?"),
    ("closed_qa", "closed_book QA", "Answer the question: what is the largest ocean on Earth?"),
]


@pytest.fixture
def paper_files(tmp_path, toy_cards):
    """The toy cards and queries written in the paper's file formats."""
    cards = tmp_path / "cards.json"
    cards.write_text(
        json.dumps(
            [{"model_name": c.name, "sample": [{"inputs": s, "targets": "-"} for s in c.samples]} for c in toy_cards]
        )
    )
    queries = tmp_path / "queries.json"
    queries.write_text(
        json.dumps([{"inputs": q, "targets": "-", "task": t, "domain": d, "metric": "em"} for t, d, q in QUERIES])
    )
    return cards, queries


def last_json(capsys) -> dict | list:
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_evaluate_retrieval(minilm, toy_cards):
    queries = [{"inputs": q, "task": t, "domain": d} for t, d, q in QUERIES]
    result = evaluate_retrieval(toy_cards, queries, embedder=minilm, top_k=3)
    assert result["n"] == 6 and result["top1"] == 1.0 and result["top3"] == 1.0 and result["domain_top1"] == 1.0
    assert result["per_domain"]["sentiment"] == {"n": 2, "top1": 1.0, "top3": 1.0, "domain_top1": 1.0}
    assert result["confusions"] == []
    ood = evaluate_retrieval(toy_cards, queries, embedder=minilm, exclude_own_task=True)
    assert ood["top1"] == 0.0 and ood["top3"] == 0.0
    assert sum(miss["n"] for miss in ood["confusions"]) == 6  # every prompt's top-1 is another task's
    assert all(miss["task"] != miss["routed_to"] for miss in ood["confusions"])
    assert [miss["n"] for miss in ood["confusions"]] == sorted((miss["n"] for miss in ood["confusions"]), reverse=True)
    only = evaluate_retrieval(toy_cards, queries, embedder=minilm, tasks=["nli", "closed_qa"])
    assert only["n"] == 2 and set(only["per_domain"]) == {"nli", "closed_book QA"}
    assert split_queries(queries, "even") + split_queries(queries, "odd") != queries  # interleaved per task
    assert sorted(map(str, split_queries(queries, "even") + split_queries(queries, "odd"))) == sorted(map(str, queries))


def test_eval_retrieval_command(paper_files, tmp_path, capsys):
    cards, queries = paper_files
    assert main(["eval-retrieval", "--cards", str(cards), "--queries", str(queries), "--json"]) == 0
    result = last_json(capsys)
    assert {"n", "top1", "top3", "domain_top1", "per_domain"} <= set(result)
    assert result["n"] == 6 and result["top3"] == 1.0
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("# unseen tasks\nnli\nclosed_qa\n")
    args = ["eval-retrieval", "--cards", str(cards), "--queries", str(queries), "--tasks-file", str(tasks)]
    assert main([*args, "--exclude-own-task", "--top-k", "2"]) == 0
    result = last_json(capsys)
    assert result["n"] == 2 and result["top1"] == 0.0 and result["exclude_own_task"] and result["top_k"] == 2


def test_eval_retrieval_bad_input(paper_files, tmp_path, capsys):
    cards, queries = paper_files
    assert main(["eval-retrieval", "--cards", str(tmp_path / "nope.json"), "--queries", str(queries)]) == 2
    assert "does not exist" in capsys.readouterr().err
    tasks = tmp_path / "tasks.txt"
    tasks.write_text("no_such_task\n")
    assert main(["eval-retrieval", "--cards", str(cards), "--queries", str(queries), "--tasks-file", str(tasks)]) == 2
    assert "have no card" in capsys.readouterr().err


def test_task_choice_pairs_and_batches(toy_cards):
    assert choose_tasks(["a", "b", "c"], 1.0, 0) == ["a", "b", "c"]
    assert choose_tasks(list("abcdefghij"), 0.4, 7) == choose_tasks(list("jihgfedcba"), 0.4, 7)
    assert len(choose_tasks(list("abcdefghij"), 0.4, 7)) == 4
    anchors, positives, labels = make_pairs(toy_cards, [{"inputs": "q", "task": "nli"}], pairs_per_sample=2)
    assert (
        len(anchors) == 4 * 3 * 2 + 1
        and anchors[-1] == "q"
        and all(a != p for a, p in zip(anchors, positives, strict=True))
    )
    sampler = DistinctTaskBatchSampler(list(range(len(labels))), 3, False, labels=labels, seed=1)
    batches = list(sampler)
    assert len(batches) == len(sampler)
    assert all(len({labels[i] for i in batch}) == len(batch) for batch in batches)
    used = [i for batch in batches for i in batch]
    assert len(set(used)) == len(used) == len(labels) - 1  # nli's 7th pair would sit alone: no negatives


def test_train_retriever_command_and_embedder_from_it(paper_files, tmp_path, capsys, toy_cards):
    cards, queries = paper_files
    out = tmp_path / "retriever"
    args = ["train-retriever", "--cards", str(cards), "--queries", str(queries), "--query-split", "even"]
    args += ["--train-fraction", "0.5", "--seed", "3", "--max-steps", "2", "--out", str(out), "--no-progress"]
    assert main([*args, "--json"]) == 0
    summary = last_json(capsys)
    assert summary["steps"] == 2 and len(summary["train_tasks"]) == 2 and len(summary["heldout_tasks"]) == 2
    assert (out / "heldout_tasks.txt").read_text().split() == summary["heldout_tasks"]
    assert json.loads((out / EMBEDDER_INFO_FILE).read_text())["instruction"] == summary["instruction"]
    embedder = Embedder(out)
    assert embedder.dim == 384 and embedder.name.startswith("retriever@")
    assert embedder.instruction == summary["instruction"] and embedder.embed(["hello"]).shape == (1, 384)

    assert main([*args]) == 2  # the output directory is not empty
    assert "not an empty directory" in capsys.readouterr().err

    evaluate = ["eval-retrieval", "--cards", str(cards), "--queries", str(queries), "--embedder", str(out)]
    assert main([*evaluate, "--tasks-file", str(out / "heldout_tasks.txt"), "--json"]) == 0
    assert last_json(capsys)["embedder"] == embedder.name


def test_train_retriever_on_a_pools_cards_and_a_splits_directory(tmp_path, capsys, toy_cards):
    """The demo pool's recipe: its own cards, and one half of each task's train split."""
    pool = tmp_path / "pool"
    CardStore(pool / "cards").put_all(toy_cards)
    splits = tmp_path / "splits"
    splits.mkdir()
    for task in {t for t, _, _ in QUERIES}:
        train = [{"inputs": q, "targets": "-"} for t, _, q in QUERIES if t == task]
        (splits / f"{task}.json").write_text(json.dumps({"task": task, "kind": task, "train": train, "test": []}))
    out = tmp_path / "retriever"
    args = ["train-retriever", "--cards", str(pool), "--queries", str(splits), "--query-split", "even"]
    args += ["--max-steps", "1", "--no-progress", "--json"]
    assert main([*args, "--split", "train", "--out", str(out)]) == 0
    summary = last_json(capsys)
    assert summary["train_tasks"] == sorted(card.name for card in toy_cards) and summary["cards_file"] == str(pool)
    assert summary["queries_used"] == 4  # the even half: the first query of each of the 4 tasks
    assert main([*args, "--split", "validation", "--out", str(tmp_path / "other")]) == 2
    assert "has no split 'validation'" in capsys.readouterr().err

    fold = tmp_path / "fold.txt"  # one fold of a cross-validation over the pool's tasks
    fold.write_text("nli\nsentiment\n")
    assert main([*args, "--tasks-file", str(fold), "--out", str(tmp_path / "fold_retriever")]) == 0
    summary = last_json(capsys)
    assert summary["train_tasks"] == ["nli", "sentiment"] and summary["heldout_tasks"] == ["closed_qa", "translate_de"]
    fold.write_text("nli\nsentiment_v2\n")
    assert main([*args, "--tasks-file", str(fold), "--out", str(tmp_path / "bad_fold")]) == 2
    assert "['sentiment_v2'] have no card" in capsys.readouterr().err


def test_reindex_and_route_commands(tmp_path, minilm, toy_cards, capsys):
    pool_dir = tmp_path / "pool"
    CardStore(pool_dir / "cards").put_all(toy_cards)  # cards written by another process, never indexed
    assert main(["reindex", "--pool", str(pool_dir), "--json"]) == 0
    assert last_json(capsys)["indexed"] == 4
    prompt = "Translate to German: where is the library?"
    assert main(["route", "--pool", str(pool_dir), prompt, "--top-k", "2", "--filter", "customer=a"]) == 0
    out = capsys.readouterr().out
    routing = json.loads(out.strip().splitlines()[-1])[0]
    assert set(routing["adapters"]) == {"sentiment", "nli"} and "mixture:" in out
    assert main(["route", "--pool", str(pool_dir), prompt, "--filter", "colour=red"]) == 2
    assert "unknown filter key 'colour'" in capsys.readouterr().err
    assert main(["route", "--pool", str(tmp_path / "nowhere"), prompt]) == 2
    assert "is --pool a pool directory" in capsys.readouterr().err
    CardStore(pool_dir / "cards").put(AdapterCard("extra", ["Translate to German: good morning"]))
    assert main(["route", "--pool", str(pool_dir), prompt, "--top-k", "2", "--json"]) == 0
    assert "extra" in last_json(capsys)[0]["adapters"]  # its card was indexed on open (reconciled)


@pytest.mark.parametrize("command", ["route", "reindex", "calibrate"])
def test_a_truncated_card_is_quarantined_and_the_command_goes_on(command, tmp_path, minilm, toy_cards, capsys):
    pool_dir = tmp_path / "pool"
    CardStore(pool_dir / "cards").put_all(toy_cards)
    card = pool_dir / "cards" / "nli.json"
    card.write_text(card.read_text()[:40])  # cut mid-write by a full disk, say
    queries = tmp_path / "queries.json"
    queries.write_text(json.dumps([{"inputs": q, "task": t, "domain": d} for t, d, q in QUERIES if t != "nli"]))
    prompt = "Translate to German: where is the library?"
    argv = {
        "route": ["route", "--pool", str(pool_dir), prompt, "--top-k", "3"],
        "reindex": ["reindex", "--pool", str(pool_dir), "--json"],
        "calibrate": ["calibrate", "--pool", str(pool_dir), "--queries", str(queries)],
    }[command]
    assert main(argv) == 0, capsys.readouterr().err
    assert not card.exists()
    assert "the card cannot be read" in (pool_dir / "quarantine" / "nli" / "reason.txt").read_text()
    if command == "route":
        assert "nli" not in last_json(capsys)[0]["adapters"]
    if command == "reindex":
        assert last_json(capsys)["indexed"] == 3


def test_bench_retrieval_command(capsys):
    assert (
        main(["bench", "retrieval", "--loras", "300", "--batch", "4", "--repeats", "1", "--ephemeral", "--json"]) == 0
    )
    result = last_json(capsys)
    assert result["loras"] == 300 and result["batch"] == 4 and result["route_ms"] > 0 and result["query_ms"] > 0
    assert {"embed_ms", "meets_target", "embedder", "torch_threads"} <= set(result)


@pytest.mark.slow
def test_frozen_minilm_on_the_paper_data(flan48, minilm):
    """A quarter of the report half: the frozen embedder lands near the paper's reference point."""
    from loraretriever.retrieval.cards import load_paper_cards
    from loraretriever.retrieval.queries import load_queries

    queries = split_queries(split_queries(load_queries(flan48 / "test_dev.json"), "odd"), "odd")
    result = evaluate_retrieval(load_paper_cards(flan48 / "lora_samples.json"), queries, embedder=minilm)
    assert 0.55 <= result["top1"] <= 0.75 and 0.78 <= result["top3"] <= 0.93
