"""Every Python block of the README runs as written, in order, on a copy of the demo pool (a block
marked ``<!-- readme-test: skip (reason) -->`` needs what a test cannot give it, said in the reason)."""

from __future__ import annotations

import re
import shutil

import pytest

from tests.conftest import DEMO_POOL, ROOT

pytestmark = pytest.mark.slow

_BLOCK = re.compile(r"(<!-- readme-test: skip \((?P<reason>[^)]*)\) -->\n)?```python\n(?P<code>.*?)```", re.DOTALL)


def readme_blocks() -> list[tuple[str, str | None]]:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    return [(m["code"], m["reason"]) for m in _BLOCK.finditer(text)]


def test_the_readme_blocks_run(tmp_path, monkeypatch):
    blocks = readme_blocks()
    assert len(blocks) >= 4 and all(reason for _, reason in blocks if reason is not None)
    shutil.copytree(DEMO_POOL, tmp_path / "pools" / "bigbench", ignore=shutil.ignore_patterns("index"))
    monkeypatch.chdir(tmp_path)  # "pools/bigbench" in the README is the copy: the quick start adds a LoRA
    namespace: dict = {"__name__": "readme"}
    try:
        for i, (code, reason) in enumerate(blocks):
            if reason is None:
                # dont_inherit: this module's `from __future__ import annotations` is not the reader's
                exec(compile(code, f"README.md python block {i}", "exec", dont_inherit=True), namespace)
        assert len(namespace["results"]) == 3 and all(r.routing.adapters for r in namespace["results"])
        assert "tense_v2" in namespace["lm"].pool
    finally:
        if "lm" in namespace:
            namespace["lm"].close()
