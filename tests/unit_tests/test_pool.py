"""LoraPool: real PEFT adapters on disk, validated against a tiny Llama; bad input leaves the pool as it was."""

from __future__ import annotations

import json
import math
import shutil

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import LlamaConfig, LlamaForCausalLM

from loraretriever import AdapterError, Composer, LoraPool, Routing
from tests.conftest import ALL_LINEAR, save_peft_adapter


def test_add_list_get_remove(tiny_model, tiny_adapters):
    pool = LoraPool(tiny_model)
    events = []
    pool.subscribe(lambda event, name: events.append((event, name)))
    assert pool.add(tiny_adapters["qv"]) == "qv"
    assert pool.add(tiny_adapters["all"], name="everything") == "everything"
    assert pool.names == ["everything", "qv"]
    assert "qv" in pool and len(pool) == 2
    adapter = pool.get("qv")
    assert set(adapter.modules) == {f"model.layers.{i}.self_attn.{p}" for i in range(2) for p in ("q_proj", "v_proj")}
    assert adapter.ranks == {4}
    before = pool.fingerprint()
    pool.remove("qv")
    assert pool.names == ["everything"]
    assert pool.fingerprint() != before
    assert events == [("added", "qv"), ("added", "everything"), ("removed", "qv")]
    with pytest.raises(KeyError, match="no adapter named 'qv'"):
        pool.get("qv")
    # a bad name a caller passes is also a ValueError, as every other bad value is
    for call in (lambda: pool.get("qv"), lambda: pool.check_names(["qv"]), lambda: pool.remove("qv")):
        with pytest.raises(ValueError, match="no adapter named 'qv'"):
            call()


def test_heterogeneous_ranks_alphas_and_targets(tiny_model, tiny_adapters):
    pool = LoraPool(tiny_model)
    for name, path in tiny_adapters.items():
        pool.add(path, name=name)
    q_only, full = pool.get("q_only"), pool.get("all")
    assert len(q_only.modules) == 2 and len(full.modules) == 2 * len(ALL_LINEAR)
    assert q_only.ranks == {2} and full.ranks == {8}
    assert next(iter(q_only.modules.values())).scaling == pytest.approx(3 / 2)
    assert next(iter(full.modules.values())).scaling == pytest.approx(4 / 8)


def test_rslora_and_rank_pattern_scaling(tiny_model, make_adapter):
    path = make_adapter(
        r=4, alpha=8, targets=["q_proj", "v_proj"], rank_pattern={"v_proj": 2}, alpha_pattern={"v_proj": 6}
    )
    pool = LoraPool(tiny_model)
    adapter = pool.get(pool.add(path, name="patterned"))
    q, v = adapter.modules["model.layers.0.self_attn.q_proj"], adapter.modules["model.layers.0.self_attn.v_proj"]
    assert (q.rank, q.scaling) == (4, 2.0)
    assert (v.rank, v.scaling) == (2, 3.0)
    rs = pool.get(pool.add(make_adapter(r=4, alpha=8, use_rslora=True), name="rs"))
    assert next(iter(rs.modules.values())).scaling == pytest.approx(8 / math.sqrt(4))


def test_stored_weights_are_held_as_stored_and_cast_per_use(tiny_adapters, tmp_path):
    model = LlamaForCausalLM(LlamaConfig(**{**_tiny_kwargs(), "torch_dtype": "float32"})).to(torch.bfloat16)
    half = shutil.copytree(tiny_adapters["qv"], tmp_path / "half")
    weights = {k: v.half() for k, v in load_file(half / "adapter_model.safetensors").items()}
    save_file(weights, half / "adapter_model.safetensors")
    pool = LoraPool(model)
    stored = pool.get(pool.add(half))
    assert {w.A.dtype for w in stored.modules.values()} == {torch.float16}, "held in the file's dtype"
    in_memory = pool.get(
        pool.add_state_dict("in_memory", json.loads((half / "adapter_config.json").read_text()), weights)
    )
    assert {w.A.dtype for w in in_memory.modules.values()} == {torch.bfloat16}, "a state dict: the model's dtype"
    plan = Composer(model, pool).build_plan([Routing.pinned(["half"]), Routing.pinned(["in_memory"])])
    assert {p.A_t.dtype for p in plan.layers.values()} == {torch.bfloat16}, "cast to the model's dtype per use"
    assert stored.digest == in_memory.digest, "one adapter, one digest, whatever dtype it is held in"


def _tiny_kwargs() -> dict:
    from tests.conftest import TINY_CONFIG

    return TINY_CONFIG.to_dict()


@pytest.fixture
def pool_with_one(tiny_model, tiny_adapters) -> LoraPool:
    pool = LoraPool(tiny_model)
    pool.add(tiny_adapters["qv"], name="kept")
    return pool


def _assert_unchanged(pool: LoraPool, fingerprint: str) -> None:
    assert pool.names == ["kept"]
    assert pool.fingerprint() == fingerprint


def test_name_taken_is_refused(pool_with_one, tiny_adapters):
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="'kept' is already in the pool.*remove"):
        pool_with_one.add(tiny_adapters["all"], name="kept")
    _assert_unchanged(pool_with_one, fingerprint)


@pytest.mark.parametrize("name", ["../evil", "a/b", "a\\b", "", ".hidden", "x" * 200, "a..b"])
def test_unsafe_names_are_refused(pool_with_one, tiny_adapters, name):
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="adapter name .* is not allowed"):
        pool_with_one.add(tiny_adapters["all"], name=name)
    _assert_unchanged(pool_with_one, fingerprint)


def test_shape_mismatch_with_base_model_is_refused(pool_with_one, tmp_path):
    other = LlamaForCausalLM(LlamaConfig(**{**_tiny_kwargs(), "hidden_size": 48, "intermediate_size": 96}))
    path = save_peft_adapter(other, tmp_path / "wide", r=4)
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(
        AdapterError, match=r"adapter 'wide'.*q_proj.*lora_A \(4, 48\).*maps 32 -> 32.*another base model"
    ):
        pool_with_one.add(path)
    _assert_unchanged(pool_with_one, fingerprint)


def test_unknown_target_module_is_refused(pool_with_one, tiny_adapters, tmp_path):
    path = shutil.copytree(tiny_adapters["qv"], tmp_path / "renamed")
    weights = load_file(path / "adapter_model.safetensors")
    weights = {k.replace("q_proj", "query_key_value"): v for k, v in weights.items()}
    save_file(weights, path / "adapter_model.safetensors")
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="query_key_value' is not a Linear layer of the base model"):
        pool_with_one.add(path)
    _assert_unchanged(pool_with_one, fingerprint)


def test_missing_and_corrupt_files_are_refused(pool_with_one, tiny_adapters, tmp_path):
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="does not exist"):
        pool_with_one.add(tmp_path / "nowhere")
    no_config = shutil.copytree(tiny_adapters["qv"], tmp_path / "no_config")
    (no_config / "adapter_config.json").unlink()
    with pytest.raises(AdapterError, match="adapter_config.json' is missing"):
        pool_with_one.add(no_config)
    bad_json = shutil.copytree(tiny_adapters["qv"], tmp_path / "bad_json")
    (bad_json / "adapter_config.json").write_text("{not json")
    with pytest.raises(AdapterError, match="is not valid JSON"):
        pool_with_one.add(bad_json)
    corrupt = shutil.copytree(tiny_adapters["qv"], tmp_path / "corrupt")
    data = (corrupt / "adapter_model.safetensors").read_bytes()
    (corrupt / "adapter_model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(AdapterError, match="is corrupt"):
        pool_with_one.add(corrupt)
    no_weights = shutil.copytree(tiny_adapters["qv"], tmp_path / "no_weights")
    (no_weights / "adapter_model.safetensors").unlink()
    with pytest.raises(AdapterError, match="has no adapter_model.safetensors"):
        pool_with_one.add(no_weights)
    half = shutil.copytree(tiny_adapters["qv"], tmp_path / "half")
    weights = {k: v for k, v in load_file(half / "adapter_model.safetensors").items() if "lora_B" not in k}
    save_file(weights, half / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="has no lora_B weight"):
        pool_with_one.add(half)
    _assert_unchanged(pool_with_one, fingerprint)


def test_non_finite_weights_are_refused(pool_with_one, tiny_adapters, tmp_path):
    path = shutil.copytree(tiny_adapters["qv"], tmp_path / "nan")
    weights = load_file(path / "adapter_model.safetensors")
    key = next(k for k in weights if "lora_B" in k)
    weights[key][0, 0] = float("nan")
    save_file(weights, path / "adapter_model.safetensors")
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="NaN or infinite"):
        pool_with_one.add(path)
    _assert_unchanged(pool_with_one, fingerprint)


def test_pickled_weights_are_refused_unless_opted_in(pool_with_one, tiny_adapters, tmp_path):
    path = shutil.copytree(tiny_adapters["qv"], tmp_path / "pickled")
    weights = load_file(path / "adapter_model.safetensors")
    (path / "adapter_model.safetensors").unlink()
    torch.save(weights, path / "adapter_model.bin")
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match="is a pickle.*allow_pickle=True"):
        pool_with_one.add(path)
    _assert_unchanged(pool_with_one, fingerprint)
    assert pool_with_one.add(path, allow_pickle=True) == "pickled"
    assert torch.equal(
        pool_with_one.get("pickled").modules["model.layers.0.self_attn.q_proj"].A,
        pool_with_one.get("kept").modules["model.layers.0.self_attn.q_proj"].A,
    )


def test_unsupported_adapter_kinds_are_refused(pool_with_one, tiny_adapters, tmp_path):
    dora = shutil.copytree(tiny_adapters["qv"], tmp_path / "dora")
    config = json.loads((dora / "adapter_config.json").read_text())
    (dora / "adapter_config.json").write_text(json.dumps({**config, "use_dora": True}))
    with pytest.raises(AdapterError, match="DoRA"):
        pool_with_one.add(dora)
    extra = shutil.copytree(tiny_adapters["qv"], tmp_path / "extra")
    weights = load_file(extra / "adapter_model.safetensors")
    weights["base_model.model.lm_head.modules_to_save.weight"] = torch.zeros(128, 32)
    save_file(weights, extra / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="lm_head.modules_to_save.weight' is not a LoRA A/B matrix"):
        pool_with_one.add(extra)
    assert pool_with_one.names == ["kept"]


def test_hub_id_that_cannot_be_fetched_is_a_clear_error(pool_with_one):
    with pytest.raises(AdapterError, match="'someone/missing-lora' is not a local directory and could not be fetched"):
        pool_with_one.add("someone/missing-lora")
    assert pool_with_one.names == ["kept"]


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"lora_alpha": float("nan")}, "lora_alpha=nan must be a finite number"),
        ({"lora_alpha": float("inf")}, "lora_alpha=inf must be a finite number"),
        ({"lora_alpha": 1e9}, "scaling .* the limit is 1000"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\]=0 must be a positive integer"),
        ({"alpha_pattern": {"v_proj": float("nan")}}, "alpha_pattern.*must be a finite number"),
    ],
)
def test_out_of_bounds_configs_are_refused(pool_with_one, tiny_adapters, tmp_path, change, message):
    path = shutil.copytree(tiny_adapters["qv"], tmp_path / "bad")
    config = json.loads((path / "adapter_config.json").read_text())
    (path / "adapter_config.json").write_text(json.dumps({**config, **change}))
    fingerprint = pool_with_one.fingerprint()
    with pytest.raises(AdapterError, match=message):
        pool_with_one.add(path)
    _assert_unchanged(pool_with_one, fingerprint)


def test_huge_weights_oversize_ranks_and_files_are_refused(pool_with_one, tiny_model, tiny_adapters, tmp_path):
    fingerprint = pool_with_one.fingerprint()
    scaled = shutil.copytree(tiny_adapters["qv"], tmp_path / "scaled")
    weights = load_file(scaled / "adapter_model.safetensors")
    save_file({k: v * 1e30 if "lora_B" in k else v for k, v in weights.items()}, scaled / "adapter_model.safetensors")
    with pytest.raises(AdapterError, match="largest scaled weight .* the limit is"):
        pool_with_one.add(scaled)
    wide = save_peft_adapter(tiny_model, tmp_path / "wide", r=40, targets=["q_proj"])  # q_proj is 32 -> 32
    with pytest.raises(AdapterError, match="rank 40, over the limit of 32"):
        pool_with_one.add(wide)
    small = LoraPool(tiny_model, max_adapter_bytes=1000)
    with pytest.raises(AdapterError, match="bytes, over the limit of 1,000"):
        small.add(tiny_adapters["qv"])
    assert len(small) == 0
    _assert_unchanged(pool_with_one, fingerprint)
