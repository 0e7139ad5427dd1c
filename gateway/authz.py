"""Pure evaluation of a route's rules (issuers, scopes, roles, claim conditions, path bindings)."""

from __future__ import annotations

import operator
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from gateway.config_types import AuthConfig, ClaimRule
from gateway.errors import InsufficientScope, InvalidToken
from gateway.model import Principal

_BINDING_PREFIX = "{path."


@dataclass(frozen=True, slots=True)
class Verdict:
    """One rule's outcome, for `gateway explain`."""

    rule: str
    ok: bool
    detail: str


def authorize(auth: AuthConfig, p: Principal, params: Mapping[str, str]) -> None:
    """Raise unless the principal satisfies every rule of the route. The hot path: no allocation on success."""
    if auth.issuers and p.issuer not in auth.issuers:
        # A token from an issuer the route does not trust is not a valid credential here (401, not 403).
        raise InvalidToken("wrong_issuer", issuer=p.issuer)
    if (
        (auth.scopes and not p.scopes.issuperset(auth.scopes))
        or (auth.any_scopes and p.scopes.isdisjoint(auth.any_scopes))
        or (auth.roles and not any(role in auth.roles for role in p.roles))
        or not all(_claim_holds(rule, p, params) for rule in auth.claims)
    ):
        # RFC 6750 s3.1 insufficient_scope; the challenge names the scopes the route needs.
        raise InsufficientScope(auth.scopes + auth.any_scopes, issuer=p.issuer)


_ClaimCheck = Callable[[Principal, Mapping[str, str]], bool]
# Logical claims with at most one value: compared directly, no tuple built per request.
_SINGLE = {"subject": "subject", "tenant": "tenant", "session": "session"}


class Rules:
    """A route's AuthConfig compiled once (frozensets, per-claim checks); check() is authorize() without
    per-request conversions. Same verdicts as authorize() (tests/test_authz.py compares them)."""

    __slots__ = ("auth", "_issuers", "_scopes", "_any_scopes", "_roles", "_claims", "_challenge")

    def __init__(self, auth: AuthConfig) -> None:
        self.auth = auth
        self._issuers = frozenset(auth.issuers)
        self._scopes = frozenset(auth.scopes)
        self._any_scopes = frozenset(auth.any_scopes)
        self._roles = frozenset(auth.roles)
        self._claims = tuple(_compile_claim(rule) for rule in auth.claims)
        self._challenge = auth.scopes + auth.any_scopes

    def check(self, p: Principal, params: Mapping[str, str]) -> None:
        """Raise unless the principal satisfies every rule (the errors authorize() raises)."""
        if self._issuers and p.issuer not in self._issuers:
            raise InvalidToken("wrong_issuer", issuer=p.issuer)  # 401, as in authorize()
        if (
            (self._scopes and not self._scopes <= p.scopes)
            or (self._any_scopes and self._any_scopes.isdisjoint(p.scopes))
            or (self._roles and self._roles.isdisjoint(p.roles))
        ):
            raise InsufficientScope(self._challenge, issuer=p.issuer)
        for holds in self._claims:
            if not holds(p, params):
                raise InsufficientScope(self._challenge, issuer=p.issuer)


def _compile_claim(rule: ClaimRule) -> _ClaimCheck:
    attr = _SINGLE.get(rule.claim)
    if attr is None:
        return lambda p, params: _claim_holds(rule, p, params)
    get = operator.attrgetter(attr)
    literals = frozenset(v for v in rule.values if not v.startswith(_BINDING_PREFIX))
    bound = tuple(v[len(_BINDING_PREFIX):-1] for v in rule.values if v.startswith(_BINDING_PREFIX))

    def holds(p: Principal, params: Mapping[str, str]) -> bool:
        actual = get(p)
        if actual is None:
            return False  # fail closed: an absent claim never satisfies a condition
        if actual in literals:
            return True
        for name in bound:
            # A missing parameter (None) never equals a claim value; one holding `;` never binds (_bindable).
            if params.get(name) == actual and ";" not in actual:
                return True
        return False

    return holds


def evaluate(auth: AuthConfig, p: Principal, params: Mapping[str, str]) -> list[Verdict]:
    """Every rule with its verdict, in the order authorize() applies them."""
    out: list[Verdict] = []
    if auth.issuers:
        out.append(Verdict("issuers", p.issuer in auth.issuers,
                           f"token issuer {p.issuer!r}; route accepts {', '.join(auth.issuers)}"))
    have = " ".join(sorted(p.scopes)) or "none"
    if auth.scopes:
        missing = sorted(set(auth.scopes) - p.scopes)
        out.append(Verdict("scopes", not missing, f"needs all of {' '.join(auth.scopes)}; token has {have}"
                           + (f"; missing {' '.join(missing)}" if missing else "")))
    if auth.any_scopes:
        out.append(Verdict("any_scopes", not p.scopes.isdisjoint(auth.any_scopes),
                           f"needs one of {' '.join(auth.any_scopes)}; token has {have}"))
    if auth.roles:
        out.append(Verdict("roles", any(r in auth.roles for r in p.roles),
                           f"needs one of {', '.join(auth.roles)}; token has {', '.join(p.roles) or 'none'}"))
    for rule in auth.claims:
        wanted = ", ".join(_describe(v, params) for v in rule.values)
        out.append(Verdict(f"claims.{rule.claim}", _claim_holds(rule, p, params),
                           f"must be one of [{wanted}]; token has {_claim_values(rule.claim, p)}"))
    return out


def _describe(value: str, params: Mapping[str, str]) -> str:
    """One wanted value as `explain` says it: a binding whose segment can never bind says why."""
    if value.startswith(_BINDING_PREFIX):
        segment = _segment(value, params)
        if segment is not None and _bindable(segment) is None:
            return f"{value} = {segment!r}, which never binds (it holds ';')"
    return repr(_expected(value, params))


def _expected(value: str, params: Mapping[str, str]) -> str | None:
    if value.startswith(_BINDING_PREFIX):
        return _bindable(_segment(value, params))
    return value


def _segment(binding: str, params: Mapping[str, str]) -> str | None:
    return params.get(binding[len(_BINDING_PREFIX):-1])  # "{path.NAME}" -> the NAME segment


def _bindable(segment: str | None) -> str | None:
    """A path parameter as a binding may compare it: never one holding `;` (also sent as %3B). Tomcat and
    Spring drop a segment's `;params` before the application reads it: `/tenants/evil;acme/...` is tenant
    `evil` to them, so a claim `evil;acme` bound to that segment would open tenant `evil`. Fail closed."""
    return None if segment is None or ";" in segment else segment


def _claim_holds(rule: ClaimRule, p: Principal, params: Mapping[str, str]) -> bool:
    actual = _claim_values(rule.claim, p)
    if not actual:
        return False  # fail closed: an absent claim never satisfies a condition
    for value in rule.values:
        expected = _expected(value, params)
        if expected is not None and expected in actual:
            return True
    return False


def _claim_values(claim: str, p: Principal) -> tuple[str, ...]:
    """The claim's values as strings; logical names go through the issuer's claims map."""
    if claim == "subject":
        return (p.subject,) if p.subject is not None else ()
    if claim == "tenant":
        return (p.tenant,) if p.tenant is not None else ()
    if claim == "session":
        return (p.session,) if p.session is not None else ()
    if claim == "scopes":
        return tuple(sorted(p.scopes))
    if claim == "roles":
        return p.roles
    value: Any = p.claims
    for part in claim.split("."):
        if not isinstance(value, Mapping) or part not in value:
            return ()
        value = value[part]
    items = value if isinstance(value, list) else [value]
    return tuple(_as_str(v) for v in items if isinstance(v, (str, int, float, bool)))


def _as_str(v: str | int | float | bool) -> str:
    return ("true" if v else "false") if isinstance(v, bool) else str(v)
