"""Hot-path memos: header verdicts never leak across drop sets; the access log's escaped-string caches."""

from __future__ import annotations

import ipaddress
import json
import select
import sys
from typing import Any

from multidict import CIMultiDict

from gateway import accesslog, identity
from gateway.accesslog import _Escaped
from gateway.identity import relay_response_headers, upstream_request_headers
from gateway.pipeline import Exchange


def forward(headers: list[tuple[str, str]], **kw: object) -> CIMultiDict[str]:
    args: dict[str, object] = dict(
        strip_authorization=True, keep_upgrade=False, client_ip="203.0.113.9", peer_ip="203.0.113.9",
        trusted_proxies=(), scheme="https", host="api.example.com", request_id="rid-1",
    )
    args.update(kw)
    return upstream_request_headers(CIMultiDict(headers), **args)  # type: ignore[arg-type]


def test_a_kept_name_is_dropped_once_connection_names_it() -> None:
    assert forward([("X-Custom", "1")])["X-Custom"] == "1"  # memoised as kept for the base drop set
    assert "X-Custom" not in forward([("X-Custom", "1"), ("Connection", "x-custom")])
    assert forward([("X-Custom", "2")])["X-Custom"] == "2"


def test_authorization_verdict_follows_the_route() -> None:
    assert "Authorization" not in forward([("Authorization", "Bearer t")])
    assert forward([("Authorization", "Basic eA==")], strip_authorization=False)["Authorization"] == "Basic eA=="
    assert "Authorization" not in forward([("Authorization", "Bearer t")])


def test_x_auth_any_case_and_forwarded_stay_stripped_after_memoising() -> None:
    for _ in range(3):
        out = forward([("X-Auth-Subject", "a"), ("x-AUTH-roles", "b"), ("Forwarded", "for=1.2.3.4"),
                       ("Accept", "a/b")])
        assert sorted(k.lower() for k in out) == [
            "accept", "x-forwarded-for", "x-forwarded-host", "x-forwarded-proto", "x-request-id"]


def test_trusted_peer_path_is_not_memoised_into_the_untrusted_one() -> None:
    trusted = dict(peer_ip="10.0.0.1", trusted_proxies=(ipaddress.ip_network("10.0.0.0/8"),))
    out = forward([("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "1.2.3.4")], **trusted)
    assert out["Forwarded"] == "for=1.2.3.4" and out["X-Forwarded-For"] == "1.2.3.4, 10.0.0.1"
    out = forward([("Forwarded", "for=1.2.3.4"), ("X-Forwarded-For", "1.2.3.4")])
    assert "Forwarded" not in out and out["X-Forwarded-For"] == "203.0.113.9"


def test_response_memo_follows_connection() -> None:
    out: CIMultiDict[str] = CIMultiDict()
    relay_response_headers(CIMultiDict([("X-Trace", "1"), ("Connection", "keep-alive")]), out)
    assert out["X-Trace"] == "1" and "Connection" not in out
    out = CIMultiDict()
    relay_response_headers(CIMultiDict([("X-Trace", "1"), ("Connection", "X-Trace")]), out)
    assert "X-Trace" not in out
    out = CIMultiDict()
    relay_response_headers(CIMultiDict([("Upgrade", "websocket"), ("X-Trace", "1")]), out, keep_upgrade=True)
    assert out["Upgrade"] == "websocket" and out["X-Trace"] == "1"
    out = CIMultiDict()
    relay_response_headers(CIMultiDict([("Upgrade", "websocket")]), out)
    assert "Upgrade" not in out


def test_memo_is_bounded_against_many_names_and_connection_values() -> None:
    for i in range(3 * identity._MEMO_NAMES):
        forward([(f"X-N{i}", "1")])
    for i in range(3 * identity._MEMO_SETS):
        forward([("Connection", f"x-hop{i}"), (f"X-Hop{i}", "1")])
    assert len(identity._REQUEST_MEMO) <= identity._MEMO_SETS
    assert all(len(t) <= identity._MEMO_NAMES for t in identity._REQUEST_MEMO.values())
    # ...and verdicts stay right after the tables were emptied.
    assert "X-Hop5" not in forward([("Connection", "x-hop5"), ("X-Hop5", "1")])
    assert forward([("X-Hop5", "1")])["X-Hop5"] == "1"


def test_escaped_cache_is_exact_and_bounded() -> None:
    esc, opt = _Escaped(4), _Escaped(4, empty_null=True)
    for value in ["GET", 'a"b\\c', "\u00e9\u2028\n", "", "x" * 50, "GET"]:
        assert esc[value] == json.dumps(value)
        assert opt[value] == (json.dumps(value) if value else "null")
    for i in range(20):
        assert json.loads(esc[f"m{i}"]) == f"m{i}"
    assert len(esc) <= 4


class _Recorder:
    """Stands for sys.stdout: records every write the access log makes."""

    def __init__(self) -> None:
        self.writes: list[str] = []
        self.flushes = 0

    def write(self, text: str) -> int:
        self.writes.append(text)
        return len(text)

    def flush(self) -> None:
        self.flushes += 1


def test_access_log_writes_whole_lines_in_batches_no_larger_than_pipe_buf(monkeypatch: Any) -> None:
    """One write per batch (not per request), each at most PIPE_BUF bytes of whole lines, so the lines of
    workers sharing a stdout pipe cannot interleave; nothing is lost or reordered; flush() empties it."""
    out = _Recorder()
    monkeypatch.setattr(sys, "stdout", out)
    accesslog.flush()
    ex = Exchange("r" * 32, route="orders", upstream="orders")
    for i in range(200):
        accesslog.request_line("2026-11-22T00:00:00.000Z", "GET", f"/orders/{i}" + "x" * (i % 50), ex, 200,
                               0.001, "http://t", 200, "none", "127.0.0.1")
    assert 0 < len(out.writes) < 40  # batched: ~12 lines a write, not 200 writes
    pending = len(out.writes)
    accesslog.flush()
    assert len(out.writes) == pending + 1 and out.flushes == len(out.writes)
    accesslog.flush()  # nothing pending: no empty write
    assert len(out.writes) == pending + 1
    assert all(len(w.encode()) <= select.PIPE_BUF and w.endswith("\n") for w in out.writes)
    lines = "".join(out.writes).splitlines()
    assert [json.loads(line)["path"] for line in lines] == [f"/orders/{i}" + "x" * (i % 50) for i in range(200)]
