"""Long-lived resources shared across reloads: JWKS caches, revocation store, signing keys, upstream pool."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

import aiohttp

from gateway.config_types import Config, IssuerConfig
from gateway.identity import TokenMinter
from gateway.jwks import JwksCache
from gateway.keys import CHECK_INTERVAL as KEY_CHECK_INTERVAL
from gateway.keys import KeyStore
from gateway.pipeline import Gateway
from gateway.revocation import RevocationStore, create_store
from gateway.tokens import TokenVerifier
from gateway.upstream import Upstreams

log = logging.getLogger("gateway")


class Services:
    """Long-lived resources shared across config reloads: key caches, revocation, signing keys, upstream pool."""

    def __init__(self) -> None:
        self.session: aiohttp.ClientSession | None = None
        self.jwks: dict[str, JwksCache] = {}
        self._jwks_cfg: dict[str, IssuerConfig] = {}
        self.revocation: RevocationStore | None = None
        self.keys: KeyStore | None = None
        self.minter: TokenMinter | None = None
        self.upstreams: Upstreams | None = None
        self._built: dict[str, Any] = {}  # the config section each resource was built from
        self._retired: list[Any] = []
        self._rotator: asyncio.Task[None] | None = None

    async def build(self, config: Config) -> Gateway:
        """A Gateway for `config`, reusing every resource whose configuration did not change.

        Transactional: new resources are built first; only when all are built are they swapped in
        (the replaced ones retired); on any failure the new ones are closed and nothing changes.
        """
        fresh: list[Any] = []  # what this call created, closed again if it fails
        keys, minter = self.keys, self.minter
        itc = config.internal_token
        if itc is None:
            keys = minter = None
        elif keys is None or self._built.get("internal_token") != itc:
            # KeyStoreError (unreadable, corrupt) surfaces here, first: nothing (session, JWKS tasks)
            # is open yet, so `gateway run` exits with one clean line.
            keys = KeyStore(itc)
            keys.load()
            minter = TokenMinter(keys, itc)
        elif self._jwks_cfg != {i.name: i for i in config.issuers}:
            # A minted token carries claims read through the issuer's `claims` map (tenant, roles, sub):
            # cached under the same original token, it would keep the old reading. A fresh cache.
            minter = TokenMinter(keys, itc)
        if self.session is None:
            self.session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10))
        try:
            jwks: dict[str, JwksCache] = {}
            for issuer in config.issuers:
                cache = self.jwks.get(issuer.name)
                if cache is None or self._jwks_cfg.get(issuer.name) != issuer:
                    cache = JwksCache(issuer, self.session)
                    fresh.append(cache)
                    await cache.start()
                jwks[issuer.name] = cache
            revocation = self.revocation
            if revocation is None or self._built.get("revocation") != config.revocation:
                revocation = create_store(config.revocation)
                fresh.append(revocation)
                await revocation.start()
            upstreams = self.upstreams
            if upstreams is None or self._built.get("upstreams") != config.upstreams:
                upstreams = Upstreams(config.upstreams)
                fresh.append(upstreams)
                await upstreams.start()
            verifier = TokenVerifier(config.issuers, jwks, max_lifetime=config.revocation.max_token_lifetime)
            gateway = Gateway(config, verifier, revocation, minter, upstreams)
        except BaseException:
            for item in fresh:
                with contextlib.suppress(Exception):
                    await item.close()
            raise
        # Commit: swap in, retire what was replaced (closed after in-flight requests had time to finish).
        self._retired.extend(c for n, c in self.jwks.items() if jwks.get(n) is not c)
        for name in self.jwks.keys() - jwks.keys():
            self.jwks[name].forget_issuer()
        self.jwks, self._jwks_cfg = jwks, {i.name: i for i in config.issuers}
        if self.upstreams is not None and self.upstreams is not upstreams:
            self.upstreams.retire(upstreams)  # its gauges belong to the new one from here on
        for new, old in ((revocation, self.revocation), (upstreams, self.upstreams)):
            if old is not None and old is not new:
                self._retired.append(old)
        self.revocation, self.upstreams, self.keys, self.minter = revocation, upstreams, keys, minter
        self._built.update(revocation=config.revocation, upstreams=config.upstreams, internal_token=itc)
        if keys is not None and self._rotator is None:
            self._rotator = asyncio.create_task(self._rotate_keys())
        return gateway

    async def _rotate_keys(self) -> None:
        """rotate_every: checked often, so a rotation by another replica is picked up quickly too."""
        loop = asyncio.get_running_loop()
        while True:
            await asyncio.sleep(KEY_CHECK_INTERVAL)
            keys = self.keys
            if keys is None:
                continue
            try:
                # check() logs each key store problem once and keeps signing with the current key.
                await loop.run_in_executor(None, keys.check)
            except Exception as exc:  # noqa: BLE001 - a bug must not stop later checks
                log.error("signing key check failed: %s", exc)

    async def close_retired(self) -> None:
        retired, self._retired = self._retired, []
        for item in retired:
            with contextlib.suppress(Exception):
                await item.close()

    async def close(self) -> None:
        if self._rotator is not None:
            self._rotator.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._rotator
        await self.close_retired()
        for item in (*self.jwks.values(), self.revocation, self.upstreams):
            if item is not None:
                with contextlib.suppress(Exception):
                    await item.close()
        if self.session is not None:
            await self.session.close()

    def ready(self) -> dict[str, bool]:
        checks = {f"jwks:{name}": cache.ready for name, cache in self.jwks.items()}
        checks["revocation"] = self.revocation is not None and self.revocation.ready()
        return checks
