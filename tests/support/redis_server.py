"""Test support: a real redis-server process on a free 127.0.0.1 port (fixture `redis_server`)."""

from __future__ import annotations

import shutil
import socket
import subprocess
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

REDIS_SERVER = "redis-server"


_HANDED_OUT: set[int] = set()


def free_port() -> int:
    """A 127.0.0.1 port the kernel just found free, never one this process was handed before: two picks
    in a row can otherwise be the same port (the kernel chooses at random), and a test that gave it to
    two listeners failed on `address already in use`."""
    for _ in range(100):
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            s.bind(("127.0.0.1", 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port
    raise RuntimeError("no free port not handed out before")


def _password(args: tuple[str, ...]) -> str | None:
    for i, arg in enumerate(args[:-1]):
        if arg == "--requirepass":
            return args[i + 1]
    return None


def _ping(port: int, timeout: float = 0.2, auth: str | None = None) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout) as s:
            if auth is not None:
                s.sendall(f"AUTH {auth}\r\n".encode())
                if not s.recv(64).startswith(b"+OK"):
                    return False
            s.sendall(b"PING\r\n")
            return s.recv(64).startswith(b"+PONG")
    except OSError:
        return False


class RedisServer:
    """One redis-server process; `stop()` then `start()` restarts it on the same port (empty data)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self._dir = Path(tempfile.mkdtemp(prefix="gw-redis-"))

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self, *extra_args: str, wait: float = 10.0) -> None:
        """Start (or restart) on self.port; `extra_args` are more redis-server options for this run."""
        exe = shutil.which(REDIS_SERVER)
        if exe is None:
            raise RuntimeError(
                "redis-server not found on PATH: the revocation tests need a real Redis "
                "(install it, e.g. `apt-get install redis-server`)"
            )
        if self.proc is not None and self.proc.poll() is None:
            return
        # The child gets its own copy of the descriptor, so ours can close right away.
        with open(self._dir / "redis.log", "ab") as log:
            self.proc = subprocess.Popen(
                [
                    exe, "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                    "--appendonly", "no", "--daemonize", "no", "--dir", str(self._dir),
                    *extra_args,
                ],
                stdout=log,
                stderr=subprocess.STDOUT,
                cwd=self._dir,
            )
        deadline = time.monotonic() + wait
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                break
            if _ping(self.port, auth=_password(extra_args)):
                return
            time.sleep(0.01)
        tail = (self._dir / "redis.log").read_text(errors="replace")[-2000:]
        self.stop()
        raise RuntimeError(f"redis-server on port {self.port} did not answer PING:\n{tail}")

    def stop(self) -> None:
        proc, self.proc = self.proc, None
        if proc is None or proc.poll() is not None:
            return
        proc.terminate()  # by PID, this process only
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=5)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self._dir, ignore_errors=True)


@pytest.fixture
def redis_server() -> Iterator[RedisServer]:
    server = RedisServer()
    try:
        server.start()
        yield server
    finally:
        server.cleanup()
