"""Router-only overhead, measured: 20 BIG-bench prompts through `serve --backend` against the same
backend asked directly for the routed adapter (two real servers on 127.0.0.1, sequential requests).

Run: .venv/bin/python results/serving/measure_router_only.py > results/serving/router_only.json
"""

from __future__ import annotations

import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import openai

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from tests.conftest import DEMO_POOL, ServeProcess, copy_pool  # noqa: E402


def main() -> None:
    root = Path(tempfile.mkdtemp(prefix="router-only-"))
    backend = ServeProcess(copy_pool(DEMO_POOL, root / "a"), root, api_key="k")
    front = ServeProcess(copy_pool(DEMO_POOL, root / "b"), root, "--backend", backend.url, "--backend-api-key", "k",
                         "--top-k", "1", api_key="k")  # fmt: skip
    try:
        splits = sorted((ROOT / "data" / "bigbench").glob("*.json"))
        prompts = [json.loads(p.read_text())["test"][0]["inputs"] for p in splits][:20]
        via_front = openai.OpenAI(base_url=f"{front.url}/v1", api_key="k")
        direct = openai.OpenAI(base_url=f"{backend.url}/v1", api_key="k")
        routed_s, pinned_s, same = [], [], 0
        for prompt in prompts:
            messages = [{"role": "user", "content": prompt}]
            started = time.perf_counter()
            routed = via_front.chat.completions.create(model="auto", messages=messages, max_tokens=8, temperature=0)
            routed_s.append(time.perf_counter() - started)
            adapter = routed.choices[0].routing["adapters"][0]
            started = time.perf_counter()
            pinned = direct.chat.completions.create(model=adapter, messages=messages, max_tokens=8, temperature=0)
            pinned_s.append(time.perf_counter() - started)
            same += routed.choices[0].message.content == pinned.choices[0].message.content
    finally:
        front.stop()
        backend.stop()
    gaps = [a - b for a, b in zip(routed_s, pinned_s, strict=True)]
    print(
        json.dumps(
            {
                "command": ".venv/bin/python results/serving/measure_router_only.py",
                "requests": len(prompts),
                "via_router_median_s": round(statistics.median(routed_s), 4),
                "direct_pinned_median_s": round(statistics.median(pinned_s), 4),
                "router_overhead_median_ms": round(1000 * statistics.median(gaps), 1),
                "same_text": same,
            }
        )
    )


if __name__ == "__main__":
    main()
