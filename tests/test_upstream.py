"""Upstreams against real aiohttp servers: balancing, breakers, retries, timeouts, streaming, mTLS, WebSocket."""

from __future__ import annotations

import asyncio
import hashlib
import json
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import aiohttp
import pytest
from multidict import CIMultiDict

from gateway import metrics
from gateway.breaker import CLOSED, HALF_OPEN, OPEN
from gateway.config_types import BreakerConfig, RetryConfig, TLSFiles, UpstreamConfig
from gateway.errors import BadGateway, PayloadTooLarge, UpstreamTimeout, UpstreamUnavailable
from gateway.upstream import UpstreamResponse, Upstreams
from tests.support.pki import make_pki
from tests.support.upstreams import Blackhole, EchoUpstream, pattern_bytes

MakeUpstream = Callable[..., Awaitable[EchoUpstream]]


class FakeClock:
    def __init__(self) -> None:
        self.now = 5000.0

    def __call__(self) -> float:
        return self.now


def config(
    name: str,
    *targets: str,
    connect: float = 2.0,
    read: float = 2.0,
    attempts: int = 2,
    retry_on: tuple[str, ...] = ("connect_error", "502", "503"),
    failures: int = 3,
    window: float = 10.0,
    open_for: float = 30.0,
    tls: TLSFiles | None = None,
) -> UpstreamConfig:
    return UpstreamConfig(
        name=name,
        targets=targets,
        connect_timeout=connect,
        read_timeout=read,
        retries=RetryConfig(attempts=attempts, retry_on=frozenset(retry_on)),
        circuit_breaker=BreakerConfig(failures=failures, window=window, open_for=open_for),
        tls=tls,
    )


@pytest.fixture
async def make_upstreams() -> AsyncIterator[Callable[..., Awaitable[Upstreams]]]:
    made: list[Upstreams] = []

    async def make(*cfgs: UpstreamConfig, clock: Callable[[], float] = time.monotonic) -> Upstreams:
        ups = Upstreams({c.name: c for c in cfgs}, clock=clock)
        await ups.start()
        made.append(ups)
        return ups

    yield make
    for ups in made:
        await ups.close()


async def read_json(resp: UpstreamResponse) -> dict[str, object]:
    body = b"".join([chunk async for chunk in resp.iter_chunks()])
    return json.loads(body)  # type: ignore[no-any-return]


async def get(ups: Upstreams, name: str, path: str = "/x", method: str = "GET") -> UpstreamResponse:
    return await ups.send(name, method, path, CIMultiDict(), None)


def gauge(upstream: str, target: str) -> float:
    text = metrics.render()[0].decode()
    wanted = {f'target="{target}"', f'upstream="{upstream}"'}
    for line in text.splitlines():
        if line.startswith("gateway_circuit_state{"):
            labels, value = line[len("gateway_circuit_state{"):].rsplit("} ", 1)
            if set(labels.split(",")) == wanted:
                return float(value)
    raise AssertionError(f"no sample for {upstream} {target}")


async def test_round_robin_and_headers_forwarded_as_given(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    a, b = await make_upstream(), await make_upstream()
    ups = await make_upstreams(config("rr", a.url, b.url))
    seen = []
    for i in range(6):
        headers = CIMultiDict([("X-Request-Id", f"r{i}"), ("X-Forwarded-Host", "api.example.com")])
        async with await ups.send("rr", "GET", f"/p/a%20b?i={i}&q=%2F", headers, None) as resp:
            seen.append(resp.target)
            echo = await read_json(resp)
        assert resp.status == 200
        assert echo["path"] == f"/p/a%20b?i={i}&q=%2F"  # path and query exactly as given
        received = echo["headers"]
        assert isinstance(received, dict)
        assert received["X-Request-Id"] == f"r{i}"
        # Nothing of aiohttp's own: no User-Agent, Accept or Accept-Encoding; Host is the target's.
        assert set(received) == {"Host", "X-Request-Id", "X-Forwarded-Host"}
        assert received["Host"] == f"127.0.0.1:{(a if resp.target == a.url else b).port}"
    assert seen == [a.url, b.url] * 3
    assert a.hits == b.hits == 3
    assert gauge("rr", a.url) == CLOSED and gauge("rr", b.url) == CLOSED


async def test_one_target_down_get_never_fails_and_its_breaker_opens(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    live, dead = await make_upstream(), await make_upstream()
    await dead.stop()
    ups = await make_upstreams(config("down", dead.url, live.url, failures=2))
    for _ in range(20):
        async with await get(ups, "down") as resp:
            assert resp.status == 200  # refused connections are retried on the other target
            assert resp.target == live.url
    assert ups.state("down", dead.url) == OPEN
    assert gauge("down", dead.url) == OPEN
    assert live.hits == 20


async def test_open_breaker_means_no_connection_attempt(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    live, sick = await make_upstream(), await make_upstream()
    sick.set_mode("reset")  # accepts, counts the connection, then resets it
    ups = await make_upstreams(config("sick", sick.url, live.url, failures=2))
    errors = 0
    for _ in range(4):
        try:
            async with await get(ups, "sick"):
                pass
        except BadGateway:  # a reset after sending is not retried elsewhere: the target may have acted
            errors += 1
    assert errors == 2
    assert ups.state("sick", sick.url) == OPEN
    # aiohttp resends a body-less idempotent request once on the same target when the connection drops
    # before any response (RFC 9112 s9.3.1; it covers keep-alive races): 2 requests, 4 arrivals.
    assert sick.hits == 4
    connections = sick.connections
    for _ in range(20):
        async with await get(ups, "sick") as resp:
            assert resp.status == 200 and resp.target == live.url
    assert sick.connections == connections
    assert sick.hits == 4


async def test_all_open_fails_fast_with_retry_after_then_half_open_probe_recovers(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    target.set_mode("status", status=503)
    clock = FakeClock()
    cfg = config("allopen", target.url, failures=2, open_for=30.0, connect=2.0, attempts=1)
    ups = await make_upstreams(cfg, clock=clock)
    for _ in range(2):
        with pytest.raises(UpstreamUnavailable) as first:  # the target's 503 counts against its breaker
            await get(ups, "allopen")
        assert first.value.reason == "upstream_503" and first.value.headers["Retry-After"] == "1"
    assert gauge("allopen", target.url) == OPEN
    connections, hits = target.connections, target.hits

    clock.now += 10
    started = time.perf_counter()
    with pytest.raises(UpstreamUnavailable) as info:
        await get(ups, "allopen")
    elapsed = time.perf_counter() - started
    assert elapsed < 0.02  # far below the 2 s connect timeout: no attempt at all
    assert info.value.status == 503 and info.value.code == "upstream_unavailable"
    assert info.value.headers["Retry-After"] == "20"
    assert (target.connections, target.hits) == (connections, hits)

    # open_for passed: half-open, one probe goes through; it fails, so the circuit opens again.
    clock.now += 20
    assert ups.state("allopen", target.url) == HALF_OPEN
    assert gauge("allopen", target.url) == HALF_OPEN
    with pytest.raises(UpstreamUnavailable):
        await get(ups, "allopen")
    assert gauge("allopen", target.url) == OPEN
    with pytest.raises(UpstreamUnavailable):
        await get(ups, "allopen")

    # The target recovers; after the next open period the probe succeeds and the circuit closes.
    target.set_mode("echo")
    clock.now += 30
    async with await get(ups, "allopen") as resp:
        assert resp.status == 200
    assert ups.state("allopen", target.url) == CLOSED
    assert gauge("allopen", target.url) == CLOSED
    assert target.hits == hits + 2


async def test_half_open_admits_only_the_probe_count(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    target.set_mode("status", status=502)
    clock = FakeClock()
    ups = await make_upstreams(config("probe", target.url, failures=1, open_for=5.0, attempts=1), clock=clock)
    with pytest.raises(BadGateway):
        await get(ups, "probe")
    clock.now += 5
    target.set_mode("slow", delay=0.3)
    probe = asyncio.ensure_future(get(ups, "probe"))
    await asyncio.sleep(0.1)  # the probe is in flight: a second request is refused
    with pytest.raises(UpstreamUnavailable):
        await get(ups, "probe")
    async with await probe as resp:
        assert resp.status == 200
    assert ups.state("probe", target.url) == CLOSED


async def test_post_to_502_target_is_sent_once(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.set_mode("status", status=502)
    ups = await make_upstreams(config("post", bad.url, good.url, attempts=3))

    async def body() -> AsyncIterator[bytes]:
        yield b'{"order": 1}'

    with pytest.raises(BadGateway) as info:  # the target's 502 becomes the gateway's own
        await ups.send("post", "POST", "/orders", CIMultiDict(), body())
    assert info.value.reason == "upstream_502"
    assert (bad.hits, good.hits) == (1, 0)
    # The next request starts at the other target (round robin): make it the bad one again, no body.
    await get(ups, "post")  # a GET to good, to move the round robin back to bad
    with pytest.raises(BadGateway):
        await ups.send("post", "POST", "/orders", CIMultiDict(), None)
    assert bad.hits == 2


async def test_get_retried_on_other_target_after_502(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.set_mode("status", status=502)
    ups = await make_upstreams(config("retry", bad.url, good.url))
    async with await get(ups, "retry") as resp:
        assert resp.status == 200 and resp.target == good.url
    assert (bad.hits, good.hits) == (1, 1)
    # Both bad: at most `attempts` tries in all, then the last answer decides the error.
    good.set_mode("status", status=502)
    with pytest.raises(BadGateway):
        await get(ups, "retry")
    assert bad.hits + good.hits == 4
    # A status not listed in retry_on is not retried.
    bad.set_mode("status", status=504)
    good.set_mode("status", status=504)
    with pytest.raises(UpstreamTimeout) as timeout:
        await get(ups, "retry")
    assert timeout.value.reason == "upstream_504"
    assert bad.hits + good.hits == 5


async def test_hanging_target_times_out_within_read_timeout(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    target.set_mode("hang")
    ups = await make_upstreams(config("hang", target.url, read=0.5, attempts=1))
    started = time.perf_counter()
    with pytest.raises(UpstreamTimeout) as info:
        await get(ups, "hang")
    elapsed = time.perf_counter() - started
    assert 0.45 <= elapsed < 0.8
    assert info.value.status == 504 and info.value.code == "upstream_timeout"


async def test_connect_timeout_is_bad_gateway_then_open_breaker_answers_far_faster(
    blackhole: Blackhole, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    ups = await make_upstreams(config("hole", blackhole.url, connect=0.4, failures=2, attempts=1))
    for _ in range(2):
        started = time.perf_counter()
        with pytest.raises(BadGateway) as info:
            await get(ups, "hole")
        assert 0.35 <= time.perf_counter() - started < 0.7
        assert info.value.reason == "connect_timeout"
    assert ups.state("hole", blackhole.url) == OPEN
    started = time.perf_counter()
    with pytest.raises(UpstreamUnavailable):
        await get(ups, "hole")
    assert time.perf_counter() - started < 0.04  # a tenth of the connect timeout, at most


async def test_connect_timeout_retried_on_other_target(
    blackhole: Blackhole, make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    live = await make_upstream()
    ups = await make_upstreams(config("hole2", blackhole.url, live.url, connect=0.3))
    async with await get(ups, "hole2") as resp:
        assert resp.status == 200 and resp.target == live.url


async def test_refused_and_reset_are_bad_gateway(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    refused, reset = await make_upstream(), await make_upstream()
    await refused.stop()
    reset.set_mode("reset")
    ups = await make_upstreams(config("refused", refused.url), config("reset", reset.url))
    with pytest.raises(BadGateway) as info:
        await get(ups, "refused")
    assert info.value.status == 502 and info.value.reason == "connect_error"
    with pytest.raises(BadGateway) as info:
        await get(ups, "reset")
    assert info.value.status == 502 and info.value.reason == "upstream_reset"
    assert reset.hits == 2  # aiohttp's one resend on a dropped connection (RFC 9112 s9.3.1)
    with pytest.raises(BadGateway):
        await ups.send("reset", "POST", "/", CIMultiDict(), None)
    assert reset.hits == 3  # a POST is never sent twice

    async def body() -> AsyncIterator[bytes]:
        yield b"abc"

    with pytest.raises(BadGateway):
        await ups.send("reset", "PUT", "/", CIMultiDict(), body())
    assert reset.hits == 4  # nor is a streamed body


async def test_large_request_body_streamed_intact_and_response_streamed(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    ups = await make_upstreams(config("big", target.url))
    chunk = hashlib.sha256(b"seed").digest() * 2048  # 64 KiB
    count = 800  # 50 MiB, produced lazily
    expected = hashlib.sha256()
    for _ in range(count):
        expected.update(chunk)

    async def body() -> AsyncIterator[bytes]:
        for _ in range(count):
            yield chunk

    async with await ups.send("big", "PUT", "/upload", CIMultiDict(), body()) as resp:
        echo = await read_json(resp)
    assert echo["body_length"] == len(chunk) * count
    assert echo["body_sha256"] == expected.hexdigest()
    assert echo["headers"]["Transfer-Encoding"] == "chunked"  # type: ignore[index]

    size = 20 * 1024 * 1024
    digest, chunks, largest = hashlib.sha256(), 0, 0
    async with await get(ups, "big", f"/_bytes/{size}") as resp:
        async for part in resp.iter_chunks():
            digest.update(part)
            chunks += 1
            largest = max(largest, len(part))
    assert digest.hexdigest() == hashlib.sha256(pattern_bytes(size)).hexdigest()
    assert chunks > 10 and largest < size // 4  # arrived piecewise, never as one buffer


async def test_client_body_failure_is_not_blamed_on_the_target(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    ups = await make_upstreams(config("limit", target.url, failures=1))

    async def body() -> AsyncIterator[bytes]:
        yield b"x" * 1000
        raise PayloadTooLarge()

    with pytest.raises(PayloadTooLarge):
        await ups.send("limit", "POST", "/", CIMultiDict(), body())
    assert ups.state("limit", target.url) == CLOSED


# --- mTLS -------------------------------------------------------------------------------------------


@pytest.fixture
def pki(tmp_path: Path) -> dict[str, str]:
    return make_pki(tmp_path)


async def test_mtls_needs_the_right_client_certificate(
    pki: dict[str, str], make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
    server_ctx.load_cert_chain(pki["server"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    target = await make_upstream(ssl_context=server_ctx)
    assert target.url.startswith("https://")
    ups = await make_upstreams(
        config("mtls", target.url, tls=TLSFiles(ca_file=pki["ca"], cert_file=pki["client"], key_file=pki["client"])),
        config("nocert", target.url, attempts=1, tls=TLSFiles(ca_file=pki["ca"])),
        config("stranger", target.url, attempts=1,
               tls=TLSFiles(ca_file=pki["ca"], cert_file=pki["stranger"], key_file=pki["stranger"])),
        config("untrusted", target.url, attempts=1,
               tls=TLSFiles(cert_file=pki["client"], key_file=pki["client"])),
    )
    async with await get(ups, "mtls") as resp:
        assert resp.status == 200
        assert (await read_json(resp))["path"] == "/x"
    for name in ("nocert", "stranger", "untrusted"):
        with pytest.raises(BadGateway):
            await get(ups, name)
    assert target.hits == 1


# --- WebSocket --------------------------------------------------------------------------------------


async def test_websocket_echo(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    ups = await make_upstreams(config("ws", target.url))
    headers = CIMultiDict([("X-Request-Id", "ws1"), ("Sec-WebSocket-Key", "client's own, not forwarded")])
    ws = await ups.open_websocket("ws", "/chat?room=1", headers, ("chat",))
    try:
        assert ws.protocol == "chat"
        await ws.send_str("hello")
        assert await ws.receive_str() == "hello"
        await ws.send_bytes(b"\x00\x01")
        assert await ws.receive_bytes() == b"\x00\x01"
    finally:
        await ws.close()
    method, path, received = target.requests[-1]
    assert (method, path, received["X-Request-Id"]) == ("GET", "/chat?room=1", "ws1")
    assert received["Sec-WebSocket-Key"] != "client's own, not forwarded"


async def test_websocket_to_dead_target_is_bad_gateway(
    make_upstream: MakeUpstream, make_upstreams: Callable[..., Awaitable[Upstreams]]
) -> None:
    target = await make_upstream()
    await target.stop()
    ups = await make_upstreams(config("wsdead", target.url, failures=1))
    with pytest.raises(BadGateway):
        await ups.open_websocket("wsdead", "/", CIMultiDict(), ())
    with pytest.raises(UpstreamUnavailable):
        await ups.open_websocket("wsdead", "/", CIMultiDict(), ())


def test_aiohttp_is_the_client() -> None:
    # Guard for the dependency this module wraps: the error mapping relies on these classes existing.
    assert issubclass(aiohttp.ConnectionTimeoutError, TimeoutError)
