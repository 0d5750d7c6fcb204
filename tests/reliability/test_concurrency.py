"""64 threads mixing generate, add and remove on one pool directory: every generation gets a
result routed to adapters that existed, the worker never dies, and the pool ends consistent
(files, cards, index and loaded adapters agree; `pool check` is clean). Writes its figures to
results/reliability/summary.json."""

from __future__ import annotations

import threading

import pytest

from loraretriever.pool.directory import adapter_dirs
from loraretriever.retrieval.cards import CardStore
from loraretriever.serving.adapters import check_pool_dir
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import TOY_CARDS, save_peft_adapter
from tests.reliability import record_summary

pytestmark = pytest.mark.slow

THREADS, ADDERS, REMOVERS = 64, 8, 4
PROMPTS = [sample for _, samples in TOY_CARDS.values() for sample in samples]


def test_64_threads_of_generate_add_and_remove(toy_pool_dir, tiny_lm, smol_tokenizer, minilm, tmp_path):
    sources = [save_peft_adapter(tiny_lm, tmp_path / f"new{i}", r=2, seed=20 + i) for i in range(ADDERS)]
    removable = sorted(adapter_dirs(toy_pool_dir))[:REMOVERS]
    errors: list[str] = []
    generated = []
    lock = threading.Lock()
    start = threading.Barrier(THREADS)
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm, max_wait_ms=2)

    def generate(i: int) -> None:
        start.wait()
        for j in range(3):
            result = lm.complete(PROMPTS[(i + j) % len(PROMPTS)], max_new_tokens=2)
            with lock:
                generated.append(result.routing.adapters)

    def add(i: int) -> None:
        start.wait()
        lm.add_adapter(sources[i], name=f"new{i}", card={"samples": [f"Task {i}: count the letters of a word."]})

    def remove(i: int) -> None:
        start.wait()
        lm.remove_adapter(removable[i])

    def guarded(work, i: int) -> None:
        try:
            work(i)
        except Exception as error:  # every failure is a finding: no request may fail here
            with lock:
                errors.append(f"{work.__name__}({i}): {type(error).__name__}: {error}")

    workers = [threading.Thread(target=guarded, args=(add, i)) for i in range(ADDERS)]
    workers += [threading.Thread(target=guarded, args=(remove, i)) for i in range(REMOVERS)]
    workers += [threading.Thread(target=guarded, args=(generate, i)) for i in range(THREADS - ADDERS - REMOVERS)]
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.join(timeout=300)
        assert not any(w.is_alive() for w in workers), "a thread hung"
        assert errors == []
        assert lm.complete(PROMPTS[0], max_new_tokens=2).completion_tokens >= 1, "the worker still serves"
        names = {f"new{i}" for i in range(ADDERS)} | (set(TOY_CARDS) - set(removable))
        assert set(adapter_dirs(toy_pool_dir)) == names
        assert set(lm.pool.names) == names == set(CardStore(toy_pool_dir / "cards").names)
        assert set(lm.router.index.digests()) == names
        known = set(TOY_CARDS) | {f"new{i}" for i in range(ADDERS)}
        assert all(set(adapters) <= known for adapters in generated)
    finally:
        lm.close()
    assert check_pool_dir(toy_pool_dir) == []
    record_summary(
        "concurrency",
        {
            "command": "pytest tests/reliability/test_concurrency.py",
            "threads": THREADS,
            "generations": len(generated),
            "adds": ADDERS,
            "removes": REMOVERS,
            "failed_requests": len(errors),
            "inconsistencies": 0,
        },
    )
