"""A pool for the user's own model, through the CLI: the pool records its base model
(``pool.json``), later commands default to it, and another model is refused whole, without moving
a valid adapter to quarantine. Tiny Qwen2 and Mistral models with real PEFT adapters. Commands that
open the pool's index, and writers beside other processes, run in processes of their own; a
``pool add`` on its own (it opens no index) runs the CLI's ``main`` in this process."""

from __future__ import annotations

import contextlib
import io
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from transformers import MistralConfig, MistralForCausalLM, Qwen2Config, Qwen2ForCausalLM

from tests.conftest import save_peft_adapter

pytestmark = pytest.mark.slow


def tiny(kind, config_class, smol_tokenizer, hidden: int):
    torch.manual_seed(0)
    config = config_class(
        vocab_size=len(smol_tokenizer),
        hidden_size=hidden,
        intermediate_size=2 * hidden,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        eos_token_id=smol_tokenizer.eos_token_id,
        pad_token_id=smol_tokenizer.pad_token_id,
    )
    return kind(config).eval()


@pytest.fixture(scope="module")
def models(smol_tokenizer, tmp_path_factory) -> dict[str, Path]:
    """A tiny Qwen2 (the user's model) and a tiny Mistral of another width (a wrong --model), saved
    as a user's local model directories, and PEFT adapters of the Qwen2."""
    root = tmp_path_factory.mktemp("models")
    qwen = tiny(Qwen2ForCausalLM, Qwen2Config, smol_tokenizer, hidden=32)
    mistral = tiny(MistralForCausalLM, MistralConfig, smol_tokenizer, hidden=48)
    for name, model in (("qwen", qwen), ("mistral", mistral)):
        model.save_pretrained(root / name)
        smol_tokenizer.save_pretrained(root / name)
    for seed, name in enumerate(("fr", "senti", "summ")):
        save_peft_adapter(qwen, root / "adapters" / name, r=4, seed=seed, targets=["q_proj", "v_proj"])
    cards = {
        "fr": ["Translate to French: the cat sleeps", "Translate to French: good morning"],
        "senti": ["Is this review positive or negative? I loved it", "Sentiment of: awful service"],
        "summ": ["Summarize: the meeting moved to Tuesday because of the storm"],
    }
    for name, samples in cards.items():
        (root / "adapters" / f"{name}.card.json").write_text(json.dumps({"samples": samples}))
    return {"root": root, "qwen": root / "qwen", "mistral": root / "mistral", "adapters": root / "adapters"}


def cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    """``loraretriever ARGS`` in a process of its own, as a user's shell runs it."""
    return subprocess.run(
        [sys.executable, "-c", "import sys; from loraretriever.cli import main; sys.exit(main())", *args],
        cwd=cwd,
        env={**os.environ, "HF_HUB_OFFLINE": "1"},
        capture_output=True,
        text=True,
        timeout=300,
    )


def in_process(*args: str) -> subprocess.CompletedProcess:
    """``loraretriever ARGS`` through the CLI's ``main`` in this process (exit status and output as
    a process would give them)."""
    from loraretriever.cli import main

    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            code = main(list(args))
        except SystemExit as exit_:
            code = exit_.code if isinstance(exit_.code, int) else 1
    return subprocess.CompletedProcess(list(args), code, out.getvalue(), err.getvalue())


def add(models, pool: Path, name: str, *extra: str, process: bool = False) -> subprocess.CompletedProcess:
    source = models["adapters"]
    run = (lambda *args, cwd: cli(*args, cwd=cwd)) if process else (lambda *args, cwd: in_process(*args))
    return run(
        "pool",
        "add",
        name,
        str(source / name),
        "--card",
        str(source / f"{name}.card.json"),
        "--pool",
        str(pool),
        *extra,
        cwd=models["root"],
    )


def test_a_pool_remembers_its_model_and_refuses_another_without_quarantining(models, tmp_path):
    pool = tmp_path / "pool"
    done = add(models, pool, "fr", "--create", "--model", str(models["qwen"]))
    assert done.returncode == 0, done.stderr[-2000:]
    manifest = json.loads((pool / "pool.json").read_text())
    assert manifest["base_model"]["id"] == str(models["qwen"].resolve())
    assert manifest["base_model"]["fingerprint"]["architecture"] == "Qwen2ForCausalLM"
    assert manifest["format"] == 1 and manifest["created"] <= manifest["updated"]

    # a forgotten --model: the pool's own model, not the packaged default
    done = add(models, pool, "senti")
    assert done.returncode == 0, done.stderr[-2000:]

    # a wrong --model: refused before anything is touched, naming both models
    done = add(models, pool, "summ", "--model", str(models["mistral"]))
    assert done.returncode == 2
    assert str(models["qwen"].resolve()) in done.stderr and str(models["mistral"].resolve()) in done.stderr
    assert "Qwen2ForCausalLM" in done.stderr and "MistralForCausalLM" in done.stderr
    assert sorted(p.name for p in (pool / "adapters").iterdir()) == ["fr", "senti"]
    assert not (pool / "quarantine").exists()

    # the model moved: the recorded path names the fix; given from its new place, the pool opens
    moved = tmp_path / "qwen-moved"
    shutil.copytree(models["qwen"], moved)
    manifest = json.loads((pool / "pool.json").read_text())
    manifest["base_model"]["id"] = str(tmp_path / "gone")
    (pool / "pool.json").write_text(json.dumps(manifest))
    done = add(models, pool, "summ")
    assert done.returncode == 2 and "which is not there any more" in done.stderr and "--model" in done.stderr
    assert add(models, pool, "summ", "--model", str(moved)).returncode == 0
    assert json.loads((pool / "pool.json").read_text())["base_model"]["id"] == str(moved.resolve())  # followed

    done = cli("route", "--pool", str(pool), "--top-k", "1", "Translate to French: the dog", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads(done.stdout.strip().splitlines()[-1])[0]["adapters"] == ["fr"]
    embedder = json.loads((pool / "pool.json").read_text())["embedder"]
    assert embedder["id"] == "all-MiniLM-L6-v2" and embedder["dimension"] == 384


def test_a_pool_without_a_manifest_opened_with_another_model_is_refused_whole(models, tmp_path):
    pool = tmp_path / "pool"
    for name in ("fr", "senti"):
        assert add(models, pool, name, "--create", "--model", str(models["qwen"])).returncode == 0
    (pool / "pool.json").unlink()  # a pool written before manifests

    done = add(models, pool, "summ", "--model", str(models["mistral"]))
    assert done.returncode == 2
    assert "2 adapter(s)" in done.stderr and "do not fit the base model" in done.stderr
    assert sorted(p.name for p in (pool / "adapters").iterdir()) == ["fr", "senti"]
    assert not (pool / "quarantine").exists() and not (pool / "pool.json").exists()

    # the right model opens it and records itself (a log line, which a process of its own prints)
    done = add(models, pool, "summ", "--model", str(models["qwen"]), process=True)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "recorded base model" in done.stderr
    assert json.loads((pool / "pool.json").read_text())["base_model"]["id"] == str(models["qwen"].resolve())


def test_two_shells_each_adding_five_adapters_lose_none(models, tmp_path):
    """Two shells, each running 5 `pool add --create` on one pool: writers take turns on the pool
    lock (no index is opened), so all 10 land. (test_pool_processes adds 20 per process through
    the library; this is the CLI's path, each add a process of its own.)"""
    from tests.conftest import save_peft_adapter as save

    qwen = Qwen2ForCausalLM.from_pretrained(models["qwen"])
    pool, sources = tmp_path / "pool", tmp_path / "sources"
    shells = []
    for shell in ("p", "q"):
        lines = ["set -e"]
        for i in range(5):
            name = f"{shell}{i:02d}"
            save(qwen, sources / name, r=2, seed=len(lines), targets=["q_proj", "v_proj"])
            (sources / f"{name}.json").write_text(json.dumps({"samples": [f"A question about topic {name}"]}))
            lines.append(
                f"'{sys.executable}' -c 'import sys; from loraretriever.cli import main; sys.exit(main())' "
                f"pool add {name} '{sources / name}' --card '{sources / name}.json' --pool '{pool}' --create "
                f"--model '{models['qwen']}'"
            )
        shells.append(
            subprocess.Popen(
                ["bash", "-c", "\n".join(lines)],
                cwd=tmp_path,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
        )
    for shell in shells:
        out, err = shell.communicate(timeout=600)
        assert shell.returncode == 0, err[-3000:]
        assert out.count("added ") == 5
    everyone = sorted(f"{s}{i:02d}" for s in "pq" for i in range(5))
    assert sorted(p.name for p in (pool / "adapters").iterdir()) == everyone
    assert sorted(p.stem for p in (pool / "cards").glob("*.json")) == everyone
    assert not (pool / ".intents").exists() or not list((pool / ".intents").iterdir())


def test_pool_add_beside_a_running_server_is_routed_after_its_next_sync(models, tmp_path):
    """`serve` holds the pool's embedded index; `pool add` in another process succeeds, and the
    server routes the new adapter's task to it from its next request on."""
    import httpx

    from loraretriever.server.local import free_port

    pool = tmp_path / "pool"
    for name in ("fr", "senti"):
        assert add(models, pool, name, "--create", "--model", str(models["qwen"])).returncode == 0
    port = free_port()
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "import sys; from loraretriever.cli import main; sys.exit(main())",
            "serve",
            "--pool",
            str(pool),
            "--port",
            str(port),
            "--log-level",
            "warning",
        ],
        cwd=tmp_path,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        url = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 180
        while True:
            try:
                if httpx.get(f"{url}/health", timeout=5).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            assert server.poll() is None, server.stderr.read()[-3000:]
            assert time.monotonic() < deadline, "the server did not get ready"
            time.sleep(0.5)

        def routed(prompt: str) -> list[str]:
            body = {
                "model": "auto",
                "messages": [{"role": "user", "content": prompt}],
                "max_tokens": 2,
                "routing": {"top_k": 1},
            }
            reply = httpx.post(f"{url}/v1/chat/completions", json=body, timeout=60)
            assert reply.status_code == 200, reply.text
            return reply.json()["choices"][0]["routing"]["adapters"]

        prompt = "Summarize: the meeting moved to Tuesday because of the storm"
        assert routed(prompt) != ["summ"]
        done = add(models, pool, "summ", process=True)  # the server holds the index: this never opens it
        assert done.returncode == 0, done.stderr[-2000:]
        assert routed(prompt) == ["summ"]
    finally:
        server.terminate()
        server.wait(timeout=30)


def test_add_dir_imports_each_adapter_with_its_card_and_reports_the_ones_that_fail(models, tmp_path):
    qwen = Qwen2ForCausalLM.from_pretrained(models["qwen"])
    bulk = tmp_path / "bulk"
    save_peft_adapter(qwen, bulk / "carded", r=2, seed=1, targets=["q_proj", "v_proj"])
    (bulk / "carded" / "card.json").write_text(json.dumps({"samples": ["Translate to French: hello"], "domain": "mt"}))
    save_peft_adapter(qwen, bulk / "from_data", r=2, seed=2, targets=["q_proj", "v_proj"])
    email = "Subject: quarterly numbers\n\n" + "The figures for the third quarter are attached. " * 300
    # half the rows long: any 20 of the 30 hold at least 5 of them
    rows = [{"prompt": f"Summarize email {i}: {email}" if i % 2 else f"Summarize: note {i}"} for i in range(30)]
    (bulk / "from_data" / "train.jsonl").write_text("\n".join(json.dumps(row) for row in rows) + "\n")
    save_peft_adapter(qwen, bulk / "broken", r=2, seed=3, targets=["q_proj", "v_proj"])
    weights = bulk / "broken" / "adapter_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])  # a copy cut short
    save_peft_adapter(qwen, bulk / "bare", r=2, seed=4, targets=["q_proj", "v_proj"])
    pool = tmp_path / "pool"
    done = cli(
        "pool", "add-dir", str(bulk), "--pool", str(pool), "--create", "--model", str(models["qwen"]),
        "--samples", "train.jsonl", "--n", "20", cwd=tmp_path,
    )  # fmt: skip
    assert done.returncode == 1, done.stderr[-2000:]
    assert done.stdout.strip().splitlines()[-1] == f"3 added (1 without a card), 1 failed: {pool}"
    assert "failed broken:" in done.stdout and "corrupt" in done.stdout
    assert sorted(p.name for p in (pool / "adapters").iterdir()) == ["bare", "carded", "from_data"]
    card = json.loads((pool / "cards" / "from_data.json").read_text())
    assert len(card["samples"]) == 20 and all(s.startswith("Summarize") for s in card["samples"])
    assert len(email) > 14_000 and max(len(s) for s in card["samples"]) == 8_000  # long emails cut, not refused
    assert json.loads((pool / "cards" / "carded.json").read_text())["domain"] == "mt"
    assert not (pool / "cards" / "bare.json").exists() and not (pool / "quarantine").exists()
    assert cli("pool", "check", "--pool", str(pool), cwd=tmp_path).returncode == 0


@pytest.mark.parametrize("command", ["route", "eval-tasks"])
def test_a_truncated_card_is_quarantined_on_every_path(command, models, tmp_path):
    pool = tmp_path / "pool"
    for name in ("fr", "senti", "summ"):
        assert add(models, pool, name, "--create", "--model", str(models["qwen"])).returncode == 0
    card = pool / "cards" / "senti.json"
    card.write_text(card.read_text()[:30])  # a write cut short
    queries = tmp_path / "queries.json"
    queries.write_text(
        json.dumps(
            [
                {
                    "inputs": "Translate to French: the dog",
                    "targets": "le chien",
                    "task": "fr",
                    "domain": "mt",
                    "metric": "em",
                },
                {
                    "inputs": "Summarize: rain delayed the match",
                    "targets": "delay",
                    "task": "summ",
                    "domain": "sum",
                    "metric": "em",
                },
            ]
        )
    )
    argv = {
        "route": ["route", "--pool", str(pool), "Translate to French: the dog"],
        "eval-tasks": [
            "eval-tasks",
            "--pool",
            str(pool),
            "--queries",
            str(queries),
            "--methods",
            "base",
            "retriever_mixture_k3",
            "--max-new-tokens",
            "2",
            "--json",
        ],
    }[command]
    done = cli(*argv, cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "the card cannot be read" in (pool / "quarantine" / "senti" / "reason.txt").read_text()
    assert sorted(p.name for p in (pool / "adapters").iterdir()) == ["fr", "summ"]


def test_pool_add_after_a_killed_add_of_the_same_name_succeeds(models, tmp_path):
    """A writer killed between storing the adapter and its card leaves an intent: the next `pool
    add` undoes that change first, so the name is free again."""
    from loraretriever.pool.directory import record_intent, store_adapter

    pool = tmp_path / "pool"
    assert add(models, pool, "fr", "--create", "--model", str(models["qwen"])).returncode == 0
    record_intent(pool, "add", "senti")
    store_adapter(pool, models["adapters"] / "senti", "senti")  # killed here: no card, intent left
    done = add(models, pool, "senti")
    assert done.returncode == 0, done.stderr[-2000:]
    assert (pool / "cards" / "senti.json").is_file() and not list((pool / ".intents").glob("*.json"))
