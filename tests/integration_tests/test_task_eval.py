"""eval-tasks on a tiny Llama with real PEFT adapters, the real MiniLM router and Chroma."""

from __future__ import annotations

import json
import shutil

import pytest

from loraretriever.cli import main
from loraretriever.evaluation.tasks import available_methods, evaluate_tasks, score, write_report
from loraretriever.retrieval.embedder import default_embedder_path
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import TOY_CARDS

QUERIES = [
    {"inputs": "Is this review positive or negative? A wonderful, warm film.", "targets": "positive", "metric": "em"},
    {"inputs": "Translate to German: The house is small.", "targets": "Das Haus ist klein.", "metric": "bleu"},
    {"inputs": "Answer the question: who painted the Mona Lisa?", "targets": "Leonardo da Vinci", "metric": "rouge"},
    {"inputs": "Premise: A man sleeps. Hypothesis: A man is awake. Entailment?", "targets": "no", "metric": "em"},
]
TASKS = ["sentiment", "translate_de", "closed_qa", "nli"]


@pytest.fixture
def queries():
    return [{**q, "task": t, "domain": TOY_CARDS[t][0]} for q, t in zip(QUERIES, TASKS, strict=True)]


def test_scores_use_the_querys_metric():
    assert score("em", " Positive. ", "positive") == 1.0
    assert score("em", "negative", "positive") == 0.0
    assert score("bleu", "Das Haus ist klein.", "Das Haus ist klein.") == pytest.approx(1.0)
    assert 0.0 < score("rouge", "Leonardo", "Leonardo da Vinci") < 1.0
    with pytest.raises(ValueError, match="metric 'f1' is not one of"):
        score("f1", "a", "b")


def test_every_method_in_domain_and_out_of_domain(tiny_lm, smol_tokenizer, minilm, toy_pool_dir, queries, tmp_path):
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm)
    try:
        methods = available_methods(lm)  # no gates in this pool: no flow_k3 / meteora_top2
        report = evaluate_tasks(lm, queries, methods, max_new_tokens=4, log=lambda _: None)
        ood = evaluate_tasks(lm, queries, methods, ood=True, max_new_tokens=4, log=lambda _: None)
        with pytest.raises(ValueError, match=r"'flow_k3' needs a flow gate in the pool; train one with"):
            evaluate_tasks(lm, queries, ["flow_k3"], log=lambda _: None)
    finally:
        lm.close()
    assert (
        list(report["methods"])
        == methods
        == [
            "base",
            "oracle",
            "retriever_single",
            "retriever_mixture_k3",
            "retriever_fusion_k3",
            "retriever_fusion_ties_k3",
            "retriever_fusion_dare_linear_k3",
            "retriever_fusion_dare_ties_k3",
            "adaptersoup",
        ]
    )
    assert {r.get("fusion") for r in report["routings"]["retriever_fusion_dare_ties_k3"]} == {"dare_ties"}
    assert "oracle" not in ood["methods"], "OOD removes the own LoRA, so there is no oracle"
    for row in report["methods"].values():
        assert 0.0 <= row["average"] <= 1.0
        assert set(row["by_domain"]) == {TOY_CARDS[t][0] for t in TASKS}
    assert [r["adapters"] for r in report["routings"]["oracle"]] == [[t] for t in TASKS]
    assert [r["adapters"][0] for r in report["routings"]["retriever_mixture_k3"]] == TASKS
    assert report["methods"]["retriever_mixture_k3"]["routing_accuracy"] == {"top1": 1.0, "top3": 1.0}
    assert "routing_accuracy" not in report["methods"]["adaptersoup"]  # pinned, not retrieved
    assert "routing_accuracy" not in ood["methods"]["retriever_mixture_k3"]  # no own LoRA to find
    assert all(r["mode"] == "fusion" and len(r["adapters"]) == 4 for r in report["routings"]["adaptersoup"])
    for method in ("retriever_single", "retriever_mixture_k3", "retriever_fusion_ties_k3", "adaptersoup"):
        for task, routing in zip(TASKS, ood["routings"][method], strict=True):
            assert task not in routing["adapters"], (method, routing)
    write_report(report, queries, tmp_path / "report")
    write_report(ood, queries, tmp_path / "report")
    names = sorted(p.name for p in (tmp_path / "report").iterdir())
    assert names == [
        "results.md",
        "results_ood.md",
        "routing_heatmap.png",
        "routing_heatmap_ood.png",
        "scores.png",
        "scores_ood.png",
        "tasks.png",
        "tasks_ood.png",
    ]
    table = (tmp_path / "report" / "results.md").read_text()
    assert "own LoRA in top-3 |" in table and "| retriever_mixture_k3 |" in table
    assert table.splitlines()[[m for m in report["methods"]].index("adaptersoup") + 2].endswith("| - | - |")


def test_routing_accuracy_ranks_by_weight():
    from loraretriever.engine.routing import Routing
    from loraretriever.evaluation.tasks import routing_accuracy

    queries = [{"task": "a"}, {"task": "b"}, {"task": "c"}]
    routings = [
        Routing(("x", "a"), (0.4, 0.6)),  # own weighted first although listed second
        Routing(("x", "y", "z", "b"), (0.4, 0.3, 0.2, 0.1)),  # own fourth
        Routing(("x", "c", "y"), (0.5, 0.3, 0.2)),  # own second
    ]
    assert routing_accuracy(queries, routings) == {"top1": round(1 / 3, 4), "top3": round(2 / 3, 4)}
    tied = [Routing(("a", "x"), (0.5, 0.5)), Routing(("x", "b"), (0.5, 0.5)), Routing(("c",), (1.0,))]
    assert routing_accuracy(queries, tied)["top1"] == round(2 / 3, 4)  # a tie goes to the first listed


def test_cli_prints_one_json_line(tiny_lm, smol_tokenizer, toy_pool_dir, queries, tmp_path, capsys, monkeypatch):
    model_dir = tmp_path / "tiny_model"
    tiny_lm.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    queries_file = tmp_path / "queries.json"
    queries_file.write_text(json.dumps([*queries, {**queries[0], "task": "unknown_task"}]))
    code = main(
        [
            "eval-tasks",
            "--pool",
            str(toy_pool_dir),
            "--queries",
            str(queries_file),
            "--model",
            str(model_dir),
            "--methods",
            "base",
            "oracle",
            "--only-pool-tasks",
            "--limit",
            "1",
            "--max-new-tokens",
            "3",
            "--json",
        ]
    )
    assert code == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 4 and set(result["methods"]) == {"base", "oracle"}
    only = tmp_path / "only.txt"
    only.write_text("nli\nunknown_task\n")
    command = ["eval-tasks", "--pool", str(toy_pool_dir), "--queries", str(queries_file), "--model", str(model_dir)]
    command += ["--methods", "base", "--max-new-tokens", "1", "--tasks-file", str(only), "--json"]
    assert main(command) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["n"] == 2 and set(result["methods"]["base"]["by_task"]) == {"nli", "unknown_task"}
    only.write_text("nli\nnli_v2\n")
    assert main(command) == 2
    assert "tasks ['nli_v2'] have no queries" in capsys.readouterr().err

    # --embedder: the router embeds with it, so the pool's index must be built with it
    other = tmp_path / "other_embedder"
    shutil.copytree(default_embedder_path(), other)  # the same weights under another name
    pool = tmp_path / "pool_for_other_embedder"
    shutil.copytree(toy_pool_dir, pool, ignore=shutil.ignore_patterns("index"))
    routed = ["eval-tasks", "--pool", str(pool), "--queries", str(queries_file), "--model", str(model_dir)]
    routed += ["--methods", "retriever_mixture_k3", "--only-pool-tasks", "--limit", "1", "--max-new-tokens", "3"]
    assert main(["reindex", "--pool", str(pool)]) == 0
    capsys.readouterr()
    assert main([*routed, "--embedder", str(other)]) == 2
    assert "was built with embedder 'all-MiniLM-L6-v2@" in capsys.readouterr().err
    assert main(["reindex", "--pool", str(pool), "--embedder", str(other)]) == 0
    assert main([*routed, "--embedder", str(other), "--json"]) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["methods"]["retriever_mixture_k3"]["routing_accuracy"]["top1"] == 1.0
