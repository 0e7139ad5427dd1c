"""Bearer token extraction and verification (TokenVerifier.verify(raw) -> Principal) with a verified-token cache."""

from __future__ import annotations

import hashlib
import itertools
import math
import re
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import Any, Protocol

import jwt

from gateway import errors, metrics
from gateway.config_types import IssuerConfig
from gateway.model import MAX_REVOCABLE, Principal

# RFC 6750 s2.1: credentials = "Bearer" 1*SP b64token; the scheme is case-insensitive (RFC 9110 s11.1).
_BEARER = re.compile(r"(?i:bearer) +([A-Za-z0-9\-._~+/]+=*)")

# The key type (and curve) each algorithm needs: the HS/RS confusion of RFC 8725 s2.1 cannot happen if
# the key's own type is checked against the header's alg before the signature is verified.
_KEY_FITS: Mapping[str, tuple[str, str | None]] = {
    **{a: ("RSA", None) for a in ("RS256", "RS384", "RS512", "PS256", "PS384", "PS512")},
    "ES256": ("EC", "P-256"), "ES384": ("EC", "P-384"), "ES512": ("EC", "P-521"),
    "EdDSA": ("OKP", None),
}

_JWT = jwt.PyJWT()
_UNVERIFIED = {"verify_signature": False}
# Time checks are done here with the injected clock; PyJWT reads the wall clock inline.
_VERIFY_OPTIONS: Any = {"require": ["exp"], "verify_exp": False, "verify_nbf": False, "verify_iat": False}

# The one translation of PyJWT's exceptions into reasons (habit 5); order matters (subclasses first).
_REASONS: tuple[tuple[type[Exception], str], ...] = (
    (jwt.InvalidSignatureError, "bad_signature"),
    (jwt.ExpiredSignatureError, "expired"),
    (jwt.ImmatureSignatureError, "not_yet_valid"),
    (jwt.InvalidAudienceError, "wrong_audience"),
    (jwt.InvalidIssuerError, "wrong_issuer"),
    (jwt.InvalidAlgorithmError, "alg_not_allowed"),
    (jwt.InvalidKeyError, "bad_signature"),
)
_MISSING_CLAIM_REASONS = {"aud": "wrong_audience", "iss": "wrong_issuer"}


def _reason(exc: jwt.PyJWTError) -> str:
    if isinstance(exc, jwt.MissingRequiredClaimError):
        return _MISSING_CLAIM_REASONS.get(exc.claim, "malformed")
    for kind, reason in _REASONS:
        if isinstance(exc, kind):
            return reason
    return "malformed"


class KeySource(Protocol):
    """Where an issuer's verification keys come from (JwksCache, or a fake in unit tests).

    `generation` changes whenever a key was withdrawn (or changed) since: a token verified under an older
    generation is verified again before the cache serves it."""

    @property
    def generation(self) -> int: ...

    async def key_for(self, kid: str | None, alg: str | None = None) -> jwt.PyJWK | None: ...


def bearer_token(authorization: str | None) -> str:
    """The token of an `Authorization: Bearer` header; no Bearer credential is MissingToken, a bad one malformed."""
    if not authorization:
        raise errors.MissingToken()
    m = _BEARER.fullmatch(authorization.strip())
    if m is None:
        # RFC 6750 s3.1: a request with no Bearer credential (another scheme such as Basic, or the scheme
        # with nothing after it) lacks the token: SPEC 5's invalid_request, no error code in the challenge.
        # A Bearer credential that is not a b64token is a malformed token.
        scheme, _, credentials = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not credentials.strip():
            raise errors.MissingToken()
        raise errors.InvalidToken("malformed")
    return m.group(1)


def _path(dotted: str) -> tuple[str, ...]:
    return tuple(dotted.split("."))


def _lookup(payload: Mapping[str, Any], path: tuple[str, ...]) -> Any:
    node: Any = payload
    for part in path:
        if not isinstance(node, Mapping):
            return None
        node = node.get(part)
    return node


def _text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, int) and not isinstance(value, bool):
        return str(value)
    return None


def _words(value: Any, separators: str) -> tuple[str, ...]:
    if isinstance(value, str):
        return tuple(re.split(separators, value.strip())) if value.strip() else ()
    if isinstance(value, list | tuple):
        return tuple(v for v in value if isinstance(v, str) and v)
    return ()


# RFC 6749 s3.3: scope = scope-token *( SP scope-token ), scope-token = 1*( %x21 / %x23-5B / %x5D-7E ).
# Anything else (a list entry "a admin", a string "a\u00a0admin") is dropped, not split: an upstream
# reading the space-joined X-Auth-Scopes or minted `scope` (str.split() splits on NBSP, EM SPACE, ...)
# would otherwise see scopes the gateway never granted. Fail closed: fewer scopes, never more.
SCOPE_TOKEN = re.compile(r"[\x21\x23-\x5b\x5d-\x7e]+")
_SCOPE_SEP = re.compile(r"[ \t\r\n]+")


def _scopes(value: Any) -> tuple[str, ...]:
    """The valid scopes in the token's order, each once: an upstream is told them as the issuer wrote them."""
    if isinstance(value, str):
        words: Any = _SCOPE_SEP.split(value)
    elif isinstance(value, list | tuple):
        words = value
    else:
        return ()
    return tuple(dict.fromkeys(w for w in words if isinstance(w, str) and SCOPE_TOKEN.fullmatch(w)))


def _number(payload: Mapping[str, Any], name: str) -> int | None:
    value = payload.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise jwt.DecodeError(f"{name} must be a number")  # RFC 7519 s2 NumericDate
    try:
        # json.loads reads Infinity, NaN and ints too big for a float (1e400 is inf): none is a date,
        # and int()/float() of them would raise OverflowError/ValueError past the error boundary (a 500).
        if not math.isfinite(value):
            raise jwt.DecodeError(f"{name} must be a finite number")
    except OverflowError:
        raise jwt.DecodeError(f"{name} is out of range") from None
    return int(value)


@dataclass(frozen=True, slots=True)
class _Issuer:
    """An IssuerConfig with everything a request needs precomputed."""

    config: IssuerConfig
    keys: KeySource
    algorithms: frozenset[str]
    audiences: list[str]
    subject: tuple[str, ...]
    scopes: tuple[str, ...]
    roles: tuple[str, ...]
    tenant: tuple[str, ...]
    session: tuple[str, ...]


class _Entry:
    """One verified token in the cache; `used` is the second-chance bit (set on a hit, read on eviction).
    `keys` and `generation`: the issuer's key source and its generation when the token verified."""

    __slots__ = ("principal", "expires_at", "used", "keys", "generation")

    def __init__(self, principal: Principal, expires_at: float, keys: KeySource) -> None:
        self.principal, self.expires_at, self.used = principal, expires_at, False
        self.keys, self.generation = keys, keys.generation


class TokenMemo:
    """The bearer credential one connection sent last, and its cache entry (TokenVerifier.cached_header).

    A keep-alive client sends the same token on every request: comparing the header with the last one
    (a memcmp) spares hashing the whole token for the cache lookup (siphash13: ~2.2k instructions for a
    750-byte token, a new string each request). The entry is checked as a cache hit is, every time."""

    __slots__ = ("header", "entry", "epoch")

    def __init__(self) -> None:
        self.header = ""
        self.entry: _Entry | None = None
        # The verifier the entry came from, by number: a reload's new verifier never trusts the old one's
        # entry, and a connection left open does not keep a replaced verifier (and its cache) alive.
        self.epoch = -1


_EPOCHS = itertools.count()


_MAX_CACHED_TOKEN = 8192  # longer tokens are verified every time: bounds the cache's memory per entry
_SECOND_CHANCES = 8  # per insertion: recently used entries skipped before the oldest is evicted anyway


class TokenVerifier:
    """Verifies access tokens of the configured issuers; caches successes until their `exp`."""

    def __init__(
        self,
        issuers: Sequence[IssuerConfig],
        keys: Mapping[str, KeySource],
        *,
        clock: Callable[[], float] = time.time,
        cache_size: int = 20_000,
        max_lifetime: float | None = None,
    ) -> None:
        self._clock = clock
        # revocation.max_token_lifetime: a subject/session revocation is kept that long, so a token may not
        # live longer, counted from its iat, or it would pass again once the revocation expired.
        self._max_lifetime = max_lifetime
        self._cache_size = cache_size
        self._epoch = next(_EPOCHS)  # TokenMemo.epoch: which verifier a connection's memo speaks for
        # Keyed by the raw token itself, not by a digest of it: a cache hit is then one dict lookup
        # (str hashing, ~0.3 us for a 700-byte JWT) instead of sha256 (~1.2 us here), and a string that
        # is a key here is known to be a well-formed token that verified, so the pipeline can skip the
        # bearer syntax check on a hit. The trade-off: live tokens stay in process memory until exp or
        # eviction rather than only for the duration of their request. A memory dump of this process
        # already discloses the tokens in flight and the internal-token signing key (which mints any
        # identity), so this exposes nothing a dump did not; the tokens are never logged or put in an
        # exception (habit: Principal carries only token_hash). Memory: at most _MAX_CACHED_TOKEN
        # characters per entry, `cache_size` entries.
        # OrderedDict, not dict: evicting the oldest of a plain dict is O(holes) (next(iter()) walks the
        # deleted slots), ~20 us per eviction at 100k entries; popitem(last=False) is O(1).
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._hit = metrics.incrementer(metrics.token_cache_hits_total)
        self._by_iss: dict[str, _Issuer] = {}
        for cfg in issuers:
            if cfg.name not in keys:
                raise ValueError(f"no key source for issuer {cfg.name!r}")
            c = cfg.claims
            self._by_iss[cfg.issuer] = _Issuer(
                config=cfg,
                keys=keys[cfg.name],
                # RFC 8725 s3.1/s3.2: never "none" nor a symmetric algorithm, whatever the config says.
                algorithms=frozenset(a for a in cfg.algorithms if a in _KEY_FITS),
                audiences=list(cfg.audiences),
                subject=_path(c.subject), scopes=_path(c.scopes), roles=_path(c.roles),
                tenant=_path(c.tenant), session=_path(c.session),
            )

    def cached(self, raw: str) -> Principal | None:
        """The Principal of a token verified earlier and not past its `exp`; None: call verify().

        Synchronous (no coroutine per request on the hot path). Only exact strings that verified are
        keys, so any `raw` may be passed, even one not yet checked against the bearer syntax.
        """
        entry = self._cache.get(raw)
        if entry is None:
            return None
        principal = self._hit_on(entry)
        if principal is None:
            del self._cache[raw]
        return principal

    def _hit_on(self, entry: _Entry) -> Principal | None:
        """The entry's Principal, counted as a cache hit, while it may still be served; else None. Not past
        exp (after it, verify again: leeway applies there, never here), and no key of its issuer withdrawn
        since it verified (verify again: it fails if its own key is gone)."""
        if self._clock() < entry.expires_at and entry.generation == entry.keys.generation:
            # Approximate LRU (second chance): a hit only sets a bit instead of reordering the cache.
            entry.used = True
            self._hit(1)
            return entry.principal
        return None

    def cached_header(self, header: str, memo: TokenMemo) -> Principal | None:
        """cached() for a whole `Bearer <token>` header value (exactly "Bearer " then the token, as the
        pipeline's fast path checks), remembering on the connection's `memo` the entry it found."""
        entry = memo.entry
        if entry is None or memo.epoch != self._epoch or memo.header != header:
            entry = self._cache.get(header[7:])
            memo.header, memo.entry, memo.epoch = header, entry, self._epoch
            if entry is None:
                return None
        principal = self._hit_on(entry)
        if principal is not None:
            return principal
        memo.entry = None
        return self.cached(header[7:])  # drops the stale entry (or finds one verified since)

    async def verify(self, raw: str) -> Principal:
        """The Principal of a valid token, or errors.InvalidToken(reason, issuer=name)."""
        hit = self.cached(raw)
        if hit is not None:
            return hit
        # Failures raise before anything is stored: a refused token is never cached.
        principal = await self._verify(raw, hashlib.sha256(raw.encode()).hexdigest())
        assert principal.exp is not None  # exp is required by _verify
        if len(raw) <= _MAX_CACHED_TOKEN:
            self._remember(raw, _Entry(principal, float(principal.exp), self._by_iss[principal.iss].keys))
        return principal

    def _remember(self, raw: str, entry: _Entry) -> None:
        cache = self._cache
        cache[raw] = entry
        chances = _SECOND_CHANCES
        while len(cache) > self._cache_size:
            key, old = cache.popitem(last=False)
            if old.used and chances and key != raw:
                # CLOCK: a token used since it was last considered goes to the back once more; bounded
                # per insertion, so one insert never walks the whole cache.
                old.used = False
                cache[key] = old
                chances -= 1

    async def _verify(self, raw: str, token_hash: str) -> Principal:
        # Read header and payload WITHOUT trusting them: only to pick the issuer, alg and kid.
        try:
            unverified = _JWT.decode_complete(raw, options=_UNVERIFIED)  # type: ignore[arg-type]
        except jwt.PyJWTError:
            raise errors.InvalidToken("malformed") from None
        if jwt.utils.base64url_encode(unverified["signature"]).decode() != raw.rpartition(".")[2]:
            # RFC 7515 s2: base64url without padding. PyJWT's decoder also takes the signature part with
            # `=` padding, which then verified and was cached as a token of its own. Only the one spelling
            # of the signature's bytes passes, whatever else a decoder version tolerates. (The header
            # and payload parts are signed as spelled: another spelling fails the signature.)
            raise errors.InvalidToken("malformed")
        header, payload = unverified["header"], unverified["payload"]
        iss = payload.get("iss")
        issuer = self._by_iss.get(iss) if isinstance(iss, str) else None
        if issuer is None:
            raise errors.InvalidToken("wrong_issuer")
        name = issuer.config.name
        alg, kid = header.get("alg"), header.get("kid")
        # RFC 8725 s3.1: the allowlist is checked before any key is touched, so "none" and HS* (signed
        # with a public key as HMAC secret) never reach a key lookup.
        if not isinstance(alg, str) or alg not in issuer.algorithms:
            raise errors.InvalidToken("alg_not_allowed", issuer=name)
        if kid is not None and not isinstance(kid, str):
            raise errors.InvalidToken("malformed", issuer=name)
        key = await issuer.keys.key_for(kid, alg)
        if key is None:
            raise errors.InvalidToken("unknown_kid", issuer=name)
        # RFC 8725 s3.1: the key is bound to one algorithm and its type must fit the header's alg.
        kty, crv = _KEY_FITS[alg]
        if key.algorithm_name != alg or key.key_type != kty or (crv is not None and _crv(key) != crv):
            raise errors.InvalidToken("alg_not_allowed", issuer=name)
        try:
            claims = _JWT.decode(
                raw, key, algorithms=[alg], options=_VERIFY_OPTIONS,
                audience=issuer.audiences, issuer=issuer.config.issuer,
            )
            exp = _number(claims, "exp")
            nbf, iat = _number(claims, "nbf"), _number(claims, "iat")
            now, leeway = self._clock(), issuer.config.leeway
            if exp is None:
                raise jwt.MissingRequiredClaimError("exp")
            if iat is not None and self._max_lifetime is not None and iat + self._max_lifetime < exp:
                # Accepted until iat + max_token_lifetime at most (+ leeway, as for exp): a revocation of its
                # subject or session (kept max_token_lifetime + the largest leeway) outlives it. The
                # Principal carries this bound as exp: the cache, and a minted token, end with it too.
                exp = int(iat + self._max_lifetime)
            if iat is None and self._max_lifetime is not None and exp > now + self._max_lifetime + leeway:
                # Without iat nothing says when it was issued, so a revocation of it (kept max_token_lifetime
                # + the largest leeway) could expire before it does, and it would pass again. Accepted only
                # in the last max_token_lifetime of its life: a revocation made while it is accepted
                # outlives it. Until then it is not yet valid.
                raise jwt.ImmatureSignatureError("no iat, and more than max_token_lifetime left")
            if exp <= now - leeway:
                raise jwt.ExpiredSignatureError("expired")
            if (nbf is not None and nbf > now + leeway) or (iat is not None and iat > now + leeway):
                raise jwt.ImmatureSignatureError("not yet valid")
        except jwt.PyJWTError as exc:
            raise errors.InvalidToken(_reason(exc), issuer=name) from None
        principal = self._principal(issuer, claims, exp, iat, token_hash)
        if _unsafe_identity(principal):
            # JSON's "\ud800" decodes to a lone surrogate: such an identity has no UTF-8 form, neither for
            # a revocation key (redis-py's encoder raises UnicodeEncodeError past the error boundary: a 500)
            # nor for an X-Auth-* header; a CR, LF or NUL would split a header, or a service's log line when
            # it arrives inside the internal token. Refused as malformed here, the same on every route.
            raise errors.InvalidToken("malformed", issuer=name, principal=principal)
        return principal

    @staticmethod
    def _principal(issuer: _Issuer, claims: dict[str, Any], exp: int, iat: int | None, token_hash: str) -> Principal:
        aud = claims.get("aud")
        scopes = _scopes(_lookup(claims, issuer.scopes))
        return Principal(
            issuer=issuer.config.name,
            iss=issuer.config.issuer,
            subject=_text(_lookup(claims, issuer.subject)),
            scopes=frozenset(scopes),
            scope_list=scopes,
            roles=_words(_lookup(claims, issuer.roles), r"[\s,]+"),
            tenant=_text(_lookup(claims, issuer.tenant)),
            session=_text(_lookup(claims, issuer.session)),
            jti=_text(claims.get("jti")),
            iat=iat,
            exp=exp,
            aud=(aud,) if isinstance(aud, str) else _words(aud, r"\s+"),
            claims=MappingProxyType(claims),
            token_hash=token_hash,
        )


# RFC 9110 s5.5: a field value never holds CR, LF or NUL; other controls (but HTAB) are refused too, and
# lone surrogates (JSON's "\ud800" decodes to one), which have no UTF-8 form to put on the wire.
UNSAFE_VALUE = re.compile(r"[\x00-\x08\x0a-\x1f\x7f\ud800-\udfff]")


def _unsafe_identity(p: Principal) -> bool:
    """True when an identity value the gateway keys or forwards could not be a header field value, or one
    a revocation names (sub, sid, jti) is longer than any revocation can be (SPEC 6: it could not be revoked)."""
    values = (p.subject, p.tenant, p.session, p.jti, *p.roles)
    if any(v is not None and len(v) > MAX_REVOCABLE for v in (p.subject, p.session, p.jti)):
        return True
    return any(v is not None and UNSAFE_VALUE.search(v) is not None for v in values)


_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384", "secp521r1": "P-521"}


def _crv(key: jwt.PyJWK) -> str | None:
    return _CURVES.get(getattr(getattr(key.key, "curve", None), "name", ""))
