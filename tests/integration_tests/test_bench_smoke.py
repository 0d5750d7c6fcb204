"""Every benchmark command runs end to end with ``--smoke`` (the smallest workload) and prints its JSON."""

from __future__ import annotations

import json

import pytest

from loraretriever.cli import main

pytestmark = pytest.mark.slow


def run_bench(capsys, *args: str) -> dict:
    assert main(["bench", *args, "--smoke", "--json"]) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_bench_serve_smoke(capsys, flan48):
    result = run_bench(capsys, "serve", "--queries", str(flan48 / "test_dev.json"))
    assert result["batch_size"] == 4 and result["new_tokens"] == 2
    methods = {"base", "ours_mixture_k3", "ours_fusion_k3", "ours_single", "paper_union_einsum", "peft_adapter_names"}
    methods.add("hf_generate")
    assert methods <= set(result["tokens_per_s"])
    assert all(v > 0 for v in result["tokens_per_s"].values())
    assert set(result["ours_mixture_k3_by_pool_size"]) == {"pool_8"}
    mixed = result["mixed"]
    assert mixed["prompts"] == 3 and mixed["batch_vs_loop"] > 0 and mixed["same_outputs"]
    for policy in ("continuous", "static"):
        run = mixed[policy]["rate_0.5"]
        assert run["requests"] == 3 and run["completion_tokens"] > 0 and run["ttft_s"]["p99"] > 0
    long = result["long_prompt"]
    assert long["prompt_tokens"] > 60 and set(long["seconds"]) == {"hf_generate", "ours_base", "ours_routed"}
    assert long["repeat_cached_tokens"] > 0  # the repeat's head came from the prefix cache
    agent = result["agent_loop"]
    assert agent["cache_on"]["cached_tokens"][0] == 0 < agent["cache_on"]["cached_tokens"][1]
    assert agent["cache_off"]["cached_tokens"] == [0, 0] and agent["same_answers"]
    assert result["vllm"] is None  # --smoke never starts the peer


def test_bench_serve_quick_keeps_only_the_engine_methods(capsys):
    result = run_bench(capsys, "serve", "--quick", "--queries", "")  # the mixed workload is the smoke test's
    assert result["quick"] and result["rounds"] == 1  # --smoke's sizes win over --quick's
    assert set(result["tokens_per_s"]) == {"base", "ours_mixture_k3", "ours_fusion_k3", "ours_single", "hf_generate"}
    assert result["ours_mixture_k3_by_pool_size"] == {} and result["mixed"] is None


def test_bench_integrations_smoke(capsys):
    result = run_bench(capsys, "integrations")
    assert result["langchain"]["prompts"] == 4 and result["llamaindex"]["calls"] == 2
    assert result["langchain"]["batch_s"] > 0 and result["llamaindex"]["sequential_complete_s"] > 0


def test_bench_gates_smoke(capsys):
    result = run_bench(capsys, "gates")
    assert result and json.dumps(result)


def test_bench_retrieval_smoke(capsys):
    result = run_bench(capsys, "retrieval")
    assert result["loras"] == 50 and result["batch"] == 4 and result["route_ms"] > 0
    assert result["generation_tokens"] == 2 and result["generation_ms"] > 0
    assert result["routing_over_generation"] == pytest.approx(result["route_ms"] / result["generation_ms"], rel=0.01)


def test_bench_load_smoke(capsys):
    result = run_bench(capsys, "load")
    assert result["requests"] == 4 and result["failed"] == 0 and result["all_complete_and_routed"]


def test_bench_scale_smoke(capsys, tmp_path):
    result = run_bench(capsys, "scale", "--root", str(tmp_path))
    assert set(result["by_size"]) == {"6", "12"} and result["resident"]["tokens_per_s"] > 0
    larger = result["by_size"]["12"]
    assert larger["registered"] == 12 and larger["warm_tokens_per_s"] > 0 and larger["cold_loads"] >= 1
    assert larger["host_cache_bytes"] <= result["host_cache_bytes"] and larger["cold_load_p50_s"] > 0
    assert len(list((tmp_path / "pool_12" / "adapters").iterdir())) == 12
