"""`gateway explain`: which route matches a request and why, and with a token each rule's verdict."""

from __future__ import annotations

import dataclasses

import aiohttp

from gateway.authz import evaluate
from gateway.config_types import Config
from gateway.errors import BadHost, GatewayError
from gateway.jwks import JwksCache
from gateway.routes import RouteTable, valid_host
from gateway.tokens import TokenVerifier


def _target(path: str, host: str) -> tuple[str, str]:
    """PATH as given (`/a/b?q`), or a whole URL (`https://api.example.com/a/b`), whose host is used when
    --host is not given."""
    scheme, sep, rest = path.partition("://")
    if sep and scheme.lower() in ("http", "https") and not path.startswith("/"):
        authority, slash, tail = rest.partition("/")
        return slash + tail if slash else "/", host or authority.rpartition("@")[2]
    return path, host


async def explain(config: Config, method: str, path: str, host: str, token: str | None) -> int:
    """Print the explanation; 0 when the request would be let through, 1 when refused (no upstream call).

    Without a host (no --host, PATH not a URL), routes are matched whatever their `host`: the output
    names the host such a route needs, instead of answering 404 for a request no Host was given for."""
    path, host = _target(path, host)
    raw_path, _, _ = path.partition("?")
    if not valid_host(host):  # the server refuses such a Host before routing (app._check_host)
        err: GatewayError = BadHost()
        print(f"{method} {path}: Host {host!r} -> {err.status} {err.code}: {err.description}")
        return 1
    routes = config.routes if host else tuple(dataclasses.replace(r, host=None) for r in config.routes)
    try:
        match = RouteTable(routes).match(method, raw_path, host.lower())
    except GatewayError as err:
        extra = f" (Allow: {err.headers['Allow']})" if "Allow" in err.headers else ""
        print(f"{method} {path}: no route -> {err.status} {err.code}: {err.description}{extra}")
        return 1
    route = next(orig for orig, r in zip(config.routes, routes, strict=True) if r is match.route)
    needs = ("any" if route.host is None else route.host if host
             else f"{route.host} (not checked: give --host, or PATH as a URL)")
    print(f"route: {route.name} (line {route.line}) matches {method} {match.path}")
    print(f"  why: {'path ' + route.path if route.path else 'path_prefix ' + str(route.path_prefix)}"
          f"; methods {', '.join(route.methods) if route.methods else 'any'}; host {needs}")
    if match.params:
        print("  params: " + ", ".join(f"{k}={v}" for k, v in match.params.items()))
    print(f"  upstream: {route.upstream}, path sent: {match.upstream_path}")
    print(f"  forward: {route.forward.identity}")
    if not route.auth.required:
        print("  auth: public route, no token needed -> allowed")
        return 0
    if token is None:
        print("  auth: required (give --token to evaluate the rules) -> without a token: 401 invalid_request")
        return 1
    async with aiohttp.ClientSession() as session:
        caches = {i.name: JwksCache(i, session) for i in config.issuers}
        try:
            for cache in caches.values():
                await cache.start()
            verifier = TokenVerifier(config.issuers, caches, max_lifetime=config.revocation.max_token_lifetime)
            principal = await verifier.verify(token)
        except GatewayError as err:
            fetched = caches.get(getattr(err, "issuer", ""))
            why = (f"; but {fetched.issuer.name}'s keys could not be fetched (see the warnings above), so no kid "
                   "is known yet" if err.reason == "unknown_kid" and fetched is not None and not fetched.ready else "")
            print(f"  token: refused ({err.reason}{why}) -> {err.status} {err.code}")
            return 1
        finally:
            for cache in caches.values():
                await cache.close()
    print(f"  token: valid; issuer {principal.issuer}, sub {principal.subject}, "
          f"scopes {' '.join(sorted(principal.scopes)) or 'none'}")
    verdicts = evaluate(route.auth, principal, match.params)
    for v in verdicts:
        print(f"  {'PASS' if v.ok else 'FAIL'} {v.rule}: {v.detail}")
    failed = {v.rule for v in verdicts if not v.ok}
    # The server checks the issuer first (authz.Rules.check): a token of an issuer the route does not
    # accept is 401 invalid_token whatever else fails; any other failed rule is 403.
    print("  verdict: " + ("allowed (revocation is checked at request time)" if not failed
                           else "refused -> 401 invalid_token" if "issuers" in failed
                           else "refused -> 403 insufficient_scope"))
    return 0 if not failed else 1
