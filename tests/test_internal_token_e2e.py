"""Internal tokens end to end: real gateway, real issuer and upstream, verified by joserfc from the served JWKS."""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import stat
import subprocess
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import aiohttp
import pytest
from joserfc import jwt as jose_jwt
from joserfc.jwk import KeySet

from gateway.config_types import InternalTokenConfig
from gateway.devissuer import DevIssuer
from gateway.keys import SUPPORTED_ALGORITHMS, KeyStore
from tests.support.gateway import ROOT, GatewayProcess, RunningGateway, config_text, eventually, free_port
from tests.support.upstreams import EchoUpstream

INTERNAL_ISS = "https://gateway.internal"
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}
ROUTES = """\
  - name: orders
    match: {path_prefix: /orders/}
    upstream: orders
    forward: {identity: token, audience: orders-service, scopes: [orders:read, orders:admin]}
"""
USER = {"sub": "alice", "scope": "orders:read orders:write profile", "roles": ["admin", "user"],
        "tenant_id": "acme", "sid": "sess-1", "jti": "orig-jti-1"}


def gateway_yaml(issuer: DevIssuer, upstream: EchoUpstream, key_store: Path, *, alg: str = "ES256",
                 rotate_every: str = "24h", port: int = 0, admin_port: int = 0) -> str:
    internal = (f"internal_token:\n  issuer: {INTERNAL_ISS}\n  algorithm: {alg}\n  ttl: 60s\n"
                f"  key_store: {key_store}\n  rotate_every: {rotate_every}\n")
    return config_text(issuer.url, {"orders": [upstream.url]}, ROUTES, extra=internal,
                       listen=f"127.0.0.1:{port}", admin_listen=f"127.0.0.1:{admin_port}")


async def fetch_jwks(session: aiohttp.ClientSession, admin_url: str) -> tuple[dict[str, Any], str]:
    """As a service would: discovery document from the admin listener, then its jwks_uri."""
    async with session.get(admin_url + "/.well-known/openid-configuration") as r:
        assert r.status == 200
        discovery = await r.json()
    assert discovery["issuer"] == INTERNAL_ISS
    async with session.get(discovery["jwks_uri"]) as r:
        assert r.status == 200
        return await r.json(), r.headers["Cache-Control"]


def jose_verify(token: str, jwks: dict[str, Any], audience: str = "orders-service") -> tuple[dict[str, Any],
                                                                                            dict[str, Any]]:
    """joserfc (independent of PyJWT, which signed) against the JWKS as served over HTTP."""
    keyset = KeySet.import_key_set(jwks)  # type: ignore[arg-type]
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="EdDSA is deprecated")  # RFC 9864 renamed it Ed25519
        tok = jose_jwt.decode(token, keyset, algorithms=list(SUPPORTED_ALGORITHMS))
    jose_jwt.JWTClaimsRegistry(
        iss={"essential": True, "value": INTERNAL_ISS},
        aud={"essential": True, "value": audience},
        exp={"essential": True}, iat={"essential": True}, jti={"essential": True},
    ).validate(tok.claims)
    return dict(tok.header), dict(tok.claims)


async def call(session: aiohttp.ClientSession, url: str, token: str, upstream: EchoUpstream) -> str:
    """One request through the gateway; the internal token the upstream received."""
    async with session.get(url + "/orders/7", headers={"Authorization": f"Bearer {token}"}) as r:
        assert r.status == 200, await r.text()
    headers = {k.lower(): v for k, v in upstream.requests[-1][2].items()}
    scheme, _, internal = headers["authorization"].partition(" ")
    assert scheme == "Bearer"
    return internal


def unverified(token: str, part: int) -> dict[str, Any]:
    """Header (0) or payload (1) of a compact JWS, read without verifying (for test bookkeeping only)."""
    segment = token.split(".")[part]
    return json.loads(base64.urlsafe_b64decode(segment + "=" * (-len(segment) % 4)))  # type: ignore[no-any-return]


def kid_of(token: str) -> str:
    return str(unverified(token, 0)["kid"])


def minted_total(metrics_text: str) -> float:
    match = re.search(r"^gateway_internal_tokens_minted_total (\S+)$", metrics_text, re.M)
    assert match, "gateway_internal_tokens_minted_total missing from /metrics"
    return float(match.group(1))


# -- in-process gateway -------------------------------------------------------------------------


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
async def test_upstream_gets_only_a_down_scoped_internal_token(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path, alg: str
) -> None:
    gw: RunningGateway
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, tmp_path / "keys.json", alg=alg)) as gw:
        original = issuer.token(USER, ttl=300)
        status, _, body = await gw.request("GET", "/orders/7", token=original,
                                           headers={"X-Auth-Subject": "mallory"})
        assert status == 200, body
        received = echo_upstream.requests[-1][2]
        lower = {k.lower(): v for k, v in received.items()}
        internal = lower["authorization"].removeprefix("Bearer ")
        assert internal != original and lower["authorization"] == f"Bearer {internal}"
        # Nothing of the original token: not its compact form, not its signature, not its payload.
        signature, payload = original.rsplit(".", 1)[1], original.split(".")[1]
        for name, value in received.items():
            for part in (original, signature, payload):
                assert part not in value and part not in name, name
        assert not [n for n in lower if n.startswith("x-auth-")]

        jwks, cache_control = await fetch_jwks(gw.session, gw.admin_url)
        assert cache_control == "public, max-age=60"
        for jwk in jwks["keys"]:
            assert not PRIVATE_MEMBERS & set(jwk), jwk
        header, claims = jose_verify(internal, jwks)
        assert header == {"alg": alg, "kid": jwks["keys"][0]["kid"], "typ": "JWT"}
        jti = claims.pop("jti")
        assert jti != "orig-jti-1"
        iat = claims.pop("iat")
        assert abs(iat - time.time()) < 5
        assert claims == {
            "iss": INTERNAL_ISS, "aud": "orders-service", "sub": "alice",
            # Down-scoping both ways: orders:write and profile (held, not asked for) are cut, and
            # orders:admin (asked for by the route, not held) is not granted.
            "scope": "orders:read",
            "exp": iat + 60,
            "orig_iss": issuer.url, "orig_jti": "orig-jti-1",
            "tenant": "acme", "sid": "sess-1", "roles": ["admin", "user"],
        }

        # A user holding none of the route's scopes gets a token with an empty scope, never more.
        status, _, _ = await gw.request("GET", "/orders/7", token=issuer.token({"scope": "profile"}))
        assert status == 200
        internal = echo_upstream.requests[-1][2]["Authorization"].removeprefix("Bearer ")
        _, claims = jose_verify(internal, jwks)
        assert claims["scope"] == ""


async def test_exp_is_capped_by_the_original_token(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                   gateway_factory: Any, tmp_path: Path) -> None:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, tmp_path / "keys.json")) as gw:
        original = issuer.token(USER, ttl=20)  # shorter than the internal ttl of 60 s
        original_exp = unverified(original, 1)["exp"]
        internal = await call(gw.session, gw.url, original, echo_upstream)
        jwks, _ = await fetch_jwks(gw.session, gw.admin_url)
        _, claims = jose_verify(internal, jwks)
        assert claims["exp"] == original_exp and claims["exp"] - claims["iat"] <= 20


async def test_same_token_is_signed_once(issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any,
                                         tmp_path: Path) -> None:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, tmp_path / "keys.json")) as gw:

        async def minted() -> float:
            async with gw.session.get(gw.admin_url + "/metrics") as r:
                return minted_total(await r.text())

        before = await minted()
        token = issuer.token(USER)
        internals = {await call(gw.session, gw.url, token, echo_upstream) for _ in range(10)}
        assert len(internals) == 1
        assert await minted() - before == 1
        await call(gw.session, gw.url, issuer.token({**USER, "jti": "other"}), echo_upstream)  # its own mint
        assert await minted() - before == 2


# -- `gateway run` processes ----------------------------------------------------------------------


def start_process(gateway_processes: Any, tmp_path: Path, name: str, issuer: DevIssuer, upstream: EchoUpstream,
                  key_store: Path, **kw: Any) -> GatewayProcess:
    port, admin_port = free_port(), free_port()
    path = tmp_path / f"{name}.yaml"
    path.write_text(gateway_yaml(issuer, upstream, key_store, port=port, admin_port=admin_port, **kw))
    proc: GatewayProcess = gateway_processes(GatewayProcess(path, port=port, admin_port=admin_port))
    return proc


def rotate_cli(config_path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(config_path)],  # noqa: S603
                          capture_output=True, text=True, timeout=30, cwd=ROOT, check=False)


def test_cli_rotation_without_an_internal_token_section_uses_the_default_store(
        issuer: DevIssuer, tmp_path: Path) -> None:
    """SPEC 3 gives internal_token defaults (key_store var/signing-keys.json): rotating needs no section."""
    path = tmp_path / "gw.yaml"
    path.write_text(config_text(issuer.url, {"svc": ["http://127.0.0.1:9"]},
                                "  - name: p\n    match: {path: /p}\n    upstream: svc\n    auth: {required: false}\n"))
    done = subprocess.run([sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(path)],  # noqa: S603
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT)})
    assert done.returncode == 0, done.stderr
    store = tmp_path / "var" / "signing-keys.json"
    keys = json.loads(store.read_text())["keys"]
    assert len(keys) == 2 and keys[-1]["kid"] in done.stdout and stat.S_IMODE(store.stat().st_mode) == 0o600
    named = tmp_path / "named.json"  # GATEWAY_KEY_STORE names the store, as it does with the section
    done = subprocess.run([sys.executable, "-m", "gateway", "keys", "rotate", "-c", str(path)],  # noqa: S603
                          capture_output=True, text=True, timeout=30, cwd=tmp_path, check=False,
                          env={**os.environ, "PYTHONPATH": str(ROOT), "GATEWAY_KEY_STORE": str(named)})
    assert done.returncode == 0 and len(json.loads(named.read_text())["keys"]) == 2, done.stderr


async def test_cli_rotation_is_picked_up_and_old_tokens_stay_verifiable(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_processes: Any, tmp_path: Path
) -> None:
    store = tmp_path / "keys.json"
    gw = start_process(gateway_processes, tmp_path, "a", issuer, echo_upstream, store)
    await gw.wait_ready()
    assert stat.S_IMODE(store.stat().st_mode) == 0o600
    async with aiohttp.ClientSession() as session:
        token = issuer.token(USER)
        old = await call(session, gw.url, token, echo_upstream)
        old_kid = kid_of(old)

        done = await asyncio.to_thread(rotate_cli, gw.config_path)
        assert done.returncode == 0, done.stderr
        new_kid = str(json.loads(store.read_text())["keys"][-1]["kid"])
        assert new_kid != old_kid and new_kid in done.stdout

        async def uses_new_key() -> bool:
            return kid_of(await call(session, gw.url, token, echo_upstream)) == new_kid

        await eventually(uses_new_key, timeout=5.0, interval=0.1)  # the check interval is 1 s
        jwks, _ = await fetch_jwks(session, gw.admin_url)
        assert [k["kid"] for k in jwks["keys"]] == [new_kid, old_kid]  # newest first, old still published
        jose_verify(old, jwks)  # a token signed before the rotation still verifies
        jose_verify(await call(session, gw.url, token, echo_upstream), jwks)
        for jwk in jwks["keys"]:
            assert not PRIVATE_MEMBERS & set(jwk)


async def test_two_processes_on_one_store_publish_the_same_current_key(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_processes: Any, tmp_path: Path
) -> None:
    store = tmp_path / "shared" / "keys.json"  # absent: both processes race to create it
    procs = [start_process(gateway_processes, tmp_path, n, issuer, echo_upstream, store) for n in ("a", "b")]
    await asyncio.gather(*(p.wait_ready() for p in procs))
    assert len(json.loads(store.read_text())["keys"]) == 1
    async with aiohttp.ClientSession() as session:
        token = issuer.token(USER)

        async def current_kids() -> set[str]:
            kids = set()
            for p in procs:
                jwks, _ = await fetch_jwks(session, p.admin_url)
                kids.add(jwks["keys"][0]["kid"])
                kids.add(kid_of(await call(session, p.url, token, echo_upstream)))
            return kids

        first = await current_kids()
        assert len(first) == 1
        assert (await asyncio.to_thread(rotate_cli, procs[0].config_path)).returncode == 0

        async def agree_on_a_new_key() -> bool:
            kids = await current_kids()
            return len(kids) == 1 and kids != first

        await eventually(agree_on_a_new_key, timeout=5.0, interval=0.1)


@pytest.mark.parametrize("content, words", [
    (b'{"keys": [', "not a valid JSON document"),
    (b'{"keys": [{"kty": "EC", "alg": "ES256", "kid": "k", "iat": 1, "crv": "P-256", "x": "AA"}]}',
     "not a valid private ES256 key"),
], ids=["truncated-json", "public-key-only"])
async def test_corrupt_key_store_stops_run_with_one_line(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_processes: Any, tmp_path: Path, content: bytes,
    words: str
) -> None:
    store = tmp_path / "keys.json"
    store.write_bytes(content)
    store.chmod(0o600)
    gw = start_process(gateway_processes, tmp_path, "a", issuer, echo_upstream, store)
    assert gw.proc is not None
    code = await asyncio.to_thread(gw.proc.wait, 20)
    lines = gw.err.read_text().splitlines()
    assert code in (1, 2)
    assert len(lines) == 1, lines
    assert str(store) in lines[0] and words in lines[0] and "Traceback" not in lines[0]
    if code == 2:  # the config check's line names key_store's own line (SPEC 3), not line 1
        config = Path(gw.config_path)
        line = next(n for n, text in enumerate(config.read_text().splitlines(), 1) if "key_store:" in text)
        assert lines[0].startswith(f"{config}:{line}: internal_token.key_store: "), lines


async def test_read_only_store_keeps_signing_and_logs_once(
    issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_processes: Any, tmp_path: Path
) -> None:
    # A Kubernetes Secret mount: file 0400 in a 0500 directory. Tests run as root, which could write it
    # anyway; the store goes by the file's missing owner-write bit, so this really is read-only to it.
    secret = tmp_path / "secret"
    store = secret / "keys.json"
    KeyStore(InternalTokenConfig(key_store=str(store))).load()
    store.chmod(0o400)
    secret.chmod(0o500)
    content = store.read_bytes()
    try:
        gw = start_process(gateway_processes, tmp_path, "a", issuer, echo_upstream, store, rotate_every="1s")
        await gw.wait_ready()
        async with aiohttp.ClientSession() as session:
            token = issuer.token(USER)
            kid = kid_of(await call(session, gw.url, token, echo_upstream))
            await asyncio.sleep(2.5)  # rotate_every has elapsed; at least two checks (1 s apart) ran since
            assert gw.proc is not None and gw.proc.poll() is None
            assert kid_of(await call(session, gw.url, token, echo_upstream)) == kid
        assert store.read_bytes() == content
        complaints = [ln for ln in gw.err.read_text().splitlines() if "read-only" in ln]
        assert len(complaints) == 1, complaints
        assert str(store) in complaints[0] and "WARNING" in complaints[0]
        # `gateway keys rotate` on the mount: refused with one clear line, nothing written.
        done = await asyncio.to_thread(rotate_cli, gw.config_path)
        assert done.returncode == 1 and done.stderr.count("\n") == 1 and "read-only" in done.stderr
        assert store.read_bytes() == content
    finally:
        secret.chmod(0o700)
        os.chmod(store, 0o600)


async def test_readme_snippet_verifies_with_pyjwks_client(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                          gateway_factory: Any, tmp_path: Path) -> None:
    """The service-side snippet of the README (PyJWT's PyJWKClient), run as written."""
    import jwt

    async with gateway_factory(gateway_yaml(issuer, echo_upstream, tmp_path / "keys.json")) as gw:
        authorization = "Bearer " + await call(gw.session, gw.url, issuer.token(USER), echo_upstream)
        jwks = jwt.PyJWKClient(gw.admin_url + "/.well-known/jwks.json", lifespan=60)

        def verify(authorization: str) -> dict[str, Any]:
            token = authorization.removeprefix("Bearer ")
            key = jwks.get_signing_key_from_jwt(token)  # refetches the JWKS once on an unknown kid
            return jwt.decode(token, key.key, algorithms=["ES256"], audience="orders-service",
                              issuer="https://gateway.internal",
                              options={"require": ["exp", "iat", "iss", "aud", "jti"]})

        claims = await asyncio.to_thread(verify, authorization)
        assert claims["sub"] == "alice" and claims["scope"] == "orders:read"


async def test_scopes_reach_the_upstream_in_the_tokens_order(issuer: DevIssuer, echo_upstream: EchoUpstream,
                                                              gateway_factory: Any, tmp_path: Path) -> None:
    """The minted `scope` keeps the order the issuer wrote (each scope once), down-scoped or not."""
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, tmp_path / "keys.json")) as gw:
        token = issuer.token({**USER, "scope": "profile orders:read zeta orders:admin orders:read"})
        internal = await call(gw.session, gw.url, token, echo_upstream)
        assert unverified(internal, 1)["scope"] == "orders:read orders:admin"  # ∩ [orders:read, orders:admin]


async def test_a_token_route_without_an_internal_token_section_signs_on_the_defaults(
        issuer: DevIssuer, echo_upstream: EchoUpstream, gateway_factory: Any, tmp_path: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 3's defaults for the whole section: issuer https://gateway.internal, ES256, a key store created
    where GATEWAY_KEY_STORE says (else var/signing-keys.json), published on the admin listener."""
    store = tmp_path / "default-store.json"
    monkeypatch.setenv("GATEWAY_KEY_STORE", str(store))
    text = config_text(issuer.url, {"orders": [echo_upstream.url]}, ROUTES)
    assert "internal_token" not in text
    async with gateway_factory(text) as gw:
        internal = await call(gw.session, gw.url, issuer.token(USER), echo_upstream)
        jwks, _ = await fetch_jwks(gw.session, gw.admin_url)
        header, claims = jose_verify(internal, jwks)
    assert header["alg"] == "ES256" and claims["iss"] == INTERNAL_ISS and claims["exp"] - claims["iat"] == 60
    assert store.exists() and store.stat().st_mode & 0o777 == 0o600
