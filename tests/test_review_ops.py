"""Review of the operations side: revocation store, admin API, key store, config reading, reload."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway import errors, revocation
from gateway.config import load_text
from gateway.config_types import RevocationConfig
from gateway.devissuer import DevIssuer
from gateway.errors import ConfigError
from gateway.model import Principal
from gateway.revocation import RedisRevocationStore
from tests.support.gateway import RunningGateway, config_text
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream
from tests.test_config import MINIMAL as BASE
from tests.test_revocation_e2e import ADMIN, PATH, PREFIX, ROUTES, USER


def gateway_yaml(issuer: DevIssuer, upstream: EchoUpstream, redis_url: str, *, lifetime: str = "2h") -> str:
    revocation = (f"revocation: {{backend: redis, redis_url: '{redis_url}', key_prefix: '{PREFIX}', "
                  f"max_token_lifetime: {lifetime}}}")
    return config_text(issuer.url, {"orders": [upstream.url]}, ROUTES, revocation=revocation)


async def admin_post(gw: RunningGateway, token: str, raw: bytes) -> tuple[int, Any]:
    headers = {"Content-Type": "application/json", "Authorization": f"Bearer {token}"}
    async with gw.session.post(gw.admin_url + "/admin/revocations", data=raw, headers=headers) as r:
        return r.status, await r.json(content_type=None)


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
             gateway_factory: Any) -> AsyncIterator[RunningGateway]:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)) as running:
        yield running


# -- the admin API: bodies that must be a clear 400 ------------------------------------------------------------

@pytest.mark.parametrize("raw", [
    b'{"type": "jti", "value": "x", "exp": 1' + b"0" * 400 + b"}",  # an int no float can hold
    b'{"type": "jti", "value": "x", "exp": -' + b"9" * 400 + b"}",
])
async def test_admin_revocation_with_an_absurd_exp_is_a_400_not_a_500(gw: RunningGateway, issuer: DevIssuer,
                                                                       raw: bytes) -> None:
    status, body = await admin_post(gw, issuer.token(ADMIN), raw)
    assert status == 400 and body["error"] == "invalid_request", body


# -- revoked stays revoked while the gateway still accepts the token (exp + leeway) ------------------------------

async def test_a_revoked_jti_is_not_accepted_again_within_the_issuers_leeway(
    gw: RunningGateway, issuer: DevIssuer
) -> None:
    # exp a few seconds ago: still accepted, because the issuer allows 30 s of clock leeway.
    now = int(time.time())
    token = issuer.token({**USER, "jti": "late-1", "iat": now - 60, "nbf": now - 60, "exp": now - 3})
    assert (await gw.request("GET", PATH, token=token))[0] == 200
    raw = json.dumps({"type": "jti", "value": "late-1", "exp": now - 3}).encode()
    status, body = await admin_post(gw, issuer.token(ADMIN), raw)
    assert status == 201, body
    assert (await gw.request("GET", PATH, token=token))[0] == 401
    await asyncio.sleep(2.2)  # a TTL that only reached exp would have run out by now
    assert (await gw.request("GET", PATH, token=token))[0] == 401




# -- config: ${VAR} values are typed like a plain scalar, never parsed as YAML documents --------------------------

MINIMAL = BASE + """\
revocation:
  key_prefix: ${GW_PREFIX}
  redis_url: ${GW_REDIS_URL:-redis://127.0.0.1:6379/0}
server:
  workers: ${GW_WORKERS:-2}
"""


@pytest.mark.parametrize("value", ["gw:revoked:", "[prod", "*anchor", "{a", "a: b", "- x", "p #x"])
def test_an_environment_value_is_the_string_it_holds(monkeypatch: pytest.MonkeyPatch, value: str) -> None:
    monkeypatch.setenv("GW_PREFIX", value)
    c = load_text(MINIMAL, "gw.yaml")
    assert c.revocation.key_prefix == value
    assert c.server.workers == 2  # still typed as YAML would type the plain scalar


def test_an_environment_value_of_the_wrong_type_names_file_line_and_key(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("GW_PREFIX", "p:")
    monkeypatch.setenv("GW_WORKERS", "[1, 2]")
    with pytest.raises(ConfigError) as info:
        load_text(MINIMAL, "gw.yaml")
    assert info.value.problems == ["gw.yaml:16: server.workers: expected a whole number, got '[1, 2]'"]


def test_a_claim_written_twice_in_auth_claims_is_a_duplicate_key() -> None:
    text = MINIMAL.split("revocation:")[0] + "    auth: {claims: {tenant: acme, tenant: globex}}\n"
    with pytest.raises(ConfigError) as info:
        load_text(text, "gw.yaml")
    assert info.value.problems == ["gw.yaml:12: routes[0].auth.claims.tenant: duplicate key"]


# -- a key written to Redis with no message (README: "picked up at the next resync") --------------------------

async def test_a_key_written_without_a_message_is_picked_up_while_the_view_stays_live(
    redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(revocation, "RESYNC_EVERY", 0.5, raising=False)
    cfg = RevocationConfig(redis_url=redis_server.url, key_prefix=PREFIX, max_token_lifetime=3600.0)
    store = RedisRevocationStore(cfg)
    rdb = aioredis.Redis.from_url(redis_server.url)
    try:
        await store.start()
        assert store.ready()
        now = int(time.time())
        p = Principal(issuer="customers", iss="https://login.example.com", subject="alice",
                      scopes=frozenset(), roles=(), tenant=None, session=None, jti="quiet-1",
                      iat=now - 10, exp=now + 300, aud=("api",))
        assert store.check_local(p) is True  # live, not revoked
        await rdb.set(f"{PREFIX}jti:quiet-1", "1", ex=600)  # no message published
        deadline = time.monotonic() + 3.0
        while True:
            try:
                assert store.check_local(p) is True
            except errors.InvalidToken as exc:
                assert exc.reason == "revoked"
                break
            assert time.monotonic() < deadline, "a key written without a message was never picked up"
            await asyncio.sleep(0.05)
        assert store.ready()  # picked up without the view going dark (no reconnect)
        # Later passes add nothing the view holds: its expiry heap does not grow per pass (memory).
        heap = len(store._view._heap)
        await asyncio.sleep(1.2)
        assert len(store._view._heap) == heap
    finally:
        await rdb.aclose()
        await store.close()
