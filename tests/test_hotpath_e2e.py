"""The relay and the access log on the hot path: small bodies read whole, large/unknown ones streamed, hop-by-hop
headers dropped, a short body answered 502; every access-log line is exact JSON whatever the path or claims hold."""

from __future__ import annotations

import asyncio
import hashlib
import json
import re
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.devissuer import DEFAULT_AUDIENCE, DevIssuer
from tests.support.gateway import config_text, logged, raw_exchange

ROUTES = """\
  - name: raw
    match: {path_prefix: /raw/}
    upstream: raw
    auth: {required: false}
    forward: {identity: none}
  - name: who
    match: {path_prefix: /who/}
    upstream: raw
"""
SMALL = 64 * 1024
LOG_KEYS = ["ts", "request_id", "method", "path", "route", "status", "duration_ms", "upstream", "target",
            "upstream_status", "client_ip", "iss", "sub", "aud", "jti", "auth"]


def _body(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


def _answer(status: str, headers: list[tuple[str, str]], body: bytes = b"", *, length: int | None = None) -> bytes:
    head = [f"HTTP/1.1 {status}"] + [f"{k}: {v}" for k, v in headers]
    if length is not None:
        head.append(f"Content-Length: {length}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + body


class RawUpstream:
    """A real TCP server answering scripted bytes per path (keep-alive unless the script says close)."""

    def __init__(self) -> None:
        self.scripts: dict[str, tuple[bytes, bool]] = {}
        self.pauses: dict[str, tuple[int, float]] = {}  # path -> (offset, seconds): the rest is sent later
        self.heads: list[bytes] = []  # every request head received, as bytes
        self.server: asyncio.Server | None = None

    @property
    def url(self) -> str:
        assert self.server is not None
        return f"http://127.0.0.1:{self.server.sockets[0].getsockname()[1]}"

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            while True:
                head = await reader.readuntil(b"\r\n\r\n")
                self.heads.append(head)
                path = head.split(b" ", 2)[1].decode()
                data, close = self.scripts.get(path, (_answer("404 Not Found", [], b"", length=0), False))
                at, pause = self.pauses.get(path, (len(data), 0.0))
                writer.write(data[:at])
                await writer.drain()
                if at < len(data):
                    await asyncio.sleep(pause)
                    writer.write(data[at:])
                    await writer.drain()
                if close:
                    break
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()


@pytest.fixture
async def raw() -> AsyncIterator[RawUpstream]:
    up = RawUpstream()
    up.server = await asyncio.start_server(up._serve, "127.0.0.1", 0)
    yield up
    up.server.close()
    await up.server.wait_closed()


@pytest.fixture
async def gw(issuer: DevIssuer, raw: RawUpstream, gateway_factory: Any) -> AsyncIterator[Any]:
    async with gateway_factory(config_text(issuer.url, {"raw": [raw.url]}, ROUTES)) as running:
        yield running


def _lines(out: str) -> list[dict[str, Any]]:
    lines = [json.loads(line) for line in out.splitlines() if line.startswith("{")]
    for line in lines:
        assert list(line) == LOG_KEYS
        assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{3}Z", line["ts"])
        assert isinstance(line["duration_ms"], float) and line["duration_ms"] >= 0
    return lines


async def test_small_body_relayed_whole_with_headers_minus_hop_by_hop(
        gw: Any, raw: RawUpstream, capsys: pytest.CaptureFixture[str]) -> None:
    body = b'{"ok": true}'
    raw.scripts["/raw/small"] = (_answer("201 Created", [
        ("Content-Type", "application/json"), ("Set-Cookie", "a=1"), ("Set-Cookie", "b=2"),
        ("Connection", "keep-alive, X-Hop"), ("X-Hop", "secret"), ("Keep-Alive", "timeout=5"),
        ("X-Kept", "yes")], body, length=len(body)), False)
    status, headers, got = await gw.request("GET", "/raw/small")
    assert status == 201 and got == {"ok": True}
    assert headers.getall("Set-Cookie") == ["a=1", "b=2"] and headers["X-Kept"] == "yes"
    assert headers["Content-Type"] == "application/json" and headers["Content-Length"] == str(len(body))
    assert "X-Hop" not in headers and "Keep-Alive" not in headers
    assert re.fullmatch(r"[0-9a-f]{32}", headers["X-Request-Id"])
    line = _lines(logged(capsys))[-1]
    assert (line["status"], line["upstream_status"], line["route"]) == (201, 201, "raw")
    assert line["target"] == raw.url and line["upstream"] == "raw" and line["auth"] == "none"


@pytest.mark.parametrize("split", ["whole", "head first", "mid-body"])
async def test_small_body_arriving_after_its_head_is_awaited_and_relayed_intact(
        gw: Any, raw: RawUpstream, split: str) -> None:
    body = b"hello from a slow upstream"
    data = _answer("200 OK", [("Content-Type", "text/plain")], body, length=len(body))
    raw.scripts["/raw/slow"] = (data, False)
    if split != "whole":  # the body is not all there when the head is parsed: read() must wait for it
        raw.pauses["/raw/slow"] = (len(data) - len(body) + (0 if split == "head first" else 5), 0.2)
    started = time.monotonic()
    async with gw.session.get(gw.url + "/raw/slow") as r:
        assert r.status == 200 and r.headers["Content-Length"] == str(len(body)) and await r.read() == body
    assert (time.monotonic() - started >= 0.2) is (split != "whole")


@pytest.mark.parametrize("n", [0, 1, SMALL - 1, SMALL, SMALL + 1, 3 * SMALL + 7])
async def test_bodies_around_the_limit_arrive_intact(gw: Any, raw: RawUpstream, n: int) -> None:
    raw.scripts["/raw/n"] = (_answer("200 OK", [("Content-Type", "application/octet-stream")], _body(n),
                                     length=n), False)
    async with gw.session.get(gw.url + "/raw/n") as r:
        data = await r.read()
        assert r.status == 200 and r.headers["Content-Length"] == str(n)
    assert hashlib.sha256(data).hexdigest() == hashlib.sha256(_body(n)).hexdigest()


async def test_chunked_body_is_streamed(gw: Any, raw: RawUpstream) -> None:
    chunks = b"5\r\nhello\r\n6\r\n world\r\n0\r\n\r\n"
    raw.scripts["/raw/chunked"] = (_answer("200 OK", [("Transfer-Encoding", "chunked")], chunks), False)
    status, headers, got = await gw.request("GET", "/raw/chunked")
    assert status == 200 and got == "hello world"


async def test_head_204_304_have_no_body_and_do_not_wait_for_one(gw: Any, raw: RawUpstream) -> None:
    raw.scripts["/raw/head"] = (_answer("200 OK", [("Content-Type", "text/plain")], length=10), False)
    raw.scripts["/raw/nc"] = (_answer("204 No Content", []), False)
    raw.scripts["/raw/nm"] = (_answer("304 Not Modified", [("ETag", '"v1"')]), False)
    async with asyncio.timeout(5):
        async with gw.session.head(gw.url + "/raw/head") as r:
            assert r.status == 200 and r.headers["Content-Length"] == "10" and await r.read() == b""
        async with gw.session.get(gw.url + "/raw/nc") as r:
            assert r.status == 204 and await r.read() == b""
        async with gw.session.get(gw.url + "/raw/nm") as r:
            assert r.status == 304 and r.headers["ETag"] == '"v1"' and await r.read() == b""


async def test_small_body_cut_short_is_an_honest_502(gw: Any, raw: RawUpstream,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    raw.scripts["/raw/short"] = (_answer("200 OK", [], b"abc", length=100), True)
    status, headers, got = await gw.request("GET", "/raw/short")
    assert status == 502 and got["error"] == "bad_gateway" and got["request_id"] == headers["X-Request-Id"]
    line = _lines(logged(capsys))[-1]
    assert (line["status"], line["upstream_status"], line["target"]) == (502, 200, raw.url)
    # The gateway still answers the next request (the broken upstream connection was not reused).
    raw.scripts["/raw/ok"] = (_answer("200 OK", [], b"fine", length=4), False)
    assert (await gw.request("GET", "/raw/ok"))[0] == 200


async def _raw_request(port: int, target: bytes) -> bytes:
    return await raw_exchange(port, b"GET " + target + b" HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")


@pytest.mark.parametrize("target", [b'/raw/q"uote', b"/raw/back\\slash", "/raw/caf\u00e9/\u2028".encode(),
                                    b"/raw/ctl\x01x", b"/raw/tab\tx", b"/raw/%22%5c%00"])
async def test_every_log_line_is_exact_json_whatever_the_path(
        gw: Any, raw: RawUpstream, capsys: pytest.CaptureFixture[str], target: bytes) -> None:
    reply = await _raw_request(gw.app.public_port, target)
    assert reply.startswith(b"HTTP/1.")
    line = _lines(logged(capsys))[-1]
    if all(0x21 <= b < 0x7F for b in target):  # printable ASCII reaches the gateway (quotes, backslashes)
        assert line["path"] is not None
    if line["path"] is not None:  # else refused by the HTTP parser (logged with path null)
        assert line["path"].encode("utf-8", "surrogateescape") == target
    assert line["status"] == int(reply.split(b" ")[1])


async def test_claims_with_quotes_backslashes_unicode_and_controls_log_exactly(
        gw: Any, raw: RawUpstream, issuer: DevIssuer, capsys: pytest.CaptureFixture[str]) -> None:
    raw.scripts["/who/x"] = (_answer("200 OK", [], b"ok", length=2), False)
    odd = 'q"b\\s\u00e9\u2028\x01\x1f\ud7ff'
    token = issuer.token({"sub": odd, "jti": odd + "j", "aud": [DEFAULT_AUDIENCE, odd]})
    status, _, _ = await gw.request("GET", "/who/x", token=token)
    assert status == 401  # a control character cannot become an identity header
    out = logged(capsys)
    assert token not in out
    line = _lines(out)[-1]
    assert line["sub"] == odd and line["jti"] == odd + "j" and line["aud"] == [DEFAULT_AUDIENCE, odd]
    assert line["auth"] == "malformed" and line["iss"] == issuer.url
    fine = 'al"i\\ce'
    status, headers, _ = await gw.request("GET", "/who/x", token=issuer.token({"sub": fine}),
                                          headers={"X-Request-Id": "client.id:1-2_3"})
    assert status == 200 and headers["X-Request-Id"] == "client.id:1-2_3"
    line = _lines(logged(capsys))[-1]
    assert line["sub"] == fine and line["auth"] == "ok" and line["request_id"] == "client.id:1-2_3"
    assert line["aud"] == DEFAULT_AUDIENCE  # one string in the token: one string in the log, not a list
    assert line["jti"] is None or isinstance(line["jti"], str)



def test_single_process_metric_values_are_lock_free_and_exact() -> None:
    from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

    from gateway import metrics

    assert not metrics.MULTIPROCESS
    assert isinstance(metrics.requests_total.labels(route="-", method="GET", status="200")._value,
                      metrics.LoopValue)
    registry = CollectorRegistry()
    c = Counter("t_requests", "t", ["route"], registry=registry)
    g = Gauge("t_inflight", "t", registry=registry)
    h = Histogram("t_seconds", "t", buckets=metrics.LATENCY_BUCKETS, registry=registry)
    for i in range(1000):
        c.labels(route="a").inc()
        g.inc()
        h.observe(0.002 if i % 2 else 0.2)
        g.dec()
    g.set(7)
    text = generate_latest(registry).decode()
    assert 't_requests_total{route="a"} 1000.0' in text and "t_inflight 7.0" in text
    assert 't_seconds_bucket{le="0.0025"} 500.0' in text and 't_seconds_count 1000.0' in text
    assert abs(h._sum.get() - (500 * 0.002 + 500 * 0.2)) < 1e-9


def test_generated_request_ids_are_unique_valid_and_differ_in_a_forked_child() -> None:
    import os

    from multidict import CIMultiDict

    from gateway.identity import request_id_from

    ids = {request_id_from(CIMultiDict()) for _ in range(20000)}
    assert len(ids) == 20000 and all(re.fullmatch(r"[0-9a-f]{32}", i) for i in ids)
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: one id to the parent, then leave at once
        os.write(write, request_id_from(CIMultiDict()).encode())
        os._exit(0)
    os.close(write)
    child = os.read(read, 64).decode()
    os.close(read)
    os.waitpid(pid, 0)
    mine = request_id_from(CIMultiDict())
    assert re.fullmatch(r"[0-9a-f]{32}", child) and child not in ids and child[:16] != mine[:16]
    assert request_id_from(CIMultiDict({"X-Request-Id": "bad id\r\n"})) not in ids


async def test_identity_headers_per_token_stay_exact_across_repeats(
        issuer: DevIssuer, echo_upstream: Any, gateway_factory: Any) -> None:
    text = config_text(issuer.url, {"raw": [echo_upstream.url]}, ROUTES)
    alice = issuer.token({"sub": "alice", "scope": "a b", "jti": "j-a"})
    bob = issuer.token({"sub": "bob", "roles": ["admin"]})
    evil = issuer.token({"sub": "eve\r\nX-Auth-Roles: admin"})
    async with gateway_factory(text) as gw:
        for _ in range(3):
            for token, want in ((alice, {"x-auth-subject": "alice", "x-auth-scopes": "a b", "x-auth-token-id": "j-a"}),
                                (bob, {"x-auth-subject": "bob", "x-auth-roles": "admin"})):
                status, _, _ = await gw.request("GET", "/who/x", token=token,
                                                headers={"X-Auth-Subject": "mallory", "X-Auth-Roles": "root"})
                assert status == 200
                got = {k.lower(): v for k, v in echo_upstream.requests[-1][2].items()}
                assert {k: got.get(k) for k in want} == want and got["x-auth-issuer"] == "dev"
                if token is alice:
                    assert "x-auth-roles" not in got  # the client's X-Auth-Roles never passes
            status, _, _ = await gw.request("GET", "/who/x", token=evil)
            assert status == 401  # refused every time: a failure is never cached


def test_log_timestamp_is_iso_utc_milliseconds_across_second_boundaries() -> None:
    from datetime import UTC, datetime

    from gateway.accesslog import Stamp as _Stamp

    now = [1700000000.0]
    stamp = _Stamp(clock=lambda: now[0])
    for t in (1700000000.0, 1700000000.9994, 1700000001.0005, 1700000001.5, 1700086400.25, 1699999999.999):
        now[0] = t
        want = datetime.fromtimestamp(int(t * 1000) / 1000, UTC).isoformat(timespec="milliseconds")
        assert stamp() == want.replace("+00:00", "Z")


async def test_response_header_bytes_that_are_not_utf8_reach_the_client_unchanged(gw: Any, raw: RawUpstream) -> None:
    """obs-text (RFC 9110 s5.5): an upstream's Latin-1 header value is relayed byte for byte (gateway.httphead)."""
    head = _answer("200 OK", [("Content-Type", "text/plain"), ("X-Name", "caf\u00e9")], b"ok", length=2)
    raw.scripts["/raw/latin1"] = (head.replace("caf\u00e9".encode(), b"caf\xe9"), False)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
    writer.write(b"GET /raw/latin1 HTTP/1.1\r\nHost: x\r\n\r\n")
    got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert got.startswith(b"HTTP/1.1 200 ") and b"\r\nX-Name: caf\xe9\r\n" in got


async def test_request_header_bytes_that_are_not_utf8_reach_the_upstream_unchanged(gw: Any, raw: RawUpstream) -> None:
    raw.scripts["/raw/in"] = (_answer("204 No Content", []), False)
    reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
    writer.write(b"GET /raw/in HTTP/1.1\r\nHost: x\r\nX-Name: caf\xe9\r\n\r\n")
    got = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
    writer.close()
    assert got.startswith(b"HTTP/1.1 204 ")
    assert b"\r\nX-Name: caf\xe9\r\n" in raw.heads[-1]
