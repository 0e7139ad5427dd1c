"""A message head that keeps received bytes which are not UTF-8 (obs-text, RFC 9110 s5.5).

aiohttp's C parsers decode header bytes that are not UTF-8 into lone surrogates (surrogateescape), and
its C serializer, which writes both proxy sides' heads, silently drops surrogates: a Latin-1 `café`
would leave as `caf`. The serializer stays the fast path; a head whose field values are not all ASCII
(`needs_own_head`, one C join) is written here instead: UTF-8 with surrogateescape, so every received
byte goes out as it came. The same refusal as the serializer's: a CR or LF anywhere but the line ends
raises, so a head can never be split (request smuggling, response splitting), and so does any other
control character but HTAB (RFC 9110 s5.5). Both ways raise HeadInjection.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Mapping
from typing import Any

from aiohttp.http_writer import _serialize_headers

_CONTROL = re.compile(r"[\x00-\x08\x0b\x0c\x0e-\x1f\x7f]")  # C0 but HTAB, CR and LF (counted apart), and DEL


class HeadInjection(ValueError):
    """A control character (CR, LF, NUL, any other but HTAB) inside the start line, a field name or value."""


def head(start_line: str, values: Mapping[str, str], fields: Any = None) -> bytes:
    """The head both proxy sides write: aiohttp's C serializer, or serialize_head() when the start line
    or a value in `values` is not ASCII. `fields` (default `values`) is what goes out, in order: any
    object with items(), such as h1client's Host-first view of `values`."""
    fields = values if fields is None else fields
    if needs_own_head(values) or not start_line.isascii():
        return serialize_head(start_line, fields.items())
    try:
        return _serialize_headers(start_line, fields)
    except ValueError as exc:  # a control character: the one error the caller can tell apart
        raise HeadInjection(str(exc)) from exc


def needs_own_head(fields: Mapping[str, str]) -> bool:
    """True when a field value is not ASCII: aiohttp's serializer would drop what is not UTF-8 in it.
    (str.isascii() reads a flag: the cost is the join.)"""
    return not "".join(fields.values()).isascii()


def serialize_head(start_line: str, fields: Iterable[tuple[str, str]]) -> bytes:
    lines = [start_line]
    lines.extend([f"{name}: {value}" for name, value in fields])
    text = "\r\n".join(lines)
    ends = len(lines) - 1
    # Exactly the CRs and LFs the line ends put there: one more anywhere would end a line early. Nor any
    # other control character but HTAB (RFC 9110 s5.5), as aiohttp's serializer refuses: which of the two
    # writes a head must not decide whether a field with one goes out.
    if text.count("\r") != ends or text.count("\n") != ends or _CONTROL.search(text):
        raise HeadInjection("control character (CR, LF, NUL, ...) in the start line or a header field: refused")
    try:
        return (text + "\r\n\r\n").encode("utf-8", "surrogateescape")
    except UnicodeEncodeError as exc:  # a lone surrogate no received byte stands for
        raise HeadInjection("header field with no byte form: refused") from exc
