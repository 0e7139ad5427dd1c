"""`gateway demo`: a development issuer, two sample services and the gateway, on this machine, in one process."""

from __future__ import annotations

import asyncio
import json
import os
import shlex
import signal
from pathlib import Path
from typing import Any

from aiohttp import web

from gateway.config import load
from gateway.config_types import RevocationConfig
from gateway.devissuer import DevIssuer
from gateway.revocation import forget_jtis

# Fixed ports so the printed curl lines are stable; each can be moved with an environment variable.
ISSUER_PORT = int(os.environ.get("DEMO_ISSUER_PORT", "8400"))
ORDERS_PORT = int(os.environ.get("DEMO_ORDERS_PORT", "8401"))
USERS_PORT = int(os.environ.get("DEMO_USERS_PORT", "8402"))
# The guide's token ids, fixed so that its lines read the same at every run.
ALICE_JTI, OTHER_JTI, ADMIN_JTI = "demo-alice-1", "demo-alice-2", "demo-admin"


def demo_config_path() -> Path:
    for base in (Path.cwd(), Path(__file__).resolve().parent.parent):
        candidate = base / "config" / "demo.yaml"
        if candidate.is_file():
            return candidate
    raise FileNotFoundError("config/demo.yaml not found (run from the project directory)")


def sample_service(name: str) -> web.Application:
    """A service behind the gateway: answers with what it received, so the identity headers show."""

    async def echo(request: web.Request) -> web.Response:
        size = 0
        async for chunk in request.content.iter_any():
            size += len(chunk)
        return web.json_response({
            "service": name, "method": request.method, "path": request.path_qs, "body_bytes": size,
            "headers": {k: v for k, v in request.headers.items()},
        }, dumps=lambda d: json.dumps(d, indent=1))

    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    return app


async def _site(app: web.Application, port: int) -> web.AppRunner:
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner


async def run_demo(config_path: str | None = None, *, stop: asyncio.Event | None = None) -> int:
    from gateway.app import GatewayApp

    if os.environ.get("REDIS_URL"):
        os.environ.setdefault("DEMO_REVOCATION_BACKEND", "redis")
    path = Path(config_path) if config_path else demo_config_path()
    issuer = DevIssuer("dev", audience="demo-api", subject="alice")
    runners: list[web.AppRunner] = []
    gateway: GatewayApp | None = None
    try:
        await issuer.start("127.0.0.1", ISSUER_PORT)
        runners.append(await _site(sample_service("orders"), ORDERS_PORT))
        runners.append(await _site(sample_service("users"), USERS_PORT))
        os.environ.setdefault("DEMO_ISSUER", issuer.url)
        os.environ.setdefault("DEMO_ORDERS", f"http://127.0.0.1:{ORDERS_PORT}")
        os.environ.setdefault("DEMO_USERS", f"http://127.0.0.1:{USERS_PORT}")
        config = load(path)
        if config.revocation.backend == "redis":
            await _forget_earlier_runs(config.revocation)
        gateway = GatewayApp(config)
        await gateway.start()
        _print_guide(issuer, gateway.public_port, gateway.admin_port, config.revocation.backend)
        done = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, done.set)
        await done.wait()
        print("\nstopping the demo ...", flush=True)
    finally:
        if gateway is not None:
            await gateway.drain_and_stop()
        for runner in runners:
            await runner.cleanup()
        await issuer.stop()
    return 0


async def _forget_earlier_runs(cfg: RevocationConfig) -> None:
    """A jti revocation is absolute and, in Redis, outlives the demo (kept for max_token_lifetime): without
    this, a second run would find the guide's "200" token already revoked by the first run's guide."""
    await forget_jtis(cfg, (ALICE_JTI, OTHER_JTI, ADMIN_JTI))


def _print_guide(issuer: DevIssuer, port: int, admin_port: int, backend: str) -> None:
    base, admin = f"http://127.0.0.1:{port}", f"http://127.0.0.1:{admin_port}"
    alice: dict[str, Any] = {"sub": "alice", "scope": "orders:read orders:write profile", "tenant_id": "acme",
                             "sid": "session-1", "jti": ALICE_JTI}
    good = issuer.token(alice, ttl=3600)
    other = issuer.token({**alice, "jti": OTHER_JTI}, ttl=3600)
    admin_token = issuer.token({"sub": "ops", "scope": "gateway:admin", "jti": ADMIN_JTI}, ttl=3600)
    bearer = "Authorization: Bearer "

    def curl(*parts: str) -> str:
        return "curl -s -i " + " ".join(shlex.quote(p) for p in parts)

    revoke_body = json.dumps({"type": "jti", "value": ALICE_JTI})
    lines = [
        "gateway demo is running (Ctrl-C stops it)",
        f"  development issuer   {issuer.url}",
        f"  sample services      orders http://127.0.0.1:{ORDERS_PORT}, users http://127.0.0.1:{USERS_PORT}",
        f"  gateway              {base}   admin {admin}   revocation: {backend}",
        "",
        "# 200: a valid token; the service sees X-Auth-* identity headers and no Authorization header",
        curl("-H", bearer + good, f"{base}/api/tenants/acme/orders/42"),
        "# 200: token mode: the service receives a short-lived internal token signed by the gateway",
        curl("-X", "POST", "-H", bearer + good, "--data", '{"item": "book"}', f"{base}/api/tenants/acme/orders"),
        "# 401: no token",
        curl(f"{base}/api/tenants/acme/orders/42"),
        "# 403: tenant isolation: alice belongs to acme, not globex",
        curl("-H", bearer + good, f"{base}/api/tenants/globex/orders/42"),
        "# 404: no route",
        curl("-H", bearer + good, f"{base}/nowhere"),
        "# 200: a public route, no token needed",
        curl(f"{base}/public/hello"),
        "# revoke alice's token by its jti through the admin API (admin token with scope gateway:admin) ...",
        curl("-X", "POST", "-H", bearer + admin_token, "-H", "Content-Type: application/json", "--data",
             revoke_body, f"{admin}/admin/revocations"),
        "# ... and the same request as the first is now refused: 401 (another token of alice still works)",
        curl("-H", bearer + good, f"{base}/api/tenants/acme/orders/42"),
        curl("-H", bearer + other, f"{base}/api/tenants/acme/orders/42"),
        "# the gateway's public keys, for services verifying the internal token; metrics; the access matrix",
        curl(f"{admin}/.well-known/jwks.json"),
        curl(f"{admin}/metrics"),
        curl("-H", bearer + admin_token, f"{admin}/admin/routes"),
        f"# more tokens: {issuer.url}/protocol/openid-connect/token?sub=bob&scope=orders:read&tenant_id=acme",
        "",
    ]
    print("\n".join(lines), flush=True)
