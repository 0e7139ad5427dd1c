"""TokenVerifier with real signed tokens from a DevIssuer: every refusal reason, every algorithm, the cache."""

from __future__ import annotations

import base64
import hashlib
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import jwt
import pytest

from gateway import errors, metrics
from gateway.config_types import ClaimsMap, IssuerConfig
from gateway.devissuer import ALGORITHMS, DevIssuer
from gateway.jwks import JwksCache
from gateway.tokens import TokenMemo, TokenVerifier, bearer_token
from tests.support.issuer import issuer_config


def config(dev: DevIssuer, /, **overrides: Any) -> IssuerConfig:
    return issuer_config(dev, **{"leeway": 30.0, "jwks_min_refetch": 0.0, **overrides})


class StaticKeys:
    """A fake KeySource over the issuer's published JWKS that counts lookups (= signature checks)."""

    def __init__(self, dev: DevIssuer) -> None:
        self.keys = {k.key_id: k for k in jwt.PyJWKSet.from_dict(dev.jwks()).keys}
        self.calls = 0
        self.generation = 0

    async def key_for(self, kid: str | None, alg: str | None = None) -> jwt.PyJWK | None:
        self.calls += 1
        return self.keys.get(kid) if kid is not None else None


class Clock:
    def __init__(self) -> None:
        self.now = time.time()

    def __call__(self) -> float:
        return self.now


def cache_hits() -> float:
    for line in metrics.render()[0].decode().splitlines():
        if line.startswith("gateway_token_cache_hits_total "):
            return float(line.split()[1])
    return 0.0


VerifierFactory = Callable[..., Awaitable[TokenVerifier]]


@pytest.fixture
async def make_verifier() -> AsyncIterator[VerifierFactory]:
    """Builds a TokenVerifier over real JwksCaches (one per config) fetching over HTTP."""
    session = aiohttp.ClientSession()
    caches: list[JwksCache] = []

    async def make(*configs: IssuerConfig, **kwargs: Any) -> TokenVerifier:
        keys = {}
        for cfg in configs:
            cache = JwksCache(cfg, session)
            await cache.start()
            caches.append(cache)
            keys[cfg.name] = cache
        return TokenVerifier(configs, keys, **kwargs)

    yield make
    for cache in caches:
        await cache.close()
    await session.close()


async def refused(verifier: TokenVerifier, token: str) -> errors.InvalidToken:
    with pytest.raises(errors.InvalidToken) as info:
        await verifier.verify(token)
    if token:
        assert token not in str(info.value) and token not in repr(info.value.args)
    return info.value


async def test_only_the_canonical_spelling_of_the_signature_verifies(issuer: DevIssuer) -> None:
    """RFC 7515 s2: the parts are base64url without padding. A padded signature part used to verify (and
    be cached as a token of its own); it and the other spellings a base64 decoder may tolerate (the
    standard alphabet's `+` and `/`, spare low bits in the last character, a character outside the
    alphabet) are refused as malformed."""
    cfg = config(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: StaticKeys(issuer)})
    token = issuer.token()
    while "-" not in token.rpartition(".")[2] or "_" not in token.rpartition(".")[2]:
        token = issuer.token()  # a signature with both characters the standard alphabet spells otherwise
    head, _, sig = token.rpartition(".")
    last = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_".index(sig[-1])
    other_bits = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"[last ^ 1]
    variants = {
        "padded": token + "==",
        "plus": f"{head}.{sig.replace('-', '+', 1)}",
        "slash": f"{head}.{sig.replace('_', '/', 1)}",
        "spare_bits": f"{head}.{sig[:-1]}{other_bits}",
        "tilde": f"{head}.{sig[:10]}~{sig[10:]}",
    }
    for name, spelled in variants.items():
        assert (await refused(verifier, spelled)).reason == "malformed", name
        assert verifier.cached(spelled) is None, name
    assert (await verifier.verify(token)).subject is not None  # the canonical spelling still verifies


async def test_valid_token_gives_principal(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    cfg = config(issuer)
    verifier = await make_verifier(cfg)
    token = issuer.token({"scope": "orders:read orders:write", "roles": ["admin"], "tenant_id": "t1",
                          "sid": "s-1", "jti": "j-1"})
    p = await verifier.verify(token)
    assert (p.issuer, p.iss, p.subject, p.jti, p.tenant, p.session) == (
        cfg.name, issuer.url, "alice", "j-1", "t1", "s-1")
    assert p.scopes == {"orders:read", "orders:write"} and p.roles == ("admin",)
    assert p.aud == (issuer.audience,) and p.exp is not None and p.iat is not None
    assert p.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert p.claims["tenant_id"] == "t1"


@pytest.mark.parametrize("alg", ALGORITHMS)
async def test_every_algorithm_accepted_when_allowed(
    issuer: DevIssuer, make_verifier: VerifierFactory, alg: str
) -> None:
    verifier = await make_verifier(config(issuer, algorithms=(alg,)))
    assert (await verifier.verify(issuer.token(alg=alg))).subject == "alice"


async def test_alg_none_refused(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    cfg = config(issuer)
    err = await refused(await make_verifier(cfg), issuer.token_alg_none())
    assert (err.reason, err.issuer, err.status, err.code) == ("alg_not_allowed", cfg.name, 401, "invalid_token")


async def test_hs256_keyed_with_public_key_refused(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    # Even a configuration that (wrongly) lists HS256 and none cannot let the key-confusion token through.
    cfg = config(issuer, algorithms=("RS256", "HS256", "none"))
    verifier = await make_verifier(cfg)
    assert (await refused(verifier, issuer.token_hs256_with_public_key())).reason == "alg_not_allowed"
    assert (await refused(verifier, issuer.token_alg_none())).reason == "alg_not_allowed"


async def test_alg_outside_allowlist_refused(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer, algorithms=("RS256",)))
    assert (await refused(verifier, issuer.token(alg="ES384"))).reason == "alg_not_allowed"


async def test_key_bound_to_its_algorithm(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    # PS256 signed with the RSA key published for RS256 only: RFC 8725 s3.1, one key, one algorithm.
    verifier = await make_verifier(config(issuer))
    token = issuer.token(alg="PS256", kid=issuer.kid("RS256"))
    assert (await refused(verifier, token)).reason == "alg_not_allowed"


async def test_unpublished_key_under_published_kid(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    for alg in ("RS256", "ES256", "EdDSA"):
        assert (await refused(verifier, issuer.token_unpublished_key(alg=alg))).reason == "bad_signature"


async def test_tampered_payload_is_bad_signature(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    header, _, sig = issuer.token().split(".")
    forged_payload = issuer.token({"sub": "mallory"}).split(".")[1]
    assert (await refused(verifier, f"{header}.{forged_payload}.{sig}")).reason == "bad_signature"


async def test_unknown_kid_after_refetch(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    kid = issuer.add_unpublished_key("ES256")
    hits = issuer.jwks_hits
    assert (await refused(verifier, issuer.token(alg="ES256", kid=kid))).reason == "unknown_kid"
    assert issuer.jwks_hits == hits + 1  # refetched once before refusing


async def test_rotated_key_accepted_without_restart(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    issuer.rotate("RS256", drop_old=True)
    assert (await verifier.verify(issuer.token())).subject == "alice"


async def test_expiry_and_leeway(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer, leeway=30.0))
    assert (await refused(verifier, issuer.token(ttl=-60))).reason == "expired"
    assert (await verifier.verify(issuer.token(ttl=-10))).subject == "alice"  # within leeway


async def test_not_before_and_leeway(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer, leeway=30.0))
    now = int(time.time())
    assert (await refused(verifier, issuer.token({"nbf": now + 120}))).reason == "not_yet_valid"
    assert (await refused(verifier, issuer.token({"iat": now + 120}))).reason == "not_yet_valid"
    assert (await verifier.verify(issuer.token({"nbf": now + 10, "iat": now + 10}))).subject == "alice"


async def test_audience(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    assert (await refused(verifier, issuer.token({"aud": "https://other.example"}))).reason == "wrong_audience"
    assert (await refused(verifier, issuer.token(omit=("aud",)))).reason == "wrong_audience"
    p = await verifier.verify(issuer.token({"aud": ["https://other.example", issuer.audience]}))
    assert p.aud == ("https://other.example", issuer.audience)


async def test_unknown_or_missing_issuer(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    err = await refused(verifier, issuer.token({"iss": "https://evil.example"}))
    assert (err.reason, err.issuer) == ("wrong_issuer", "")
    assert (await refused(verifier, issuer.token({"iss": issuer.url + "/"}))).reason == "wrong_issuer"
    assert (await refused(verifier, issuer.token(omit=("iss",)))).reason == "wrong_issuer"


@pytest.mark.parametrize(
    "raw",
    ["", "abc", "a.b.c", "a.b", "eyJhbGciOiJSUzI1NiJ9.bm90IGpzb24.c2ln", "eyJhbGciOiJSUzI1NiJ9.WzFd.c2ln",
     "x.y.z.w.v"],
)
async def test_malformed(issuer: DevIssuer, make_verifier: VerifierFactory, raw: str) -> None:
    verifier = await make_verifier(config(issuer))
    assert (await refused(verifier, raw)).reason == "malformed"


async def test_missing_or_bad_exp_is_malformed(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    assert (await refused(verifier, issuer.token(omit=("exp",)))).reason == "malformed"
    assert (await refused(verifier, issuer.token({"exp": "tomorrow"}))).reason == "malformed"
    _, payload, sig = issuer.token().split(".")
    header = base64.urlsafe_b64encode(b'{"alg":"RS256","kid":7}').rstrip(b"=").decode()
    assert (await refused(verifier, f"{header}.{payload}.{sig}")).reason == "malformed"


async def test_kid_less_token_uses_the_only_fitting_key(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    verifier = await make_verifier(config(issuer))
    assert (await verifier.verify(issuer.token(alg="EdDSA", headers={"kid": None}))).subject == "alice"
    issuer.rotate("EdDSA")  # two EdDSA keys now: a kid-less token is ambiguous
    verifier = await make_verifier(config(issuer))
    token = issuer.token(alg="EdDSA", headers={"kid": None})
    assert (await refused(verifier, token)).reason == "unknown_kid"


async def test_two_issuers_keys_do_not_cross(
    issuer: DevIssuer, other_issuer: DevIssuer, make_verifier: VerifierFactory
) -> None:
    a, b = config(issuer), config(other_issuer)
    verifier = await make_verifier(a, b)
    assert (await verifier.verify(issuer.token())).issuer == a.name
    assert (await verifier.verify(other_issuer.token())).issuer == b.name
    # Signed by B with B's kid, but claiming to come from A: A's keys do not include B's kid.
    err = await refused(verifier, other_issuer.token({"iss": issuer.url, "aud": issuer.audience}))
    assert (err.reason, err.issuer) == ("unknown_kid", a.name)


async def test_claims_mapping_dotted_paths(issuer: DevIssuer, make_verifier: VerifierFactory) -> None:
    claims = ClaimsMap(subject="preferred_username", scopes="scp", roles="realm_access.roles",
                       tenant="org.id", session="session_state")
    verifier = await make_verifier(config(issuer, claims=claims))
    p = await verifier.verify(issuer.token({
        "preferred_username": "alice@example.com", "scp": ["orders:read", "users:read"],
        "realm_access": {"roles": ["admin", "auditor"]}, "org": {"id": 42}, "session_state": "sess-9",
    }))
    assert p.subject == "alice@example.com" and p.scopes == {"orders:read", "users:read"}
    assert p.roles == ("admin", "auditor") and p.tenant == "42" and p.session == "sess-9"

    p = await verifier.verify(issuer.token({"realm_access": {"roles": "admin, auditor"}, "org": "flat"}))
    assert p.roles == ("admin", "auditor") and p.tenant is None and p.scopes == frozenset()


# ----- the verified-token cache (a fake KeySource counts the lookups that precede each signature check)

async def test_cache_hit_skips_verification(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys = StaticKeys(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: keys})
    token = issuer.token()
    first = await verifier.verify(token)
    hits = cache_hits()
    assert await verifier.verify(token) is first
    assert keys.calls == 1 and cache_hits() == hits + 1


async def test_cached_entry_never_outlives_exp(issuer: DevIssuer) -> None:
    cfg = config(issuer, leeway=30.0)
    keys, clock = StaticKeys(issuer), Clock()
    verifier = TokenVerifier([cfg], {cfg.name: keys}, clock=clock)
    token = issuer.token(ttl=60)
    p = await verifier.verify(token)
    assert p.exp is not None
    clock.now = p.exp + 1  # past exp but within leeway: re-verified in full, not served from the cache
    hits = cache_hits()
    await verifier.verify(token)
    assert keys.calls == 2 and cache_hits() == hits
    clock.now = p.exp + 31
    assert (await refused(verifier, token)).reason == "expired"


async def test_a_token_lives_at_most_max_lifetime_from_its_iat(issuer: DevIssuer) -> None:
    """revocation.max_token_lifetime bounds a token's life: a subject/session revocation is kept that long
    (+ the largest leeway), so a token living longer would pass again once its revocation expired."""
    cfg = config(issuer, leeway=30.0)
    keys, clock = StaticKeys(issuer), Clock()
    verifier = TokenVerifier([cfg], {cfg.name: keys}, clock=clock, max_lifetime=3600.0)
    iat = int(clock.now)
    token = issuer.token({"iat": iat, "nbf": iat, "exp": iat + 86400})  # a day's token, an hour allowed
    p = await verifier.verify(token)
    assert p.exp == iat + 3600 and p.claims["exp"] == iat + 86400
    clock.now = iat + 3600  # the bound ends the cache entry as exp does
    assert verifier.cached(token) is None
    clock.now = iat + 3600 + 29  # within leeway of the bound: still accepted after a full verification
    assert (await verifier.verify(token)).exp == iat + 3600
    clock.now = iat + 3600 + 31
    assert (await refused(verifier, token)).reason == "expired"
    # A token within the bound is unchanged.
    short = issuer.token({"iat": iat, "exp": iat + 600})
    clock.now = iat
    assert (await verifier.verify(short)).exp == iat + 600


async def test_a_token_without_iat_is_accepted_only_in_its_last_max_lifetime(issuer: DevIssuer) -> None:
    """With no iat, nothing bounds when a token was issued: a day's token revoked now (the revocation kept
    max_token_lifetime + leeway) would pass again once the revocation expired (security review: 401, then
    200 from the 34th second with a 4 s max_token_lifetime). It is accepted only while at most
    max_token_lifetime (+ leeway) of its life is left, so a revocation made while it is accepted outlives it."""
    cfg = config(issuer, leeway=30.0)
    keys, clock = StaticKeys(issuer), Clock()
    verifier = TokenVerifier([cfg], {cfg.name: keys}, clock=clock, max_lifetime=3600.0)
    now = int(clock.now)
    day = issuer.token({"exp": now + 86400}, omit=("iat",))
    assert (await refused(verifier, day)).reason == "not_yet_valid"
    clock.now = now + 86400 - 3600 - 29  # within leeway of its last hour
    assert (await verifier.verify(day)).exp == now + 86400
    clock.now = now
    hour = issuer.token({"exp": now + 3000}, omit=("iat",))  # an ordinary short-lived token: unchanged
    assert (await verifier.verify(hour)).exp == now + 3000
    unbounded = TokenVerifier([cfg], {cfg.name: keys}, clock=clock)  # no max_lifetime: exp alone
    assert (await unbounded.verify(day)).exp == now + 86400


async def test_a_new_key_generation_sends_cached_tokens_back_to_verification(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys = StaticKeys(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: keys})
    token = issuer.token()
    p = await verifier.verify(token)
    assert verifier.cached(token) is p
    keys.generation += 1  # the key source saw a key withdrawn
    assert verifier.cached(token) is None and token not in verifier._cache
    await verifier.verify(token)  # verified in full again (its key is still there) and cached again
    assert keys.calls == 2 and verifier.cached(token) is not None
    keys.keys.clear()  # now its key is gone too
    keys.generation += 1
    assert (await refused(verifier, token)).reason == "unknown_kid"


async def test_a_connections_memo_answers_its_last_token_as_the_cache_would(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys, clock = StaticKeys(issuer), Clock()
    verifier = TokenVerifier([cfg], {cfg.name: keys}, clock=clock)
    token, other = issuer.token(ttl=60), issuer.token(ttl=600)
    memo = TokenMemo()
    assert verifier.cached_header("Bearer " + token, memo) is None and memo.entry is None  # never verified
    p = await verifier.verify(token)
    hits = cache_hits()
    header = "Bearer " + token  # an equal string, not the same object: as each request brings
    assert verifier.cached_header(header, memo) is p and memo.header == header and cache_hits() == hits + 1
    verifier._cache.clear()  # the memo answers without the cache: the lookup is what it spares
    assert verifier.cached_header("Bearer " + token, memo) is p
    # Another token on the same connection: looked up (and not found, then found once verified).
    assert verifier.cached_header("Bearer " + other, memo) is None
    q = await verifier.verify(other)
    assert verifier.cached_header("Bearer " + other, memo) is q and memo.entry is not None
    # A reload's new verifier never takes the old one's entry.
    fresh = TokenVerifier([cfg], {cfg.name: keys}, clock=clock)
    assert fresh.cached_header("Bearer " + other, memo) is None
    # Checked as a cache hit is: a withdrawn key, and exp.
    assert verifier.cached_header("Bearer " + other, memo) is q
    keys.generation += 1
    assert verifier.cached_header("Bearer " + other, memo) is None and other not in verifier._cache
    await verifier.verify(other)
    assert verifier.cached_header("Bearer " + other, memo) is not None
    assert q.exp is not None
    clock.now = q.exp
    assert verifier.cached_header("Bearer " + other, memo) is None and memo.entry is None


async def test_failures_are_not_cached(issuer: DevIssuer) -> None:
    cfg = config(issuer, audiences=("https://elsewhere.example",))
    keys = StaticKeys(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: keys})
    token = issuer.token()
    for _ in range(3):
        assert (await refused(verifier, token)).reason == "wrong_audience"
    assert keys.calls == 3


async def test_cache_is_bounded(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys = StaticKeys(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: keys}, cache_size=2)
    t1, t2, t3 = (issuer.token() for _ in range(3))
    for t in (t1, t2, t3):
        await verifier.verify(t)
    await verifier.verify(t3)
    assert keys.calls == 3
    await verifier.verify(t1)  # evicted as least recently used
    assert keys.calls == 4


async def test_cache_gives_recently_used_tokens_a_second_chance(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys = StaticKeys(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: keys}, cache_size=2)
    hot, t2, t3, t4 = (issuer.token() for _ in range(4))
    await verifier.verify(hot)
    await verifier.verify(t2)
    await verifier.verify(hot)  # used: survives the next eviction although it is the oldest insertion
    await verifier.verify(t3)  # evicts t2
    assert verifier.cached(hot) is not None and verifier.cached(t2) is None
    await verifier.verify(t4)  # hot was used again: t3 goes
    assert verifier.cached(hot) is not None and verifier.cached(t3) is None
    assert len(verifier._cache) == 2 and keys.calls == 4


async def test_cache_stays_bounded_when_every_entry_is_hot(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: StaticKeys(issuer)}, cache_size=3)
    for _ in range(20):
        token = issuer.token()
        await verifier.verify(token)
        for t in list(verifier._cache):
            assert verifier.cached(t) is not None  # everything used: second chances are bounded anyway
        assert len(verifier._cache) <= 3


async def test_cached_is_synchronous_and_honours_exp(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    keys, clock = StaticKeys(issuer), Clock()
    verifier = TokenVerifier([cfg], {cfg.name: keys}, clock=clock)
    token = issuer.token(ttl=60)
    assert verifier.cached(token) is None  # never seen: the caller verifies
    p = await verifier.verify(token)
    hits = cache_hits()
    assert verifier.cached(token) is p and cache_hits() == hits + 1
    assert p.exp is not None
    clock.now = p.exp  # at exp the cache answers no more (leeway is for full verification only)
    assert verifier.cached(token) is None and token not in verifier._cache
    assert verifier.cached("Bearer " + token) is None and verifier.cached(token + " ") is None


async def test_refused_and_oversized_tokens_are_not_cached(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: StaticKeys(issuer)})
    await refused(verifier, issuer.token(ttl=-100))
    big = issuer.token({"pad": "x" * 9000})
    assert (await verifier.verify(big)).subject == issuer.subject
    assert not verifier._cache and verifier.cached(big) is None


async def test_token_hash_is_the_sha256_of_the_token(issuer: DevIssuer) -> None:
    cfg = config(issuer)
    verifier = TokenVerifier([cfg], {cfg.name: StaticKeys(issuer)})
    token = issuer.token()
    p = await verifier.verify(token)
    assert p.token_hash == hashlib.sha256(token.encode()).hexdigest()
    assert (await verifier.verify(token)).token_hash == p.token_hash


def test_verifier_needs_a_key_source_per_issuer(issuer: DevIssuer) -> None:
    with pytest.raises(ValueError, match="no key source"):
        TokenVerifier([config(issuer)], {})


# ----- bearer_token (RFC 6750 s2.1)

@pytest.mark.parametrize("header", ["Bearer abc.DEF-_~+/=", "bearer abc", "BEARER  abc", "Bearer abc=="])
def test_bearer_token_accepts(header: str) -> None:
    assert bearer_token(header) == header.split()[-1]


@pytest.mark.parametrize("header", [None, "", "Basic dXNlcjpwYXNz", "Token abc", "Bearerabc", "Bearer", "Bearer  ",
                                    "bearer\t"])
def test_bearer_token_missing(header: str | None) -> None:
    """RFC 6750 s3.1: no Bearer credential at all (another scheme, or the scheme alone) lacks the token."""
    with pytest.raises(errors.MissingToken):
        bearer_token(header)


@pytest.mark.parametrize("header", ["Bearer a b", "Bearer a=b", "Bearer ab\tc", "Bearer a,b", "Bearer a\u00e9"])
def test_bearer_token_malformed(header: str) -> None:
    with pytest.raises(errors.InvalidToken) as info:
        bearer_token(header)
    assert info.value.reason == "malformed"
