"""A token's life after admission: WebSocket sessions and long HTTP requests end when it expires or is
revoked (`watch`, `OpenRequests`)."""

from __future__ import annotations

import asyncio
import functools
import logging
import time
from collections.abc import Callable
from typing import Any, Protocol

from gateway.config_types import Config
from gateway.model import Principal
from gateway.pipeline import Exchange, Gateway

log = logging.getLogger("gateway")
# How often an open session's principal is looked at again: a revocation reaches every replica's view
# within a second (SPEC 6), and the session ends within this much after that.
WATCH_EVERY = 0.25


async def watch(gateway: Gateway, principal: Principal, *, clock: Callable[[], float] = time.time,
                every: float = WATCH_EVERY, current: Callable[[], Gateway | None] | None = None) -> str:
    """Returns once the session of `principal` must end: "expired" at its `exp` (+ its issuer's leeway,
    as long as a request with it would still pass), "revoked" once the revocation store refuses it.

    The store is asked again only when its view changed (its stamp, as ConnMemo's admissions), or on
    every look while the view is not live. A failed backend is not a verdict on the principal: under
    `on_backend_error: deny` new requests are refused, but an open session is not cut for a blip; it is
    looked at again next time.

    The store and the leeway are the current gateway's (`current()`, else `gateway`'s): a reload that
    replaces the store (another Redis) retires the old one, which then answers nothing, and a reload that
    changes an issuer's leeway changes when its sessions end."""
    revocations = gateway.revocations
    # Nothing seen yet: the first look asks the store (from a live view, answered locally). A stamp taken
    # here would already include a revocation made while the session was being set up (the upstream's
    # handshake), and that revocation would then never be looked for.
    seen: int | None = None
    config = gateway.config
    ends = _ends(config, principal)
    while True:
        wait = every
        if ends is not None:
            left = ends - clock()
            if left <= 0:
                return "expired"
            wait = min(wait, left)
        await asyncio.sleep(wait)
        now = (current() if current is not None else None) or gateway
        if now.config is not config:  # a reload: the issuer's leeway is the one a request would meet now
            config = now.config
            ends = _ends(config, principal)
            if ends is not None and ends <= clock():
                return "expired"
        if now.revocations is not revocations:
            revocations, seen = now.revocations, None  # another store: its stamps are not comparable
        stamp = _stamp(revocations)
        if stamp is not None and stamp == seen:
            continue
        revoked = await revocations.revoked(principal)  # counted nowhere: the checks metric counts requests
        if revoked:
            return "revoked"
        if revoked is None:
            continue  # the backend failed: no verdict; asked again next time
        seen = stamp


def _ends(config: Config, principal: Principal) -> float | None:
    """When a request with this principal's token stops passing: exp + its issuer's leeway (0 for an
    issuer no longer configured)."""
    if principal.exp is None:
        return None
    return principal.exp + next((i.leeway for i in config.issuers if i.name == principal.issuer), 0.0)


def _stamp(revocations: object) -> int | None:
    stamp: Callable[[], int | None] | None = getattr(revocations, "stamp", None)
    return stamp() if stamp is not None else None


class Answering(Protocol):
    """A request in flight: its `task` answers it (h1server's H1Request, app.py's _AioReply)."""

    @property
    def task(self) -> asyncio.Task[Any] | None: ...


class OpenRequests:
    """The HTTP requests in flight, so that one on an authenticated route does not outlive its token: a
    response streamed for minutes (server-sent events, a download) or an answer long awaited (long
    polling) ends when the token that was admitted expires or is revoked, as a WebSocket session does.

    A request is only registered (`open`): no task, no timer per request. Every WATCH_EVERY a sweep
    starts a `watch()` for each admitted request it finds open a second time (one older than
    WATCH_EVERY), so short requests never get one. When a watch returns, the exchange's `ended` is set
    and the request's task is cancelled; the request path (app.py) takes that cancellation back with
    `ended()` and answers 401 (nothing sent yet) or cuts the connection (the status line is out)."""

    def __init__(self, current: Callable[[], Gateway | None], *, every: float = WATCH_EVERY) -> None:
        self.open: dict[Exchange, Answering] = {}  # the request path adds and removes
        self._current = current
        self._every = every
        self._seen: set[Exchange] = set()  # open at the last sweep
        self._watchers: dict[Exchange, asyncio.Task[str]] = {}

    async def run(self) -> None:
        while True:
            await asyncio.sleep(self._every)
            self.sweep()

    def sweep(self) -> None:
        gateway = self._current()
        if gateway is None:
            return
        watchers = self._watchers
        for ex in [ex for ex in watchers if ex not in self.open]:
            watchers.pop(ex).cancel()  # its request ended
        seen = set()
        for ex, request in self.open.items():
            if ex in watchers or not ex.authorized or ex.principal is None:
                continue
            if ex not in self._seen:
                seen.add(ex)  # looked at again next sweep, if still open
                continue
            watcher = asyncio.ensure_future(watch(gateway, ex.principal, every=self._every, current=self._current))
            watcher.add_done_callback(functools.partial(self._cut, ex, request))
            watchers[ex] = watcher
        self._seen = seen

    def _cut(self, ex: Exchange, request: Answering, watcher: asyncio.Task[str]) -> None:
        task = request.task
        if watcher.cancelled() or self.open.get(ex) is not request or task is None:
            return
        if watcher.exception() is not None:
            log.error("request watcher failed: %r", watcher.exception())  # the request goes on
            return
        ex.ended = watcher.result()
        log.info("request cut by the gateway: token %s (request_id %s)", ex.ended, ex.request_id)
        task.cancel()

    @staticmethod
    def ended(ex: Exchange, task: asyncio.Task[Any] | None) -> str | None:
        """In the request's `except CancelledError`: "expired"/"revoked" when the cancellation was this
        watch's (and is taken back), None when it is someone else's (shutdown, a client gone) and must
        go on."""
        if ex.ended is None or task is None or task.uncancel() > 0:
            return None
        return ex.ended

    def close(self) -> None:
        for watcher in self._watchers.values():
            watcher.cancel()
        self._watchers.clear()
        self._seen.clear()
