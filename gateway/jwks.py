"""Per-issuer JWKS cache: discovery, background refresh, keep-last-good, single-flight refetch on unknown kid."""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import re
import time
from collections.abc import Callable, Mapping
from typing import Any

import aiohttp
import jwt
from cryptography.hazmat.primitives import serialization

from gateway import metrics
from gateway.config_types import IssuerConfig

log = logging.getLogger("gateway.jwks")

FETCH_TIMEOUT = 5.0
MAX_BODY = 1 << 20  # a JWKS is a few KB; refuse to buffer anything absurd
MAX_AGE_MIN, MAX_AGE_MAX = 60.0, 86400.0  # SPEC: Cache-Control max-age honoured within [1m, 24h]
_MAX_AGE = re.compile(r"(?:^|,)\s*max-age\s*=\s*\"?(\d+)\"?\s*(?:,|$)", re.IGNORECASE)

# The algorithm families a key type can serve; anything else is skipped (RFC 8725 s3.1: a key is
# bound to one algorithm; a symmetric "oct" key must never come from a public JWKS).
_RSA_ALGS = frozenset({"RS256", "RS384", "RS512", "PS256", "PS384", "PS512"})
_ASYMMETRIC_ALGS = _RSA_ALGS | {"ES256", "ES384", "ES512", "EdDSA"}
# RFC 7518 s3.3/s3.5: "A key of size 2048 bits or larger MUST be used" with RS*/PS*. A shorter modulus is
# factorable (512 bits: hours of rented compute), and whoever factors it signs any token the issuer could.
MIN_RSA_BITS = 2048
# RFC 7518 s6.2.2/s6.3.2/RFC 8037 s2: the members only a private key has. A JWK Set is public: a member
# carrying one is a key anyone who fetched the set can sign with (an IdP that published its private
# JWK), so it is never trusted; PyJWT would also load an RSA one as a private key, which cannot verify.
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth", "k")


class FetchError(Exception):
    """A discovery or JWKS fetch failed (network, status, or an unusable document)."""


def parse_max_age(cache_control: str | None) -> float | None:
    if not cache_control or "no-store" in cache_control.lower():
        return None
    m = _MAX_AGE.search(cache_control)
    return float(m.group(1)) if m else None


def parse_jwks(doc: Any, allowed: frozenset[str]) -> list[jwt.PyJWK]:
    """Usable signing keys of a JWKS document; unusable members are skipped, not fatal (also RSA keys under
    2048 bits, and keys published with their private half).

    A well-formed JWK Set with no usable key (`{"keys": []}`) is the issuer's word that none of its
    former keys signs any more (an emergency withdrawal after a leak): it is applied, not kept out as
    a failed fetch would be, so tokens signed with the withdrawn keys stop passing."""
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise FetchError("not a JWK Set (no 'keys' list)")
    rsa_hint = [a for a in allowed if a in _RSA_ALGS]
    keys: list[jwt.PyJWK] = []
    for member in doc["keys"]:
        if not isinstance(member, dict) or member.get("use", "sig") != "sig":
            continue
        ops = member.get("key_ops")  # RFC 7517 s4.3: when given, what the key may be used for
        if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
            continue
        if member.get("kty") not in ("RSA", "EC", "OKP"):
            continue
        if any(m in member for m in _PRIVATE_MEMBERS):
            log.error("jwks key %r skipped: it carries private key material, so anyone who read the JWKS can "
                      "sign with it; the issuer must withdraw it", member.get("kid"))
            continue
        alg = member.get("alg")
        if alg is None and member.get("kty") == "RSA" and len(rsa_hint) == 1:
            # An RSA JWK without "alg" (Azure AD publishes these) fits any RS/PS algorithm; bind it to
            # the issuer's only allowed RSA algorithm rather than PyJWT's RS256 default.
            alg = rsa_hint[0]
        try:
            key = jwt.PyJWK(member, alg)
        except (jwt.PyJWTError, ValueError, TypeError, KeyError):
            continue
        if key.algorithm_name not in _ASYMMETRIC_ALGS or key.algorithm_name not in allowed:
            continue
        bits = getattr(key.key, "key_size", None) if member.get("kty") == "RSA" else None
        if bits is not None and bits < MIN_RSA_BITS:
            log.warning("jwks key %r skipped: a %d-bit RSA key (at least %d bits are needed, RFC 7518 s3.3)",
                        member.get("kid"), bits, MIN_RSA_BITS)
            continue
        keys.append(key)
    return keys


def _fingerprint(key: jwt.PyJWK) -> tuple[str | None, str, bytes]:
    """A key's identity across fetches: kid, alg and the public key itself (DER SubjectPublicKeyInfo)."""
    material = key.key
    public = material.public_key() if hasattr(material, "public_key") else material  # a JWK with "d"
    der = public.public_bytes(serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return key.key_id, key.algorithm_name, der


class JwksCache:
    """The keys of one issuer. Lookups of known kids never wait on I/O.

    `generation` grows when a fetch no longer holds a key an earlier one held (withdrawn, or changed
    under its kid): the verified-token cache then verifies its tokens again, so a token signed with a
    withdrawn key stops passing once the gateway has seen the new JWKS, cached or not."""

    def __init__(
        self,
        issuer: IssuerConfig,
        session: aiohttp.ClientSession,
        *,
        clock: Callable[[], float] = time.monotonic,
        fetch_timeout: float = FETCH_TIMEOUT,
        retry_backoff: tuple[float, float] = (1.0, 60.0),
    ) -> None:
        self.issuer = issuer
        self._session = session
        self._clock = clock
        self._timeout = aiohttp.ClientTimeout(total=fetch_timeout)
        self._backoff_first, self._backoff_max = retry_backoff
        self._backoff = self._backoff_first
        self._allowed = frozenset(issuer.algorithms)
        self._jwks_uri = issuer.jwks_uri
        # RFC 7517 s4.5: keys of different types may share a kid; the token's alg picks among them.
        self._by_kid: Mapping[str, tuple[jwt.PyJWK, ...]] = {}
        self._keys: tuple[jwt.PyJWK, ...] = ()
        self._prints: frozenset[tuple[str | None, str, bytes]] = frozenset()
        self.generation = 0
        self._inflight: asyncio.Task[bool] | None = None
        self._last_refetch = float("-inf")
        self._refresher: asyncio.Task[None] | None = None
        self._ok_counter = metrics.jwks_refresh_total.labels(issuer=issuer.name, result="ok")
        self._error_counter = metrics.jwks_refresh_total.labels(issuer=issuer.name, result="error")
        self._keys_gauge = metrics.jwks_keys.labels(issuer=issuer.name)
        self._forgotten = False  # forget_issuer(): the gauge is no longer this cache's to set
        self.ready = False  # a fetch gave at least one usable key
        self.next_refresh_in = issuer.jwks_refresh  # seconds until the background refresher runs again

    @property
    def key_count(self) -> int:
        return len(self._keys)

    async def start(self) -> None:
        """First fetch (failure is logged and counted, not raised), then the background refresher."""
        await self._refresh_shared()
        self._refresher = asyncio.create_task(self._refresh_loop(), name=f"jwks-refresh-{self.issuer.name}")

    async def close(self) -> None:
        for task in (self._refresher, self._inflight):
            if task is not None and not task.done():
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._refresher = self._inflight = None

    async def key_for(self, kid: str | None, alg: str | None = None) -> jwt.PyJWK | None:
        """The key for `kid`; an unknown kid refetches once (shared, at most once per jwks_min_refetch).
        kid=None: the only key fitting `alg`, if exactly one does (no refetch)."""
        if kid is None:
            fitting = [k for k in self._keys if alg is None or k.algorithm_name == alg]
            return fitting[0] if len(fitting) == 1 else None
        key = self._pick(kid, alg)
        if key is not None:
            return key
        if self._inflight is None:
            now = self._clock()
            # Habit 6/8: an unknown kid may be a rotation, so fetch once; but kids are attacker-chosen,
            # so at most one refetch per cooldown, whatever the request rate (Envoy jwks_async_fetcher).
            if now - self._last_refetch < self.issuer.jwks_min_refetch:
                return None
            self._last_refetch = now
        await self._refresh_shared()
        return self._pick(kid, alg)

    def _pick(self, kid: str, alg: str | None) -> jwt.PyJWK | None:
        """The key under `kid` bound to `alg`; else the first under `kid` (the verifier then refuses the
        alg/key mismatch as alg_not_allowed rather than as an unknown kid)."""
        keys = self._by_kid.get(kid)
        if keys is None:
            return None
        for key in keys:
            if key.algorithm_name == alg:
                return key
        return keys[0]

    # ----- fetching ------------------------------------------------------------------------------

    async def _refresh_shared(self) -> bool:
        """Join the fetch in flight or start one: concurrent callers share a single request."""
        if self._inflight is None:
            self._inflight = asyncio.create_task(self._refresh())
            self._inflight.add_done_callback(self._clear_inflight)
        return await asyncio.shield(self._inflight)

    def _clear_inflight(self, task: asyncio.Task[bool]) -> None:
        if self._inflight is task:
            self._inflight = None

    async def _refresh(self) -> bool:
        try:
            keys, max_age = await self._fetch()
        except Exception as exc:  # noqa: BLE001 - any failure: count, log, keep the keys, retry later
            self._error_counter.inc()
            # Keep the last good keys (habit 8: PyJWKClient drops its cache here; we must not).
            self.next_refresh_in = self._backoff
            self._backoff = min(self._backoff * 2, self._backoff_max)
            log.warning(
                "jwks fetch for issuer %s failed (%s: %s); keeping %d keys, retry in %.1fs",
                self.issuer.name, type(exc).__name__, exc, len(self._keys), self.next_refresh_in,
            )
            return False
        by_kid: dict[str, tuple[jwt.PyJWK, ...]] = {}
        for key in keys:
            if key.key_id is not None:
                by_kid[key.key_id] = (*by_kid.get(key.key_id, ()), key)
        if not keys:
            log.warning("jwks of issuer %s holds no usable signing key: every token of this issuer is refused "
                        "until it does", self.issuer.name)
        prints = frozenset(_fingerprint(k) for k in keys)
        if not prints >= self._prints:
            self.generation += 1
        self._keys, self._by_kid, self._prints = tuple(keys), by_kid, prints
        # Ready once a fetch gave a usable key (a start against an empty set, or with an `algorithms` list
        # that fits none of the issuer's keys, is not ready); a later withdrawal does not unset it: the
        # other issuers' traffic must not be taken out with this one's.
        self.ready = self.ready or bool(keys)
        self._backoff = self._backoff_first
        self.next_refresh_in = (
            self.issuer.jwks_refresh if max_age is None else min(max(max_age, MAX_AGE_MIN), MAX_AGE_MAX)
        )
        self._ok_counter.inc()
        if not self._forgotten:
            self._keys_gauge.set(len(keys))
        return True

    def forget_issuer(self) -> None:
        """The issuer left the configuration (a reload): its gateway_jwks_keys series goes, or it showed the
        last count until restart. A fetch still running until this cache is closed does not set it again."""
        self._forgotten = True
        metrics.drop_series(metrics.jwks_keys, self.issuer.name)

    async def _fetch(self) -> tuple[list[jwt.PyJWK], float | None]:
        if self._jwks_uri is None:
            doc, _ = await self._get_json(self.issuer.issuer.rstrip("/") + "/.well-known/openid-configuration")
            if not isinstance(doc, dict) or doc.get("issuer") != self.issuer.issuer:
                # OIDC Discovery s4.3: the document's issuer must equal the configured one exactly.
                raise FetchError("discovery document issuer does not match the configured issuer")
            uri = doc.get("jwks_uri")
            if not isinstance(uri, str) or not uri.startswith(("https://", "http://")):
                raise FetchError("discovery document has no usable jwks_uri")
            if self.issuer.issuer.startswith("https://") and not uri.startswith("https://"):
                # The keys decide who may sign any token: an issuer reached over TLS whose document sends
                # them over plain HTTP (an IdP behind a TLS proxy that was not told so) hands them to
                # anyone on the path. Refused, as the discovery document's own transport demands.
                raise FetchError(f"discovery document's jwks_uri {uri!r} is not https, as the issuer is")
            self._jwks_uri = uri
        doc, cache_control = await self._get_json(self._jwks_uri)
        return parse_jwks(doc, self._allowed), parse_max_age(cache_control)

    async def _get_json(self, url: str) -> tuple[Any, str | None]:
        async with self._session.get(url, timeout=self._timeout, allow_redirects=False) as resp:
            if resp.status != 200:
                raise FetchError(f"HTTP {resp.status} from {url}")
            # Read to the end: content.read(n) returns what has arrived so far (at most n bytes), so a
            # document delivered in several reads (TLS records, chunks, a slow link) was cut short and
            # refused as invalid JSON. Bounded by MAX_BODY whatever the framing (or Content-Encoding).
            chunks: list[bytes] = []
            size = 0
            async for chunk in resp.content.iter_any():
                size += len(chunk)
                if size > MAX_BODY:
                    raise FetchError(f"response from {url} larger than {MAX_BODY} bytes")
                chunks.append(chunk)
            body = b"".join(chunks)
            try:
                return json.loads(body), resp.headers.get("Cache-Control")
            except ValueError as exc:
                raise FetchError(f"invalid JSON from {url}") from exc

    async def _refresh_loop(self) -> None:
        while True:
            await asyncio.sleep(self.next_refresh_in)
            await self._refresh_shared()
