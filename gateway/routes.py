"""Path normalisation and the route table: compiled once from config, match() is pure per request."""

from __future__ import annotations

import ipaddress
import re
from collections import OrderedDict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from urllib.parse import unquote, unquote_to_bytes

from gateway.config_types import RouteConfig
from gateway.errors import BadPath, MethodNotAllowed, NotFound
from gateway.model import RouteMatch

# RFC 3986 s2.3: only unreserved characters may be decoded without changing what the URI means.
_UNRESERVED = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-._~")
# A path that is already canonical (no escapes, no dot/empty segments, no dot-only segment with
# `;` parameters) skips the slow path; the test suite checks both paths agree on random input.
_FAST = re.compile(r"(?:/(?!\.\.?(?:/|$))(?!\.*;)[A-Za-z0-9\-._~!$&'()*+,;=:@]+)*/?")
# Literal characters that can never be in a safe path: RFC 3986 s7.3 (backslash is a separator on
# many servers), NUL and other controls (request smuggling, truncation in C-based upstreams).
_FORBIDDEN = re.compile(r"[\x00-\x1f\x7f\\]")
_BAD_ESCAPE = re.compile(r"%(?![0-9A-Fa-f]{2})")
_ESCAPE = re.compile(r"%([0-9A-Fa-f]{2})")
# Anything outside RFC 3986 pchar / "/" / "%" is re-encoded, so the output is plain ASCII.
_NOT_PCHAR = re.compile(r"[^A-Za-z0-9\-._~!$&'()*+,;=:@/%]")
_PARAM = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
_NO_PARAMS: Mapping[str, str] = MappingProxyType({})
_SEEN_SIZE = 4096  # successful matches remembered per table
_SEEN_MAX_PATH = 256  # longer raw paths are matched every time: the memo stays under ~4 MB


def normalize_path(raw: str) -> str:
    """The canonical form of a request path (no query string); raises BadPath when it is unsafe."""
    if raw[:1] == "/" and _FAST.fullmatch(raw):
        return raw
    return _normalize_slow(raw)


def _escape_sub(m: re.Match[str]) -> str:
    byte = int(m.group(1), 16)
    char = chr(byte)
    if char in _UNRESERVED:
        return char
    # RFC 3986 s7.3: an encoded "/" or "\" is one segment to us and a separator to many upstreams
    # (Tomcat ALLOW_ENCODED_SLASH, IIS, Windows); there is no safe reading, so refuse.
    if byte in (0x2F, 0x5C) or byte < 0x20 or byte == 0x7F:
        raise BadPath()
    return "%" + m.group(1).upper()


def _encode_literal(m: re.Match[str]) -> str:
    try:
        data = m.group(0).encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raise BadPath() from None
    return "".join(f"%{b:02X}" for b in data)


def _normalize_slow(raw: str) -> str:
    if raw[:1] != "/" or _FORBIDDEN.search(raw) or _BAD_ESCAPE.search(raw):
        raise BadPath()
    path = _ESCAPE.sub(_escape_sub, _NOT_PCHAR.sub(_encode_literal, raw))
    try:
        # RFC 3629 s10: invalid or overlong UTF-8 (%C0%AE is an overlong ".") is refused, not guessed at.
        unquote_to_bytes(path).decode("utf-8")
    except UnicodeDecodeError:
        raise BadPath() from None
    segments = path.split("/")
    out: list[str] = []
    for seg in segments[1:]:
        if seg == "" or seg == ".":
            continue  # `//` collapses; RFC 3986 s5.2.4 removes "." segments
        if seg == "..":
            if not out:
                raise BadPath()  # above the root: refuse rather than clamp (the client meant something else)
            out.pop()
            continue
        # Tomcat/Spring strip `;params` from each segment before resolving dots, so `..;x` is `..`
        # to them and a plain segment to us (CVE-2020-1957 style bypass); `/;x/admin` is `/admin`.
        # Refuse any segment that is only dots (or nothing) before its first `;` (or encoded %3B).
        plain = seg.replace("%3B", ";")
        semi = plain.find(";")
        if semi != -1 and plain[:semi].strip(".") == "":
            raise BadPath()
        out.append(seg)
    trailing = segments[-1] in ("", ".", "..")
    if not out:
        return "/"
    return "/" + "/".join(out) + ("/" if trailing else "")


def _split_template(template: str) -> list[str]:
    return template[1:].split("/")


def template_params(template: str) -> tuple[str, ...]:
    """The `{name}` parameters of a path template, in order."""
    return tuple(_PARAM.findall(template))


def check_template(template: str) -> str | None:
    """An error message for a path template that cannot be used, or None when it is good."""
    if not template.startswith("/"):
        return f"a path template must start with '/', got {template!r}"
    seen: set[str] = set()
    for seg in _split_template(template):
        if "{" not in seg and "}" not in seg:
            continue
        m = _PARAM.fullmatch(seg)
        if m is None:
            if _PARAM.search(seg):
                return f"a parameter must be a whole segment, got {seg!r} in {template!r}"
            return f"bad parameter syntax {seg!r}: write {{name}} with letters, digits and '_'"
        if m.group(1) in seen:
            return f"duplicate parameter {{{m.group(1)}}} in {template!r}"
        seen.add(m.group(1))
    literal = _PARAM.sub("p", template)
    try:
        canonical = normalize_path(literal)
    except BadPath:
        return f"{template!r} is not a safe path (encoded '/' or '\\', control characters, '..' or ';')"
    if canonical != literal:
        return f"{template!r} is not in normal form; it would never match (normal form: {canonical!r})"
    return None


def check_prefix(prefix: str) -> str | None:
    """An error message for a path_prefix / strip_prefix that cannot be used, or None."""
    if "{" in prefix or "}" in prefix:
        return f"a prefix cannot have parameters, got {prefix!r}"
    return check_template(prefix)


# A Host's syntax: a host name's characters only, or an [IPv6 address]; and an optional port. RFC 3986's
# reg-name also admits sub-delims (`,` `;` `=` ...) and percent-encoding, which no DNS name holds: relayed
# in X-Forwarded-Host (or a discovery document's jwks_uri), `x,admin.example.com` reads as a list that
# names a host the request was not routed as, and `%2E` as a dot once an upstream decodes it. A name has
# no empty label (`a..b`, `.a`; RFC 1034 s3.1) and at most the one trailing dot of a fully qualified
# name: `internal.example.com..` is not `internal.example.com.` to a resolver, and must not skip a
# host-bound route for a broader one. Empty is allowed (RFC 9112 s3.2: an HTTP/1.0 request, or a Host
# with no value). Between brackets only an IPv6 address (RFC 3986 s3.2.2), with an RFC 6874 zone of
# unreserved characters; checked by valid_host, which also parses the address.
_HOST_SYNTAX = re.compile(
    r"(?:[A-Za-z0-9_~-]+(?:\.[A-Za-z0-9_~-]+)*\.?)?(?::[0-9]{0,5})?"
    r"|\[(?P<ip>[0-9A-Fa-f:.]+)(?:%25[A-Za-z0-9._~-]+)?\](?::[0-9]{0,5})?"
)


def valid_host(host: str) -> bool:
    """Is `host` (a Host header's value) a host name, IPv4 address or [IPv6 address], with an optional port?"""
    m = _HOST_SYNTAX.fullmatch(host)
    if m is None:
        return False
    ip = m.group("ip")
    if ip is None:
        return True
    try:
        ipaddress.IPv6Address(ip)  # `[::1:]`, `[1.2.3.4]`, `[:::]` have the characters but are no address
    except ValueError:
        return False
    return True


def _norm_host(host: str) -> str:
    host = host.strip().lower()
    if host.startswith("["):
        end = host.find("]")
        host = host[: end + 1] if end != -1 else host
    elif host.count(":") == 1:
        host = host.partition(":")[0]
    # "api.example.com." is the same name (RFC 1034 s3.1); without this a trailing dot would skip a
    # host-bound route and fall through to a broader one.
    return host[:-1] if host.endswith(".") else host


def _prefix_base(prefix: str) -> str:
    """`/api/orders/` and `/api/orders` both become `/api/orders`; `/` becomes ``."""
    return normalize_path(prefix).rstrip("/")


_EXACT, _TEMPLATE, _PREFIX = 0, 1, 2


def _first_segment(path: str) -> str:
    end = path.find("/", 1)
    return path[1:] if end == -1 else path[1:end]


@dataclass(frozen=True, slots=True)
class _Compiled:
    index: int
    route: RouteConfig
    kind: int
    key: str  # exact path, or prefix base
    regex: re.Pattern[str] | None
    names: tuple[str, ...]
    host: str | None
    methods: frozenset[str] | None
    strip: str  # strip_prefix base, "" for none

    def params(self, path: str) -> Mapping[str, str] | None:
        if self.kind == _EXACT:
            return _NO_PARAMS if path == self.key else None
        if self.kind == _PREFIX:
            base = self.key  # "" for the prefix "/", which matches every path
            if path.startswith(base) and (len(path) == len(base) or path[len(base)] == "/"):
                return _NO_PARAMS
            return None
        assert self.regex is not None
        m = self.regex.fullmatch(path)
        if m is None:
            return None
        values = m.groups()
        if "%" in path:  # only an escape can decode to something that differs from the segment
            values = tuple(unquote(v, errors="strict") for v in values)
            if any("/" in v for v in values):
                raise BadPath()  # cannot happen after normalisation (%2F is refused); fail closed anyway
        return MappingProxyType(dict(zip(self.names, values, strict=True)))

    def upstream_path(self, path: str) -> str:
        base = self.strip
        if not base:
            return path
        if path == base:
            return "/"
        if path.startswith(base) and path[len(base)] == "/":
            return path[len(base):]
        return path


def _head(c: _Compiled) -> str | None:
    """The literal first segment every path this route matches starts with, or None if any."""
    if c.kind == _PREFIX:
        return _first_segment(c.key) if c.key else None
    first = _first_segment(c.key)
    return None if _PARAM.fullmatch(first) else first


def _compile(index: int, route: RouteConfig) -> _Compiled:
    if (route.path is None) == (route.path_prefix is None):
        raise ValueError(f"route {route.name!r}: exactly one of path or path_prefix is required")
    host = _norm_host(route.host) if route.host else None
    methods = frozenset(m.upper() for m in route.methods) if route.methods is not None else None
    strip = _prefix_base(route.strip_prefix) if route.strip_prefix else ""
    if route.path_prefix is not None:
        problem = check_prefix(route.path_prefix)
        if problem:
            raise ValueError(f"route {route.name!r}: {problem}")
        return _Compiled(index, route, _PREFIX, _prefix_base(route.path_prefix), None, (), host, methods, strip)
    assert route.path is not None
    problem = check_template(route.path)
    if problem:
        raise ValueError(f"route {route.name!r}: {problem}")
    names = template_params(route.path)
    if not names:
        return _Compiled(index, route, _EXACT, route.path, None, (), host, methods, strip)
    pattern = "/" + "/".join(
        "([^/]+)" if _PARAM.fullmatch(seg) else re.escape(seg) for seg in _split_template(route.path)
    )
    return _Compiled(index, route, _TEMPLATE, route.path, re.compile(pattern), names, host, methods, strip)


class RouteTable:
    """Routes compiled once; match() walks the candidates for a path in file order."""

    def __init__(self, routes: Sequence[RouteConfig]) -> None:
        compiled = [_compile(i, r) for i, r in enumerate(routes)]
        wild: list[_Compiled] = []
        by_head: dict[str, list[_Compiled]] = {}  # one pass: thousands of routes must not cost n² here
        for c in compiled:
            if c.kind != _EXACT:
                head = _head(c)
                if head is None:
                    wild.append(c)
                else:
                    by_head.setdefault(head, []).append(c)

        def merged(first: str, extra: Sequence[_Compiled] = ()) -> tuple[_Compiled, ...]:
            # File order is kept inside each candidate tuple, so first-match-wins needs no sorting later.
            return tuple(sorted([*extra, *by_head.get(first, ()), *wild], key=lambda c: c.index))

        # Candidates are bucketed by the path's first segment (a route whose first segment is a
        # parameter, or the prefix "/", is in every bucket); exact paths are one dict lookup.
        self._wild = tuple(wild)
        self._by_first = {h: merged(h) for h in by_head}
        exact: dict[str, list[_Compiled]] = {}
        for c in compiled:
            if c.kind == _EXACT:
                exact.setdefault(c.key, []).append(c)
        self._exact = {key: merged(_first_segment(key), cs) for key, cs in exact.items()}
        self._any_host = any(c.host is not None for c in compiled)
        self._seen: OrderedDict[tuple[str, str, str], RouteMatch] = OrderedDict()
        self.routes = tuple(routes)

    def match(self, method: str, path: str, host: str) -> RouteMatch:
        """The first route matching path, host and method; `path` may be raw (it is normalised here)."""
        key = (method, path, host)
        hit = self._seen.get(key)
        if hit is not None:
            return hit
        found = self._match(method, path, host)
        # match() is a pure function of (method, raw path, host) for this table, so a success can be
        # answered again from memory (RouteMatch and its params are read-only, shared by requests).
        # Refusals (404/405/400) are not kept: a scanner must not fill the table. Bounded in count and
        # in key length; a reload builds a new table, hence a new memo.
        if len(path) <= _SEEN_MAX_PATH:
            seen = self._seen
            if len(seen) >= _SEEN_SIZE:
                seen.popitem(last=False)  # FIFO in O(1) (a plain dict's next(iter()) degrades to O(n))
            seen[key] = found
        return found

    def _match(self, method: str, path: str, host: str) -> RouteMatch:
        path = normalize_path(path)
        found = self._find(method, path, host)
        route = found.route
        self._refuse_reroutes(method, path, host, route)
        if method == "HEAD" and (route.methods is None or "GET" in route.methods):
            self._refuse_if_head_reroute(path, host, route)
        return found

    def _refuse_reroutes(self, method: str, path: str, host: str, route: RouteConfig) -> None:
        if ";" in path or "%3B" in path:  # normalize_path wrote escapes in upper case
            self._refuse_if_params_reroute(method, path, host, route)
        if path[-1] == "/" and len(path) > 1:
            self._refuse_if_slash_reroute(method, path, host, route)

    def _refuse_if_head_reroute(self, path: str, host: str, route: RouteConfig) -> None:
        """MethodNotAllowed when a route that takes GET, and not HEAD, on this path has other auth rules.

        HEAD is not implied by GET here, so a HEAD on a `methods: [GET]` route falls through to the next
        route that takes it, typically a broader catch-all. But nearly every server answers HEAD by running
        its GET handler (RFC 9110 s9.3.2; Flask, Express, Spring MVC, Django, Go's ServeMux): the upstream
        then serves the GET resource, its headers and side effects, under the catch-all's rules, the
        tenant binding skipped. Refused where the two methods would be judged by different rules, as a
        trailing slash or `;params` are; HEAD is also judged as the GET it will be served as (a trailing
        slash, `;params`). A route that lists HEAD without GET was written for HEAD itself: exempt (the
        caller checks only routes that take GET too, so any other GET route comes before this one)."""
        other = self._find("GET", path, host).route  # `route` takes GET on this path: never NotFound
        if other is not route and other.auth != route.auth:
            raise MethodNotAllowed(tuple(sorted(other.methods or ())))
        self._refuse_reroutes("GET", path, host, route)

    def _refuse_if_slash_reroute(self, method: str, path: str, host: str, route: RouteConfig) -> None:
        """BadPath when the path without its trailing slash belongs to a route with other auth rules.

        Express (non-strict), Spring 5 and others serve `/a/1/` as `/a/1`: matched as it came, that path
        misses a tenant-bound `/a/{id}` route and can fall through to a broader one whose upstream then
        serves `/a/1` without the template's rules. Choosing the slash-less route instead is no answer
        either: with `/orders` public before a protected `/orders/` prefix, `/orders/` would leave the
        protected route for the public one. So, as for `;params`, the request is refused where the two
        forms would be judged by different rules; where they land on the same route, on routes with equal
        `auth`, or the slash-less form on none, nothing changes (`/docs` beside `/docs/` still works).
        """
        try:
            other = self._find(method, path[:-1], host).route
        except NotFound:
            return  # no route claims the slash-less form: only this route's rules apply
        except MethodNotAllowed:
            raise BadPath() from None  # another route claims the slash-less form (for other methods)
        if other is not route and other.auth != route.auth:
            raise BadPath()

    def _refuse_if_params_reroute(self, method: str, path: str, host: str, route: RouteConfig) -> None:
        """BadPath when the path without its `;params` belongs to another route.

        Tomcat and Spring drop `;params` from each segment before routing: `/api/admin;x/users` is
        `/api/admin/users` to them. Matched as it came, that path can miss a protected `/api/admin/` route
        and fall through to a broader public one whose upstream then serves the admin path without the
        gateway's rules. Where both forms land on the same route (or the plain one on none), or the route was
        written with `;` in its path, nothing changes. An encoded `%3B` counts as `;`, as it does for dot
        segments (normalize_path): an upstream that decodes before it strips params reads it as one.
        """
        if ";" in (route.path or route.path_prefix or ""):
            return  # a route written with ;params in its path asked for them
        plain = "/".join(seg.replace("%3B", ";").split(";", 1)[0] for seg in path.split("/"))
        if plain == path:
            return
        if plain[-1] == "/" and len(plain) > 1:
            # Spring 5 on Tomcat drops both: `/a/{id}`'s `/a;x/1/` is `/a/1` there, though neither the
            # plain form (`/a/1/`) nor the slash-less one (`/a;x/1`) alone leaves this route.
            self._refuse_if_slash_reroute(method, plain, host, route)
        try:
            other = self._find(method, plain, host).route
        except NotFound:
            return  # no route claims the plain form: only this route's rules apply to the request
        except MethodNotAllowed:
            raise BadPath() from None  # another route claims the plain form (for other methods)
        if other is not route:
            raise BadPath()

    def _find(self, method: str, path: str, host: str) -> RouteMatch:
        if self._any_host:
            host = _norm_host(host)
        candidates = self._exact.get(path)
        if candidates is None:
            candidates = self._by_first.get(_first_segment(path), self._wild)
        allowed: set[str] | None = None
        for c in candidates:
            if c.host is not None and c.host != host:
                continue
            params = c.params(path)
            if params is None:
                continue
            if c.methods is None or method in c.methods:
                return RouteMatch(route=c.route, params=params, path=path, upstream_path=c.upstream_path(path))
            if allowed is None:
                allowed = set()
            allowed.update(c.methods)
        if allowed:
            raise MethodNotAllowed(tuple(sorted(allowed)))
        raise NotFound()


def _covers(earlier: _Compiled, later: _Compiled) -> bool:
    """True only when every path `later` matches is certainly matched by `earlier`."""
    if earlier.kind == _PREFIX:
        base = earlier.key
        if not base:
            return True
        if later.kind == _PREFIX:
            return later.key == base or later.key.startswith(base + "/")
        want = base[1:].split("/")
        have = _split_template(later.route.path or "")
        # Each prefix segment must be the same literal (a parameter may be anything) in the template.
        return len(have) >= len(want) and all(w == h for w, h in zip(want, have, strict=False))
    if later.kind == _PREFIX:
        return False  # an exact template never matches every depth under a prefix
    mine = _split_template(earlier.route.path or "")
    theirs = _split_template(later.route.path or "")
    if len(mine) != len(theirs):
        return False
    for m, t in zip(mine, theirs, strict=True):
        if _PARAM.fullmatch(m):
            if t == "":  # a parameter matches one non-empty segment, not a trailing slash
                return False
        elif m != t:
            return False
    return True


def find_shadowed(routes: Sequence[RouteConfig]) -> list[tuple[int, int]]:
    """(shadowed_index, earlier_index) for each route an earlier one completely hides (the first such).

    Only the earlier routes that could cover a route are tried (_covers decides): prefixes found by the
    route's leading segments, templates by a walk of a segment trie (a parameter matches any non-empty
    segment). Comparing every pair took minutes for a few thousand routes, at every start and reload."""
    roots: list[_Compiled] = []  # path_prefix "/": covers every path
    prefixes: dict[tuple[str, ...], list[_Compiled]] = {}  # by the prefix's segments
    trie: _Trie = _Trie()  # exact paths and templates, by segment ("*": a parameter)
    out: list[tuple[int, int]] = []
    for j, route in enumerate(routes):
        try:
            later = _compile(j, route)
        except (ValueError, BadPath):
            continue  # invalid routes are reported elsewhere; never guess about them
        segments = _split_template(later.key) if later.key else []
        candidates = [*roots]
        for k in range(1, len(segments) + 1):
            candidates += prefixes.get(tuple(segments[:k]), ())
        if later.kind != _PREFIX:
            candidates += trie.covering(segments)
        for earlier in sorted(candidates, key=lambda c: c.index):
            if earlier.host is not None and earlier.host != later.host:
                continue
            if earlier.methods is not None and (later.methods is None or not later.methods <= earlier.methods):
                continue
            if _covers(earlier, later):
                out.append((j, earlier.index))
                break
        if later.kind == _PREFIX:
            if later.key:
                prefixes.setdefault(tuple(segments), []).append(later)
            else:
                roots.append(later)
        else:
            trie.add(["*" if _PARAM.fullmatch(seg) else seg for seg in segments], later)
    return out


class _Trie:
    __slots__ = ("children", "routes")

    def __init__(self) -> None:
        self.children: dict[str, _Trie] = {}
        self.routes: list[_Compiled] = []

    def add(self, segments: list[str], route: _Compiled) -> None:
        node = self
        for seg in segments:
            node = node.children.setdefault(seg, _Trie())
        node.routes.append(route)

    def covering(self, segments: list[str]) -> list[_Compiled]:
        """The routes whose segments match these one for one (a parameter any non-empty segment)."""
        frontier = [self]
        for seg in segments:
            nxt = [n.children[seg] for n in frontier if seg in n.children]
            if seg != "":
                nxt += [n.children["*"] for n in frontier if "*" in n.children]
            if not nxt:
                return []
            frontier = nxt
        return [route for node in frontier for route in node.routes]
