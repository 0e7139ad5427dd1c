"""A real development OIDC issuer (discovery + JWKS + signed tokens) for `gateway demo` and tests."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import secrets
import time
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import jwt
from aiohttp import web
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

PrivateKey = rsa.RSAPrivateKey | ec.EllipticCurvePrivateKey | ed25519.Ed25519PrivateKey

ALGORITHMS = ("RS256", "PS256", "ES256", "ES384", "EdDSA")
DEFAULT_AUDIENCE = "https://api.example.com"


def generate_key(alg: str) -> PrivateKey:
    """A fresh private key for one of ALGORITHMS."""
    if alg in ("RS256", "PS256"):
        return rsa.generate_private_key(public_exponent=65537, key_size=2048)
    if alg == "ES256":
        return ec.generate_private_key(ec.SECP256R1())
    if alg == "ES384":
        return ec.generate_private_key(ec.SECP384R1())
    if alg == "EdDSA":
        return ed25519.Ed25519PrivateKey.generate()
    raise ValueError(f"unsupported algorithm {alg!r}; known: {', '.join(ALGORITHMS)}")


def public_jwk(key: PrivateKey, *, kid: str, alg: str) -> dict[str, Any]:
    """The public half of `key` as a JWK with kid, alg and use=sig."""
    public = key.public_key()
    jwk: dict[str, Any]
    if isinstance(public, rsa.RSAPublicKey):
        jwk = RSAAlgorithm.to_jwk(public, as_dict=True)
    elif isinstance(public, ec.EllipticCurvePublicKey):
        jwk = ECAlgorithm.to_jwk(public, as_dict=True)
    else:
        jwk = OKPAlgorithm.to_jwk(public, as_dict=True)
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


def _b64(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).rstrip(b"=").decode("ascii")


def _b64json(obj: Mapping[str, Any]) -> str:
    return _b64(json.dumps(obj, separators=(",", ":")).encode())


@dataclass
class IssuerKey:
    kid: str
    alg: str
    private: PrivateKey
    published: bool = True


class DevIssuer:
    """An OIDC issuer on 127.0.0.1 serving discovery and JWKS, with switches tests use to misbehave."""

    def __init__(self, realm: str = "dev", *, audience: str = DEFAULT_AUDIENCE, subject: str = "alice") -> None:
        self.path = f"/realms/{realm}"
        self.audience = audience
        self.subject = subject
        self.keys: dict[str, IssuerKey] = {}
        self.current: dict[str, str] = {}  # alg -> kid used by token() when no kid is given
        for alg in ALGORITHMS:
            self.rotate(alg)
        # Controls for tests.
        self.jwks_hits = 0
        self.discovery_hits = 0
        self.max_age: int | None = None  # Cache-Control max-age on the JWKS response
        self.down = False  # answer 503 to everything
        self.jwks_body: bytes | None = None  # served instead of the real JWKS (e.g. garbage)
        self.delay = 0.0  # seconds to wait before answering the JWKS (slow issuer)
        self._runner: web.AppRunner | None = None
        self._base = ""

    # ----- lifecycle -------------------------------------------------------------------------

    async def start(self, host: str = "127.0.0.1", port: int = 0) -> None:
        app = web.Application()
        app.router.add_get(f"{self.path}/.well-known/openid-configuration", self._discovery)
        app.router.add_get(f"{self.path}/protocol/openid-connect/certs", self._jwks)
        app.router.add_route("*", f"{self.path}/protocol/openid-connect/token", self._token_endpoint)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        bound_host, bound_port = self._runner.addresses[0][:2]
        self._base = f"http://{bound_host}:{bound_port}"

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    @property
    def url(self) -> str:
        """The issuer URL, also the `iss` it signs."""
        if not self._base:
            raise RuntimeError("DevIssuer.start() has not been awaited")
        return self._base + self.path

    @property
    def jwks_uri(self) -> str:
        return f"{self.url}/protocol/openid-connect/certs"

    # ----- keys ------------------------------------------------------------------------------

    def rotate(self, alg: str, *, drop_old: bool = False) -> str:
        """A new current key for `alg` (new kid); the old one stays published unless drop_old."""
        if drop_old:
            for key in list(self.keys.values()):
                if key.alg == alg:
                    del self.keys[key.kid]
        kid = f"{alg.lower()}-{secrets.token_hex(6)}"
        self.keys[kid] = IssuerKey(kid, alg, generate_key(alg))
        self.current[alg] = kid
        return kid

    def add_unpublished_key(self, alg: str) -> str:
        """A key whose kid is NOT in the JWKS; sign with it via token(kid=...)."""
        kid = f"{alg.lower()}-unpublished-{secrets.token_hex(6)}"
        self.keys[kid] = IssuerKey(kid, alg, generate_key(alg), published=False)
        return kid

    def kid(self, alg: str = "RS256") -> str:
        return self.current[alg]

    def jwks(self) -> dict[str, Any]:
        return {
            "keys": [public_jwk(k.private, kid=k.kid, alg=k.alg) for k in self.keys.values() if k.published]
        }

    def public_pem(self, alg: str = "RS256") -> bytes:
        return self.keys[self.current[alg]].private.public_key().public_bytes(
            serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
        )

    # ----- tokens ----------------------------------------------------------------------------

    def claims(self, claims: Mapping[str, Any] | None = None, *, ttl: int = 300,
               omit: tuple[str, ...] = ()) -> dict[str, Any]:
        """The default payload (iss, aud, sub, iat, nbf, exp, jti, scope) with overrides and omissions."""
        now = int(time.time())
        payload: dict[str, Any] = {
            "iss": self.url,
            "aud": self.audience,
            "sub": self.subject,
            "iat": now,
            "nbf": now,
            "exp": now + ttl,
            "jti": secrets.token_hex(12),
            "scope": "openid",
        }
        payload.update(claims or {})
        for name in omit:
            payload.pop(name, None)
        return payload

    def token(
        self,
        claims: Mapping[str, Any] | None = None,
        *,
        alg: str = "RS256",
        kid: str | None = None,
        headers: Mapping[str, Any] | None = None,
        key: PrivateKey | None = None,
        ttl: int = 300,
        omit: tuple[str, ...] = (),
    ) -> str:
        """A real signed JWT. `kid` picks the signing key (default: the current key for `alg`);
        `key` signs with that private key instead while keeping the header's kid; a header "kid": None
        in `headers` leaves kid out of the header."""
        kid = kid or self.current[alg]
        signing_key = key if key is not None else self.keys[kid].private
        header: dict[str, Any] = {"kid": kid, **(headers or {})}
        if header.get("kid") is None:
            header.pop("kid")
        return jwt.encode(self.claims(claims, ttl=ttl, omit=omit), signing_key, algorithm=alg, headers=header)

    # Attack tokens (RFC 8725 s2.1: alg none, HS/RS key confusion, substituted keys).

    def token_alg_none(self, claims: Mapping[str, Any] | None = None) -> str:
        header = {"alg": "none", "typ": "JWT", "kid": self.current["RS256"]}
        return f"{_b64json(header)}.{_b64json(self.claims(claims))}."

    def token_hs256_with_public_key(self, claims: Mapping[str, Any] | None = None, *, alg: str = "RS256") -> str:
        """HS256 keyed with the issuer's published public key PEM, under that key's kid.
        PyJWT refuses to build it (it rejects PEM as an HMAC secret), so it is assembled by hand."""
        header = {"alg": "HS256", "typ": "JWT", "kid": self.current[alg]}
        signing_input = f"{_b64json(header)}.{_b64json(self.claims(claims))}"
        mac = hmac.new(self.public_pem(alg), signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{_b64(mac)}"

    def token_unpublished_key(self, claims: Mapping[str, Any] | None = None, *, alg: str = "RS256") -> str:
        """Signed by a fresh key nobody published, under the kid of a published key."""
        return self.token(claims, alg=alg, kid=self.current[alg], key=generate_key(alg))

    # ----- HTTP handlers ---------------------------------------------------------------------

    async def _discovery(self, request: web.Request) -> web.Response:
        self.discovery_hits += 1
        if self.down:
            return web.Response(status=503)
        return web.json_response({
            "issuer": self.url,
            "jwks_uri": self.jwks_uri,
            "token_endpoint": f"{self.url}/protocol/openid-connect/token",
            "id_token_signing_alg_values_supported": list(ALGORITHMS),
            "response_types_supported": ["token"],
            "subject_types_supported": ["public"],
        })

    async def _jwks(self, request: web.Request) -> web.Response:
        self.jwks_hits += 1
        if self.delay:
            await asyncio.sleep(self.delay)
        if self.down:
            return web.Response(status=503)
        headers = {} if self.max_age is None else {"Cache-Control": f"public, max-age={self.max_age}"}
        body = self.jwks_body if self.jwks_body is not None else json.dumps(self.jwks()).encode()
        return web.Response(body=body, content_type="application/json", headers=headers)

    async def _token_endpoint(self, request: web.Request) -> web.Response:
        """Development only: mints a token from query/form fields (sub, scope, roles, tenant_id, sid,
        aud, alg, ttl) without any client authentication."""
        if self.down:
            return web.Response(status=503)
        fields: dict[str, str] = dict(request.query)
        if request.method == "POST":
            fields.update({k: str(v) for k, v in (await request.post()).items()})
        claims: dict[str, Any] = {}
        for name in ("sub", "scope", "tenant_id", "sid", "aud"):
            if fields.get(name):
                claims[name] = fields[name]
        if fields.get("roles"):
            claims["roles"] = [r for r in fields["roles"].replace(",", " ").split() if r]
        alg = fields.get("alg", "RS256")
        if alg not in ALGORITHMS:
            return web.json_response({"error": "invalid_request"}, status=400)
        try:
            ttl = int(fields.get("ttl", "300"))
        except ValueError:
            return web.json_response({"error": "invalid_request"}, status=400)
        token = self.token(claims, alg=alg, ttl=ttl)
        return web.json_response({"access_token": token, "token_type": "Bearer", "expires_in": ttl})
