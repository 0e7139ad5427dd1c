"""gateway.httphead: the head written when a field value is not ASCII (obs-text kept byte for byte)."""

from __future__ import annotations

import pytest
from aiohttp.http_writer import _serialize_headers
from multidict import CIMultiDict

from gateway.httphead import HeadInjection, needs_own_head, serialize_head


def test_same_bytes_as_aiohttps_serializer_where_both_apply() -> None:
    for fields in (CIMultiDict([("Host", "a"), ("X-A", "1"), ("X-A", "2"), ("Empty", "")]),
                   CIMultiDict([("Content-Disposition", 'attachment; filename="caf\u00e9.txt"')])):
        assert serialize_head("GET /x HTTP/1.1", fields.items()) == _serialize_headers("GET /x HTTP/1.1", fields)


def test_bytes_the_parser_could_not_decode_go_out_as_they_came() -> None:
    received = b"caf\xe9 \xff\x80".decode("utf-8", "surrogateescape")  # what aiohttp's parsers hand over
    head = serialize_head("HTTP/1.1 200 OK", [("X-Name", received)])
    assert head == b"HTTP/1.1 200 OK\r\nX-Name: caf\xe9 \xff\x80\r\n\r\n"


@pytest.mark.parametrize(("start", "name", "value"), [
    ("GET / HTTP/1.1", "X-A", "a\r\nX-Admin: 1"), ("GET / HTTP/1.1", "X-A", "a\nb"),
    ("GET / HTTP/1.1", "X-A", "a\rb"), ("GET / HTTP/1.1", "X-A", "a\x00"), ("GET / HTTP/1.1", "X-A\r\nB", "v"),
    ("GET /\r\nX: y HTTP/1.1", "X-A", "v"), ("GET / HTTP/1.1", "X-A", "caf\u00e9\r\n"),
    ("GET / HTTP/1.1", "X-A", "\ud800"),  # a surrogate that stands for no received byte
    ("GET / HTTP/1.1", "X-A", "caf\u00e9\x01"), ("GET / HTTP/1.1", "X-A", "caf\u00e9\x7f"),  # as aiohttp refuses
])
def test_anything_that_would_split_the_head_is_refused(start: str, name: str, value: str) -> None:
    with pytest.raises(HeadInjection):
        serialize_head(start, [("Host", "h"), (name, value)])


def test_the_own_head_is_taken_only_for_values_that_are_not_ascii() -> None:
    assert not needs_own_head(CIMultiDict([("A", "plain"), ("B", "")]))
    assert needs_own_head(CIMultiDict([("A", "plain"), ("B", "caf\u00e9")]))
    assert needs_own_head(CIMultiDict([("A", b"\xe9".decode("utf-8", "surrogateescape"))]))
