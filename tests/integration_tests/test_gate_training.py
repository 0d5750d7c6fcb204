"""train-gate, gated routing through RoutedLM and the gated eval rows, on a tiny Llama with real
PEFT adapters, the real MiniLM router and Chroma."""

from __future__ import annotations

import json

import pytest

from loraretriever.cli import main
from loraretriever.engine.gates import GateError, gate_dirs, load_gate, save_gate
from loraretriever.engine.routing import Routing
from loraretriever.evaluation.tasks import (
    available_methods,
    build_composites,
    evaluate_composite,
    evaluate_composites,
    evaluate_tasks,
)
from loraretriever.serving.routed_lm import RoutedLM
from loraretriever.training.gates import GateTrainingConfig, load_examples, train_gate
from tests.conftest import TOY_CARDS

EXAMPLES = [
    {
        "inputs": "Is this review positive or negative? A wonderful, warm film.",
        "targets": "positive",
        "task": "sentiment",
    },
    {
        "inputs": "Is this review positive or negative? Dull and far too long.",
        "targets": "negative",
        "task": "sentiment",
    },
    {"inputs": "Translate to German: The house is small.", "targets": "Das Haus ist klein.", "task": "translate_de"},
    {"inputs": "Translate to German: I like tea.", "targets": "Ich mag Tee.", "task": "translate_de"},
    {"inputs": "Answer the question: who painted the Mona Lisa?", "targets": "Leonardo da Vinci", "task": "closed_qa"},
    {"inputs": "Answer the question: what is the capital of Peru?", "targets": "Lima", "task": "closed_qa"},
    {"inputs": "Premise: A man sleeps. Hypothesis: A man is awake. Entailment?", "targets": "no", "task": "nli"},
    {"inputs": "Premise: A dog runs. Hypothesis: An animal moves. Entailment?", "targets": "yes", "task": "nli"},
]


@pytest.fixture
def lm(tiny_lm, smol_tokenizer, minilm, toy_pool_dir):
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm)
    yield lm
    lm.close()


def quiet(_message: str) -> None:
    pass


def test_examples_come_round_robin_over_tasks_and_bad_ones_are_named(tmp_path):
    data = tmp_path / "data.json"
    data.write_text(json.dumps(EXAMPLES))
    assert [e["task"] for e in load_examples(data, 4)] == ["sentiment", "translate_de", "closed_qa", "nli"]
    data.write_text(json.dumps([*EXAMPLES, {"inputs": "x", "targets": "y"}]))
    with pytest.raises(ValueError, match=r"item 8 .* needs 'inputs' and 'task'"):
        load_examples(data)
    data.write_text(json.dumps([*EXAMPLES, {"inputs": "x", "task": "nli"}]))
    with pytest.raises(ValueError, match=r"example 8 of .* has no \['targets'\]"):
        load_examples(data)
    with pytest.raises(ValueError, match="kind='moe' must be 'flow' or 'meteora'"):
        GateTrainingConfig(kind="moe")


def test_flow_gate_trains_and_serves_mixed_batches(lm, toy_pool_dir):
    gate, record = train_gate(lm, EXAMPLES, "flow", GateTrainingConfig(kind="flow", steps=3, batch_size=4), log=quiet)
    assert record["parameters"] == gate.num_parameters == 2 * (3 * 32 + 3)  # 2 layers x (k x hidden + k)
    assert gate.weight.abs().sum() > 0, "training moved the gate"
    save_gate(gate, toy_pool_dir / "gates" / "flow")
    prompts = [e["inputs"] for e in EXAMPLES[::2]]
    routings = lm.route(prompts, mode="flow")
    mixture = lm.route(prompts, mode="mixture")
    assert [r.adapters for r in routings] == [r.adapters for r in mixture]
    assert all(r.mode == "flow" and r.gate == "flow" for r in routings)
    assert "flow[flow]: sentiment" in str(routings[0])
    mixed = [routings[0], mixture[1], Routing.base(), routings[3]]
    together = lm.generate_routed(prompts, mixed, max_new_tokens=6)
    for prompt, routing, result in zip(prompts, mixed, together, strict=True):
        alone = lm.generate_routed([prompt], [routing], max_new_tokens=6)[0]
        assert alone.text == result.text, routing
    with pytest.raises(GateError, match="top_k=4 is more than flow gate 'flow''s 3 slots"):
        lm.route(prompts, mode="flow", top_k=4)


def test_meteora_gate_learns_the_task_labels_and_falls_back_when_the_pool_changes(lm, toy_pool_dir):
    config = GateTrainingConfig(kind="meteora", steps=30, batch_size=8, learning_rate=5e-2, aux_weight=1.0)
    gate, record = train_gate(lm, EXAMPLES, "moe", config, log=quiet)
    assert record["task_ce_last"] < 0.8 * record["task_ce_first"], record  # the gate learns which task a token is
    save_gate(gate, toy_pool_dir / "gates" / "moe")
    reopened = RoutedLM.from_model(lm.model, lm.tokenizer, pool_dir=toy_pool_dir, embedder=lm.router.embedder)
    try:
        assert sorted(reopened.gates) == ["moe"]
        assert reopened.route(["anything"], mode="meteora") == [Routing.meteora("moe")]
        reopened.remove_adapter("nli")
        routed = reopened.route([EXAMPLES[0]["inputs"]], mode="meteora")[0]
        assert routed.mode == "mixture" and routed.adapters[0] == "sentiment"
        assert "meteora gate 'moe': the pool changed since the gate was trained (removed ['nli'])" in routed.fallback
        with pytest.raises(GateError, match="no longer matches the pool"):
            reopened.generate_routed(["hi"], [Routing.meteora("moe")], max_new_tokens=2)
    finally:
        reopened.close()


def test_gated_eval_rows_and_composites(lm):
    queries = [{**e, "domain": TOY_CARDS[e["task"]][0], "metric": "em"} for e in EXAMPLES]
    for kind, name in (("flow", "flow"), ("meteora", "moe")):
        train_gate(lm, EXAMPLES, name, GateTrainingConfig(kind=kind, steps=1, batch_size=2), log=quiet)
    assert available_methods(lm)[-2:] == ["flow_k3", "meteora_top2"]
    report = evaluate_tasks(lm, queries, ["flow_k3", "meteora_top2"], max_new_tokens=3, log=quiet)
    assert all(r["mode"] == "flow" for r in report["routings"]["flow_k3"])
    assert all(r["mode"] == "meteora" for r in report["routings"]["meteora_top2"])
    ood = evaluate_tasks(lm, queries, ["flow_k3", "meteora_top2"], ood=True, max_new_tokens=3, log=quiet)
    assert list(ood["methods"]) == ["flow_k3"], "a meteora gate cannot leave the own LoRA out"
    assert all(q["task"] not in r["adapters"] for q, r in zip(queries, ood["routings"]["flow_k3"], strict=True))
    composites = build_composites(queries, 3, 2)
    assert [len({q["task"] for q in c}) for c in composites] == [3, 3]
    result = evaluate_composite(lm, composites, max_new_tokens=3, log=quiet)
    assert list(result) == ["base", "oracle", "retriever_mixture_k3", "flow_k3", "meteora_top2"]
    assert all(len(row["by_position"]) == 3 and 0 <= row["subtask_score"] <= 1 for row in result.values())
    every = evaluate_composites(lm, queries, [3], ["base"], n_prompts=100, max_new_tokens=2, log=quiet)
    # 4 tasks x 2 queries, each used once: 2 composites of 3 tasks, not the 100 asked for
    assert every["n_composites"] == {"3": 2} and every["n_prompts"] == 100


def test_train_gate_command_stores_the_gate_with_the_pool(tiny_lm, smol_tokenizer, toy_pool_dir, tmp_path, capsys):
    model_dir = tmp_path / "tiny_model"
    tiny_lm.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    data = tmp_path / "data.json"
    data.write_text(json.dumps(EXAMPLES))
    argv = ["train-gate", "--kind", "flow", "--pool", str(toy_pool_dir), "--data", str(data), "--model", str(model_dir)]
    assert main([*argv, "--examples", "4", "--steps", "2", "--batch-size", "2"]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert printed["parameters"] == 198 and printed["examples"] == 4 and printed["tasks"] == 4
    assert list(gate_dirs(toy_pool_dir)) == ["flow"]
    assert load_gate(gate_dirs(toy_pool_dir)["flow"]).config.k == 3
    record = json.loads((gate_dirs(toy_pool_dir)["flow"] / "training.json").read_text())
    assert record["config"]["steps"] == 2
    assert "top_k" not in record["route_options"]  # --top-k is MeteoRA's per-token count, not a routing option


def test_langchain_and_llamaindex_calls_take_the_gated_modes(lm):
    from langchain_loraretriever import LoraRetrieverLLM as LangChainLLM
    from llamaindex_loraretriever import LoraRetrieverLLM as LlamaIndexLLM

    train_gate(lm, EXAMPLES, "flow", GateTrainingConfig(kind="flow", steps=1, batch_size=2), log=quiet)
    train_gate(lm, EXAMPLES, "moe", GateTrainingConfig(kind="meteora", steps=1, batch_size=2), log=quiet)
    llm = LangChainLLM(lm=lm, max_new_tokens=3, mode="flow")
    result = llm.generate([EXAMPLES[0]["inputs"], EXAMPLES[2]["inputs"]])
    assert [g[0].generation_info["routing"]["mode"] for g in result.generations] == ["flow", "flow"]
    bound = llm.bind(mode="meteora", gate="moe").invoke(EXAMPLES[4]["inputs"])  # per-call override of the field
    assert bound == lm.generate([EXAMPLES[4]["inputs"]], mode="meteora", gate="moe", max_new_tokens=3)[0].text
    info = llm.generate([EXAMPLES[4]["inputs"]], mode="meteora").generations[0][0].generation_info
    assert info["routing"] == Routing.meteora("moe").to_dict()
    completion = LlamaIndexLLM(lm, max_new_tokens=3, mode="meteora").complete(EXAMPLES[6]["inputs"])
    assert completion.additional_kwargs["routing"]["gate"] == "moe"
