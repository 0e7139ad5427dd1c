"""Review of the day's fixes: holes found in them, each with the case that showed it, against real parts."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
import json
import os
import signal
import ssl
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from gateway.devissuer import DevIssuer
from gateway.model import MAX_REVOCABLE
from tests.support.gateway import ROOT, GatewayProcess, config_text, eventually
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream
from tests.test_cli import gateway as cli
from tests.test_resilience_e2e import (
    WS_ROUTE,
    MakeUpstream,
    WsUpstream,
    process_ports,
    public_routes,
    start_process,
    upstream_yaml,
)
from tests.test_resilience_e2e import gateway_yaml as full_yaml
from tests.test_review_operator import _exit_code, _tls_config
from tests.test_review_ops import admin_post, gateway_yaml
from tests.test_revocation_e2e import ADMIN, PATH, USER

PUBLIC = """\
  - name: hello
    match: {path: /hello}
    upstream: svc
    auth: {required: false}
"""

# -- --workers N: a signal to the supervisor's whole process group --------------------------------------------


def _children(pid: int) -> list[int]:
    with open(f"/proc/{pid}/task/{pid}/children") as f:
        return [int(p) for p in f.read().split()]


@pytest.mark.skipif(sys.platform != "linux", reason="reads /proc")
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
async def test_a_stop_signal_to_the_whole_process_group_drains_each_worker_once(
        issuer: DevIssuer, make_upstream: MakeUpstream, tmp_path: Path, sig: signal.Signals) -> None:
    # Ctrl-C in a terminal (or `kill -- -PGID`) signals every process of the group: each worker got the
    # signal directly and again from the supervisor, took the second for "cut the drain short" and cut
    # the requests in flight (exit 0, but every client's answer lost).
    slow = await make_upstream()
    slow.set_mode("slow", delay=1.5)
    ports = process_ports()
    path = tmp_path / "gateway.yaml"
    path.write_text(full_yaml(issuer.url, [upstream_yaml("slow", slow.url)], public_routes("slow"), **ports))
    port, admin_port = (int(ports[k].rsplit(":", 1)[1]) for k in ("listen", "admin_listen"))
    gw = GatewayProcess(path, port=port, admin_port=admin_port)
    with gw.out.open("wb") as out, gw.err.open("wb") as err:
        # A session (and so a process group) of its own: the group signal must not reach pytest.
        gw.proc = subprocess.Popen(  # noqa: S603 - our argv
            [sys.executable, "-m", "gateway", "run", "-c", str(path), "--workers", "2"], stdout=out, stderr=err,
            cwd=ROOT, start_new_session=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    try:
        await gw.wait_ready()
        workers = _children(gw.proc.pid)
        assert len(workers) == 2
        assert all(os.getpgid(w) != os.getpgid(gw.proc.pid) for w in workers)
        async with aiohttp.ClientSession() as session:
            requests = [asyncio.ensure_future(session.get(gw.url + f"/slow/{i}")) for i in range(4)]
            await eventually(lambda: asyncio.sleep(0, slow.hits == 4), timeout=3)
            os.killpg(gw.proc.pid, sig)
            for request in requests:
                async with await request as r:
                    assert r.status == 200
        assert await asyncio.to_thread(gw.proc.wait, 10) == 0
        assert "while draining" not in gw.err.read_text()
    finally:
        if gw.proc.poll() is None:
            os.killpg(gw.proc.pid, signal.SIGKILL)
            gw.proc.wait()



@pytest.fixture
async def ws_target() -> AsyncIterator[WsUpstream]:
    server = WsUpstream()
    await server.start()
    yield server
    assert server.runner is not None
    await server.runner.cleanup()


async def test_a_second_sigterm_cuts_a_drain_that_waits_on_a_websocket_session(
        issuer: DevIssuer, ws_target: WsUpstream, tmp_path: Path, gateway_processes: Any) -> None:
    # The second signal was logged ("cutting the requests still in flight now") but the drain went on
    # waiting for the session, on aiohttp's server, to the end of shutdown_grace.
    ports = process_ports()
    text = full_yaml(issuer.url, [upstream_yaml("ws", ws_target.url)], WS_ROUTE, **ports).replace(
        "shutdown_grace: 5s", "shutdown_grace: 20s")
    gw = start_process(gateway_processes, tmp_path, text, ports)
    await gw.wait_ready()
    auth = {"Authorization": f"Bearer {issuer.token({'sub': 'alice'})}"}
    async with aiohttp.ClientSession() as session:
        async with session.ws_connect(gw.url.replace("http://", "ws://") + "/ws/chat", headers=auth) as ws:
            await ws.send_str("hello")
            assert await ws.receive_str(timeout=2) == "alice:hello"
            gw.signal(signal.SIGTERM)
            await asyncio.sleep(0.8)  # later than app.SAME_STOP: a second stop, not the first one twice
            assert await _exit_code(gw, 0) is None  # the first one drains: the session may go on
            gw.signal(signal.SIGTERM)
            signalled = time.monotonic()
            assert await _exit_code(gw, 10) == 0
            assert time.monotonic() - signalled < 2  # not the 20 s grace
    assert "SIGTERM while draining" in gw.err.read_text()


# -- server.tls reload: the renewed certificate alone is served -----------------------------------------------

def _self_signed(path: Path, key: rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey, cn: str) -> str:
    now = datetime.datetime.now(datetime.UTC)
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, cn)])
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name).public_key(key.public_key())
            .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
            .not_valid_after(now + datetime.timedelta(hours=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]),
                           critical=False)
            .sign(key, hashes.SHA256()))
    path.write_bytes(cert.public_bytes(serialization.Encoding.PEM) + key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return str(path)


async def _served(port: int, *, rsa_only: bool = False, server_name: str | None = None) -> str:
    """The common name of the certificate the listener presents (no verification: which one, is the point)."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE
    if rsa_only:  # a client that can check RSA signatures only (TLS 1.2, an ECDHE-RSA suite)
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
        ctx.set_ciphers("ECDHE-RSA-AES128-GCM-SHA256")
    _, writer = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=server_name)
    try:
        der = writer.get_extra_info("ssl_object").getpeercert(binary_form=True)
        return x509.load_der_x509_certificate(der).subject.rfc4514_string()
    finally:
        writer.close()


async def test_a_reload_to_a_certificate_of_another_key_type_stops_serving_the_old_one(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path) -> None:
    # The reload loaded the new files into the listener's SSLContext, which keeps one certificate per key
    # type: after an RSA certificate was replaced by an ECDSA one, a client offering RSA only was still
    # served the old certificate, with the old key (one replaced after a compromise, or expired).
    old = _self_signed(tmp_path / "old.pem", rsa.generate_private_key(65537, 2048), "old-rsa")
    new = _self_signed(tmp_path / "new.pem", ec.generate_private_key(ec.SECP256R1()), "new-ec")
    async with gateway_factory(_tls_config(issuer, echo_upstream, old, old)) as gw:
        port = gw.app.public_port
        assert await _served(port, rsa_only=True) == "CN=old-rsa"
        path = tmp_path / "next.yaml"
        path.write_text(_tls_config(issuer, echo_upstream, new, new))
        assert await gw.app.reload(str(path)) is True
        assert await _served(port) == "CN=new-ec"
        assert await _served(port, server_name="localhost") == "CN=new-ec"  # with SNI as without
        with pytest.raises((ssl.SSLError, ConnectionError)):  # nothing it could check: refused, never the old one
            await _served(port, rsa_only=True)
        # Back to RSA: every client gets the newest certificate, whichever types it offers.
        newer = _self_signed(tmp_path / "newer.pem", rsa.generate_private_key(65537, 2048), "newer-rsa")
        path.write_text(_tls_config(issuer, echo_upstream, newer, newer))
        assert await gw.app.reload(str(path)) is True
        assert await _served(port) == "CN=newer-rsa"
        assert await _served(port, rsa_only=True) == "CN=newer-rsa"


# -- a token that no revocation could name ---------------------------------------------------------------------

@pytest.mark.parametrize("claim", ["jti", "sub", "sid"])
async def test_a_token_whose_revocable_value_is_too_long_to_revoke_is_refused(
        issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any,
        tmp_path: Path, claim: str) -> None:
    # `gateway revoke` came to refuse values over 1,024 characters, as the admin API did: a token with a
    # longer jti, sub or sid still verified, and then nothing could revoke it (SPEC 6).
    kind = {"jti": "jti", "sub": "subject", "sid": "session"}[claim]
    path = tmp_path / "cli.yaml"
    path.write_text(gateway_yaml(issuer, echo_upstream, redis_server.url))
    async with gateway_factory(path.read_text()) as gw:
        longest = issuer.token({**USER, claim: "v" * MAX_REVOCABLE})
        assert (await gw.request("GET", PATH, token=longest))[0] == 200
        result = cli("revoke", kind, "v" * MAX_REVOCABLE, "-c", str(path))
        assert result.returncode == 0, result.stderr

        async def revoked() -> bool:
            return (await gw.request("GET", PATH, token=longest))[0] == 401
        await eventually(revoked, timeout=2)
        too_long = issuer.token({**USER, claim: "w" * (MAX_REVOCABLE + 1)})
        status, headers, body = await gw.request("GET", PATH, token=too_long)
        assert (status, body["error"]) == (401, "invalid_token")
        assert 'error="invalid_token"' in headers["WWW-Authenticate"]
        status, body = await admin_post(gw, issuer.token(ADMIN),
                                        json.dumps({"type": kind, "value": "w" * (MAX_REVOCABLE + 1)}).encode())
        assert status == 400  # refused here too: the two rules agree


# -- a refused URL's password is never echoed -----------------------------------------------------------------

@pytest.mark.parametrize("password", ["Zm9v/YmFy", "Zm9v?YmFy", "Zm9v#YmFy", "Zm9v/Ym@Fy"])
@pytest.mark.parametrize("where", ["target", "redis_url"])
def test_a_refused_url_whose_password_holds_a_delimiter_is_echoed_without_it(
        issuer: DevIssuer, tmp_path: Path, password: str, where: str) -> None:
    # A base64 secret pasted into ${REDIS_URL} as it is: its `/` ends the authority early, the URL is
    # refused (a port that is no number), and the message echoed the password the redaction missed.
    target, redis_url = "http://127.0.0.1:8081", "redis://127.0.0.1:6390/0"
    if where == "target":
        target = f"http://svc:{password}@127.0.0.1:8081"
    else:
        redis_url = f"redis://:{password}@127.0.0.1:6390/0"
    revocation = f"revocation: {{backend: redis, redis_url: '{redis_url}'}}"
    path = tmp_path / "gateway.yaml"
    path.write_text(config_text(issuer.url, {"svc": [f"'{target}'"]}, PUBLIC, revocation=revocation))
    result = cli("check", "-c", str(path))
    assert result.returncode == 2, result.stdout
    assert ":***@127.0.0.1" in result.stderr, result.stderr
    for part in password.split("/") + password.split("?") + password.split("#") + password.split("@"):
        assert part not in result.stderr, result.stderr
