"""The gateway beside nginx and HAProxy (+ jwt_verify RS256) under the same wrk line: req/s, p50, p99, RSS.

Usage (from the project directory):

    .venv/bin/python bench/run.py [--quick] [--reps N] [--duration S] [--soak N] [--only ROWS]

Installs nothing: it checks for nginx, haproxy, wrk, redis-server and taskset and says what to
install when one is missing. Every process it starts binds 127.0.0.1 on a free port, lives in one
temporary directory and is stopped by its PID at the end (also on Ctrl-C or an error).
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import math
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import jwt
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ROOT = Path(__file__).resolve().parent.parent
BENCH = ROOT / "bench"
AUDIENCE = "bench-api"
ISSUER_PATH = "/realms/bench"
SUBJECT = "bench-user"
TENANT = "t1"
QUIET_WAIT = 20.0  # seconds a sample may wait for the rest of the machine to go quiet (--quiet-wait)
PROXY_CORE, LOAD_CORE = "1", "0"  # the proxy under test alone on core 1; wrk, nginx and redis on core 0
REQUIRED = {"nginx": "nginx", "haproxy": "haproxy", "wrk": "wrk", "redis-server": "redis-server",
            "taskset": "util-linux"}
PATHS = {"public": "/public/hello", "headers": f"/api/tenants/{TENANT}/orders/42",
         "token": f"/svc/tenants/{TENANT}/orders/42"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def check_tools() -> None:
    missing = {tool: pkg for tool, pkg in REQUIRED.items() if shutil.which(tool) is None
               and not Path("/usr/sbin", tool).exists()}
    if missing:
        pkgs = " ".join(sorted(set(missing.values())))
        sys.exit(f"bench: missing {', '.join(missing)}; install with:\n  apt-get install {pkgs}")
    if (os.cpu_count() or 1) < 2:
        sys.exit("bench: needs 2 CPU cores (the proxy on core 1, wrk and the upstream on core 0)")


def tool(name: str) -> str:
    return shutil.which(name) or str(Path("/usr/sbin", name))


# ---------------------------------------------------------------------------------------------
# processes


class Procs:
    """Every process the bench starts, stopped by PID (SIGTERM, then SIGKILL) in reverse order."""

    def __init__(self) -> None:
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def start(self, name: str, cmd: list[str], *, stdout: Any = subprocess.DEVNULL, log: Path | None = None,
              env: dict[str, str] | None = None, cwd: Path = ROOT) -> subprocess.Popen[bytes]:
        err: Any = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115 - child owns it
        proc = subprocess.Popen(cmd, stdout=stdout, stderr=err, stdin=subprocess.DEVNULL, env=env, cwd=cwd,
                                start_new_session=True)  # Ctrl-C reaches the bench only; it stops them
        if log is not None:
            err.close()
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 10.0) -> None:
        if proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(proc.pid, signal.SIGKILL)
                proc.wait(5)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def pids(self, name: str) -> list[int]:
        return [p.pid for n, p in self.procs if n == name]

    def stop_all(self) -> None:
        for _, proc in reversed(list(self.procs)):
            self.stop(proc)


def wait_http(url: str, timeout: float, headers: dict[str, str] | None = None, want: int = 200) -> None:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            status, _ = http_get(url, headers)
            if status == want:
                return
            last = status
        except OSError as exc:
            last = exc
        time.sleep(0.1)
    raise RuntimeError(f"{url} not ready after {timeout}s (last: {last})")


def http_get(url: str, headers: dict[str, str] | None = None) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers=headers or {})  # noqa: S310 - 127.0.0.1 URLs we built
    try:
        with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310
            return int(resp.status), resp.read()
    except urllib.error.HTTPError as exc:
        return int(exc.code), exc.read()


def rss_kb(pid: int) -> int:
    out = subprocess.run(["ps", "-o", "rss=", "-p", str(pid)], capture_output=True, text=True, check=False)
    return int(out.stdout.strip() or 0)


def _proc_ticks(pid: int) -> tuple[int, int]:
    """(utime + stime, stime) of one process, in clock ticks."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return 0, 0
    user, system = int(fields[11]), int(fields[12])
    return user + system, system


def _busy_ticks() -> int:
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    # user, nice, system, steal: irq/softirq time (loopback TCP work) is not charged to any process
    return fields[0] + fields[1] + fields[2] + fields[7]


class ForeignCpu:
    """CPU the rest of the machine used while a sample ran (in cores): the bench's noise indicator.

    Busy time of every core minus what the bench's own processes (proxies, nginx, redis, wrk) used."""

    def __init__(self, procs: Procs) -> None:
        self.procs = procs
        self.tck = os.sysconf("SC_CLK_TCK")

    def _ours(self) -> int:
        pids = [p.pid for _, p in self.procs.procs]
        pids += [c for pid in pids for c in children(pid)]
        t = os.times()
        return sum(_proc_ticks(pid)[0] for pid in pids) + round((t.children_user + t.children_system) * self.tck)

    def start(self) -> None:
        self.t0, self.busy0, self.ours0 = time.monotonic(), _busy_ticks(), self._ours()

    def stop(self) -> float:
        wall = time.monotonic() - self.t0
        foreign = (_busy_ticks() - self.busy0) - (self._ours() - self.ours0)
        return max(0.0, foreign / self.tck / wall) if wall > 0 else 0.0

    def wait_quiet(self, limit: float, threshold: float = 0.15) -> float:
        """Before a sample: wait (at most `limit` s) until others use under `threshold` cores; the wait."""
        started = time.monotonic()
        while time.monotonic() - started < limit:
            self.start()
            time.sleep(0.5)
            if self.stop() < threshold:
                break
        return time.monotonic() - started


def children(pid: int) -> list[int]:
    out = subprocess.run(["ps", "-o", "pid=", "--ppid", str(pid)], capture_output=True, text=True,
                         check=False)
    return [int(x) for x in out.stdout.split()]


# ---------------------------------------------------------------------------------------------
# the world: keys, token, nginx, haproxy, redis, gateway


@dataclass
class World:
    tmp: Path
    procs: Procs
    upstream_port: int = 0
    issuer_port: int = 0
    haproxy_plain: int = 0
    haproxy_jwt: int = 0
    redis_port: int = 0
    token: str = ""
    gateway_cfg: Path = field(default_factory=Path)
    gateway_port: int = 0
    admin_port: int = 0
    root: Path = ROOT  # the tree whose `gateway` package runs (--compare adds a second one)

    @property
    def issuer(self) -> str:
        return f"http://127.0.0.1:{self.issuer_port}{ISSUER_PATH}"


def make_keys(world: World, ttl: int) -> None:
    """A static RS256 key pair: the JWKS nginx serves to the gateway, the PEM HAProxy verifies with."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    kid = "bench-rs256"
    www = world.tmp / "www" / ISSUER_PATH.strip("/")
    www.mkdir(parents=True)
    jwk = {**RSAAlgorithm.to_jwk(key.public_key(), as_dict=True), "kid": kid, "alg": "RS256", "use": "sig"}
    (www / "jwks.json").write_text(json.dumps({"keys": [jwk]}))
    (world.tmp / "pub.pem").write_bytes(key.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo))
    now = int(time.time())
    claims = {"iss": world.issuer, "aud": AUDIENCE, "sub": SUBJECT, "iat": now, "nbf": now, "exp": now + ttl,
              "jti": "bench-jti-1", "scope": "openid orders:read orders:write", "tenant_id": TENANT}
    world.token = jwt.encode(claims, key, algorithm="RS256", headers={"kid": kid})


def start_nginx(world: World) -> None:
    prefix = world.tmp / "nginx"
    prefix.mkdir()
    # nginx workers drop to 'nobody' when the bench runs as root: let them read the JWKS.
    os.chmod(world.tmp, 0o755)
    conf = prefix / "nginx.conf"
    conf.write_text(f"""
worker_processes 1;
daemon off;
pid {prefix}/nginx.pid;
error_log {prefix}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {prefix}/body;
  proxy_temp_path {prefix}/proxy;
  fastcgi_temp_path {prefix}/fastcgi;
  uwsgi_temp_path {prefix}/uwsgi;
  scgi_temp_path {prefix}/scgi;
  keepalive_requests 1000000;
  keepalive_timeout 120s;
  default_type text/plain;
  server {{
    listen 127.0.0.1:{world.upstream_port} backlog=4096;
    location / {{ return 200 "hello from the upstream\\n"; }}
  }}
  server {{
    listen 127.0.0.1:{world.issuer_port};
    root {world.tmp / "www"};
    location / {{ default_type application/json; }}
  }}
}}
""")
    world.procs.start("nginx", ["taskset", "-c", LOAD_CORE, tool("nginx"), "-p", str(prefix), "-c",
                                str(conf)], log=world.tmp / "nginx.stderr")
    wait_http(f"http://127.0.0.1:{world.upstream_port}/", 10)
    wait_http(f"{world.issuer}/jwks.json", 10)


def start_haproxy(world: World) -> None:
    world.haproxy_plain, world.haproxy_jwt = free_port(), free_port()
    conf, pem = world.tmp / "haproxy.cfg", world.tmp / "pub.pem"
    # The peer of the gateway's headers mode: RS256 signature, alg, iss, aud and exp checked on every
    # request, client identity headers and the token stripped, the subject forwarded.
    conf.write_text(f"""
global
  nbthread 1
  maxconn 4096
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  http-reuse always
frontend plain
  bind 127.0.0.1:{world.haproxy_plain}
  default_backend upstream
frontend jwt
  bind 127.0.0.1:{world.haproxy_jwt}
  http-request deny deny_status 401 unless {{ req.hdr(authorization) -m beg "Bearer " }}
  http-request set-var(txn.alg) http_auth_bearer,jwt_header_query('$.alg')
  http-request set-var(txn.iss) http_auth_bearer,jwt_payload_query('$.iss')
  http-request set-var(txn.aud) http_auth_bearer,jwt_payload_query('$.aud')
  http-request set-var(txn.exp) http_auth_bearer,jwt_payload_query('$.exp','int')
  http-request set-var(txn.sub) http_auth_bearer,jwt_payload_query('$.sub')
  http-request deny deny_status 401 unless {{ var(txn.alg) -m str RS256 }}
  http-request deny deny_status 401 unless {{ var(txn.iss) -m str {world.issuer} }}
  http-request deny deny_status 401 unless {{ var(txn.aud) -m str {AUDIENCE} }}
  http-request deny deny_status 401 unless {{ http_auth_bearer,jwt_verify(txn.alg,"{pem}") -m int 1 }}
  http-request set-var(txn.now) date()
  http-request deny deny_status 401 if {{ var(txn.exp),sub(txn.now) -m int le 0 }}
  http-request del-header Authorization
  http-request del-header ^X-Auth- -m reg
  http-request set-header X-Auth-Subject %[var(txn.sub)]
  default_backend upstream
backend upstream
  server up 127.0.0.1:{world.upstream_port}
""")
    check = subprocess.run([tool("haproxy"), "-c", "-f", str(conf)], capture_output=True, text=True,
                           check=False)
    if check.returncode != 0:
        raise RuntimeError(f"haproxy config refused:\n{check.stdout}{check.stderr}")
    world.procs.start("haproxy", ["taskset", "-c", PROXY_CORE, tool("haproxy"), "-db", "-f", str(conf)],
                      log=world.tmp / "haproxy.stderr")
    wait_http(f"http://127.0.0.1:{world.haproxy_plain}/", 10)
    auth = {"Authorization": f"Bearer {world.token}"}
    wait_http(f"http://127.0.0.1:{world.haproxy_jwt}{PATHS['headers']}", 10, auth)
    status, _ = http_get(f"http://127.0.0.1:{world.haproxy_jwt}{PATHS['headers']}")
    bad, _ = http_get(f"http://127.0.0.1:{world.haproxy_jwt}{PATHS['headers']}",
                      {"Authorization": f"Bearer {world.token[:-4]}AAAA"})
    if status != 401 or bad != 401:
        raise RuntimeError(f"haproxy jwt frontend lets bad requests through: no token {status}, forged {bad}")


def start_redis(world: World) -> None:
    world.redis_port = free_port()
    world.procs.start("redis", ["taskset", "-c", LOAD_CORE, tool("redis-server"), "--bind", "127.0.0.1",
                                "--port", str(world.redis_port), "--save", "", "--appendonly", "no",
                                "--dir", str(world.tmp)], log=world.tmp / "redis.log")
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline:
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", world.redis_port), 1) as s:
            s.sendall(b"PING\r\n")
            if s.recv(16).startswith(b"+PONG"):
                return
        time.sleep(0.05)
    raise RuntimeError("redis-server did not answer PING")


def start_world(world: World, *, haproxy: bool = False) -> None:
    """Keys and token, nginx (upstream and JWKS), HAProxy when asked, Redis, the gateway's config."""
    world.upstream_port, world.issuer_port = free_port(), free_port()
    make_keys(world, ttl=7 * 24 * 3600)
    start_nginx(world)
    if haproxy:
        start_haproxy(world)
    start_redis(world)
    write_gateway_config(world)


def write_gateway_config(world: World, name: str = "gateway-bench") -> None:
    world.gateway_port, world.admin_port = free_port(), free_port()
    world.gateway_cfg = world.tmp / f"{name}.yaml"
    world.gateway_cfg.write_text(f"""\
server:
  listen: 127.0.0.1:{world.gateway_port}
  shutdown_grace: 2s
admin:
  listen: 127.0.0.1:{world.admin_port}
  issuer: bench
issuers:
  - name: bench
    issuer: {world.issuer}
    jwks_uri: {world.issuer}/jwks.json
    audiences: [{AUDIENCE}]
    algorithms: [RS256]
revocation:
  backend: redis
  redis_url: redis://127.0.0.1:{world.redis_port}/0
internal_token:
  key_store: {world.tmp / f"{name}-signing-keys.json"}
upstreams:
  bench:
    targets: [http://127.0.0.1:{world.upstream_port}]
    timeouts: {{connect: 1s, read: 10s}}
routes:
  - name: public
    match: {{path: {PATHS["public"]}, methods: [GET]}}
    upstream: bench
    auth: {{required: false}}
  - name: headers
    match: {{path: "/api/tenants/{{tenant}}/orders/{{id}}", methods: [GET]}}
    upstream: bench
    auth: {{scopes: [orders:read], claims: {{tenant: "{{path.tenant}}"}}}}
    forward: {{identity: headers}}
  - name: token
    match: {{path: "/svc/tenants/{{tenant}}/orders/{{id}}", methods: [GET]}}
    upstream: bench
    auth: {{scopes: [orders:read], claims: {{tenant: "{{path.tenant}}"}}}}
    forward: {{identity: token, audience: orders-service, scopes: [orders:read]}}
""")


@contextlib.contextmanager
def gateway(world: World, workers: int, log: Path | None, *, wrapper: tuple[str, ...] = (),
            ready_within: float = 30.0, pin: bool | None = None,
            extra_env: dict[str, str] | None = None) -> Iterator[subprocess.Popen[bytes]]:
    """`gateway run` with the bench config: one worker pinned to the proxy core, or N on every core
    (`pin=True`: N on the proxy core). `wrapper`: a command the gateway runs under (instructions.py);
    `extra_env`: added to its environment."""
    cmd = [*wrapper, sys.executable, "-m", "gateway", "run", "-c", str(world.gateway_cfg), "--workers", str(workers)]
    if pin or (pin is None and workers == 1):
        cmd = ["taskset", "-c", PROXY_CORE, *cmd]
    out: Any = open(log, "ab") if log is not None else subprocess.DEVNULL  # noqa: SIM115
    env = {k: v for k, v in os.environ.items() if k != "PROMETHEUS_MULTIPROC_DIR"} | (extra_env or {})
    try:
        proc = world.procs.start(f"gateway-w{workers}", cmd, stdout=out,
                                 log=world.tmp / f"gateway-w{workers}.err", env=env, cwd=world.root)
    finally:
        if log is not None:
            out.close()
    try:
        deadline = time.monotonic() + ready_within
        while True:
            if proc.poll() is not None:
                err = (world.tmp / f"gateway-w{workers}.err").read_text()[-2000:]
                raise RuntimeError(f"gateway exited with {proc.returncode}:\n{err}")
            try:
                if http_get(f"http://127.0.0.1:{world.admin_port}/readyz")[0] == 200:
                    break
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"gateway not ready within {ready_within:g}s")
            time.sleep(0.1)
        base = f"http://127.0.0.1:{world.gateway_port}"
        auth = {"Authorization": f"Bearer {world.token}"}
        for _ in range(4 * workers):  # every worker (SO_REUSEPORT spreads connections) must answer
            for route, path in PATHS.items():
                status, body = http_get(base + path, auth if route != "public" else None)
                if status != 200:
                    raise RuntimeError(f"gateway {route} route answered {status}: {body[:200]!r}")
        if http_get(base + PATHS["headers"])[0] != 401:
            raise RuntimeError("gateway headers route answered a request without a token")
        yield proc
    finally:
        world.procs.stop(proc)


def gateway_pids(proc: subprocess.Popen[bytes], workers: int) -> list[int]:
    return [proc.pid] if workers == 1 else children(proc.pid)


QUOTA_CORES = 0.4  # CPU per worker in the quota rows: two of them leave room on core 1 for kernel work


class CpuQuota:
    """A cgroup capping the CPU time of the processes put in it (`cores` CPUs' worth per 100 ms).

    The quota rows use it to measure `--workers 2` against one worker with the load generator on
    another core, which a 2-core machine cannot give whole cores for: each worker gets QUOTA_CORES of
    core 1, and wrk, nginx and Redis keep core 0. cgroup v1 `cpu` (cfs_quota_us) or v2 (cpu.max); root."""

    def __init__(self, name: str, cores: float) -> None:
        v1, v2 = Path("/sys/fs/cgroup/cpu"), Path("/sys/fs/cgroup")
        quota = str(int(cores * 100_000))
        if (v1 / "cpu.cfs_quota_us").exists():
            self.path, self.parent = v1 / name, v1
            self.path.mkdir()
            (self.path / "cpu.cfs_period_us").write_text("100000")
            (self.path / "cpu.cfs_quota_us").write_text(quota)
        elif "cpu" in (v2 / "cgroup.controllers").read_text().split():
            (v2 / "cgroup.subtree_control").write_text("+cpu")
            self.path, self.parent = v2 / name, v2
            self.path.mkdir()
            (self.path / "cpu.max").write_text(f"{quota} 100000")
        else:
            raise OSError("no cgroup cpu controller")

    def add(self, pid: int) -> None:
        (self.path / "cgroup.procs").write_text(str(pid))  # the whole process, every thread

    def remove(self) -> None:
        with contextlib.suppress(OSError):
            for pid in (self.path / "cgroup.procs").read_text().split():
                with contextlib.suppress(OSError):
                    (self.parent / "cgroup.procs").write_text(pid)
            self.path.rmdir()


# ---------------------------------------------------------------------------------------------
# wrk

_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 6e4}


def _ms(text: str) -> float:
    m = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text.strip())
    if not m:
        raise ValueError(f"unparsable wrk latency {text!r}")
    return float(m.group(1)) * _UNITS[m.group(2)]


def cpu_ticks(pids: list[int]) -> tuple[int, int]:
    """(utime + stime, stime) of these processes and their children (the workers of
    `gateway run --workers N`), read once."""
    ticks = [_proc_ticks(p) for pid in pids for p in (pid, *children(pid))]
    return sum(t for t, _ in ticks), sum(s for _, s in ticks)


def wrk(url: str, duration: float, *, token: str | None = None, connections: int = 50, pin: bool = True,
        script: Path | None = None, noise: ForeignCpu | None = None,
        cpu_of: list[int] | None = None, core: str | None = None) -> dict[str, float]:
    cmd = [tool("wrk"), "-t1", f"-c{connections}", f"-d{max(1, round(duration))}s", "--latency"]
    if token:
        cmd += ["-H", f"Authorization: Bearer {token}"]
    if script is not None:
        cmd += ["-s", str(script)]
    cmd.append(url)
    if pin:
        cmd = ["taskset", "-c", core or LOAD_CORE, *cmd]
    waited = 0.0
    if noise is not None:
        waited = noise.wait_quiet(QUIET_WAIT)
        noise.start()
    ticks0, sys0 = cpu_ticks(cpu_of) if cpu_of else (0, 0)
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=duration + 60, check=False).stdout
    ticks, sys_ticks = cpu_ticks(cpu_of) if cpu_of else (0, 0)
    ticks, sys_ticks = ticks - ticks0, sys_ticks - sys0
    other = noise.stop() if noise is not None else math.nan
    rps = re.search(r"Requests/sec:\s+([\d.]+)", out)
    total = re.search(r"(\d+) requests in", out)
    p50 = re.search(r"\n\s+50%\s+(\S+)", out)
    p99 = re.search(r"\n\s+99%\s+(\S+)", out)
    if not (rps and total and p50 and p99):
        raise RuntimeError(f"unparsable wrk output:\n{out}")
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    errs = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)", out)
    requests = int(total.group(1))
    # The proxy's own CPU per request (ticks of 10 ms: ~0.2 % resolution over a 5 s sample at one core):
    # steadier than req/s on a shared machine, and what decides how far more cores take it.
    cpu_us = ticks / os.sysconf("SC_CLK_TCK") * 1e6 / requests if cpu_of and requests else math.nan
    sys_share = sys_ticks / ticks if ticks else math.nan  # the kernel's part of the proxy's CPU
    return {"rps": float(rps.group(1)), "requests": requests, "cpu_us": cpu_us, "sys_share": sys_share,
            "p50_ms": _ms(p50.group(1)),
            "p99_ms": _ms(p99.group(1)), "non2xx": int(non2xx.group(1)) if non2xx else 0,
            "socket_errors": sum(int(x) for x in errs.groups()) if errs else 0, "other_cpu": other,
            "waited_s": round(waited, 1)}


def take_sample(row: Row, args: argparse.Namespace, rep: int, noise: ForeignCpu, *, token: str,
                pin: bool = True) -> None:
    """One measured wrk run of `row` (its proxy's CPU read around it), kept and printed."""
    sample = wrk(row.url, args.duration, token=token if row.token else None, pin=pin, noise=noise,
                 cpu_of=row.cpu_of)
    row.samples.append(sample)
    print(f"  rep {rep + 1}/{args.reps} {row.label:<30} {sample['rps']:>9.0f} req/s  "
          f"p50 {sample['p50_ms']:.2f} ms  p99 {sample['p99_ms']:.2f} ms  "
          f"CPU {sample['cpu_us']:.0f} µs/req ({sample['sys_share']:.0%} system)  "
          f"other CPU {sample['other_cpu']:.2f}", flush=True)


def paced_script(tmp: Path, rate: float, connections: int) -> Path:
    """A wrk script holding the offered load near `rate` req/s: each connection waits between requests.

    The wait is drawn uniformly from 0..2x its mean: with one fixed wait, the 50 connections (opened
    together) fire in lockstep, and p99 measures how long a burst of 50 simultaneous requests queues,
    not the latency at an average rate."""
    delay_ms = max(1, round(connections / rate * 1000))
    path = tmp / f"paced-{delay_ms}.lua"
    path.write_text(f"math.randomseed(os.time())\nfunction delay()\n  return math.random(0, {2 * delay_ms})\nend\n")
    return path


# ---------------------------------------------------------------------------------------------
# the run


@dataclass
class Row:
    key: str
    label: str
    url: str
    token: bool
    cpu_of: list[int] = field(default_factory=list)  # the proxy's processes: CPU per request
    samples: list[dict[str, float]] = field(default_factory=list)

    def med(self, name: str) -> float:
        return statistics.median(s[name] for s in self.samples) if self.samples else math.nan

    def summary(self) -> dict[str, Any]:
        rps = [s["rps"] for s in self.samples]
        return {"label": self.label, "url": self.url, "samples": self.samples,
                "rps_median": self.med("rps"), "rps_min": min(rps, default=math.nan),
                "rps_max": max(rps, default=math.nan),
                "rps_stdev": statistics.stdev(rps) if len(rps) > 1 else 0.0,
                "p50_ms_median": self.med("p50_ms"), "p99_ms_median": self.med("p99_ms"),
                "other_cpu_median": self.med("other_cpu"), "cpu_us_median": self.med("cpu_us"),
                "sys_share_median": self.med("sys_share"),
                "errors": sum(s["non2xx"] + s["socket_errors"] for s in self.samples)}


def run(args: argparse.Namespace) -> dict[str, Any]:
    check_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = Procs()
    world = World(tmp=tmp, procs=procs)
    noise = ForeignCpu(procs)
    result: dict[str, Any] = {"date": datetime.now(UTC).isoformat(timespec="seconds"), "args": vars(args),
                              "machine": machine()}

    def on_term(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, on_term)
    try:
        start_world(world, haproxy=True)
        log = tmp / "access.log" if args.access_log_file else None
        up = f"http://127.0.0.1:{world.upstream_port}"
        gw = f"http://127.0.0.1:{world.gateway_port}"
        hp = "http://127.0.0.1:"
        rows = [
            Row("upstream", "upstream direct (nginx)", up + PATHS["headers"], False, procs.pids("nginx")),
            Row("haproxy", "HAProxy plain", f"{hp}{world.haproxy_plain}{PATHS['headers']}", False,
                procs.pids("haproxy")),
            Row("haproxy_jwt", "HAProxy + jwt_verify RS256", f"{hp}{world.haproxy_jwt}{PATHS['headers']}",
                True, procs.pids("haproxy")),
            Row("gw_public", "gateway public route", gw + PATHS["public"], False),
            # The public route sent the same Authorization header (forwarded, never checked): what the
            # token's bytes alone cost, apart from checking it.
            Row("gw_public_tok", "gateway public route, token sent along", gw + PATHS["public"], True),
            Row("gw_headers", "gateway headers mode", gw + PATHS["headers"], True),
            Row("gw_token", "gateway token mode", gw + PATHS["token"], True),
        ]
        if args.only:
            rows = [r for r in rows if r.key in args.only]
        w2 = Row("gw_headers_w2", "gateway headers mode --workers 2 (wrk shares a core)",
                 gw + PATHS["headers"], True)
        warm = min(3.0, args.duration)
        with contextlib.ExitStack() as stack:
            proc = stack.enter_context(gateway(world, 1, log))
            if args.compare:
                other = dataclasses.replace(world, root=Path(args.compare).resolve())
                write_gateway_config(other, "gateway-compare")
                cmp_proc = stack.enter_context(gateway(other, 1, None))
                cmp = f"http://127.0.0.1:{other.gateway_port}"
                twins = {"gw_" + k: Row("cmp_" + k, f"compare: {k} route", cmp + PATHS[k], k != "public",
                                        [cmp_proc.pid]) for k in PATHS}
                rows = [x for r in rows for x in ((r, twins[r.key]) if r.key in twins else (r,))]
            rss: dict[str, Any] = {"before_load_kb": rss_kb(proc.pid)}
            for row in rows:  # warm every path (connection pools, caches) before measuring
                row.cpu_of = row.cpu_of or [proc.pid]  # the gateway rows: this checkout's process
                wrk(row.url, warm, token=world.token if row.token else None)
            rss["after_warmup_kb"] = rss_kb(proc.pid)
            for rep in range(args.reps):  # repetitions interleaved, so drift spreads over every row
                for row in rows:
                    take_sample(row, args, rep, noise, token=world.token)
            rss["after_load_kb"] = rss_kb(proc.pid)
            result["half_rate"] = half_rate(world, rows, args, noise)
            if args.soak:
                result["soak"] = soak(world, proc.pid, args)
            result["rss"] = rss
        if not args.only or "gw_headers_w2" in args.only:
            with gateway(world, 2, log) as proc2:
                w2.cpu_of = [proc2.pid]
                wrk(w2.url, warm, token=world.token, pin=False)
                for rep in range(args.reps):
                    take_sample(w2, args, rep, noise, token=world.token, pin=False)
                result["rss"]["workers2_kb"] = [rss_kb(p) for p in gateway_pids(proc2, 2)]
            rows.append(w2)
        if not args.only or {"quota_w1", "quota_w2"} & set(args.only):
            rows += quota_rows(world, args, noise, log)
        result["rows"] = {r.key: r.summary() for r in rows}
        result["ratios"] = ratios(result["rows"])
        return result
    finally:
        procs.stop_all()
        signal.signal(signal.SIGTERM, signal.SIG_DFL)
        if args.keep_tmp:
            print(f"bench: temporary files kept in {tmp}")
        else:
            shutil.rmtree(tmp, ignore_errors=True)


def profile(args: argparse.Namespace) -> int:
    """py-spy on the one-worker gateway while wrk loads one route: a flame graph and the top functions."""
    pyspy = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not Path(pyspy).exists():
        sys.exit("bench: --profile needs py-spy (profiling only, not a project dependency):\n"
                 "  .venv/bin/pip install py-spy")
    check_tools()
    tmp = Path(tempfile.mkdtemp(prefix="gateway-bench-"))
    procs = Procs()
    world = World(tmp=tmp, procs=procs)
    out = BENCH / "results"
    out.mkdir(exist_ok=True)
    try:
        start_world(world)
        with gateway(world, 1, None) as proc:
            for route in args.profile:
                url = f"http://127.0.0.1:{world.gateway_port}{PATHS[route]}"
                token = world.token if route != "public" else None
                wrk(url, 3, token=token)
                stem = out / f"profile-{route}"
                spy = [pyspy, "record", "--pid", str(proc.pid), "--duration", str(round(args.duration)),
                       "--rate", "250", "--nonblocking"]
                svg = procs.start("py-spy", [*spy, "-o", f"{stem}.svg"], log=tmp / "py-spy.log")
                raw = procs.start("py-spy", [*spy, "--format", "raw", "-o", f"{stem}.txt"],
                                  log=tmp / "py-spy.log")
                s = wrk(url, args.duration + 1, token=token)
                svg.wait(60)
                raw.wait(60)
                print(f"{route}: {s['rps']:.0f} req/s under the profiler; {stem}.svg, {stem}.txt")
                print(top_functions(Path(f"{stem}.txt")))
    finally:
        procs.stop_all()
        shutil.rmtree(tmp, ignore_errors=True)
    return 0


def top_functions(collapsed: Path, n: int = 25) -> str:
    """Self and inclusive share of samples per function from py-spy's collapsed stacks."""
    own: dict[str, int] = {}
    incl: dict[str, int] = {}
    total = 0
    for line in collapsed.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack:
            continue
        k = int(count)
        total += k
        frames = [re.sub(r" \((.*/)?([^/]+\.py):\d+\)$", r" (\2)", f) for f in stack.split(";")]
        own[frames[-1]] = own.get(frames[-1], 0) + k
        for f in set(frames):
            incl[f] = incl.get(f, 0) + k
    lines = [f"{'self %':>7} {'incl %':>7}  function (of {total} samples)"]
    for f, k in sorted(own.items(), key=lambda x: -x[1])[:n]:
        lines.append(f"{100 * k / total:7.1f} {100 * incl[f] / total:7.1f}  {f}")
    lines.append("-- inclusive --")
    for f, k in sorted(incl.items(), key=lambda x: -x[1])[:n]:
        lines.append(f"{100 * own.get(f, 0) / total:7.1f} {100 * k / total:7.1f}  {f}")
    return "\n".join(lines)


def half_rate(world: World, rows: list[Row], args: argparse.Namespace, noise: ForeignCpu) -> dict[str, Any]:
    """p99 at half the gateway's measured maximum (headers mode), for upstream direct, the gateway and
    HAProxy + jwt: `--reps` paced samples each, interleaved, medians reported (one sample's p99 is its
    ~1 % slowest requests, which one stall of the VM decides).

    Also "upstream_xcore": nginx again, but with wrk on the proxy core. Upstream direct has wrk and nginx
    on one core; a proxy's request crosses between the cores four times (wrk, proxy, nginx, proxy, wrk),
    and on a VM waking a task on the other core is slow: this row shows what two of those crossings cost
    with no proxy at all."""
    by_key = {r.key: r for r in rows}
    gw = by_key.get("gw_headers")
    if gw is None or not gw.samples:
        return {}
    rate = gw.med("rps") / 2
    script = paced_script(world.tmp, rate, 50)
    targets = [by_key[k] for k in ("upstream", "gw_headers", "haproxy_jwt") if k in by_key]
    if "upstream" in by_key:
        up = by_key["upstream"]
        targets.insert(1, Row("upstream_xcore", "upstream, wrk on proxy core", up.url, False))
    samples: dict[str, list[dict[str, float]]] = {row.key: [] for row in targets}
    for rep in range(args.reps):
        for row in targets:
            s = wrk(row.url, args.duration, token=world.token if row.token else None, script=script, noise=noise,
                    core=PROXY_CORE if row.key == "upstream_xcore" else None)
            samples[row.key].append(s)
            print(f"  half rate {rep + 1}/{args.reps} {row.label:<30} {s['rps']:>9.0f} req/s  "
                  f"p50 {s['p50_ms']:.2f} ms  p99 {s['p99_ms']:.2f} ms", flush=True)
    out: dict[str, Any] = {"target_rps": rate}
    for key, ss in samples.items():
        p99 = [s["p99_ms"] for s in ss]
        out[key] = {"rps": statistics.median(s["rps"] for s in ss),
                    "p50_ms": statistics.median(s["p50_ms"] for s in ss),
                    "p99_ms": statistics.median(p99), "p99_min_ms": min(p99), "p99_max_ms": max(p99), "samples": ss}
    return out


def soak(world: World, pid: int, args: argparse.Namespace) -> dict[str, Any]:
    """RSS across at least `--soak` requests on the headers route, read after each bounded wrk chunk."""
    url = f"http://127.0.0.1:{world.gateway_port}{PATHS['headers']}"
    chunk = 20.0
    max_chunks = max(1, math.ceil(args.soak / (500 * chunk)))  # bound: never longer than at 500 req/s
    done, series = 0, [rss_kb(pid)]
    for _ in range(max_chunks):
        s = wrk(url, chunk, token=world.token)
        done += int(s["requests"])
        series.append(rss_kb(pid))
        print(f"  soak {done:>9} requests  RSS {series[-1] / 1024:.1f} MB", flush=True)
        if done >= args.soak:
            break
    base = series[1] if len(series) > 1 else series[0]
    growth = 100.0 * (series[-1] - base) / base if base else 0.0
    return {"requests": done, "rss_kb": series, "growth_pct": growth, "max_mb": max(series) / 1024}


def quota_rows(world: World, args: argparse.Namespace, noise: ForeignCpu, log: Path | None) -> list[Row]:
    """Headers mode with 1 worker and with 2, each worker capped at QUOTA_CORES of core 1 (CpuQuota),
    wrk, nginx and Redis on core 0: the --workers 2 scaling with the load generator elsewhere."""
    tag = f"{QUOTA_CORES:g} CPU each, wrk on the other core"
    groups: list[CpuQuota] = []
    try:
        for i in range(3):
            groups.append(CpuQuota(f"gateway-bench-{os.getpid()}-{i}", QUOTA_CORES))
    except OSError as exc:
        for g in groups:
            g.remove()
        print(f"bench: quota rows skipped (they need root and a cgroup cpu controller): {exc}", flush=True)
        return []
    two = dataclasses.replace(world)
    write_gateway_config(two, "gateway-quota-w2")
    q1 = Row("quota_w1", f"headers mode, 1 worker ({tag})", f"http://127.0.0.1:{world.gateway_port}"
             + PATHS["headers"], True)
    q2 = Row("quota_w2", f"headers mode, --workers 2 ({tag})", f"http://127.0.0.1:{two.gateway_port}"
             + PATHS["headers"], True)
    try:
        with gateway(world, 1, log, pin=True) as p1, gateway(two, 2, log, pin=True) as p2:
            groups[0].add(p1.pid)
            for g, pid in zip(groups[1:], gateway_pids(p2, 2), strict=True):
                g.add(pid)
            for row, proc in ((q1, p1), (q2, p2)):
                row.cpu_of = [proc.pid]
                wrk(row.url, min(3.0, args.duration), token=world.token)
            for rep in range(args.reps):
                for row in (q1, q2):
                    take_sample(row, args, rep, noise, token=world.token)
    finally:
        for g in groups:
            g.remove()
    return [q1, q2]


def ratios(rows: dict[str, Any]) -> dict[str, float]:
    def r(a: str, b: str) -> float:
        if a in rows and b in rows and rows[b]["rps_median"]:
            return float(rows[a]["rps_median"] / rows[b]["rps_median"])
        return math.nan

    def cpu(a: str, b: str) -> float:
        """CPU per request of b over a's: how much more a's costs."""
        if a in rows and b in rows and rows[a].get("cpu_us_median"):
            return float(rows[b]["cpu_us_median"] / rows[a]["cpu_us_median"])
        return math.nan

    def paired(a: str, b: str) -> float:
        """The median of the per-repetition ratios: each pair of samples was taken seconds apart, so the
        machine's slow drift divides out (the samples of a repetition are interleaved)."""
        if a in rows and b in rows and len(rows[a]["samples"]) == len(rows[b]["samples"]) > 0:
            return float(statistics.median(x["rps"] / y["rps"] for x, y in
                                           zip(rows[a]["samples"], rows[b]["samples"], strict=True) if y["rps"]))
        return math.nan
    return {
        "headers/haproxy_jwt": r("gw_headers", "haproxy_jwt"),
        "headers/public": r("gw_headers", "gw_public"),
        "headers/public+token": r("gw_headers", "gw_public_tok"),
        "token/headers": r("gw_token", "gw_headers"),
        "workers2/headers": r("gw_headers_w2", "gw_headers"),
        "paired: headers/haproxy_jwt": paired("gw_headers", "haproxy_jwt"),
        "paired: headers/public": paired("gw_headers", "gw_public"),
        "paired: token/headers": paired("gw_token", "gw_headers"),
        # The same ratios from the proxy's CPU per request (steadier on a shared machine than req/s).
        "cpu: headers/haproxy_jwt": cpu("gw_headers", "haproxy_jwt"),
        "cpu: headers/public": cpu("gw_headers", "gw_public"),
        "cpu: token/headers": cpu("gw_token", "gw_headers"),
        # 2 workers on 2 cores of their own, from CPU per request (this machine has no core to spare
        # for wrk and nginx): 2 x (1 worker's CPU per request / 2 workers' CPU per request).
        "projected workers2/headers": 2 * cpu("gw_headers_w2", "gw_headers"),
        # Measured with each worker capped at QUOTA_CORES and wrk on the other core (quota_rows).
        "quota: workers2/workers1": r("quota_w2", "quota_w1"),
        "paired quota: workers2/workers1": paired("quota_w2", "quota_w1"),
        **{f"compare/{k}": r("cmp_" + k, "gw_" + k) for k in PATHS if "cmp_" + k in rows},
    }


def machine() -> dict[str, Any]:
    def version(cmd: list[str]) -> str:
        with contextlib.suppress(OSError):
            p = subprocess.run(cmd, capture_output=True, text=True, check=False)
            text = (p.stdout + p.stderr).strip().splitlines()
            return text[0] if text else ""
        return ""
    cpu = ""
    with contextlib.suppress(OSError):
        cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                    if line.startswith("model name")), "")
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "interpreter": interpreter(),
            "nginx": version([tool("nginx"), "-v"]), "haproxy": version([tool("haproxy"), "-v"]),
            "wrk": version([tool("wrk"), "-v"]), "redis": version([tool("redis-server"), "--version"])}


def interpreter() -> str:
    """The interpreter the gateway runs on (`gateway run` is started with sys.executable) and where it
    comes from: pyenv's CPython (no --enable-optimizations) ran the gateway 10-15 % slower here than
    Debian's /usr/bin/python3.11; the image's python:3.11-slim is built with PGO and LTO."""
    args = str(sysconfig.get_config_var("CONFIG_ARGS") or "")
    flags = " ".join(f for f in ("--enable-optimizations", "--with-lto") if f in args) or "no PGO/LTO flags"
    return f"CPython {platform.python_version()} of {sys.base_prefix} ({flags} in its configure line)"


def table(result: dict[str, Any]) -> str:
    rows = result["rows"]
    hj = rows.get("haproxy_jwt", {}).get("rps_median", math.nan)
    pub = rows.get("gw_public", {}).get("rps_median", math.nan)
    a = result["args"]
    lines = [
        f"Bench run {result['date']} — {a['reps']} repetition(s) × {a['duration']:g} s, "
        f"`wrk -t1 -c50 --latency` on core {LOAD_CORE}, proxy on core {PROXY_CORE} "
        f"({result['machine']['cpu']}, {result['machine']['haproxy']}; gateway on "
        f"{result['machine'].get('interpreter', 'python ' + result['machine']['python'])}).",
        "",
        "| row | req/s (median) | min–max | stdev | p50 ms | p99 ms | × HAProxy+jwt | × gw public "
        "| proxy CPU µs/req | system | errors | other CPU |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for key, row in rows.items():
        gw_row = key.startswith("gw_")
        rj = f"{row['rps_median'] / hj:.2f}" if gw_row and hj and not math.isnan(hj) else ""
        rp = (f"{row['rps_median'] / pub:.2f}"
              if gw_row and pub and not math.isnan(pub) and key != "gw_public" else "")
        lines.append(f"| {row['label']} | {row['rps_median']:.0f} "
                     f"| {row['rps_min']:.0f}–{row['rps_max']:.0f} "
                     f"| {row['rps_stdev']:.0f} | {row['p50_ms_median']:.2f} | {row['p99_ms_median']:.2f} "
                     f"| {rj} | {rp} | {row.get('cpu_us_median', math.nan):.1f} "
                     f"| {row.get('sys_share_median', math.nan):.0%} | {row['errors']} "
                     f"| {row['other_cpu_median']:.2f} |")
    lines += ["", "other CPU: cores' worth of CPU used by processes outside the bench during the samples "
              "(median); above ~0.1 the machine was not quiet and the numbers are low. proxy CPU µs/req: "
              "user + system time of the proxy's processes (nginx for the direct row) per request answered; "
              "the kernel's loopback work in softirq is charged to no process. system: the kernel's share of "
              "that CPU. paired: the median of the per-repetition ratios (samples seconds apart)."]
    ratios_ = result["ratios"]
    lines += ["", "Targets: " + "; ".join(f"{k} = {v:.2f}" for k, v in ratios_.items() if not math.isnan(v))]
    hr = result.get("half_rate") or {}
    if hr:
        parts = [f"{k}: {v['rps']:.0f} req/s p99 {v['p99_ms']:.2f} ms"
                 + (f" ({v['p99_min_ms']:.2f}–{v['p99_max_ms']:.2f})" if "p99_min_ms" in v else "")
                 for k, v in hr.items() if k != "target_rps"]
        n = len(next((v["samples"] for k, v in hr.items() if k != "target_rps" and "samples" in v), [None]))
        lines.append(f"Half rate (offered ≈ {hr['target_rps']:.0f} req/s, paced wrk, medians of {n} samples, "
                     "p99 range in brackets): " + "; ".join(parts))
    rss = result.get("rss") or {}
    if rss:
        text = "Gateway RSS (1 worker): " + ", ".join(
            f"{k.removesuffix('_kb').replace('_', ' ')} {v / 1024:.1f} MB" for k, v in rss.items()
            if isinstance(v, int))
        if "workers2_kb" in rss:
            text += "; --workers 2: " + ", ".join(f"{v / 1024:.1f} MB" for v in rss["workers2_kb"])
        lines.append(text)
    sk = result.get("soak")
    if sk:
        lines.append(f"Soak: {sk['requests']} requests, RSS growth {sk['growth_pct']:+.1f}% after the first "
                     f"chunk, max {sk['max_mb']:.1f} MB")
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="1 repetition of 3 s (a smoke run)")
    p.add_argument("--reps", type=int, default=3, help="repetitions per row (median reported)")
    p.add_argument("--duration", type=float, default=10.0, help="seconds per wrk run")
    p.add_argument("--soak", type=int, default=0, metavar="N", help="also run N requests, reading RSS")
    p.add_argument("--only", nargs="+", metavar="ROW", help="rows to run: upstream haproxy haproxy_jwt "
                   "gw_public gw_public_tok gw_headers gw_token gw_headers_w2 quota_w1 quota_w2")
    p.add_argument("--access-log-file", action="store_true",
                   help="gateway stdout (access log) to a file in the temp dir instead of /dev/null")
    p.add_argument("--compare", metavar="DIR", help="also run the gateway from another checkout (A/B rows)")
    p.add_argument("--keep-tmp", action="store_true", help="keep the temp dir (configs, logs)")
    p.add_argument("--no-write", action="store_true", help="do not write bench/results or bench/LAST_RUN.md")
    p.add_argument("--profile", nargs="+", choices=sorted(PATHS), metavar="ROUTE",
                   help="instead of the table: py-spy the gateway under wrk on these routes")
    p.add_argument("--quiet-wait", type=float, default=QUIET_WAIT, metavar="S",
                   help="before each sample wait up to S s for other processes to leave the CPUs (0: never)")
    args = p.parse_args()
    globals()["QUIET_WAIT"] = args.quiet_wait
    if args.profile:
        return profile(args)
    if args.quick:
        args.reps, args.duration = 1, 3.0
    try:
        result = run(args)
    except KeyboardInterrupt:
        print("bench: interrupted; every process stopped", file=sys.stderr)
        return 130
    text = table(result)
    print()
    print(text)
    if not args.no_write:
        out = BENCH / "results"
        out.mkdir(exist_ok=True)
        stamp = datetime.now(UTC).strftime("%Y-%m-%dT%H%M%SZ")
        (out / f"{stamp}.json").write_text(json.dumps(result, indent=1))
        python = sys.executable
        with contextlib.suppress(ValueError):  # the checkout's own venv: shown relative to it
            python = str(Path(sys.executable).relative_to(BENCH.parent))
        (BENCH / "LAST_RUN.md").write_text(f"# Last bench run\n\n`{python} bench/run.py "
                                           + " ".join(sys.argv[1:]) + "`\n\n" + text)
        print(f"written: bench/results/{stamp}.json, bench/LAST_RUN.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
