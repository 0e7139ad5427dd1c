"""A connection's last admission (pipeline.ConnMemo): the next request with the same token on the same
route and path parameters skips the rules, and only while every stage would answer as it did.

Real TokenVerifier, revocation store and Gateway; the key source (StaticKeys) and the clock are the
seams faked here. The wire-level counterpart is in test_security_e2e.py."""

from __future__ import annotations

import random
from collections import Counter
from typing import Any

import jwt
import pytest
from multidict import CIMultiDict, CIMultiDictProxy

from gateway.config import load_text
from gateway.errors import GatewayError, InsufficientScope, InvalidToken, MissingToken
from gateway.model import RequestView
from gateway.pipeline import ConnMemo, Exchange, Gateway
from gateway.revocation import MemoryRevocationStore, _View
from gateway.tokens import TokenVerifier
from tests.support.gateway import config_text
from tests.test_revocation import counter as revocation_checks
from tests.test_tokens import Clock, StaticKeys, cache_hits

ROUTES = """\
  - name: orders
    match: {path: "/tenants/{tenant}/orders", methods: [GET]}
    upstream: up
    auth: {scopes: [orders:read], claims: {tenant: "{path.tenant}"}}
  - name: reports
    match: {path_prefix: /reports/}
    upstream: up
    auth: {scopes: [orders:read]}
  - name: staff
    match: {path_prefix: /staff/}
    upstream: up
    auth: {roles: [admin]}
"""
ALICE = {"sub": "alice", "scope": "orders:read", "tenant_id": "acme", "roles": ["user"], "jti": "j-1"}


class RevokingKeys(StaticKeys):
    """StaticKeys that can have a revocation (of some other token) applied while a signature is checked."""

    store: MemoryRevocationStore
    revoke_during_lookup: str | None = None

    async def key_for(self, kid: str | None, alg: str | None = None) -> Any:
        if self.revoke_during_lookup is not None:
            await self.store.revoke("jti", self.revoke_during_lookup, None)
        return await super().key_for(kid, alg)


class World:
    """Gateways over one verifier and one revocation store, as a reload that kept them would have."""

    def __init__(self, issuer: Any) -> None:
        self.text = config_text(issuer.url, {"up": ["http://127.0.0.1:9"]}, ROUTES)
        self.config = load_text(self.text)
        (issuer_cfg,) = self.config.issuers
        self.clock = Clock()
        self.keys = RevokingKeys(issuer)
        self.verifier = TokenVerifier([issuer_cfg], {issuer_cfg.name: self.keys}, clock=self.clock)
        self.store = MemoryRevocationStore(self.config.revocation, clock=self.clock)
        self.keys.store = self.store
        self.gateway = self.build(self.text)
        self.memo = ConnMemo()  # one connection

    def build(self, text: str) -> Gateway:
        return Gateway(load_text(text), self.verifier, self.store, None, None)  # type: ignore[arg-type]

    async def ask(self, path: str, token: str, *, gateway: Gateway | None = None, scheme: str = "Bearer ",
                  memo: ConnMemo | None | str = "connection") -> dict[str, str]:
        """The identity headers the upstream would get; raises what the request path raises. `memo`:
        this World's one connection by default; None for a request with no per-connection memo at all."""
        headers = CIMultiDictProxy(CIMultiDict({"Host": "x", "Authorization": scheme + token}))
        view = RequestView("GET", path, "", "x", headers, "127.0.0.1", "127.0.0.1",
                           memo=self.memo if memo == "connection" else memo)
        _, out = await (gateway or self.gateway).admit(view, Exchange("rid"))
        return {k.lower(): v for k, v in out.items() if k.lower().startswith("x-auth-")}


async def test_the_same_request_again_is_admitted_from_the_memo_and_counted_as_the_full_path(issuer: Any) -> None:
    w = World(issuer)
    token = issuer.token(ALICE)
    assert (await w.ask("/tenants/acme/orders", token))["x-auth-subject"] == "alice"  # verified in full
    last = w.memo.admitted
    assert last is not None and last.principal.subject == "alice"
    hits, oks = cache_hits(), revocation_checks("ok")
    for _ in range(5):
        assert (await w.ask("/tenants/acme/orders", token))["x-auth-subject"] == "alice"
        assert w.memo.admitted is last  # answered by the memo: nothing was recorded again
    # A token cache hit and an ok revocation check per request, as the full path counts them.
    assert (cache_hits(), revocation_checks("ok")) == (hits + 5, oks + 5)


async def test_a_revocation_or_expiry_since_refuses_the_next_request(issuer: Any) -> None:
    w = World(issuer)
    token = issuer.token(ALICE, ttl=60)
    for _ in range(2):
        await w.ask("/tenants/acme/orders", token)
    await w.store.revoke("jti", "j-1", None)
    with pytest.raises(InvalidToken) as refused:
        await w.ask("/tenants/acme/orders", token)
    assert refused.value.reason == "revoked" and w.memo.admitted is None

    other = issuer.token({**ALICE, "sub": "bob", "jti": "j-2"}, ttl=60)
    for _ in range(2):
        await w.ask("/tenants/acme/orders", other)
    assert w.memo.admitted is not None
    calls = w.keys.calls
    w.clock.now += 61  # past exp by the verifier's clock (PyJWT reads the real one, and still accepts it)
    await w.ask("/tenants/acme/orders", other)
    assert w.keys.calls == calls + 1  # neither the memo nor the cache answered: the signature was checked


async def test_nothing_is_kept_when_the_view_changed_while_the_checks_ran(issuer: Any) -> None:
    """The stamp is read before the checks and compared after: had the view changed in between, which
    view the principal passed is unknown, so the next request is checked in full."""
    w = World(issuer)
    token = issuer.token(ALICE)
    w.keys.revoke_during_lookup = "someone-else"
    await w.ask("/tenants/acme/orders", token)  # verified; a revocation was applied meanwhile
    assert w.memo.admitted is None
    await w.ask("/tenants/acme/orders", token)  # a cache hit, on an unchanged view: kept now
    assert w.memo.admitted is not None


async def test_another_token_parameters_route_config_or_scheme_run_every_check(issuer: Any) -> None:
    w = World(issuer)
    token = issuer.token(ALICE)
    for _ in range(2):
        await w.ask("/tenants/acme/orders", token)
    with pytest.raises(InsufficientScope):  # another tenant: the path binding is checked again
        await w.ask("/tenants/globex/orders", token)
    for _ in range(2):
        await w.ask("/reports/a", token)  # no path parameters, like /staff/ below
    with pytest.raises(InsufficientScope):  # another route: its own rules (roles: admin)
        await w.ask("/staff/a", token)
    for _ in range(2):
        await w.ask("/reports/a", token)
    # Another token, cached too: its own identity (the memo is one principal's only).
    bob = issuer.token({**ALICE, "sub": "bob", "jti": "j-2"})
    for who in ("bob", "bob", "alice", "bob", "alice"):
        assert (await w.ask("/reports/a", bob if who == "bob" else token))["x-auth-subject"] == who
    # Not a Bearer credential, although the rest of the header is the very token: refused as without memo.
    with pytest.raises(MissingToken):
        await w.ask("/reports/a", token, scheme="Basic  ")
    for _ in range(2):
        await w.ask("/reports/a", token)
    # A reload that kept the verifier and the store: the new rules decide, not the old Gateway's memo.
    stricter = w.build(w.text.replace("scopes: [orders:read]}", "scopes: [orders:write]}"))
    with pytest.raises(InsufficientScope):
        await w.ask("/reports/a", token, gateway=stricter)
    assert (await w.ask("/reports/a", token))["x-auth-subject"] == "alice"  # the old one still admits


async def test_one_connection_answers_as_requests_without_any_memo_would(issuer: Any) -> None:
    """Differential: a seeded random walk of requests on one connection (tokens, tenants, routes, the
    scheme's spelling) mixed with revocations, key withdrawals, the verifier's clock moving past exp and
    reloads to stricter or looser rules. Every request is also sent without a per-connection memo, and
    both must get the same answer: the same identity headers, or the same refusal and reason."""
    w = World(issuer)
    claims = {"alice": ALICE, "globex": {**ALICE, "sub": "gina", "tenant_id": "globex"},
              "admin": {**ALICE, "sub": "ada", "roles": ["admin"]}}
    tokens = {name: issuer.token({**c, "jti": f"{name}-0"}, ttl=86400) for name, c in claims.items()}
    tokens["bob"] = issuer.token({**ALICE, "sub": "bob", "jti": "bob-0"}, ttl=300)  # past exp in the walk
    logins: dict[int, str] = {}  # step -> who signs in again (a new token) after a revocation
    paths = ["/tenants/acme/orders", "/tenants/globex/orders", "/reports/a", "/staff/a"]
    texts = [w.text, w.text.replace("scopes: [orders:read]}", "scopes: [orders:write]}")]
    rng = random.Random(20261123)
    outcomes: Counter[str] = Counter()
    request = ("alice", paths[0], "Bearer ")
    readmitted = 0

    async def outcome(path: str, token: str, scheme: str, memo: ConnMemo | None | str) -> tuple[Any, ...]:
        try:
            return ("ok", tuple(sorted((await w.ask(path, token, scheme=scheme, memo=memo)).items())))
        except GatewayError as exc:
            return (type(exc).__name__, getattr(exc, "reason", None))

    for step in range(800):
        if step in logins:
            name = logins.pop(step)
            tokens[name] = issuer.token({**claims[name], "jti": f"{name}-{step}"}, ttl=86400)
        roll = rng.random()
        if roll < 0.02:
            name = request[0] if request[0] in claims and rng.random() < 0.8 else rng.choice(list(claims))
            await w.store.revoke("jti", jwt.decode(tokens[name], options={"verify_signature": False})["jti"], None)
            logins[step + rng.randint(5, 30)] = name  # its next requests are refused until then
        elif roll < 0.025:
            await w.store.revoke("subject", "bob", w.config.issuers[0].name)  # for good
        elif roll < 0.035:
            w.keys.generation += 1  # a key withdrawn somewhere: cached tokens are verified in full again
        elif roll < 0.07:
            w.clock.now += 60  # the cache's clock only (PyJWT reads the real one)
        elif roll < 0.09:
            w.gateway = w.build(rng.choice(texts))
        else:
            if rng.random() < 0.4:  # a client mostly repeats itself (what the memo is for), else one thing differs
                which = rng.randrange(3)
                field = [list(tokens), paths, ["Bearer "] * 6 + ["bearer ", "Basic  "]][which]
                request = (*request[:which], rng.choice(field), *request[which + 1:])
            name, path, scheme = request
            before = w.memo.admitted
            got = await outcome(path, tokens[name], scheme, "connection")
            readmitted += before is not None and w.memo.admitted is before  # answered by the memo
            want = await outcome(path, tokens[name], scheme, None)
            assert got == want, (step, name, path, scheme)
            outcomes[got[0]] += 1
    # The walk went through admissions and every kind of refusal (it is not a test of one outcome), and
    # the connection's memo answered many of them.
    assert {"ok", "InsufficientScope", "InvalidToken", "MissingToken"} <= set(outcomes), outcomes
    assert readmitted >= 80, readmitted


def test_the_view_stamp_changes_when_a_revocation_is_applied_not_when_one_expires() -> None:
    view = _View()
    first = view.stamp
    view.apply("jti", None, "a", 0.0, 10.0)
    applied = view.stamp
    assert applied != first and _View().stamp not in (first, applied)  # a rebuilt view never repeats one
    view.purge(20.0)  # expired entries leave: nothing that passed can be refused by that
    assert view.stamp == applied and not view.jti
