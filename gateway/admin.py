"""The admin listener: metrics, health, readiness, the internal issuer's JWKS, revocations, the access matrix."""

from __future__ import annotations

import json
from typing import TYPE_CHECKING, Any

from aiohttp import web

from gateway import metrics
from gateway.config_types import InternalTokenConfig
from gateway.errors import (
    AuthError,
    BadRequest,
    GatewayError,
    InsufficientScope,
    InvalidToken,
    MethodNotAllowed,
    NotFound,
    PayloadTooLarge,
)
from gateway.identity import request_id_from
from gateway.keys import discovery_document
from gateway.matrix import access_matrix
from gateway.routes import valid_host
from gateway.tokens import bearer_token

if TYPE_CHECKING:
    from gateway.app import GatewayApp

REVOCATION_TYPES = ("jti", "subject", "session")


def _json(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(status=status, text=json.dumps(data, indent=1), content_type="application/json",
                        headers=headers)


def _error(err: GatewayError, request: web.Request) -> web.Response:
    if isinstance(err, AuthError):  # admin API refusals count like the public port's
        metrics.auth_failures_total.labels(issuer=err.issuer or "-", reason=err.reason).inc()
    return _refusal(request, err.code, err.description, err.status, err.headers)


def _refusal(request: web.Request, code: str, description: str, status: int,
             headers: dict[str, str] | None = None) -> web.Response:
    """SPEC 5's error body on the admin listener too, with its request id (the client's when valid)."""
    rid = request_id_from(request.headers)
    return _json({"error": code, "error_description": description, "request_id": rid}, status,
                 {**(headers or {}), "X-Request-Id": rid})


@web.middleware
async def _spec_errors(request: web.Request, handler: Any) -> web.StreamResponse:
    """aiohttp's own refusals (no such path, a wrong method, an oversized body) in SPEC 5's JSON too,
    not its plain-text `404: Not Found`."""
    try:
        return await handler(request)  # type: ignore[no-any-return]
    except web.HTTPException as exc:
        if exc.status < 400:
            raise
        err: GatewayError
        if exc.status == 404:
            err = NotFound()
        elif exc.status == 405:
            err = MethodNotAllowed(tuple(m.strip() for m in exc.headers.get("Allow", "").split(",") if m.strip()))
        elif exc.status == 413:
            err = PayloadTooLarge()
        else:
            return _refusal(request, BadRequest.code, exc.reason.lower(), exc.status)
        return _error(err, request)


def admin_app(gw: GatewayApp) -> web.Application:
    async def metrics_view(request: web.Request) -> web.Response:
        body, content_type = metrics.render()
        return web.Response(body=body, headers={"Content-Type": content_type})

    async def healthz(request: web.Request) -> web.Response:
        return _json({"status": "ok"})

    async def readyz(request: web.Request) -> web.Response:
        checks = gw.services.ready()
        checks["config"] = gw.gateway is not None
        checks["accepting"] = not gw.draining
        ok = all(checks.values())
        return _json({"ready": ok, "checks": checks}, 200 if ok else 503)

    async def jwks(request: web.Request) -> web.Response:
        keys = gw.services.keys
        # Why max-age=60 is safe across a rotation: a cached copy can only lack a key that is NEWER
        # than it, never one still in use, because a retired key stays published for ttl + 2 min
        # after the last token it signed (keys.RETIRE_MARGIN). A new kid is met at most 60 s after a
        # rotation, and verifiers refetch on an unknown kid (PyJWKClient, go-oidc, jose and Nimbus do;
        # RFC 7517 s4.5 kid is the lookup). The short life also bounds how long a key removed from
        # the store by hand (a compromise) is still trusted by caches.
        headers = {"Cache-Control": "public, max-age=60"}
        return _json(keys.public_jwks() if keys is not None else {"keys": []}, headers=headers)

    async def openid_configuration(request: web.Request) -> web.Response:
        # jwks_uri names this listener as the client reached it, so the Host must be a host (a list or a
        # path in it would make the URI point elsewhere), and caches keep one copy per Host (Vary).
        if not valid_host(request.host):
            return _refusal(request, "invalid_request", "the Host header is not a valid host", 400)
        jwks_uri = f"{request.scheme}://{request.host}/.well-known/jwks.json"
        # Without an internal_token section SPEC 3's defaults name the issuer; the JWKS is then empty.
        cfg = gw.config.internal_token or InternalTokenConfig()
        keys = gw.services.keys
        doc = (keys.openid_configuration(cfg.issuer, jwks_uri) if keys is not None
               else discovery_document(cfg.issuer, jwks_uri, {cfg.algorithm}))
        return _json(doc, headers={"Cache-Control": "public, max-age=300", "Vary": "Host"})

    async def authorize_admin(request: web.Request) -> None:
        gateway = gw.gateway
        assert gateway is not None
        principal = await gateway.verifier.verify(bearer_token(request.headers.get("Authorization")))
        await gateway.revocations.check(principal)
        admin = gw.config.admin
        if principal.issuer != admin.issuer:
            raise InvalidToken("wrong_issuer", issuer=principal.issuer)
        if admin.scope not in principal.scopes:
            raise InsufficientScope((admin.scope,), issuer=principal.issuer)

    async def revocations(request: web.Request) -> web.Response:
        try:
            await authorize_admin(request)
            try:
                body = await request.json(loads=_loads_unique)
            except _DuplicateKey as exc:
                return _refusal(request, "invalid_request", str(exc), 400)
            # RecursionError: arrays or objects nested deeper than the json module decodes ("[[[[...").
            except (ValueError, UnicodeDecodeError, RecursionError):
                return _refusal(request, "invalid_request", "body must be JSON", 400)
            problem = _check_revocation(body, [i.name for i in gw.config.issuers])
            if problem:
                return _refusal(request, "invalid_request", problem, 400)
            store = gw.services.revocation
            assert store is not None
            issuer = body.get("issuer") or (gw.config.issuers[0].name if len(gw.config.issuers) == 1 else None)
            try:
                written = await store.revoke(body["type"], body["value"], issuer, exp=body.get("exp"))
            except ValueError as exc:  # the store's own input rules (e.g. ':' in an issuer name)
                return _refusal(request, "invalid_request", str(exc), 400)
            # BackendUnavailable (a GatewayError) falls through to _error: 503 temporarily_unavailable.
            return _json({"revoked": written}, 201)
        except GatewayError as err:
            return _error(err, request)

    async def routes(request: web.Request) -> web.Response:
        # Open like /metrics (SPEC 6/7 ask an admin token of POST /admin/revocations only): it says what
        # `gateway routes` says from the file, on the listener that is internal by default.
        return _json(access_matrix(gw.config))

    app = web.Application(middlewares=[_spec_errors])
    app.router.add_get("/metrics", metrics_view)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    app.router.add_get("/.well-known/jwks.json", jwks)
    app.router.add_get("/.well-known/openid-configuration", openid_configuration)
    app.router.add_post("/admin/revocations", revocations)
    app.router.add_get("/admin/routes", routes)
    return app


class _DuplicateKey(ValueError):
    pass


def _unique(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(f"field {key!r} appears twice")
        out[key] = value
    return out


def _loads_unique(text: str) -> Any:
    """json.loads, refusing an object with a name twice: `{"type": "jti", ..., "type": "subject"}` would
    otherwise revoke whatever the last one says (RFC 8259 s4 leaves it to the parser; parsers differ)."""
    return json.loads(text, object_pairs_hook=_unique)


def _check_revocation(body: Any, issuers: list[str]) -> str | None:
    if not isinstance(body, dict):
        return "body must be a JSON object"
    unknown = set(body) - {"type", "value", "issuer", "exp"}
    if unknown:
        return f"unknown field(s): {', '.join(sorted(unknown))}"
    if body.get("type") not in REVOCATION_TYPES:
        return f"type must be one of: {', '.join(REVOCATION_TYPES)}"
    value = body.get("value")
    if not isinstance(value, str) or not value:  # its length and characters: the store's rules (revoke)
        return "value must be a non-empty string"
    issuer = body.get("issuer")
    if issuer is not None and issuer not in issuers:
        return f"unknown issuer; known: {', '.join(issuers)}"
    if body["type"] != "jti" and issuer is None and len(issuers) != 1:
        return "issuer is required for subject and session revocations"
    exp = body.get("exp")
    if exp is not None and (not isinstance(exp, int) or isinstance(exp, bool)):
        return "exp must be a UNIX time"
    return None
