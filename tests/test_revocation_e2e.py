"""Revocation through the REAL gateway against a real redis-server: in-process apps and `gateway run` processes."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import statistics
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis

from gateway.devissuer import DevIssuer
from tests.support.gateway import ROOT, GatewayProcess, RunningGateway, config_text, eventually, free_port
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream

PREFIX = "gw:revoked:"
CHANNEL = PREFIX + "events"
PATH = "/api/orders/1"
ROUTES = """\
  - name: orders
    match: {path_prefix: /api/}
    upstream: orders
    auth: {scopes: [orders:read]}
"""
USER: dict[str, Any] = {"sub": "alice", "scope": "orders:read", "sid": "s-1"}
ADMIN: dict[str, Any] = {"sub": "ops", "scope": "gateway:admin"}


def revocation_yaml(url: str, on_error: str = "deny", lifetime: str = "2h") -> str:
    return (f"revocation: {{backend: redis, redis_url: '{url}', key_prefix: '{PREFIX}', "
            f"on_backend_error: {on_error}, max_token_lifetime: {lifetime}}}")


def gateway_yaml(issuer: DevIssuer, upstream: EchoUpstream, redis_url: str, on_error: str = "deny",
                 **kw: Any) -> str:
    return config_text(issuer.url, {"orders": [upstream.url]}, ROUTES,
                       revocation=revocation_yaml(redis_url, on_error), **kw)


async def status_of(session: aiohttp.ClientSession, url: str, token: str | None = None) -> int:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    async with session.get(url, headers=headers) as r:
        await r.read()
        return r.status


async def admin_post(session: aiohttp.ClientSession, admin_url: str, token: str | None, body: Any,
                     *, raw: bytes | None = None) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with session.post(admin_url + "/admin/revocations", data=data, headers=headers) as r:
        return r.status, await r.json(content_type=None)


async def metric(session: aiohttp.ClientSession, admin_url: str, name: str) -> float:
    async with session.get(admin_url + "/metrics") as r:
        text = await r.text()
    m = re.search(rf"^{re.escape(name)} (\S+)$", text, re.M)
    assert m is not None, f"{name} not on /metrics"
    return float(m.group(1))


async def publish_revocation(rdb: aioredis.Redis, jti: str) -> None:
    """A revocation written by 'another system' (SPEC 6): the key and the message, nothing else."""
    pipe = rdb.pipeline(transaction=True)
    pipe.set(f"{PREFIX}jti:{jti}", "1", ex=600)
    pipe.publish(CHANNEL, json.dumps({"type": "jti", "value": jti, "issuer": None, "at": int(time.time())}))
    await pipe.execute()


@pytest.fixture
async def rdb(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
             gateway_factory: Any) -> AsyncIterator[RunningGateway]:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)) as running:
        yield running


# -- the three kinds, through the in-process gateway ---------------------------------------------------------

async def test_revoked_jti_is_refused_within_a_second(gw: RunningGateway, issuer: DevIssuer,
                                                       rdb: aioredis.Redis) -> None:
    token, other = issuer.token({**USER, "jti": "leak-1"}), issuer.token({**USER, "jti": "fine-1"})
    assert (await gw.request("GET", PATH, token=token))[0] == 200
    t0 = time.monotonic()
    await publish_revocation(rdb, "leak-1")
    took = await eventually(lambda: _is(gw, token, 401), timeout=1.0, interval=0.005)
    assert time.monotonic() - t0 < 1.0, took
    status, headers, body = await gw.request("GET", PATH, token=token)
    assert status == 401 and body["error"] == "invalid_token"
    assert 'error="invalid_token"' in headers["WWW-Authenticate"]
    assert (await gw.request("GET", PATH, token=other))[0] == 200
    print(f"\njti revocation written by another system -> refused after {took * 1000:.1f} ms")


async def _is(gw: RunningGateway, token: str, want: int) -> bool:
    return (await gw.request("GET", PATH, token=token))[0] == want


async def test_subject_revocation_refuses_older_tokens_and_accepts_a_later_one(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    old, bob = issuer.token({**USER, "sid": "a"}), issuer.token({**USER, "sub": "bob"})
    assert (await gw.request("GET", PATH, token=old))[0] == 200
    status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                    {"type": "subject", "value": "alice", "issuer": "dev"})
    assert status == 201, body
    at = body["revoked"]["at"]
    assert (await gw.request("GET", PATH, token=old))[0] == 401
    # A token issued in the same second as T is revoked too (iat is whole seconds: fail closed) ...
    same_second = issuer.token({**USER, "iat": at, "sid": "b"})
    assert (await gw.request("GET", PATH, token=same_second))[0] == 401
    # ... and one issued at T+1 or later is accepted: the user logs in again after the revocation.
    while int(time.time()) < at + 1:
        await asyncio.sleep(0.02)
    fresh = issuer.token({**USER, "sid": "c"})
    assert (await gw.request("GET", PATH, token=fresh))[0] == 200
    assert (await gw.request("GET", PATH, token=bob))[0] == 200  # other subjects are untouched


async def test_a_revoked_long_lived_token_does_not_pass_again_when_its_revocation_expires(
    issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, rdb: aioredis.Redis,
    gateway_factory: Any,
) -> None:
    """A subject revocation is kept max_token_lifetime (+ the largest leeway, 0 here). A token that lives
    longer (exp - iat: an hour; max_token_lifetime: 2 s) used to pass again once the key had expired."""
    text = config_text(issuer.url, {"orders": [echo_upstream.url]}, ROUTES, issuer_extra="    leeway: 0s",
                       revocation=revocation_yaml(redis_server.url, lifetime="2s"))
    async with gateway_factory(text) as gw:
        token = issuer.token({**USER, "sid": "long"}, ttl=3600)
        assert (await gw.request("GET", PATH, token=token))[0] == 200
        status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                        {"type": "subject", "value": "alice", "issuer": "dev"})
        assert status == 201 and body["revoked"]["ttl"] == 2, body
        assert (await gw.request("GET", PATH, token=token))[0] == 401
        await eventually(lambda: _gone(rdb, f"{PREFIX}sub:dev:alice"), timeout=4.0, interval=0.05)
        await asyncio.sleep(0.1)  # the local view's copy ends with the key's TTL too
        status, headers, _ = await gw.request("GET", PATH, token=token)
        assert status == 401 and 'error="invalid_token"' in headers["WWW-Authenticate"]
        fresh = issuer.token({**USER, "sid": "new"}, ttl=3600)  # a token issued now passes: 2 s of life left
        assert (await gw.request("GET", PATH, token=fresh))[0] == 200


async def _gone(rdb: aioredis.Redis, key: str) -> bool:
    return not await rdb.exists(key)


async def test_session_revocation(gw: RunningGateway, issuer: DevIssuer) -> None:
    s1, s2 = issuer.token({**USER, "sid": "s-1"}), issuer.token({**USER, "sid": "s-2"})
    assert (await gw.request("GET", PATH, token=s1))[0] == 200
    status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                    {"type": "session", "value": "s-1", "issuer": "dev"})
    assert status == 201, body
    assert body["revoked"]["key"] == f"{PREFIX}sid:dev:s-1"
    assert (await gw.request("GET", PATH, token=s1))[0] == 401
    assert (await gw.request("GET", PATH, token=s2))[0] == 200  # same subject, other session


async def test_the_verified_token_cache_does_not_bypass_revocation(
    gw: RunningGateway, issuer: DevIssuer, rdb: aioredis.Redis
) -> None:
    token = issuer.token({**USER, "jti": "cached-1"})
    hits = await metric(gw.session, gw.admin_url, "gateway_token_cache_hits_total")
    for _ in range(3):
        assert (await gw.request("GET", PATH, token=token))[0] == 200
    # The token really is served from the cache now ...
    assert await metric(gw.session, gw.admin_url, "gateway_token_cache_hits_total") >= hits + 2
    await publish_revocation(rdb, "cached-1")
    # ... and still refused within the second.
    await eventually(lambda: _is(gw, token, 401), timeout=1.0, interval=0.005)
    assert gw.app.services.revocation is not None and gw.app.services.revocation.ready()


async def test_keys_carry_the_specified_ttls(gw: RunningGateway, issuer: DevIssuer, rdb: aioredis.Redis) -> None:
    admin, exp = issuer.token(ADMIN), int(time.time()) + 120
    for body in ({"type": "jti", "value": "j-exp", "exp": exp}, {"type": "jti", "value": "j-noexp"},
                 {"type": "subject", "value": "alice", "issuer": "dev"},
                 {"type": "session", "value": "s-9", "issuer": "dev"}):
        status, answer = await admin_post(gw.session, gw.admin_url, admin, body)
        assert status == 201, answer
    # jti: expires with the token; without exp, after the longest a token may live (max_token_lifetime 2h).
    # Each plus the issuer's leeway (30 s): the verifier accepts a token until exp + leeway.
    assert 145 <= await rdb.ttl(f"{PREFIX}jti:j-exp") <= 150
    assert 7220 <= await rdb.ttl(f"{PREFIX}jti:j-noexp") <= 7230
    assert await rdb.get(f"{PREFIX}jti:j-exp") == "1"
    # subject/session: hold T (a UNIX time) and are kept for max_token_lifetime + leeway.
    for key in (f"{PREFIX}sub:dev:alice", f"{PREFIX}sid:dev:s-9"):
        assert 7220 <= await rdb.ttl(key) <= 7230
        assert abs(int(str(await rdb.get(key))) - time.time()) <= 2


# -- the admin API --------------------------------------------------------------------------------------------

async def test_admin_api_needs_an_admin_token_and_refuses_garbage(gw: RunningGateway, issuer: DevIssuer) -> None:
    s, url = gw.session, gw.admin_url
    good = {"type": "jti", "value": "x-1"}
    status, body = await admin_post(s, url, None, good)
    assert status == 401 and body["error"] == "invalid_request"
    status, body = await admin_post(s, url, issuer.token({"sub": "eve", "scope": "orders:read"}), good)
    assert status == 403 and body["error"] == "insufficient_scope"
    status, body = await admin_post(s, url, "not.a.token", good)
    assert status == 401 and body["error"] == "invalid_token"
    admin = issuer.token(ADMIN)
    garbage: list[tuple[Any, bytes | None]] = [
        (None, b"{not json"), (None, b"\xff\xfe"), (["jti", "x"], None), ("jti", None),
        ({"type": "everything", "value": "x"}, None), ({"type": "jti"}, None), ({"type": "jti", "value": ""}, None),
        ({"type": "jti", "value": 42}, None), ({"type": "subject", "value": "a", "issuer": "nobody"}, None),
        ({"type": "jti", "value": "x", "exp": "soon"}, None), ({"type": "jti", "value": "x", "extra": 1}, None),
        (None, b'{"type": "jti", "value": "x\\ud800"}'),  # a lone surrogate: no Redis key can hold it
    ]
    for body_in, raw in garbage:
        status, body = await admin_post(s, url, admin, body_in, raw=raw)
        assert status == 400 and body["error"] == "invalid_request", (body_in, raw, body)
    status, body = await admin_post(s, url, admin, good)
    assert status == 201 and body["revoked"]["key"] == f"{PREFIX}jti:x-1"
    # GET /admin/routes: open, as /metrics is (SPEC asks an admin token of the revocation API only).
    async with s.get(url + "/admin/routes") as r:
        assert r.status == 200
        answer = await r.json()
    assert "orders" in json.dumps(answer)


async def test_admin_api_unset_issuer_refuses_a_token_of_any_other_issuer(
        issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any) -> None:
    """admin.issuer unset is SPEC 3's `employees`: with the lone issuer `dev` configured, a dev token that
    carries gateway:admin is refused (it used to be taken: the scope alone decided)."""
    text = gateway_yaml(issuer, echo_upstream, redis_server.url)
    assert text.count("\n  issuer: dev\n") == 1
    async with gateway_factory(text.replace("\n  issuer: dev\n", "\n", 1)) as gw:
        status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN), {"type": "jti", "value": "x-1"})
    assert status == 401 and body["error"] == "invalid_token", body


async def test_admin_refusals_carry_a_request_id(gw: RunningGateway, issuer: DevIssuer) -> None:
    """SPEC 5's body on the admin listener too: `request_id` equal to X-Request-Id (the client's if valid)."""
    s, url = gw.session, gw.admin_url + "/admin/revocations"
    cases = [({}, b"{}", 401), ({"Authorization": f"Bearer {issuer.token(ADMIN)}"}, b"{not json", 400),
             ({"Authorization": f"Bearer {issuer.token(ADMIN)}"}, b'{"type": "jti"}', 400)]
    for headers, data, want in cases:
        async with s.post(url, data=data, headers=headers) as r:
            body = await r.json()
            assert r.status == want and body["request_id"] == r.headers["X-Request-Id"] != "-", body
            assert set(body) == {"error", "error_description", "request_id"}
    async with s.post(url, data=b"{}", headers={"X-Request-Id": "trace-42"}) as r:
        assert r.status == 401 and (await r.json())["request_id"] == "trace-42" == r.headers["X-Request-Id"]
    # aiohttp's own refusals too (they were plain text: `404: Not Found`).
    admin = gw.admin_url
    for method, path, want, code in [("GET", "/admin/nothing", 404, "not_found"),
                                     ("GET", "/admin/revocations", 405, "method_not_allowed"),
                                     ("DELETE", "/metrics", 405, "method_not_allowed")]:
        async with s.request(method, admin + path) as r:
            body = await r.json()
            assert (r.status, body["error"]) == (want, code), (method, path, body)
            assert set(body) == {"error", "error_description", "request_id"}
            assert body["request_id"] == r.headers["X-Request-Id"]
            if want == 405:
                assert r.headers["Allow"] in ("POST", "GET", "GET, HEAD", "HEAD, GET"), r.headers["Allow"]


# -- Redis down, back, and the on_backend_error policy ---------------------------------------------------------

async def test_redis_down_deny_answers_503_and_recovers_by_itself(
    gw: RunningGateway, issuer: DevIssuer, redis_server: RedisServer
) -> None:
    s, token = gw.session, issuer.token({**USER, "jti": "before"})
    assert (await gw.request("GET", PATH, token=token))[0] == 200
    assert await metric(s, gw.admin_url, "gateway_revocation_backend_up") == 1
    redis_server.stop()
    await eventually(lambda: _is(gw, token, 503), timeout=2.0)
    status, headers, body = await gw.request("GET", PATH, token=token)
    assert status == 503 and body["error"] == "temporarily_unavailable" and headers["Retry-After"]
    assert await metric(s, gw.admin_url, "gateway_revocation_backend_up") == 0
    async with s.get(gw.admin_url + "/readyz") as r:
        assert r.status == 503 and (await r.json())["checks"]["revocation"] is False
    status, body = await admin_post(s, gw.admin_url, issuer.token(ADMIN), {"type": "jti", "value": "z"})
    assert status == 503 and body["error"] == "temporarily_unavailable"

    # Same port, a password keeps the gateway out until the revocation is written: "while it was away"
    # holds by construction, not by timing.
    redis_server.start("--requirepass", "hold")
    held = aioredis.Redis.from_url(redis_server.url, password="hold")
    try:
        await publish_revocation(held, "written-while-away")
        assert (await gw.request("GET", PATH, token=token))[0] == 503
        await held.config_set("requirepass", "")
    finally:
        await held.aclose()
    # Requests are answered at once (straight from Redis while the view is not live yet) ...
    took = await eventually(lambda: _is(gw, token, 200), timeout=2.0)
    # ... and the subscription-fed view is back by itself (reconnect backoff is capped at 1 s).
    live = await eventually(lambda: _ready(gw), timeout=3.0)
    print(f"\nafter Redis let the gateway in: serving again in {took:.2f} s, view live in {live:.2f} s")
    assert await metric(s, gw.admin_url, "gateway_revocation_backend_up") == 1
    assert (await gw.request("GET", PATH, token=issuer.token({**USER, "jti": "written-while-away"})))[0] == 401
    # And the subscription is live again: a new revocation arrives within the second.
    fresh = issuer.token({**USER, "jti": "after"})
    rdb = aioredis.Redis.from_url(redis_server.url)
    try:
        await publish_revocation(rdb, "after")
    finally:
        await rdb.aclose()
    await eventually(lambda: _is(gw, fresh, 401), timeout=1.0, interval=0.005)


async def test_a_revocation_stays_when_redis_comes_back_empty_and_is_written_back(
    issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, rdb: aioredis.Redis,
    gateway_factory: Any,
) -> None:
    """Redis restarted with no data (no persistence, a pod rescheduled with an emptyDir, a failover to a
    lagging replica): the replica that knew the revocations keeps refusing, and writes them back, so a
    replica started afterwards refuses too. The rebuilt view used to replace the old one: 200 again."""
    text = gateway_yaml(issuer, echo_upstream, redis_server.url)
    async with gateway_factory(text) as gw:
        victim, in_session = issuer.token({**USER, "jti": "victim-2"}), issuer.token({**USER, "sid": "s-gone"})
        fine = issuer.token({**USER, "jti": "fine-2"})
        admin = issuer.token(ADMIN)
        for body in ({"type": "jti", "value": "victim-2"}, {"type": "session", "value": "s-gone", "issuer": "dev"}):
            status, answer = await admin_post(gw.session, gw.admin_url, admin, body)
            assert status == 201, answer
        at = int(answer["revoked"]["at"])
        assert [(await gw.request("GET", PATH, token=t))[0] for t in (victim, in_session, fine)] == [401, 401, 200]

        redis_server.stop()
        await eventually(lambda: _is(gw, fine, 503), timeout=2.0)
        # While it is down, what the replica knows is refused as revoked; the rest cannot be checked.
        assert [(await gw.request("GET", PATH, token=t))[0] for t in (victim, in_session, fine)] == [401, 401, 503]
        redis_server.start()  # same port, empty
        assert await rdb.dbsize() == 0
        # Not one 200 for a revoked token on the way back: not while the view is down, not once it is live.
        seen: set[int] = set()
        while not await _ready(gw):
            seen.update([(await gw.request("GET", PATH, token=t))[0] for t in (victim, in_session)])
            await asyncio.sleep(0.01)
        assert seen <= {401}, seen
        assert [(await gw.request("GET", PATH, token=t))[0] for t in (victim, in_session, fine)] == [401, 401, 200]
        # Written back with the life they had left, the session's T unchanged.
        assert await rdb.get(f"{PREFIX}jti:victim-2") == "1"
        assert await rdb.get(f"{PREFIX}sid:dev:s-gone") == str(at)
        assert 7100 <= await rdb.ttl(f"{PREFIX}jti:victim-2") <= 7230
        assert 7100 <= await rdb.ttl(f"{PREFIX}sid:dev:s-gone") <= 7230

    # A replica started after the loss learns them from Redis.
    async with gateway_factory(text) as fresh:
        assert [(await fresh.request("GET", PATH, token=t))[0] for t in (victim, in_session, fine)] == [401, 401, 200]


async def test_redis_down_allow_passes_traffic_through(
    issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any
) -> None:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url, "allow")) as gw:
        token = issuer.token(USER)
        redis_server.stop()
        await eventually(lambda: metric_is(gw, "gateway_revocation_backend_up", 0), timeout=2.0)
        hits = echo_upstream.hits
        for _ in range(5):
            assert (await gw.request("GET", PATH, token=token))[0] == 200
        assert echo_upstream.hits == hits + 5
        allowed = 'gateway_revocation_checks_total{result="backend_error_allowed"}'
        assert await metric(gw.session, gw.admin_url, allowed) >= 5
        async with gw.session.get(gw.admin_url + "/readyz") as r:
            assert r.status == 503  # readiness still tells the truth about Redis


async def _ready(gw: RunningGateway) -> bool:
    async with gw.session.get(gw.admin_url + "/readyz") as r:
        return r.status == 200


async def metric_is(gw: RunningGateway, name: str, value: float) -> bool:
    return await metric(gw.session, gw.admin_url, name) == value


# -- several processes, and the CLI ----------------------------------------------------------------------------

def start_process(gateway_processes: Any, tmp_path: Path, name: str, issuer: DevIssuer, upstream: EchoUpstream,
                  redis_url: str) -> GatewayProcess:
    port, admin_port = free_port(), free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(gateway_yaml(issuer, upstream, redis_url, listen=f"127.0.0.1:{port}",
                                 admin_listen=f"127.0.0.1:{admin_port}"))
    proc: GatewayProcess = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port))
    return proc


async def test_two_processes_revoke_through_one_the_other_refuses_within_a_second(
    issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_processes: Any,
    tmp_path: Path
) -> None:
    a, b = (start_process(gateway_processes, tmp_path, n, issuer, echo_upstream, redis_server.url) for n in "ab")
    await asyncio.gather(a.wait_ready(), b.wait_ready())
    admin, times = issuer.token(ADMIN), []
    async with aiohttp.ClientSession() as s:
        for i in range(5):
            token = issuer.token({**USER, "jti": f"shared-{i}"})
            assert await status_of(s, b.url + PATH, token) == 200
            t0 = time.monotonic()
            status, body = await admin_post(s, a.admin_url, admin, {"type": "jti", "value": f"shared-{i}"})
            assert status == 201, body

            async def refused(token: str = token) -> bool:
                return await status_of(s, b.url + PATH, token) == 401
            await eventually(refused, timeout=1.0, interval=0.002)
            times.append(time.monotonic() - t0)
            assert await status_of(s, a.url + PATH, token) == 401
        assert await status_of(s, b.url + PATH, issuer.token(USER)) == 200
    assert max(times) < 1.0
    print(f"\npropagation A admin API -> B refuses, 5 samples (ms): "
          f"{', '.join(f'{t * 1000:.1f}' for t in times)}; median {statistics.median(times) * 1000:.1f}")


async def test_cli_revoke_reaches_a_running_gateway_within_a_second(
    issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_processes: Any,
    tmp_path: Path, rdb: aioredis.Redis
) -> None:
    gw = start_process(gateway_processes, tmp_path, "a", issuer, echo_upstream, redis_server.url)
    await gw.wait_ready()
    token = issuer.token({**USER, "jti": "cli-1"})
    async with aiohttp.ClientSession() as s:
        assert await status_of(s, gw.url + PATH, token) == 200
        code, out, err = await cli("revoke", "jti", "cli-1", "--exp", str(int(time.time()) + 300),
                                   "-c", str(gw.config_path))
        written = time.monotonic()
        assert code == 0, err
        assert json.loads(out)["revoked"]["key"] == f"{PREFIX}jti:cli-1"
        took = await eventually(lambda: _status_is(s, gw.url + PATH, token, 401), timeout=1.0, interval=0.005)
        assert time.monotonic() - written < 1.0
        print(f"\n`gateway revoke` exited -> running gateway refuses after {took * 1000:.1f} ms")
        code, out, err = await cli("revoke", "session", "s-7", "-c", str(gw.config_path))
        assert code == 0, err
        assert await rdb.ttl(f"{PREFIX}sid:dev:s-7") > 7000
        code, out, err = await cli("revoke", "subject", "x", "--issuer", "nobody", "-c", str(gw.config_path))
        assert code == 2 and len(err.strip().splitlines()) == 1 and "unknown issuer" in err
        redis_server.stop()
        code, out, err = await cli("revoke", "jti", "late", "-c", str(gw.config_path))
        assert code == 1 and len(err.strip().splitlines()) == 1 and "Traceback" not in err


async def _status_is(s: aiohttp.ClientSession, url: str, token: str, want: int) -> bool:
    return await status_of(s, url, token) == want


async def cli(*args: str) -> tuple[int, str, str]:
    proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", *args, cwd=ROOT,
                                                stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE)
    out, err = await asyncio.wait_for(proc.communicate(), 30)
    assert proc.returncode is not None
    return proc.returncode, out.decode(), err.decode()


# -- gateway demo with REDIS_URL -----------------------------------------------------------------------------

async def test_demo_uses_redis_when_redis_url_is_set_and_its_revocation_lines_work(
    redis_server: RedisServer, rdb: aioredis.Redis, tmp_path: Path
) -> None:
    port, admin_port = free_port(), free_port()
    env = {"REDIS_URL": redis_server.url, "DEMO_LISTEN": f"127.0.0.1:{port}",
           "DEMO_ISSUER_PORT": str(free_port()), "DEMO_ORDERS_PORT": str(free_port()),
           "DEMO_USERS_PORT": str(free_port()),
           "DEMO_ADMIN_LISTEN": f"127.0.0.1:{admin_port}", "GATEWAY_KEY_STORE": str(tmp_path / "keys.json"),
           "PYTHONUNBUFFERED": "1"}
    out_path, err_path = tmp_path / "demo.out", tmp_path / "demo.err"
    with out_path.open("wb") as out, err_path.open("wb") as err:
        proc = await asyncio.create_subprocess_exec(sys.executable, "-m", "gateway", "demo", cwd=ROOT,
                                                    env={**os.environ, **env}, stdout=out, stderr=err)
    try:
        try:
            await eventually(lambda: asyncio.sleep(0, "# more tokens" in out_path.read_text()), timeout=20.0,
                             interval=0.05)
        except AssertionError:
            raise AssertionError(f"demo not ready: {err_path.read_text()[-2000:]}") from None
        text = out_path.read_text()
        assert "revocation: redis" in text
        lines = text.splitlines()
        start = next(i for i, line in enumerate(lines) if line.startswith("# revoke alice"))
        revoke, again, other = (shlex.split(line) for line in lines[start + 1:start + 5] if line.startswith("curl"))
        async with aiohttp.ClientSession() as s:
            assert (await run_curl(s, again))[0] == 200
            status, body = await run_curl(s, revoke)
            assert status == 201, body
            assert (await run_curl(s, again))[0] == 401
            assert (await run_curl(s, other))[0] == 200
        assert await rdb.exists(f"{PREFIX}jti:demo-alice-1") == 1
    finally:
        if proc.returncode is None:
            proc.terminate()  # by its PID
            await asyncio.wait_for(proc.wait(), 15)


async def run_curl(s: aiohttp.ClientSession, argv: list[str]) -> tuple[int, str]:
    """Run one of the demo's printed `curl -s -i ...` lines (the options it uses) with aiohttp."""
    method, headers, data, url = "GET", {}, None, ""
    it = iter(argv[3:])
    for arg in it:
        if arg == "-X":
            method = next(it)
        elif arg == "-H":
            name, _, value = next(it).partition(": ")
            headers[name] = value
        elif arg == "--data":
            data = next(it).encode()
            method = "POST" if method == "GET" else method
        else:
            url = arg
    async with s.request(method, url, headers=headers, data=data) as r:
        return r.status, await r.text()
