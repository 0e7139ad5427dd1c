"""Sample upstream for deploy/compose.yaml: answers every request with what it received, as JSON.

Shows what the gateway forwards: the rewritten path, the X-Auth-* identity headers or the internal
token, X-Forwarded-*, X-Request-Id. Environment: SERVICE_NAME, HOST (default 0.0.0.0),
PORT (default 8000; 0 picks a free port). Prints `listening on http://HOST:PORT` once serving.
"""

from __future__ import annotations

import asyncio
import os

from aiohttp import web

SERVICE_NAME = os.environ.get("SERVICE_NAME", "echo")


async def echo(request: web.Request) -> web.Response:
    body = await request.read()
    return web.json_response({
        "service": SERVICE_NAME,
        "method": request.method,
        "path": request.path,
        "query": request.query_string,
        "headers": dict(request.headers),
        "body_bytes": len(body),
    })


async def main() -> None:
    app = web.Application()
    app.router.add_route("*", "/{tail:.*}", echo)
    runner = web.AppRunner(app)
    await runner.setup()
    await web.TCPSite(runner, os.environ.get("HOST", "0.0.0.0"), int(os.environ.get("PORT", "8000"))).start()
    host, port = runner.addresses[0][:2]
    print(f"listening on http://{host}:{port} as {SERVICE_NAME}", flush=True)
    try:
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()


if __name__ == "__main__":
    asyncio.run(main())
