"""A plain (non-editable) install gives all three import packages, `loraretriever` from `core/`."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


def test_editable_install_maps_core_loraretriever_to_the_package():
    import loraretriever

    assert Path(loraretriever.__file__).resolve().parent == ROOT / "core" / "loraretriever"


@pytest.mark.slow
def test_plain_install_imports_every_package(tmp_path):
    target = tmp_path / "site"
    build = subprocess.run(
        [
            sys.executable,
            "-m",
            "pip",
            "install",
            "--quiet",
            "--no-deps",
            "--no-build-isolation",
            "--target",
            str(target),
            str(ROOT),
        ],
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert build.returncode == 0, build.stderr[-2000:]
    assert (target / "loraretriever" / "engine" / "composer.py").is_file()
    code = (
        "import loraretriever, langchain_loraretriever, llamaindex_loraretriever, loraretriever.cli.bench;"
        "print(loraretriever.__file__)"
    )
    env = {**os.environ, "PYTHONPATH": str(target)}
    done = subprocess.run(
        [sys.executable, "-c", code], cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert done.stdout.strip().startswith(str(target))
