"""Development OIDC issuer for deploy/compose.yaml: discovery, JWKS and an unauthenticated token endpoint.

NOT for production: anyone who reaches /token gets a signed token with the claims they ask for.
Environment: ISSUER_URL (the `iss`, as the gateway reaches it, e.g. http://issuer:9000/realms/dev),
HOST (default 0.0.0.0), PORT (default 9000; 0 picks a free port), AUDIENCE (default aud).
Prints `listening on http://HOST:PORT` once serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import time
from typing import Any
from urllib.parse import urlsplit

import jwt
from aiohttp import web
from cryptography.hazmat.primitives.asymmetric import rsa
from jwt.algorithms import RSAAlgorithm

ISSUER_URL = os.environ.get("ISSUER_URL", "http://issuer:9000/realms/dev").rstrip("/")
AUDIENCE = os.environ.get("AUDIENCE", "https://api.example.com")
PATH = urlsplit(ISSUER_URL).path

# One key per process start: restarting the issuer is a key rotation (the gateway refetches on
# the unknown kid).
KEY = rsa.generate_private_key(public_exponent=65537, key_size=2048)
KID = f"dev-{secrets.token_hex(4)}"
JWK: dict[str, Any] = {**json.loads(RSAAlgorithm.to_jwk(KEY.public_key())), "kid": KID, "alg": "RS256", "use": "sig"}


async def discovery(request: web.Request) -> web.Response:
    return web.json_response({
        "issuer": ISSUER_URL,
        "jwks_uri": f"{ISSUER_URL}/jwks",
        "token_endpoint": f"{ISSUER_URL}/token",
        "id_token_signing_alg_values_supported": ["RS256"],
        "response_types_supported": ["token"],
        "subject_types_supported": ["public"],
    })


async def jwks(request: web.Request) -> web.Response:
    return web.json_response({"keys": [JWK]}, headers={"Cache-Control": "public, max-age=300"})


async def token(request: web.Request) -> web.Response:
    """Mints a token from query/form fields: sub, scope, roles (comma or space separated), tenant_id,
    sid, aud, ttl (seconds, default 300)."""
    fields: dict[str, str] = dict(request.query)
    if request.method == "POST":
        fields.update({k: str(v) for k, v in (await request.post()).items()})
    try:
        ttl = int(fields.get("ttl", "300"))
    except ValueError:
        return web.json_response({"error": "invalid_request"}, status=400)
    now = int(time.time())
    claims: dict[str, Any] = {
        "iss": ISSUER_URL, "aud": fields.get("aud", AUDIENCE), "sub": fields.get("sub", "alice"),
        "iat": now, "nbf": now, "exp": now + ttl, "jti": secrets.token_hex(12),
        "scope": fields.get("scope", "openid"), "sid": fields.get("sid", secrets.token_hex(8)),
    }
    if fields.get("tenant_id"):
        claims["tenant_id"] = fields["tenant_id"]
    if fields.get("roles"):
        claims["roles"] = fields["roles"].replace(",", " ").split()
    signed = jwt.encode(claims, KEY, algorithm="RS256", headers={"kid": KID})
    return web.json_response({"access_token": signed, "token_type": "Bearer", "expires_in": ttl})


async def main() -> None:
    app = web.Application()
    app.router.add_get(f"{PATH}/.well-known/openid-configuration", discovery)
    app.router.add_get(f"{PATH}/jwks", jwks)
    app.router.add_route("*", f"{PATH}/token", token)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("HOST", "0.0.0.0"), int(os.environ.get("PORT", "9000"))).start()
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port} as issuer {ISSUER_URL}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
