"""Issue 5 end to end through the real gateway: breakers, retries, timeouts, mTLS, WebSocket, reload, drain.

Every test sends HTTP to a running gateway (in-process, or `python -m gateway run` as a child process)
in front of real aiohttp upstreams that the test stops, slows, resets or makes answer 5xx.
"""

from __future__ import annotations

import asyncio
import signal
import ssl
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from aiohttp import WSMsgType, web

from gateway.devissuer import DevIssuer
from tests.support.gateway import GatewayProcess, RunningGateway, config_text, eventually, free_port
from tests.support.pki import make_pki
from tests.support.upstreams import Answer, Blackhole, EchoUpstream, MakeRaw
from tests.test_h1server import Conn
from tests.test_revocation_e2e import ADMIN, admin_post

MakeUpstream = Callable[..., Awaitable[EchoUpstream]]

PUBLIC_ROUTE = """\
  - name: {name}
    match: {{path_prefix: /{name}/}}
    upstream: {name}
    auth: {{required: false}}
"""


def upstream_yaml(name: str, *targets: str, connect: str = "1s", read: str = "5s", attempts: int = 2,
                  retry_on: str = "[connect_error, 502, 503]", failures: int = 3, window: str = "10s",
                  open_for: str = "30s", half_open: int = 1, tls: str = "", max_requests: int | None = None) -> str:
    text = (f"  {name}:\n    targets: [{', '.join(targets)}]\n"
            f"    timeouts: {{connect: {connect}, read: {read}}}\n"
            f"    retries: {{attempts: {attempts}, retry_on: {retry_on}}}\n"
            f"    circuit_breaker: {{failures: {failures}, window: {window}, open_for: {open_for}, "
            f"half_open_requests: {half_open}}}\n")
    text += f"    max_requests: {max_requests}\n" if max_requests is not None else ""
    return text + (f"    tls: {tls}\n" if tls else "")


def gateway_yaml(issuer_url: str, upstreams: list[str], routes: str, **kw: Any) -> str:
    """config_text() with upstreams written in full (timeouts, retries, breaker, tls)."""
    text = config_text(issuer_url, {}, routes, **kw)
    assert "upstreams:\n\nroutes:" in text
    return text.replace("upstreams:\n\nroutes:", "upstreams:\n" + "".join(upstreams) + "routes:")


def public_routes(*names: str) -> str:
    return "".join(PUBLIC_ROUTE.format(name=n) for n in names)


async def metric(session: aiohttp.ClientSession, admin_url: str, name: str, **labels: str) -> float | None:
    """The value of one sample on /metrics, or None when absent."""
    async with session.get(admin_url + "/metrics") as r:
        text = await r.text()
    wanted = {f'{k}="{v}"' for k, v in labels.items()}
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            head, _, value = line.rpartition(" ")
            found = set(head[len(name) + 1:-1].split(",")) if "{" in head else set()
            if found == wanted:
                return float(value)
    return None


async def timed(gw: RunningGateway, method: str, path: str, **kw: Any) -> tuple[int, dict[str, str], Any, float]:
    started = time.perf_counter()
    status, headers, body = await gw.request(method, path, **kw)
    return status, headers, body, time.perf_counter() - started


# --- circuit breaker --------------------------------------------------------------------------------


async def test_breaker_opens_after_threshold_then_answers_503_fast_without_touching_the_target(
        issuer: DevIssuer, make_upstream: MakeUpstream, blackhole: Blackhole, gateway_factory: Any) -> None:
    sick = await make_upstream()
    sick.set_mode("status", status=502)
    text = gateway_yaml(issuer.url, [
        upstream_yaml("sick", sick.url, failures=3, attempts=1),
        upstream_yaml("hole", blackhole.url, connect="400ms", failures=2, attempts=1),
    ], public_routes("sick", "hole"))
    async with gateway_factory(text) as gw:
        for _ in range(3):
            status, _, body = await gw.request("GET", "/sick/x")
            assert (status, body["error"]) == (502, "bad_gateway")
        assert sick.hits == 3
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="sick", target=sick.url) == 1
        connections = sick.connections
        for _ in range(10):
            status, headers, body, elapsed = await timed(gw, "GET", "/sick/x")
            assert (status, body["error"]) == (503, "upstream_unavailable")
            assert 1 <= int(headers["Retry-After"]) <= 30
            assert body["request_id"] == headers["X-Request-Id"]
            assert elapsed < 0.1
        assert (sick.hits, sick.connections) == (3, connections)  # no attempt while open

        # Against a target whose connect never completes: each try costs the connect timeout until the
        # breaker opens; then the answer comes far faster than one connect timeout.
        for _ in range(2):
            status, _, body, elapsed = await timed(gw, "GET", "/hole/x")
            assert (status, body["error"]) == (502, "bad_gateway")
            assert 0.35 <= elapsed < 1.3
        status, headers, body, elapsed = await timed(gw, "GET", "/hole/x")
        assert (status, body["error"]) == (503, "upstream_unavailable") and "Retry-After" in headers
        assert elapsed < 0.12  # far below the 400 ms connect timeout: no connection attempt


async def test_a_body_cut_short_after_its_head_counts_against_the_target(
        issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any) -> None:
    """The head arrived (a success so far), then the target closed mid-body: a failure of the target too.
    Two of them open a breaker of `failures: 2`; the third request is refused without reaching it."""
    def respond(head: bytes, index: int) -> Answer:
        length = 100 if b"/cut/small" in head else 1_000_000  # read whole first, or streamed
        return b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % length + b"x" * 10, "close"

    target = await make_raw_upstream(respond)
    text = gateway_yaml(issuer.url, [upstream_yaml("cut", target.url, failures=2, attempts=1)],
                        public_routes("cut"))
    async with gateway_factory(text) as gw:
        status, _, body = await gw.request("GET", "/cut/small")
        assert (status, body["error"]) == (502, "bad_gateway")  # nothing was sent yet: an honest 502
        with pytest.raises(aiohttp.ClientPayloadError):  # status line sent: the client's connection is cut
            async with gw.session.get(gw.url + "/cut/large") as r:
                assert r.status == 200
                await r.read()
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="cut", target=target.url) == 1
        status, _, body = await gw.request("GET", "/cut/small")
        assert (status, body["error"]) == (503, "upstream_unavailable")
        assert len(target.requests) == 2


async def test_a_client_abandoning_its_upload_does_not_count_against_the_target(
        issuer: DevIssuer, make_raw_upstream: MakeRaw, gateway_factory: Any) -> None:
    """The target answered at once while the upload was still arriving; the client then went away, so the
    gateway cut the upstream call and the response body broke off. The client's doing, not the target's:
    two of them must not open a breaker of `failures: 2` (anyone could take a healthy target out)."""
    def respond(head: bytes, index: int) -> Answer:
        if head.startswith(b"POST"):
            return b"HTTP/1.1 200 OK\r\nContent-Length: 1000000\r\n\r\n" + b"x" * 10, "hang"
        return b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\nok"

    target = await make_raw_upstream(respond)
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, failures=2, attempts=1)], public_routes("up"))
    async with gateway_factory(text) as gw:
        for _ in range(2):
            reader, writer = await asyncio.open_connection("127.0.0.1", gw.app.public_port)
            writer.write(b"POST /up/x HTTP/1.1\r\nHost: a\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n")
            assert (await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)).startswith(b"HTTP/1.1 200")
            writer.close()
            await writer.wait_closed()
            await asyncio.sleep(0.2)
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="up", target=target.url) == 0
        assert (await gw.request("GET", "/up/y"))[0] == 200


async def test_half_open_probe_then_recovery(issuer: DevIssuer, make_upstream: MakeUpstream,
                                             gateway_factory: Any) -> None:
    target = await make_upstream()
    target.set_mode("status", status=503)
    text = gateway_yaml(issuer.url, [upstream_yaml("flaky", target.url, failures=2, open_for="400ms", attempts=1)],
                        public_routes("flaky"))
    async with gateway_factory(text) as gw:
        async def state() -> float | None:
            return await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="flaky", target=target.url)

        for _ in range(2):
            status, _, body = await gw.request("GET", "/flaky/x")
            assert (status, body["error"]) == (503, "upstream_unavailable")
        assert await state() == 1
        assert (await gw.request("GET", "/flaky/x"))[0] == 503 and target.hits == 2

        # After open_for the gauge says half-open by itself, before any request (SPEC 7: it follows every
        # transition); then one probe goes through; it fails, so the circuit opens again at once.
        await asyncio.sleep(0.45)
        assert await state() == 2 and target.hits == 2
        assert (await gw.request("GET", "/flaky/x"))[0] == 503
        assert target.hits == 3 and await state() == 1
        await gw.request("GET", "/flaky/x")
        assert target.hits == 3

        # The target recovers. While the (slow) probe is in flight the state is half-open and a second
        # request is refused without reaching the target; the probe's success closes the circuit.
        target.set_mode("slow", delay=0.4)
        await asyncio.sleep(0.45)
        probe = asyncio.ensure_future(gw.request("GET", "/flaky/x"))
        await eventually(lambda: asyncio.sleep(0, target.hits == 4), timeout=2)
        assert await state() == 2
        status, headers, body = await gw.request("GET", "/flaky/x")
        assert (status, body["error"]) == (503, "upstream_unavailable") and "Retry-After" in headers
        assert (await probe)[0] == 200
        assert await state() == 0
        target.set_mode("echo")
        for _ in range(5):
            assert (await gw.request("GET", "/flaky/x"))[0] == 200
        assert target.hits == 9


# --- balancing and retries --------------------------------------------------------------------------


async def test_a_reloads_replaced_breakers_leave_the_gauge_to_the_new_ones(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    """A reload that changes an upstream builds new breakers under the same gauge labels; the old ones
    live on until in-flight requests finish. The old breaker's open_for timer must not set the gauge to
    half-open while the new breaker is closed (a false GatewayCircuitBreakerOpen alert, lasting)."""
    target = await make_upstream()
    target.set_mode("status", status=502)
    text = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, failures=1, attempts=1, open_for="1s")],
                        public_routes("up"))
    async with gateway_factory(text) as gw:
        async def state() -> float | None:
            return await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="up", target=target.url)

        assert (await gw.request("GET", "/up/x"))[0] == 502 and await state() == 1
        target.set_mode("echo")
        path = tmp_path / "gateway.yaml"
        path.write_text(text.replace("read: 5s", "read: 6s"))
        assert await gw.app.reload(str(path))
        assert await state() == 0 and (await gw.request("GET", "/up/x"))[0] == 200
        await asyncio.sleep(1.3)  # past the old breaker's open_for
        assert await state() == 0


async def test_a_target_removed_by_a_reload_leaves_no_open_gauge(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    """The breaker of a target the new config no longer has was open: its series must not say "open"
    until restart (GatewayCircuitBreakerOpen would fire for good)."""
    dead, live = await make_upstream(), await make_upstream()
    dead.set_mode("status", status=502)
    text = gateway_yaml(issuer.url, [upstream_yaml("up", dead.url, failures=1, attempts=1, open_for="1s")],
                        public_routes("up"))
    async with gateway_factory(text) as gw:
        assert (await gw.request("GET", "/up/x"))[0] == 502
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="up", target=dead.url) == 1
        path = tmp_path / "next.yaml"
        path.write_text(text.replace(dead.url, live.url))
        assert await gw.app.reload(str(path))
        await asyncio.sleep(1.3)  # past the old breaker's open_for
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="up", target=dead.url) is None
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="up", target=live.url) == 0


async def test_overlapping_reloads_run_one_at_a_time(
        issuer: DevIssuer, other_issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any,
        tmp_path: Path) -> None:
    """A slow reload (a new issuer's JWKS takes a second) and a quick one that changes an issuer it reuses:
    overlapping, the slow one committed that issuer's JWKS cache after the quick one had retired (and
    later closed) it, so its refresh stopped and a withdrawn key went on verifying; the older file won."""
    target = await make_upstream()
    routes = "  - name: who\n    match: {path_prefix: /who/}\n    upstream: up\n"
    v1 = gateway_yaml(issuer.url, [upstream_yaml("up", target.url, attempts=1)], routes).replace(
        "    jwks_min_refetch: 30s\n", "    jwks_min_refetch: 30s\n    jwks_refresh: 1s\n", 1)
    second = f"  - name: other\n    issuer: {other_issuer.url}\n    audiences: [x]\n    algorithms: [RS256]\n"
    slow_text = v1.replace("    jwks_refresh: 1s\n", "    jwks_refresh: 1s\n" + second, 1)
    quick_text = v1.replace("    jwks_refresh: 1s\n", "    jwks_refresh: 1s\n    leeway: 5s\n", 1)
    other_issuer.delay = 1.0
    async with gateway_factory(v1) as gw:
        slow_path, quick_path = tmp_path / "slow.yaml", tmp_path / "quick.yaml"
        slow_path.write_text(slow_text)
        quick_path.write_text(quick_text)
        slow = asyncio.ensure_future(gw.app.reload(str(slow_path)))
        await asyncio.sleep(0.3)
        assert await gw.app.reload(str(quick_path)) and await slow
        assert gw.app.config.path == str(quick_path)  # the file sent last wins
        await gw.app.services.close_retired()  # what a reload schedules after shutdown_grace
        leaked = issuer.token({"sub": "mallory"}, ttl=3600)
        assert (await gw.request("GET", "/who/x", token=leaked))[0] == 200
        issuer.rotate("RS256", drop_old=True)
        await asyncio.sleep(2.5)  # jwks_refresh: 1s
        assert (await gw.request("GET", "/who/x", token=leaked))[0] == 401


async def test_one_target_down_of_two_no_client_error_after_the_breaker_opens(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any, refused_url: str) -> None:
    live = await make_upstream()
    text = gateway_yaml(issuer.url, [upstream_yaml("pair", refused_url, live.url, failures=2)], public_routes("pair"))
    async with gateway_factory(text) as gw:
        # GET: a refused connection is retried on the other target, so no client ever sees it.
        for _ in range(6):
            status, _, body = await gw.request("GET", "/pair/x")
            assert status == 200 and body["path"] == "/pair/x"
        assert await metric(gw.session, gw.admin_url, "gateway_circuit_state", upstream="pair", target=refused_url) == 1
        # Breaker open: even a POST (never retried) only goes to the live target.
        for i in range(6):
            status, _, body = await gw.request("POST" if i % 2 else "GET", "/pair/x", data=b"{}")
            assert status == 200, body
        assert live.hits == 12


async def test_post_sent_once_to_a_502_target_and_the_client_gets_bad_gateway(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.set_mode("status", status=502)
    text = gateway_yaml(issuer.url, [upstream_yaml("orders", bad.url, good.url, attempts=3, failures=10)],
                        public_routes("orders"))
    async with gateway_factory(text) as gw:
        seen_502 = 0
        for _ in range(4):  # round robin: half of them start at the bad target
            status, headers, body = await gw.request("POST", "/orders/new", data=b'{"order": 1}')
            if status == 502:
                seen_502 += 1
                assert headers["Content-Type"].startswith("application/json")
                assert body == {"error": "bad_gateway", "error_description": body["error_description"],
                                "request_id": headers["X-Request-Id"]}
                assert "status" not in body  # the target's own body does not leak out
            else:
                assert status == 200
        assert seen_502 == 2
        assert (bad.hits, good.hits) == (2, 2)  # each POST reached exactly one target, once


async def test_get_retried_on_the_other_target(issuer: DevIssuer, make_upstream: MakeUpstream,
                                               gateway_factory: Any) -> None:
    bad, good = await make_upstream(), await make_upstream()
    bad.set_mode("status", status=502)
    text = gateway_yaml(issuer.url, [upstream_yaml("orders", bad.url, good.url, failures=10)],
                        public_routes("orders"))
    async with gateway_factory(text) as gw:
        for _ in range(4):
            status, _, body = await gw.request("GET", "/orders/1")
            assert status == 200 and body["method"] == "GET"
        assert (bad.hits, good.hits) == (2, 4)  # every request that tried the bad target got a second try


async def test_hanging_target_gives_504_within_the_read_timeout(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any) -> None:
    target = await make_upstream()
    target.set_mode("hang")
    text = gateway_yaml(issuer.url, [upstream_yaml("hang", target.url, read="500ms")], public_routes("hang"))
    async with gateway_factory(text) as gw:
        status, _, body, elapsed = await timed(gw, "GET", "/hang/x")
        assert (status, body["error"]) == (504, "upstream_timeout")
        assert 0.45 <= elapsed < 1.3
        assert target.hits == 1  # a timeout is not in retry_on: not retried


async def test_reset_connection_gives_502(issuer: DevIssuer, make_upstream: MakeUpstream,
                                          gateway_factory: Any) -> None:
    target = await make_upstream()
    target.set_mode("reset")
    text = gateway_yaml(issuer.url, [upstream_yaml("rst", target.url)], public_routes("rst"))
    async with gateway_factory(text) as gw:
        status, _, body = await gw.request("POST", "/rst/x", data=b"x")
        assert (status, body["error"]) == (502, "bad_gateway")


# --- mTLS to the upstream ---------------------------------------------------------------------------


async def test_mtls_upstream_from_config(issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path,
                                         gateway_factory: Any) -> None:
    pki = make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=pki["ca"])
    server_ctx.load_cert_chain(pki["server"])
    server_ctx.verify_mode = ssl.CERT_REQUIRED
    target = await make_upstream(ssl_context=server_ctx)
    text = gateway_yaml(issuer.url, [
        upstream_yaml("secure", target.url, attempts=1,
                      tls=f"{{ca_file: {pki['ca']}, cert_file: {pki['client']}, key_file: {pki['client']}}}"),
        upstream_yaml("nocert", target.url, attempts=1, tls=f"{{ca_file: {pki['ca']}}}"),
    ], public_routes("secure", "nocert"))
    async with gateway_factory(text) as gw:
        status, _, body = await gw.request("GET", "/secure/x")
        assert status == 200 and body["path"] == "/secure/x"
        status, _, body = await gw.request("GET", "/nocert/x")
        assert (status, body["error"]) == (502, "bad_gateway")
        assert target.hits == 1  # the handshake without a client certificate never became a request


async def test_identity_reaches_a_tls_upstream_as_it_reaches_a_plain_one(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_factory: Any) -> None:
    """Headers and token mode through aiohttp's client (TLS targets) and through the lean client (plain):
    the same identity arrives once, and the client's own X-Auth-* and Authorization never do."""
    pki = make_pki(tmp_path)
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server"])
    secure, plain = await make_upstream(ssl_context=server_ctx), await make_upstream()
    routes = "".join(
        f"  - name: {name}-{mode}\n    match: {{path_prefix: /{name}-{mode}/}}\n    upstream: {name}\n"
        f"    forward: {{identity: {mode}{', audience: svc' if mode == 'token' else ''}}}\n"
        for name in ("secure", "plain") for mode in ("headers", "token"))
    text = gateway_yaml(issuer.url, [upstream_yaml("secure", secure.url, attempts=1, tls=f"{{ca_file: {pki['ca']}}}"),
                                     upstream_yaml("plain", plain.url, attempts=1)], routes,
                        extra=f"internal_token:\n  key_store: {tmp_path / 'keys.json'}\n")
    token = issuer.token({"sub": "alice", "scope": "a b", "jti": "j-1"})
    spoof = {"X-Auth-Subject": "mallory", "x-auth-scopes": "admin"}
    async with gateway_factory(text) as gw:
        for name in ("secure", "plain"):
            status, _, body = await gw.request("GET", f"/{name}-headers/x", token=token, headers=spoof)
            assert status == 200, body
            got = {k.lower(): v for k, v in body["headers"].items()}
            assert (got["x-auth-subject"], got["x-auth-scopes"], got["x-auth-token-id"]) == ("alice", "a b", "j-1")
            assert "authorization" not in got
            assert [k.lower() for k, _ in body["header_list"]].count("x-auth-subject") == 1
            status, _, body = await gw.request("GET", f"/{name}-token/x", token=token, headers=spoof)
            assert status == 200, body
            got = {k.lower(): v for k, v in body["headers"].items()}
            assert got["authorization"].startswith("Bearer ") and token not in got["authorization"]
            assert not any(k.startswith("x-auth-") for k in got)
            assert [k.lower() for k, _ in body["header_list"]].count("authorization") == 1
    assert (secure.hits, plain.hits) == (2, 2)


# --- WebSocket --------------------------------------------------------------------------------------


class WsUpstream:
    """A WebSocket server that echoes, closes with code 4001 when told "close-me", and records each
    connection's end (the close code it last saw from its peer)."""

    def __init__(self) -> None:
        self.ended: asyncio.Queue[int | None] = asyncio.Queue()
        self.upgrades = 0
        self.runner: web.AppRunner | None = None
        self.url = ""

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/{tail:.*}", self.handle)
        self.runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.1)
        await self.runner.setup()
        site = web.TCPSite(self.runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{self.runner.addresses[0][1]}"

    async def handle(self, request: web.Request) -> web.StreamResponse:
        self.upgrades += 1
        ws = web.WebSocketResponse()
        await ws.prepare(request)
        async for msg in ws:
            if msg.type == WSMsgType.TEXT and msg.data == "close-me":
                await ws.close(code=4001)
            elif msg.type == WSMsgType.TEXT:
                await ws.send_str(request.headers.get("X-Auth-Subject", "?") + ":" + msg.data)
            elif msg.type == WSMsgType.BINARY:
                await ws.send_bytes(msg.data[::-1])
        await self.ended.put(ws.close_code)
        return ws


@pytest.fixture
async def ws_upstream() -> Any:
    server = WsUpstream()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


WS_ROUTE = """\
  - name: ws
    match: {path_prefix: /ws/, websocket: true}
    upstream: ws
"""


async def test_websocket_through_the_gateway_with_auth(issuer: DevIssuer, ws_upstream: WsUpstream,
                                                       gateway_factory: Any) -> None:
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ROUTE)
    async with gateway_factory(text) as gw:
        ws_url = gw.url.replace("http://", "ws://")
        # No token: 401 before any upgrade, and nothing reaches the upstream.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await gw.session.ws_connect(ws_url + "/ws/chat")
        assert info.value.status == 401
        assert ws_upstream.upgrades == 0
        token = issuer.token({"sub": "alice"})
        auth = {"Authorization": f"Bearer {token}"}
        # A route without match.websocket does not upgrade: test_an_upgrade_on_a_plain_route_is_proxied_as_plain_http.

        # Frames both ways (the upstream saw the identity header, not the token); the client closes:
        # the upstream side is closed too.
        async with gw.session.ws_connect(ws_url + "/ws/chat", headers=auth) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=2) == "alice:hello"
            await ws.send_bytes(b"\x01\x02\x03")
            assert await ws.receive_bytes(timeout=2) == b"\x03\x02\x01"
            await ws.close()
        assert await asyncio.wait_for(ws_upstream.ended.get(), 2) is not None

        # The upstream closes: the client sees the close with the upstream's code.
        async with gw.session.ws_connect(ws_url + "/ws/chat", headers=auth) as ws:
            await ws.send_str("close-me")
            msg = await ws.receive(timeout=2)
            assert msg.type in (WSMsgType.CLOSE, WSMsgType.CLOSING, WSMsgType.CLOSED)
            assert msg.type == WSMsgType.CLOSE and msg.data == 4001
        await asyncio.wait_for(ws_upstream.ended.get(), 2)  # the upstream's handler finished too
        assert ws_upstream.upgrades == 2


async def test_a_websocket_session_ends_when_its_token_expires(issuer: DevIssuer, ws_upstream: WsUpstream,
                                                               gateway_factory: Any) -> None:
    """A session outlives no token: at exp (+ the issuer's leeway, 0 here) both sides are closed with 1008."""
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ROUTE, issuer_extra="    leeway: 0s")
    async with gateway_factory(text) as gw:
        token = issuer.token({"sub": "alice"}, ttl=2)
        started = time.monotonic()
        async with gw.session.ws_connect(gw.url.replace("http://", "ws://") + "/ws/chat",
                                         headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=2) == "alice:hello"
            msg = await ws.receive(timeout=5)
            took = time.monotonic() - started
        assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token expired")
        assert took < 2.5, took  # exp is whole seconds: at most 2 s after the token was made, + one look
        assert await asyncio.wait_for(ws_upstream.ended.get(), 2) == 1008


async def test_a_websocket_session_ends_within_a_second_of_its_revocation(
        issuer: DevIssuer, ws_upstream: WsUpstream, redis_server: Any, gateway_factory: Any) -> None:
    """Revoked while open (Redis, as across replicas): that session is closed with 1008; a session of
    another token stays open through the same change of the revocation view."""
    revocation = (f"revocation: {{backend: redis, redis_url: '{redis_server.url}', key_prefix: 'ws:rev:', "
                  "on_backend_error: deny}")
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ROUTE, revocation=revocation)
    async with gateway_factory(text) as gw:
        url = gw.url.replace("http://", "ws://") + "/ws/chat"
        bob = {"Authorization": f"Bearer {issuer.token({'sub': 'bob', 'jti': 'ws-bob'})}"}
        carol = {"Authorization": f"Bearer {issuer.token({'sub': 'carol', 'jti': 'ws-carol'})}"}
        async with gw.session.ws_connect(url, headers=bob) as ws_bob, \
                gw.session.ws_connect(url, headers=carol) as ws_carol:
            await ws_bob.send_str("a")
            assert await ws_bob.receive_str(timeout=2) == "bob:a"
            status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                            {"type": "jti", "value": "ws-bob"})
            assert status == 201, body
            started = time.monotonic()
            msg = await ws_bob.receive(timeout=3)
            took = time.monotonic() - started
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token revoked")
            assert took < 1.0, took
            assert await asyncio.wait_for(ws_upstream.ended.get(), 2) == 1008
            await asyncio.sleep(2 * 0.25)  # two more looks of carol's watcher after the view changed
            await ws_carol.send_str("b")
            assert await ws_carol.receive_str(timeout=2) == "carol:b"
        # A new upgrade with the revoked token is refused before anything reaches the upstream.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await gw.session.ws_connect(url, headers=bob)
        assert info.value.status == 401 and ws_upstream.upgrades == 2


class SlowWsUpstream(WsUpstream):
    """Takes 0.6 s to answer the handshake: a window in which the session is admitted but not yet open."""

    async def handle(self, request: web.Request) -> web.StreamResponse:
        await asyncio.sleep(0.6)
        return await super().handle(request)


async def _raw_upgrade(port: int, token: str) -> Conn:
    """A WebSocket handshake by hand, then nothing: the caller decides whether it ever reads again."""
    c = await Conn.open(port)
    c.writer.write(b"GET /ws/chat HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
                   b"Sec-WebSocket-Version: 13\r\nSec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                   + f"Authorization: Bearer {token}\r\n\r\n".encode())
    head = await asyncio.wait_for(c.reader.readuntil(b"\r\n\r\n"), 5)
    assert head.startswith(b"HTTP/1.1 101"), head
    return c


async def test_a_websocket_revoked_while_its_handshake_goes_on_is_closed(
        issuer: DevIssuer, gateway_factory: Any) -> None:
    """Admitted, then revoked while the upstream still answers the handshake: the session that opens
    after is closed at the watcher's first look (it used to take its first stamp after the revocation,
    and so never looked)."""
    slow = SlowWsUpstream()
    await slow.start()
    try:
        text = gateway_yaml(issuer.url, [upstream_yaml("ws", slow.url)], WS_ROUTE)
        async with gateway_factory(text) as gw:
            token = issuer.token({"sub": "alice", "jti": "race-1"})
            connecting = asyncio.ensure_future(gw.session.ws_connect(
                gw.url.replace("http://", "ws://") + "/ws/chat", headers={"Authorization": f"Bearer {token}"}))
            await asyncio.sleep(0.2)
            status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                            {"type": "jti", "value": "race-1"})
            assert status == 201, body
            async with await connecting as ws:
                msg = await ws.receive(timeout=2)
            assert (msg.type, msg.data, msg.extra) == (WSMsgType.CLOSE, 1008, "token revoked")
            assert await asyncio.wait_for(slow.ended.get(), 2) == 1008
    finally:
        assert slow.runner is not None
        await slow.runner.cleanup()


async def test_a_client_that_never_reads_does_not_hold_the_upstream_session(
        issuer: DevIssuer, ws_upstream: WsUpstream, gateway_factory: Any) -> None:
    """Revoked while its client reads nothing: the upstream is closed at once, not after the close
    handshake's 10 s timeout on the client's side."""
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ROUTE)
    async with gateway_factory(text) as gw:
        mute = await _raw_upgrade(gw.app.public_port, issuer.token({"sub": "mute", "jti": "mute-1"}))
        try:
            started = time.monotonic()
            status, body = await admin_post(gw.session, gw.admin_url, issuer.token(ADMIN),
                                            {"type": "jti", "value": "mute-1"})
            assert status == 201, body
            assert await asyncio.wait_for(ws_upstream.ended.get(), 3) == 1008
            assert time.monotonic() - started < 1.5
        finally:
            mute.writer.close()


async def test_a_client_gone_without_a_close_frame_is_told_to_the_upstream_as_going_away(
        issuer: DevIssuer, ws_upstream: WsUpstream, gateway_factory: Any) -> None:
    """RFC 6455 s7.4.1: 1006 reports a connection lost without a close frame and is never sent in one;
    the upstream is sent 1001 (going away) instead. Leaving the gateway with sessions open leaves no
    watcher behind."""
    text = gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ROUTE)
    async with gateway_factory(text) as gw:
        gone = await _raw_upgrade(gw.app.public_port, issuer.token({"sub": "gone"}))
        gone.writer.transport.abort()
        assert await asyncio.wait_for(ws_upstream.ended.get(), 3) == 1001
        still_open = await _raw_upgrade(gw.app.public_port, issuer.token({"sub": "stays"}))
        await asyncio.sleep(0.1)
    still_open.writer.close()
    await asyncio.sleep(0.1)
    names = ("watch", "_bridge.<locals>.pump")
    left = [t for t in asyncio.all_tasks() if getattr(t.get_coro(), "__qualname__", "") in names]
    assert left == [], left


WS_ADMIN_ROUTES = """\
  - name: ws-admin
    match: {path_prefix: /ws/admin/, methods: [GET], websocket: true}
    upstream: ws
    auth: {roles: [admin]}
  - name: ws
    match: {path_prefix: /ws/, websocket: true}
    upstream: ws
"""


@pytest.mark.parametrize("method", ["OPTIONS", "DELETE", "PUT", "PATCH", "POST"])
async def test_only_a_get_opens_a_websocket(issuer: DevIssuer, ws_upstream: WsUpstream, gateway_factory: Any,
                                            method: str) -> None:
    """RFC 6455 s4.1: a handshake is a GET. `OPTIONS /ws/admin/room` with the Upgrade headers skipped the
    GET-only admin route for the broader websocket route behind it, and the gateway opened the upstream's
    WebSocket with a GET (ws_connect's): 101, a session on the admin room without the admin role. Now any
    other method is proxied as plain HTTP, its Upgrade stripped: no session, no handshake upstream."""
    async with gateway_factory(gateway_yaml(issuer.url, [upstream_yaml("ws", ws_upstream.url)], WS_ADMIN_ROUTES)) as gw:
        token = issuer.token({"sub": "mallory"})
        c = await Conn.open(gw.app.public_port)
        c.writer.write(f"{method} /ws/admin/room HTTP/1.1\r\nHost: x\r\nUpgrade: websocket\r\n"
                       "Connection: Upgrade\r\nSec-WebSocket-Version: 13\r\n"
                       "Sec-WebSocket-Key: dGhlIHNhbXBsZSBub25jZQ==\r\n"
                       f"Authorization: Bearer {token}\r\n\r\n".encode())
        status, _, _ = await c.response()
        c.writer.close()
        assert status != 101 and ws_upstream.upgrades == 0, status
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # the GET is the admin route's
            await gw.session.ws_connect(gw.url.replace("http://", "ws://") + "/ws/admin/room",
                                        headers={"Authorization": f"Bearer {token}"})
        assert info.value.status == 403 and ws_upstream.upgrades == 0
        async with gw.session.ws_connect(gw.url.replace("http://", "ws://") + "/ws/chat",
                                         headers={"Authorization": f"Bearer {token}"}) as ws:
            await ws.send_str("hi")
            assert await ws.receive_str(timeout=2) == "mallory:hi"
        assert ws_upstream.upgrades == 1


async def test_an_upgrade_on_a_plain_route_is_proxied_as_plain_http(
        issuer: DevIssuer, make_upstream: MakeUpstream, gateway_factory: Any) -> None:
    """SPEC 4: `Upgrade` is a hop-by-hop header stripped unless the route proxies WebSockets; the request
    itself is served as any other (it used to get 404, as if no route matched)."""
    target = await make_upstream()
    routes = "  - name: plain\n    match: {path_prefix: /plain/}\n    upstream: plain\n"
    async with gateway_factory(gateway_yaml(issuer.url, [upstream_yaml("plain", target.url)], routes)) as gw:
        token = issuer.token({"sub": "alice"})
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:  # answered, but not with a 101
            await gw.session.ws_connect(gw.url.replace("http://", "ws://") + "/plain/chat",
                                        headers={"Authorization": f"Bearer {token}"})
        assert info.value.status == 200
        method, path, got = target.requests[-1]
        assert (method, path) == ("GET", "/plain/chat") and got["X-Auth-Subject"] == "alice"
        assert not {"upgrade", "connection", "authorization"} & {k.lower() for k in got}
        # Without a token it is refused as on any authenticated route, before anything is proxied.
        with pytest.raises(aiohttp.WSServerHandshakeError) as info:
            await gw.session.ws_connect(gw.url.replace("http://", "ws://") + "/plain/chat")
        assert info.value.status == 401 and target.hits == 1


# --- live operations: `python -m gateway run` as a child process ------------------------------------


def process_ports() -> dict[str, str]:
    """Fixed free ports for a child process (gateway_yaml keywords): the test must know them in advance."""
    return {"listen": f"127.0.0.1:{free_port()}", "admin_listen": f"127.0.0.1:{free_port()}"}


def start_process(gateway_processes: Any, tmp_path: Path, text: str, ports: dict[str, str],
                  args: tuple[str, ...] = ()) -> GatewayProcess:
    path = tmp_path / "gateway.yaml"
    path.write_text(text)
    port, admin_port = (int(ports[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen"))
    return gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port, args=args))  # type: ignore[no-any-return]


async def load_loop(session: aiohttp.ClientSession, url: str, seconds: float, *, concurrency: int = 4,
                    max_requests: int = 4000) -> tuple[int, list[str]]:
    """GET `url` from `concurrency` tasks until `seconds` pass (or `max_requests`); (ok count, failures)."""
    deadline = time.monotonic() + seconds
    failures: list[str] = []
    ok = 0

    async def worker() -> None:
        nonlocal ok
        while time.monotonic() < deadline and ok + len(failures) < max_requests:
            try:
                async with session.get(url) as r:
                    await r.read()
                    if r.status == 200:
                        ok += 1
                    else:
                        failures.append(f"status {r.status}")
            except aiohttp.ClientError as exc:
                failures.append(repr(exc))

    await asyncio.gather(*(worker() for _ in range(concurrency)))
    return ok, failures


async def test_sighup_reload_good_and_bad_file_under_load(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    a, b = await make_upstream(), await make_upstream()
    ports = process_ports()
    old = gateway_yaml(issuer.url, [upstream_yaml("a", a.url)], public_routes("a"), **ports)
    gw = start_process(gateway_processes, tmp_path, old, ports)
    path = gw.config_path
    await gw.wait_ready()
    async with aiohttp.ClientSession() as session:
        load = asyncio.ensure_future(load_loop(session, gw.url + "/a/x", 2.5))
        await asyncio.sleep(0.3)
        async with session.get(gw.url + "/b/x") as r:
            assert r.status == 404

        # Good file: a new upstream and route; the old route keeps answering throughout.
        good = gateway_yaml(issuer.url, [upstream_yaml("a", a.url), upstream_yaml("b", b.url)],
                            public_routes("a", "b"), **ports)
        path.write_text(good)
        gw.signal(signal.SIGHUP)

        async def b_answers() -> bool:
            async with session.get(gw.url + "/b/x") as r:
                return r.status == 200
        await eventually(b_answers, timeout=3)

        # Bad file: refused, counted; the running config (with route b) stays.
        path.write_text(good.replace("upstream: b", "upstream: nowhere"))
        gw.signal(signal.SIGHUP)

        async def refused() -> bool:
            value = await metric(session, gw.admin_url, "gateway_config_reloads_total", result="error")
            return value == 1
        await eventually(refused, timeout=3)
        assert await metric(session, gw.admin_url, "gateway_config_reloads_total", result="ok") == 1
        async with session.get(gw.url + "/b/x") as r:
            assert r.status == 200
        ok, failures = await load
    assert failures == [] and ok > 50
    assert "reload refused" in gw.err.read_text()
    assert gw.stop() == 0


async def test_sigterm_during_a_slow_request_drains_and_exits_within_grace(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    slow = await make_upstream()
    slow.set_mode("slow", delay=1.5)
    ports = process_ports()
    text = gateway_yaml(issuer.url, [upstream_yaml("slow", slow.url)], public_routes("slow"), **ports)
    text = text.replace("shutdown_grace: 5s", "shutdown_grace: 4s")
    gw = start_process(gateway_processes, tmp_path, text, ports)
    await gw.wait_ready()
    assert gw.proc is not None
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(gw.url + "/slow/x"))
        await eventually(lambda: asyncio.sleep(0, slow.hits == 1), timeout=3)
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()

        async def not_ready() -> bool:  # the admin listener stays up while draining, answering 503
            async with session.get(gw.admin_url + "/readyz") as r:
                return r.status == 503
        assert await eventually(not_ready, timeout=1) < 0.5
        # No new connections are accepted on the public port while draining.
        with pytest.raises(aiohttp.ClientConnectionError):
            async with aiohttp.ClientSession() as fresh, fresh.get(gw.url + "/slow/x"):
                pass

        async with await request as r:  # the request in flight completes
            assert r.status == 200
            assert r.headers.get("Connection", "").lower() == "close"  # go elsewhere next time
            assert (await r.json())["path"] == "/slow/x"
        # the in-flight request finished on its own time (1.5 s upstream delay), not cut by the grace
        assert time.monotonic() - signalled < 3.5
    while gw.proc.poll() is None and time.monotonic() - signalled < 5:
        await asyncio.sleep(0.02)
    assert gw.proc.returncode == 0
    assert time.monotonic() - signalled < 4.5  # within shutdown_grace (4 s) and the process's own exit
    assert slow.hits == 1


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


async def test_two_workers_serve_and_exit_cleanly_on_sigterm(
        issuer: DevIssuer, echo_upstream: EchoUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    ports = process_ports()
    text = gateway_yaml(issuer.url, [upstream_yaml("echo", echo_upstream.url)], public_routes("echo"), **ports)
    gw = start_process(gateway_processes, tmp_path, text, ports, args=("--workers", "2"))
    await gw.wait_ready()
    assert gw.proc is not None
    workers = _children(gw.proc.pid)
    assert len(workers) == 2  # two full gateway processes sharing the port
    async with aiohttp.ClientSession() as session:
        ok, failures = await load_loop(session, gw.url + "/echo/x", 0.5, max_requests=200)
    assert failures == [] and ok > 20
    gw.signal(signal.SIGTERM)
    signalled = time.monotonic()
    while gw.proc.poll() is None and time.monotonic() - signalled < 8:
        await asyncio.sleep(0.02)
    assert gw.proc.returncode == 0
    assert time.monotonic() - signalled < 5.0
    for pid in workers:
        assert not Path(f"/proc/{pid}").exists() or "Z" in Path(f"/proc/{pid}/stat").read_text().split()[2]


async def test_sigterm_exits_within_grace_even_when_a_request_outlasts_it(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    stuck = await make_upstream()
    stuck.set_mode("hang")
    ports = process_ports()
    text = gateway_yaml(issuer.url, [upstream_yaml("stuck", stuck.url, read="30s")], public_routes("stuck"),
                        **ports)
    gw = start_process(gateway_processes, tmp_path, text.replace("shutdown_grace: 5s", "shutdown_grace: 1s"),
                       ports)
    await gw.wait_ready()
    assert gw.proc is not None
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(gw.url + "/stuck/x"))
        await eventually(lambda: asyncio.sleep(0, stuck.hits == 1), timeout=3)
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        while gw.proc.poll() is None and time.monotonic() - signalled < 5:
            await asyncio.sleep(0.02)
        exited = time.monotonic() - signalled
        with pytest.raises(aiohttp.ClientError):  # cut off at the end of the grace period
            async with await request:
                pass
    assert gw.proc.returncode == 0
    assert 0.9 <= exited < 1.6


async def test_the_websocket_watcher_keeps_a_session_through_a_backend_failure() -> None:
    """watch() alone, with a fake store and clock: a failed backend (503 under deny) is no verdict, an
    unchanged stamp is not asked again, a revocation ends the session; the clock ends it at exp + leeway."""
    from types import SimpleNamespace

    from gateway.lifetime import watch
    from gateway.model import Principal

    class Store:
        """revoked(): True (revoked), False (passes) or None (the backend failed)."""

        def __init__(self) -> None:
            self.answers: list[bool | None] = [None, False, True]
            self.asked = 0
            self.current: int | None = 1

        def stamp(self) -> int | None:
            return self.current

        async def revoked(self, p: Principal) -> bool | None:
            self.asked += 1
            return self.answers.pop(0)

    store = Store()
    store.answers.insert(0, False)
    p = Principal(issuer="dev", iss="x", subject="a", scopes=frozenset(), roles=(), tenant=None, session=None,
                  jti="j", iat=0, exp=None, aud=())
    gw = SimpleNamespace(revocations=store, config=SimpleNamespace(issuers=[SimpleNamespace(name="dev", leeway=5.0)]))
    task = asyncio.ensure_future(watch(gw, p, every=0.01))  # type: ignore[arg-type]
    async def asked(n: int) -> None:
        """Wait (bounded) for the n-th ask, then a few more looks: no ask beyond it."""
        for _ in range(200):
            if store.asked >= n:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)
        assert not task.done() and store.asked == n

    # The first look asks (a revocation made while the session was set up is in the stamp already);
    # then the stamp it saw, unchanged: nothing to ask.
    await asked(1)
    store.current = 2  # the view changed: asked; the backend fails; asked again next look; passes
    await asked(3)
    store.current = None  # the view is not live: asked at every look; this time it is revoked
    assert await asyncio.wait_for(task, 1) == "revoked" and store.asked == 4

    now = [100.0]
    expiring = Principal(issuer="dev", iss="x", subject="a", scopes=frozenset(), roles=(), tenant=None,
                         session=None, jti=None, iat=0, exp=104, aud=())
    store.answers, store.current = [False] * 100, 7
    task = asyncio.ensure_future(watch(gw, expiring, clock=lambda: now[0], every=0.01))  # type: ignore[arg-type]
    now[0] = 108.9  # past exp, within the leeway: still valid
    await asyncio.sleep(0.05)
    assert not task.done()
    now[0] = 109.0
    assert await asyncio.wait_for(task, 1) == "expired"

    # A reload that lowers the issuer's leeway shortens the sessions it admitted.
    strict = SimpleNamespace(revocations=store,
                             config=SimpleNamespace(issuers=[SimpleNamespace(name="dev", leeway=0.0)]))
    serving: list[Any] = [gw]
    now[0] = 105.0  # past exp, within the old leeway
    task = asyncio.ensure_future(watch(gw, expiring, clock=lambda: now[0], every=0.01,  # type: ignore[arg-type]
                                       current=lambda: serving[0]))
    await asyncio.sleep(0.05)
    assert not task.done()
    serving[0] = strict
    assert await asyncio.wait_for(task, 1) == "expired"

    # A reload that replaced the store: the session is watched by the current gateway's store.
    revoking = Store()
    revoking.answers = [True]
    store.answers, store.current = [False] * 100, 7
    reloaded = SimpleNamespace(revocations=revoking, config=gw.config)
    now_gw: list[Any] = [gw]
    task = asyncio.ensure_future(watch(gw, p, every=0.01, current=lambda: now_gw[0]))  # type: ignore[arg-type]
    await asyncio.sleep(0.05)
    assert not task.done()
    now_gw[0] = reloaded  # another store: asked at once, whatever its stamp
    assert await asyncio.wait_for(task, 1) == "revoked" and revoking.asked == 1
