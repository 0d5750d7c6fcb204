"""``bench lifecycle``: what building and dropping LLM objects costs a process.

LLM objects over one base model share its weights; a dropped object frees its worker thread,
adapters and caches. Measured here in this process: its RSS before and after building, using and
dropping ``objects`` LangChain LLM objects over a copy of a pool directory, with one kept alive.
"""

from __future__ import annotations

import gc
import shutil
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["run_lifecycle_benchmark"]

PROMPT = "Is the following sentence plausible? Tom Brady threw a touchdown."


def _rss_mb() -> float:
    with open("/proc/self/status") as status:  # Linux; the benchmark's figure is for this machine
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("VmRSS:"))


def _our_threads() -> int:
    """loraretriever's threads alive (engine workers, output processors, pool loaders), not
    libraries' own that come and go (tqdm's monitor, timers)."""
    return sum(t.name.startswith(("loraretriever-", "lora-loader")) for t in threading.enumerate())


def _settle() -> None:
    gc.collect()
    time.sleep(2)  # a closed LM hands its freed heap back a moment later


def run_lifecycle_benchmark(
    pool_dir: str | Path, objects: int = 10, model_id: str | None = None, log: Callable[[str], None] = print
) -> dict[str, Any]:
    from langchain_loraretriever import LoraRetrieverLLM

    with tempfile.TemporaryDirectory() as scratch:
        pool = shutil.copytree(pool_dir, Path(scratch) / "pool", ignore=shutil.ignore_patterns("index"))
        start = _rss_mb()
        kept = LoraRetrieverLLM.from_model_id(model_id, pool_dir=pool, max_new_tokens=2)
        kept.invoke(PROMPT)
        with_one = _rss_mb()
        shared = []

        def build_use_drop() -> None:
            llm = LoraRetrieverLLM.from_model_id(model_id, pool_dir=pool, max_new_tokens=2)
            shared.append(llm.lm.model is kept.lm.model)
            llm.invoke(PROMPT)

        build_use_drop()  # the first of a kind warms caches; the growth is counted after it
        _settle()
        base, threads = _rss_mb(), _our_threads()
        for i in range(objects):
            build_use_drop()
            log(f"object {i + 1}/{objects}: RSS {_rss_mb():.0f} MB")
        _settle()
        after, threads_after = _rss_mb(), _our_threads()  # the kept object's threads still run
        kept.close()
    return {
        "objects": objects,
        "first_object_mb": round(with_one - start, 1),
        "rss_growth_mb": round(after - base, 1),
        "rss_growth_per_object_mb": round((after - base) / objects, 2),
        "shared_base_model": all(shared),
        "threads_before_after": [threads, threads_after],
    }
