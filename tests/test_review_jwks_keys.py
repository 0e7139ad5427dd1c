"""Key-handling review: how a JWKS arrives (in pieces), which issuer keys are strong enough to trust, and
where a discovered jwks_uri may point. Real HTTP servers, real keys and signatures."""

from __future__ import annotations

import asyncio
import json
import os
import ssl
import time
import warnings
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import jwt
import pytest
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config_types import InternalTokenConfig, IssuerConfig
from gateway.devissuer import DevIssuer, generate_key, public_jwk
from gateway.errors import InvalidToken, KeyStoreError
from gateway.jwks import MAX_BODY, JwksCache
from gateway.keys import KeyStore, thumbprint
from gateway.tokens import TokenVerifier
from tests.support.gateway import config_text
from tests.support.pki import make_pki

Serve = Callable[[Callable[[web.Request], Awaitable[web.StreamResponse]]], Awaitable[str]]


@pytest.fixture
async def serve() -> AsyncIterator[Serve]:
    """`url = await serve(handler)`: a real aiohttp server on 127.0.0.1 answering GET /jwks with `handler`."""
    runners: list[web.AppRunner] = []

    async def start(handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> str:
        async def handle(request: web.Request) -> web.StreamResponse:
            return await handler(request)

        app = web.Application()
        app.router.add_get("/jwks", handle)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", 0).start()
        runners.append(runner)
        return f"http://127.0.0.1:{runner.addresses[0][1]}/jwks"

    yield start
    for runner in runners:
        await runner.cleanup()


@pytest.fixture
async def cache_for() -> AsyncIterator[Callable[..., Awaitable[JwksCache]]]:
    """`await cache_for(jwks_uri, **overrides)`: a started JwksCache for that URI."""
    session = aiohttp.ClientSession()
    caches: list[JwksCache] = []

    async def make(jwks_uri: str, **overrides: Any) -> JwksCache:
        fields: dict[str, Any] = {"name": f"i{len(caches)}", "issuer": "http://issuer.test", "audiences": ("a",),
                                  "algorithms": ("RS256", "ES256"), "jwks_uri": jwks_uri, "jwks_min_refetch": 0.0}
        fields.update(overrides)
        cache = JwksCache(IssuerConfig(**fields), session)
        caches.append(cache)
        await cache.start()
        return cache

    yield make
    for cache in caches:
        await cache.close()
    await session.close()


async def _in_pieces(request: web.Request, body: bytes, pieces: int) -> web.StreamResponse:
    """`body` written in `pieces` writes with a pause between them (chunked, as a slow link delivers it)."""
    resp = web.StreamResponse(headers={"Content-Type": "application/json"})
    await resp.prepare(request)
    step = -(-len(body) // pieces)
    for i in range(0, len(body), step):
        await resp.write(body[i:i + step])
        await asyncio.sleep(0.02)
    await resp.write_eof()
    return resp


async def test_a_jwks_that_arrives_in_pieces_is_read_whole(serve: Serve, cache_for: Any) -> None:
    # A JWKS of a few keys spans several TLS records or chunks on a real network; each read of the
    # response gives only what has arrived so far. It used to be parsed from the first read alone.
    keys = [public_jwk(generate_key("RS256"), kid=f"k{i}", alg="RS256") for i in range(6)]
    body = json.dumps({"keys": keys}).encode()
    url = await serve(lambda request: _in_pieces(request, body, 4))
    cache = await cache_for(url)
    assert cache.ready and cache.key_count == 6
    assert await cache.key_for("k5") is not None


async def test_a_streamed_jwks_over_the_size_limit_is_refused_and_keys_kept(serve: Serve, cache_for: Any) -> None:
    good = json.dumps({"keys": [public_jwk(generate_key("ES256"), kid="es", alg="ES256")]}).encode()
    served = {"body": good}
    url = await serve(lambda request: _in_pieces(request, served["body"], 8))
    cache = await cache_for(url)
    assert cache.key_count == 1
    served["body"] = b'{"keys": [' + b" " * MAX_BODY + b"]}"  # no Content-Length: only the count bounds it
    assert await cache.key_for("unknown") is None
    assert cache.key_count == 1 and await cache.key_for("es") is not None


async def test_an_rsa_key_under_2048_bits_is_never_trusted(serve: Serve, cache_for: Any) -> None:
    # RFC 7518 s3.3: RS*/PS* keys MUST be 2048 bits or larger. A 1024-bit (or 512-bit) key left in an
    # issuer's JWKS is within reach of factoring, and then of forging any of its tokens.
    weak = rsa.generate_private_key(65537, 1024)
    members = [public_jwk(weak, kid="weak", alg="RS256"), public_jwk(generate_key("RS256"), kid="strong", alg="RS256")]
    body = json.dumps({"keys": members}).encode()

    async def handler(request: web.Request) -> web.StreamResponse:
        return web.Response(body=body, content_type="application/json")

    cache = await cache_for(await serve(handler))
    assert cache.key_count == 1
    assert await cache.key_for("strong", "RS256") is not None
    assert await cache.key_for("weak", "RS256") is None
    cfg = cache.issuer
    verifier = TokenVerifier([cfg], {cfg.name: cache})
    claims = {"iss": cfg.issuer, "aud": "a", "sub": "mallory", "exp": int(time.time()) + 60}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # PyJWT warns when it signs with a short RSA key
        token = jwt.encode(claims, weak, algorithm="RS256", headers={"kid": "weak"})
    with pytest.raises(InvalidToken) as refused:
        await verifier.verify(token)
    assert refused.value.reason == "unknown_kid"


async def test_an_https_issuer_whose_discovery_names_a_plain_http_jwks_uri_is_refused(tmp_path: Path) -> None:
    # OIDC Discovery: the document is fetched over TLS; a jwks_uri on http:// (Keycloak behind a TLS proxy
    # without its proxy settings publishes exactly that) would fetch the signing keys in clear text, where
    # anyone on the path can add their own key. The issuer's keys are never fetched that way.
    pki = make_pki(tmp_path)
    dev = DevIssuer()
    await dev.start()  # plain HTTP: its JWKS is what the discovery document names
    base = {"url": ""}

    async def discovery(request: web.Request) -> web.Response:
        return web.json_response({"issuer": base["url"] + "/realm", "jwks_uri": dev.jwks_uri})

    app = web.Application()
    app.router.add_get("/realm/.well-known/openid-configuration", discovery)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(pki["server"])
    await web.TCPSite(runner, "127.0.0.1", 0, ssl_context=server_ctx).start()
    base["url"] = f"https://127.0.0.1:{runner.addresses[0][1]}"
    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(ssl=ssl.create_default_context(cafile=pki["ca"])))
    cache = JwksCache(IssuerConfig(name="tls", issuer=base["url"] + "/realm", audiences=("a",),
                                   algorithms=("RS256",)), session)
    try:
        await cache.start()
        assert not cache.ready and cache.key_count == 0
        assert dev.jwks_hits == 0
    finally:
        await cache.close()
        await session.close()
        await runner.cleanup()
        await dev.stop()


def test_a_key_store_holding_a_short_rsa_key_is_refused(tmp_path: Path) -> None:
    # The gateway's own RS256 key: what it refuses from an issuer it does not sign with either.
    weak = dict(RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 1024), as_dict=True))
    weak.update(kid=thumbprint(weak), alg="RS256", use="sig", iat=int(time.time()))
    store = tmp_path / "keys.json"
    fd = os.open(store, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        json.dump({"keys": [weak]}, fh)
    with pytest.raises(KeyStoreError, match="1024-bit RSA key"):
        KeyStore(InternalTokenConfig(algorithm="RS256", key_store=str(store))).load()
    store.unlink()
    KeyStore(InternalTokenConfig(algorithm="RS256", key_store=str(store))).load()  # a generated key: 2048 bits


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA"])
async def test_a_key_published_with_its_private_half_is_never_trusted(
        alg: str, issuer: DevIssuer, make_upstream: Any, gateway_factory: Any) -> None:
    # An IdP that publishes a private JWK (an export pasted as the JWKS) has handed its key to everyone
    # who reads the set: tokens under it are refused (401), never accepted, and never a 500 (PyJWT loads
    # an RSA member with "d" as a private key, which cannot verify).
    private = generate_key(alg)
    to_jwk = {"RS256": RSAAlgorithm, "ES256": ECAlgorithm, "EdDSA": OKPAlgorithm}[alg].to_jwk
    leaked = {k: v for k, v in to_jwk(private, as_dict=True).items() if k != "key_ops"}
    leaked.update(kid="leaked", alg=alg)
    issuer.jwks_body = json.dumps({"keys": [leaked, *issuer.jwks()["keys"]]}).encode()
    up = await make_upstream()
    routes = "  - name: r\n    match: {path_prefix: /r/}\n    upstream: up\n"
    async with gateway_factory(config_text(issuer.url, {"up": [up.url]}, routes)) as gw:
        forged = issuer.token({"sub": "mallory"}, alg=alg, kid="leaked", key=private)
        status, _, body = await gw.request("GET", "/r/x", token=forged)
        assert status == 401 and body["error"] == "invalid_token"
        status, _, _ = await gw.request("GET", "/r/x", token=issuer.token(alg=alg))
        assert status == 200
    assert len(up.requests) == 1
