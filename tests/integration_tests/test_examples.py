"""Every example runs offline, as a user would run it, on a copy of the committed demo pool."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import DEMO_POOL

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def pool_dir(tmp_path_factory) -> Path:
    """A copy, so that the index the examples build lands in a temporary directory."""
    pool_dir = tmp_path_factory.mktemp("demo") / "pool"
    shutil.copytree(DEMO_POOL, pool_dir, ignore=shutil.ignore_patterns("index"))
    return pool_dir


def run_example(name: str, pool_dir: Path, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--pool-dir", str(pool_dir), *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo(pool_dir):
    out = run_example("demo.py", pool_dir, "--prompts", "8", "--max-new-tokens", "8")
    assert "routed to (weight)" in out
    assert "one batched generation: 8 prompts" in out
    top1 = int(out.split("own task LoRA ranked first for ")[1].split("/")[0])
    assert top1 >= 6, out  # routing on held-out prompts of the pool's own tasks


def test_mixed_batch(pool_dir):
    out = run_example("mixed_batch.py", pool_dir)
    assert "-> mixture: word_unscrambling" in out
    assert "-> mixture: object_counting" in out
    assert "-> mixture: intent_recognition" in out
    assert "-> mixture: word_sorting" in out
    assert "batched generations run: 1" in out


def test_agent_chain(pool_dir):
    out = run_example("agent_chain.py", pool_dir)
    assert "unscramble: mixture: word_unscrambling" in out
    assert "sort: mixture: word_sorting" in out
    assert "intent: mixture: intent_recognition" in out


def test_rag_llamaindex(pool_dir):
    out = run_example("rag_llamaindex.py", pool_dir)
    assert "source: 'The Python programming language" in out
    assert "3 concurrent queries served by" in out
