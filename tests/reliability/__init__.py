"""Reliability suites; each records its figures in results/reliability/summary.json."""

from __future__ import annotations

import json
from typing import Any

from tests.conftest import ROOT

SUMMARY = ROOT / "results" / "reliability" / "summary.json"


def record_summary(suite: str, figures: dict[str, Any]) -> None:
    """Sets one suite's entry of the summary, keeping the others'."""
    SUMMARY.parent.mkdir(parents=True, exist_ok=True)
    summary = json.loads(SUMMARY.read_text()) if SUMMARY.is_file() else {}
    summary[suite] = figures
    SUMMARY.write_text(json.dumps(summary, indent=1) + "\n")
