"""Writers of one pool directory take turns: a short-lived one waits for another process's change
(saying so after 2 s) rather than failing, within a bound."""

from __future__ import annotations

import subprocess
import sys
import textwrap
import time

import pytest

from loraretriever.errors import PoolBusyError
from loraretriever.pool import directory as pool_dir_module
from loraretriever.pool.directory import generation, pool_change

HOLDER = textwrap.dedent(
    """
    import sys, time
    from loraretriever.pool.directory import pool_change
    with pool_change(sys.argv[1]):
        print("held", flush=True)
        time.sleep(float(sys.argv[2]))
    """
)


def hold(pool, seconds: float) -> subprocess.Popen:
    holder = subprocess.Popen(
        [sys.executable, "-c", HOLDER, str(pool), str(seconds)], stdout=subprocess.PIPE, text=True
    )
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_writer_waits_for_another_processs_change_and_says_so(tmp_path, caplog):
    pool = tmp_path / "pool"
    holder = hold(pool, 3.0)
    started = time.monotonic()
    with pool_change(pool):
        waited = time.monotonic() - started
    holder.wait(timeout=30)
    assert waited >= 2.0
    assert "waiting for another process's change of the pool" in caplog.text
    assert generation(pool) == 2  # both changes counted


def test_a_writer_gives_up_after_the_bound_naming_the_fix(tmp_path, monkeypatch):
    pool = tmp_path / "pool"
    monkeypatch.setattr(pool_dir_module, "LOCK_NOTICE_S", 0.1)
    monkeypatch.setattr(pool_dir_module, "LOCK_WAIT_S", 1)
    holder = hold(pool, 5.0)
    try:
        with (
            pytest.raises(PoolBusyError, match="locked by another process for over 1 s. Fix: let that process finish"),
            pool_change(pool),
        ):
            pass
    finally:
        holder.kill()
        holder.wait(timeout=30)
    with pool_change(pool):  # the lock died with its process
        pass
