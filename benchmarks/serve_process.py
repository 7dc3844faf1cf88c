"""`gpt2chat serve` as its own process on a free loopback port, ready once /health answers 200.

The one launcher of the benchmarks (serve, gpu_check) and of the tests that talk to a real server process
(test_web, test_serve_cli): the log goes to a file that failures quote.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class ServerDidNotStart(RuntimeError):
    """The server exited, or did not answer /health in time; the message ends with its log."""


class ServeProcess:
    """`python -m gpt2chat serve --model CHECKPOINT --port P [options]`, output to `log_path`.

    `env` is added to (or, as None values, removed from) this process's environment, with HF_HUB_OFFLINE=1.
    Use as a context manager, or call `wait_ready()` and `stop()`.
    """

    def __init__(self, checkpoint: Path | str, log_path: Path | str, *options: str,
                 env: dict[str, str | None] | None = None):
        self.port = free_port()
        self.log_path = Path(log_path)
        self.log = self.log_path.open("w")
        environment = {**os.environ, "HF_HUB_OFFLINE": "1"}
        for key, value in (env or {}).items():
            if value is None:
                environment.pop(key, None)
            else:
                environment[key] = value
        self.process = subprocess.Popen(
            [sys.executable, "-m", "gpt2chat", "serve", "--model", str(checkpoint), "--port", str(self.port),
             *options], env=environment, stdout=self.log, stderr=subprocess.STDOUT)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def log_tail(self, chars: int = 2000) -> str:
        self.log.flush()
        return self.log_path.read_text(errors="replace")[-chars:]

    def health(self) -> dict:
        return httpx.get(f"{self.url}/health", timeout=5).json()

    def wait_ready(self, timeout: float = 300) -> ServeProcess:
        """Until /health answers 200 (a fresh interpreter importing torch on a loaded machine takes long)."""
        deadline = time.monotonic() + timeout
        while True:
            if self.process.poll() is not None:
                raise ServerDidNotStart(f"gpt2chat serve exited ({self.process.returncode}):\n{self.log_tail()}")
            try:
                if httpx.get(f"{self.url}/health", timeout=2).status_code == 200:
                    return self
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                self.kill()
                raise ServerDidNotStart(f"gpt2chat serve did not answer /health in {timeout:.0f} s:\n"
                                        f"{self.log_tail()}")
            time.sleep(0.3)

    def kill(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGKILL)
        self.process.wait(timeout=30)

    def interrupt(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)

    def stop(self) -> None:
        """Ctrl-C (the server's graceful shutdown), then SIGKILL after 30 s."""
        self.interrupt()
        if self.process.poll() is None:
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()
        self.log.close()

    def __enter__(self) -> ServeProcess:
        return self

    def __exit__(self, *exc) -> None:
        self.stop()
