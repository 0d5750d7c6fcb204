"""``loraretriever pool add | remove | list | check`` on a real pool directory (the tiny Llama's)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from loraretriever.cli import main
from loraretriever.pool.directory import record_intent
from tests.conftest import save_peft_adapter


def run(capsys, *args: str) -> tuple[int, list[str], str]:
    code = main(["pool", *args])
    out = capsys.readouterr()
    return code, out.out.strip().splitlines(), out.err


def test_list_and_check_a_consistent_pool(capsys, toy_pool_dir):
    code, lines, _ = run(capsys, "list", "--pool", str(toy_pool_dir))
    assert code == 0 and sorted(lines) == ["closed_qa", "nli", "sentiment", "translate_de"]
    code, lines, _ = run(capsys, "check", "--pool", str(toy_pool_dir))
    assert code == 0 and lines == [f"{toy_pool_dir}: consistent"]


def test_check_lists_each_problem_and_repair_fixes_them(capsys, toy_pool_dir, minilm):
    from loraretriever.retrieval.router import Router

    record_intent(toy_pool_dir, "add", "half_added")  # a killed add
    (toy_pool_dir / "adapters" / ".nli.deleting").mkdir()  # a killed remove's trash
    (toy_pool_dir / "cards" / "closed_qa.json").write_text("{ broken")
    (toy_pool_dir / "cards" / "ghost.json").write_text(json.dumps({"name": "ghost", "samples": ["hi"]}))
    (toy_pool_dir / "index" / "chroma.sqlite3").write_bytes(b"\x00garbage" * 4096)
    code, lines, _ = run(capsys, "check", "--pool", str(toy_pool_dir))
    assert code == 1 and len(lines) == 5, lines
    text = "\n".join(lines)
    assert "interrupted add of 'half_added'" in text and ".nli.deleting" in text
    assert "'closed_qa': the card cannot be read" in text and "'ghost': a card without a stored adapter" in text
    assert "the index is corrupt" in text and "rebuilt from the cards" in text
    code, lines, _ = run(capsys, "check", "--repair", "--pool", str(toy_pool_dir))
    assert code == 0, lines
    code, lines, _ = run(capsys, "check", "--pool", str(toy_pool_dir))
    assert code == 0
    assert (toy_pool_dir / ".index.corrupt" / "chroma.sqlite3").is_file()
    with Router.open(toy_pool_dir, embedder=minilm) as router:  # the set-aside index is rebuilt
        assert router.index.names() == {"nli", "sentiment", "translate_de"}
    code, lines, _ = run(capsys, "list", "--pool", str(toy_pool_dir))
    assert "closed_qa\t(no card: pinned calls only)" not in lines  # its adapter went with its card
    assert any(line.startswith("closed_qa\t(quarantined: the card cannot be read") for line in lines), lines
    assert any(line.startswith("ghost\t(quarantined: a card without") for line in lines), lines


def test_add_and_remove_through_the_cli(capsys, toy_pool_dir, tiny_lm, smol_tokenizer, tmp_path):
    model_dir = tmp_path / "model"
    tiny_lm.save_pretrained(model_dir)
    smol_tokenizer.save_pretrained(model_dir)
    source = save_peft_adapter(tiny_lm, tmp_path / "newbie", r=4, seed=3)
    card = tmp_path / "card.json"
    card.write_text(json.dumps({"samples": ["Summarise: the meeting moved to Friday."], "domain": "summary"}))
    common = ["--pool", str(toy_pool_dir), "--model", str(model_dir)]
    code, _, err = run(capsys, "add", "newbie", str(source), "--card", str(card), *common)
    assert code == 0, err
    assert "newbie" in run(capsys, "list", "--pool", str(toy_pool_dir))[1]
    code, _, err = run(capsys, "remove", "newbie", "--pool", str(toy_pool_dir))  # loads no model
    assert code == 0, err
    assert "newbie" not in run(capsys, "list", "--pool", str(toy_pool_dir))[1]
    assert run(capsys, "check", "--pool", str(toy_pool_dir))[0] == 0


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["check", "--pool", "/nonexistent/pool"], "--pool '/nonexistent/pool' is not a directory"),
        (["list", "--pool", "/nonexistent/pool"], "is not a directory"),
        (["add", "x", "/nowhere", "--card", "/no/card.json", "--pool", "{pool}"], "--card '/no/card.json' is not"),
    ],
)
def test_user_errors_are_one_line_and_exit_2(capsys, toy_pool_dir, args, match):
    code, _, err = run(capsys, *[a.replace("{pool}", str(toy_pool_dir)) for a in args])
    assert code == 2 and match in err and len(err.strip().splitlines()) == 1, err
    assert not Path("/nonexistent").exists(), "no directory created"
