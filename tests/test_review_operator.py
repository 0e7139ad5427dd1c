"""Review as the operator who installs and runs the gateway: admin API bodies, signals, reload, CLI input."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.devissuer import DevIssuer
from tests.support.gateway import RunningGateway
from tests.support.redis_server import RedisServer
from tests.support.upstreams import EchoUpstream
from tests.test_review_ops import admin_post, gateway_yaml
from tests.test_revocation_e2e import ADMIN


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
