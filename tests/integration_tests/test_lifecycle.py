"""The lifecycle of an LLM object: close() and ``with`` release the worker thread, hooks and router;
a dropped object frees itself; a script that never closes exits cleanly; LLM objects over one base
model share its weights (``bench lifecycle`` measures what building and dropping them costs)."""

from __future__ import annotations

import gc
import json
import subprocess
import sys
import textwrap
import threading
import weakref
from concurrent.futures import ThreadPoolExecutor

import pytest

from langchain_loraretriever import ChatLoraRetriever
from llamaindex_loraretriever import LoraRetrieverLLM
from loraretriever.serving.routed_lm import RoutedLM
from tests.conftest import DEMO_POOL


def engine_threads() -> int:
    return sum(t.name == "loraretriever-engine" and t.is_alive() for t in threading.enumerate())


def test_close_and_with_release_the_worker_and_hooks(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    before = engine_threads()
    with RoutedLM.from_model(tiny_lm, smol_tokenizer, adapters=tiny_lm_adapters, max_wait_ms=0) as lm:
        lm.generate(["hello"], max_new_tokens=2, adapters=["a"])
        assert engine_threads() == before + 1 and lm.composer._hooks
    assert engine_threads() == before and not lm.composer._hooks
    with pytest.raises(RuntimeError, match="closed"):
        lm.generate(["hello"], max_new_tokens=2)
    lm.close()  # idempotent
    for make in (lambda lm: ChatLoraRetriever(lm=lm, max_new_tokens=2), lambda lm: LoraRetrieverLLM(lm, max_tokens=2)):
        with make(RoutedLM.from_model(tiny_lm, smol_tokenizer, max_wait_ms=0)) as wrapper:
            wrapper.invoke("hello") if hasattr(wrapper, "invoke") else wrapper.complete("hello")
        assert engine_threads() == before


def test_a_dropped_lm_is_collected_and_stops_its_worker(tiny_lm, smol_tokenizer, toy_pool_dir, minilm):
    before = engine_threads()
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=toy_pool_dir, embedder=minilm, max_wait_ms=0)
    lm.generate(["hello"], max_new_tokens=2)
    alive = weakref.ref(lm)
    del lm
    gc.collect()
    assert alive() is None, "nothing (the worker thread included) keeps a dropped LM alive"
    assert engine_threads() == before


def run_script(code: str, tmp_path) -> subprocess.CompletedProcess:
    tmp_path.mkdir(parents=True, exist_ok=True)
    script = tmp_path / "script.py"
    script.write_text(textwrap.dedent(code))
    return subprocess.run(
        [sys.executable, str(script), str(DEMO_POOL)], capture_output=True, text=True, timeout=300, cwd=tmp_path
    )


@pytest.mark.slow
def test_a_script_that_never_closes_exits_cleanly(tmp_path):
    """It used to abort ("terminate called without an active exception", exit 134) in about half
    the runs: the batching thread was still up while the interpreter tore down."""
    code = """
        import shutil, sys, tempfile
        from langchain_loraretriever import LoraRetrieverLLM
        pool = shutil.copytree(sys.argv[1], tempfile.mkdtemp() + "/pool", ignore=shutil.ignore_patterns("index"))
        llm = LoraRetrieverLLM.from_model_id(pool_dir=pool, max_new_tokens=4)
        print(repr(llm.invoke("Is the following sentence plausible? Tom Brady threw a touchdown.")))
        stream = llm.stream("Is the following sentence plausible? Joao Moutinho caught the screen pass.")
        next(stream)  # and leave it open
    """
    with ThreadPoolExecutor(3) as runs:  # three at once: the abort showed in about half the runs
        for done in runs.map(lambda i: run_script(code, tmp_path / str(i)), range(3)):
            assert done.returncode == 0, done.stderr[-2000:]


@pytest.mark.slow
def test_bench_lifecycle_shares_the_base_model_and_stops_every_worker(tmp_path):
    """`bench lifecycle` in a fresh process (its RSS figures, for 10 objects, are in
    results/lifecycle.json): dropped objects share the kept one's base model and leave no thread."""
    code = f"""
        import sys
        from loraretriever.cli import main
        sys.exit(main(["bench", "lifecycle", "--pool", {str(DEMO_POOL)!r}, "--smoke", "--json"]))
    """
    done = run_script(code, tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    figures = json.loads(done.stdout.strip().splitlines()[-1])
    assert figures["objects"] == 2 and figures["shared_base_model"], figures
    assert figures["threads_before_after"][0] == figures["threads_before_after"][1], figures
