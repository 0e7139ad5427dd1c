"""Test support: run the real gateway (in-process, or as `gateway run` processes) on free 127.0.0.1 ports.

`config_text(...)` writes the YAML a test needs around a real DevIssuer and real upstreams;
`start_gateway` runs GatewayApp in this event loop; `GatewayProcess` runs `python -m gateway run`
as a child process (stopped by its PID) for multi-process, signal and CLI tests.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from multidict import CIMultiDict
from yarl import URL

from gateway import accesslog
from gateway.app import GatewayApp
from gateway.config import load
from gateway.devissuer import DEFAULT_AUDIENCE
from tests.support.redis_server import free_port as free_port  # re-exported: the tests import it from here

ROOT = Path(__file__).resolve().parent.parent.parent


def config_text(issuer_url: str, upstreams: dict[str, list[str]], routes: str, *, extra: str = "",
                revocation: str = "revocation: {backend: memory}", listen: str = "127.0.0.1:0",
                admin_listen: str = "127.0.0.1:0", audience: str = DEFAULT_AUDIENCE,
                issuer_extra: str = "") -> str:
    """A complete config: one issuer named `dev` (every algorithm allowed), the given upstreams and routes.

    `routes` is the YAML list body (indented by two spaces, starting with '  - name: ...')."""
    ups = "\n".join(
        f"  {name}:\n    targets: [{', '.join(targets)}]\n    timeouts: {{connect: 1s, read: 5s}}"
        for name, targets in upstreams.items())
    return f"""\
server:
  listen: {listen}
  shutdown_grace: 5s
admin:
  listen: {admin_listen}
  issuer: dev
issuers:
  - name: dev
    issuer: {issuer_url}
    audiences: [{audience}]
    algorithms: [RS256, PS256, ES256, ES384, EdDSA]
    jwks_min_refetch: 30s
{issuer_extra}
{revocation}
upstreams:
{ups}
routes:
{routes}
{extra}
"""


class RunningGateway:
    def __init__(self, app: GatewayApp, session: aiohttp.ClientSession) -> None:
        self.app = app
        self.session = session

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.app.public_port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.app.admin_port}"

    async def request(self, method: str, path: str, *, token: str | None = None,
                      headers: dict[str, str] | None = None, **kw: Any) -> tuple[int, CIMultiDict[str], Any]:
        """One request; returns (status, response headers, JSON body or text)."""
        h = dict(headers or {})
        if token is not None:
            h["Authorization"] = f"Bearer {token}"
        # encoded=True: the path goes out exactly as written (no client-side dot-segment or escape rewriting)
        url = URL(self.url + path, encoded=True)
        async with self.session.request(method, url, headers=h, allow_redirects=False, **kw) as r:
            text = await r.text()
            try:
                body: Any = await r.json(content_type=None)
            except ValueError:
                body = text
            return r.status, CIMultiDict(r.headers), body  # case-insensitive, like HTTP


@asynccontextmanager
async def start_gateway(tmp_path: Path, text: str) -> AsyncIterator[RunningGateway]:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    app = GatewayApp(load(path))
    await app.start()
    # skip_auto_headers keeps the client from adding what the tests want to see absent
    session = aiohttp.ClientSession(skip_auto_headers=("User-Agent",))
    try:
        yield RunningGateway(app, session)
    finally:
        await session.close()
        await app.stop()


@pytest.fixture
def gateway_factory(tmp_path: Path) -> Callable[[str], Any]:
    """`async with gateway_factory(yaml_text) as gw:` — an in-process gateway on free ports."""
    return lambda text: start_gateway(tmp_path, text)


class GatewayProcess:
    """`python -m gateway run -c FILE` as a child process, with its output kept in files."""

    def __init__(self, config_path: Path, *, port: int, admin_port: int, args: tuple[str, ...] = (),
                 env: dict[str, str] | None = None, open_files: int | None = None) -> None:
        self.config_path, self.port, self.admin_port = config_path, port, admin_port
        self.out = config_path.with_suffix(f".{port}.out")
        self.err = config_path.with_suffix(f".{port}.err")
        self._args, self._env = args, env
        self._open_files = open_files  # the soft RLIMIT_NOFILE the process starts with (the hard one kept)
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        return f"http://127.0.0.1:{self.admin_port}"

    def start(self) -> None:
        env = {**os.environ, "PYTHONUNBUFFERED": "1", **(self._env or {})}
        with self.out.open("wb") as out, self.err.open("wb") as err:
            prefix = [] if self._open_files is None else ["prlimit", f"--nofile={self._open_files}:"]
            self.proc = subprocess.Popen(
                [*prefix, sys.executable, "-m", "gateway", "run", "-c", str(self.config_path), *self._args],
                stdout=out, stderr=err, env=env, cwd=ROOT)

    async def wait_ready(self, timeout: float = 15.0) -> None:
        deadline = time.monotonic() + timeout
        async with aiohttp.ClientSession() as s:
            while time.monotonic() < deadline:
                assert self.proc is not None
                if self.proc.poll() is not None:
                    raise AssertionError(f"gateway exited {self.proc.returncode}: {self.err.read_text()}")
                try:
                    async with s.get(self.admin_url + "/readyz") as r:
                        if r.status == 200:
                            return
                except aiohttp.ClientError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError(f"gateway not ready in {timeout}s: {self.err.read_text()}")

    def signal(self, sig: signal.Signals) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 10.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return None if self.proc is None else self.proc.returncode
        self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait(5)


@pytest.fixture
def gateway_processes() -> Any:
    """Collects GatewayProcess objects and stops each by its PID at teardown."""
    started: list[GatewayProcess] = []

    def add(p: GatewayProcess) -> GatewayProcess:
        started.append(p)
        p.start()
        return p
    yield add
    for p in started:
        p.stop()


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float, interval: float = 0.01) -> float:
    """Poll until check() is true; returns the seconds it took, fails after `timeout`."""
    start = time.monotonic()
    while True:
        if await check():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s")
        await asyncio.sleep(interval)


async def raw_exchange(port: int, request: bytes) -> bytes:
    """`request` as bytes on a fresh connection to 127.0.0.1:`port`; everything sent back until the close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        async with asyncio.timeout(5):
            return await reader.read()
    finally:
        writer.close()


def logged(capsys: pytest.CaptureFixture[str]) -> str:
    """What the in-process gateway wrote to stdout so far: its pending access-log lines (written in
    batches every 0.5 s, gateway.accesslog) flushed first."""
    accesslog.flush()
    return capsys.readouterr().out
