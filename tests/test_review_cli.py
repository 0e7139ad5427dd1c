"""Review of the command and process side: ports in use, the worker supervisor's signals, the demo on a
shared Redis, and `gateway explain`'s verdict against what the server answers."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from gateway.config import load
from gateway.devissuer import DevIssuer
from gateway.explain import explain
from tests.support.gateway import ROOT, GatewayProcess, config_text, free_port
from tests.support.redis_server import RedisServer

PUBLIC = """\
  - name: open
    match: {path: /open, methods: [GET]}
    upstream: svc
    auth: {required: false}
"""


def _config(tmp_path: Path, issuer: DevIssuer) -> tuple[Path, int, int]:
    port, admin_port = free_port(), free_port()
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(issuer.url, {"svc": ["http://127.0.0.1:9"]}, PUBLIC,
                                listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}"))
    return path, port, admin_port


@pytest.fixture
def listener() -> Iterator[socket.socket]:
    """A plain listening socket (another program) on a free 127.0.0.1 port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        yield s


def _run(*args: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", *args], capture_output=True, text=True, cwd=ROOT,
                          env={**os.environ, "PYTHONUNBUFFERED": "1"}, timeout=timeout)


# -- ports in use ------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["public", "admin"])
async def test_run_on_a_port_in_use_says_so_in_one_line(issuer: DevIssuer, tmp_path: Path,
                                                         listener: socket.socket, which: str) -> None:
    path, port, admin_port = _config(tmp_path, issuer)
    taken = listener.getsockname()[1]
    text = path.read_text()
    text = text.replace(f"127.0.0.1:{port}" if which == "public" else f"127.0.0.1:{admin_port}", f"127.0.0.1:{taken}")
    path.write_text(text)
    result = await asyncio.to_thread(_run, "run", "-c", str(path))  # the issuer answers meanwhile
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr  # no "Unclosed client session" aftermath
    assert f"127.0.0.1:{taken}" in lines[0] and "in use" in lines[0], lines


async def test_a_second_worker_group_on_the_same_ports_is_refused(issuer: DevIssuer, tmp_path: Path,
                                                                  gateway_processes: Any) -> None:
    """SO_REUSEPORT lets any process of the same user join the port: a second `gateway run --workers 2`
    would silently share the traffic with the first instead of failing like a single `gateway run`."""
    path, port, admin_port = _config(tmp_path, issuer)
    first = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port,
                                             args=("--workers", "2")))
    await first.wait_ready()
    result = await asyncio.to_thread(_run, "run", "-c", str(path), "--workers", "2", timeout=10)  # must not serve
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and f"127.0.0.1:{port}" in lines[0] and "in use" in lines[0], result.stderr
    assert first.proc is not None and first.proc.poll() is None  # the first group is untouched


# -- the supervisor's signals --------------------------------------------------------------------------


def _catches(pid: int, sig: signal.Signals) -> bool:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("SigCgt:"):
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
    return False


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
async def test_sighup_while_the_workers_start_does_not_take_the_group_down(
        issuer: DevIssuer, tmp_path: Path, gateway_processes: Any) -> None:
    """SIGHUP means reload. The supervisor forwards it to every worker; a worker still importing has no
    handler yet, and the default action of SIGHUP kills it (and with it the group, exit 129)."""
    path, port, admin_port = _config(tmp_path, issuer)
    group = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port,
                                             args=("--workers", "2")))
    assert group.proc is not None
    deadline = time.monotonic() + 10
    while not (_catches(group.proc.pid, signal.SIGHUP) and len(_children(group.proc.pid)) == 2):
        assert time.monotonic() < deadline and group.proc.poll() is None, group.err.read_text()
        await asyncio.sleep(0.005)
    group.signal(signal.SIGHUP)  # the workers are still starting (a second or so of imports and set-up)
    await group.wait_ready()
    await asyncio.sleep(0.3)
    assert group.proc.poll() is None, group.err.read_text()
    assert len(_children(group.proc.pid)) == 2
    assert group.stop() == 0


# -- the demo on a shared Redis ----------------------------------------------------------------------


def _demo(redis: RedisServer, tmp_path: Path) -> tuple[subprocess.Popen[str], list[str]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "REDIS_URL": redis.url,
           "GATEWAY_KEY_STORE": str(tmp_path / "keys.json"),
           "DEMO_ISSUER_PORT": str(free_port()), "DEMO_ORDERS_PORT": str(free_port()),
           "DEMO_USERS_PORT": str(free_port()), "DEMO_LISTEN": f"127.0.0.1:{free_port()}",
           "DEMO_ADMIN_LISTEN": f"127.0.0.1:{free_port()}"}
    for name in ("DEMO_ISSUER", "DEMO_ORDERS", "DEMO_USERS", "DEMO_REVOCATION_BACKEND"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, "-m", "gateway", "demo"], cwd=ROOT, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
    assert proc.stdout is not None
    curls: list[str] = []
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        line = proc.stdout.readline()
        if not line or line.startswith("# more tokens"):
            break
        if line.startswith("curl "):
            curls.append(line.strip())
    return proc, curls


def _stop(proc: subprocess.Popen[str]) -> int:
    proc.send_signal(signal.SIGINT)
    try:
        return proc.wait(15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
        if proc.stdout is not None:
            proc.stdout.close()


def _status(curl: str) -> int:
    out = subprocess.run(curl + " --max-time 10", shell=True, capture_output=True, text=True, timeout=20)
    return int(out.stdout.split()[1])


@pytest.mark.timeout(60)
def test_demo_run_again_on_the_same_redis_prints_what_happens(redis_server: RedisServer, tmp_path: Path) -> None:
    """With REDIS_URL the demo's revocation outlives the demo: a second run must not find its first
    "200" token already revoked by the first run."""
    proc, curls = _demo(redis_server, tmp_path)
    try:
        revoke = next(c for c in curls if "/admin/revocations" in c)
        assert _status(curls[0]) == 200
        assert _status(revoke) == 201
        assert _status(curls[0]) == 401
    finally:
        assert _stop(proc) == 0
    proc, curls = _demo(redis_server, tmp_path)
    try:
        assert len(curls) >= 10
        assert _status(curls[0]) == 200  # the guide's first line: "200: a valid token"
    finally:
        assert _stop(proc) == 0


# -- explain agrees with the server ------------------------------------------------------------------


async def test_explain_names_401_when_the_issuer_is_refused_even_if_scopes_fail_too(
        issuer: DevIssuer, other_issuer: DevIssuer, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """authorize() checks the issuer first: a token of an issuer the route does not accept is 401
    invalid_token whatever else fails, so explain must not promise a 403."""
    routes = """\
  - name: staff
    match: {path: /staff, methods: [GET]}
    upstream: svc
    auth: {issuers: [other], scopes: [staff:read]}
"""
    extra_issuer = f"""\
  - name: other
    issuer: {other_issuer.url}
    audiences: [https://api.example.com]
"""
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(issuer.url, {"svc": ["http://127.0.0.1:9"]}, routes, issuer_extra=extra_issuer))
    config = load(path)
    token = issuer.token({"scope": "openid"})
    assert await explain(config, "GET", "/staff", "", token) == 1
    out = capsys.readouterr().out
    assert "FAIL issuers" in out and "FAIL scopes" in out
    assert "refused -> 401 invalid_token" in out, out


# -- `check` validates what the file references: TLS files that exist but cannot be loaded ------------


def _tls_config(tmp_path: Path, server_tls: str, upstream_tls: str) -> Path:
    path = tmp_path / "tls.yaml"
    path.write_text(f"""\
server:
  listen: 127.0.0.1:{free_port()}
  tls: {server_tls}
admin: {{listen: 127.0.0.1:{free_port()}}}
issuers:
  - {{name: a, issuer: "http://127.0.0.1:9/x", jwks_uri: "http://127.0.0.1:9/certs", audiences: [x]}}
revocation: {{backend: memory}}
upstreams:
  svc: {{targets: ["https://127.0.0.1:9"], tls: {upstream_tls}}}
routes:
  - {{name: r, match: {{path_prefix: /}}, upstream: svc, auth: {{required: false}}}}
""")
    return path


def test_check_refuses_tls_files_that_cannot_be_loaded(tmp_path: Path) -> None:
    from tests.support.pki import make_pki

    pki = make_pki(tmp_path)
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    good_server = f"{{cert_file: {pki['server']}, key_file: {pki['server']}}}"
    good_upstream = f"{{ca_file: {pki['ca']}, cert_file: {pki['client']}, key_file: {pki['client']}}}"
    ok = _run("check", "-c", str(_tls_config(tmp_path, good_server, good_upstream)))
    assert ok.returncode == 0 and ok.stdout.startswith("ok: "), ok.stderr

    for server, upstream, key, where in (
            (f"{{cert_file: {garbage}, key_file: {garbage}}}", good_upstream, "server.tls", "tls:"),
            (good_server, f"{{ca_file: {garbage}}}", "upstreams.svc.tls", "svc:"),
            (good_server, f"{{ca_file: {pki['ca']}, cert_file: {pki['ca']}, key_file: {pki['ca']}}}",
             "upstreams.svc.tls", "svc:")):
        path = _tls_config(tmp_path, server, upstream)
        # SPEC 3: every error names the line of its key (here the line holding the tls mapping), not line 1.
        line = next(n for n, text in enumerate(path.read_text().splitlines(), 1) if text.strip().startswith(where))
        for command in ("check", "run"):  # `run` refuses it the same way, before it starts anything
            result = _run(command, "-c", str(path))
            assert result.returncode == 2, (command, key, result.stderr)
            lines = result.stderr.strip().splitlines()
            assert len(lines) == 1 and lines[0].startswith(f"{path}:{line}: {key}."), result.stderr
            assert "cannot load" in lines[0] and "_ssl.c" not in lines[0], lines


# -- a stop asked for while the supervisor is still spawning its workers -------------------------------------

_SPAWN_RACE = """\
import os, signal, sys
from gateway import workers
real = workers.subprocess.Popen
spawned = []
def popen(*args, **kwargs):
    if spawned:  # the second spawn: SIGTERM arrives now, after the first worker exists, before this one does
        os.kill(os.getpid(), signal.SIGTERM)
    proc = real(*args, **kwargs)
    spawned.append(proc.pid)
    print("worker", proc.pid, flush=True)
    return proc
workers.subprocess.Popen = popen
sys.exit(workers.supervise(sys.argv[1], 2))
"""


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
def test_a_stop_during_the_spawning_of_workers_reaches_every_worker(issuer: DevIssuer, tmp_path: Path) -> None:
    """SIGTERM while the supervisor spawns: a worker started after it was never told to stop, and the
    supervisor waited for it for ever. The signals are held while spawning, so every worker gets it."""
    path, _, _ = _config(tmp_path, issuer)
    # The metrics directory under tmp_path: a supervisor killed by the timeout below cannot remove its own.
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(tmp_path / "metrics")}
    proc = subprocess.Popen([sys.executable, "-c", _SPAWN_RACE, str(path)], cwd=ROOT, text=True, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        out, err = proc.communicate(timeout=20)
    except subprocess.TimeoutExpired:
        for pid in _children(proc.pid):  # the worker left running, then its supervisor
            os.kill(pid, signal.SIGKILL)
        proc.kill()
        out, err = proc.communicate()
        pytest.fail(f"the supervisor was still waiting 20 s after SIGTERM:\n{out}{err[-2000:]}")
    assert out.count("worker ") == 2 and proc.returncode == 0, (out, err[-2000:])
