"""WebSocket proxying for routes with `match.websocket: true`: the upgrade passes only after auth, and
the session ends when the token that opened it expires or is revoked."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
from aiohttp import web

from gateway.errors import NotFound
from gateway.lifetime import watch
from gateway.model import RequestView
from gateway.pipeline import Exchange, Gateway

log = logging.getLogger("gateway")


async def proxy_websocket(gateway: Gateway, request: web.BaseRequest, view: RequestView, ex: Exchange,
                          current: Callable[[], Gateway | None] | None = None) -> web.StreamResponse:
    """`current`: the gateway now (a reload swaps it): its revocation store watches the open session."""
    match, headers = await gateway.admit(view, ex)  # route, token, revocation and rules, as for HTTP
    if not match.route.websocket:
        # An Upgrade on a route that does not allow it is not proxied as one (SPEC 4 strips Upgrade).
        raise NotFound()
    protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())
    path_qs = match.upstream_path + ("?" + view.query_string if view.query_string else "")
    upstream = await gateway.upstreams.open_websocket(match.route.upstream, path_qs, headers, protocols)
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
    principal = ex.principal if ex.authorized else None
    try:
        await client.prepare(request)
        watcher = None if principal is None else watch(gateway, principal, current=current)
        ended = await _bridge(client, upstream, watcher)
        if ended is not None:
            log.info("websocket closed by the gateway: token %s (request_id %s)", ended, ex.request_id)
    finally:
        await upstream.close()
        await client.close()
    return client


async def _bridge(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse,
                  watcher: Awaitable[str] | None = None) -> str | None:
    """Frames flow both ways; when either side closes, the other is closed with the same code. When the
    watcher returns first, both sides are closed with 1008 (policy violation) and its reason is returned."""

    async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        await dst.close(code=_on_the_wire(src.close_code))

    tasks: list[asyncio.Future[Any]] = [asyncio.ensure_future(pump(client, upstream)),
                                        asyncio.ensure_future(pump(upstream, client))]
    if watcher is not None:
        tasks.append(asyncio.ensure_future(watcher))
    try:
        done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    finally:
        # Also when the handler itself is cancelled (shutdown): no pump, and no watcher asking a store
        # that is being closed, outlives the session.
        for task in tasks:
            if not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
    watching = tasks[2] if watcher is not None else None
    if watching is None or watching not in done:
        return None
    if watching.exception() is not None:
        log.error("websocket watcher failed: %r", watching.exception())  # the session ends as any
        return None
    reason: str = watching.result()
    message = f"token {reason}".encode()
    # Both at once: a client that never answers the close frame must not hold the upstream's session
    # open for the close handshake's timeout (10 s).
    await asyncio.gather(*(side.close(code=aiohttp.WSCloseCode.POLICY_VIOLATION, message=message)
                           for side in (upstream, client)), return_exceptions=True)
    return reason


def _on_the_wire(code: int | None) -> int:
    """The close code to send on for one received (or not): RFC 6455 s7.4.1 reserves 1005 (no code), 1006
    (closed without a close frame) and 1015 (TLS failure) for reporting; they are never sent in a frame."""
    if code is None or code == aiohttp.WSCloseCode.OK or code == 1005:
        return int(aiohttp.WSCloseCode.OK)
    if code in (1006, 1015):
        return int(aiohttp.WSCloseCode.GOING_AWAY)
    return code
