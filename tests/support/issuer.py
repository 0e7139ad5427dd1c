"""Test support: the `issuer` fixture, a started DevIssuer (real HTTP on 127.0.0.1) stopped after the test."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from gateway.devissuer import DevIssuer


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
