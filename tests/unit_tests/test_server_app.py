"""The server app in process (Starlette's TestClient runs its lifespan) on the tiny Llama: 503 while
the model loads or after it failed to load, and the `serve` command's refusals before loading."""

from __future__ import annotations

import threading

import pytest
from fastapi.testclient import TestClient

from loraretriever.cli import main
from loraretriever.server.app import create_app
from loraretriever.server.config import ServerConfig
from loraretriever.serving.routed_lm import RoutedLM

CHAT = {"model": "auto", "messages": [{"role": "user", "content": "Name a colour:"}], "max_tokens": 2}


def test_503_while_loading_then_served(tiny_lm, smol_tokenizer):
    release = threading.Event()

    def load() -> RoutedLM:
        release.wait(30)
        return RoutedLM.from_model(tiny_lm, smol_tokenizer)

    with TestClient(create_app(load)) as client:
        assert client.get("/health").json() == {"status": "loading"}
        waiting = client.post("/v1/chat/completions", json=CHAT)
        assert waiting.status_code == 503 and waiting.headers["retry-after"] == "5"
        assert "loading" in waiting.json()["error"]["message"]
        release.set()
        for _ in range(300):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        reply = client.post("/v1/chat/completions", json={**CHAT, "temperature": 0})
        assert reply.status_code == 200 and reply.json()["choices"][0]["routing"]["fallback"]  # no router: base


def test_a_failed_load_is_reported(tiny_lm):
    def load() -> RoutedLM:
        raise FileNotFoundError("no model at /nowhere")

    with TestClient(create_app(load)) as client:
        for _ in range(100):
            if client.get("/health").json()["status"] != "loading":
                break
            threading.Event().wait(0.05)
        health = client.get("/health")
        assert health.status_code == 503 and "no model at /nowhere" in health.json()["error"]
        assert "failed to load" in client.get("/v1/models").json()["error"]["message"]


@pytest.mark.parametrize(
    ("config", "match"),
    [({"max_pending": 0}, "max_pending=0"), ({"api_key": " "}, "api_key is empty"), ({"retry_after_s": 1.5}, "1.5")],
)
def test_server_config_checks(config, match):
    with pytest.raises(ValueError, match=match):
        ServerConfig(**config)


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["--pool", "/no/such/pool"], "is not a directory"),
        (["--port", "70000"], "not a port number"),
        (["--replicas", "2"], "needs --ray"),
        (["--ray", "--replicas", "2"], "chroma run"),
        (["--backend", "gpu-1:8000"], "not a URL"),
        (["--top-k", "0"], "top_k=0"),
    ],
)
def test_serve_refuses_bad_flags_before_loading(args, match, tmp_path, capsys):
    pool = ["--pool", str(tmp_path)] if "--pool" not in args else []
    assert main(["serve", *pool, *args]) == 2
    assert match in capsys.readouterr().err


def test_repetition_penalty_is_passed_to_generation(tiny_lm, smol_tokenizer):
    """vLLM's extra parameter: the reply equals the library's answer with the same penalty (the
    random model only repeats when rewarded, so a penalty below 1 shows it is applied)."""
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, max_wait_ms=0)
    body = {**CHAT, "temperature": 0, "max_tokens": 12}
    with TestClient(create_app(lambda: lm)) as client:
        for _ in range(300):
            if client.get("/health").status_code == 200:
                break
            threading.Event().wait(0.05)
        penalized = client.post("/v1/chat/completions", json={**body, "repetition_penalty": 0.5}).json()
        plain = client.post("/v1/chat/completions", json=body).json()
        expected = lm.complete(CHAT["messages"], max_new_tokens=12, repetition_penalty=0.5).text
        assert penalized["choices"][0]["message"]["content"] == expected != plain["choices"][0]["message"]["content"]
        assert client.post("/v1/chat/completions", json={**body, "repetition_penalty": 0}).status_code == 400


def test_adding_an_adapter_whose_name_is_taken_is_a_409_however_it_was_added(tiny_lm, smol_tokenizer, tiny_lm_adapters):
    """An adapter given with adapters= (not stored in a pool directory) takes its name too: adding
    another of that name is a conflict, not a bad request (the status was chosen by message text)."""
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, adapters={"a": tiny_lm_adapters["a"]})
    config = ServerConfig(api_key="k")
    with TestClient(create_app(lm, config)) as client:
        headers = {"Authorization": "Bearer k"}
        again = client.post("/v1/adapters", json={"source": str(tiny_lm_adapters["b"]), "name": "a"}, headers=headers)
        assert again.status_code == 409, again.json()
        assert again.json()["error"]["param"] == "name" and "'a'" in again.json()["error"]["message"]
        broken = client.post("/v1/adapters", json={"source": "/no/such/adapter", "name": "c"}, headers=headers)
        assert broken.status_code == 400 and broken.json()["error"]["param"] == "source"
    lm.close()


def test_the_status_comes_from_the_error_type_alone():
    """A bug's KeyError or ValueError is a 500, never "not found" or "bad request"; the library's
    errors answer with their own status and name their parameter."""
    from loraretriever.engine.requests import GenerationConfig, PromptTooLong
    from loraretriever.errors import PoolBusyError
    from loraretriever.pool.lora_pool import UnknownAdapterError
    from loraretriever.server.errors import from_library_error

    assert from_library_error(KeyError("max_new_tokens")).status == 500
    assert from_library_error(ValueError("invalid literal for int()")).status == 500
    assert from_library_error(UnknownAdapterError("no adapter named 'x'")).status == 404
    with pytest.raises(ValueError) as bad:  # still a ValueError for callers that catch one
        GenerationConfig(top_p=2)
    api = from_library_error(bad.value)
    assert (api.status, api.param) == (400, "top_p") and "top_p=2" in api.message
    assert (
        from_library_error(PromptTooLong("prompt 0 has 9 tokens; shorten it or pass truncation='left'")).status == 413
    )
    assert from_library_error(PoolBusyError("the pool is locked")).status == 503
