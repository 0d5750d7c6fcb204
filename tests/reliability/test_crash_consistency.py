"""Fault injection: a process adding or removing an adapter is killed (SIGKILL) at each of its
filesystem and index steps; whoever opens the pool next finds the adapter whole (files, card,
vector, loaded) or absent, no intent, staging or trash left, the other adapters untouched, and a
retried add or remove succeeds. Writes results/reliability/summary.json."""

from __future__ import annotations

import shutil
import signal
import subprocess
import sys
import textwrap

import pytest

from loraretriever.pool.directory import adapter_dirs, intents, leftovers
from loraretriever.retrieval.cards import CardStore
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import save_peft_adapter
from tests.reliability import record_summary

pytestmark = pytest.mark.slow

POINTS_PER_OP = 12  # kill points per operation, spread over all its steps
NEW_CARD = {"samples": ["Summarise this paragraph in one sentence: the meeting moved to Friday."]}

# Runs one add or remove, counting its mutating steps (renames, writes synced, deletions, copies,
# index writes) and killing itself with SIGKILL at step KILL_AT (0: never; prints the count).
CHANGE = """
    import os, shutil, signal, sys
    from loraretriever.retrieval.index import LoraIndex
    from loraretriever.serving.routed_lm import RoutedLM

    model_dir, pool_dir, op, kill_at, source = sys.argv[1:]
    kill_at, steps = int(kill_at), 0
    lm = RoutedLM.from_pretrained(model_dir, pool_dir=pool_dir, device="cpu", dtype="float32")

    def step(owner, name):
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            global steps
            steps += 1
            if steps == kill_at:
                os.kill(os.getpid(), signal.SIGKILL)
            return real(*args, **kwargs)

        setattr(owner, name, counted)

    for name in ("rename", "replace", "unlink", "rmdir", "mkdir", "fsync"):
        step(os, name)
    step(shutil, "copy2")
    step(LoraIndex, "upsert")
    step(LoraIndex, "delete")
    if op == "add":
        lm.add_adapter(source, name="newbie", card={"samples": NEW_SAMPLES})
    else:
        lm.remove_adapter("sentiment")
    print(steps)
""".replace("NEW_SAMPLES", repr(NEW_CARD["samples"]))


@pytest.fixture(scope="module")
def model_dir(tiny_lm, smol_tokenizer, tmp_path_factory):
    directory = tmp_path_factory.mktemp("model")
    tiny_lm.save_pretrained(directory)
    smol_tokenizer.save_pretrained(directory)
    return directory


def run_change(script, model_dir, pool_dir, op, kill_at, source) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(script), str(model_dir), str(pool_dir), op, str(kill_at), str(source)],
        capture_output=True,
        text=True,
        timeout=120,
    )


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
    toy_pool_dir, model_dir, tiny_lm, smol_tokenizer, minilm, tmp_path
):
    script = tmp_path / "change.py"
    script.write_text(textwrap.dedent(CHANGE))
    source = save_peft_adapter(tiny_lm, tmp_path / "newbie", r=4, seed=9)
    others = {"translate_de", "nli", "closed_qa"}
    injected, survived, lost = 0, 0, 0
    for op, name in (("add", "newbie"), ("remove", "sentiment")):
        dry = tmp_path / f"dry-{op}"
        shutil.copytree(toy_pool_dir, dry, ignore=shutil.ignore_patterns("index"))
        done = run_change(script, model_dir, dry, op, 0, source)
        assert done.returncode == 0, done.stderr[-3000:]
        steps = int(done.stdout.strip().splitlines()[-1])
        points = sorted({1 + round(i * (steps - 1) / (POINTS_PER_OP - 1)) for i in range(POINTS_PER_OP)})
        for kill_at in points:
            pool_dir = tmp_path / f"{op}-{kill_at}"
            shutil.copytree(toy_pool_dir, pool_dir, ignore=shutil.ignore_patterns("index"))
            killed = run_change(script, model_dir, pool_dir, op, kill_at, source)
            assert killed.returncode == -signal.SIGKILL, (op, kill_at, killed.stderr[-3000:])
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
