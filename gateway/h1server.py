"""The public HTTP/1.1 listener: one asyncio.Protocol per connection on aiohttp's C request parser.

aiohttp's web.Server costs a task, a BaseRequest, a StreamResponse and a StreamWriter per request
(issue 7: ~15-20 % of a request's CPU). This module keeps what decides correctness and takes it from
aiohttp itself: the C `HttpRequestParser` (framing, RFC 9112 s6.3 Content-Length / chunked rules,
request smuggling checks, the payload `StreamReader` whose high-water mark pauses the socket) and
`_serialize_headers` (refuses CR/LF in a header: no response splitting, RFC 9110 s5.5). Per connection
one task answers the parsed requests in order (pipelining, RFC 9112 s9.3.2). An Upgrade request (the
parser stops at it) is handed with its connection to `upgrade_factory` (aiohttp's RequestHandler),
which then owns the connection.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import logging
import struct
import sys
import termios
import time
from collections import deque
from collections.abc import Awaitable, Callable
from http import HTTPStatus
from typing import Any

from aiohttp.base_protocol import BaseProtocol
from aiohttp.http import HttpVersion11
from aiohttp.http_exceptions import HttpProcessingError, LineTooLong
from aiohttp.http_parser import HttpRequestParser
from aiohttp.streams import EMPTY_PAYLOAD, StreamReader
from aiohttp.web_protocol import RequestPayloadError
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.httphead import head as message_head

log = logging.getLogger("gateway")
KEEPALIVE_TIMEOUT = 75.0  # an idle keep-alive connection is closed after this (nginx's default)
HEAD_TIMEOUT = 30.0  # a request head must arrive whole within this once it started (slowloris)
BODY_TIMEOUT = 60.0  # a request body no byte of which arrives for this long fails (nginx client_body_timeout)
SEND_TIMEOUT = 60.0  # a client that takes no byte of its answer for this long is cut (nginx send_timeout)
LINGER_TIMEOUT = 10.0  # the unread rest of a refused request's body is read and dropped for this long
LINGER_CLOSE = 2.0  # after a refusal that closes, what the client still sends is read and dropped this long
_READ_LIMIT = 2**16  # the payload StreamReader pauses the socket above twice this
_STATUS_LINES = {s.value: f"HTTP/1.1 {s.value} {s.phrase}" for s in HTTPStatus}  # formatted once
_CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_NO_BODY = frozenset({204, 304})
_LAST_CHUNK = b"0\r\n\r\n"
_MAX_QUEUE = 32  # parsed requests waiting for their answer on one connection before reading pauses

Handler = Callable[["H1Request"], Awaitable[None]]
# (exception, status, peer) -> (status, headers, body) of the answer to a request the parser refused
ErrorAnswer = Callable[[BaseException | None, int, str | None], tuple[int, CIMultiDict[str], bytes]]


def _status(status: int) -> str:
    line = _STATUS_LINES.get(status)
    return line if line is not None else f"HTTP/1.1 {status} "


class H1Request:
    """One parsed request and the means to answer it (attribute names as on aiohttp's BaseRequest)."""

    __slots__ = ("method", "raw_path", "version", "headers", "raw_headers", "remote", "content", "body_exists",
                 "content_length", "keep_alive", "started", "conn_state", "_conn", "_expect", "_chunked", "_head")

    def __init__(self, conn: _Conn, msg: Any, payload: StreamReader, remote: str | None) -> None:
        self._conn = conn
        self.conn_state: Any = conn.state  # H1Server's conn_state: kept across the connection's requests
        self.method: str = msg.method
        self.raw_path: str = msg.path
        self.version = msg.version
        self.headers: CIMultiDictProxy[str] = msg.headers
        self.raw_headers: tuple[tuple[bytes, bytes], ...] = msg.raw_headers
        self.remote = remote
        self.content = payload
        self.body_exists = exists = payload is not EMPTY_PAYLOAD
        cl = self.headers.get("Content-Length") if exists else None
        self.content_length = int(cl) if cl is not None and cl.isdigit() else None
        self.keep_alive = not msg.should_close
        self.started = False  # the status line went out
        # RFC 9110 s10.1.1: the interim 100 goes out when the body is first asked for (after admission);
        # an HTTP/1.0 request's expectation is ignored (s15.2: no 1xx to an HTTP/1.0 client, which would
        # take it for the answer).
        self._expect = (self.body_exists and self.headers.get("Expect", "").lower() == "100-continue"
                        and self.version >= HttpVersion11)
        self._chunked = False
        self._head = self.method == "HEAD"

    @property
    def task(self) -> asyncio.Task[None] | None:
        """The connection's task, which answers this request."""
        return self._conn._task

    @property
    def gone(self) -> bool:
        """The client closed the connection while this request was answered (its task was cancelled)."""
        return self._conn.gone

    def body_pulled(self, grace: float) -> None:
        """The body's consumer took a chunk and, if alive, takes the next within `grace` seconds: until
        then, a client whose upload waits on it is not cut for not reading its answer meanwhile."""
        conn = self._conn
        conn.pulled_until = conn._loop.time() + grace

    def send_continue(self) -> None:
        if self._expect:
            self._expect = False
            if not self.started and self._conn.transport is not None:
                self._conn.transport.write(_CONTINUE)

    def _status_line(self, status: int, headers: CIMultiDict[str]) -> bytes:
        conn = self._conn
        if conn.server.draining:
            self.keep_alive = False
        elif self.body_exists and self.content.exception() is not None:
            self.keep_alive = False  # its body broke off (malformed, cut short): the framing is lost
        elif self._expect:
            # Answered before the 100 went out: the client may send the body or not (RFC 9110 s10.1.1),
            # and what follows cannot be framed safely either way: close, as Go's server does.
            self.keep_alive = False
        if not self.keep_alive:
            headers["Connection"] = "close"
        elif self.version[1] == 0:
            headers["Connection"] = "keep-alive"  # RFC 9112 s9.3: an HTTP/1.0 client asked for it
        if "Date" not in headers:
            headers["Date"] = conn.server.date()
        # obs-text from the upstream kept byte for byte. A head that cannot be written (HeadInjection)
        # leaves nothing sent: the caller may still answer otherwise.
        head = message_head(_status(status), headers)
        self.started = True
        return head

    async def send(self, status: int, headers: CIMultiDict[str], body: bytes) -> None:
        """A whole response of known length: header block and body in one write."""
        headers["Content-Length"] = str(len(body))
        head = self._status_line(status, headers)
        conn = self._conn
        transport = conn.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection lost")
        transport.write(head if self._head or status in _NO_BODY else head + body)  # inline: the hot path
        if conn._paused:
            await conn._drain_helper()

    async def start(self, status: int, headers: CIMultiDict[str]) -> None:
        """The header block of a streamed response; chunked when the length is not known (HTTP/1.1)."""
        if status == 204 or status < 200:
            headers.popall("Content-Length", None)  # RFC 9110 s8.6: never in a 1xx or 204 (304 may say it)
        elif self._head or status in _NO_BODY:
            pass
        elif "Content-Length" not in headers:
            if self.version[1] >= 1:
                headers["Transfer-Encoding"] = "chunked"
                self._chunked = True
            else:
                self.keep_alive = False  # RFC 9112 s6.3: an HTTP/1.0 body without a length ends at close
        await self._conn.write(self._status_line(status, headers))

    async def write(self, chunk: bytes) -> None:
        if self._head or not chunk:
            return
        if self._chunked:
            chunk = b"%x\r\n%b\r\n" % (len(chunk), chunk)
        await self._conn.write(chunk)

    async def write_eof(self) -> None:
        if self._chunked and not self._head:
            await self._conn.write(_LAST_CHUNK)

    def abort(self) -> None:
        """Cut the connection: the only honest signal once a status line is out and the body fails (or
        its token ended). abort(), not close(): what is still buffered for a client that reads slowly
        (or not at all) is dropped, not delivered, and the connection does not wait for it."""
        self.keep_alive = False
        conn = self._conn
        conn.cut = True  # our doing: not a client gone (connection_lost)
        if conn.transport is not None:
            conn.transport.abort()


def _unsent(conn: BaseProtocol) -> int | None:
    """Bytes written to the client and not yet acknowledged by it: the transport's buffer plus the
    socket's send queue (Linux SIOCOUTQ, the same number as TIOCOUTQ); None where that cannot be read."""
    transport = conn.transport
    if transport is None:
        return None
    sock = transport.get_extra_info("socket")
    try:
        queued = struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.TIOCOUTQ, b"\0\0\0\0"))[0]
    except (AttributeError, OSError, ValueError):
        return None
    return int(transport.get_write_buffer_size()) + int(queued)


class _Conn(BaseProtocol):
    """One client connection: parse, queue, answer in order, keep alive or close."""

    def __init__(self, server: H1Server) -> None:
        super().__init__(server.loop, self._new_parser(server))
        self.server = server
        self._queue: deque[tuple[Any, StreamReader] | BaseException] = deque()
        self._waiter: asyncio.Future[None] | None = None
        self._task: asyncio.Task[None] | None = None
        self._remote: str | None = None
        self._closing = False  # no more requests are read on this connection
        self.busy = False  # a request is being answered
        self.since = 0.0  # loop time the connection went idle, or the pending request head began
        self.partial = False  # bytes of a request head arrived and its end did not yet (or may have: _end -1)
        self._body: StreamReader | None = None  # the body of the request being answered
        self._last: StreamReader = EMPTY_PAYLOAD  # the body of the request parsed last (the parser's)
        self._last_chunked = False  # that body is chunked: where it ends is not known from its length
        self._head = 0  # bytes of the request head being received (counted while no body is)
        # Those bytes, from where that head began: a parse error re-parses them (_salvage). None when
        # where it began is not known (see _end): a parse error then re-parses nothing.
        self._pending: bytearray | None = bytearray()
        self.received = 0  # bytes received so far; the sweeper tells a stalled body by it
        self._seen = -1  # `received` when the sweeper last saw it change, and when that was
        self._seen_at = 0.0
        self._tail = b""  # bytes after an Upgrade request, handed over with the connection
        self.state: Any = server.conn_state() if server.conn_state is not None else None
        self.cut = False  # the gateway cut the connection itself (H1Request.abort, H1Server.close)
        self.stalled_at = 0.0  # loop time the client last took a byte of its answer while writing was paused
        self.unsent = sys.maxsize  # bytes of the answer not yet taken by the client, at the last sweep
        self.heard, self.heard_at = 0, 0.0  # `received` at the sweep that last saw it grow, and when
        self.gone = False  # the client left mid-answer, and the task answering was cancelled for it
        self.pulled_until = 0.0  # loop time until which the body's consumer may take its next chunk

    # -- asyncio callbacks ---------------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        peer = transport.get_extra_info("peername")
        self._remote = str(peer[0]) if isinstance(peer, tuple | list) else None
        self.since = self._loop.time()
        self.server.conns.add(self)
        self._task = task = self._loop.create_task(self._run())
        self.server.tasks.add(task)
        task.add_done_callback(self.server.tasks.discard)

    def connection_lost(self, exc: BaseException | None) -> None:
        super().connection_lost(exc)
        self.server.conns.discard(self)
        self._closing = True
        if self._parser is not None:
            with contextlib.suppress(Exception):
                self._parser.feed_eof()
        self._fail_body(RequestPayloadError("client disconnected"))  # a body reader must not hang
        self._wake()
        task = self._task
        if self.busy and not self.cut and task is not None and not task.done():
            # The client left while its answer was being made: stop making it, and the upstream call with
            # it (nginx's 499, Envoy's downstream reset), instead of holding the target's connection (and
            # anything it holds) until a long poll or a stalled body ends or times out.
            self.gone = True
            task.cancel()

    def pause_writing(self) -> None:
        super().pause_writing()
        self.stalled_at = self._loop.time()
        self.unsent = sys.maxsize

    def eof_received(self) -> bool | None:
        # A FIN is taken as the client going away, as nginx takes it while proxying (499): the transport
        # closes (connection_lost follows), a body being read fails, an answer not yet sent is not.
        return None

    def _new_parser(self, server: H1Server) -> HttpRequestParser:
        return HttpRequestParser(self, server.loop, _READ_LIMIT, max_line_size=server.max_line,
                                 max_field_size=server.max_line, max_headers=server.max_headers,
                                 payload_exception=RequestPayloadError, auto_decompress=False)

    def _salvage(self, data: bytes) -> list[tuple[Any, StreamReader]]:
        """The requests `data` held before the malformed bytes the parser raised on.

        aiohttp's parser raises from feed_data and drops the messages it had completed in that same call,
        so requests pipelined in one segment with a malformed one went unanswered: whether they were
        served depended on how the client's bytes were cut into segments. `data` begins at a message
        boundary (_since_boundary). A fresh parser, configured as the connection's, is fed it up to each
        blank line in turn until it raises: the messages it returns are those the connection's parser had
        completed before the error, less the last one if the error is in its body: nothing of that
        request is forwarded, as when the whole segment was refused."""
        parser = self._new_parser(self.server)
        out: list[tuple[Any, StreamReader]] = []
        start = 0
        while (end := data.find(b"\r\n\r\n", start)) >= 0:
            try:
                messages, upgraded, _ = parser.feed_data(data[start:end + 4])
            except HttpProcessingError:
                break
            out.extend(messages)
            if upgraded:
                break  # unreachable in practice: the connection's parser would have stopped there too
            start = end + 4
        if out and not out[-1][1].is_eof():
            out.pop()  # the malformed bytes are in its body: refused with them, never handed over in part
        return out

    def _since_boundary(self, data: bytes, in_body: bool, resume: int) -> bytes | None:
        """The bytes from the message boundary last passed before the end of segment `data` on, or None
        when where that is cannot be told: parsed again from there, no byte inside a message (a header
        value that reads as a request) is ever taken for the start of one. `in_body`, `resume`: the
        segment began in a request's body, which ended at `resume` in it (-1: not known)."""
        if in_body:
            return data[resume:] if resume >= 0 else None
        pending = self._pending
        if pending is None:
            return None
        return bytes(pending) + data if pending else data

    def _end(self, data: bytes, messages: list[tuple[Any, StreamReader]], in_body: bool, resume: int) -> int:
        """Where in `data` the last request ending in it ends (the parser does not say): what follows is
        the next request's head. -1 when that cannot be told.

        A head, and a chunked body, ends at a blank line, and the next head has none before its own
        end: the last blank line in the segment (past the CR/LF the parser skips before a request line;
        none: the end straddled the segment's start, and only CR/LF of it are in this one). A
        Content-Length body ends its length after its head's end: counted from where the segment's
        first request began (its start, the head pending before it, or the end of the body it began
        in), head to blank line and body by length; a chunked body on the way is not counted. The
        first head's end is also found when where it began is not known (_pending None), if no CR/LF
        of its blank line can be in an earlier segment."""
        if messages:
            msg, body = messages[-1]
            if body is not EMPTY_PAYLOAD and not msg.chunked:
                return self._walk(data, messages, in_body, resume)
        elif in_body and resume >= 0:
            return resume  # the Content-Length body the segment began in
        blank = data.rfind(b"\r\n\r\n")
        return blank + 4 if blank >= 0 else 0

    def _walk(self, data: bytes, messages: list[tuple[Any, StreamReader]], in_body: bool, resume: int) -> int:
        """_end for a segment whose last request has a Content-Length body."""
        buf, pos = data, 0
        if in_body:
            if resume < 0:
                return -1
            pos = resume
        elif self._pending is None and data[0] in b"\r\n":
            return -1  # a head of unknown start was pending: CR/LF here may be of its blank line, or skipped
        elif self._pending:
            buf = bytes(self._pending) + data  # the first request's head began in an earlier segment
        size = len(buf)
        for msg, body in messages:
            while pos < size and buf[pos] in b"\r\n":
                pos += 1
            pos = buf.find(b"\r\n\r\n", pos)
            if pos < 0:
                return -1
            pos += 4
            if body is not EMPTY_PAYLOAD:
                if msg.chunked:
                    return -1
                pos += body.total_bytes
        pos -= size - len(data)
        return pos if 0 <= pos <= len(data) else -1

    def _fail_body(self, exc: BaseException) -> None:
        """Fail the body the parser is in the middle of (its reader would wait for bytes that never come)."""
        body = self._last
        if body is not EMPTY_PAYLOAD and not body.is_eof() and body.exception() is None:
            body.set_exception(exc)

    def data_received(self, data: bytes) -> None:
        if self._upgraded:
            self._tail += data  # arrived before the pause took effect: it belongs to the new protocol
            return
        if self._closing:
            return
        self.received += len(data)
        parser = self._parser
        assert parser is not None
        last = self._last
        # The segment begins in a request's body: how much of it the body had, to tell where it ends.
        in_body = last is not EMPTY_PAYLOAD and not last.is_eof()
        before, chunked = (last.total_bytes, self._last_chunked) if in_body else (0, False)
        try:
            messages, upgraded, tail = parser.feed_data(data)
        except HttpProcessingError as exc:
            self._malformed(data, exc, self._resume(last, in_body, before, chunked), in_body)
            return
        if messages:
            self._queue.extend(messages)
            msg, body = messages[-1]
            self._last = body
            self._wake()
            if len(self._queue) >= _MAX_QUEUE and not self._buffer_paused:
                self._pause_reading_for_buffer()  # a client pipelining faster than we answer waits
            if upgraded:
                self._upgraded = True
                self._tail = tail
                self._pause_transport_reading()
                return
            if body is EMPTY_PAYLOAD:
                if data.endswith(b"\r\n\r\n"):  # the common case: whole requests without a body
                    if self._head or self.partial or self._pending is None:
                        self._no_head()
                    return
            else:
                self._last_chunked = msg.chunked
                if not body.is_eof():
                    if self._head or self.partial or self._pending is None:
                        self._no_head()  # a request's body is being received, not a head
                    return
        elif upgraded:
            self._upgraded = True
            self._tail = tail
            self._pause_transport_reading()
            return
        elif in_body and not last.is_eof():
            return  # still in that body
        if messages or in_body:
            # A request ended in this segment: what follows it is the next one's head, however the bytes
            # were cut into segments (counted toward max_head, under the head timeout, re-parsed on error).
            end = self._end(data, messages, in_body, self._resume(last, in_body, before, chunked))
            if end < 0:
                # Where the next head begins is not known: none is re-parsed, and the connection waits
                # under the head timeout, in case one began.
                self._head, self._pending = 0, None
                self._head_began()
                return
            if self._head or self.partial or self._pending is None:
                self._no_head()
            if end == len(data):
                return
            data = data[end:]
        if self._head == 0:
            data = data.lstrip(b"\r\n")  # CR/LF before a request line (RFC 9112 s2.2): the parser skips them
            if not data:
                return
        # The parser bounds each line and the number of fields, not their sum (1000 fields of 64 KiB):
        # a head is refused once it passes max_head, not buffered whole first.
        self._head += len(data)
        if self._head > self.server.max_head:
            self._refuse_input(LineTooLong(b"request head", self.server.max_head))
            return
        if self._pending is not None:
            self._pending += data
        self._head_began()

    @staticmethod
    def _resume(last: StreamReader, in_body: bool, before: int, chunked: bool) -> int:
        """Where in the segment the body it began in (`last`, holding `before` bytes then) ended: 0 when it
        began in none, -1 when that is not known (a chunked body, or one not ended yet)."""
        if not in_body:
            return 0
        return -1 if chunked or not last.is_eof() else last.total_bytes - before

    def _malformed(self, data: bytes, exc: HttpProcessingError, resume: int, in_body: bool) -> None:
        """feed_data raised: fail a body it was in, answer the requests before the malformed bytes (parsed
        again from the start of the message the segment began in, when that is known), then refuse."""
        # A malformed chunk mid-body: the request streaming that body fails now, instead of waiting for
        # bytes the parser will never deliver.
        self._fail_body(RequestPayloadError("malformed request body"))
        since = self._since_boundary(data, in_body, resume)
        messages = self._salvage(since) if since is not None else []
        if messages:
            self._queue.extend(messages)
            self._last = messages[-1][1]
            self._wake()
        self._refuse_input(exc)

    def _no_head(self) -> None:
        """The parser is at a message boundary, or in a body."""
        self._head, self._pending, self.partial = 0, bytearray(), False

    def _head_began(self) -> None:
        """A request head is pending: the head timeout applies from when the connection is idle."""
        if not self.partial:
            self.partial = True
            if not self.busy and not self._queue:
                self.since = self._loop.time()

    def _refuse_input(self, exc: HttpProcessingError) -> None:
        """Read no more: the requests parsed before `exc` are answered, then `exc` is (and the socket closes)."""
        self._closing = True
        self._queue.append(exc)
        self._wake()
        self._pause_transport_reading()

    def _wake(self) -> None:
        waiter = self._waiter
        if waiter is not None and not waiter.done():
            waiter.set_result(None)

    async def write(self, data: bytes) -> None:
        transport = self.transport
        if transport is None or transport.is_closing():
            raise ConnectionResetError("client connection lost")
        transport.write(data)
        if self._paused:  # pause_writing came from the transport: the client reads slower than we write
            await self._drain_helper()

    # -- the per-connection task ----------------------------------------------------------------------
    async def _run(self) -> None:
        server, queue = self.server, self._queue
        try:
            while True:
                if not queue:
                    if self._closing or server.draining:
                        break
                    self.since = self._loop.time()
                    self._waiter = self._loop.create_future()
                    await self._waiter
                    self._waiter = None
                    continue
                item = queue.popleft()
                if self._buffer_paused and len(queue) < _MAX_QUEUE // 2:
                    self._resume_reading_for_buffer()
                if isinstance(item, BaseException):
                    await self._refuse(item, 400)
                    break
                msg, payload = item
                if msg.version[0] != 1:
                    # HTTP/0.9 (no version: no headers, an answer without a head) or a major version this
                    # listener does not speak (RFC 9110 s2.5): refused rather than answered as HTTP/1.1.
                    await self._refuse(None, 400)
                    break
                if msg.chunked and (msg.version != HttpVersion11 or
                                    msg.headers.get("Transfer-Encoding", "").lower() != "chunked"):
                    # RFC 9112 s6.1: Transfer-Encoding in an HTTP/1.0 message means faulty framing (a 1.0
                    # hop before us framed it differently); a coding besides chunked we would not apply,
                    # yet Transfer-Encoding is hop-by-hop: its bytes would reach the upstream undeclared.
                    await self._refuse(None, 400)
                    break
                if self._upgraded and not queue and msg.upgrade:
                    if payload is not EMPTY_PAYLOAD:
                        # An Upgrade with a body (RFC 6455 s4.1: a GET) would need it re-framed: refuse.
                        self._upgraded = False
                        await self._refuse(None, 400)
                        break
                    self._hand_over(msg)
                    return
                request = H1Request(self, msg, payload, self._remote)
                self.busy, self._body = True, payload
                try:
                    await server.handler(request)
                except (ConnectionError, asyncio.CancelledError):
                    break
                except Exception:
                    log.exception("request handler failed")
                    if not request.started:
                        await self._refuse(None, 500)
                    break
                finally:
                    self.busy, self._body = False, None
                if not request.keep_alive or self.transport is None:
                    if payload is not EMPTY_PAYLOAD and not payload.is_eof():
                        await self._lingering_close()  # unread body: closing now could reset the answer away
                    break
                if payload is not EMPTY_PAYLOAD and not payload.is_eof() and not await self._linger(payload):
                    break  # the body was not read to its end: the next request cannot be found safely
        except (ConnectionError, asyncio.CancelledError):
            pass
        finally:
            self._closing = True
            if self.transport is not None and not self._upgraded:
                self.transport.close()

    async def _linger(self, payload: StreamReader) -> bool:
        """Read and drop the rest of a body the answer did not need (a 4xx before it was read): closing
        with unread bytes would reset the connection before the client reads the answer (RFC 9112
        s9.6). Bounded in time; True when the body ended and the connection can serve the next request."""
        try:
            async with asyncio.timeout(LINGER_TIMEOUT):
                while not payload.is_eof():
                    if self.transport is None:
                        return False
                    if payload._waiter is not None:
                        # Another reader is still on it: the upstream body writer, cancelled (the answer
                        # came first, or the request was cut) and not yet unwound. Its turn first.
                        await asyncio.sleep(0.001)
                        continue
                    await payload.readany()
        except (TimeoutError, RequestPayloadError, ConnectionError):
            return False
        return True

    async def _refuse(self, exc: BaseException | None, status: int) -> None:
        status, headers, body = self.server.error_answer(exc, status, self._remote)
        headers["Connection"] = "close"
        headers["Content-Length"] = str(len(body))
        headers["Date"] = self.server.date()
        with contextlib.suppress(ConnectionError):
            await self.write(message_head(_status(status), headers) + body)
        await self._lingering_close()

    async def _lingering_close(self) -> None:
        """Closing with unread input resets the connection, and the client may lose the answer just sent
        (RFC 9112 s9.6; a refused head or body is typically still arriving): send FIN after the answer,
        read and drop what still comes until the client closes too, for LINGER_CLOSE at most."""
        transport = self.transport
        if transport is None or transport.is_closing() or not transport.can_write_eof():
            return
        self._closing = True  # data_received drops the input from here on
        transport.write_eof()
        self._resume_transport_reading()
        self._waiter = waiter = self._loop.create_future()  # connection_lost wakes it
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(LINGER_CLOSE):
                await waiter
        self._waiter = None

    def _hand_over(self, msg: Any) -> None:
        """Give the connection, the Upgrade request's bytes and whatever followed to `upgrade_factory`."""
        transport = self.transport
        self.server.conns.discard(self)
        if transport is None:
            return
        head = [f"{msg.method} {msg.path} HTTP/{msg.version[0]}.{msg.version[1]}\r\n".encode()]
        head.extend(b"%b: %b\r\n" % (k, v) for k, v in msg.raw_headers)
        head.append(b"\r\n")
        proto = self.server.upgrade_factory()
        transport.set_protocol(proto)
        proto.connection_made(transport)
        proto.data_received(b"".join(head) + self._tail)
        self._resume_transport_reading()


class H1Server:
    """Owns the listening socket and its connections: timeouts, graceful drain."""

    def __init__(self, handler: Handler, error_answer: ErrorAnswer, upgrade_factory: Callable[[], asyncio.Protocol],
                 *, max_line: int, max_headers: int = 1000, keepalive_timeout: float = KEEPALIVE_TIMEOUT,
                 head_timeout: float = HEAD_TIMEOUT, conn_state: Callable[[], Any] | None = None) -> None:
        self.loop = asyncio.get_running_loop()
        self.handler, self.error_answer, self.upgrade_factory = handler, error_answer, upgrade_factory
        self.conn_state = conn_state  # makes each connection's `state`: the app's per-connection scratch
        self.max_line, self.max_headers = max_line, max_headers
        self.max_head = 2 * max_line  # a whole request head: a longest request line plus a longest field
        self.keepalive_timeout, self.head_timeout = keepalive_timeout, head_timeout
        self.body_timeout = BODY_TIMEOUT  # read here, so a test may set the module's constant first
        self.send_timeout = SEND_TIMEOUT
        self.conns: set[_Conn] = set()
        self.tasks: set[asyncio.Task[None]] = set()
        self.draining = False
        self.deadline = 0.0  # drain(): loop time at which what is still in flight is cut
        self._server: asyncio.Server | None = None
        self._sweeper: asyncio.TimerHandle | None = None
        self._date_sec = -1
        self._date = ""

    def date(self) -> str:
        now = int(time.time())
        if now != self._date_sec:
            self._date_sec, self._date = now, time.strftime("%a, %d %b %Y %H:%M:%S GMT", time.gmtime(now))
        return self._date

    async def listen(self, host: str, port: int, *, ssl: Any = None, reuse_port: bool = False) -> int:
        self._server = await self.loop.create_server(lambda: _Conn(self), host, port, ssl=ssl,
                                                     reuse_port=reuse_port or None, backlog=1024)
        self._sweeper = self.loop.call_later(1.0, self._sweep)
        return int(self._server.sockets[0].getsockname()[1])

    def _sweep(self) -> None:
        """Once a second: close keep-alive connections idle too long and request heads arriving too slowly;
        fail a request body that stopped arriving."""
        now = self.loop.time()
        for conn in list(self.conns):
            if conn.transport is None:
                continue
            if conn.busy or conn._queue:
                body = conn._body
                if conn.received != conn.heard or (conn._reading_paused and now < conn.pulled_until):
                    # Reading paused while the body's consumer is alive: the body waits on us (on a target
                    # taking it slowly), not on the client, which may not read before it has sent it all.
                    conn.heard, conn.heard_at = conn.received, now
                if conn._paused and self._stalled(conn, now) and (
                        body is None or body.is_eof() or now - conn.heard_at > self.send_timeout):
                    # The client has taken no byte of its answer for send_timeout, nor sent a byte of its
                    # body (which it may finish before it reads): cut, or it holds the answer's upstream
                    # connection and its target's max_requests slot for as long as it likes. The request
                    # is cancelled as for a client gone (499).
                    conn.transport.abort()
                    continue
                if body is None or body.is_eof() or conn._reading_paused or conn._buffer_paused:
                    conn._seen = -1  # no body awaited, or we are the slow side (flow control holds the socket)
                elif conn.received != conn._seen:
                    conn._seen, conn._seen_at = conn.received, now
                elif now - conn._seen_at > self.body_timeout:
                    # The client stopped sending its body: the request (and its upstream call) fails
                    # instead of holding both connections for as long as the client stays silent.
                    conn._fail_body(RequestPayloadError("request body timed out"))
                continue
            limit = self.head_timeout if conn.partial else self.keepalive_timeout
            if now - conn.since > limit:
                conn.transport.close()
        self._sweeper = self.loop.call_later(1.0, self._sweep)

    def _stalled(self, conn: _Conn, now: float) -> bool:
        """Has the client taken no byte of its answer for send_timeout? Progress is what is still unsent
        shrinking (our buffer plus the kernel's send queue): the buffer alone moves only when the kernel
        frees a third of its own (megabytes), which a slow reader can take minutes to read."""
        unsent = _unsent(conn)
        if unsent is None or unsent < conn.unsent:
            conn.stalled_at = now  # progress (or no way to tell: never cut on a guess)
        conn.unsent = unsent if unsent is not None else sys.maxsize
        return now - conn.stalled_at > self.send_timeout

    async def drain(self, deadline: float) -> None:
        """Stop accepting; close idle connections now; in-flight answers say Connection: close; at
        `deadline` (loop time) cut whatever remains."""
        self.draining = True
        self.deadline = deadline
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            conn._wake()  # an idle connection's task sees `draining` and closes it
        while self.conns and self.loop.time() < self.deadline:  # hurry() may bring it forward
            if all(not c.busy and not c._queue for c in self.conns):
                break
            await asyncio.sleep(0.05)
        await self.close()

    async def close(self) -> None:
        self.draining = True
        if self._sweeper is not None:
            self._sweeper.cancel()
        if self._server is not None:
            self._server.close()
        for conn in list(self.conns):
            if conn.transport is not None:
                conn.cut = True  # the shutdown's cut: its tasks are cancelled below, not as clients gone
                conn.transport.abort()
        self.conns.clear()
        for task in list(self.tasks):
            task.cancel()  # a request still running past the grace is cut, as aiohttp's shutdown did
        await asyncio.sleep(0)
