"""Revocation stores against a real redis-server: two store instances stand in for two replicas."""

from __future__ import annotations

import asyncio
import dataclasses
import json
import re
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import errors, metrics
from gateway.config_types import RevocationConfig
from gateway.model import Principal
from gateway.revocation import (
    MemoryRevocationStore,
    RedisRevocationStore,
    RevocationStore,
    create_store,
)
from tests.support.redis_server import RedisServer

PREFIX = "gw:revoked:"
LIFETIME = 3600.0


def principal(
    *, jti: str | None = "j-1", sub: str | None = "alice", sid: str | None = None,
    iat: int | None = None, issuer: str = "customers", exp: int | None = None,
) -> Principal:
    now = int(time.time())
    return Principal(
        issuer=issuer, iss=f"https://login.example.com/{issuer}", subject=sub, scopes=frozenset({"a"}),
        roles=(), tenant=None, session=sid, jti=jti, iat=now - 10 if iat is None else iat,
        exp=now + 300 if exp is None else exp, aud=("api",),
    )


def config(url: str = "redis://127.0.0.1:1/0", *, on_error: str = "deny", backend: str = "redis") -> RevocationConfig:
    return RevocationConfig(
        backend=backend, redis_url=url, key_prefix=PREFIX, on_backend_error=on_error,
        max_token_lifetime=LIFETIME,
    )


def counter(result: str) -> float:
    text = metrics.render()[0].decode()
    m = re.search(rf'^gateway_revocation_checks_total\{{result="{result}"\}} (\S+)$', text, re.M)
    return float(m.group(1)) if m else 0.0


async def is_revoked(store: RevocationStore, p: Principal) -> bool:
    try:
        await store.check(p)
    except errors.InvalidToken as exc:
        assert exc.reason == "revoked" and exc.status == 401 and exc.issuer == p.issuer
        return True
    return False


async def until(pred: Callable[[], Awaitable[bool]], within: float) -> float:
    """Seconds until pred() holds, polling every 5 ms; fails the test past `within`."""
    t0 = time.monotonic()
    while not await pred():
        if time.monotonic() - t0 > within:
            pytest.fail(f"condition not reached within {within}s")
        await asyncio.sleep(0.005)
    return time.monotonic() - t0


MakeStore = Callable[..., Awaitable[RedisRevocationStore]]


@pytest.fixture
async def make_store(redis_server: RedisServer) -> AsyncIterator[MakeStore]:
    stores: list[RedisRevocationStore] = []

    async def make(on_error: str = "deny", clock: Callable[[], float] = time.time) -> RedisRevocationStore:
        store = RedisRevocationStore(config(redis_server.url, on_error=on_error), clock=clock)
        stores.append(store)
        await store.start()
        assert store.ready() and store.backend_up
        return store

    yield make
    for store in stores:
        await store.close()


@pytest.fixture
async def rdb(redis_server: RedisServer) -> AsyncIterator[aioredis.Redis]:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    yield client
    await client.aclose()


async def test_jti_revoked_on_one_replica_is_refused_by_the_other_within_a_second(
    make_store: MakeStore, rdb: aioredis.Redis
) -> None:
    a, b = await make_store(), await make_store()
    token = principal(jti="leaked")
    assert not await is_revoked(b, token)
    t0 = time.monotonic()
    record = await a.revoke("jti", "leaked", None, exp=token.exp)
    assert record["key"] == f"{PREFIX}jti:leaked" and record["stored"] == "1"
    assert await is_revoked(a, token)  # the writer refuses at once
    elapsed = await until(lambda: is_revoked(b, token), within=1.0)
    assert time.monotonic() - t0 < 1.0, elapsed
    assert not await is_revoked(b, principal(jti="other", sub="bob"))
    # Steady state answers from the local view: not one MGET reached Redis for all these checks.
    stats = await rdb.info("commandstats")
    assert "cmdstat_mget" not in stats


async def test_subject_revocation_refuses_tokens_issued_at_or_before_t(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    record = await a.revoke("subject", "alice", "customers")
    t = record["at"]
    assert record["key"] == f"{PREFIX}sub:customers:alice" and record["stored"] == str(t)
    older, same, newer = (principal(jti=None, iat=i) for i in (t - 100, t, t + 1))
    await until(lambda: is_revoked(b, older), within=1.0)
    assert await is_revoked(b, same)
    assert not await is_revoked(b, newer)
    assert await is_revoked(b, dataclasses.replace(newer, iat=None))  # no iat: cannot prove it is newer
    assert not await is_revoked(b, principal(jti=None, sub="bob", iat=t - 100))
    assert not await is_revoked(b, principal(jti=None, issuer="employees", iat=t - 100))


async def test_session_revocation(make_store: MakeStore) -> None:
    a, b = await make_store(), await make_store()
    record = await a.revoke("session", "s-42", "customers")
    t = record["at"]
    assert record["key"] == f"{PREFIX}sid:customers:s-42"
    in_session = principal(jti=None, sid="s-42", iat=t - 5)
    await until(lambda: is_revoked(b, in_session), within=1.0)
    assert not await is_revoked(b, principal(jti=None, sid="s-43", iat=t - 5))
    assert not await is_revoked(b, principal(jti=None, sid="s-42", iat=t + 1))


async def test_keys_carry_the_specified_ttls(make_store: MakeStore, rdb: aioredis.Redis) -> None:
    a = await make_store()
    now = int(time.time())
    assert (await a.revoke("jti", "short", None, exp=now + 120))["ttl"] in (119, 120, 121)
    await a.revoke("jti", "no-exp", None)
    await a.revoke("subject", "alice", "customers")
    await a.revoke("session", "s-1", "customers")
    assert 115 <= await rdb.ttl(f"{PREFIX}jti:short") <= 121
    assert LIFETIME - 5 <= await rdb.ttl(f"{PREFIX}jti:no-exp") <= LIFETIME
    assert LIFETIME - 5 <= await rdb.ttl(f"{PREFIX}sub:customers:alice") <= LIFETIME
    assert LIFETIME - 5 <= await rdb.ttl(f"{PREFIX}sid:customers:s-1") <= LIFETIME
    assert await rdb.get(f"{PREFIX}jti:short") == "1"
    assert abs(int(await rdb.get(f"{PREFIX}sub:customers:alice") or 0) - now) <= 2


async def test_published_message_has_the_spec_shape(make_store: MakeStore, redis_server: RedisServer) -> None:
    a = await make_store()
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    pubsub = client.pubsub()
    try:
        await pubsub.subscribe(f"{PREFIX}events")
        assert (await pubsub.get_message(timeout=1))["type"] == "subscribe"
        record = await a.revoke("session", "s-9", "customers")
        msg = await pubsub.get_message(timeout=1)
        assert json.loads(msg["data"]) == {"type": "session", "value": "s-9", "issuer": "customers",
                                           "at": record["at"]}
    finally:
        await pubsub.aclose()
        await client.aclose()


async def test_a_write_from_another_system_is_honoured(make_store: MakeStore, rdb: aioredis.Redis) -> None:
    b = await make_store()
    t = int(time.time())
    await rdb.set(f"{PREFIX}jti:foreign", "1", ex=600)
    await rdb.set(f"{PREFIX}sub:customers:mallory", str(t), ex=600)
    await rdb.publish(f"{PREFIX}events", json.dumps({"type": "jti", "value": "foreign", "issuer": None, "at": t}))
    await rdb.publish(f"{PREFIX}events", json.dumps(
        {"type": "subject", "value": "mallory", "issuer": "customers", "at": t}))
    await until(lambda: is_revoked(b, principal(jti="foreign", sub="x")), within=1.0)
    await until(lambda: is_revoked(b, principal(jti=None, sub="mallory", iat=t)), within=1.0)
    assert not await is_revoked(b, principal(jti=None, sub="mallory", iat=t + 1))


async def test_garbage_message_triggers_a_resync_not_a_crash(make_store: MakeStore, rdb: aioredis.Redis) -> None:
    a, b = await make_store(), await make_store()
    # Written with no message: the live view cannot know of it until it rebuilds from the keys.
    await rdb.set(f"{PREFIX}jti:silent", "1", ex=600)
    await rdb.publish(f"{PREFIX}events", b"\xff not json {")
    await until(lambda: is_revoked(b, principal(jti="silent")), within=1.0)
    await until(lambda: asyncio.sleep(0, b.ready()), within=1.0)
    # The subscription still works afterwards.
    await a.revoke("jti", "later", None)
    await until(lambda: is_revoked(b, principal(jti="later")), within=1.0)


async def test_redis_down_denies_with_deny_and_passes_with_allow(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    deny, allow = await make_store("deny"), await make_store("allow")
    redis_server.stop()
    # Both notice the dead subscription quickly and stop trusting their views.
    await until(lambda: asyncio.sleep(0, not deny.ready() and not allow.ready()), within=1.5)
    assert not deny.backend_up and "gateway_revocation_backend_up 0.0" in metrics.render()[0].decode()
    denied, allowed = counter("backend_error_denied"), counter("backend_error_allowed")
    with pytest.raises(errors.BackendUnavailable) as info:
        await deny.check(principal())
    assert info.value.status == 503 and info.value.code == "temporarily_unavailable"
    await allow.check(principal())
    await allow.check(principal())
    assert counter("backend_error_denied") == denied + 1
    assert counter("backend_error_allowed") == allowed + 2
    # A watcher's look (an open session or long request): no verdict, and not counted as a request.
    ok = counter("ok")
    assert await deny.revoked(principal()) is None and await allow.revoked(principal()) is None
    assert (counter("backend_error_denied"), counter("backend_error_allowed"), counter("ok")) == (
        denied + 1, allowed + 2, ok)
    with pytest.raises(errors.BackendUnavailable):
        await deny.revoke("jti", "x", None)


async def test_a_view_that_is_not_live_is_not_trusted_redis_answers_directly(
    redis_server: RedisServer, rdb: aioredis.Redis
) -> None:
    store = RedisRevocationStore(config(redis_server.url))  # never started: no subscription, no view
    try:
        assert not store.ready()
        t = int(time.time())
        await rdb.set(f"{PREFIX}jti:direct", "1", ex=60)
        await rdb.set(f"{PREFIX}sid:customers:s-d", str(t), ex=60)
        assert await is_revoked(store, principal(jti="direct"))
        assert await is_revoked(store, principal(jti=None, sid="s-d", iat=t))
        assert not await is_revoked(store, principal(jti=None, sid="s-d", iat=t + 1))
        assert not await is_revoked(store, principal(jti="fine", sid="s-other"))
        assert "cmdstat_mget" in await rdb.info("commandstats")
        counts = counter("ok"), counter("revoked")
        assert await store.revoked(principal(jti="direct")) is True
        assert await store.revoked(principal(jti=None, sid="s-d", iat=t + 1)) is False
        assert (counter("ok"), counter("revoked")) == counts  # a watcher's looks count nothing
    finally:
        await store.close()


async def test_check_against_a_hung_redis_is_bounded(make_store: MakeStore, redis_server: RedisServer) -> None:
    import os
    import signal

    store = await make_store("deny")
    assert redis_server.proc is not None
    os.kill(redis_server.proc.pid, signal.SIGSTOP)  # alive but silent: only the missing PONGs tell
    try:
        await until(lambda: asyncio.sleep(0, not store.ready()), within=2.0)
        t0 = time.monotonic()
        results = await asyncio.gather(*(store.check(principal()) for _ in range(50)), return_exceptions=True)
        assert all(isinstance(r, errors.BackendUnavailable) for r in results)
        assert time.monotonic() - t0 < 0.6  # one short Redis timeout, not 50 of them in a row
        t0 = time.monotonic()
        with pytest.raises(errors.BackendUnavailable):
            await store.check(principal())
        assert time.monotonic() - t0 < 0.5
    finally:
        os.kill(redis_server.proc.pid, signal.SIGCONT)
    await until(lambda: asyncio.sleep(0, store.ready()), within=3.0)


async def test_recovers_after_restart_and_honours_what_was_written_while_away(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    store = await make_store("deny")
    redis_server.stop()
    await until(lambda: asyncio.sleep(0, not store.ready()), within=1.5)
    # Same port; a password keeps the store out until the revocation is written, so "while it was
    # away" holds by construction rather than by timing.
    redis_server.start("--requirepass", "hold")
    admin = aioredis.Redis.from_url(redis_server.url, password="hold")
    try:
        await admin.set(f"{PREFIX}jti:while-away", "1", ex=600)
        await admin.set(f"{PREFIX}sid:customers:s-away", str(int(time.time())), ex=600)
        with pytest.raises(errors.BackendUnavailable):
            await store.check(principal(jti="anything"))
        await admin.config_set("requirepass", "")
    finally:
        await admin.aclose()
    recovered = await until(lambda: asyncio.sleep(0, store.ready()), within=3.0)
    assert recovered < 2.5
    assert "gateway_revocation_backend_up 1.0" in metrics.render()[0].decode()
    assert await is_revoked(store, principal(jti="while-away"))
    assert await is_revoked(store, principal(jti=None, sid="s-away"))
    assert not await is_revoked(store, principal(jti="fine"))


async def test_revocation_written_while_the_subscription_was_down_is_not_missed(
    make_store: MakeStore, rdb: aioredis.Redis
) -> None:
    b = await make_store()
    # Atomically: drop every subscription and write with no message (it would reach nobody anyway).
    pipe = rdb.pipeline(transaction=True)
    pipe.client_kill_filter(_type="pubsub")
    pipe.set(f"{PREFIX}jti:in-the-gap", "1", ex=600)
    await pipe.execute()
    await until(lambda: is_revoked(b, principal(jti="in-the-gap")), within=1.0)
    await until(lambda: asyncio.sleep(0, b.ready()), within=2.0)
    assert await is_revoked(b, principal(jti="in-the-gap"))


async def test_view_drops_expired_jti_entries(make_store: MakeStore) -> None:
    now = [time.time()]
    store = await make_store(clock=lambda: now[0])
    exp = int(now[0]) + 30
    await store.revoke("jti", "short-lived", None, exp=exp)
    assert await is_revoked(store, principal(jti="short-lived"))
    await asyncio.sleep(0.3)  # let our own message come back before time jumps (the key's TTL is real time)
    now[0] = exp + 1
    assert not await is_revoked(store, principal(jti="short-lived"))
    await until(lambda: asyncio.sleep(0, "short-lived" not in store._view.jti), within=1.0)


async def test_memory_backend() -> None:
    now = [1_700_000_000.0]
    store = create_store(config(backend="memory"), clock=lambda: now[0])
    assert isinstance(store, MemoryRevocationStore)
    await store.start()
    assert store.ready() and store.backend_up
    rec = await store.revoke("jti", "m-1", None, exp=int(now[0]) + 60)
    assert rec["ttl"] == 60 and rec["key"] == f"{PREFIX}jti:m-1"
    assert await is_revoked(store, principal(jti="m-1"))
    t = (await store.revoke("subject", "alice", "customers"))["at"]
    assert await is_revoked(store, principal(jti=None, iat=t))
    assert not await is_revoked(store, principal(jti=None, iat=t + 1))
    await store.revoke("session", "s-1", "customers")
    assert await is_revoked(store, principal(jti=None, sub="bob", sid="s-1", iat=t))
    now[0] += 61
    await store.revoke("jti", "m-2", None)  # writes purge what has expired: memory stays bounded
    assert not await is_revoked(store, principal(jti="m-1", sub="bob"))
    assert "m-1" not in store._view.jti
    now[0] += LIFETIME
    await store.revoke("jti", "m-3", None)
    assert not store._view.sub and not store._view.sid
    await store.close()


@pytest.mark.parametrize(
    ("kind", "value", "issuer"),
    [("user", "x", None), ("jti", "", None), ("subject", "alice", None), ("session", "s", "a:b"),
     # no UTF-8 form (JSON "\ud800", argv bytes that are not UTF-8): no Redis key can hold it
     ("jti", "x\ud800", None), ("subject", "alice\udcff", "customers"), ("session", "s", "cust\ud800")],
)
async def test_revoke_rejects_bad_input(kind: str, value: str, issuer: Any) -> None:
    store = MemoryRevocationStore(config(backend="memory"))
    with pytest.raises(ValueError):
        await store.revoke(kind, value, issuer)


def local_answer(store: RevocationStore, p: Principal) -> str:
    """check_local's answer: 'revoked', 'ok', or 'ask' (the caller must await check())."""
    try:
        return "ok" if store.check_local(p) else "ask"
    except errors.InvalidToken as exc:
        assert exc.reason == "revoked"
        return "revoked"


async def test_check_local_answers_from_a_live_view_and_counts(make_store: MakeStore) -> None:
    store = await make_store()
    ok, revoked = counter("ok"), counter("revoked")
    assert local_answer(store, principal(jti="l-1")) == "ok"
    await store.revoke("jti", "l-1", None)
    assert local_answer(store, principal(jti="l-1")) == "revoked"
    assert counter("ok") == ok + 1 and counter("revoked") == revoked + 1


async def test_check_local_defers_to_redis_when_the_view_is_not_live(
    redis_server: RedisServer, rdb: aioredis.Redis
) -> None:
    store = RedisRevocationStore(config(redis_server.url))  # never started: the view is not trusted
    try:
        await rdb.set(f"{PREFIX}jti:direct-2", "1", ex=60)
        assert local_answer(store, principal(jti="direct-2")) == "ask"
        assert await is_revoked(store, principal(jti="direct-2"))
    finally:
        await store.close()


async def test_memory_check_local_always_answers() -> None:
    store = MemoryRevocationStore(config(backend="memory"))
    assert local_answer(store, principal(jti="m-9")) == "ok"
    await store.revoke("jti", "m-9", None)
    assert local_answer(store, principal(jti="m-9")) == "revoked"


# -- Redis losing keys: what a replica knew stays, and is written back -----------------------------------------

async def test_what_the_view_knows_is_refused_while_redis_is_down_whatever_the_policy(
    make_store: MakeStore, redis_server: RedisServer
) -> None:
    deny, allow = await make_store("deny"), await make_store("allow")
    for store in (deny, allow):
        await store.revoke("jti", "known", None)
    redis_server.stop()
    await until(lambda: asyncio.sleep(0, not deny.ready() and not allow.ready()), within=1.5)
    denied, allowed = counter("backend_error_denied"), counter("backend_error_allowed")
    for store in (deny, allow):
        assert await is_revoked(store, principal(jti="known"))  # 401, not 503 nor a pass
        assert await store.revoked(principal(jti="known")) is True  # a watcher's look too
    assert (counter("backend_error_denied"), counter("backend_error_allowed")) == (denied, allowed)
    with pytest.raises(errors.BackendUnavailable):
        await deny.check(principal(jti="unknown"))


async def test_a_later_t_is_written_over_an_earlier_one_and_an_equal_or_later_one_is_left(
    make_store: MakeStore, rdb: aioredis.Redis
) -> None:
    store = await make_store()
    t = (await store.revoke("session", "s-lag", "customers"))["at"]
    await store.revoke("session", "s-later", "customers")
    lag, later = f"{PREFIX}sid:customers:s-lag", f"{PREFIX}sid:customers:s-later"
    # A failover to a replica that lags: the key holds an older revocation of the same session.
    await rdb.set(lag, str(t - 100), ex=60)
    await rdb.set(later, str(t + 100), ex=60)
    await rdb.publish(f"{PREFIX}events", b"not json")  # makes the store resync now
    await until(lambda: _holds(rdb, lag, str(t)), within=1.0)
    assert LIFETIME - 5 <= await rdb.ttl(lag) <= LIFETIME
    assert await rdb.get(later) == str(t + 100) and await rdb.ttl(later) <= 60
    assert await is_revoked(store, principal(jti=None, sid="s-later", iat=t + 100))


async def _holds(rdb: aioredis.Redis, key: str, value: str) -> bool:
    return bool(await rdb.get(key) == value)


async def test_keys_lost_without_a_reconnect_are_written_back_by_the_periodic_resync(
    make_store: MakeStore, rdb: aioredis.Redis, monkeypatch: pytest.MonkeyPatch
) -> None:
    """FLUSHDB, eviction, or a DEL: the subscription stays up, so only the periodic resync can notice. A
    deliberate DEL comes back too while the revocation lives (README: a revocation cannot be withdrawn)."""
    monkeypatch.setattr("gateway.revocation.RESYNC_EVERY", 0.2)
    store = await make_store()
    exp = int(time.time()) + 300
    await store.revoke("jti", "flushed", None, exp=exp)
    t = (await store.revoke("subject", "alice", "customers"))["at"]
    await rdb.flushdb()
    await until(lambda: _holds(rdb, f"{PREFIX}sub:customers:alice", str(t)), within=2.0)
    await until(lambda: _holds(rdb, f"{PREFIX}jti:flushed", "1"), within=2.0)
    assert 290 <= await rdb.ttl(f"{PREFIX}jti:flushed") <= 300  # the life it had left
    later = await make_store()  # a replica started afterwards learns them from Redis
    assert await is_revoked(later, principal(jti="flushed", sub="bob"))
    assert await is_revoked(later, principal(jti=None, iat=t))
