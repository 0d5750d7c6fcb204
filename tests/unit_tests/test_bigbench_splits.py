"""BIG-bench splits on a synthetic sdist built in the test (no download)."""

from __future__ import annotations

import io
import json
import tarfile

import pytest

from loraretriever.evaluation.bigbench import make_splits, read_task_files, to_examples, write_splits


def _task(n: int, multiple_choice: bool = False) -> dict:
    if multiple_choice:
        return {
            "examples": [
                {"input": f"Question {i}?", "target_scores": {"yes": int(i % 2 == 0), "no": int(i % 2 == 1)}}
                for i in range(n)
            ]
        }
    return {"examples": [{"input": f"Reverse {i}", "target": [str(i)[::-1], "other"]} for i in range(n)]}


@pytest.fixture
def sdist(tmp_path):
    path = tmp_path / "bigbench-1.0.0.tar.gz"
    with tarfile.open(path, "w:gz") as archive:
        for name, content in {
            "bigbench-1.0.0/bigbench/benchmark_tasks/reverse/task.json": _task(120),
            "bigbench-1.0.0/bigbench/benchmark_tasks/yesno/task.json": _task(90, multiple_choice=True),
            "bigbench-1.0.0/bigbench/benchmark_tasks/nested/sub/task.json": _task(300),
        }.items():
            data = json.dumps(content).encode()
            info = tarfile.TarInfo(name)
            info.size = len(data)
            archive.addfile(info, io.BytesIO(data))
    return path


def test_examples_from_targets_and_target_scores():
    plain = to_examples({"examples": [{"input": "a", "target": ["x", "y"]}, {"input": "a", "target": "dup"}]})
    assert plain == [{"inputs": "a", "targets": "x"}]
    choice = to_examples(_task(2, multiple_choice=True))
    assert choice[0]["inputs"] in ("Question 0?\nOptions:\n- yes\n- no", "Question 0?\nOptions:\n- no\n- yes")
    assert choice[0]["targets"] == "yes" and choice[1]["targets"] == "no"
    assert to_examples(_task(2, multiple_choice=True)) == choice  # deterministic
    assert to_examples({"examples": [{"input": "q", "target": ""}, {"input": "", "target": "t"}]}) == []


def test_options_are_shuffled_so_the_right_one_is_not_always_first():
    task = {
        "examples": [
            {"input": f"Pick {i}", "target_scores": {"right": 1, "wrong a": 0, "wrong b": 0, "wrong c": 0}}
            for i in range(40)
        ]
    }
    first_options = [e["inputs"].split("\n- ")[1] for e in to_examples(task)]
    assert 0 < first_options.count("right") < 20


def test_splits_are_deterministic_disjoint_and_sized():
    examples = to_examples(_task(120))
    first, again = (
        make_splits("reverse", "transformation", examples),
        make_splits("reverse", "transformation", examples),
    )
    assert first == again
    assert (len(first.test), len(first.cards), len(first.train)) == (50, 20, 50)
    inputs = [e["inputs"] for e in first.test + first.cards + first.train]
    assert len(set(inputs)) == len(inputs) == 120
    assert make_splits("reverse", "transformation", examples, seed=1).test != first.test
    with pytest.raises(ValueError, match="'tiny' has 10 usable examples; it needs at least 71"):
        make_splits("tiny", "short QA", examples[:10])


def test_write_splits_reads_only_top_level_tasks(sdist, tmp_path):
    assert sorted(name for name, _ in read_task_files(sdist)) == ["reverse", "yesno"]
    out = tmp_path / "splits"
    assert write_splits(sdist, out, {"reverse": "transformation", "yesno": "classification"}) == ["reverse", "yesno"]
    data = json.loads((out / "yesno.json").read_text())
    assert data["kind"] == "classification" and data["metric"] == "em" and "Apache" in data["source"]
    assert (len(data["test"]), len(data["cards"]), len(data["train"])) == (50, 20, 20)
    with pytest.raises(ValueError, match=r"tasks \['nested'\] are not top-level JSON tasks"):
        write_splits(sdist, out, {"nested": "short QA"})


def test_splits_read_back_as_queries_in_the_papers_format(sdist, tmp_path):
    from loraretriever.retrieval.queries import load_queries, load_split_queries

    out = tmp_path / "splits"
    write_splits(sdist, out, {"reverse": "transformation", "yesno": "classification"})
    queries = load_queries(out)
    assert len(queries) == 100 and set(queries[0]) == {"inputs", "targets", "task", "domain", "metric"}
    assert {(q["task"], q["domain"]) for q in queries} == {("reverse", "transformation"), ("yesno", "classification")}
    assert len(load_queries(out, "cards")) == 40
    (tmp_path / "q.json").write_text(json.dumps(queries[:3]))
    assert load_queries(tmp_path / "q.json") == queries[:3]
    with pytest.raises(ValueError, match=r"tasks \['nope'\] have no split"):
        load_split_queries(out, tasks=["reverse", "nope"])


def test_committed_splits_are_complete():
    from pathlib import Path

    from loraretriever.evaluation.bigbench import DEMO_BIGBENCH_TASKS

    root = Path(__file__).resolve().parents[2] / "data" / "bigbench"
    for task, kind in DEMO_BIGBENCH_TASKS.items():
        data = json.loads((root / f"{task}.json").read_text())
        assert data["kind"] == kind and len(data["cards"]) == 20 and len(data["test"]) == 50 and data["train"]
        seen = [e["inputs"] for part in ("train", "cards", "test") for e in data[part]]
        assert len(seen) == len(set(seen)), task
