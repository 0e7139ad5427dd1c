"""WebSocket proxying for routes with `match.websocket: true`: the upgrade passes only after auth."""

from __future__ import annotations

import asyncio
import contextlib

import aiohttp
from aiohttp import web

from gateway.errors import NotFound
from gateway.model import RequestView
from gateway.pipeline import Exchange, Gateway


async def proxy_websocket(gateway: Gateway, request: web.BaseRequest, view: RequestView,
                          ex: Exchange) -> web.StreamResponse:
    match, headers = await gateway.admit(view, ex)  # route, token, revocation and rules, as for HTTP
    if not match.route.websocket:
        # An Upgrade on a route that does not allow it is not proxied as one (SPEC 4 strips Upgrade).
        raise NotFound()
    protocols = tuple(p.strip() for p in request.headers.get("Sec-WebSocket-Protocol", "").split(",") if p.strip())
    path_qs = match.upstream_path + ("?" + view.query_string if view.query_string else "")
    upstream = await gateway.upstreams.open_websocket(match.route.upstream, path_qs, headers, protocols)
    client = web.WebSocketResponse(protocols=(upstream.protocol,) if upstream.protocol else ())
    try:
        await client.prepare(request)
        await _bridge(client, upstream)
    finally:
        await upstream.close()
        await client.close()
    return client


async def _bridge(client: web.WebSocketResponse, upstream: aiohttp.ClientWebSocketResponse) -> None:
    """Frames flow both ways; when either side closes, the other is closed with the same code."""

    async def pump(src: web.WebSocketResponse | aiohttp.ClientWebSocketResponse,
                   dst: web.WebSocketResponse | aiohttp.ClientWebSocketResponse) -> None:
        async for msg in src:
            if msg.type == aiohttp.WSMsgType.TEXT:
                await dst.send_str(msg.data)
            elif msg.type == aiohttp.WSMsgType.BINARY:
                await dst.send_bytes(msg.data)
            elif msg.type == aiohttp.WSMsgType.ERROR:
                break
        await dst.close(code=src.close_code or aiohttp.WSCloseCode.OK)

    tasks = [asyncio.ensure_future(pump(client, upstream)), asyncio.ensure_future(pump(upstream, client))]
    _, pending = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
    for task in pending:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError, Exception):
            await task
