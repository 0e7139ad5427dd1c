"""Config loading: defaults, substitution, durations and every refusal with its file, line and key."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from gateway.authz import Rules
from gateway.config import load, load_text, parse_duration, warnings
from gateway.config_types import InternalTokenConfig
from gateway.errors import ConfigError, InsufficientScope
from gateway.model import Principal

MINIMAL = """\
issuers:
  - name: customers
    issuer: https://login.example.com
    audiences: [api]
upstreams:
  orders:
    targets: [http://127.0.0.1:8081]
routes:
  - name: orders
    match: {path: "/orders/{id}", methods: [GET]}
    upstream: orders
"""


def problems(text: str) -> list[str]:
    with pytest.raises(ConfigError) as info:
        load_text(textwrap.dedent(text), "gw.yaml")
    return info.value.problems


def test_minimal_file_gets_documented_defaults() -> None:
    c = load_text(MINIMAL, "gw.yaml")
    assert (c.server.host, c.server.port, c.server.workers) == ("0.0.0.0", 8080, 1)
    assert c.server.max_header_bytes == 16384 and c.server.shutdown_grace == 20.0
    assert (c.admin.host, c.admin.port, c.admin.scope) == ("127.0.0.1", 9090, "gateway:admin")
    issuer = c.issuers[0]
    assert issuer.algorithms == ("RS256", "ES256") and issuer.leeway == 30.0
    assert issuer.jwks_refresh == 600.0 and issuer.jwks_min_refetch == 30.0
    assert (issuer.claims.subject, issuer.claims.scopes, issuer.claims.tenant) == ("sub", "scope", "tenant_id")
    assert c.revocation.backend == "redis" and c.revocation.on_backend_error == "deny"
    route = c.routes[0]
    assert route.auth.required and route.auth.issuers == ("customers",)
    assert route.forward.identity == "headers"
    assert c.upstreams["orders"].retries.attempts == 2
    assert c.upstreams["orders"].max_requests == 1024
    assert c.internal_token is None


def test_admin_issuer_defaults_to_employees_whether_or_not_that_issuer_exists() -> None:
    """SPEC 3 shows `admin.issuer: employees` among the defaults: unset, a customer token carrying the
    admin scope must not open the admin API, also when no issuer is named `employees` (then none does)."""
    lone = load_text(MINIMAL, "gw.yaml")
    assert lone.admin.issuer == "employees" and "employees" not in {i.name for i in lone.issuers}
    assert warnings(lone) == [f"{lone.path}: warning: admin.issuer: 'employees' is not a configured issuer; the "
                              "admin API refuses every token (admin.issuer is 'employees' when unset)"]
    both = MINIMAL.replace("issuers:\n", "issuers:\n  - name: employees\n    issuer: https://sso.example.com\n"
                           "    audiences: [api]\n", 1)
    assert load_text(both, "gw.yaml").admin.issuer == "employees"
    chosen = both + "admin: {issuer: customers}\n"
    assert load_text(chosen, "gw.yaml").admin.issuer == "customers"


def test_shipped_example_files_are_valid() -> None:
    root = Path(__file__).parent.parent / "config"
    example = load(root / "gateway.yaml")
    assert len(example.routes) == 4 and example.internal_token is not None
    demo = load(root / "demo.yaml")
    assert {r.name for r in demo.routes} >= {"public-hello", "orders-read"}


@pytest.mark.parametrize(("text", "seconds"), [("250ms", 0.25), ("30s", 30), ("5m", 300), ("24h", 86400)])
def test_durations(text: str, seconds: float) -> None:
    assert parse_duration(text) == seconds


def test_env_substitution(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("ORDERS_URL", "http://10.0.0.5:9000")
    monkeypatch.delenv("NOPE", raising=False)
    text = MINIMAL.replace("http://127.0.0.1:8081", '"${ORDERS_URL}"') + "server:\n  workers: ${NOPE:-3}\n"
    c = load_text(text)
    assert c.upstreams["orders"].targets == ("http://10.0.0.5:9000",)
    assert c.server.workers == 3
    missing = problems(MINIMAL.replace("http://127.0.0.1:8081", '"${NOPE}"'))
    assert missing == ["gw.yaml:7: upstreams.orders.targets[0]: environment variable NOPE is not set "
                       "(write ${NOPE:-default})"]


def test_unknown_key_names_file_line_key_and_choices() -> None:
    found = problems(MINIMAL + "    colour: blue\n")
    assert len(found) == 1
    assert found[0].startswith("gw.yaml:12: routes[0].colour: unknown key; known: name, match, upstream")


def test_wrong_types_and_bad_durations() -> None:
    found = problems(MINIMAL + "server: {workers: many, shutdown_grace: 20}\n")
    assert "gw.yaml:12: server.workers: expected a whole number, got 'many'" in found
    assert any(p.startswith("gw.yaml:12: server.shutdown_grace: expected a duration") for p in found)


def test_unknown_upstream_lists_known_ones() -> None:
    found = problems(MINIMAL.replace("upstream: orders", "upstream: billing"))
    assert found == ["gw.yaml:11: routes[0].upstream: unknown upstream 'billing'; known: orders"]


def test_unknown_issuer_in_route() -> None:
    found = problems(MINIMAL + "    auth: {issuers: [staff]}\n")
    assert found == ["gw.yaml:12: routes[0].auth.issuers[0]: unknown issuer 'staff'; known: customers"]


def test_an_issuer_with_a_bad_url_is_one_problem_not_a_cascade(monkeypatch: pytest.MonkeyPatch) -> None:
    # `${ISSUER_URL}` unset used to add "routes[0].auth.issuers[0]: unknown issuer 'customers'; known: none
    # defined" for a route that names the issuer correctly: the issuer was dropped with its URL.
    monkeypatch.delenv("NOPE", raising=False)
    text = MINIMAL + "    auth: {issuers: [customers]}\n"
    assert problems(text.replace("https://login.example.com", '"${NOPE}"')) == [
        "gw.yaml:3: issuers[0].issuer: environment variable NOPE is not set (write ${NOPE:-default})"]
    two = text.replace("upstreams:", "  - name: staff\n    issuer: ftp://x\n    audiences: [api]\nupstreams:", 1)
    two = two.replace("issuers:\n", "issuers:\n  - name: partners\n    issuer: ftp://y\n    audiences: [api]\n", 1)
    found = problems(two.replace("https://login.example.com", "ftp://z"))
    assert len(found) == 3 and all(": expected an http(s) URL" in p for p in found), found


@pytest.mark.parametrize("alg", ["none", "HS256", "hs512"])
def test_none_and_hmac_algorithms_refused(alg: str) -> None:
    found = problems(MINIMAL.replace("audiences: [api]", f"audiences: [api]\n    algorithms: [RS256, {alg}]"))
    assert len(found) == 1 and found[0].startswith("gw.yaml:5: issuers[0].algorithms:")
    assert "refused" in found[0]


def test_shadowed_route_is_an_error() -> None:
    text = MINIMAL.replace("routes:\n", "routes:\n  - name: all\n    match: {path_prefix: /orders/}\n"
                                       "    upstream: orders\n")
    found = problems(text)
    assert len(found) == 1
    assert found[0].startswith("gw.yaml:12: routes[1]: route 'orders' can never match: route 'all' (line 9)")


def test_claim_binding_must_name_a_path_parameter() -> None:
    found = problems(MINIMAL + '    auth: {claims: {tenant: "{path.tenant}"}}\n')
    assert found == ["gw.yaml:12: routes[0].auth.claims.tenant: path parameter 'tenant' is not defined by "
                     "the route's path; defined: id"]


def test_a_claim_rule_takes_a_list_of_numbers_as_it_takes_one_number() -> None:
    """`level: 3` loaded, `level: [2, 3]` ("one of", README) was refused item by item as "not a string" plus
    a third line for the rule; numeric claims (tenant ids, levels) are common. A nested list stays refused,
    once."""
    c = load_text(MINIMAL + "    auth: {claims: {org.level: [2, 3], email_verified: [true], tenant: 42}}\n", "gw.yaml")
    rules = {rule.claim: rule.values for rule in c.routes[0].auth.claims}
    assert rules == {"org.level": ("2", "3"), "email_verified": ("true",), "tenant": ("42",)}
    check = Rules(c.routes[0].auth).check
    check(_principal({"org": {"level": 3}, "email_verified": True}), {})
    with pytest.raises(InsufficientScope):
        check(_principal({"org": {"level": 1}, "email_verified": True}), {})
    assert problems(MINIMAL + "    auth: {claims: {org.level: [2, [3]]}}\n") == [
        "gw.yaml:12: routes[0].auth.claims.org.level[1]: expected a single value, not a list"]


@pytest.mark.parametrize(("written", "reads"), [
    ("[010, 20]", "8"),        # YAML 1.1 octal: department 010 would admit department 8
    ("[no, se, dk]", "false"),  # a country code read as a boolean
    ("[0x1F]", "31"),
    ("[1_000]", "1000"),
    ("010", "8"),              # a single value likewise
    ("yes", "true"),
])
def test_a_claim_value_yaml_would_retype_is_refused(written: str, reads: str) -> None:
    """A claim value is compared as text: a plain scalar that YAML turns into another text (`010` is 8,
    `no` is false) would admit tokens carrying that other value and refuse the ones meant. Refused with
    the way out (quote it, or write the value it reads as), not loaded as something never written."""
    found = problems(MINIMAL + f"    auth: {{claims: {{org.dept: {written}}}}}\n")
    assert len(found) == 1, found
    assert found[0].startswith("gw.yaml:12: routes[0].auth.claims.org.dept")
    assert f"reads as {reads} in YAML" in found[0] and "quote it" in found[0]
    ok = load_text(MINIMAL + "    auth: {claims: {org.dept: ['010', 8, 1.5, true, False, 2020-01-01]}}\n", "gw.yaml")
    assert ok.routes[0].auth.claims[0].values == ("010", "8", "1.5", "true", "false", "2020-01-01")


def _principal(claims: dict[str, object]) -> Principal:
    return Principal(issuer="customers", iss="https://login.example.com", subject="alice", scopes=frozenset(),
                     roles=(), tenant="42", session=None, jti=None, iat=None, exp=None, aud=("api",), claims=claims)


def test_the_specs_own_example_loads_as_written() -> None:
    """SPEC 3's example: `forward.audience`/`scopes` beside `identity: headers` (read in token mode only),
    `any_scopes: []`/`roles: []`, and `admin.issuer: employees` although only `customers` is defined."""
    c = load(Path(__file__).parent / "support" / "spec_example.yaml")
    route = c.routes[0]
    assert route.forward.identity == "headers" and route.forward.audience == "orders-service"
    assert route.auth.scopes == ("orders:read",) and route.auth.any_scopes == () and route.auth.roles == ()
    assert c.admin.issuer == "employees" and [i.name for i in c.issuers] == ["customers"]
    # No token can come from an issuer that is not configured: the admin API refuses every one, and says so.
    assert warnings(c) == [f"{c.path}: warning: admin.issuer: 'employees' is not a configured issuer; "
                           "the admin API refuses every token (admin.issuer is 'employees' when unset)",
                           f"{c.path}: warning: routes[0].forward.scopes: read in token mode only; with identity: "
                           "headers the upstream is told the token's own scopes"]
    assert warnings(load_text(MINIMAL + "admin: {issuer: customers}\n", "gw.yaml")) == []


def test_a_public_route_forwards_nothing_and_may_write_empty_rules() -> None:
    c = load_text(MINIMAL + "    auth: {required: false, scopes: [], roles: []}\n    forward: {identity: headers}\n",
                  "gw.yaml")
    assert c.routes[0].forward.identity == "none" and not c.routes[0].auth.required
    found = problems(MINIMAL + "    auth: {required: false, roles: [], any_scopes: [a]}\n")
    assert found == ["gw.yaml:12: routes[0].auth.any_scopes: a public route (required: false) cannot have rules; "
                     "remove it or set required: true"]


def test_token_forwarding_without_internal_token_takes_its_defaults(monkeypatch: pytest.MonkeyPatch) -> None:
    """SPEC 3: every key but issuers, upstreams and routes has its default, and internal_token is needed
    only by token routes: with one and no section, the section's defaults apply, as `{}` would give."""
    monkeypatch.delenv("GATEWAY_KEY_STORE", raising=False)
    c = load_text(MINIMAL + "    forward: {identity: token, audience: orders}\n", "gw.yaml")
    assert c.internal_token == InternalTokenConfig()
    assert c.internal_token == load_text(MINIMAL + "    forward: {identity: token, audience: orders}\n"
                                         "internal_token: {}\n", "gw.yaml").internal_token
    assert load_text(MINIMAL, "gw.yaml").internal_token is None  # no token route: no key store at all


def test_several_problems_reported_together_and_required_sections() -> None:
    found = problems("server: {listen: nowhere}\n")
    assert "gw.yaml:1: server.listen: expected HOST:PORT like 0.0.0.0:8080, got 'nowhere'" in found
    assert {p.split(": ")[1] for p in found} >= {"issuers", "upstreams", "routes"}


def test_yaml_syntax_error_and_missing_file(tmp_path: Path) -> None:
    assert problems("routes: [\n")[0].startswith("gw.yaml:2: (yaml):")
    with pytest.raises(ConfigError) as info:
        load(tmp_path / "absent.yaml")
    assert "cannot read" in info.value.problems[0]


def test_public_route_cannot_have_rules() -> None:
    found = problems(MINIMAL + "    auth: {required: false, scopes: [x]}\n")
    assert found == ["gw.yaml:12: routes[0].auth.scopes: a public route (required: false) cannot have rules; "
                     "remove it or set required: true"]


@pytest.mark.parametrize("prefix", ["/x/..;/", "/x//", "/x/../", "/a%20b/", "api/"])
def test_prefix_the_route_table_would_refuse_is_refused_at_load(prefix: str) -> None:
    found = problems(MINIMAL.replace('match: {path: "/orders/{id}", methods: [GET]}',
                                     f'match: {{path_prefix: "{prefix}"}}'))
    assert len(found) == 1 and found[0].startswith("gw.yaml:10: routes[0].match.path_prefix: expected a plain")


@pytest.mark.parametrize(("value", "message"), [("-1", "must be at least 0, got -1"),
                                                ("many", "expected a whole number, got 'many'"),
                                                ("1.5", "expected a whole number, got 1.5")])
def test_max_requests_is_a_whole_number_of_zero_or_more(value: str, message: str) -> None:
    text = MINIMAL.replace("targets: [http://127.0.0.1:8081]\n",
                           f"targets: [http://127.0.0.1:8081]\n    max_requests: {value}\n")
    assert [p for p in problems(text) if "upstreams.orders.max_requests" in p and message in p], problems(text)
    unlimited = load_text(text.replace(f"max_requests: {value}", "max_requests: 0"), "gw.yaml")
    assert unlimited.upstreams["orders"].max_requests == 0
