"""Path normalisation (attacks included), route matching, shadowing and template checks."""

from __future__ import annotations

import dataclasses
import posixpath
import re
from collections.abc import Sequence
from urllib.parse import unquote

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.config_types import AuthConfig, ClaimRule, RouteConfig
from gateway.errors import BadPath, GatewayError, MethodNotAllowed, NotFound
from gateway.model import RouteMatch
from gateway.routes import (
    RouteTable,
    _normalize_slow,
    check_prefix,
    check_template,
    find_shadowed,
    normalize_path,
    template_params,
    valid_host,
)


def route(name: str, path: str | None = None, prefix: str | None = None, **kw: object) -> RouteConfig:
    return RouteConfig(name=name, upstream="up", path=path, path_prefix=prefix, **kw)  # type: ignore[arg-type]


# -- normalisation ----------------------------------------------------------------------------------

BAD = [
    "/a/../../etc", "/..", "/../x", "/a/b/../../..",
    "/%2e%2e/x", "/%2E%2E/x", "/.%2e/x", "/%2e./x", "/a/%2e%2e/%2e%2e/%2e%2e",
    "/a/%2f/b", "/a/%2F", "/a%2fb", "/a/%5c", "/a/%5C/b", "/a\\b", "/a/\\",
    "/a/..;/b", "/a/..;x/b", "/a/.;/b", "/a/.;x", "/a/%2e%2e;x", "/a/%2E;/b", "/a/...;/b",
    "/a/..%3bx/b", "/a/..%3B/b", "/a/;x/b", "/;/admin", "/;jsessionid=1/admin",
    "/a%00", "/a/%00/b", "/a\x00", "/a\tb", "/a\r\nb", "/a/%0d%0a", "/a\x7f", "/%7F", "/%1f",
    "/%", "/%4", "/%zz", "/a%g0", "/%%41",
    "a/b", "", "*", "http://evil/x",
    "/%c0%ae%c0%ae/etc", "/%ff", "/%e2%82",  # invalid / overlong UTF-8
]


@pytest.mark.parametrize("raw", BAD)
def test_unsafe_paths_are_refused(raw: str) -> None:
    with pytest.raises(BadPath) as info:
        normalize_path(raw)
    assert info.value.status == 400 and info.value.code == "invalid_request"


GOOD = [
    ("/", "/"),
    ("//", "/"),
    ("///a//b///", "/a/b/"),
    ("//a", "/a"),
    ("/a/./b", "/a/b"),
    ("/a/b/../c", "/a/c"),
    ("/a/b/..", "/a/"),
    ("/a/.", "/a/"),
    ("/.", "/"),
    ("/a/..", "/"),
    ("/a/%2e/b", "/a/b"),
    ("/a/b/%2E%2e/c", "/a/c"),
    ("/%7e", "/~"),
    ("/%7Euser", "/~user"),
    ("/%41", "/A"),
    ("/%61%62%2D%5f%2E%30", "/ab-_.0"),
    ("/a%2ab", "/a%2Ab"),  # reserved "*" stays encoded, hex upper-cased
    ("/a%3a%40", "/a%3A%40"),
    ("/%252e", "/%252e"),  # double encoding is decoded once only: a literal "%2e" segment
    ("/%252e%252e/x", "/%252e%252e/x"),
    ("/%252f", "/%252f"),
    ("/a;v=1/b", "/a;v=1/b"),  # parameters on a normal segment are kept
    ("/a/...", "/a/..."),
    ("/a/..a/a..", "/a/..a/a.."),
    ("/caf\u00e9", "/caf%C3%A9"),
    ("/a b", "/a%20b"),
    ("/%e2%82%ac", "/%E2%82%AC"),
]


@pytest.mark.parametrize(("raw", "want"), GOOD)
def test_normalised_form(raw: str, want: str) -> None:
    assert normalize_path(raw) == want
    assert normalize_path(want) == want
    assert _normalize_slow(raw) == want


# Segments an attacker composes paths from (the brief's alphabet, plus a few neighbours).
ATTACK = st.sampled_from(
    [".", "..", "%2e", "%2E%2e", ";", "a", "%41", "%2f", "\\", "", "b", "..;", "%252e", "~", "%7E", "a;x", "%3B"]
)
attack_paths = st.lists(ATTACK, max_size=8).map(lambda segs: "/" + "/".join(segs))
any_paths = st.text(alphabet="/.%;2eEfF5cC4a1~\\\x00 bB3", max_size=24)


def _outcome(fn: object, *args: object) -> object:
    try:
        return fn(*args)  # type: ignore[operator]
    except GatewayError as exc:
        return (type(exc).__name__, exc.headers.get("Allow"))


@settings(max_examples=400, deadline=None)
@given(st.one_of(attack_paths, any_paths, st.text(max_size=20).map(lambda s: "/" + s)))
def test_normalise_is_idempotent_and_stays_under_root(raw: str) -> None:
    try:
        out = normalize_path(raw)
    except BadPath:
        with pytest.raises(BadPath):
            _normalize_slow(raw)
        return
    assert _normalize_slow(raw) == out  # the fast path agrees with the full one
    assert normalize_path(out) == out
    assert out.startswith("/") and out.isascii()
    segs = out[1:].split("/")
    assert ".." not in segs and "." not in segs
    assert "" not in segs[:-1]  # only a trailing slash may leave an empty segment
    # What an upstream sees after decoding once: no new separators, dot segments or controls.
    decoded = unquote(out)
    assert "\\" not in decoded and not any(ord(c) < 0x20 for c in decoded)
    dsegs = decoded[1:].split("/")
    assert len(dsegs) == len(segs) and ".." not in dsegs and "." not in dsegs
    # ... nor after stripping `;params` the way Tomcat and Spring do.
    stripped = [s.split(";", 1)[0] for s in dsegs]
    assert ".." not in stripped and "." not in stripped and "" not in stripped[:-1]


@given(st.lists(st.sampled_from(["a", "b", ".", "..", ""]), max_size=10))
def test_dot_segments_agree_with_posix_resolution(segs: list[str]) -> None:
    raw = "/" + "/".join(segs)
    depth, escapes = 0, False
    for s in segs:
        if s == "..":
            depth -= 1
            escapes = escapes or depth < 0
        elif s not in ("", "."):
            depth += 1
    if escapes:
        with pytest.raises(BadPath):
            normalize_path(raw)
    else:
        assert (normalize_path(raw).rstrip("/") or "/") == posixpath.normpath(re.sub("/+", "/", raw))


# -- matching ---------------------------------------------------------------------------------------

TABLE_ROUTES = [
    route("orders-read", "/api/tenants/{tenant}/orders/{id}", methods=("GET", "HEAD"), strip_prefix="/api"),
    route("orders-write", "/api/tenants/{tenant}/orders/{id}", methods=("PUT", "DELETE")),
    route("health", "/health", methods=("GET",)),
    route("admin", prefix="/admin/", host="admin.example.com"),
    route("orders-prefix", prefix="/api/orders/", methods=("POST",), strip_prefix="/api/orders"),
    route("users", prefix="/api/users", strip_prefix="/api"),
    route("first", "/dup/{x}"),
    route("second", "/dup/a"),
    route("slash", "/s/"),
    route("tilde", "/~home/{p}"),
]
TABLE = RouteTable(TABLE_ROUTES)


def test_exact_template_binds_decoded_params() -> None:
    m = TABLE.match("GET", "/api/tenants/t%201/orders/42", "x")
    assert m.route.name == "orders-read"
    assert m.params == {"tenant": "t 1", "id": "42"}
    assert m.path == "/api/tenants/t%201/orders/42"
    assert m.upstream_path == "/tenants/t%201/orders/42"


def test_param_matches_exactly_one_nonempty_segment() -> None:
    for path in ("/api/tenants/t/orders", "/api/tenants/t/orders/1/2", "/api/tenants/t/orders/1//2"):
        with pytest.raises(NotFound):
            TABLE.match("GET", path, "x")
    t = RouteTable([route("one", "/a/{x}")])
    for path in ("/a/", "/a//", "/a/."):
        with pytest.raises(NotFound):
            t.match("GET", path, "h")  # the trailing slash is not an empty parameter
    # `//` collapses, so an empty tenant is not possible: this is /api/tenants/orders/1 (no match)
    with pytest.raises(NotFound):
        TABLE.match("GET", "/api/tenants//orders/1", "x")


def test_match_normalises_raw_path_and_rejects_tricks() -> None:
    m = TABLE.match("GET", "/api/x/../tenants/%74/./orders/%31", "x")
    assert (m.path, dict(m.params)) == ("/api/tenants/t/orders/1", {"tenant": "t", "id": "1"})
    with pytest.raises(BadPath):
        TABLE.match("GET", "/api/tenants/a%2fb/orders/1", "x")
    with pytest.raises(BadPath):
        TABLE.match("GET", "/health/..;/admin/x", "admin.example.com")


def test_exact_path_and_method_rules() -> None:
    assert TABLE.match("GET", "/health", "h").route.name == "health"
    with pytest.raises(MethodNotAllowed) as info:
        TABLE.match("HEAD", "/health", "h")  # HEAD is not implied by GET
    assert info.value.allow == ("GET",) and info.value.headers["Allow"] == "GET"
    assert info.value.status == 405
    with pytest.raises(NotFound):
        TABLE.match("GET", "/health/x", "h")
    with pytest.raises(NotFound):
        TABLE.match("GET", "/Health", "h")


def test_405_allow_is_union_of_matching_routes_sorted() -> None:
    with pytest.raises(MethodNotAllowed) as info:
        TABLE.match("PATCH", "/api/tenants/t/orders/1", "x")
    assert info.value.allow == ("DELETE", "GET", "HEAD", "PUT")
    assert TABLE.match("DELETE", "/api/tenants/t/orders/1", "x").route.name == "orders-write"


def test_prefix_matches_on_segment_boundary() -> None:
    for path in ("/api/orders", "/api/orders/", "/api/orders/x/y"):
        assert TABLE.match("POST", path, "x").route.name == "orders-prefix"
    for path in ("/api/ordersx", "/api/orders%20"):
        with pytest.raises(NotFound):
            TABLE.match("POST", path, "x")
    for path in ("/api/users", "/api/users/7"):
        assert TABLE.match("GET", path, "x").route.name == "users"
    with pytest.raises(NotFound):
        TABLE.match("GET", "/api/usersx", "x")


def test_strip_prefix() -> None:
    assert TABLE.match("POST", "/api/orders", "x").upstream_path == "/"
    assert TABLE.match("POST", "/api/orders/", "x").upstream_path == "/"
    assert TABLE.match("POST", "/api/orders/a/b", "x").upstream_path == "/a/b"
    assert TABLE.match("GET", "/api/users/7", "x").upstream_path == "/users/7"
    assert TABLE.match("GET", "/health", "x").upstream_path == "/health"
    t = RouteTable([route("r", prefix="/", strip_prefix="/api/")])
    assert t.match("GET", "/apix/1", "h").upstream_path == "/apix/1"  # not on a segment boundary
    assert t.match("GET", "/api", "h").upstream_path == "/"


def test_host_is_case_insensitive_and_ignores_port() -> None:
    for host in ("admin.example.com", "ADMIN.Example.com:8443", "admin.example.com."):
        assert TABLE.match("GET", "/admin/x", host).route.name == "admin"
    with pytest.raises(NotFound):
        TABLE.match("GET", "/admin/x", "api.example.com")
    t = RouteTable([route("v6", "/a", host="[::1]:8080")])
    assert t.match("GET", "/a", "[::1]").route.name == "v6"


@pytest.mark.parametrize("host", ["", "a.example", "A.Example:8080", "a.example.", "a.example.:80", "a.example:",
                                  "127.0.0.1:80", "xn--caf-dma.example", "a_b.example", "localhost", "[::1]",
                                  "[::1]:8080", "[fe80::1%25eth0]", "[::ffff:1.2.3.4]", "[2001:DB8::1]"])
def test_valid_hosts(host: str) -> None:
    assert valid_host(host)


@pytest.mark.parametrize("host", [
    "a.example..", "a.example..:80", "a..example", ".a.example", ".", "..",  # empty labels (RFC 1034 s3.1)
    "[evil.com]", "[evil.com]:80", "[1.2.3.4]", "[::1:]", "[:::]", "[]", "[v1.x]", "[::1", "::1]", "[::1]x",
    "[fe80::1%eth0]", "[fe80::1%25]", "[fe80::1%25a%2Eb]",  # a zone is `%25` and unreserved characters (RFC 6874)
    "x,admin.example", "a b", "a.example:80x", "a.example:123456",
])
def test_invalid_hosts(host: str) -> None:
    """Bracketed hosts are IPv6 addresses only (RFC 3986 IP-literal; IPvFuture is refused, as it admits
    sub-delims); a name has no empty label, and no more than the one trailing dot of an absolute name."""
    assert not valid_host(host)


def test_first_match_in_file_order_wins() -> None:
    assert TABLE.match("GET", "/dup/a", "x").route.name == "first"
    t = RouteTable([route("exact-first", "/dup/a"), route("tmpl", "/dup/{x}")])
    assert t.match("GET", "/dup/a", "x").route.name == "exact-first"
    assert t.match("GET", "/dup/b", "x").route.name == "tmpl"
    t = RouteTable([route("pre", prefix="/dup"), route("exact", "/dup/a")])
    assert t.match("GET", "/dup/a", "x").route.name == "pre"


TRAILING = ["/api/tenants/beta/orders/1/", "/api/tenants/beta/orders/1//", "/api/tenants/beta/orders/1/.",
            "/api/tenants/beta/orders/1/./", "/api/tenants/beta/orders/1/%2e", "/api/tenants/beta/orders/1/x/..",
            "//api//tenants/beta/orders/1///"]


STRICT = AuthConfig(scopes=("orders:read",), claims=(ClaimRule("tenant", ("{path.tenant}",)),))


@pytest.mark.parametrize("raw", TRAILING)
def test_a_trailing_slash_that_would_leave_a_routes_rules_is_refused(raw: str) -> None:
    """Express (non-strict), Spring 5 and others serve `/x/` as `/x`: a spelling that normalises to a
    route's path plus one slash must not reach a broader route with other rules (the tenant binding
    skipped). Nor may the slash-less route take it (see the next test): refused, as `;params` are."""
    strict = dataclasses.replace(TABLE_ROUTES[0], auth=STRICT)
    table = RouteTable([strict, *TABLE_ROUTES[1:], route("api-any", prefix="/api/")])
    with pytest.raises(BadPath):
        table.match("GET", raw, "x")
    assert table.match("PATCH", raw, "x").route.name == "api-any"  # api-any's both ways: no other rules
    assert table.match("GET", "/api/tenants/beta/orders/1", "x").route.name == "orders-read"
    assert table.match("GET", "/api/tenants/beta/orders/1/2/", "x").route.name == "api-any"  # same route both ways


def test_a_head_that_would_leave_a_get_only_routes_rules_is_refused() -> None:
    """HEAD is not implied by GET, so a HEAD on a `methods: [GET]` tenant-bound template fell through to
    the catch-all behind it; its upstream (nearly every server runs the GET handler for HEAD) then served
    another tenant's order under the catch-all's rules. Refused (405) where the rules differ; HEAD is also
    judged as the GET it will be served as (a trailing slash, `;params`)."""
    strict = route("orders-read", "/api/tenants/{tenant}/orders/{id}", methods=("GET",), auth=STRICT)
    table = RouteTable([strict, route("api-any", prefix="/api/")])
    with pytest.raises(MethodNotAllowed) as info:
        table.match("HEAD", "/api/tenants/beta/orders/1", "x")
    assert info.value.allow == ("GET",)
    with pytest.raises(MethodNotAllowed):
        table.match("HEAD", "/api/tenants/beta/orders/1;x", "x")
    with pytest.raises(BadPath):
        table.match("HEAD", "/api/tenants/beta/orders/1/", "x")
    assert table.match("GET", "/api/tenants/beta/orders/1", "x").route.name == "orders-read"
    assert table.match("HEAD", "/api/other", "x").route.name == "api-any"  # no GET route of other rules
    assert table.match("POST", "/api/tenants/beta/orders/1", "x").route.name == "api-any"
    # The same rules both ways, or a route written for HEAD itself: nothing changes.
    same = RouteTable([route("o", "/o/{id}", methods=("GET",)), route("any", prefix="/o/")])
    assert same.match("HEAD", "/o/1", "x").route.name == "any"
    head = dataclasses.replace(strict, name="head", methods=("HEAD",), auth=AuthConfig(scopes=("orders:head",)))
    table = RouteTable([strict, head, route("api-any", prefix="/api/")])
    assert table.match("HEAD", "/api/tenants/beta/orders/1", "x").route.name == "head"


@pytest.mark.parametrize("raw", ["/api/tenants/beta/orders;x/1/", "/api/tenants;x/beta/orders/1/",
                                 "/api/tenants/beta/orders%3Bx/1;y/", "/api/tenants/beta/orders;x/1//"])
def test_params_and_a_trailing_slash_together_never_leave_a_routes_rules(raw: str) -> None:
    """Spring 5 on Tomcat drops `;params` and a trailing slash both: `/api/tenants/beta/orders;x/1/` is
    the tenant-bound template's `/api/tenants/beta/orders/1` there. Each check alone let it through (the
    plain form `.../1/` and the slash-less form `.../orders;x/1` are both the catch-all's), so it reached
    the catch-all with another tenant's token. Refused, for HEAD too (judged as its GET)."""
    strict = dataclasses.replace(TABLE_ROUTES[0], methods=("GET",), auth=STRICT)
    table = RouteTable([strict, route("api-any", prefix="/api/")])
    for method in ("GET", "HEAD"):
        with pytest.raises(BadPath):
            table.match(method, raw, "x")
    assert table.match("PATCH", raw, "x").route.name == "api-any"  # the catch-all's both ways
    assert table.match("GET", "/api/other;x/1/", "x").route.name == "api-any"


def test_a_trailing_slash_keeps_its_route_where_the_rules_agree() -> None:
    """A protected `/orders/` prefix behind a public `/orders` path: `/orders/` stays the prefix's (taken
    by the public path it would lose its rules), so it is refused too; routes with equal auth (a `/docs`
    redirect beside a `/docs/` site) and a slash-less form no route claims change nothing."""
    t = RouteTable([route("list", "/orders", auth=AuthConfig(required=False)),
                    route("orders", prefix="/orders/", auth=AuthConfig(roles=("admin",)))])
    with pytest.raises(BadPath):
        t.match("GET", "/orders/", "h")
    assert t.match("GET", "/orders/7", "h").route.name == "orders"
    t = RouteTable([route("docs", "/docs"), route("site", "/docs/")])
    assert [t.match("GET", p, "h").route.name for p in ("/docs", "/docs/")] == ["docs", "site"]
    assert TABLE.match("GET", "/s/", "x").route.name == "slash"  # `/s` belongs to no route
    with pytest.raises(NotFound):  # and `/health/` to none: the slash-less route is not chosen for it
        TABLE.match("GET", "/health/", "x")


def test_a_prefix_ending_in_a_slash_matches_its_bare_path() -> None:
    """`path_prefix: /api/admin/` takes `/api/admin` too (Envoy's path_separated_prefix), so the bare path
    never falls through to a catch-all behind it."""
    t = RouteTable([route("admin", prefix="/api/admin/", strip_prefix="/api"), route("any", prefix="/api/")])
    for raw in ("/api/admin", "/api/admin/", "/api/admin//", "/api/admin/.", "/api/admin/x/.."):
        m = t.match("GET", raw, "h")
        assert (m.route.name, m.upstream_path) == ("admin", m.path[len("/api"):]), raw
    assert t.match("GET", "/api/adminx", "h").route.name == "any"


def test_trailing_slash_and_unreserved_literals() -> None:
    assert TABLE.match("GET", "/s/", "x").route.name == "slash"
    assert TABLE.match("GET", "//s//", "x").route.name == "slash"
    with pytest.raises(NotFound):
        TABLE.match("GET", "/s", "x")
    m = TABLE.match("GET", "/%7Ehome/%41", "x")
    assert (m.route.name, dict(m.params)) == ("tilde", {"p": "A"})


def test_empty_table_and_no_route() -> None:
    with pytest.raises(NotFound):
        RouteTable([]).match("GET", "/", "x")
    with pytest.raises(NotFound):
        TABLE.match("GET", "/nothing", "x")


def test_invalid_routes_are_refused_at_construction() -> None:
    with pytest.raises(ValueError, match="exactly one"):
        RouteTable([route("both", "/a", prefix="/a")])
    with pytest.raises(ValueError, match="normal form"):
        RouteTable([route("bad", "/a/%7e")])


def _reference(routes: Sequence[RouteConfig], method: str, raw: str, host: str) -> object:
    """A naive linear matcher written from the spec, to check the bucketed table against."""
    path = normalize_path(raw)
    found = _reference_find(routes, method, path, host)
    plain = "/".join(seg.split(";", 1)[0] for seg in path.split("/"))
    written = {r.name: r.path or r.path_prefix or "" for r in routes}
    if found[0] not in ("NotFound", "MethodNotAllowed") and plain != path and ";" not in written[found[0]]:
        # The path without its ;params (what Tomcat and Spring route on) must not belong to another route.
        other = _reference_find(routes, method, plain, host)
        if other[0] != "NotFound" and other[0] != found[0]:
            raise BadPath()
    if found[0] not in ("NotFound", "MethodNotAllowed") and len(path) > 1 and path.endswith("/"):
        # The path without its trailing slash must not belong to a route with other auth rules.
        auth = {r.name: r.auth for r in routes}
        other = _reference_find(routes, method, path[:-1], host)
        if other[0] == "MethodNotAllowed" or (other[0] not in ("NotFound", found[0])
                                               and auth[str(other[0])] != auth[str(found[0])]):
            raise BadPath()
    return found


def _reference_find(routes: Sequence[RouteConfig], method: str, path: str, host: str) -> tuple[str, object]:
    allow: set[str] = set()
    for r in routes:
        if r.host is not None and r.host != host:
            continue
        params: dict[str, str] = {}
        if r.path_prefix is not None:
            base = r.path_prefix.rstrip("/")
            if not (path == base or path.startswith(base + "/")):
                continue
        else:
            assert r.path is not None
            want, have = r.path.split("/"), path.split("/")
            if len(want) != len(have):
                continue
            ok = True
            for w, h in zip(want, have, strict=True):
                if w.startswith("{"):
                    ok = ok and h != ""
                    params[w[1:-1]] = h
                else:
                    ok = ok and w == h
            if not ok:
                continue
        if r.methods is None or method in r.methods:
            return (r.name, params)
        allow.update(r.methods)
    return ("MethodNotAllowed", ", ".join(sorted(allow))) if allow else ("NotFound", None)


ROUTE_POOL = st.builds(
    lambda kind, methods, host: route(kind[1], path=kind[1], methods=methods, host=host)
    if kind[0] == "path"
    else route(kind[1], prefix=kind[1], methods=methods, host=host),
    st.sampled_from(
        [("path", p) for p in ("/", "/a", "/a/", "/a/{x}", "/{x}", "/{x}/b", "/a/b", "/b/{y}/c", "/c/{x}/{y}")]
        + [("prefix", p) for p in ("/", "/a", "/a/b/", "/b", "/c/")]
    ),
    st.sampled_from([None, ("GET",), ("GET", "POST"), ("DELETE",)]),
    st.sampled_from([None, "h"]),
)


@settings(max_examples=300, deadline=None)
@given(
    st.lists(ROUTE_POOL, max_size=8),
    st.lists(st.lists(st.sampled_from(["a", "b", "c", "", "d", "a;x", "b;v=1"]), max_size=4), min_size=1,
             max_size=6),
    st.sampled_from(["GET", "POST", "DELETE"]),
    st.sampled_from(["h", "g"]),
)
def test_table_agrees_with_naive_linear_matcher(
    routes: list[RouteConfig], paths: list[list[str]], method: str, host: str
) -> None:
    routes = [dataclasses.replace(r, name=f"{i}:{r.name}") for i, r in enumerate(routes)]
    table = RouteTable(routes)
    for segs in paths:
        raw = "/" + "/".join(segs)
        got = _outcome(table.match, method, raw, host)
        if isinstance(got, RouteMatch):
            got = (got.route.name, dict(got.params))
        assert got == _outcome(_reference, routes, method, raw, host)


# Routes spread over the attack alphabet, so random paths hit all of them.
PROP_ROUTES = [
    route("aa", "/a/A/"),
    route("param", "/A/{x}"),
    route("pre-a", prefix="/a", methods=("GET",)),
    route("semi", "/a;x/{y}"),
    route("lit", "/%252e/{z}"),
    route("tilde", prefix="/~"),
    route("twolevel", "/{p}/{q}", host="h"),
    route("catch", prefix="/", methods=("POST",)),
]
PROP_TABLE = RouteTable(PROP_ROUTES)


@settings(max_examples=300, deadline=None)
@given(attack_paths, st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(["h", "H:80", "x"]))
def test_match_is_stable_under_renormalisation(raw: str, method: str, host: str) -> None:
    first = _outcome(normalize_path, raw)
    if isinstance(first, str):
        assert _outcome(PROP_TABLE.match, method, first, host) == _outcome(
            PROP_TABLE.match, method, normalize_path(first), host
        )
        assert _outcome(PROP_TABLE.match, method, raw, host) == _outcome(PROP_TABLE.match, method, first, host)
    else:
        assert _outcome(PROP_TABLE.match, method, raw, host) == ("BadPath", None)


_TOKEN = re.compile(r"%[0-9A-Fa-f]{2}|.", re.DOTALL)


@st.composite
def equivalent_spellings(draw: st.DrawFn) -> tuple[str, str]:
    """A raw path and another raw spelling of the same path (dots, slashes, escapes, hex case)."""
    base = draw(attack_paths)
    parts: list[str] = []
    for tok in _TOKEN.findall(base):
        if len(tok) == 3:  # an escape: either hex case means the same byte
            parts.append(tok.lower() if draw(st.booleans()) else tok.upper())
        elif (tok.isalnum() or tok in "-._~") and draw(st.booleans()):
            code = f"{ord(tok):02X}"
            parts.append("%" + (code.lower() if draw(st.booleans()) else code))
        elif tok == "/" and draw(st.booleans()):
            parts.append(draw(st.sampled_from(["//", "/./", "/%2e/", "/zz/../", "/zz/%2E./", "/zz/.%2e/"])))
        else:
            parts.append(tok)
    return base, "".join(parts)


@settings(max_examples=400, deadline=None)
@given(equivalent_spellings(), st.sampled_from(["GET", "POST"]), st.sampled_from(["h", "x"]))
def test_equivalent_raw_paths_route_identically(pair: tuple[str, str], method: str, host: str) -> None:
    base, other = pair
    a, b = _outcome(normalize_path, base), _outcome(normalize_path, other)
    assert a == b
    ma, mb = _outcome(PROP_TABLE.match, method, base, host), _outcome(PROP_TABLE.match, method, other, host)
    assert ma == mb
    if isinstance(ma, RouteMatch):
        assert ma.path == a


# -- shadowing --------------------------------------------------------------------------------------


def shadowed(routes: Sequence[RouteConfig]) -> list[tuple[int, int]]:
    return find_shadowed(routes)


@pytest.mark.parametrize(
    ("earlier", "later", "hidden"),
    [
        (route("p", prefix="/api/"), route("t", "/api/x/{id}"), True),
        (route("p", prefix="/api"), route("t", "/api"), True),
        (route("p", prefix="/api"), route("t", "/api/"), True),
        (route("p", prefix="/api"), route("q", prefix="/api/v1/"), True),
        (route("p", prefix="/"), route("q", "/anything/{x}"), True),
        (route("p", prefix="/api"), route("t", "/apix"), False),
        (route("p", prefix="/api/x"), route("t", "/api/{id}"), False),
        (route("p", prefix="/api/v1"), route("q", prefix="/api"), False),
        (route("a", "/a/{x}"), route("b", "/a/b"), True),
        (route("a", "/a/{x}"), route("b", "/a/{y}"), True),
        (route("a", "/a/b"), route("b", "/a/b"), True),
        (route("a", "/a/b"), route("b", "/a/{x}"), False),
        (route("a", "/a/{x}"), route("b", "/a/"), False),  # a parameter never matches an empty segment
        (route("a", "/a"), route("b", "/a/"), False),  # `/a/` is not `/a`'s (its own, or refused)
        (route("a", "/a/{x}"), route("b", "/a/b/"), False),
        (route("a", "/a/{x}"), route("b", "/a/{y}/"), False),
        (route("a", "/a/{x}/"), route("b", "/a/b"), False),  # the reverse: `/a/{x}/` never takes `/a/b`
        (route("a", "/a/"), route("b", "/a"), False),
        (route("a", "/a/b/"), route("b", "/a/b/"), True),
        (route("a", "/{x}"), route("b", "/"), False),
        (route("p", prefix="/api/"), route("t", "/api/"), True),
        (route("p", prefix="/api/x/"), route("t", "/api/x"), True),
        (route("a", "/a/{x}"), route("b", "/a/b/c"), False),
        (route("a", "/a/{x}"), route("b", prefix="/a"), False),
        (route("a", "/a", methods=("GET",)), route("b", "/a", methods=("GET",)), True),
        (route("a", "/a", methods=("GET", "POST")), route("b", "/a", methods=("GET",)), True),
        (route("a", "/a", methods=("GET",)), route("b", "/a", methods=("GET", "POST")), False),
        (route("a", "/a", methods=("GET",)), route("b", "/a"), False),
        (route("a", "/a"), route("b", "/a", methods=("DELETE",)), True),
        (route("a", "/a"), route("b", "/a", host="h"), True),
        (route("a", "/a", host="H:443"), route("b", "/a", host="h"), True),
        (route("a", "/a", host="h"), route("b", "/a"), False),
        (route("a", "/a", host="h"), route("b", "/a", host="g"), False),
        (route("a", "/a"), route("b", "/a", websocket=True), True),
    ],
)
def test_find_shadowed(earlier: RouteConfig, later: RouteConfig, hidden: bool) -> None:
    assert shadowed([earlier, later]) == ([(1, 0)] if hidden else [])


def test_find_shadowed_reports_first_earlier_route_once() -> None:
    routes = [route("x", "/x"), route("p", prefix="/a"), route("q", prefix="/a/b"), route("t", "/a/b/{c}")]
    assert shadowed(routes) == [(2, 1), (3, 1)]
    assert shadowed([route("bad", "/a/%7e"), route("t", "/a/~")]) == []


def test_find_shadowed_agrees_with_matching() -> None:
    # Whenever find_shadowed says hidden, the table never picks the later route for sample paths.
    routes = [route("p", prefix="/api/"), route("t", "/api/x/{id}"), route("u", "/b/{x}"), route("v", "/b/c"),
              route("w", "/b/c/"), route("e", "/e"), route("f", "/e/")]
    pairs = shadowed(routes)
    assert pairs == [(1, 0), (3, 2)]
    t = RouteTable(routes)
    for path in ("/api/x/1", "/api/x/1/", "/b/c"):
        assert t.match("GET", path, "h").route.name in ("p", "u")
    assert [t.match("GET", path, "h").route.name for path in ("/b/c/", "/e", "/e/")] == ["w", "e", "f"]


@settings(max_examples=300, deadline=None)
@given(st.lists(ROUTE_POOL, min_size=2, max_size=5),
       st.lists(st.lists(st.sampled_from(["a", "b", "c", "", "d"]), max_size=4), min_size=1, max_size=8))
def test_a_shadowed_route_is_never_chosen(routes: list[RouteConfig], paths: list[list[str]]) -> None:
    """find_shadowed is sound against the matcher, trailing slashes included: a route it calls hidden is
    never the one chosen, whatever the method."""
    routes = [dataclasses.replace(r, name=f"{i}:{r.name}") for i, r in enumerate(routes)]
    hidden = {routes[j].name for j, _ in shadowed(routes)}
    table = RouteTable(routes)
    for segs in paths:
        for method in ("GET", "POST", "DELETE"):
            got = _outcome(table.match, method, "/" + "/".join(segs), "h")
            assert not (isinstance(got, RouteMatch) and got.route.name in hidden)


# -- templates --------------------------------------------------------------------------------------


def test_template_params() -> None:
    assert template_params("/api/tenants/{tenant}/orders/{id}") == ("tenant", "id")
    assert template_params("/health") == ()


@pytest.mark.parametrize(
    ("template", "fragment"),
    [
        ("api/x", "start with '/'"),
        ("/a/{}", "bad parameter"),
        ("/a/{x", "bad parameter"),
        ("/a/x}", "bad parameter"),
        ("/a/{{x}}", "whole segment"),
        ("/a/{1x}", "bad parameter"),
        ("/a/{x-y}", "bad parameter"),
        ("/a/{x}/b/{x}", "duplicate"),
        ("/a/v{x}", "whole segment"),
        ("/a/{x}.json", "whole segment"),
        ("/a/{x}{y}", "whole segment"),
        ("/a//b", "normal form"),
        ("/a/./b", "normal form"),
        ("/a/%7e", "normal form"),
        ("/a/%2f", "not a safe path"),
        ("/a/../b", "normal form"),
        ("/..", "not a safe path"),
        ("/a\\b", "not a safe path"),
    ],
)
def test_check_template_rejects(template: str, fragment: str) -> None:
    problem = check_template(template)
    assert problem is not None and fragment in problem


@pytest.mark.parametrize("template", ["/", "/a", "/a/", "/a/{x}", "/{a}/{b}/c", "/a;v=1/{x}", "/~u/%20"])
def test_check_template_accepts(template: str) -> None:
    assert check_template(template) is None


def test_check_prefix() -> None:
    assert check_prefix("/api/") is None
    assert check_prefix("/api/{x}") is not None
    assert check_prefix("/api/../x") is not None


# -- the memo of successful matches -----------------------------------------------------------------

def test_repeated_matches_are_answered_alike_and_read_only() -> None:
    table = RouteTable([route("orders", "/t/{tenant}/o/{id}", methods=("GET",)), route("pub", "/pub")])
    first = table.match("GET", "/t/t%31/o/42", "h")
    again = table.match("GET", "/t/t%31/o/42", "h")
    assert again == first and dict(again.params) == {"tenant": "t1", "id": "42"}
    with pytest.raises(TypeError):
        again.params["tenant"] = "t2"  # type: ignore[index]  # shared by requests: must not be writable
    assert table.match("GET", "/t/t2/o/42", "h").params["tenant"] == "t2"
    assert table.match("GET", "/pub", "h").route.name == "pub"


def test_refusals_are_not_remembered_and_the_memo_is_bounded() -> None:
    from gateway import routes as routes_mod

    table = RouteTable([route("orders", "/o/{id}", methods=("GET",))])
    for raw in ("/x", "/o/1/2", "/../o/1"):
        for _ in range(2):
            with pytest.raises(GatewayError):
                table.match("GET", raw, "h")
    with pytest.raises(MethodNotAllowed):
        table.match("POST", "/o/1", "h")
    assert not table._seen
    for i in range(routes_mod._SEEN_SIZE + 50):
        assert table.match("GET", f"/o/{i}", "h").params["id"] == str(i)
    assert len(table._seen) == routes_mod._SEEN_SIZE
    long = "/o/" + "a" * routes_mod._SEEN_MAX_PATH
    assert table.match("GET", long, "h").params["id"] == long[3:]
    assert ("GET", long, "h") not in table._seen


@settings(max_examples=200, deadline=None)
@given(attack_paths, st.sampled_from(["GET", "POST", "PUT"]), st.sampled_from(["h", "H:80", "x"]))
def test_memo_agrees_with_a_fresh_table(raw: str, method: str, host: str) -> None:
    warm = _outcome(PROP_TABLE.match, method, raw, host)  # PROP_TABLE has answered many paths before
    cold = _outcome(RouteTable(PROP_ROUTES).match, method, raw, host)
    assert warm == cold


@pytest.mark.parametrize(("raw", "expected"), [
    ("/api/admin;x/users", "BadPath"),  # Tomcat/Spring route it as /api/admin/users: the admin route's
    ("/api/admin;jsessionid=1/users", "BadPath"),
    ("/api/public/x;v=2", "public"),  # without its params still the public route: kept as it came
    ("/api/public;v=2/x", "BadPath"),  # the catch-all as it came, the public route without params
    ("/api/orders;v=2", "orders"),  # a route written with ;params asked for them
    ("/other;v=2/x", "NotFound"),
    ("/api/adminx;y/z", "api"),  # the plain form /api/adminx/z is the catch-all too
    ("/api/admin%3Bx/users", "BadPath"),  # encoded, as for dot segments: `;` to an upstream that decodes first
    ("/api/admin%3bx/users", "BadPath"),
    ("/api/public%3Bv=2/x", "BadPath"),
    ("/api/public/x%3Bv=2", "public"),
])
def test_params_that_would_reroute_the_path_upstream_are_refused(raw: str, expected: str) -> None:
    """`;params` are kept on ordinary segments (`/a;v=1/b`), but a path whose plain form (params dropped,
    as Tomcat and Spring do before routing) belongs to another route is refused: matched as it came,
    `/api/admin;x/users` missed the protected admin route and went to the public catch-all, whose
    upstream would serve /api/admin/users without the admin rules."""
    table = RouteTable([
        route("admin", prefix="/api/admin/"),
        route("public", prefix="/api/public/"),
        route("orders", path="/api/orders;v=2"),
        route("api", prefix="/api/"),
    ])
    got = _outcome(table.match, "GET", raw, "h")
    name = got.route.name if isinstance(got, RouteMatch) else got[0]  # type: ignore[index]
    assert name == expected
