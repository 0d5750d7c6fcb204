"""A ``loraretriever serve`` process on a free 127.0.0.1 port, for benchmarks and tests."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

__all__ = ["LocalServer", "free_port"]


def free_port() -> int:
    """A TCP port nothing listens on now, on 127.0.0.1."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class LocalServer:
    """Starts ``loraretriever serve --pool POOL_DIR --port <free> ARGS`` and waits until ``/health`` is ok.

    Args:
        pool_dir: The pool it serves.
        log_dir: Where its output goes (``serve-<port>.log``).
        *args: More ``serve`` flags.
        api_key: Its ``--api-key`` (None: none).
        timeout_s: How long to wait for it to become ready.

    Raises:
        RuntimeError: it exited or was not ready in time (with the end of its log).
    """

    def __init__(
        self, pool_dir: Path, log_dir: Path, *args: str, api_key: str | None = None, timeout_s: float = 300
    ) -> None:
        command = shutil.which("loraretriever", path=str(Path(sys.executable).parent)) or "loraretriever"
        self.port, self.api_key = free_port(), api_key
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = Path(log_dir) / f"serve-{self.port}.log"
        self._log = open(self.log_path, "wb")  # noqa: SIM115 (closed in stop())
        key = ["--api-key", api_key] if api_key else []
        self.process = subprocess.Popen(
            [command, "serve", "--pool", str(pool_dir), "--port", str(self.port), *key, *args],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env={**os.environ, "LORARETRIEVER_API_KEY": ""},
        )
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                with urllib.request.urlopen(f"{self.url}/health", timeout=2):
                    return
            except OSError:  # not listening yet, or 503 while loading
                if self.process.poll() is not None or time.monotonic() > deadline:
                    self.stop()
                    raise RuntimeError(
                        f"`loraretriever serve` did not become ready: {self.log_path.read_text()[-3000:]}"
                    ) from None
                time.sleep(0.3)

    def stop(self) -> None:
        """Stops the process (terminate, then kill after 30 s)."""
        if self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()
        self._log.close()
