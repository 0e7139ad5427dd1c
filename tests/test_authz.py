"""Route rules: compiled Rules.check() gives authorize()'s verdicts; issuers 401, the rest 403 with the challenge."""

from __future__ import annotations

from collections.abc import Mapping
from types import MappingProxyType
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from gateway.authz import Rules, authorize
from gateway.config_types import AuthConfig, ClaimRule
from gateway.errors import GatewayError, InsufficientScope, InvalidToken
from gateway.model import Principal

WORDS = ["a", "b", "c", "t1", "t2"]


def principal(**kw: Any) -> Principal:
    fields: dict[str, Any] = {
        "issuer": "dev", "iss": "https://dev", "subject": "alice", "scopes": frozenset({"a"}), "roles": (),
        "tenant": "t1", "session": None, "jti": "j", "iat": 1, "exp": 2, "aud": ("api",), "claims": {},
    }
    fields.update(kw)
    return Principal(**fields)


def outcome(fn: Any, *args: Any) -> object:
    try:
        fn(*args)
    except GatewayError as exc:
        return (type(exc).__name__, exc.status, getattr(exc, "reason", None), tuple(exc.headers.items()))
    return "ok"


def test_tenant_bound_to_path_and_scopes() -> None:
    auth = AuthConfig(issuers=("dev",), scopes=("orders:read",),
                      claims=(ClaimRule("tenant", ("{path.tenant}",)),))
    rules = Rules(auth)
    p = principal(scopes=frozenset({"orders:read", "x"}))
    rules.check(p, MappingProxyType({"tenant": "t1"}))
    with pytest.raises(InsufficientScope) as info:
        rules.check(p, {"tenant": "t2"})
    assert info.value.status == 403
    with pytest.raises(InsufficientScope):
        rules.check(p, {})  # the parameter is absent: never satisfied
    with pytest.raises(InsufficientScope):
        rules.check(principal(tenant=None, scopes=frozenset({"orders:read"})), {"tenant": "t1"})
    with pytest.raises(InvalidToken) as wrong:
        rules.check(principal(issuer="other", scopes=frozenset({"orders:read"})), {"tenant": "t1"})
    assert wrong.value.status == 401 and wrong.value.reason == "wrong_issuer"


values = st.lists(st.one_of(st.sampled_from(WORDS), st.sampled_from(["{path.x}", "{path.y}"])), max_size=3)
claim_rules = st.builds(
    ClaimRule, st.sampled_from(["subject", "tenant", "session", "scopes", "roles", "org.id", "flag"]),
    values.map(tuple),
)
auth_configs = st.builds(
    AuthConfig,
    issuers=st.lists(st.sampled_from(["dev", "other"]), max_size=2).map(tuple),
    scopes=st.lists(st.sampled_from(WORDS), max_size=2).map(tuple),
    any_scopes=st.lists(st.sampled_from(WORDS), max_size=2).map(tuple),
    roles=st.lists(st.sampled_from(WORDS), max_size=2).map(tuple),
    claims=st.lists(claim_rules, max_size=3).map(tuple),
)
maybe_word = st.one_of(st.none(), st.sampled_from(WORDS + [""]))
principals = st.builds(
    principal,
    issuer=st.sampled_from(["dev", "other"]),
    subject=maybe_word, tenant=maybe_word, session=maybe_word,
    scopes=st.frozensets(st.sampled_from(WORDS), max_size=3),
    roles=st.lists(st.sampled_from(WORDS), max_size=2).map(tuple),
    claims=st.fixed_dictionaries({}, optional={
        "org": st.fixed_dictionaries({"id": st.one_of(st.sampled_from(WORDS), st.integers(0, 2))}),
        "flag": st.one_of(st.booleans(), st.lists(st.sampled_from(WORDS), max_size=2)),
    }),
)
params = st.dictionaries(st.sampled_from(["x", "y"]), st.sampled_from(WORDS), max_size=2)


@settings(max_examples=500, deadline=None)
@given(auth_configs, principals, params)
def test_rules_agree_with_authorize(auth: AuthConfig, p: Principal, path_params: Mapping[str, str]) -> None:
    assert outcome(Rules(auth).check, p, path_params) == outcome(authorize, auth, p, path_params)
