"""Typed reading of composed YAML nodes: every value keeps its line, every problem is collected."""

from __future__ import annotations

import ipaddress
import math
import os
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any, TypeVar

import yaml

T = TypeVar("T")
Node = yaml.Node

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)\s*$")
_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_ENV = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?::-([^}]*))?\}")


def parse_duration(text: str) -> float:
    """'250ms' | '30s' | '5m' | '24h' | '7d' -> seconds. Raises ValueError."""
    m = _DURATION.match(text)
    if not m:
        raise ValueError(f"expected a duration like 250ms, 30s, 5m or 24h, got {text!r}")
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    if not math.isfinite(seconds):
        raise ValueError(f"duration {text!r} is too long")
    return seconds


MAX_WORKERS = 256  # processes: a typo (100000000) must not fork until the machine falls over


class Invalid(Exception):
    """One problem found; collected by _Reader, never escapes load()."""


def path_is(path: str, test: Callable[[Path], bool]) -> bool:
    """`test(Path(path))` (Path.is_file, Path.is_dir); Invalid when the OS refuses the name itself
    (ENAMETOOLONG, EACCES ...), which pathlib's tests let through."""
    try:
        return test(Path(path))
    except (OSError, ValueError) as exc:
        raise Invalid(f"cannot use {path!r}: {getattr(exc, 'strerror', None) or exc}") from None


class Reader:
    """Walks the composed YAML nodes, so every value keeps its line for messages."""

    def __init__(self, filename: str) -> None:
        self.filename = filename
        self.problems: list[str] = []
        self._constructor = yaml.constructor.SafeConstructor()
        self._resolver = yaml.resolver.Resolver()

    def error(self, node: Node | None, key: str, message: str) -> None:
        line = node.start_mark.line + 1 if node is not None else 1
        self.problems.append(f"{self.filename}:{line}: {key}: {message}")

    def field(self, fn: Callable[[Node, str], T], node: Node | None, key: str, default: T) -> T:
        """Read one value; on a problem record it and return the default, so reading goes on."""
        if node is None:
            return default
        try:
            return fn(node, key)
        except Invalid as exc:
            self.error(node, key, str(exc))
            return default

    # -- scalar readers ---------------------------------------------------------------------------
    def scalar(self, node: Node, key: str) -> Any:
        if not isinstance(node, yaml.ScalarNode):
            raise Invalid("expected a single value, not a " + ("list" if isinstance(node, yaml.SequenceNode)
                                                                 else "mapping"))
        if "${" in node.value:
            text = self._substitute(node.value)
            if node.style is None:
                # A plain scalar: type the result as YAML types a plain scalar (int, bool, null ...),
                # but never parse it as YAML: a value holding ': ', ' #', '[' or '*' is that string,
                # not a mapping, a comment, a syntax error or an alias.
                text = text.strip()
                tag = self._resolver.resolve(yaml.ScalarNode, text, (True, False))  # type: ignore[no-untyped-call]
                typed = yaml.ScalarNode(tag, text, node.start_mark, node.end_mark)
                return self._construct(typed) if text else None
            return self._checked(text)
        return self._construct(node)

    def _construct(self, node: Node) -> Any:
        """A scalar as YAML types it; a tag or literal it cannot build (`!!int abc`, `0b_`, `2020-13-45`,
        `!!python/object:...`) is a problem of this key, not an exception out of load()."""
        try:
            value = self._constructor.construct_object(node, deep=True)
        except (yaml.YAMLError, ValueError, TypeError, KeyError, AttributeError, OverflowError) as exc:
            what = getattr(exc, "problem", None) or str(exc) or type(exc).__name__
            raise Invalid(f"cannot read {node.value!r} as {node.tag}: {' '.join(str(what).split())}") from None
        return self._checked(value)

    @staticmethod
    def _checked(value: Any) -> Any:
        if isinstance(value, str):
            try:
                value.encode("utf-8")
            except UnicodeEncodeError:
                raise Invalid(f"{value!r} is not valid Unicode text (a lone surrogate)") from None
        return value

    def written(self, node: Node) -> str:
        """A scalar's text before YAML types it: as written, or (plain) as its ${VAR} substitution reads."""
        return self._substitute(node.value).strip() if "${" in node.value else str(node.value)

    def _substitute(self, text: str) -> str:
        def repl(m: re.Match[str]) -> str:
            value = os.environ.get(m.group(1))
            if value is None or (value == "" and m.group(2) is not None):
                if m.group(2) is None:
                    name = m.group(1)
                    raise Invalid(f"environment variable {name} is not set (write ${{{name}:-default}})")
                return m.group(2)
            return value
        return _ENV.sub(repl, text)

    def str_(self, node: Node, key: str) -> str:
        value = self.scalar(node, key)
        if not isinstance(value, str) or not value:
            raise Invalid(f"expected a non-empty string, got {_show(value)}")
        return value

    def opt_str(self, node: Node, key: str) -> str | None:
        value = self.scalar(node, key)
        if value is None:
            return None
        if not isinstance(value, str) or not value:
            raise Invalid(f"expected a non-empty string or null, got {_show(value)}")
        return value

    def int_(self, node: Node, key: str, minimum: int = 0, maximum: int | None = None) -> int:
        value = self.scalar(node, key)
        if isinstance(value, bool) or not isinstance(value, int):
            raise Invalid(f"expected a whole number, got {_show(value)}")
        if value < minimum:
            raise Invalid(f"must be at least {minimum}, got {value}")
        if maximum is not None and value > maximum:
            raise Invalid(f"must be at most {maximum}, got {value}")
        return value

    def workers(self, node: Node, key: str) -> int:
        return self.int_(node, key, 1, MAX_WORKERS)

    def positive_int(self, node: Node, key: str) -> int:
        return self.int_(node, key, 1)

    def bool_(self, node: Node, key: str) -> bool:
        value = self.scalar(node, key)
        if not isinstance(value, bool):
            raise Invalid(f"expected true or false, got {_show(value)}")
        return value

    def duration(self, node: Node, key: str) -> float:
        value = self.scalar(node, key)
        if not isinstance(value, str):
            raise Invalid(f"expected a duration string like 250ms, 30s, 5m or 24h, got {_show(value)}")
        try:
            return parse_duration(value)
        except ValueError as exc:
            raise Invalid(str(exc)) from None

    def positive_duration(self, node: Node, key: str) -> float:
        value = self.duration(node, key)
        if value <= 0:
            raise Invalid("must be longer than 0")
        return value

    def choice(self, choices: tuple[str, ...]) -> Callable[[Node, str], str]:
        def read(node: Node, key: str) -> str:
            value = self.scalar(node, key)
            if value not in choices:
                raise Invalid(f"{_show(value)} is not one of: {', '.join(choices)}")
            return str(value)
        return read

    def str_list(self, node: Node, key: str) -> tuple[str, ...]:
        if isinstance(node, yaml.ScalarNode) and self.scalar(node, key) is None:
            return ()
        if not isinstance(node, yaml.SequenceNode):
            raise Invalid("expected a list of strings")
        out: list[str] = []
        for i, item in enumerate(node.value):
            value = self.field(self.str_, item, f"{key}[{i}]", "")
            if value:
                out.append(value)
        return tuple(out)

    def strs(self, node: Node | None, key: str) -> tuple[str, ...]:
        """A list of strings, () when absent or wrong (the problem is recorded)."""
        empty: tuple[str, ...] = ()
        return self.field(self.str_list, node, key, empty)

    def listen(self, node: Node, key: str) -> tuple[str, int]:
        text = self.str_(node, key)
        host, sep, port = text.rpartition(":")
        if not sep or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
            raise Invalid(f"expected HOST:PORT like 0.0.0.0:8080, got {text!r}")
        host = host.strip("[]") or "0.0.0.0"
        try:
            ipaddress.ip_address(host)
        except ValueError:
            if host != "localhost":
                raise Invalid(f"expected an IP address or localhost as host, got {host!r}") from None
        return host, int(port)

    def existing_file(self, node: Node, key: str) -> str:
        path = self.str_(node, key)
        if not path_is(path, Path.is_file):
            raise Invalid(f"file not found: {path}")
        return path

    # -- structure ----------------------------------------------------------------------------------
    def mapping(self, node: Node | None, key: str, allowed: tuple[str, ...]) -> dict[str, Node]:
        """Children of a mapping by key; unknown and duplicate keys are problems."""
        if node is None or (isinstance(node, yaml.ScalarNode) and node.value in ("", "~", "null")):
            return {}
        if not isinstance(node, yaml.MappingNode):
            self.error(node, key, "expected a mapping")
            return {}
        out: dict[str, Node] = {}
        for k_node, v_node in node.value:
            name = str(k_node.value)
            where = f"{key}.{name}" if key else name
            if name not in allowed:
                self.error(k_node, where, f"unknown key; known: {', '.join(allowed)}")
            elif name in out:
                self.error(k_node, where, "duplicate key")
            else:
                out[name] = v_node
        return out


def _show(value: Any) -> str:
    return "nothing" if value is None else repr(value)


