"""Reliability suites; each records its figures in a summary JSON.

The summary goes to the system's temporary directory, so `make test` never writes into the
repository; `LORARETRIEVER_RECORD_RESULTS=1 pytest tests/reliability` records the committed figures
in results/reliability/summary.json.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path
from typing import Any

from filelock import FileLock

from tests.conftest import ROOT

COMMITTED = ROOT / "results" / "reliability" / "summary.json"


def summary_path() -> Path:
    if os.environ.get("LORARETRIEVER_RECORD_RESULTS") == "1":
        return COMMITTED
    return Path(tempfile.gettempdir()) / "loraretriever-reliability-summary.json"


def record_summary(suite: str, figures: dict[str, Any]) -> None:
    """Sets one suite's entry of the summary, keeping the others' (under a lock and replaced whole:
    suites in other test processes write it too)."""
    path = summary_path()
    path.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(f"{path}.lock"):
        summary = json.loads(path.read_text()) if path.is_file() else {}
        summary[suite] = figures
        staging = path.with_name(f".{path.name}.{os.getpid()}.tmp")
        staging.write_text(json.dumps(summary, indent=1) + "\n")
        os.replace(staging, path)
