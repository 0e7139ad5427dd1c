"""A token's life after admission: `watch` tells when an open WebSocket session must end (its token
expired or was revoked)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable

from gateway.config_types import Config
from gateway.errors import GatewayError, InvalidToken
from gateway.model import Principal
from gateway.pipeline import Gateway

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
        try:
            await revocations.check(principal)
        except InvalidToken:
            return "revoked"
        except GatewayError:
            continue  # the backend failed (deny): no verdict; asked again next time
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

