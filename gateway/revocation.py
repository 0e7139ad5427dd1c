"""Revocation stores (SPEC 6): Redis keys + pub/sub feeding a local view, and a one-process memory store.

The only module that imports redis. Hot path: `check()` answers from the local view with a few dict
lookups; the view is trusted only while the subscription that keeps it current is known to be live.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import itertools
import json
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import Any, Protocol

import redis.asyncio as aioredis
from redis.asyncio.client import PubSub
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from gateway import errors, metrics
from gateway.config_types import RevocationConfig
from gateway.model import MAX_REVOCABLE, Principal
from gateway.tokens import UNSAFE_VALUE

log = logging.getLogger("gateway.revocation")

Clock = Callable[[], float]
KINDS = ("jti", "subject", "session")
_KEY_PART = {"jti": "jti", "subject": "sub", "session": "sid"}
_KIND_OF_PART = {v: k for k, v in _KEY_PART.items()}

DIRECT_TIMEOUT = 0.25  # a request waits at most this long for Redis while the view is not live
DOWN_MEMO = 0.1  # after a failed direct check, the next ones fail at once for this long
WRITE_TIMEOUT = 2.0
MAX_EXP = 253402300799  # 9999-12-31T23:59:59Z, the last second of a four-digit year
START_WAIT = 2.0  # start() waits this long for the first sync; readiness reports the rest
POLL = 0.1  # listener wake-up: ping timing and expiry purge
PING_EVERY = 0.3
DEAD_AFTER = 1.0  # nothing (not even a PONG) heard for this long: the subscription is dead
# A live view also re-reads the keys this often, so a key written with no message (SPEC 6 asks writers
# for both, but a hand-written SET or a writer that lost its PUBLISH happens) is honoured within it.
RESYNC_EVERY = 30.0
BACKOFF_MIN, BACKOFF_MAX = 0.05, 1.0  # capped low so recovery after a Redis restart is quick
_BACKEND_ERRORS = (RedisError, OSError, TimeoutError)


class RevocationStore(Protocol):
    backend_up: bool

    async def start(self) -> None: ...
    async def close(self) -> None: ...
    def ready(self) -> bool: ...
    async def check(self, p: Principal) -> None: ...
    async def revoked(self, p: Principal) -> bool | None: ...
    def check_local(self, p: Principal) -> bool: ...
    def stamp(self) -> int | None: ...
    def passed_again(self, stamp: int) -> bool: ...
    async def revoke(
        self, kind: str, value: str, issuer: str | None, *, exp: int | None = None
    ) -> dict[str, Any]: ...


def _parse_time(raw: bytes | str | None) -> float:
    """A revocation time T; unreadable values revoke everything for that key (fail closed)."""
    try:
        t = float(raw)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return math.inf
    return t if not math.isnan(t) else math.inf


def _hit(entry: tuple[float, float] | None, iat: int | None, clock: Clock) -> bool:
    # A token without iat cannot prove it was issued after T: revoked (fail closed).
    return entry is not None and (iat is None or iat <= entry[0]) and entry[1] > clock()


# Every view's change numbers come from one counter: a rebuilt view never repeats an old view's number.
_STAMPS = itertools.count(1)


class _View:
    """The local copy of every live revocation: jti -> expiry, issuer -> subject/session -> (T, expiry).

    `stamp` changes whenever the view may refuse more than it did: on every apply(). Entries only leave
    it (purge, expiry) without a change, and that never refuses a token that passed. Every revocation
    must come in through apply() (or a new _View): pipeline.ConnMemo readmits a principal that passed
    while the stamp it passed at is unchanged."""

    __slots__ = ("jti", "sub", "sid", "_heap", "stamp")

    def __init__(self) -> None:
        self.stamp = next(_STAMPS)
        self.jti: dict[str, float] = {}
        self.sub: dict[str, dict[str, tuple[float, float]]] = {}
        self.sid: dict[str, dict[str, tuple[float, float]]] = {}
        self._heap: list[tuple[float, str, str, str]] = []  # (expires_at, kind, issuer, value)

    def revoked(self, p: Principal, clock: Clock) -> bool:
        # The clock is read only when something matched: the common case is three misses.
        if p.jti is not None and self.jti:
            exp = self.jti.get(p.jti)
            if exp is not None and exp > clock():
                return True
        # Written out twice rather than looped: no per-request tuple allocation on this path.
        if p.subject is not None and self.sub:
            per_issuer = self.sub.get(p.issuer)
            if per_issuer is not None and _hit(per_issuer.get(p.subject), p.iat, clock):
                return True
        if p.session is not None and self.sid:
            per_issuer = self.sid.get(p.issuer)
            if per_issuer is not None and _hit(per_issuer.get(p.session), p.iat, clock):
                return True
        return False

    def apply(self, kind: str, issuer: str | None, value: str, at: float, expires_at: float,
              *, replace: bool = False) -> None:
        """Record one revocation; merging keeps the later T and expiry so a stale hint never un-revokes."""
        self.stamp = next(_STAMPS)
        if kind == "jti":
            old = self.jti.get(value)
            self.jti[value] = expires_at if replace or old is None else max(old, expires_at)
            issuer = ""
        else:
            table = self.sub if kind == "subject" else self.sid
            per_issuer = table.setdefault(issuer or "", {})
            prev = per_issuer.get(value)
            if prev is not None and not replace:
                at, expires_at = max(prev[0], at), max(prev[1], expires_at)
            per_issuer[value] = (at, expires_at)
        if expires_at != math.inf:
            heapq.heappush(self._heap, (expires_at, kind, issuer or "", value))

    def covers(self, kind: str, issuer: str | None, value: str, at: float) -> bool:
        """An entry revoking at least this much is held already (a merge then adds nothing)."""
        if kind == "jti":
            return value in self.jti
        entry = (self.sub if kind == "subject" else self.sid).get(issuer or "", {}).get(value)
        return entry is not None and entry[0] >= at

    def entries(self) -> Iterator[tuple[str, str, str, float, float]]:
        """Every entry held, as (kind, issuer, value, T, expires_at); a jti's issuer is "" and its T 0."""
        for value, expires_at in self.jti.items():
            yield "jti", "", value, 0.0, expires_at
        for kind, table in (("subject", self.sub), ("session", self.sid)):
            for issuer, per_issuer in table.items():
                for value, (at, expires_at) in per_issuer.items():
                    yield kind, issuer, value, at, expires_at

    def purge(self, now: float) -> None:
        """Drop entries whose key has expired in Redis too (bounded memory)."""
        heap = self._heap
        while heap and heap[0][0] <= now:
            _, kind, issuer, value = heapq.heappop(heap)
            if kind == "jti":
                exp = self.jti.get(value)
                if exp is not None and exp <= now:
                    del self.jti[value]
                continue
            table = self.sub if kind == "subject" else self.sid
            per_issuer = table.get(issuer)
            if per_issuer is not None:
                entry = per_issuer.get(value)
                if entry is not None and entry[1] <= now:
                    del per_issuer[value]
                    if not per_issuer:
                        del table[issuer]


@dataclass(frozen=True, slots=True)
class _Write:
    kind: str
    issuer: str | None
    value: str
    key: str
    stored: str  # what the key holds: "1" for a jti, T for a subject/session
    ttl: int
    at: int

    def record(self) -> dict[str, Any]:
        return {"type": self.kind, "value": self.value, "issuer": self.issuer,
                "key": self.key, "stored": self.stored, "ttl": self.ttl, "at": self.at}

    def message(self) -> str:
        return json.dumps({"type": self.kind, "value": self.value, "issuer": self.issuer, "at": self.at})


def key_for(prefix: str, kind: str, value: str, issuer: str | None) -> str:
    if kind == "jti":
        return f"{prefix}jti:{value}"
    return f"{prefix}{_KEY_PART[kind]}:{issuer}:{value}"


MAX_VALUE = MAX_REVOCABLE  # characters of a revoked jti, subject or session (longer tokens never verify)


def _cause(exc: BaseException) -> str:
    """`ConnectionError (Error 111 connecting to 127.0.0.1:6380. Connection refused.)`: redis-py's words name
    the address, never the URL's password."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__} ({text})" if text else type(exc).__name__


def _has_utf8_form(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _plan_write(cfg: RevocationConfig, kind: str, value: str, issuer: str | None,
                exp: int | None, now: float) -> _Write:
    if kind not in KINDS:
        raise ValueError(f"unknown revocation type {kind!r}; expected one of: {', '.join(KINDS)}")
    if not value:
        raise ValueError("the revoked value must not be empty")
    if not _has_utf8_form(value) or (issuer is not None and not _has_utf8_form(issuer)):
        # A lone surrogate (JSON "\ud800", or argv bytes that are not UTF-8) cannot be a Redis key, and
        # no token carrying it verifies (tokens.py refuses such identities).
        raise ValueError("the revoked value and issuer must be UTF-8 text")
    if len(value) > MAX_VALUE:
        raise ValueError(f"the revoked value is longer than {MAX_VALUE} characters")
    if UNSAFE_VALUE.search(value):  # what tokens.py refuses in an identity (surrogates are refused above)
        # No token carrying one verifies either (tokens.py): such a key would revoke nothing, and the CLI
        # and the admin API say so alike.
        raise ValueError("the revoked value must not hold control characters (CR, LF, NUL, DEL, ...)")
    if kind != "jti" and not issuer:
        raise ValueError(f"a {kind} revocation needs the issuer's name")
    if issuer is not None and ":" in issuer:
        raise ValueError("issuer names cannot contain ':' (it separates the key's parts)")
    if exp is not None and kind != "jti":
        # Said, not ignored: a subject or session revocation covers every token issued up to now, whatever
        # its exp, and is kept max_token_lifetime (SPEC 6).
        raise ValueError(f"exp applies to jti revocations only; a {kind} revocation covers every token issued "
                         "up to now and is kept max_token_lifetime")
    if exp is not None and (isinstance(exp, bool) or not isinstance(exp, int) or not 0 <= exp <= MAX_EXP):
        # Bounded so the TTL stays a number Redis takes: an int past float range would raise
        # OverflowError below, and an expiry past Redis' range would fail the write as if Redis were down.
        raise ValueError(f"exp must be a UNIX time in whole seconds between 0 and {MAX_EXP}")
    at = int(now)  # iat is whole seconds; a token issued within this second is revoked too (fail closed)
    # The key only has to outlive the tokens it revokes; a token passes until exp + leeway, hence the
    # grace (the largest issuer leeway). jti without exp, and subject/session: the longest a token lives.
    if kind == "jti":
        ttl = math.ceil((exp - now if exp is not None else cfg.max_token_lifetime) + cfg.grace)
        stored = "1"
    else:
        ttl, stored = math.ceil(cfg.max_token_lifetime + cfg.grace), str(at)
    return _Write(kind, issuer, value, key_for(cfg.key_prefix, kind, value, issuer), stored, max(1, ttl), at)


async def forget_jtis(cfg: RevocationConfig, jtis: Iterable[str]) -> None:
    """Delete these jti revocations from Redis, best effort (the demo's own fixed token ids: a second run
    must not find them revoked by the first). An unreachable Redis is left to say so itself."""
    client = aioredis.Redis.from_url(cfg.redis_url, socket_timeout=1.0, socket_connect_timeout=0.5)
    try:
        await client.delete(*(key_for(cfg.key_prefix, "jti", jti, None) for jti in jtis))
    except _BACKEND_ERRORS:
        pass
    finally:
        await client.aclose()


def _parse_message(data: bytes | str) -> tuple[str, str | None, str, float]:
    """A published event -> (kind, issuer, value, at); ValueError when it cannot be understood."""
    try:
        msg = json.loads(data)
    except RecursionError:  # nested deeper than json decodes: unreadable like any other bad message
        raise ValueError("nested too deeply") from None
    if not isinstance(msg, dict):
        raise ValueError("not an object")
    kind, value, issuer, at = msg.get("type"), msg.get("value"), msg.get("issuer"), msg.get("at")
    if kind not in KINDS or not isinstance(value, str) or not value:
        raise ValueError("bad type or value")
    if issuer is not None and not isinstance(issuer, str):
        raise ValueError("bad issuer")
    if kind != "jti" and not issuer:
        raise ValueError("issuer missing")
    if isinstance(at, bool) or not isinstance(at, int | float):
        if kind != "jti":
            raise ValueError("bad at")
        at = 0
    return kind, issuer, value, float(at)


def _parse_key(key: str, prefix: str) -> tuple[str, str | None, str] | None:
    """`{prefix}jti:X` / `{prefix}sub:ISS:X` / `{prefix}sid:ISS:X` -> (kind, issuer, value)."""
    part, _, rest = key[len(prefix):].partition(":")
    kind = _KIND_OF_PART.get(part)
    if kind is None or not rest:
        return None
    if kind == "jti":
        return kind, None, rest
    issuer, _, value = rest.partition(":")
    return (kind, issuer, value) if issuer and value else None


# Writes a revocation back unless its key revokes as much already: absent, or holding a lower T (a
# subject/session's UNIX time: the later one wins). A jti's "1" is never lower than "1", so for a jti this
# is SET NX. A value that is not a number revokes everything (_parse_time): left as it is. PX 0: no expiry.
_RESTORE = """
local held = redis.call('GET', KEYS[1])
if held and not (tonumber(held) and tonumber(held) < tonumber(ARGV[1])) then return 0 end
if ARGV[2] == '0' then redis.call('SET', KEYS[1], ARGV[1]) else redis.call('SET', KEYS[1], ARGV[1], 'PX', ARGV[2]) end
return 1
"""


_RESTORE_BATCH = 1000  # script calls per pipeline round trip


def _stored_form(kind: str, at: float) -> str:
    """What a key holds for an entry of the view: "1", or T in whole seconds (iat is whole seconds, so
    iat <= T exactly when iat <= floor(T)); a T that is not finite revokes every token, as MAX_EXP does."""
    if kind == "jti":
        return "1"
    return str(math.floor(at)) if math.isfinite(at) else str(MAX_EXP)


def _glob_escape(text: str) -> str:
    return "".join("\\" + c if c in "*?[]\\" else c for c in text)


class _Results:
    """The check outcome counters, labelled once."""

    def __init__(self) -> None:
        c = metrics.revocation_checks_total
        self.ok, self.revoked = c.labels(result="ok"), c.labels(result="revoked")
        self.count_ok = metrics.incrementer(self.ok)  # once per request: the lean increment
        self.denied = c.labels(result="backend_error_denied")
        self.allowed = c.labels(result="backend_error_allowed")

    def verdict(self, p: Principal, revoked: bool) -> None:
        """Count the outcome; a revoked token is refused (RFC 6750 s3.1 invalid_token)."""
        if revoked:
            self.revoked.inc()
            raise errors.InvalidToken("revoked", issuer=p.issuer)
        self.count_ok(1)


def _passed_again(view: _View, results: _Results, stamp: int) -> bool:
    """A principal that passed `view` at `stamp` passes again, counted as an ok check, while the view's stamp
    is unchanged (both stores' passed_again; the Redis one also needs its view live)."""
    if view.stamp == stamp:
        results.count_ok(1)
        return True
    return False


class MemoryRevocationStore:
    """One process only (demo, tests of other parts): the view is the whole truth."""

    backend_up = True

    def __init__(self, cfg: RevocationConfig, *, clock: Clock = time.time) -> None:
        self._cfg, self._clock = cfg, clock
        self._view = _View()
        self._results = _Results()

    async def start(self) -> None:
        metrics.revocation_backend_up.set(1)

    async def close(self) -> None:
        return None

    def ready(self) -> bool:
        return True

    def check_local(self, p: Principal) -> bool:
        """check() without a coroutine: the view is the whole truth here, so always answered (True)."""
        self._results.verdict(p, self._view.revoked(p, self._clock))
        return True

    def stamp(self) -> int | None:
        return self._view.stamp

    def passed_again(self, stamp: int) -> bool:
        return _passed_again(self._view, self._results, stamp)

    async def check(self, p: Principal) -> None:
        self.check_local(p)

    async def revoked(self, p: Principal) -> bool | None:
        """RedisRevocationStore.revoked(): uncounted, for watchers."""
        return self._view.revoked(p, self._clock)

    async def revoke(
        self, kind: str, value: str, issuer: str | None, *, exp: int | None = None
    ) -> dict[str, Any]:
        now = self._clock()
        w = _plan_write(self._cfg, kind, value, issuer, exp, now)
        self._view.purge(now)  # amortised cleanup: memory stays bounded by the live revocations
        self._view.apply(kind, issuer, value, w.at, now + w.ttl)
        return w.record()


def redis_url_problem(url: str) -> str | None:
    """What redis-py refuses in a redis_url (an unknown `?option`, a value it cannot read), found without
    connecting: the client would otherwise fail every connection attempt, for ever, a traceback each."""
    try:
        aioredis.ConnectionPool.from_url(url).make_connection()  # type: ignore[no-untyped-call]
    except (ValueError, TypeError, RedisError) as exc:  # TypeError: an option no connection takes
        return f"redis-py cannot use this URL: {' '.join(str(exc).split())}"
    return None


class RedisRevocationStore:
    """Shared by every replica through Redis; a pub/sub-fed local view answers checks."""

    def __init__(self, cfg: RevocationConfig, *, clock: Clock = time.time) -> None:
        self._cfg, self._clock = cfg, clock
        self._prefix = cfg.key_prefix
        self._channel = cfg.key_prefix + "events"
        self._deny = cfg.on_backend_error != "allow"
        self._results = _Results()
        self._view = _View()
        self._live = False
        self._live_event = asyncio.Event()
        self.backend_up = False
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._down_until = 0.0  # loop time until which direct checks skip a Redis that just failed
        self._seen: dict[tuple[str, str, str], float] | None = None  # what the last resync found (_write_back)
        self._restore_script: Any = None  # _RESTORE, registered on first use (EVALSHA)
        problem = redis_url_problem(cfg.redis_url)
        if problem:  # a reload with it is refused; `check` and `run` name it first (cli)
            raise ValueError(f"revocation.redis_url: {problem}")
        common: dict[str, Any] = {"socket_timeout": 1.0, "socket_connect_timeout": 0.5}
        # Commands may retry once: a pooled connection left stale by a Redis restart reconnects silently.
        self._redis = aioredis.Redis.from_url(cfg.redis_url, retry=Retry(NoBackoff(), 1), **common)
        # The subscription must NEVER reconnect silently (redis-py would resubscribe and we would miss
        # what was published in the gap), so it has its own client with no retry: any error -> resync.
        self._sub = aioredis.Redis.from_url(cfg.redis_url, retry=Retry(NoBackoff(), 0), **common)

    # -- lifecycle ---------------------------------------------------------------------------------

    async def start(self) -> None:
        metrics.revocation_backend_up.set(0)
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="revocation-sync")
        await self.wait_live(START_WAIT)

    async def close(self) -> None:
        self._closing = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            # redis-py can swallow a cancellation that lands mid-command; the flag ends the loop anyway
            # (within one POLL). asyncio.wait, unlike awaiting the task, never eats our own cancellation.
            await asyncio.wait({task}, timeout=DEAD_AFTER * 2)
        self._set_live(False)
        await self._sub.aclose()
        await self._redis.aclose()

    def ready(self) -> bool:
        return self._live

    async def wait_live(self, within: float) -> bool:
        """True once the view is live (subscribed and synced), False if not within `within` seconds."""
        try:
            async with asyncio.timeout(within):
                await self._live_event.wait()
        except TimeoutError:
            return False
        return True

    def _set_live(self, live: bool) -> None:
        if live == self._live:
            return
        self._live = self.backend_up = live
        metrics.revocation_backend_up.set(1 if live else 0)
        if live:
            self._live_event.set()
        else:
            self._live_event.clear()

    # -- request path ------------------------------------------------------------------------------

    def check_local(self, p: Principal) -> bool:
        """The hot path, synchronous: answered from the view when it is live (True; raises when revoked).
        False: the view cannot be trusted now, the caller must await check() (which asks Redis)."""
        if not self._live:
            return False
        self._results.verdict(p, self._view.revoked(p, self._clock))
        return True

    def stamp(self) -> int | None:
        """The view's change number while it answers checks (None while it is not live): a principal
        check_local() passed at stamp S passes again while the stamp is still S (see passed_again)."""
        return self._view.stamp if self._live else None

    def passed_again(self, stamp: int) -> bool:
        """check_local() for a principal that passed at `stamp`, without looking it up: True (counted as
        an ok check) while the view is live and unchanged since; False: call check_local()."""
        return self._live and _passed_again(self._view, self._results, stamp)

    async def check(self, p: Principal) -> None:
        # The view only ever misses revocations, so what it holds is refused even while it is not live
        # (Redis may be down, or back without the keys: see _restore); what it lacks is asked of Redis.
        revoked = self._view.revoked(p, self._clock)
        if not (revoked or self._live):
            direct = await self._check_direct(p)
            if direct is None:
                return
            revoked = direct
        self._results.verdict(p, revoked)

    async def revoked(self, p: Principal) -> bool | None:
        """For a watcher of an open session or request: is `p` revoked now? None when the backend cannot
        tell (on_backend_error does not apply: nothing is refused). Counts nothing: the checks metric
        counts requests."""
        known = self._view.revoked(p, self._clock)
        if known or self._live:
            return known
        return await self._lookup(p)

    async def _check_direct(self, p: Principal) -> bool | None:
        """The view may have missed messages: ask Redis. None = backend failed and policy is allow."""
        revoked = await self._lookup(p)
        if revoked is None:
            self._backend_failed()
        return revoked

    async def _lookup(self, p: Principal) -> bool | None:
        """Ask Redis directly; None when it failed (or failed just before: DOWN_MEMO)."""
        keys: list[str] = []
        if p.jti is not None:
            keys.append(key_for(self._prefix, "jti", p.jti, None))
        n_jti = len(keys)
        if p.subject is not None:
            keys.append(key_for(self._prefix, "subject", p.subject, p.issuer))
        if p.session is not None:
            keys.append(key_for(self._prefix, "session", p.session, p.issuer))
        if not keys:
            return False
        loop = asyncio.get_running_loop()
        if loop.time() < self._down_until:
            return None
        try:
            async with asyncio.timeout(DIRECT_TIMEOUT):
                values = await self._redis.mget(keys)
        except _BACKEND_ERRORS:
            # Remember the failure briefly: under load, a hung Redis would otherwise collect one
            # connection per request; the background task keeps probing and goes live on recovery.
            self._down_until = loop.time() + DOWN_MEMO
            return None
        if n_jti and values[0] is not None:
            return True
        return any(
            v is not None and (p.iat is None or p.iat <= _parse_time(v)) for v in values[n_jti:]
        )

    def _backend_failed(self) -> None:
        """on_backend_error: deny fails closed (503); allow lets the request through and counts it."""
        if self._deny:
            self._results.denied.inc()
            raise errors.BackendUnavailable()
        self._results.allowed.inc()

    # -- writers -----------------------------------------------------------------------------------

    async def revoke(
        self, kind: str, value: str, issuer: str | None, *, exp: int | None = None
    ) -> dict[str, Any]:
        now = self._clock()
        w = _plan_write(self._cfg, kind, value, issuer, exp, now)
        try:
            async with asyncio.timeout(WRITE_TIMEOUT):
                # MULTI/EXEC: the key and its announcement go together or not at all.
                pipe = self._redis.pipeline(transaction=True)
                pipe.set(w.key, w.stored, ex=w.ttl)
                pipe.publish(self._channel, w.message())
                await pipe.execute()
        except _BACKEND_ERRORS as exc:
            # The cause stays on the exception for `gateway revoke` to name; the admin API's client sees
            # SPEC 5's fixed description only.
            raise errors.BackendUnavailable(
                "the revocation backend is unreachable; the revocation may not have been written"
            ) from exc
        # This replica refuses at once, without waiting for its own message to come back.
        self._view.apply(kind, issuer, value, w.at, now + w.ttl)
        return w.record()

    # -- keeping the view current ------------------------------------------------------------------

    async def _run(self) -> None:
        delay = BACKOFF_MIN
        while not self._closing:
            pubsub = self._sub.pubsub()
            try:
                # Subscribe BEFORE reading the keys: whatever is written during the scan is then
                # queued on the subscription and applied after it, so nothing falls in between.
                await pubsub.subscribe(self._channel)
                await self._confirm_subscribed(pubsub)
                await self._resync()
                self._set_live(True)
                await self._write_back()
                delay = BACKOFF_MIN
                await self._listen(pubsub)
            except _BACKEND_ERRORS as exc:
                log.warning("revocation backend: %s; reconnecting in %.2fs", _cause(exc), delay)
            except Exception:
                log.exception("revocation sync failed; reconnecting in %.2fs", delay)
            finally:
                self._set_live(False)
                with contextlib.suppress(Exception):
                    await pubsub.aclose()  # type: ignore[no-untyped-call]
            await asyncio.sleep(delay)
            delay = min(delay * 2, BACKOFF_MAX)

    async def _confirm_subscribed(self, pubsub: PubSub) -> None:
        async with asyncio.timeout(DEAD_AFTER * 2):
            while True:
                msg = await pubsub.get_message(timeout=POLL)
                if msg is not None and msg["type"] == "subscribe":
                    return

    async def _listen(self, pubsub: PubSub) -> None:
        loop = asyncio.get_running_loop()
        last_heard = next_ping = loop.time()
        next_resync = last_heard + RESYNC_EVERY
        while not self._closing:
            msg = await pubsub.get_message(ignore_subscribe_messages=True, timeout=POLL)
            now = loop.time()
            if msg is not None:
                last_heard = now
                if msg["type"] == "message":
                    await self._on_message(msg["data"])
            elif now - last_heard > DEAD_AFTER:
                # A half-open TCP connection raises nothing; the missing PONGs are how we notice.
                raise ConnectionError("revocation subscription went silent")
            if now >= next_ping:
                await pubsub.ping()
                next_ping = now + PING_EVERY
            self._view.purge(self._clock())
            if now >= next_resync:
                await self._resync()
                await self._write_back()
                # Messages and PONGs queued meanwhile are read next: the wait was ours, not Redis' silence.
                last_heard = next_ping = loop.time()
                next_resync = last_heard + RESYNC_EVERY

    async def _on_message(self, data: bytes | str) -> None:
        try:
            kind, issuer, value, at = _parse_message(data)
        except ValueError:
            # We cannot tell what it revoked: distrust the view and rebuild it from the keys.
            log.warning("unreadable revocation message on %s; resyncing", self._channel)
            self._set_live(False)
            await self._resync()
            self._set_live(True)
            await self._write_back()
            return
        # The message is a hint: apply it at once (fail closed), then let the key give exact T and TTL.
        self._view.apply(kind, issuer, value, at, self._clock() + self._cfg.max_token_lifetime)
        key = key_for(self._prefix, kind, value, issuer)
        pipe = self._redis.pipeline(transaction=False)
        pipe.get(key)
        pipe.pttl(key)
        stored, pttl = await pipe.execute()
        if stored is not None and pttl != -2:
            self._apply_key(kind, issuer, value, stored, pttl, self._view, self._clock())

    def _apply_key(self, kind: str, issuer: str | None, value: str, stored: bytes, pttl: int,
                   view: _View, now: float, *, replace: bool = True) -> None:
        expires_at = math.inf if pttl < 0 else now + pttl / 1000
        at = 0.0 if kind == "jti" else _parse_time(stored)
        view.apply(kind, issuer, value, at, expires_at, replace=replace)

    async def _resync(self) -> None:
        """Add every key under the prefix to the view (SCAN, then GET + PTTL in batches), and keep what
        was found for _write_back, which the caller runs once the view is live.

        Merged, never rebuilt: an entry leaves the view only when it expires. Redis can lose keys (a
        restart without persistence, a failover to a lagging replica, FLUSHDB, eviction) and a replica
        that knew a revocation must not let the token through again; an entry applied meanwhile (this
        replica's own write, a message's hint) is kept, and a later T is never lowered by an older read."""
        view = self._view
        now = self._clock()
        seen: dict[tuple[str, str, str], float] = {}  # each key found -> the T it holds (a jti's: 0)
        pattern = _glob_escape(self._prefix) + "*"
        cursor = 0
        while True:
            cursor, keys = await self._redis.scan(cursor, match=pattern, count=1000)
            raw_keys: list[bytes | str] = []
            parsed: list[tuple[str, str | None, str]] = []
            for k in keys:
                what = _parse_key(k.decode(errors="replace") if isinstance(k, bytes) else k, self._prefix)
                if what is not None:
                    raw_keys.append(k)
                    parsed.append(what)
            if parsed:
                pipe = self._redis.pipeline(transaction=False)
                for k in raw_keys:
                    pipe.get(k)
                    pipe.pttl(k)
                # A key of another type under our prefix is someone else's: skip it, do not fail.
                res = await pipe.execute(raise_on_error=False)
                for i, (kind, issuer, value) in enumerate(parsed):
                    stored, pttl = res[2 * i], res[2 * i + 1]
                    if not isinstance(stored, bytes) or not isinstance(pttl, int) or pttl == -2:
                        continue
                    at = seen[(kind, issuer or "", value)] = 0.0 if kind == "jti" else _parse_time(stored)
                    # Only what the view lacks: re-applying what it holds would push a heap entry per
                    # key on every periodic pass.
                    if view.covers(kind, issuer, value, at):
                        continue
                    self._apply_key(kind, issuer, value, stored, pttl, view, now, replace=False)
            if cursor == 0:
                break
        self._seen = seen

    async def _write_back(self) -> None:
        """_restore after the view went live: its cost (one script call per lost key, 100k of them after
        a big loss) never keeps a replica from answering, and its failure is no backend failure."""
        seen, self._seen = self._seen, None
        if seen is None:
            return
        try:
            await self._restore(seen)
        except _BACKEND_ERRORS as exc:
            log.warning("revocation backend: writing back lost revocations failed (%s: %s); next resync retries",
                        type(exc).__name__, exc)

    async def _restore(self, seen: dict[tuple[str, str, str], float]) -> None:
        """Write back each live entry of the view whose key the scan did not find (or found with an
        earlier T), with the life it has left, so that replicas starting later refuse it too.
        Not published: every replica that knew it holds it still, and a live one lacking it reads it
        within RESYNC_EVERY. A deliberately deleted key comes back too, while an entry for it lives.
        Sent in batches, by the script's SHA (EVALSHA), not its text per key."""
        now = self._clock()
        lost = [
            (key_for(self._prefix, kind, value, issuer or None), _stored_form(kind, at),
             0 if expires_at == math.inf else math.ceil((expires_at - now) * 1000))
            for kind, issuer, value, at, expires_at in self._view.entries()
            if expires_at > now and not seen.get((kind, issuer, value), -math.inf) >= at  # NaN: write
        ]
        if not lost:
            return
        script = self._restore_script
        if script is None:
            script = self._restore_script = self._redis.register_script(_RESTORE)
        written, failed = 0, None
        for start in range(0, len(lost), _RESTORE_BATCH):
            pipe = self._redis.pipeline(transaction=False)
            for key, stored, px in lost[start:start + _RESTORE_BATCH]:
                await script(keys=[key], args=[stored, str(px)], client=pipe)
            for r in await pipe.execute(raise_on_error=False):
                if r == 1:
                    written += 1
                elif isinstance(r, Exception):
                    failed = r  # a read-only replica, a script denied by an ACL: raised once below
        if written:
            log.warning("revocation backend lacked %d live revocation(s) this replica holds; wrote them back",
                        written)
        if failed is not None:
            raise failed  # a RedisError: _write_back logs it


def create_store(cfg: RevocationConfig, *, clock: Clock = time.time) -> RevocationStore:
    if cfg.backend == "memory":
        return MemoryRevocationStore(cfg, clock=clock)
    if cfg.backend == "redis":
        return RedisRevocationStore(cfg, clock=clock)
    raise ValueError(f"unknown revocation backend {cfg.backend!r}; expected redis or memory")
