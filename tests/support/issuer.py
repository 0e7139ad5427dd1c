"""Test support: the `issuer` fixture, a started DevIssuer (real HTTP on 127.0.0.1) stopped after the test."""

from __future__ import annotations

import uuid
from collections.abc import AsyncIterator
from typing import Any

import pytest

from gateway.config_types import IssuerConfig
from gateway.devissuer import ALGORITHMS, DevIssuer


@pytest.fixture
async def issuer() -> AsyncIterator[DevIssuer]:
    dev = DevIssuer()
    await dev.start()
    try:
        yield dev
    finally:
        await dev.stop()


@pytest.fixture
async def other_issuer() -> AsyncIterator[DevIssuer]:
    """A second, independent issuer (own keys, own realm) for multi-issuer tests."""
    dev = DevIssuer("other")
    await dev.start()
    try:
        yield dev
    finally:
        await dev.stop()


def issuer_config(dev: DevIssuer, /, **overrides: Any) -> IssuerConfig:
    """An IssuerConfig for `dev` (unique name, every algorithm allowed), with overrides."""
    fields: dict[str, Any] = {
        "name": f"dev-{uuid.uuid4().hex[:8]}",
        "issuer": dev.url,
        "audiences": (dev.audience,),
        "algorithms": ALGORITHMS,
    }
    fields.update(overrides)
    return IssuerConfig(**fields)
