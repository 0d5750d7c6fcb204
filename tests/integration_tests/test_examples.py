"""Every example runs offline, as a user would run it, on a demo pool trained for one step per LoRA."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from loraretriever.demo_pool import build_demo_pool, find_flan48
from loraretriever.lora_training import LoraTrainingConfig

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def flan_dir() -> Path:
    try:
        return find_flan48(ROOT)
    except FileNotFoundError as err:
        pytest.skip(str(err))


@pytest.fixture(scope="module")
def pool_dir(smollm, flan_dir, tmp_path_factory) -> Path:
    pool_dir = tmp_path_factory.mktemp("demo_pool")
    model, tokenizer = smollm
    trained = build_demo_pool(pool_dir, model, tokenizer, flan_dir, config=LoraTrainingConfig(steps=1))
    assert len(trained) == 4
    assert build_demo_pool(pool_dir, model, tokenizer, flan_dir) == [], "a complete pool is not retrained"
    return pool_dir


def run_example(name: str, pool_dir: Path, *args: str) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1"}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / name), "--pool-dir", str(pool_dir), "--train-steps", "1", *args],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    return done.stdout


def test_demo(pool_dir):
    out = run_example("demo.py", pool_dir, "--per-task", "2", "--max-new-tokens", "8")
    assert "routed to (weight)" in out
    assert "one batched generation: 8 prompts" in out
    assert "routing: own task's LoRA ranked first for" in out


def test_mixed_batch(pool_dir):
    out = run_example("mixed_batch.py", pool_dir)
    assert "-> mixture: wmt16_translate_deen" in out  # the translation prompt is routed to the translation LoRA
    assert "-> mixture: sst2" in out
    assert "batched generations run: 1" in out


def test_agent_chain(pool_dir):
    out = run_example("agent_chain.py", pool_dir)
    assert "translate: mixture: wmt16_translate_deen" in out
    assert "classify: mixture: sst2" in out
    assert "paraphrase: mixture:" in out


def test_rag_llamaindex(pool_dir):
    out = run_example("rag_llamaindex.py", pool_dir)
    assert "source: 'The Python programming language" in out
    assert "3 concurrent queries served by" in out
