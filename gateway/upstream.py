"""Sending requests to upstream targets: the one shared ClientSession, balancing, breakers, retries, errors.

This is the only module that sends requests to targets: plain-HTTP targets through the lean keep-alive
client of `h1client` (built on aiohttp's own protocol and C parser), TLS targets and WebSockets through
aiohttp's ClientSession. `_map_error` is the one place where their exceptions become gateway errors
(httpx's `map_httpcore_exceptions` idea):

    connect refused / DNS / TLS handshake / connect timeout  -> BadGateway      (502)
    reset, disconnect, malformed response                    -> BadGateway      (502)
    a final status outside 200-599 (0xx, an unasked 101)     -> BadGateway      (502)
    a transfer coding other than chunked (gzip, chunked)     -> BadGateway      (502)
    a control character in a field value (unrelayable())    -> BadGateway      (502)
    no response headers (or body bytes) within read timeout  -> UpstreamTimeout (504)
    every target's breaker open                              -> UpstreamUnavailable (503, Retry-After)
    every target not open already has `max_requests` in flight -> UpstreamOverflow (503, Retry-After: 1)
    the target's own final 502 / 503 / 504 answer            -> BadGateway / UpstreamUnavailable /
                                                                UpstreamTimeout (its body is dropped)
"""

from __future__ import annotations

import asyncio
import ssl
import sys
import time
from collections.abc import AsyncIterable, AsyncIterator, Callable, Mapping
from types import TracebackType
from typing import Protocol

import aiohttp
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import StreamReader
from multidict import CIMultiDict, CIMultiDictProxy
from yarl import URL

from gateway import metrics
from gateway.breaker import OPEN, CircuitBreaker
from gateway.config_types import TLSFiles, UpstreamConfig
from gateway.errors import (
    BadGateway,
    GatewayError,
    UpstreamOverflow,
    UpstreamTimeout,
    UpstreamUnavailable,
    no_passphrase,
)
from gateway.h1client import ConnectError, H1Pool
from gateway.identity import Identity

# RFC 9110 s9.2.2: repeating these has the same effect as sending once, so a retry is safe.
IDEMPOTENT = frozenset({"GET", "HEAD", "OPTIONS", "PUT", "DELETE"})
# Answers that say the target (not the request) is sick: they count against its breaker.
FAILURE_STATUSES = frozenset({502, 503, 504})
# The client side of a WebSocket handshake is aiohttp's to write; the caller's copies would clash.
_WS_OWN_HEADERS = frozenset(
    {"host", "upgrade", "connection", "sec-websocket-key", "sec-websocket-version",
     "sec-websocket-protocol", "sec-websocket-extensions"}
)
# Retry conditions (the names `retries.retry_on` uses) that each kind of failure satisfies.
_BEFORE_SENDING = frozenset({"connect_error"})
_CONNECT_TIMEOUT = frozenset({"connect_error", "timeout"})
_READ_TIMEOUT = frozenset({"timeout"})
_NONE: frozenset[str] = frozenset()
# Failures of a send that _map_error translates (anything else propagates untouched).
_CLIENT_ERRORS = (TimeoutError, aiohttp.ClientError, HttpProcessingError)
# Idle keep-alive connections per plain-HTTP target: at most this many, each closed after this long
# (below the keep-alive timeout of common servers, nginx 75 s, aiohttp 75 s, so that the target rarely
# closes one just as a request goes out on it).
MAX_IDLE_PER_TARGET = 64
IDLE_TIMEOUT = 15.0


def _status_error(resp: _Answer) -> GatewayError:
    """The gateway's own error for a target that answered 502/503/504 and was not (or no more) retried.

    Clients see one error vocabulary (SPEC 5) whatever sits behind the gateway, and an internal proxy's
    error page never leaks out. A target's Retry-After on 503 is kept: it knows best when to come back.
    """
    status = resp.status
    err: GatewayError
    if status == 503:
        retry_after = resp.headers.get("Retry-After", "")
        err = UpstreamUnavailable(float(retry_after) if retry_after.isdigit() else 1.0)
    elif status == 504:
        err = UpstreamTimeout()
    else:
        err = BadGateway()
    err.reason = f"upstream_{status}"
    return err


def _map_error(exc: BaseException) -> tuple[GatewayError, frozenset[str]]:
    """The gateway error for an aiohttp client failure, and the retry conditions it satisfies.

    A failure before the connection was made (refused, TLS, connect timeout) means nothing reached
    the target, so it is a `connect_error` and safe to retry; after that, only `timeout` may be.
    """
    if isinstance(exc, aiohttp.ConnectionTimeoutError):
        return BadGateway(reason="connect_timeout"), _CONNECT_TIMEOUT
    if isinstance(exc, TimeoutError):  # ServerTimeoutError / SocketTimeoutError: sock_read
        return UpstreamTimeout(), _READ_TIMEOUT
    if isinstance(exc, aiohttp.ClientSSLError | aiohttp.ClientConnectorCertificateError):
        return BadGateway(reason="upstream_tls"), _BEFORE_SENDING
    if isinstance(exc, aiohttp.ClientConnectorError | ConnectError):
        return BadGateway(reason="connect_error"), _BEFORE_SENDING
    if isinstance(exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError | aiohttp.ClientPayloadError):
        return BadGateway(reason="upstream_reset"), _NONE
    if isinstance(exc, aiohttp.ClientResponseError | HttpProcessingError):  # unparsable status line/headers
        return BadGateway(reason="bad_response"), _NONE
    return BadGateway(), _NONE


class UpstreamResponse:
    """An upstream's answer once its headers arrived. The caller must consume `iter_chunks()` to the
    end or call `release()` (or use `async with`).

    `headers` are exactly what the target sent (hop-by-hop ones included: filtering is the caller's).
    Errors while streaming the body come out of `iter_chunks()` already mapped (BadGateway,
    UpstreamTimeout); as the status line is then already on its way to the client, the caller can
    only log them and abort the client connection. Such an error is the target's failure too: it is
    recorded on the target's breaker (its head was recorded a success), as Envoy's outlier detection
    counts a reset mid-response, unless the client's own request body failed first (the client went
    away, or its body broke off or passed the limit: the upstream call was cut because of it).
    """

    __slots__ = ("status", "headers", "target", "_resp", "_breaker", "_guard", "_slot")

    def __init__(self, resp: _Answer, target: str, breaker: CircuitBreaker | None = None,
                 guard: _BodyGuard | None = None) -> None:
        self.status: int = resp.status
        headers = resp.headers
        names = "".join(headers)  # one C join: field names are tokens, whitespace never belongs in one
        if " " in names or "\t" in names:
            headers = _names_trimmed(headers)
        self.headers: CIMultiDictProxy[str] = headers
        self.target = target
        self._resp = resp
        self._breaker = breaker
        self._guard = guard
        self._slot: _Target | None = None  # the target whose max_requests this answer counts in, until released

    @property
    def content_length(self) -> int | None:
        """The body's length when the target declared it (Content-Length, not chunked), else None."""
        value = self.headers.get("Content-Length")
        return int(value) if value is not None and value.isdigit() else None

    async def read(self) -> bytes:
        """The whole body — only for small bodies of known length; errors mapped as in iter_chunks()."""
        content = self._resp.content
        try:
            # A small answer has usually arrived whole with its head: taken at once, no await.
            body = content.read_nowait() if content.is_eof() else await content.read()
        except _CLIENT_ERRORS as exc:
            raise self._failed(exc) from exc
        self.release()
        return body

    async def iter_chunks(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self._resp.content.iter_any():
                yield chunk
        except _CLIENT_ERRORS as exc:
            raise self._failed(exc) from exc
        self.release()  # at the end: a keep-alive connection goes back to its pool at once

    def unrelayable(self) -> GatewayError:
        """The answer's head cannot be relayed (a field value holds a control character the parser let
        through, RFC 9110 s5.5): a malformed response, counted against the target as any other."""
        if self._breaker is not None:
            self._breaker.record_failure()
        return BadGateway(reason="bad_response")

    def _failed(self, exc: BaseException) -> GatewayError:
        if self._breaker is not None and (self._guard is None or self._guard.error is None):
            self._breaker.record_failure()
        return _map_error(exc)[0]

    def release(self) -> None:
        """Done with the answer (any number of calls): its connection goes back, its target's slot is free."""
        self._resp.release()
        slot = self._slot
        if slot is not None:
            self._slot = None
            slot.busy -= 1

    async def __aenter__(self) -> UpstreamResponse:
        return self

    async def __aexit__(
        self, et: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.release()


def _framing_known(headers: CIMultiDictProxy[str]) -> bool:
    """False when the response has a transfer coding other than a lone `chunked` (RFC 9112 s6.1).

    Both parsers undo `chunked` only: with `gzip, chunked` the body left is still gzip, and with a final
    coding that is not chunked the body runs to the connection's end still coded. Transfer-Encoding is
    hop-by-hop, so relayed the client would take coded bytes for the body; nginx answers 502 to an unknown
    Transfer-Encoding, and so does the gateway."""
    codings = headers.getall("Transfer-Encoding", ())
    return not codings or (len(codings) == 1 and codings[0].strip(" \t").lower() == "chunked")


def _names_trimmed(headers: CIMultiDictProxy[str]) -> CIMultiDictProxy[str]:
    """The fields with the whitespace before the colon removed (RFC 9112 s5.1: a proxy MUST remove it
    from a response before forwarding it).

    aiohttp's lenient response parser accepts `Content-Length : 5` and frames the body by it, but keeps
    the name with its space: relayed as is, next to the framing the gateway writes itself, the client
    would get two framings (`Content-Length : 5` and `Transfer-Encoding: chunked`), a desync for any
    lenient hop downstream. Trimmed, the names say what the parser acted on.
    """
    return CIMultiDictProxy(CIMultiDict((name.rstrip(" \t"), value) for name, value in headers.items()))


class _Answer(Protocol):
    """What UpstreamResponse needs of aiohttp's ClientResponse or of h1client's H1Response."""

    @property
    def status(self) -> int: ...
    @property
    def headers(self) -> CIMultiDictProxy[str]: ...
    @property
    def content(self) -> StreamReader: ...
    def release(self) -> None: ...


class _Target:
    __slots__ = ("url", "base", "prefix", "breaker", "h1", "busy", "cap")

    def __init__(self, url: str, breaker: CircuitBreaker, h1: H1Pool | None, max_requests: int = 0) -> None:
        self.url = url
        self.base = url.rstrip("/")
        self.prefix = URL(self.base).raw_path.rstrip("/")  # a target's own path goes before every path
        self.breaker = breaker
        self.h1 = h1  # plain-HTTP targets: the lean keep-alive client; TLS targets: None (ClientSession)
        # HTTP requests in flight (sent, or their answer not yet released) and the most allowed (0: no cap).
        self.busy = 0
        self.cap = max_requests or sys.maxsize


class _Pool:
    """One upstream: its targets in order, round-robin position and everything fixed per request."""

    __slots__ = ("name", "targets", "single", "next", "timeout", "ws_timeout", "ssl", "attempts", "retry_on",
                 "retry_statuses", "duration", "any_session")

    def __init__(self, cfg: UpstreamConfig, targets: tuple[_Target, ...], ssl_ctx: ssl.SSLContext | bool):
        self.name = cfg.name
        self.targets = targets
        self.single = targets[0] if len(targets) == 1 else None  # send()'s fast path
        self.any_session = any(t.h1 is None for t in targets)  # a TLS target: sent by aiohttp's client
        self.next = 0
        # sock_read bounds the wait for the response headers as well as each body read.
        self.timeout = aiohttp.ClientTimeout(
            total=None, connect=cfg.connect_timeout, sock_connect=cfg.connect_timeout,
            sock_read=cfg.read_timeout,
        )
        self.ws_timeout = cfg.connect_timeout + cfg.read_timeout
        self.ssl = ssl_ctx
        self.attempts = max(1, cfg.retries.attempts)
        self.retry_on = cfg.retries.retry_on
        self.retry_statuses = frozenset(int(s) for s in cfg.retries.retry_on if s.isdigit())
        self.duration = metrics.observer(metrics.upstream_duration_seconds.labels(cfg.name))

    def pick(self, tried: tuple[_Target, ...]) -> _Target | None:
        """The next target in round-robin order whose breaker admits a request, preferring one not
        tried yet for this request. allow() is called only on the target returned or on refusing
        ones, so a half-open probe slot is never reserved and then dropped."""
        targets = self.targets
        n = len(targets)
        start = self.next
        if not tried:
            # Only a request's first pick moves the rotation: a retry advancing it too would send every
            # next request to the sick target first (with two targets, one bad: always).
            self.next = (start + 1) % n
        fallback = None
        for i in range(n):
            t = targets[(start + i) % n]
            if t.busy >= t.cap:
                continue  # full: asked of no breaker (a half-open probe slot is not taken for nothing)
            if t in tried:
                fallback = fallback or t
            elif t.breaker.allow():
                return t
        if fallback is not None and fallback.breaker.allow():
            return fallback
        return None

    def unavailable(self) -> UpstreamUnavailable:
        """Why pick() found no target: some were full (shed: come back in a second), or all open."""
        if any(t.busy >= t.cap for t in self.targets):
            return UpstreamOverflow()
        return UpstreamUnavailable(retry_after=min(t.breaker.retry_after() for t in self.targets))


def _ssl_context(tls: TLSFiles | None) -> ssl.SSLContext | bool:
    if tls is None:
        return True  # https targets: verified against the system's CAs
    ctx = ssl.create_default_context(cafile=tls.ca_file)
    if tls.cert_file:
        ctx.load_cert_chain(tls.cert_file, tls.key_file, password=no_passphrase)  # mTLS: our client certificate
    return ctx


class _StateGauge:
    """gateway_circuit_state of one target, on time. A breaker moves open -> half-open when its state is
    next read (a request), so with no traffic the gauge would say open long after `open_for`; a timer reads
    the state when `open_for` ends, and the move (and the gauge) happens then."""

    __slots__ = ("labels", "gauge", "breaker", "timer", "live")

    def __init__(self, upstream: str, target: str) -> None:
        self.labels = (upstream, target)
        self.gauge = metrics.circuit_state.labels(upstream, target)
        self.breaker: CircuitBreaker | None = None
        self.timer: asyncio.TimerHandle | None = None
        self.live = True

    def __call__(self, state: int) -> None:
        if not self.live:
            return  # replaced on reload: the new breaker of these labels speaks for the target now
        self.gauge.set(state)
        if state == OPEN and self.breaker is not None:
            self.cancel()
            try:
                loop = asyncio.get_running_loop()
            except RuntimeError:  # a verdict outside any loop (a unit test of pure logic): read when asked
                return
            self.timer = loop.call_later(self.breaker.retry_after() + 0.01, self._expired)

    def _expired(self) -> None:
        self.timer = None
        if self.breaker is not None:
            self.breaker.state  # noqa: B018 - reading it moves open -> half-open once open_for has passed

    def cancel(self) -> None:
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    def retire(self) -> None:
        self.live = False
        self.cancel()


class Upstreams:
    """Every configured upstream behind one shared keep-alive connection pool."""

    def __init__(
        self, configs: Mapping[str, UpstreamConfig], *, clock: Callable[[], float] = time.monotonic,
        max_idle: int = MAX_IDLE_PER_TARGET, idle_timeout: float = IDLE_TIMEOUT,
    ) -> None:
        self._configs = dict(configs)
        self._clock = clock
        self._max_idle = max_idle
        self._idle_timeout = idle_timeout
        self._pools: dict[str, _Pool] = {}
        self._gauges: list[_StateGauge] = []
        self._session: aiohttp.ClientSession | None = None

    async def start(self) -> None:
        for name, cfg in self._configs.items():
            targets = []
            for url in cfg.targets:
                gauge = _StateGauge(name, url)
                gauge(0)
                gauge.breaker = CircuitBreaker(cfg.circuit_breaker, clock=self._clock, on_change=gauge)
                self._gauges.append(gauge)
                targets.append(_Target(url, gauge.breaker, self._h1(url, cfg), cfg.max_requests))
            self._pools[name] = _Pool(cfg, tuple(targets), _ssl_context(cfg.tls))
        # No limit of its own: the targets' max_requests is the cap. A connector limit would queue its
        # connections across every upstream, and a WebSocket session holds one for its life, so past
        # 1000 sessions a request would wait out its connect timeout and count against a healthy target.
        connector = aiohttp.TCPConnector(limit=0, limit_per_host=0, ttl_dns_cache=10)
        self._session = aiohttp.ClientSession(
            connector=connector,
            cookie_jar=aiohttp.DummyCookieJar(),  # a proxy must not keep one client's cookies for another
            auto_decompress=False,  # bodies pass through as the upstream encoded them
            # Forward what the client sent, nothing more: no User-Agent, Accept or a guessed Content-Type.
            skip_auto_headers=("User-Agent", "Accept", "Accept-Encoding", "Content-Type"),
            timeout=aiohttp.ClientTimeout(total=None),
            trust_env=False,
            max_field_size=16384,
            max_line_size=16384,
        )

    def _h1(self, url: str, cfg: UpstreamConfig) -> H1Pool | None:
        u = URL(url)
        if u.scheme != "http" or u.host is None or u.port is None:
            return None  # TLS (and mTLS) stay with aiohttp's ClientSession
        return H1Pool(
            u.host, u.port, u.host_port_subcomponent or u.host,  # Host: as aiohttp writes it (RFC 9112 s3.2)
            connect_timeout=cfg.connect_timeout, read_timeout=cfg.read_timeout or None,
            max_idle=self._max_idle, idle_timeout=self._idle_timeout,
        )

    def h1_pool(self, upstream: str, target: str) -> H1Pool | None:
        """The lean client's connection pool of one target (None for TLS targets): for tests and debugging."""
        for t in self._pools[upstream].targets:
            if t.url == target:
                return t.h1
        raise KeyError(target)

    def retire(self, successor: Upstreams) -> None:
        """Replaced by a reload's `successor`, which owns the gauges of the targets both have (same labels):
        from now on this one's verdicts (requests still in flight on it) and timers leave them alone. A
        target the successor does not have loses its series (metrics.drop_series), or an open breaker of a
        target removed from the config would say "open" until restart."""
        kept = {g.labels for g in successor._gauges}
        for gauge in self._gauges:
            gauge.retire()
            if gauge.labels not in kept:
                metrics.drop_series(metrics.circuit_state, *gauge.labels)

    async def close(self) -> None:
        for gauge in self._gauges:
            gauge.retire()
        for pool in self._pools.values():
            for target in pool.targets:
                if target.h1 is not None:
                    target.h1.close()
        session, self._session = self._session, None
        if session is not None:
            await session.close()

    def state(self, upstream: str, target: str) -> int:
        """The breaker state of one target (0 closed, 1 open, 2 half-open)."""
        for t in self._pools[upstream].targets:
            if t.url == target:
                return t.breaker.state
        raise KeyError(target)

    async def send(
        self,
        upstream: str,
        method: str,
        path_qs: str,
        headers: CIMultiDict[str],
        body: AsyncIterable[bytes] | None,
        identity: Identity | None = None,
    ) -> UpstreamResponse:
        """Send one request and return once the response headers arrived.

        `path_qs` is sent exactly as given (already normalised and percent-encoded). `headers` must be
        the filtered set to forward; Host is the target's. `body` is streamed as it is iterated (chunked
        unless `headers` has Content-Length), so a request with a body is never retried; without one,
        idempotent methods are retried per the upstream's `retries`, on another target when there is one,
        and resent once on a new connection when a kept-alive one was dropped before any answer.
        """
        session = self._session
        assert session is not None, "Upstreams.start() was not awaited"
        pool = self._pools[upstream]
        if "Host" in headers:
            headers = headers.copy()
            del headers["Host"]
        # The identity reaches each kind of target once: the lean client appends its lines as they are
        # (gateway.identity.Identity); aiohttp's client (TLS targets) takes them as headers.
        extra = b""
        session_headers = headers
        if identity is not None:
            extra = identity.raw
            if pool.any_session:
                session_headers = headers.copy()
                session_headers.extend(identity.pairs)
        resend = body is None and method in IDEMPOTENT
        attempts = pool.attempts if resend else 1
        single = pool.single
        # One target: pick() could only return it (round robin of one, `tried` or not), so ask its breaker.
        target = (pool.pick(()) if single is None
                  else single if single.busy < single.cap and single.breaker.allow() else None)
        if target is None:
            raise pool.unavailable()
        guard = _BodyGuard(body) if body is not None else None
        tried: tuple[_Target, ...] = ()  # the targets sent to so far: built only when a retry is weighed
        attempt = 0
        while True:
            attempt += 1
            breaker = target.breaker
            started = time.perf_counter()
            h1 = target.h1
            resp: _Answer
            target.busy += 1  # freed below on every path but a returned answer, which frees it on release()
            try:
                if h1 is not None:
                    resp = await h1.request(method, target.prefix + path_qs, headers,
                                            guard.iterate() if guard is not None else None, resend=resend,
                                            extra=extra)
                else:
                    resp = await session.request(
                        method, URL(target.base + path_qs, encoded=True), headers=session_headers,
                        data=guard.iterate() if guard is not None else None,
                        allow_redirects=False, timeout=pool.timeout, ssl=pool.ssl,
                    )
            except _CLIENT_ERRORS as exc:
                target.busy -= 1
                if guard is not None and guard.error is not None:
                    # The client's body failed (it went away, or was over a limit): not the target's fault.
                    breaker.release()
                    raise guard.error from exc
                breaker.record_failure()
                error, conditions = _map_error(exc)
                nxt = None
                if attempt < attempts and not conditions.isdisjoint(pool.retry_on):
                    tried += (target,)
                    nxt = pool.pick(tried)
                if nxt is None:
                    raise error from exc
                target = nxt
                continue
            except BaseException:
                target.busy -= 1
                breaker.release()  # cancelled (the client went away): no verdict on the target
                raise
            pool.duration(time.perf_counter() - started)
            status = resp.status
            answer = UpstreamResponse(resp, target.url, breaker, guard) if 200 <= status <= 599 else None
            if answer is not None and status not in FAILURE_STATUSES and (
                    "Transfer-Encoding" not in answer.headers or _framing_known(answer.headers)):
                breaker.record_success()
                answer._slot = target
                return answer
            breaker.record_failure()
            resp.release()
            target.busy -= 1
            if status not in FAILURE_STATUSES:
                # RFC 9110 s15: a status is 100-599, 1xx are interim (both clients skip them) and 101
                # answers only an Upgrade, which goes through open_websocket(). Relayed, `HTTP/1.1 0` or a
                # 101 would leave the client's connection unframed (no length, no chunks). A transfer
                # coding other than chunked: see _framing_known.
                raise BadGateway(reason="bad_response")
            if attempt < attempts and status in pool.retry_statuses:
                tried += (target,)
                nxt = pool.pick(tried)
                if nxt is not None:
                    target = nxt
                    continue
            raise _status_error(resp)

    async def open_websocket(
        self, upstream: str, path_qs: str, headers: CIMultiDict[str], protocols: tuple[str, ...] = ()
    ) -> aiohttp.ClientWebSocketResponse:
        """Open a WebSocket to a target of `upstream` (breaker and round robin as for send(), no retry).

        `headers` are the filtered request headers; the handshake headers (Upgrade, Sec-WebSocket-*) are
        aiohttp's to write, with `protocols` offered. The caller owns (and must close) the result.
        """
        session = self._session
        assert session is not None, "Upstreams.start() was not awaited"
        pool = self._pools[upstream]
        target = pool.pick(())
        if target is None:
            raise pool.unavailable()
        forward = CIMultiDict((k, v) for k, v in headers.items() if k.lower() not in _WS_OWN_HEADERS)
        breaker = target.breaker
        try:
            # ws_connect has no per-call HTTP timeout: bound the whole handshake instead.
            async with asyncio.timeout(pool.ws_timeout):
                ws = await session.ws_connect(
                    URL(target.base + path_qs, encoded=True), headers=forward, protocols=protocols,
                    ssl=pool.ssl,
                )
        except aiohttp.WSServerHandshakeError as exc:
            if exc.status in FAILURE_STATUSES:
                breaker.record_failure()
            else:
                breaker.record_success()
            raise BadGateway(reason="websocket_refused") from exc
        except _CLIENT_ERRORS as exc:
            breaker.record_failure()
            raise _map_error(exc)[0] from exc
        except BaseException:
            breaker.release()
            raise
        breaker.record_success()
        return ws


class _BodyGuard:
    """Wraps the client's body so that a failure reading it is told apart from a failure of the target."""

    __slots__ = ("body", "error")

    def __init__(self, body: AsyncIterable[bytes]) -> None:
        self.body = body
        self.error: BaseException | None = None

    async def iterate(self) -> AsyncIterator[bytes]:
        try:
            async for chunk in self.body:
                yield chunk
        except Exception as exc:
            self.error = exc
            raise
