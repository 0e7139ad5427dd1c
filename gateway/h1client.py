"""Lean keep-alive HTTP/1.1 connections to one plain-HTTP target, on aiohttp's ResponseHandler and C parser.

aiohttp's ClientSession costs more per request than the rest of the proxy (issue 7: ~30 % of a request's
CPU): URL objects, a ClientRequest, a ClientResponse, a connector key, traces, cookie handling. A proxy
needs none of that. This module keeps only what decides correctness, and takes it from aiohttp itself:

- `ResponseHandler` (the client protocol) with its C `HttpResponseParser`: response framing
  (Content-Length, chunked, until-EOF, HEAD, 1xx/204/304), the `sock_read` timeout rearmed on every
  read and paused while the caller is not reading, and the payload `StreamReader` whose high-water mark
  pauses the socket (a large body is never buffered whole);
- `_serialize_headers`, the C serializer aiohttp's own client uses, which refuses control characters
  in the request line and headers (RFC 9110 s5.5: no header injection through a token claim).
  A head with a value that is not ASCII is written by gateway.httphead instead, which keeps bytes that
  are not UTF-8 (the serializer drops them) and refuses the same injections.

What aiohttp's connector decided is decided here: a connection is reused only when its response was
parsed to the end, did not say `Connection: close` (RFC 9112 s9.6) and nothing unexpected arrived since
(not one byte beyond the response's end, not one while idle: RFC 9112 s6.3, such bytes mean the target
frames its messages otherwise than the parser did, and would become the head of the next answer);
idle connections are capped and closed after `idle_timeout`; a request on a connection that the target
dropped before sending a single byte back is resent once on a new connection, but only when resending
is harmless (the caller decides: idempotent and without a body, RFC 9112 s9.3.1).
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import AsyncIterable, Iterator

import aiohttp
from aiohttp.client_proto import ResponseHandler
from aiohttp.helpers import EMPTY_BODY_STATUS_CODES
from aiohttp.http import RawResponseMessage
from aiohttp.http_exceptions import HttpProcessingError
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.httphead import head as message_head

# RFC 9110 s9.3: these define no meaning for content; the others get an explicit `Content-Length: 0`
# when sent without a body, exactly as aiohttp's ClientRequest did before this module existed.
_NO_BODY_METHODS = frozenset({"GET", "HEAD", "OPTIONS", "TRACE"})
_ZERO_LENGTH = (("Content-Length", "0"),)
_CHUNKED = (("Transfer-Encoding", "chunked"),)
_NOTHING: tuple[tuple[str, str], ...] = ()
# The same limits the ClientSession was given: a longer status line or header field is a bad response.
_MAX_LINE = 16384
_MAX_FIELD = 16384
_CHUNK_END = b"\r\n"
_LAST_CHUNK = b"0\r\n\r\n"


class ConnectError(aiohttp.ClientConnectionError):
    """The TCP connection could not be made (refused, unreachable, DNS): nothing was sent."""


class ClientBodyError(aiohttp.ClientConnectionError):
    """The caller's request body failed while it was being sent (see `.__cause__`)."""


class _Conn(ResponseHandler):
    """aiohttp's client protocol, remembering whether any byte arrived since the request was written.

    Three per-request costs of ResponseHandler are avoided (issue 7 profile):
    - its response parser is kept across keep-alive requests (llhttp resets itself at each message
      end); it is rebuilt only when the framing changes (HEAD or not, RFC 9110 s9.3.2);
    - the sock_read timer is lazy: rearming it (on every read) moves a deadline instead of cancelling
      and scheduling a timer handle; the one handle re-arms itself at the deadline when it fires early.
      The timeout fires at the same instant as before (the last read + read_timeout);
    - resume_reading(), which the payload reader calls after every read and at EOF, does nothing
      unless reading was paused since the parser was last fed (only a pause leaves the parser a tail).
    """

    def __init__(self, loop: asyncio.AbstractEventLoop) -> None:
        super().__init__(loop)
        self.got_bytes = False
        self.idle_since = 0.0
        self.pooled = False  # idle in the pool: no byte may arrive (nothing was asked)
        self.parser_head: bool | None = None  # skip_payload of the current parser, None: no parser yet
        self._deadline: float | None = None
        self._held = False  # pause_reading() was called and no resume_reading() has fed the parser since

    def data_received(self, data: bytes) -> None:
        if not data:  # resume_reading() asking the parser to go on with what it holds
            super().data_received(data)
            return
        first = not self.got_bytes  # the answer's first bytes: `data` begins at a message boundary
        self.got_bytes = True
        if self.pooled:  # an answer to nothing: the connection is out of step, never reuse it
            self._should_close = True
        parser = self._parser
        if parser is None or self._upgraded or self._payload_parser is not None or self._payload_parser_failed:
            super().data_received(data)  # no parser yet, an upgrade, a WebSocket: aiohttp's own ways
            return
        # ResponseHandler.data_received's HTTP path, in one call: rearm sock_read, parse, hand over the
        # messages (the payload's EOF drops sock_read again).
        self._reschedule_timeout()
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except BaseException as underlying:
            if first and isinstance(underlying, HttpProcessingError) and self._bodiless(data):
                return
            # As aiohttp does: the connection is cut, the reader gets an HttpProcessingError.
            if self.transport is not None:
                self.transport.close()
            if not isinstance(underlying, Exception):
                raise
            exc = (HttpProcessingError(code=underlying.code, message=underlying.message, headers=underlying.headers)
                   if isinstance(underlying, HttpProcessingError) else HttpProcessingError())
            self.set_exception(exc, underlying)
            return
        self._upgraded = upgraded
        payload = None
        for message, payload in messages:
            if message.should_close:
                self._should_close = True
            self._payload = payload
            if self._skip_payload or message.code in EMPTY_BODY_STATUS_CODES:
                self.feed_data((message, EMPTY_PAYLOAD), 0)
            else:
                self.feed_data((message, payload), 0)
        if payload is not None:
            if payload is not EMPTY_PAYLOAD:
                payload.on_eof(self._drop_timeout)
            else:
                self._drop_timeout()
        if upgraded and tail:
            self.data_received(tail)

    def _bodiless(self, data: bytes) -> bool:
        """An answer without a body (to HEAD, or 204/304) whose server sent a body anyway, in the same read:
        the parser ended the answer at its head, then refused the body as the next answer's status line,
        and the answer went down with it. Parsed again up to the end of its head by a fresh parser, it is
        handed over alone; the surplus stays unread and the connection is never reused (nginx relays
        such an answer too). False when the head alone is not such a whole answer."""
        end = data.find(b"\r\n\r\n")
        if end < 0:
            return False
        self.new_parser(self._skip_payload, self._read_timeout)
        self.parser_head = None  # this parser is spent: the next request builds its own
        parser = self._parser
        assert parser is not None
        try:
            messages, _, _ = parser.feed_data(data[:end + 4])
        except Exception:
            return False
        if len(messages) != 1:
            return False
        message, _ = messages[0]
        if message.code < 200 or not (self._skip_payload or message.code in EMPTY_BODY_STATUS_CODES):
            return False
        self._should_close = True
        self._payload = EMPTY_PAYLOAD
        self.feed_data((message, EMPTY_PAYLOAD), 0)
        self._drop_timeout()
        return True

    def new_parser(self, skip: bool, read_timeout: float | None) -> None:
        """A response parser for answers to HEAD (`skip`: they carry no body, RFC 9110 s9.3.2) or not.
        read_until_eof: a response without Content-Length or chunked ends when the connection does
        (RFC 9112 s6.3 item 8)."""
        self.set_response_params(
            skip_payload=skip, read_until_eof=True, auto_decompress=False,
            read_timeout=read_timeout, max_line_size=_MAX_LINE, max_field_size=_MAX_FIELD,
        )
        self.parser_head = skip

    def pause_reading(self) -> None:
        self._held = True  # the parser stops mid-payload and keeps the rest (its tail) until resumed
        super().pause_reading()

    def resume_reading(self, resume_parser: bool = True) -> None:
        # The payload StreamReader calls this after every read it serves and at EOF, paused or not.
        # With nothing paused since the last resume, the parser holds no tail: feeding it b"" (two
        # Python calls and a parser call per response) would do nothing.
        if not self._held and not self._reading_paused and not self._buffer_paused:
            return
        super().resume_reading(resume_parser)
        if resume_parser and not self._reading_paused:
            self._held = False  # the parser was fed and did not pause again: it holds no tail

    def _reschedule_timeout(self) -> None:
        timeout = self._read_timeout
        if not timeout:
            self._deadline = None
            return
        loop = self._loop
        self._deadline = deadline = loop.time() + timeout
        handle = self._read_timeout_handle
        if handle is not None and handle.when() > deadline:  # a shorter timeout than the pending one's
            handle.cancel()
            handle = None
        if handle is None:
            self._read_timeout_handle = loop.call_at(deadline, self._on_timer)

    def _drop_timeout(self) -> None:
        self._deadline = None  # the pending handle (if any) fires and finds nothing to do

    def _on_timer(self) -> None:
        self._read_timeout_handle = None
        deadline = self._deadline
        if deadline is None:
            return
        if deadline - self._loop.time() > 0.001:  # a read rearmed it since the handle was scheduled
            self._read_timeout_handle = self._loop.call_at(deadline, self._on_timer)
            return
        self._deadline = None
        self._on_read_timeout()

    def close(self) -> None:
        transport = self.transport
        if transport is not None and transport.get_write_buffer_size():
            # Request bytes still unsent (a body the target stopped reading): close() would wait for them
            # to go out, and the socket would stay open for as long as the target does not read.
            transport.abort()
        super().close()

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self._deadline = None
        handle = self._read_timeout_handle
        if handle is not None:  # a closed connection must not stay referenced by the loop's timers
            handle.cancel()
            self._read_timeout_handle = None


class _Head:
    """Host first, then the caller's headers in order, then framing: what `_serialize_headers` iterates."""

    __slots__ = ("host", "headers", "tail")

    def __init__(self, host: tuple[tuple[str, str], ...], headers: CIMultiDict[str],
                 tail: tuple[tuple[str, str], ...]) -> None:
        self.host, self.headers, self.tail = host, headers, tail

    def items(self) -> Iterator[tuple[str, str]]:
        return itertools.chain(self.host, self.headers.items(), self.tail)


class H1Response:
    """A response whose headers arrived; its connection goes back to the pool on `release()` if reusable."""

    __slots__ = ("status", "headers", "content", "_pool", "_conn", "_keep", "_writer")

    def __init__(self, pool: H1Pool, conn: _Conn, message: RawResponseMessage, payload: StreamReader,
                 writer: asyncio.Task[None] | None) -> None:
        self.status: int = message.code
        self.headers: CIMultiDictProxy[str] = message.headers
        self.content = payload
        self._pool = pool
        self._conn: _Conn | None = conn
        self._keep = not message.should_close
        if (conn.parser_head or message.code == 204 or message.code == 304) and _declares_body(message.headers):
            # An answer without a body whose head declares one (HEAD answered like GET): the server may
            # still write that body, after the head and maybe later. Taken at once by the next request,
            # the connection would hand those bytes to it as its answer; the idle check cannot see them.
            self._keep = False
        self._writer = writer

    def release(self) -> None:
        conn = self._conn
        if conn is None:
            return
        self._conn = None
        writer = self._writer
        if writer is not None and not writer.done():
            # The target answered before taking the whole body: the connection is mid-request, unusable.
            writer.cancel()
            conn.close()
            return
        # Reuse only what is provably at a message boundary: the parser saw this response's end, the
        # target did not ask to close, and nothing else (early bytes, an error, an upgrade) is pending.
        if self._keep and self.content.is_eof() and not conn.should_close and conn.is_connected() and _at_rest(conn):
            self._pool.put(conn)
        else:
            conn.close()


def _declares_body(headers: CIMultiDictProxy[str]) -> bool:
    """A length other than 0, or a transfer coding: the framing of a body (RFC 9112 s6.3)."""
    length = headers.get("Content-Length")
    return "Transfer-Encoding" in headers or (length is not None and length.strip(" \t") != "0")


def _at_rest(conn: _Conn) -> bool:
    """True when the parser holds no byte of a next message (it ended the response and stopped there).

    Bytes after the end of a response (a Content-Length shorter than the body, a body on a HEAD, 204 or
    304 answer) that are not yet a whole head stay inside the parser; on reuse they would become the start
    of the next answer (`HTTP/1.1 302 ...` followed by the real status line as a header value). Between
    messages, feed_eof() does nothing and returns None; with a next message begun it returns (or fails
    on) the head it makes of those bytes: the connection is then closed, so its parser's state is moot.
    """
    parser = conn._parser
    if parser is None:
        return False
    try:
        return parser.feed_eof() is None
    except Exception:
        return False


class H1Pool:
    """Idle keep-alive connections to one (host, port) and the request/response exchange on them."""

    def __init__(self, host: str, port: int, host_header: str, *, connect_timeout: float,
                 read_timeout: float | None, max_idle: int, idle_timeout: float) -> None:
        self.host, self.port = host, port
        self._host_header = (("Host", host_header),)
        self.connect_timeout = connect_timeout
        self.read_timeout = read_timeout
        self.max_idle = max_idle
        self.idle_timeout = idle_timeout
        # LIFO reuse (the most recently used connection is the least likely to have been closed by the
        # target); the oldest sit at the left, where the sweep closes them.
        self.idle: deque[_Conn] = deque()
        self._loop = asyncio.get_running_loop()
        self._sweeper: asyncio.TimerHandle | None = None
        self._closed = False
        self.connects = 0  # connections opened (for tests and debugging)

    # -- the pool ---------------------------------------------------------------------------------
    def put(self, conn: _Conn) -> None:
        if self._closed or len(self.idle) >= self.max_idle:
            conn.close()
            return
        conn.idle_since = self._loop.time()
        conn.pooled = True
        self.idle.append(conn)
        if self._sweeper is None:
            self._sweeper = self._loop.call_at(conn.idle_since + self.idle_timeout, self._sweep)

    def _take(self) -> _Conn | None:
        idle = self.idle
        oldest = self._loop.time() - self.idle_timeout
        while idle:
            conn = idle.pop()
            conn.pooled = False
            # should_close was False when it was pooled; since then only data_received (which sets
            # _should_close for a pooled connection) or an error (set_exception sets it, connection_lost
            # drops the transport) could change it.
            transport = conn.transport
            if conn.idle_since > oldest and transport is not None and not transport.is_closing() \
                    and not conn._should_close:
                return conn
            conn.close()
        return None

    def _sweep(self) -> None:
        self._sweeper = None
        idle = self.idle
        oldest = self._loop.time() - self.idle_timeout
        while idle and (idle[0].idle_since <= oldest or not idle[0].is_connected()):
            idle.popleft().close()
        if idle:
            self._sweeper = self._loop.call_at(idle[0].idle_since + self.idle_timeout, self._sweep)

    def close(self) -> None:
        self._closed = True
        if self._sweeper is not None:
            self._sweeper.cancel()
            self._sweeper = None
        while self.idle:
            self.idle.pop().close()

    async def _connect(self) -> _Conn:
        loop = self._loop
        try:
            async with asyncio.timeout(self.connect_timeout):
                _, conn = await loop.create_connection(lambda: _Conn(loop), self.host, self.port)
        except TimeoutError as exc:  # asyncio.timeout, or the kernel's own ETIMEDOUT
            raise aiohttp.ConnectionTimeoutError(f"connect to {self.host}:{self.port} timed out") from exc
        except OSError as exc:
            raise ConnectError(f"connect to {self.host}:{self.port}: {exc.strerror or exc}") from exc
        self.connects += 1
        return conn

    # -- one exchange -----------------------------------------------------------------------------
    async def request(self, method: str, path_qs: str, headers: CIMultiDict[str],
                      body: AsyncIterable[bytes] | None, *, resend: bool, extra: bytes = b"") -> H1Response:
        """Send one request and return once the final response's headers arrived.

        `extra`: header lines (each ending CRLF) appended to the head as they are, without the
        serializer's check: only for lines the caller built from checked values (gateway.identity.Identity).

        `resend`: the request may be sent again on a new connection if the one used was dropped before
        any byte of the response arrived (the caller says so only for idempotent body-less requests).
        """
        length: int | None = None
        tail: tuple[tuple[str, str], ...]
        if body is not None:
            declared = headers.get("Content-Length")
            if declared is None:
                tail = _CHUNKED
            else:
                if not declared.isdigit():
                    raise ValueError("invalid Content-Length")
                length, tail = int(declared), _NOTHING
        elif method in _NO_BODY_METHODS or "Content-Length" in headers:
            tail = _NOTHING
        else:
            tail = _ZERO_LENGTH
        # The C serializer refuses CR/LF in the request line and in every name and value (RFC 9110 s5.5).
        head = message_head(f"{method} {path_qs} HTTP/1.1", headers, _Head(self._host_header, headers, tail))
        if extra:
            head = head[:-2] + extra + _CHUNK_END  # before the blank line that ends the head
        skip = method == "HEAD"
        conn = self._take()  # not `or`: a ResponseHandler is a queue, falsy when empty
        if conn is None:
            conn = await self._connect()
        # One coroutine for the exchange (no nested one per request): the response wait is inline.
        for again in (resend, False):
            writer = None
            try:
                writer = self._send(conn, skip, head, body, length)
                while True:
                    message, payload = await conn.read()
                    # RFC 9110 s15.2: interim 1xx answers precede the real one (101 ends HTTP here).
                    if message.code >= 200 or message.code == 101 or message.code < 100:
                        return H1Response(self, conn, message, payload, writer)
            except BaseException as exc:
                if writer is not None:
                    writer.cancel()
                conn.close()
                if not again or conn.got_bytes or not isinstance(
                        exc, aiohttp.ServerDisconnectedError | aiohttp.ClientOSError):
                    raise
            # The target closed the connection without answering: typically a keep-alive connection it
            # had just timed out. Nothing of the request was acted upon in a way a resend could repeat
            # harmfully.
            conn = await self._connect()
        raise AssertionError("unreachable")  # pragma: no cover

    def _send(self, conn: _Conn, skip: bool, head: bytes, body: AsyncIterable[bytes] | None,
              length: int | None) -> asyncio.Task[None] | None:
        """Write the head (and start the body's writer); the response is then awaited by the caller."""
        conn.got_bytes = False
        if conn.parser_head is not skip:
            conn.new_parser(skip, self.read_timeout)  # the framing changed (HEAD or not)
        transport = conn.transport
        if transport is None:
            raise aiohttp.ServerDisconnectedError()
        transport.write(head)
        if body is None:
            conn.start_timeout()
            return None
        # The body goes out while the response is awaited: a target may answer (and stop reading)
        # before it has taken all of it.
        return asyncio.ensure_future(_send_body(conn, body, length))


async def _send_body(conn: _Conn, body: AsyncIterable[bytes], length: int | None) -> None:
    """Write the body with the transport's flow control (pause_writing -> wait for drain), then arm sock_read.

    Without a declared length the body is sent chunked (RFC 9112 s7.1); with one, exactly that many
    bytes must come, else the message would be cut or run into the next one (RFC 9112 s6.3): the request
    fails instead. A failure of the caller's body (whatever it raises, a ConnectionError of the client's
    too) is set on the connection, so the response read fails, and the connection is cut so that the
    target never takes the unfinished request as whole.

    sock_read is armed only once the body is sent; until then a target that takes no byte of it for
    `read_timeout` (the socket buffers full, the drain never comes) is a read timeout too, as a silent
    target is (nginx's proxy_send_timeout), instead of holding the request for ever.
    """
    sent = 0
    try:
        async for chunk in body:
            transport = conn.transport
            if transport is None:
                return  # the connection is gone: the response read reports it
            if not chunk:
                continue
            sent += len(chunk)
            if length is None:
                transport.writelines((b"%x\r\n" % len(chunk), chunk, _CHUNK_END))
            elif sent > length:
                raise ValueError("request body longer than its Content-Length")
            else:
                transport.write(chunk)
            if conn.writing_paused and not await _drained(conn):
                return
        if length is None:
            if conn.transport is not None:
                conn.transport.write(_LAST_CHUNK)
        elif sent != length:
            raise ValueError("request body shorter than its Content-Length")
    except Exception as exc:
        conn.set_exception(ClientBodyError("request body failed"), exc)
        if conn.transport is not None:
            conn.transport.abort()  # the request is incomplete: the target must not take it as whole
        return
    conn.start_timeout()


async def _drained(conn: _Conn) -> bool:
    """Wait until the target takes more of the body: False when it went away or took nothing in time
    (then the response read reports it: ServerDisconnectedError, or SocketTimeoutError set here)."""
    try:
        async with asyncio.timeout(conn.read_timeout):
            await conn._drain_helper()
    except ConnectionError:  # ClientConnectionResetError included: the target went away mid-body
        return False
    except TimeoutError:
        conn.set_exception(aiohttp.SocketTimeoutError("Timeout on writing the request body"))
        if conn.transport is not None:
            conn.transport.abort()
        return False
    return True
