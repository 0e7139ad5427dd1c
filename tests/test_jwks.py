"""JwksCache against a real DevIssuer over HTTP: discovery, refetch, cooldown, keep-last-good, max-age."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import aiohttp
import pytest

from gateway import metrics
from gateway.config_types import IssuerConfig
from gateway.devissuer import ALGORITHMS, DevIssuer, generate_key, public_jwk
from gateway.errors import InvalidToken
from gateway.jwks import JwksCache, parse_max_age
from gateway.tokens import TokenVerifier
from tests.support.issuer import issuer_config


class Clock:
    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def sample(name: str, **labels: str) -> float:
    """A sample's value from the exposition text (0 when absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.render()[0].decode().splitlines():
        if line.startswith(f"{name}{{") and line.split("{", 1)[1].split("}", 1)[0] == want:
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def config(dev: DevIssuer, /, **overrides: Any) -> IssuerConfig:
    return issuer_config(dev, **overrides)


CacheFactory = Callable[..., Awaitable[JwksCache]]


@pytest.fixture
async def make_cache() -> AsyncIterator[CacheFactory]:
    caches: list[JwksCache] = []
    session = aiohttp.ClientSession()

    async def make(cfg: IssuerConfig, start: bool = True, **kwargs: Any) -> JwksCache:
        cache = JwksCache(cfg, session, **kwargs)
        caches.append(cache)
        if start:
            await cache.start()
        return cache

    yield make
    for cache in caches:
        await cache.close()
    await session.close()


async def test_discovery_then_keys(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    cfg = config(issuer)
    cache = await make_cache(cfg)
    assert cache.ready and cache.key_count == len(ALGORITHMS)
    assert (issuer.discovery_hits, issuer.jwks_hits) == (1, 1)
    for alg in ALGORITHMS:
        key = await cache.key_for(issuer.kid(alg))
        assert key is not None and key.algorithm_name == alg and key.key_id == issuer.kid(alg)
    assert issuer.jwks_hits == 1  # known kids never fetch
    assert sample("gateway_jwks_refresh_total", issuer=cfg.name, result="ok") == 1
    assert sample("gateway_jwks_keys", issuer=cfg.name) == len(ALGORITHMS)


async def test_explicit_jwks_uri_skips_discovery(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    cache = await make_cache(config(issuer, jwks_uri=issuer.jwks_uri))
    assert cache.ready and issuer.discovery_hits == 0 and issuer.jwks_hits == 1


async def test_keys_outside_allowlist_are_not_kept(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    cache = await make_cache(config(issuer, algorithms=("RS256",)))
    assert cache.key_count == 1
    assert await cache.key_for(issuer.kid("RS256")) is not None


async def test_discovery_issuer_mismatch_is_refused(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    # OIDC Discovery s4.3: the document must name exactly the configured issuer.
    cfg = config(issuer, issuer=issuer.url + "/")
    cache = await make_cache(cfg)
    assert not cache.ready and cache.key_count == 0
    assert sample("gateway_jwks_refresh_total", issuer=cfg.name, result="error") == 1


async def test_unknown_kid_single_flight_and_cooldown(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    clock = Clock()
    cache = await make_cache(config(issuer, jwks_min_refetch=30.0), clock=clock)
    assert issuer.jwks_hits == 1
    new_kid = issuer.rotate("RS256")
    issuer.delay = 0.05  # keep the fetch in flight while all 50 lookups arrive
    found = await asyncio.gather(*(cache.key_for(new_kid) for _ in range(50)))
    assert all(k is not None and k.key_id == new_kid for k in found)
    assert issuer.jwks_hits == 2  # exactly one fetch for 50 concurrent waiters

    # Inside the cooldown an unknown kid is refused without any fetch, however many ask.
    clock.now += 29
    missing = await asyncio.gather(*(cache.key_for("no-such-kid") for _ in range(50)))
    assert missing == [None] * 50 and issuer.jwks_hits == 2

    clock.now += 2  # cooldown over: one more fetch, shared again
    missing = await asyncio.gather(*(cache.key_for("no-such-kid") for _ in range(50)))
    assert missing == [None] * 50 and issuer.jwks_hits == 3
    assert await cache.key_for("no-such-kid") is None and issuer.jwks_hits == 3


async def test_generation_grows_only_when_a_key_is_withdrawn(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    clock = Clock()
    cache = await make_cache(config(issuer, jwks_min_refetch=1.0), clock=clock)
    assert cache.generation == 0
    added = issuer.rotate("RS256")  # the old key stays published: a superset, nothing withdrawn
    assert await cache.key_for(added) is not None and cache.generation == 0
    clock.now += 2
    assert await cache.key_for("unknown") is None and issuer.jwks_hits == 3  # the same set again
    assert cache.generation == 0
    clock.now += 2
    replaced = issuer.rotate("ES256", drop_old=True)  # an ES256 key withdrawn
    assert await cache.key_for(replaced) is not None and cache.generation == 1
    clock.now += 2
    issuer.down = True  # a failed fetch keeps the keys, and the generation
    assert await cache.key_for("unknown-2") is None and cache.generation == 1


async def test_issuer_down_keeps_known_keys(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    clock = Clock()
    cfg = config(issuer)
    cache = await make_cache(cfg, clock=clock)
    issuer.down = True
    clock.now += 3600
    assert await cache.key_for("rotated-away") is None  # refetch tried, answered 503
    assert issuer.jwks_hits == 2
    assert sample("gateway_jwks_refresh_total", issuer=cfg.name, result="error") == 1
    await issuer.stop()  # and now nothing listens at all
    clock.now += 3600
    assert await cache.key_for("rotated-away-again") is None
    assert cache.ready and cache.key_count == len(ALGORITHMS)
    for alg in ALGORITHMS:
        assert await cache.key_for(issuer.kid(alg)) is not None


@pytest.mark.parametrize("body", [b"<html>oops</html>", b'{"keys": "x"}', b"[]", b'{"no": "keys"}', b"{"])
async def test_garbage_jwks_keeps_old_keys(issuer: DevIssuer, make_cache: CacheFactory, body: bytes) -> None:
    clock = Clock()
    cache = await make_cache(config(issuer), clock=clock)
    issuer.jwks_body = body
    clock.now += 3600
    assert await cache.key_for("hmac") is None
    assert issuer.jwks_hits == 2 and cache.key_count == len(ALGORITHMS)
    assert await cache.key_for(issuer.kid("ES256")) is not None


@pytest.mark.parametrize("body", [b'{"keys": []}', b'{"keys": [{"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"}]}'])
async def test_a_well_formed_set_without_a_usable_key_withdraws_every_key(
        issuer: DevIssuer, make_cache: CacheFactory, body: bytes) -> None:
    """Not a failed fetch: the issuer says none of its keys signs any more (say, all leaked). Kept out as
    garbage, the leaked keys would go on verifying tokens, cached or not."""
    clock = Clock()
    cfg = config(issuer)
    cache = await make_cache(cfg, clock=clock)
    verifier = TokenVerifier([cfg], {cfg.name: cache}, clock=time.time)
    leaked = issuer.token({"sub": "mallory"}, ttl=3600)
    assert (await verifier.verify(leaked)).subject == "mallory"
    issuer.jwks_body = body
    clock.now += 3600
    assert await cache.key_for("anything") is None and cache.key_count == 0 and cache.generation == 1
    assert sample("gateway_jwks_keys", issuer=cfg.name) == 0
    assert verifier.cached(leaked) is None  # the cached token is verified again, and refused
    with pytest.raises(InvalidToken) as info:
        await verifier.verify(leaked)
    assert info.value.reason == "unknown_kid"


async def test_ready_only_once_a_fetch_gave_a_usable_key(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    """A start against an empty set (or an `algorithms` list that fits none of the issuer's keys) is not
    ready: /readyz must not send traffic to a replica refusing every token. A later withdrawal does not
    unset it (the other issuers' traffic is not taken out with this one's)."""
    clock = Clock()
    issuer.jwks_body = b'{"keys": []}'
    cache = await make_cache(config(issuer, jwks_min_refetch=1.0), clock=clock)
    assert not cache.ready and cache.key_count == 0
    wrong = await make_cache(config(issuer, algorithms=("ES512",)))  # the dev issuer publishes no ES512 key
    assert not wrong.ready
    issuer.jwks_body = None
    clock.now += 2
    assert await cache.key_for(issuer.kid("RS256")) is not None and cache.ready
    issuer.jwks_body = b'{"keys": []}'
    clock.now += 2
    assert await cache.key_for("unknown") is None and cache.key_count == 0 and cache.ready


async def test_unusable_members_are_skipped(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    good = issuer.jwks()["keys"][0]
    issuer.jwks_body = json.dumps({"keys": [
        good,
        {"kty": "oct", "k": "c2VjcmV0", "kid": "hmac"},
        {"kty": "XYZ", "kid": "weird"},
        {"kty": "EC", "crv": "P-999", "x": "AA", "y": "AA", "kid": "bad-curve"},
        {**public_jwk(generate_key("ES256"), kid="enc", alg="ES256"), "use": "enc"},
        {"kty": "RSA", "kid": "no-modulus", "e": "AQAB"},
        {**public_jwk(generate_key("ES256"), kid="wrap", alg="ES256"), "key_ops": ["encrypt", "wrapKey"]},
        {**public_jwk(generate_key("ES256"), kid="ops-text", alg="ES256"), "key_ops": "verify"},
        {**public_jwk(generate_key("ES256"), kid="verify", alg="ES256"), "key_ops": ["verify"]},
        "not-an-object",
    ]}).encode()
    cache = await make_cache(config(issuer))
    assert cache.ready and cache.key_count == 2  # RFC 7517 s4.3: key_ops, when given, must allow "verify"
    assert await cache.key_for(good["kid"]) is not None
    assert await cache.key_for("verify") is not None
    assert await cache.key_for("wrap") is None


async def test_rotation_at_issuer_is_picked_up(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    clock = Clock()
    cache = await make_cache(config(issuer), clock=clock)
    old = issuer.kid("ES256")
    new = issuer.rotate("ES256", drop_old=True)
    key = await cache.key_for(new)
    assert key is not None and key.key_id == new
    clock.now += 3600
    assert await cache.key_for(old) is None  # a good fetch replaced the set: the old key is gone


async def test_kid_less_lookup_needs_exactly_one_fitting_key(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    cache = await make_cache(config(issuer))
    only = await cache.key_for(None, "ES384")
    assert only is not None and only.key_id == issuer.kid("ES384")
    issuer.rotate("ES384")  # two ES384 keys published: ambiguous
    clock_cache = await make_cache(config(issuer))
    assert await clock_cache.key_for(None, "ES384") is None
    assert await cache.key_for(None, None) is None  # five keys: no guessing


@pytest.mark.parametrize(
    ("max_age", "expected"),
    [(None, 600.0), (120, 120.0), (5, 60.0), (0, 60.0), (10**7, 86400.0)],
)
async def test_max_age_honoured_and_clamped(
    issuer: DevIssuer, make_cache: CacheFactory, max_age: int | None, expected: float
) -> None:
    issuer.max_age = max_age
    cache = await make_cache(config(issuer, jwks_refresh=600.0))
    assert cache.next_refresh_in == expected


def test_parse_max_age() -> None:
    assert parse_max_age("public, max-age=300") == 300
    assert parse_max_age('max-age="42", must-revalidate') == 42
    assert parse_max_age("s-maxage=10") is None
    assert parse_max_age("no-store, max-age=300") is None
    assert parse_max_age(None) is None


async def test_background_refresh_runs(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    await make_cache(config(issuer, jwks_refresh=0.05))
    deadline = time.monotonic() + 5
    while issuer.jwks_hits < 3 and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert issuer.jwks_hits >= 3


async def test_start_failure_is_retried_with_backoff(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    issuer.down = True
    cfg = config(issuer)
    cache = await make_cache(cfg, retry_backoff=(0.05, 0.2))  # start() does not raise
    assert not cache.ready and cache.key_count == 0
    assert await cache.key_for(issuer.kid()) is None
    issuer.down = False
    deadline = time.monotonic() + 5
    while not cache.ready and time.monotonic() < deadline:
        await asyncio.sleep(0.02)
    assert cache.ready and await cache.key_for(issuer.kid()) is not None
    assert sample("gateway_jwks_refresh_total", issuer=cfg.name, result="error") >= 2


async def test_fetch_timeout(issuer: DevIssuer, make_cache: CacheFactory) -> None:
    issuer.delay = 1.0
    started = time.monotonic()
    cache = await make_cache(config(issuer, jwks_uri=issuer.jwks_uri), fetch_timeout=0.2)
    assert time.monotonic() - started < 0.9
    assert not cache.ready
