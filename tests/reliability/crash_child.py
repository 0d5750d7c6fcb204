"""The child of the crash-consistency suite: one add or remove that counts its mutating steps
(renames, writes synced, deletions, copies, index writes) and kills itself with SIGKILL at step
``kill_at`` (0: never; it writes the count). Run in processes forked from a server that imported
the library once, so each of the many kills costs the change, not an interpreter start."""

from __future__ import annotations

import os
import shutil
import signal
from pathlib import Path

from loraretriever.retrieval.index import LoraIndex
from loraretriever.serving.routed_lm import RoutedLM

NEW_SAMPLES = ["Summarise this paragraph in one sentence: the meeting moved to Friday."]


def change(model_dir: str, pool_dir: str, op: str, kill_at: int, source: str, count_file: str) -> None:
    steps = 0
    lm = RoutedLM.from_pretrained(model_dir, pool_dir=pool_dir, device="cpu", dtype="float32")

    def step(owner, name: str) -> None:
        real = getattr(owner, name)

        def counted(*args, **kwargs):
            nonlocal steps
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
    Path(count_file).write_text(str(steps))
