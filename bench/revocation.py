"""What the revocation check costs, and how fast a revocation crosses processes.

Run from the project directory:  .venv/bin/python bench/revocation.py [--duration 10] [--rounds 2]

Starts (all on 127.0.0.1, free ports, stopped by PID): a redis-server, a development issuer (in this
process), a tiny upstream process, and `python -m gateway run` processes. Then:
 1. throughput of one token-checked route with revocation backend memory vs redis (wrk, same line);
 2. propagation: revoke through gateway A's admin API, poll gateway B until it answers 401.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import aiohttp
import redis.asyncio as aioredis

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from gateway.devissuer import DevIssuer  # noqa: E402
from tests.support.gateway import config_text, free_port  # noqa: E402
from tests.support.redis_server import RedisServer  # noqa: E402

ROUTES = """\
  - name: orders
    match: {path_prefix: /api/}
    upstream: orders
    auth: {scopes: [orders:read]}
"""
UPSTREAM = """
import sys
from aiohttp import web
async def ok(request): return web.Response(text="ok")
app = web.Application(); app.router.add_route("*", "/{t:.*}", ok)
web.run_app(app, host="127.0.0.1", port=int(sys.argv[1]), access_log=None, print=None)
"""


async def wait_ready(url: str, timeout: float = 20) -> None:
    deadline = time.monotonic() + timeout
    async with aiohttp.ClientSession() as s:
        while time.monotonic() < deadline:
            try:
                async with s.get(url) as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError(f"not ready: {url}")


class Gw:
    def __init__(self, tmp: Path, name: str, text_for: object) -> None:
        self.port, self.admin = free_port(), free_port()
        self.path = tmp / f"{name}.yaml"
        self.path.write_text(text_for(f"127.0.0.1:{self.port}", f"127.0.0.1:{self.admin}"))  # type: ignore[operator]
        self.err = tmp / f"{name}.err"
        self.proc = subprocess.Popen([sys.executable, "-m", "gateway", "run", "-c", str(self.path)], cwd=ROOT,
                                     stdout=subprocess.DEVNULL, stderr=self.err.open("wb"))

    async def ready(self) -> None:
        try:
            await wait_ready(f"http://127.0.0.1:{self.admin}/readyz")
        except RuntimeError:
            print(f"exit code {self.proc.poll()}; stderr:\n{self.err.read_text()[-3000:]}", file=sys.stderr)
            raise

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(15)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def wrk(url: str, token: str, duration: int) -> tuple[float, str, str]:
    out = subprocess.run(["wrk", "-t1", "-c32", f"-d{duration}s", "--latency", "-H", f"Authorization: Bearer {token}",
                          url], capture_output=True, text=True, check=True).stdout
    rps = float(re.search(r"Requests/sec:\s+(\S+)", out).group(1))  # type: ignore[union-attr]
    p50 = re.search(r"^\s+50%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    p99 = re.search(r"^\s+99%\s+(\S+)", out, re.M).group(1)  # type: ignore[union-attr]
    non2xx = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    if non2xx:
        raise RuntimeError(f"{non2xx.group(1)} non-2xx responses:\n{out}")
    return rps, p50, p99


async def micro(url: str, n: int = 200_000) -> None:
    """The check alone, in this process: one `await store.check(p)` against 300 live revocations."""
    from gateway.config_types import RevocationConfig
    from gateway.model import Principal
    from gateway.revocation import create_store
    now = int(time.time())
    p = Principal(issuer="dev", iss="https://x", subject="alice", scopes=frozenset({"a"}), roles=(), tenant=None,
                  session="s-1", jti="j-1", iat=now, exp=now + 300, aud=("api",))
    print(f"# the check alone: {n} x `await store.check(p)` (token with jti, sub, sid; 300 live revocations)")
    for backend in ("memory", "redis"):
        cfg = RevocationConfig(backend=backend, redis_url=url, key_prefix="bench:", on_backend_error="deny",
                               max_token_lifetime=3600.0)
        store = create_store(cfg)
        await store.start()
        for i in range(300):
            await store.revoke(("jti", "subject", "session")[i % 3], f"other-{i}", "dev")
        best = float("inf")
        for _ in range(3):
            t0 = time.perf_counter()
            for _ in range(n):
                await store.check(p)
            best = min(best, time.perf_counter() - t0)
        await store.close()
        print(f"{backend:6s}: {best / n * 1e9:6.0f} ns per check (best of 3)")


async def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--duration", type=int, default=10)
    ap.add_argument("--rounds", type=int, default=2)
    ap.add_argument("--samples", type=int, default=20)
    args = ap.parse_args()
    if shutil.which("wrk") is None:
        raise SystemExit("wrk not found (apt-get install -y wrk)")
    tmp = Path(tempfile.mkdtemp(prefix="gw-bench-rev-"))
    redis = RedisServer()
    redis.start()
    issuer = DevIssuer()
    await issuer.start()
    up_port = free_port()
    upstream = subprocess.Popen([sys.executable, "-c", UPSTREAM, str(up_port)])
    started: list[Gw] = []
    rdb = aioredis.Redis.from_url(redis.url)
    try:
        await wait_ready(f"http://127.0.0.1:{up_port}/")

        def text(backend: str):  # type: ignore[no-untyped-def]
            rev = (f"revocation: {{backend: redis, redis_url: '{redis.url}'}}" if backend == "redis"
                   else "revocation: {backend: memory}")
            return lambda listen, admin: config_text(issuer.url, {"orders": [f"http://127.0.0.1:{up_port}"]}, ROUTES,
                                                     revocation=rev, listen=listen, admin_listen=admin)

        await micro(redis.url)
        token = issuer.token({"sub": "alice", "scope": "orders:read", "sid": "s-1"}, ttl=3600)
        admin_token = issuer.token({"sub": "ops", "scope": "gateway:admin"}, ttl=3600)
        print(f"# throughput: wrk -t1 -c32 -d{args.duration}s --latency, GET /api/orders/1 with a valid RS256 token")
        results: dict[str, list[float]] = {"memory": [], "redis": []}
        for rnd in range(args.rounds):
            for backend in ("memory", "redis"):
                gw = Gw(tmp, f"{backend}{rnd}", text(backend))
                started.append(gw)
                await gw.ready()
                url = f"http://127.0.0.1:{gw.port}/api/orders/1"
                # Live revocations of other tokens and subjects, so lookups are not against empty tables.
                async with aiohttp.ClientSession(headers={"Authorization": f"Bearer {admin_token}"}) as s:
                    for i in range(200):
                        body = {"type": ("jti", "subject", "session")[i % 3], "value": f"other-{i}"}
                        async with s.post(f"http://127.0.0.1:{gw.admin}/admin/revocations", json=body) as r:
                            assert r.status == 201, await r.text()
                await rdb.config_resetstat()
                rps, p50, p99 = await asyncio.to_thread(wrk, url, token, args.duration)
                stats = await rdb.info("commandstats")
                redis_cmds = sum(v["calls"] for k, v in stats.items()
                                 if k not in ("cmdstat_ping", "cmdstat_info") and not k.startswith("cmdstat_config"))
                results[backend].append(rps)
                print(f"round {rnd + 1} {backend:6s}: {rps:8.0f} req/s  p50 {p50:>8s}  p99 {p99:>8s}  "
                      f"Redis commands during the run (besides PING/INFO/CONFIG): {redis_cmds}")
                gw.stop()
        for backend, values in results.items():
            print(f"{backend:6s} median {statistics.median(values):.0f} req/s, min {min(values):.0f}, "
                  f"max {max(values):.0f} over {len(values)} runs")

        # -- propagation across two processes ------------------------------------------------------------
        a, b = Gw(tmp, "a", text("redis")), Gw(tmp, "b", text("redis"))
        started += [a, b]
        await asyncio.gather(a.ready(), b.ready())
        admin = issuer.token({"sub": "ops", "scope": "gateway:admin"}, ttl=3600)
        total, after_write = [], []
        async with aiohttp.ClientSession() as s:
            for i in range(args.samples):
                tok = issuer.token({"sub": "alice", "scope": "orders:read", "jti": f"p-{i}"})
                hdr = {"Authorization": f"Bearer {tok}"}
                async with s.get(f"http://127.0.0.1:{b.port}/api/orders/1", headers=hdr) as r:
                    assert r.status == 200
                t0 = time.monotonic()
                async with s.post(f"http://127.0.0.1:{a.admin}/admin/revocations",
                                  headers={"Authorization": f"Bearer {admin}"},
                                  data=json.dumps({"type": "jti", "value": f"p-{i}"})) as r:
                    assert r.status == 201, await r.text()
                t1 = time.monotonic()
                while True:
                    async with s.get(f"http://127.0.0.1:{b.port}/api/orders/1", headers=hdr) as r:
                        if r.status == 401:
                            break
                    if time.monotonic() - t0 > 2:
                        raise RuntimeError("not propagated in 2 s")
                t2 = time.monotonic()
                total.append((t2 - t0) * 1000)
                after_write.append((t2 - t1) * 1000)
                await asyncio.sleep(0.05)
        print(f"# propagation over {args.samples} revocations (A: POST /admin/revocations -> B: first 401), ms")
        for label, xs in (("from POST sent", total), ("from 201 received", after_write)):
            xs.sort()
            print(f"{label:18s} min {xs[0]:.1f}  median {statistics.median(xs):.1f}  "
                  f"p95 {xs[int(len(xs) * 0.95) - 1]:.1f}  max {xs[-1]:.1f}")
    finally:
        for gw in started:
            if gw.proc.poll() is None:
                gw.stop()
        upstream.terminate()
        upstream.wait(10)
        await rdb.aclose()
        await issuer.stop()
        redis.cleanup()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    asyncio.run(main())
