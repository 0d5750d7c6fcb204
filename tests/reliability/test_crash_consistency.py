"""Fault injection: a process adding or removing an adapter is killed (SIGKILL) at each of its
filesystem and index steps; whoever opens the pool next finds the adapter whole (files, card,
vector, loaded) or absent, no intent, staging or trash left, the other adapters untouched, and a
retried add or remove succeeds. Records its figures with tests.reliability.record_summary."""

from __future__ import annotations

import multiprocessing
import shutil
import signal
from pathlib import Path

import pytest

from loraretriever.pool.directory import adapter_dirs, intents, leftovers
from loraretriever.retrieval.cards import CardStore
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import save_peft_adapter
from tests.reliability import record_summary
from tests.reliability.crash_child import NEW_SAMPLES, change

pytestmark = pytest.mark.slow

POINTS_PER_OP = 12  # kill points per operation, spread over all its steps
NEW_CARD = {"samples": NEW_SAMPLES}


@pytest.fixture(scope="module")
def model_dir(tiny_lm, smol_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tiny_lm.save_pretrained(directory)
    smol_tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def forks():
    """Children forked from a server that has imported the library (not from this process, whose
    threads a fork would copy mid-state)."""
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["tests.reliability.crash_child"])
    return context


def run_change(forks, model_dir, pool_dir, op, kill_at, source) -> tuple[int, int | None]:
    """The child's exit code and, if it finished, its count of steps."""
    count = Path(pool_dir).with_name(f"{Path(pool_dir).name}.steps")
    child = forks.Process(target=change, args=(str(model_dir), str(pool_dir), op, kill_at, str(source), str(count)))
    child.start()
    child.join(timeout=120)
    if child.is_alive():
        child.kill()
        child.join()
    return child.exitcode, int(count.read_text()) if count.is_file() else None


def state(lm: RoutedLM, pool_dir) -> dict:
    cards = CardStore(pool_dir / "cards")
    return {
        "stored": set(adapter_dirs(pool_dir)),
        "cards": set(cards.names),
        "indexed": set(lm.router.index.digests()),
        "loaded": set(lm.pool.names),
        "intents": intents(pool_dir),
        "leftovers": [str(p) for p in leftovers(pool_dir)] + [str(p) for p in (pool_dir / "cards").glob(".*.tmp")],
    }


def test_a_kill_at_any_step_of_add_or_remove_leaves_a_whole_pool(
    toy_pool_dir, model_dir, forks, tiny_lm, smol_tokenizer, minilm, tmp_path
):
    source = save_peft_adapter(tiny_lm, tmp_path / "newbie", r=4, seed=9)
    others = {"translate_de", "nli", "closed_qa"}
    injected, survived, lost = 0, 0, 0
    for op, name in (("add", "newbie"), ("remove", "sentiment")):
        dry = tmp_path / f"dry-{op}"
        shutil.copytree(toy_pool_dir, dry, ignore=shutil.ignore_patterns("index"))
        code, steps = run_change(forks, model_dir, dry, op, 0, source)
        assert code == 0 and steps, (op, code)
        points = sorted({1 + round(i * (steps - 1) / (POINTS_PER_OP - 1)) for i in range(POINTS_PER_OP)})
        for kill_at in points:
            pool_dir = tmp_path / f"{op}-{kill_at}"
            shutil.copytree(toy_pool_dir, pool_dir, ignore=shutil.ignore_patterns("index"))
            code, _ = run_change(forks, model_dir, pool_dir, op, kill_at, source)
            assert code == -signal.SIGKILL, (op, kill_at, code)
            injected += 1
            with RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=pool_dir, embedder=minilm) as lm:
                after = state(lm, pool_dir)
                present = {name in after[k] for k in ("stored", "cards", "indexed", "loaded")}
                assert len(present) == 1, (op, kill_at, after)  # whole or absent
                assert after["intents"] == {} and after["leftovers"] == [], (op, kill_at, after)
                kept = others | ({"sentiment"} if op == "add" else set())
                for key in ("stored", "cards", "indexed", "loaded"):
                    lost += len(kept - after[key])
                if op == "add" and name not in after["loaded"]:
                    lm.add_adapter(source, name=name, card=NEW_CARD)  # the retry succeeds
                if op == "remove" and name in after["loaded"]:
                    lm.remove_adapter(name)
                final = state(lm, pool_dir)
                assert all((name in final[k]) == (op == "add") for k in ("stored", "cards", "indexed", "loaded"))
            survived += 1
    assert lost == 0 and injected >= 20
    record_summary(
        "crash_consistency",
        {
            "command": "pytest tests/reliability/test_crash_consistency.py",
            "faults_injected": injected,
            "survived": survived,
            "adapters_lost": lost,
            "points_per_op": POINTS_PER_OP,
        },
    )
