"""Review as the operator who installs and runs the gateway: admin API bodies, signals, reload, CLI input."""

from __future__ import annotations

import asyncio
import contextlib
import json
import random
import signal
import ssl
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import redis.asyncio as aioredis
from cryptography.hazmat.primitives import serialization

from gateway import routes
from gateway.config import load_text
from gateway.config_types import RouteConfig
from gateway.devissuer import DevIssuer
from tests.support.gateway import GatewayProcess, RunningGateway, config_text, eventually, free_port
from tests.support.pki import make_pki
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream
from tests.test_cli import gateway as cli
from tests.test_resilience_e2e import (
    MakeUpstream,
    process_ports,
    public_routes,
    start_process,
    upstream_yaml,
)
from tests.test_resilience_e2e import (
    gateway_yaml as full_yaml,
)
from tests.test_review_ops import admin_post, gateway_yaml
from tests.test_revocation_e2e import ADMIN, PREFIX


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
             gateway_factory: Any) -> AsyncIterator[RunningGateway]:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)) as running:
        yield running


async def test_admin_revocation_nested_deeper_than_json_decodes_is_a_400(gw: RunningGateway,
                                                                         issuer: DevIssuer) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting: it was aiohttp's text/plain 500.
    status, body = await admin_post(gw, issuer.token(ADMIN), b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"] == "invalid_request", body


async def test_a_published_message_nested_too_deeply_is_unreadable_not_a_crash_of_the_sync(
        issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # It raised RecursionError out of the subscription loop: a traceback, a reconnect, the view not live.
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)):
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.publish(f"{PREFIX}events", b"[" * 100_000 + b"]" * 100_000)
            await asyncio.sleep(0.5)
        finally:
            await client.aclose()
    assert "unreadable revocation message" in caplog.text
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text


# -- signals: SIGHUP's default action ends the process; it must never reach it ---------------------------------

async def _exit_code(gw: GatewayProcess, within: float) -> int | None:
    assert gw.proc is not None
    deadline = time.monotonic() + within
    while gw.proc.poll() is None and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    return gw.proc.poll()


@pytest.mark.parametrize("workers", [(), ("--workers", "2")])
async def test_a_sighup_while_draining_is_ignored_and_the_requests_in_flight_complete(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any,
        workers: tuple[str, ...]) -> None:
    # It ended the process (exit 129) mid-drain: the requests in flight were cut, their log lines lost.
    slow = await make_upstream()
    slow.set_mode("slow", delay=1.5)
    ports = process_ports()
    text = full_yaml(issuer.url, [upstream_yaml("slow", slow.url)], public_routes("slow"), **ports)
    gw = start_process(gateway_processes, tmp_path, text, ports, args=workers)
    await gw.wait_ready()
    async with aiohttp.ClientSession() as session:
        requests = [asyncio.ensure_future(session.get(gw.url + f"/slow/{i}")) for i in range(2)]
        await eventually(lambda: asyncio.sleep(0, slow.hits == 2), timeout=3)
        gw.signal(signal.SIGTERM)
        await asyncio.sleep(0.3)
        gw.signal(signal.SIGHUP)
        for request in requests:
            async with await request as r:
                assert r.status == 200
    assert await _exit_code(gw, 5) == 0
    assert "SIGHUP ignored" in gw.err.read_text()
    assert gw.out.read_text().count('"status":200') == 2, gw.out.read_text()


async def test_a_second_sigterm_while_draining_cuts_at_once_and_exits_0(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    # It ended the process by the signal's default action (exit 143), the access log's batch unwritten.
    stuck = await make_upstream()
    stuck.set_mode("hang")
    ports = process_ports()
    text = full_yaml(issuer.url, [upstream_yaml("stuck", stuck.url, read="30s")],
                      public_routes("stuck"), **ports).replace("shutdown_grace: 5s", "shutdown_grace: 20s")
    gw = start_process(gateway_processes, tmp_path, text, ports)
    await gw.wait_ready()
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(gw.url + "/stuck/x"))
        await eventually(lambda: asyncio.sleep(0, stuck.hits == 1), timeout=3)
        gw.signal(signal.SIGTERM)
        await asyncio.sleep(0.8)  # later than app.SAME_STOP: a second stop, not the first one twice
        gw.signal(signal.SIGTERM)
        signalled = time.monotonic()
        assert await _exit_code(gw, 5) == 0
        assert time.monotonic() - signalled < 1.5  # not the 20 s grace
        with pytest.raises(aiohttp.ClientError):
            async with await request:
                pass
    assert "SIGTERM while draining" in gw.err.read_text()


async def test_the_same_stop_signalled_twice_at_once_still_drains(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    # systemd's default KillMode signals every worker directly and the supervisor passes the signal on:
    # two SIGTERMs a few milliseconds apart, taken for "cut the drain short", cut every request in flight.
    slow = await make_upstream()
    slow.set_mode("slow", delay=1.5)
    ports = process_ports()
    gw = start_process(gateway_processes, tmp_path,
                       full_yaml(issuer.url, [upstream_yaml("slow", slow.url)], public_routes("slow"), **ports), ports)
    await gw.wait_ready()
    async with aiohttp.ClientSession() as session:
        request = asyncio.ensure_future(session.get(gw.url + "/slow/x"))
        await eventually(lambda: asyncio.sleep(0, slow.hits == 1), timeout=3)
        gw.signal(signal.SIGTERM)
        await asyncio.sleep(0.05)
        gw.signal(signal.SIGTERM)
        async with await request as r:
            assert r.status == 200
    assert await _exit_code(gw, 10) == 0
    err = gw.err.read_text()
    assert "the same stop, drain goes on" in err and "while draining" not in err


async def test_a_sighup_while_starting_reloads_once_started(
        issuer: DevIssuer, echo_upstream: EchoUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    # A start waits for Redis (here: nothing listens); a SIGHUP then ended the process (exit 129).
    ports = process_ports()
    revocation = f"revocation: {{backend: redis, redis_url: 'redis://127.0.0.1:{free_port()}/0'}}"
    text = full_yaml(issuer.url, [upstream_yaml("echo", echo_upstream.url)], public_routes("echo"),
                        revocation=revocation, **ports)
    gw = start_process(gateway_processes, tmp_path, text, ports)
    assert gw.proc is not None

    async def starting() -> bool:
        return "revocation backend" in gw.err.read_text()
    await eventually(starting, timeout=10)
    assert "gateway listening" not in gw.err.read_text()
    gw.signal(signal.SIGHUP)

    async def reloaded() -> bool:
        assert gw.proc is not None and gw.proc.poll() is None, gw.err.read_text()
        return "configuration reloaded" in gw.err.read_text()
    await eventually(reloaded, timeout=10)
    assert gw.stop() == 0


# -- reload: what it applies, and what it says it cannot ----------------------------------------------------

TLS_ROUTES = """\
  - name: hello
    match: {path: /hello}
    upstream: svc
    auth: {required: false}
"""


def _tls_config(issuer: DevIssuer, upstream: EchoUpstream, cert: str, key: str) -> str:
    return config_text(issuer.url, {"svc": [upstream.url]}, TLS_ROUTES).replace(
        "  shutdown_grace: 5s", f"  shutdown_grace: 5s\n  tls: {{cert_file: {cert}, key_file: {key}}}")


async def _handshake(port: int, ca: str) -> bool:
    ctx = ssl.create_default_context(cafile=ca)
    try:
        _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname="127.0.0.1")
    except ssl.SSLError:
        return False
    writer.close()
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        await writer.wait_closed()
    return True


async def test_a_reload_serves_the_renewed_certificate_and_refuses_one_that_does_not_load(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # The listener's SSLContext was built once at start: a reload after a certificate renewal said
    # "configuration reloaded" and went on serving the old certificate until it expired.
    (tmp_path / "a").mkdir()
    (tmp_path / "b").mkdir()
    first, second = make_pki(tmp_path / "a"), make_pki(tmp_path / "b")
    async with gateway_factory(_tls_config(issuer, echo_upstream, first["server"], first["server"])) as gw:
        port = gw.app.public_port
        assert await _handshake(port, first["ca"]) and not await _handshake(port, second["ca"])
        path = tmp_path / "next.yaml"
        path.write_text(_tls_config(issuer, echo_upstream, second["server"], second["server"]))
        assert await gw.app.reload(str(path)) is True
        assert await _handshake(port, second["ca"]) and not await _handshake(port, first["ca"])
        # A file that is no certificate: refused as a whole, the certificate in use stays.
        broken = tmp_path / "broken.pem"
        broken.write_text("not a certificate")
        path.write_text(_tls_config(issuer, echo_upstream, str(broken), str(broken)))
        assert await gw.app.reload(str(path)) is False
        assert f"reload refused: {path}: server.tls: cannot load a certificate and its key from {broken}" in caplog.text
        assert await _handshake(port, second["ca"])


def _listen_on(text: str, port: int) -> str:
    """A config_text whose server.listen (127.0.0.1:0) names `port` instead."""
    assert "  listen: 127.0.0.1:0" in text
    return text.replace("  listen: 127.0.0.1:0", f"  listen: 127.0.0.1:{port}", 1)


async def test_a_reload_that_moves_a_listener_says_it_takes_a_restart(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # It logged "configuration reloaded" and went on listening where it was, saying nothing.
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, TLS_ROUTES)
    async with gateway_factory(text) as gw:
        moved = free_port()
        path = tmp_path / "next.yaml"
        path.write_text(_listen_on(text, moved)
                        .replace("  workers: 1\n", "") .replace("server:\n", "server:\n  workers: 2\n", 1))
        assert await gw.app.reload(str(path)) is True
        assert (f"server.listen: changed from 127.0.0.1:0 to 127.0.0.1:{moved}, which takes a restart; "
                "still 127.0.0.1:0") in caplog.text
        assert "server.workers: changed from 1 to 2, which takes a restart; 1 running" in caplog.text
        assert "admin.listen" not in caplog.text
        assert (await gw.request("GET", "/hello"))[0] == 200


async def test_a_reload_asking_for_as_many_workers_as_run_says_nothing_of_a_restart(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # Started from a file saying 2 while 1 runs (as `--workers` overriding the file does): a reload to 1
    # said "changed from 2 to 1, which takes a restart; 1 running".
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, TLS_ROUTES).replace(
        "server:\n", "server:\n  workers: 2\n", 1)
    async with gateway_factory(text) as gw:
        path = tmp_path / "next.yaml"
        moved = free_port()
        path.write_text(_listen_on(text.replace("  workers: 2\n", "  workers: 1\n", 1), moved))
        assert await gw.app.reload(str(path)) is True
        assert "server.listen: changed from 127.0.0.1:0" in caplog.text  # the warnings are heard here
        assert "server.workers" not in caplog.text


async def test_a_reload_compares_the_listeners_with_where_they_are_bound_not_with_the_last_file(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # A reload that moved server.listen (refused: "still A"), then one that put A back, logged "changed from
    # B to A, which takes a restart; still B", though the listener had never left A; a third reload with B
    # again said nothing, though B was still not where it listened.
    text = config_text(issuer.url, {"svc": [echo_upstream.url]}, TLS_ROUTES)
    async with gateway_factory(text) as gw:
        moved = free_port()
        path = tmp_path / "next.yaml"
        path.write_text(_listen_on(text, moved))
        assert await gw.app.reload(str(path)) is True
        path.write_text(text)
        caplog.clear()
        assert await gw.app.reload(str(path)) is True
        assert "takes a restart" not in caplog.text
        path.write_text(_listen_on(text, moved))
        assert await gw.app.reload(str(path)) is True
        assert (f"server.listen: changed from 127.0.0.1:0 to 127.0.0.1:{moved}, which takes a restart; "
                "still 127.0.0.1:0") in caplog.text
        assert (await gw.request("GET", "/hello"))[0] == 200


# -- gateway revoke and the admin API refuse the same values ---------------------------------------------------

@pytest.mark.parametrize("value", ["a\nb", "a\x01b", "a\x7fb", "x" * 1025])
async def test_the_cli_and_the_admin_api_refuse_the_same_values(
        gw: RunningGateway, issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
        tmp_path: Path, value: str) -> None:
    # The admin API refused CR, LF, NUL and more than 1024 characters; `gateway revoke` wrote all of them
    # (and the API let the other control characters through), though README says both refuse them.
    status, body = await admin_post(gw, issuer.token(ADMIN), json.dumps({"type": "jti", "value": value}).encode())
    assert status == 400 and body["error"] == "invalid_request", body
    path = tmp_path / "cli.yaml"
    path.write_text(gateway_yaml(issuer, echo_upstream, redis_server.url))
    result = cli("revoke", "jti", value, "-c", str(path))
    assert result.returncode == 2 and result.stdout == "", (result.stdout, result.stderr)
    assert result.stderr.startswith("gateway revoke: the revoked value ") and result.stderr.count("\n") == 1
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.keys(f"{PREFIX}jti:*") == []
    finally:
        await client.aclose()


def test_check_refuses_a_key_store_that_run_could_not_create(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                               tmp_path: Path) -> None:
    # `check` said ok; `run` then stopped at start: "key store ...: cannot open: Not a directory".
    (tmp_path / "afile").write_text("not a directory")
    store = tmp_path / "afile" / "keys" / "signing-keys.json"
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(issuer.url, {"svc": [echo_upstream.url]}, TLS_ROUTES,
                                extra=f"internal_token: {{key_store: {store}}}\n"))
    result = cli("check", "-c", str(path))
    assert result.returncode == 2, result.stdout
    assert result.stderr.startswith(f"{path}:") and result.stderr.count("\n") == 1, result.stderr
    assert (f"internal_token.key_store: key store {store}: cannot be created: {tmp_path / 'afile'} is not a "
            "directory") in result.stderr
    # A store that does not exist yet under a directory that does is fine: `run` creates it.
    path.write_text(config_text(issuer.url, {"svc": [echo_upstream.url]}, TLS_ROUTES,
                                extra=f"internal_token: {{key_store: {tmp_path / 'new' / 'keys.json'}}}\n"))
    assert cli("check", "-c", str(path)).returncode == 0
    assert not (tmp_path / "new").exists()  # check writes nothing


async def test_an_unreachable_redis_is_named_with_its_cause_by_revoke_and_by_the_reconnect_log(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # Both said only "unreachable" / "ConnectionError": not which address, nor refused, a password, a DB index.
    port = free_port()
    text = gateway_yaml(issuer, echo_upstream, f"redis://127.0.0.1:{port}/0")
    path = tmp_path / "cli.yaml"
    path.write_text(text)
    result = cli("revoke", "jti", "x", "-c", str(path))
    assert result.returncode == 1 and result.stderr.count("\n") == 1, result.stderr
    assert result.stderr.startswith("gateway: error: the revocation backend is unreachable")
    assert f"connecting to 127.0.0.1:{port}" in result.stderr and "refused" in result.stderr
    async with gateway_factory(text):
        pass
    assert f"revocation backend: ConnectionError (Error 111 connecting to 127.0.0.1:{port}." in caplog.text


# -- a config of thousands of routes loads in seconds, not minutes ----------------------------------------------

def _every_pair(table: list[RouteConfig]) -> list[tuple[int, int]]:
    """find_shadowed as it was, every earlier route against every later one: the reference."""
    compiled = []
    for i, r in enumerate(table):
        try:
            compiled.append(routes._compile(i, r))
        except (ValueError, routes.BadPath):
            compiled.append(None)
    out = []
    for j, later in enumerate(compiled):
        if later is None:
            continue
        for earlier in compiled[:j]:
            if earlier is None or (earlier.host is not None and earlier.host != later.host):
                continue
            if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
                continue
            if routes._covers(earlier, later):
                out.append((j, earlier.index))
                break
    return out


def test_find_shadowed_by_index_agrees_with_every_pair() -> None:
    rng = random.Random(7)
    segments = ["a", "b", "{x}", "{y}", ""]
    for _ in range(400):
        table = []
        for i in range(rng.randint(1, 14)):
            depth = rng.randint(0, 3)
            path = "/" + "/".join(rng.choice(segments[:4] if k < depth - 1 else segments) for k in range(depth))
            methods = rng.choice([None, ("GET",), ("GET", "POST"), ("POST",)])
            host = rng.choice([None, None, "h.example"])
            if rng.random() < 0.4:
                prefix = path.replace("{x}", "x").replace("{y}", "y")
                table.append(RouteConfig(name=f"r{i}", upstream="u", path_prefix=prefix or "/", methods=methods,
                                         host=host))
            else:
                table.append(RouteConfig(name=f"r{i}", upstream="u", path=path, methods=methods, host=host))
        assert routes.find_shadowed(table) == _every_pair(table), table


def test_a_config_of_six_thousand_routes_loads_in_seconds(tmp_path: Path) -> None:
    # Every pair of routes was compared (shadowing, duplicate names) and every route's first segment
    # scanned for each bucket: 3,000 routes took 40 s and more to check, start or reload.
    head = ("issuers:\n  - name: a\n    issuer: http://127.0.0.1:1/x\n    audiences: [x]\n"
            "upstreams:\n  u: {targets: ['http://127.0.0.1:1']}\nroutes:\n")
    body = "".join(f"  - {{name: t{i}, match: {{path: '/api/svc{i}/items/{{id}}'}}, upstream: u}}\n"
                   f"  - {{name: p{i}, match: {{path_prefix: /pre{i}/x/}}, upstream: u}}\n" for i in range(3000))
    started = time.process_time()
    config = load_text(head + body, "big.yaml")
    routes.RouteTable(config.routes)
    spent = time.process_time() - started
    assert len(config.routes) == 6000
    assert spent < 15, spent  # the YAML parser itself takes most of it; before: minutes


@pytest.mark.parametrize(("text", "message"), [
    ("- a\n- b\n", "(file): expected a mapping of server, admin, issuers, revocation, internal_token, upstreams, "
                   "routes; got a list"),
    ("just a string\n", "(file): expected a mapping of server, admin, issuers, revocation, internal_token, "
                        "upstreams, routes; got 'just a string'"),
    ("~\n", "(file): empty configuration; issuers, upstreams and routes are required"),
])
def test_a_file_that_is_no_mapping_is_one_problem_named_as_the_files(tmp_path: Path, text: str,
                                                                     message: str) -> None:
    # It was "FILE:1: : expected a mapping" (an empty key) and then "issuers: required" and two more.
    path = tmp_path / "gw.yaml"
    path.write_text(text)
    result = cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr == f"{path}:1: {message}\n"


# -- revocation.redis_url: its password stays out of messages; options redis-py refuses are refused at load ----

def test_a_redis_url_refused_by_check_does_not_print_its_password(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                                  tmp_path: Path) -> None:
    # `${REDIS_URL}` carries the password (SPEC 3: substitution is for secrets); the message printed it.
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml(issuer, echo_upstream, "${REDIS_URL}"))
    result = cli("check", "-c", str(path), env={"REDIS_URL": "redis://app:s3cr3t-pw@127.0.0.1:99999/0"})
    assert result.returncode == 2
    assert "s3cr3t-pw" not in result.stderr and "redis://app:***@127.0.0.1:99999/0" in result.stderr


@pytest.mark.parametrize("query", ["?foo=1", "?socket_timeout=abc"])
async def test_a_redis_url_option_redis_py_refuses_is_refused_by_check_run_revoke_and_reload(
        issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any,
        tmp_path: Path, query: str, caplog: pytest.LogCaptureFixture) -> None:
    # `check` said ok; `run` started and logged a traceback every second, never ready; `revoke` exited 1.
    path = tmp_path / "gw.yaml"
    path.write_text(gateway_yaml(issuer, echo_upstream, redis_server.url + query))
    for command in (("check",), ("run",), ("revoke", "jti", "x")):
        result = cli(*command, "-c", str(path))
        assert result.returncode == 2, (command, result.stderr)
        assert result.stderr.startswith(f"{path}:") and "revocation.redis_url: redis-py cannot use this URL" \
            in result.stderr and result.stderr.count("\n") == 1, (command, result.stderr)
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)) as gw:
        assert await gw.app.reload(str(path)) is False
        assert "reload refused: revocation.redis_url: redis-py cannot use this URL" in caplog.text
        assert (await gw.request("GET", "/api/orders/1"))[0] == 401  # the running config serves on


def test_a_target_with_credentials_is_refused_at_load(issuer: DevIssuer, tmp_path: Path) -> None:
    # It loaded: the credentials were never sent upstream, and the password went out as the target label of
    # gateway_circuit_state on /metrics and as "target" in every access-log line.
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(issuer.url, {"svc": ["'http://svc:s3cr3t@127.0.0.1:8081'"]}, TLS_ROUTES))
    result = cli("check", "-c", str(path))
    assert result.returncode == 2
    assert "s3cr3t" not in result.stderr
    assert result.stderr == (f"{path}:17: upstreams.svc.targets[0]: a target cannot carry credentials (they are "
                             "not sent, and the target URL is a metric label and a log field); got "
                             "'http://svc:***@127.0.0.1:8081'\n")


def _encrypted_copy(pem: str, directory: Path) -> tuple[str, str]:
    """The certificate of a make_pki PEM, and its key encrypted with a passphrase, as two files."""
    data = Path(pem).read_bytes()
    key = serialization.load_pem_private_key(data, password=None)
    cert = data[data.index(b"-----BEGIN CERTIFICATE-----"):data.index(b"-----END CERTIFICATE-----") + 25] + b"\n"
    (directory / "enc.crt").write_bytes(cert)
    (directory / "enc.key").write_bytes(key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8,
                                                         serialization.BestAvailableEncryption(b"passphrase")))
    return str(directory / "enc.crt"), str(directory / "enc.key")


async def test_an_encrypted_tls_key_is_refused_in_one_line_never_prompted_for(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # OpenSSL prompted "Enter PEM pass phrase:" on the terminal (check and run waited there); without one the
    # message was "Invalid argument". A reload, which now loads the certificate again, must not block either.
    pki = make_pki(tmp_path)
    cert, key = _encrypted_copy(pki["server"], tmp_path)
    path = tmp_path / "enc.yaml"
    path.write_text(_tls_config(issuer, echo_upstream, cert, key))
    result = cli("check", "-c", str(path))
    assert result.returncode == 2
    assert result.stderr.endswith("the private key is encrypted; give a key file without a passphrase (none can "
                                  "be asked for)\n") and result.stderr.count("\n") == 1, result.stderr
    async with gateway_factory(_tls_config(issuer, echo_upstream, pki["server"], pki["server"])) as gw:
        assert await gw.app.reload(str(path)) is False
        assert "the private key is encrypted" in caplog.text
        assert await _handshake(gw.app.public_port, pki["ca"])


async def test_exp_on_a_subject_or_session_revocation_is_refused_not_ignored(
        gw: RunningGateway, issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
        tmp_path: Path) -> None:
    # Both writers took an exp for a subject or session revocation and dropped it without a word.
    exp = int(time.time()) + 600
    body = {"type": "subject", "value": "alice", "issuer": "dev", "exp": exp}
    status, answer = await admin_post(gw, issuer.token(ADMIN), json.dumps(body).encode())
    assert status == 400 and "exp applies to jti revocations only" in answer["error_description"], answer
    path = tmp_path / "cli.yaml"
    path.write_text(gateway_yaml(issuer, echo_upstream, redis_server.url))
    result = cli("revoke", "session", "s-1", "--issuer", "dev", "--exp", str(exp), "-c", str(path))
    assert result.returncode == 2 and "exp applies to jti revocations only" in result.stderr, result.stderr
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.keys(f"{PREFIX}*") == []
    finally:
        await client.aclose()


async def test_an_admin_body_naming_a_field_twice_is_refused(gw: RunningGateway, issuer: DevIssuer,
                                                              redis_server: RedisServer) -> None:
    # The last "type" won: a body a reader takes for a jti revocation revoked every token of the subject.
    raw = b'{"type": "jti", "value": "alice", "issuer": "dev", "type": "subject"}'
    status, answer = await admin_post(gw, issuer.token(ADMIN), raw)
    assert status == 400 and answer["error_description"] == "field 'type' appears twice", answer
    client = aioredis.Redis.from_url(redis_server.url)
    try:
        assert await client.keys(f"{PREFIX}*") == []
    finally:
        await client.aclose()
