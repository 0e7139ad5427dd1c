"""The access log: one JSON line per request on stdout (SPEC 7), built cheaply and never with a token.

Lines are written in batches of whole lines, at most PIPE_BUF bytes each, by `flush()`: when the next
line would not fit, and every 0.5 s from the app (and at stop). One write per ~12 requests instead of
one per request: with PYTHONUNBUFFERED=1 (the Dockerfile's, and common in containers) each
`sys.stdout.write` was a system call. And a write of at most PIPE_BUF bytes to a pipe is atomic
(POSIX), so the lines of `--workers N` processes sharing one stdout pipe never interleave inside a
line, which 8 KiB buffered writes did not guarantee.
"""

from __future__ import annotations

import json
import select
import sys
import time
from collections.abc import Callable
from datetime import UTC, datetime
from json.encoder import encode_basestring_ascii as _esc

from gateway.pipeline import Exchange

_MILLIS = tuple(f"{ms:03d}Z" for ms in range(1000))  # the ts suffixes, formatted once
_NO_PRINCIPAL = ',"iss":null,"sub":null,"aud":null,"jti":null'


def request_line(ts: str, method: str, raw_path: str, ex: Exchange, status: int, elapsed: float, target: str,
                 upstream_status: int, auth: str, client_ip: str) -> None:
    # One f-string, no dict and no json.dumps of the whole line: every string goes through the C
    # JSON escaper (exact escaping, ASCII output like json.dumps), numbers are formatted as it would.
    # Fields that repeat (method, route, upstream, target, auth, a token's claims) are escaped once
    # and looked up after that (bounded caches: _Escaped).
    p = ex.principal
    if p is None:
        who = _NO_PRINCIPAL
    else:
        key = p.token_hash
        cached = _WHO.get(key) if key else None
        if cached is not None:
            who = cached
        else:
            aud = p.claims.get("aud")  # as the token has it: one string, or a list
            auds = _esc(aud) if isinstance(aud, str) else f'[{",".join(map(_esc, p.aud))}]'
            who = f',"iss":{_esc(p.iss)},"sub":{_opt(p.subject)},"aud":{auds},"jti":{_opt(p.jti)}'
            if key:
                if len(_WHO) >= _WHO_MAX:
                    _WHO.clear()
                _WHO[key] = who
    _emit(
        f'{{"ts":"{ts}","request_id":{_esc(ex.request_id)},"method":{_ESC[method]}'
        f',"path":{_esc(raw_path.partition("?")[0])},"route":{_ESC[ex.route]},"status":{status}'
        f',"duration_ms":{elapsed * 1000:.3f},"upstream":{_OPT[ex.upstream]}'
        f',"target":{_OPT[target]},"upstream_status":{upstream_status or "null"}'
        f',"client_ip":{_esc(client_ip)}{who},"auth":{_ESC[auth]}}}\n')


def refused_line(request_id: str, status: int, client_ip: str | None, auth: str) -> None:
    """The line for a request the HTTP parser refused: no method, path or route is known."""
    _emit(json.dumps({
        "ts": datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z"),
        "request_id": request_id, "method": None, "path": None, "route": "-", "status": status,
        "duration_ms": 0.0, "upstream": None, "target": None, "upstream_status": None, "client_ip": client_ip,
        "iss": None, "sub": None, "aud": None, "jti": None, "auth": auth}, separators=(",", ":")) + "\n")


_BATCH = select.PIPE_BUF  # bytes per write at most (lines are ASCII: the JSON escaper writes \uXXXX)
_pending: list[str] = []
_pending_size = 0


def _emit(line: str) -> None:
    global _pending_size
    if _pending_size + len(line) > _BATCH and _pending:
        flush()
    _pending.append(line)
    _pending_size += len(line)


def flush() -> None:
    """Write the pending lines to stdout now (the app calls this every 0.5 s and when it stops)."""
    global _pending_size
    if not _pending:
        return
    text = "".join(_pending)
    _pending.clear()
    _pending_size = 0
    out = sys.stdout
    out.write(text)
    out.flush()


def _opt(value: str | None) -> str:
    """A JSON string, or null for None and "" (the log's "not known")."""
    return _esc(value) if value else "null"


class _Escaped(dict[str, str]):
    """str -> its JSON string (or null for "" when `empty_null`), computed on first use.

    Bounded: the values come partly from clients (a method token, an auth failure reason is ours, but a
    method is theirs), so the cache is emptied when it reaches `limit` rather than grow without end."""

    __slots__ = ("_limit", "_empty_null")

    def __init__(self, limit: int, *, empty_null: bool = False) -> None:
        super().__init__()
        self._limit = limit
        self._empty_null = empty_null

    def __missing__(self, key: str) -> str:
        value = "null" if self._empty_null and not key else _esc(key)
        if len(self) >= self._limit:
            self.clear()
        self[key] = value
        return value


_ESC = _Escaped(1024)
_OPT = _Escaped(1024, empty_null=True)
# A verified token's log fields (iss, sub, aud, jti) by its sha256: the same token repeats within its life.
_WHO: dict[str, str] = {}
_WHO_MAX = 4096


class Stamp:
    """The access log's `ts` (ISO 8601 UTC, milliseconds): the date-time part is formatted once a second."""

    __slots__ = ("_clock", "_sec", "_prefix")

    def __init__(self, clock: Callable[[], float] = time.time) -> None:
        self._clock = clock
        self._sec = -1
        self._prefix = ""

    def __call__(self) -> str:
        sec, ms = divmod(int(self._clock() * 1000), 1000)
        if sec != self._sec:
            self._sec, self._prefix = sec, time.strftime("%Y-%m-%dT%H:%M:%S.", time.gmtime(sec))
        return self._prefix + _MILLIS[ms]
