"""Review as the operator who installs and runs the gateway: admin API bodies, signals, reload, CLI input."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import pytest
import redis.asyncio as aioredis

from gateway.devissuer import DevIssuer
from tests.support.gateway import RunningGateway
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream
from tests.test_review_ops import admin_post, gateway_yaml
from tests.test_revocation_e2e import ADMIN, PREFIX


@pytest.fixture
async def gw(issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer,
             gateway_factory: Any) -> AsyncIterator[RunningGateway]:
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)) as running:
        yield running


async def test_admin_revocation_nested_deeper_than_json_decodes_is_a_400(gw: RunningGateway,
                                                                         issuer: DevIssuer) -> None:
    # json.loads raises RecursionError (not ValueError) on deep nesting: it was aiohttp's text/plain 500.
    status, body = await admin_post(gw, issuer.token(ADMIN), b"[" * 100_000 + b"]" * 100_000)
    assert status == 400 and body["error"] == "invalid_request", body


async def test_a_published_message_nested_too_deeply_is_unreadable_not_a_crash_of_the_sync(
        issuer: DevIssuer, echo_upstream: EchoUpstream, redis_server: RedisServer, gateway_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    # It raised RecursionError out of the subscription loop: a traceback, a reconnect, the view not live.
    async with gateway_factory(gateway_yaml(issuer, echo_upstream, redis_server.url)):
        client = aioredis.Redis.from_url(redis_server.url)
        try:
            await client.publish(f"{PREFIX}events", b"[" * 100_000 + b"]" * 100_000)
            await asyncio.sleep(0.5)
        finally:
            await client.aclose()
    assert "unreadable revocation message" in caplog.text
    assert "Traceback" not in caplog.text and "RecursionError" not in caplog.text
