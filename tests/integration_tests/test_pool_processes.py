"""Processes that share one pool directory (and one Chroma server, as replicas do): none loses
another's changes, and each sees them all. An embedded index refuses a second process."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import save_peft_adapter

TOPICS = [
    "astronomy and distant galaxies",
    "baking sourdough bread",
    "repairing bicycle brakes",
    "knitting wool scarves",
    "tax law for freelancers",
    "training a puppy to sit",
    "growing tomatoes on a balcony",
    "jazz piano chords",
    "the French revolution",
    "quantum entanglement",
    "brewing espresso",
    "writing a cover letter",
    "chess opening theory",
    "volcano eruptions",
    "learning Japanese kanji",
    "fixing a leaking faucet",
    "marathon running plans",
    "medieval castle architecture",
    "photosynthesis in plants",
    "stock market options",
    "deep sea octopus behaviour",
    "origami cranes",
    "wine tasting notes",
    "building a wooden shed",
    "the rules of cricket",
    "climate change policy",
    "soap making at home",
    "ancient Egyptian pharaohs",
    "electric car batteries",
    "bird migration routes",
    "writing haiku poems",
    "cybersecurity passwords",
    "vegan curry recipes",
    "tuning a guitar",
    "glacier formation",
    "first aid for burns",
    "renaissance painting",
    "mushroom foraging",
    "solar panel installation",
    "sleep and dreaming",
]

WORKER = textwrap.dedent(
    """
    import json, sys, time
    from pathlib import Path
    from loraretriever import RoutedLM

    model_dir, pool_dir, port, me, sources, topics, signals = sys.argv[1:8]
    signals = Path(signals)
    lm = RoutedLM.from_pretrained(model_dir, pool_dir=pool_dir, chroma_host="127.0.0.1", chroma_port=int(port),
                                  device="cpu")
    (signals / f"ready-{me}").touch()
    while len(list(signals.glob("ready-*"))) < 2:  # start adding together, so the changes interleave
        time.sleep(0.01)
    for i, (source, topic) in enumerate(zip(json.loads(sources), json.loads(topics))):
        lm.add_adapter(source, {"samples": [f"Tell me about {topic}.", f"A question on {topic}"]}, name=f"{me}{i:02d}")
    (signals / f"done-{me}").touch()
    while len(list(signals.glob("done-*"))) < 2:
        time.sleep(0.01)
    lm.sync_pool()
    routed = [r.adapters[0] for r in lm.route([f"Tell me about {t}." for t in json.loads(sys.argv[8])], top_k=1)]
    print(json.dumps({"pool": lm.pool.names, "routable": sorted(lm.router.routable()), "routed": routed}))
    """
)


@pytest.mark.slow
def test_two_processes_adding_20_adapters_each_lose_none(tiny_lm, smol_tokenizer, tmp_path, start_chroma_server):
    model_dir = tmp_path / "model"
    tiny_lm.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    sources = [str(save_peft_adapter(tiny_lm, tmp_path / "src" / f"a{i}", r=2, seed=i)) for i in range(40)]
    pool_dir, signals = tmp_path / "pool", tmp_path / "signals"
    signals.mkdir()
    server = start_chroma_server()
    script = tmp_path / "worker.py"
    script.write_text(WORKER)
    workers = [
        subprocess.Popen(
            [
                sys.executable,
                str(script),
                str(model_dir),
                str(pool_dir),
                str(server.port),
                me,
                json.dumps(sources[half * 20 : half * 20 + 20]),
                json.dumps(TOPICS[half * 20 : half * 20 + 20]),
                str(signals),
                json.dumps(TOPICS),
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for half, me in enumerate(["p", "q"])
    ]
    outputs = []
    for worker in workers:
        out, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
        outputs.append(json.loads(out.strip().splitlines()[-1]))

    everyone = sorted([f"p{i:02d}" for i in range(20)] + [f"q{i:02d}" for i in range(20)])
    assert sorted(p.name for p in (pool_dir / "adapters").iterdir()) == everyone
    assert sorted(p.stem for p in (pool_dir / "cards").glob("*.json")) == everyone
    for seen in outputs:
        assert seen["pool"] == everyone and seen["routable"] == everyone
        assert seen["routed"] == everyone  # each topic's prompt reaches its adapter, whoever added it


def test_an_embedded_index_refuses_a_second_process(tmp_path, minilm):
    from loraretriever.retrieval.router import Router

    Router.open(tmp_path / "pool", embedder=minilm)  # this process holds the pool's embedded index
    probe = textwrap.dedent(
        """
        import sys
        from loraretriever.retrieval.router import Router
        try:
            Router.open(sys.argv[1])
        except Exception as error:
            print(error)
            sys.exit(3)
        """
    )
    done = subprocess.run(
        [sys.executable, "-c", probe, str(tmp_path / "pool")], capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 3, done.stdout + done.stderr
    assert "open in another process" in done.stdout and "chroma run" in done.stdout
