"""`serve --ray --replicas 2` on a local Ray cluster: two replicas behind Ray's proxy share one pool
directory and one Chroma server; an adapter added through one is served by both."""

from __future__ import annotations

import time

import httpx
import pytest

from tests.conftest import ServeProcess, save_peft_adapter

pytestmark = pytest.mark.slow
KEY = "sk-test"
GERMAN = "Translate to German: my brother lives in a small house by the sea."


def replicas_seen(url: str, tries: int = 40) -> dict[str, list[str]]:
    """The adapters each replica lists, by the replica that answered."""
    seen: dict[str, list[str]] = {}
    for _ in range(tries):
        response = httpx.get(f"{url}/v1/models", headers={"Authorization": f"Bearer {KEY}"}, timeout=30)
        if response.status_code == 200:
            seen[response.headers["x-loraretriever-replica"]] = [m["id"] for m in response.json()["data"]]
    return seen


def test_two_ray_replicas_share_the_pool(toy_pool_dir, tiny_lm, smol_tokenizer, tmp_path, start_chroma_server):
    model_dir = tmp_path / "model"
    tiny_lm.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    chroma = start_chroma_server()
    args = ["--ray", "--replicas", "2", "--replica-cpus", "0.5", "--model", str(model_dir)]
    args += ["--chroma-host", chroma.host, "--chroma-port", str(chroma.port), "--top-k", "1"]
    server = ServeProcess(toy_pool_dir, tmp_path, *args)
    try:
        deadline = time.monotonic() + 120
        while len(seen := replicas_seen(server.url, 10)) < 2 and time.monotonic() < deadline:
            time.sleep(1)
        assert len(seen) == 2, seen  # both replicas answer behind the one address
        assert all(
            sorted(names) == ["auto", "closed_qa", "nli", "sentiment", "translate_de"] for names in seen.values()
        )

        body = {"model": "auto", "messages": [{"role": "user", "content": GERMAN}], "max_tokens": 3, "temperature": 0}
        headers = {"Authorization": f"Bearer {KEY}"}
        answers = [
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) for _ in range(8)
        ]
        assert {a.headers["x-loraretriever-replica"] for a in answers} == set(seen)
        assert {tuple(a.json()["choices"][0]["routing"]["adapters"]) for a in answers} == {("translate_de",)}

        source = save_peft_adapter(tiny_lm, tmp_path / "src" / "recipes", r=2, seed=11)
        card = {"samples": ["How do I bake a lemon cake?", "A recipe for tomato soup, please."]}
        added = httpx.post(f"{server.url}/v1/adapters", json={"source": str(source), "card": card}, headers=headers)
        assert added.status_code == 201, added.text
        deadline = time.monotonic() + 10  # every replica serves it within a few seconds
        while time.monotonic() < deadline:
            seen = replicas_seen(server.url, 10)
            if len(seen) == 2 and all("recipes" in names for names in seen.values()):
                break
            time.sleep(0.5)
        assert len(seen) == 2 and all("recipes" in names for names in seen.values()), seen
        body["messages"][0]["content"] = "Give me a recipe for apple pie."
        routed = [
            httpx.post(f"{server.url}/v1/chat/completions", json=body, headers=headers, timeout=60) for _ in range(6)
        ]
        assert {tuple(r.json()["choices"][0]["routing"]["adapters"]) for r in routed} == {("recipes",)}
    finally:
        server.stop()
