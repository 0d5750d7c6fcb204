"""RoutedLM over a pool directory with the real MiniLM router and an embedded Chroma index."""

from __future__ import annotations

import shutil

import pytest

from loraretriever import AdapterError
from loraretriever.pool.directory import adapter_dirs
from loraretriever.retrieval.cards import RetrievalError
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import TOY_CARDS, save_peft_adapter

QUERIES = {
    "sentiment": "Is this review positive or negative? I loved every minute of it.",
    "translate_de": "Translate to German: My brother lives in Hamburg.",
    "closed_qa": "Answer the question: what is the capital of Canada?",
}


@pytest.fixture
def lm(tiny_lm, smol_tokenizer, minilm, toy_cards, tmp_path):
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=tmp_path / "pool", embedder=minilm)
    for seed, card in enumerate(toy_cards):
        source = save_peft_adapter(tiny_lm, tmp_path / "src" / card.name, r=4, seed=seed)
        lm.add_adapter(source, card)
    yield lm
    lm.close()


def test_prompts_are_routed_to_their_task_adapters(lm):
    results = lm.generate(list(QUERIES.values()), max_new_tokens=3, top_k=2)
    for task, result in zip(QUERIES, results, strict=True):
        assert result.routing.adapters[0] == task, str(result.routing)
        assert len(result.routing.adapters) == 2 and result.routing.similarities[0] > result.routing.similarities[1]
    assert sorted(adapter_dirs(lm.pool_dir)) == sorted(TOY_CARDS)


def test_filters_and_out_of_domain_exclusion_reach_the_router(lm):
    only_b = lm.generate([QUERIES["sentiment"]], max_new_tokens=2, filter={"customer": "b"})[0]
    assert set(only_b.routing.adapters) <= {"translate_de", "closed_qa"}
    ood = lm.generate([QUERIES["sentiment"]], max_new_tokens=2, exclude=["sentiment"])[0]
    assert "sentiment" not in ood.routing.adapters


def test_remove_adapter_stops_routing_and_deletes_its_files(lm):
    lm.remove_adapter("sentiment")
    result = lm.generate([QUERIES["sentiment"]], max_new_tokens=2)[0]
    assert "sentiment" not in result.routing.adapters
    assert "sentiment" not in lm.pool and "sentiment" not in adapter_dirs(lm.pool_dir)


def remove_after_routing(lm: RoutedLM) -> list[str]:
    """Makes the engine's next routing lose its first adapter to a removal before the engine holds
    it (the race of a remove_adapter call during a generate call, made certain)."""
    prepare, removed = lm._loop.prepare, []

    def prepare_then_remove(requests) -> None:
        prepare(requests)
        if not removed:
            removed.append(requests[0].state.routing.adapters[0])
            lm.remove_adapter(removed[0])

    lm._loop.prepare = prepare_then_remove
    return removed


def test_a_prompt_whose_routed_adapter_is_removed_before_it_runs_is_routed_again(lm):
    removed = remove_after_routing(lm)
    result = lm.generate([QUERIES["sentiment"]], max_new_tokens=2, top_k=2)[0]
    assert removed == ["sentiment"]
    assert len(result.routing.adapters) == 2 and "sentiment" not in result.routing.adapters
    assert result.routing.fallback == "routed again: sentiment left the pool"


def test_a_pinned_adapter_removed_before_it_runs_fails_its_request_naming_it(lm):
    removed = remove_after_routing(lm)
    with pytest.raises(KeyError, match="sentiment"):
        lm.generate([QUERIES["sentiment"]], max_new_tokens=2, adapters=["sentiment"])
    assert removed == ["sentiment"]
    assert lm.generate([QUERIES["closed_qa"]], max_new_tokens=2)[0].routing.adapters[0] == "closed_qa"


def test_the_pool_directory_reopens_as_it_was(lm, tiny_lm, smol_tokenizer, minilm):
    expected = [r.routing.adapters for r in lm.generate(list(QUERIES.values()), max_new_tokens=2)]
    reopened = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=lm.pool_dir, embedder=minilm)
    try:
        assert reopened.pool.names == lm.pool.names
        assert [r.routing.adapters for r in reopened.generate(list(QUERIES.values()), max_new_tokens=2)] == expected
    finally:
        reopened.close()


def test_failed_adds_leave_pool_directory_and_index_as_they_were(lm, tiny_lm, tmp_path):
    names, stored = lm.pool.names, sorted(adapter_dirs(lm.pool_dir))
    good = save_peft_adapter(tiny_lm, tmp_path / "good", r=4, seed=42)
    broken = shutil.copytree(good, tmp_path / "broken")
    (broken / "adapter_model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(AdapterError, match="is corrupt"):
        lm.add_adapter(broken, {"samples": ["anything"]})
    with pytest.raises(RetrievalError, match="no samples"):
        lm.add_adapter(good, {"name": "good", "samples": []})
    with pytest.raises(AdapterError, match="already exists"):
        lm.add_adapter(good, {"samples": ["x"]}, name="sentiment")
    assert lm.pool.names == names and sorted(adapter_dirs(lm.pool_dir)) == stored
    routed = lm.generate([QUERIES["sentiment"]], max_new_tokens=2)[0]
    assert routed.routing.adapters[0] == "sentiment"
