"""A user error in any command prints one line that names the value and the fix, exits 2, shows
no traceback and creates no directory."""

from __future__ import annotations

from pathlib import Path

import pytest

from loraretriever.cli import main

MISSING = "/nonexistent/pool"


@pytest.mark.parametrize(
    ("args", "match"),
    [
        (["eval-tasks", "--pool", MISSING, "--queries", "data/bigbench"], "--pool '/nonexistent/pool' is not a dir"),
        (["eval-tasks", "--pool", "{pool}", "--queries", "/no/queries.json"], "'/no/queries.json' does not exist"),
        (["train-gate", "--pool", MISSING, "--kind", "flow", "--data", "data/bigbench"], "is not a directory"),
        (["train-gate", "--pool", "{pool}", "--kind", "flow", "--data", "/no/splits"], "'/no/splits' does not exist"),
        (["route", "--pool", "{pool}", ""], "prompt 0 is ''; routing needs some text"),
        (["reindex", "--pool", MISSING], "does not exist; is --pool a pool directory?"),
        (["pool", "check", "--pool", MISSING], "is not a directory"),
    ],
)
def test_a_user_error_is_one_line_and_exit_2(capsys, toy_pool_dir, args, match):
    code = main([a.replace("{pool}", str(toy_pool_dir)) for a in args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    assert err.startswith("error: ") and match in err and len(err.splitlines()) == 1, err
    assert not Path("/nonexistent").exists(), "no directory created"
