"""Shared fixtures: real models built or loaded once per session, real PEFT adapters on disk."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest
import torch
from peft import LoraConfig, get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM

TINY_CONFIG = LlamaConfig(
    vocab_size=128,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=256,
)
ROOT = Path(__file__).resolve().parents[1]
DEMO_POOL = ROOT / "pools" / "bigbench"  # committed: 28 BIG-bench task LoRAs of the default model
BIGBENCH_SPLITS = ROOT / "data" / "bigbench"
ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def save_peft_adapter(
    model: torch.nn.Module,
    directory: Path,
    *,
    r: int = 4,
    alpha: int | None = None,
    targets: list[str] | None = None,
    seed: int = 0,
    **config_kwargs,
) -> Path:
    """Writes a real PEFT LoRA adapter for ``model`` (random, non-zero A and B) and returns its dir."""
    torch.manual_seed(seed)
    clone = type(model)(model.config)
    clone.load_state_dict(model.state_dict())
    config = LoraConfig(
        r=r,
        lora_alpha=alpha if alpha is not None else 2 * r,
        target_modules=targets or ["q_proj", "v_proj"],
        init_lora_weights=False,  # random B too, so the adapter changes outputs
        **config_kwargs,
    )
    get_peft_model(clone, config).save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model() -> LlamaForCausalLM:
    torch.manual_seed(0)
    return LlamaForCausalLM(TINY_CONFIG).eval()


@pytest.fixture(scope="session")
def tiny_adapters(tiny_model, tmp_path_factory) -> dict[str, Path]:
    """Three adapters of different ranks, alphas and target modules."""
    root = tmp_path_factory.mktemp("tiny_adapters")
    return {
        "q_only": save_peft_adapter(tiny_model, root / "q_only", r=2, alpha=3, targets=["q_proj"], seed=1),
        "qv": save_peft_adapter(tiny_model, root / "qv", r=4, seed=2),
        "all": save_peft_adapter(tiny_model, root / "all", r=8, alpha=4, targets=ALL_LINEAR, seed=3),
    }


@pytest.fixture(scope="module")
def tiny_pool(tiny_model, tiny_adapters):
    """A pool of the three tiny adapters (per test module: tests add and remove adapters in it)."""
    from loraretriever import LoraPool

    pool = LoraPool(tiny_model)
    for name, path in tiny_adapters.items():
        pool.add(path, name=name)
    return pool


@pytest.fixture
def make_adapter(tiny_model, tmp_path) -> Callable[..., Path]:
    counter = iter(range(10_000))

    def make(name: str | None = None, **kwargs) -> Path:
        return save_peft_adapter(tiny_model, tmp_path / (name or f"adapter{next(counter)}"), **kwargs)

    return make


@pytest.fixture(scope="session")
def smol_tokenizer():
    """SmolLM2's real tokenizer (no model weights needed), padding on the left."""
    from transformers import AutoTokenizer

    from loraretriever.engine.base_model import default_model_path

    tokenizer = AutoTokenizer.from_pretrained(default_model_path())
    tokenizer.padding_side = "left"
    return tokenizer


@pytest.fixture(scope="session")
def tiny_lm(smol_tokenizer) -> LlamaForCausalLM:
    """A tiny random Llama with SmolLM2's vocabulary and a 64-token context, for fast generation tests."""
    torch.manual_seed(0)
    config = LlamaConfig(
        **{
            **TINY_CONFIG.to_dict(),
            "vocab_size": len(smol_tokenizer),
            "max_position_embeddings": 64,
            "eos_token_id": smol_tokenizer.eos_token_id,
            "pad_token_id": smol_tokenizer.pad_token_id,
        }
    )
    return LlamaForCausalLM(config).eval()


@pytest.fixture(scope="session")
def tiny_lm_adapters(tiny_lm, tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("tiny_lm_adapters")
    return {
        "a": save_peft_adapter(tiny_lm, root / "a", r=4, seed=1, targets=["q_proj", "v_proj", "o_proj"]),
        "b": save_peft_adapter(tiny_lm, root / "b", r=8, seed=2, targets=["gate_proj", "down_proj"]),
    }


@pytest.fixture(scope="session")
def smollm():
    """The default base model (SmolLM2-135M-Instruct, float32) and tokenizer, loaded once."""
    from loraretriever import load_base_model

    return load_base_model()


async def gather_while_ticking(awaitables) -> tuple[list, int]:
    """Awaits ``awaitables`` together while a 5 ms ticker runs; returns the results and the ticks
    (ticks > 0 proves the calls did not block the event loop)."""
    import asyncio

    ticks = 0

    async def ticker() -> None:
        nonlocal ticks
        while True:
            await asyncio.sleep(0.005)
            ticks += 1

    task = asyncio.create_task(ticker())
    try:
        return list(await asyncio.gather(*awaitables)), ticks
    finally:
        task.cancel()


# ---- retrieval fixtures (below this line) ------------------------------------------------------

RETRIEVAL_DATA = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "loraretriever-flan48"

TOY_CARDS = {
    "sentiment": (
        "sentiment",
        [
            "Is the sentiment of this review positive or negative? The film was a joy from start to finish.",
            "How would you rate the mood of this tweet: 'worst customer service ever, never again'",
            "Review: the plot drags and the acting is wooden. Is this review positive or negative?",
        ],
    ),
    "translate_de": (
        "translation",
        [
            "Translate to German: The weather is nice today.",
            "Translate the following sentence into German: Where is the train station?",
            "How do you say 'I would like a cup of coffee' in German?",
        ],
    ),
    "nli": (
        "nli",
        [
            "Premise: A dog runs through the snow. Hypothesis: An animal is outside. Does the premise entail the hypothesis?",
            "Sentence 1: Two men are playing chess. Sentence 2: Nobody is playing. Entailment, neutral or contradiction?",
            "If 'the shop closes at nine', can we conclude that 'the shop is open at noon'? OPTIONS: yes, no, maybe",
        ],
    ),
    "closed_qa": (
        "closed_book QA",
        [
            "Answer the question: who wrote the novel Pride and Prejudice?",
            "What is the tallest mountain in Africa?",
            "Question: in which year did the Berlin Wall fall? Answer:",
        ],
    ),
}


@pytest.fixture(scope="session")
def minilm():
    """The packaged all-MiniLM-L6-v2 as a loraretriever Embedder, loaded once."""
    from loraretriever.retrieval.embedder import Embedder

    return Embedder()


@pytest.fixture
def toy_cards():
    """Four real-text adapter cards of different tasks; sentiment and nli are tagged customer=a."""
    from loraretriever.retrieval.cards import AdapterCard

    customer = {"sentiment": "a", "nli": "a", "translate_de": "b", "closed_qa": "b"}
    return [
        AdapterCard(name, samples, domain=domain, tags={"customer": customer[name]})
        for name, (domain, samples) in TOY_CARDS.items()
    ]


@pytest.fixture
def toy_pool_dir(tiny_lm, smol_tokenizer, minilm, toy_cards, tmp_path) -> Path:
    """A pool directory on the tiny Llama: one real PEFT adapter per toy card, indexed with MiniLM."""
    from loraretriever.serving.routed_lm import RoutedLM

    pool_dir = tmp_path / "pool"
    lm = RoutedLM.from_model(tiny_lm, smol_tokenizer, pool_dir=pool_dir, embedder=minilm)
    for seed, card in enumerate(toy_cards):
        lm.add_adapter(save_peft_adapter(tiny_lm, tmp_path / "src" / card.name, r=4, seed=seed), card)
    lm.close()
    return pool_dir


@pytest.fixture
def flan48() -> Path:
    """The paper's 48-task files under ../shared (the tests that need them skip when absent)."""
    if not (RETRIEVAL_DATA / "lora_samples.json").is_file():
        pytest.skip(f"the LoraRetriever data is not at {RETRIEVAL_DATA}")
    return RETRIEVAL_DATA


class ChromaServer:
    """A real `chroma run` process on 127.0.0.1 with its own data directory."""

    def __init__(self, data: Path) -> None:
        import shutil
        import subprocess
        import sys
        import time
        import urllib.request

        from loraretriever.server.local import free_port

        chroma = shutil.which("chroma", path=str(Path(sys.executable).parent)) or shutil.which("chroma")
        if chroma is None:
            pytest.skip("the `chroma` command (installed with chromadb) is not on PATH")
        self.host, self.port = "127.0.0.1", free_port()
        data.mkdir(parents=True, exist_ok=True)
        self.log_path = data / f"chroma-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        self.process = subprocess.Popen(
            [chroma, "run", "--path", str(data / "db"), "--host", self.host, "--port", str(self.port)],
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )
        deadline = time.monotonic() + 60
        while True:
            try:
                with urllib.request.urlopen(f"http://{self.host}:{self.port}/api/v2/heartbeat", timeout=1):
                    return
            except OSError:
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    pytest.fail(f"`chroma run` did not start on port {self.port}: {self.log_path.read_text()}")
                time.sleep(0.2)

    def stop(self) -> None:
        import subprocess

        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()


@pytest.fixture(scope="session")
def chroma_server(tmp_path_factory):
    """One `chroma run` server for the session, waited for by heartbeat, stopped at the end."""
    server = ChromaServer(tmp_path_factory.mktemp("chroma_server"))
    yield server
    server.stop()


@pytest.fixture
def start_chroma_server(tmp_path):
    """Starts extra servers (e.g. to stop one mid-test); all are stopped at teardown."""
    servers: list[ChromaServer] = []

    def start() -> ChromaServer:
        servers.append(ChromaServer(tmp_path / f"server{len(servers)}"))
        return servers[-1]

    yield start
    for server in servers:
        server.stop()


class ServeProcess:
    """A real `loraretriever serve` process on 127.0.0.1 (:class:`loraretriever.server.local.LocalServer`);
    a server that does not start fails the test with its log."""

    def __new__(cls, pool_dir: Path, log_dir: Path, *args: str, api_key: str | None = "sk-test"):
        from loraretriever.server.local import LocalServer

        try:
            return LocalServer(pool_dir, log_dir, *args, api_key=api_key, timeout_s=240)
        except RuntimeError as error:
            pytest.fail(str(error))


def copy_pool(source: Path, target: Path) -> Path:
    """A pool directory's adapters and cards copied (its index is rebuilt by the first opener)."""
    import shutil

    for part in ("adapters", "cards"):
        shutil.copytree(source / part, target / part)
    return target


@pytest.fixture(scope="session")
def tools_lm(tiny_lm, smol_tokenizer, minilm, tmp_path_factory):
    """The tiny Llama with a 1,024-token window (tool descriptions are long), a real LoRA per toy card."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from loraretriever.retrieval.cards import AdapterCard
    from loraretriever.retrieval.router import Router
    from loraretriever.serving.routed_lm import RoutedLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**{**tiny_lm.config.to_dict(), "max_position_embeddings": 1024})).eval()
    cards = [AdapterCard(name, samples, domain=domain) for name, (domain, samples) in TOY_CARDS.items()]
    router = Router.from_cards(cards, embedder=minilm)
    lm = RoutedLM.from_model(model, smol_tokenizer, router=router, max_wait_ms=0)
    root = tmp_path_factory.mktemp("tool_adapters")
    for seed, card in enumerate(cards):
        lm.pool.add(save_peft_adapter(model, root / card.name, r=2, seed=seed), name=card.name)
    yield lm
    lm.close()
    router.close()
