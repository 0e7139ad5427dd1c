"""The gateway's own signing keys: a private JWKS file, its rotation, and the public JWKS document."""

from __future__ import annotations

import base64
import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import os
import stat
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.config_types import InternalTokenConfig
from gateway.errors import KeyStoreError
from gateway.jwks import MIN_RSA_BITS

log = logging.getLogger("gateway.keys")

SUPPORTED_ALGORITHMS = ("ES256", "EdDSA", "RS256")

# A retired key stays published for ttl + this margin. Tokens it signed live at most ttl after the
# rotation, but a replica that has not yet re-read the file keeps signing with it for up to its
# check interval, and verifiers allow some clock leeway; 2 minutes covers both with room to spare.
RETIRE_MARGIN = 120.0

# How often a replica calls check() (from a background thread: rotation writes a file and RSA key
# generation takes tens of milliseconds). Between rotations a check is one stat() of the file, so it
# can be frequent: a rotation by `gateway keys rotate` or another replica is picked up within a second.
# Must stay well under RETIRE_MARGIN.
CHECK_INTERVAL = 1.0

# RFC 7517/7518: the members that make up each public key. Published JWKs are built from this
# allowlist, never by deleting private members, so no private member (d, p, q, dp, dq, qi, oth)
# can ever leak into /.well-known/jwks.json.
_PUBLIC_MEMBERS = {"RSA": ("kty", "n", "e"), "EC": ("kty", "crv", "x", "y"), "OKP": ("kty", "crv", "x")}
# RFC 7638 s3.2: the required members hashed for the thumbprint (lexicographic order).
_THUMBPRINT_MEMBERS = {"RSA": ("e", "kty", "n"), "EC": ("crv", "kty", "x", "y"), "OKP": ("crv", "kty", "x")}
_KTY_FOR_ALG = {"ES256": "EC", "EdDSA": "OKP", "RS256": "RSA"}
_PRIVATE_TYPES: dict[str, tuple[type, ...]] = {
    "ES256": (ec.EllipticCurvePrivateKey,),
    "EdDSA": (ed25519.Ed25519PrivateKey,),
    "RS256": (rsa.RSAPrivateKey,),
}


@dataclass(frozen=True, slots=True)
class SigningKey:
    """The key that signs now: what PyJWT needs plus its `kid` for the JWS header."""

    kid: str
    alg: str
    key: Any  # a cryptography private key object, as jwt.encode() takes it
    created: float


def thumbprint(jwk: dict[str, Any]) -> str:
    """RFC 7638 JWK thumbprint (SHA-256, base64url without padding): a kid derived from the key."""
    members = _THUMBPRINT_MEMBERS[jwk["kty"]]
    canonical = json.dumps({m: jwk[m] for m in members}, separators=(",", ":"), sort_keys=True)
    digest = hashlib.sha256(canonical.encode()).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode()


def generate_jwk(alg: str, created: float) -> dict[str, Any]:
    """A new private JWK record for `alg`, with kid, alg, use and iat."""
    if alg == "ES256":
        jwk = dict(ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP256R1()), as_dict=True))
    elif alg == "EdDSA":
        jwk = dict(OKPAlgorithm.to_jwk(ed25519.Ed25519PrivateKey.generate(), as_dict=True))
    elif alg == "RS256":
        jwk = dict(RSAAlgorithm.to_jwk(rsa.generate_private_key(65537, 2048), as_dict=True))
    else:
        raise KeyStoreError(f"unsupported internal_token.algorithm {alg!r}; choose one of ES256, EdDSA, RS256")
    jwk.update(kid=thumbprint(jwk), alg=alg, use="sig", iat=int(created))
    return jwk


def _private_key(jwk: dict[str, Any]) -> Any:
    alg = jwk["alg"]
    key: Any
    if alg == "ES256":
        key = ECAlgorithm.from_jwk(jwk)
    elif alg == "EdDSA":
        key = OKPAlgorithm.from_jwk(jwk)
    else:
        key = RSAAlgorithm.from_jwk(jwk)
    if not isinstance(key, _PRIVATE_TYPES[alg]):
        raise ValueError("not a private key")
    return key


class KeyStore:
    """The private JWKS file shared by every process (and replica) that mounts it.

    Readers never lock: writers replace the file atomically (os.replace), so a reader sees either
    the old or the new document. Writers serialise on an flock of a sibling `.lock` file and
    re-read the file inside it, so concurrent rotations never lose each other's keys and a
    rotation race yields one new key, not two. Every process picks the same current key: the
    newest by `iat` (file order breaks ties) among those not retired.
    """

    def __init__(self, cfg: InternalTokenConfig, *, clock: Callable[[], float] = time.time) -> None:
        if cfg.algorithm not in SUPPORTED_ALGORITHMS:
            raise KeyStoreError(
                f"unsupported internal_token.algorithm {cfg.algorithm!r}; choose one of ES256, EdDSA, RS256"
            )
        self._cfg = cfg
        self._clock = clock
        self.path = os.path.abspath(cfg.key_store)
        self._lock_path = self.path + ".lock"
        self._mutex = threading.Lock()  # in-process writers (rotation runs in a worker thread)
        self._records: list[dict[str, Any]] = []
        self._current: SigningKey | None = None
        self._signature: tuple[int, int, int, int] | None = None
        self._read_only = False
        self._problem: str | None = None  # the last problem check() logged, so each is logged once

    # -- reading ---------------------------------------------------------------------------

    def load(self) -> None:
        """Read the store, creating it (mode 0600) with one key when absent or empty."""
        with self._mutex:
            if self._read_file():
                return
            with self._exclusive():
                if not self._read_file():  # still absent/empty inside the lock: we create it
                    self._write([generate_jwk(self._cfg.algorithm, self._clock())])

    def current(self) -> SigningKey:
        if self._current is None:
            raise KeyStoreError(f"key store {self.path}: not loaded")
        return self._current

    def reload_if_changed(self) -> bool:
        """Re-read the file when another process replaced it; True when it did."""
        with self._mutex:
            if self._stat_signature() == self._signature:
                return False
            return self._read_file()

    def _stat_signature(self) -> tuple[int, int, int, int] | None:
        try:
            st = os.stat(self.path)
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise KeyStoreError(f"key store {self.path}: cannot stat: {exc.strerror}") from None
        return (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)

    def _read_file(self) -> bool:
        """Load the file into memory; False when it is absent or holds no key."""
        where = f"key store {self.path}"
        try:
            fd = os.open(self.path, os.O_RDONLY | getattr(os, "O_CLOEXEC", 0))
        except FileNotFoundError:
            return False
        except OSError as exc:
            raise KeyStoreError(f"{where}: cannot open: {exc.strerror}") from None
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise KeyStoreError(f"{where}: not a regular file")
            # Like ssh with private keys: refuse a file others could read or rewrite. Group read is
            # allowed for a Kubernetes Secret mounted with fsGroup and defaultMode 0440.
            if st.st_mode & 0o027:
                raise KeyStoreError(
                    f"{where}: mode {stat.S_IMODE(st.st_mode):04o} lets others read or write the private "
                    f"keys; run: chmod 600 {self.path}"
                )
            if st.st_uid not in (0, os.geteuid()):
                raise KeyStoreError(f"{where}: owned by uid {st.st_uid}, not by this user or root")
            with os.fdopen(fd, "rb", closefd=False) as fh:
                raw = fh.read()
        except OSError as exc:
            raise KeyStoreError(f"{where}: cannot read: {exc.strerror}") from None
        finally:
            os.close(fd)
        records = self._parse(raw, where)
        if not records:
            return False
        self._records = records
        self._current = self._pick_current(records)
        self._signature = (st.st_dev, st.st_ino, st.st_mtime_ns, st.st_size)
        # A file without its owner-write bit, or in a directory we cannot write (a Kubernetes Secret is
        # a read-only mount, files mode 0400/0440), is managed elsewhere: we read it, never rotate it.
        # The mode bit is checked, not just access(2), because root may write any file on a rw mount.
        self._read_only = not st.st_mode & stat.S_IWUSR or not os.access(os.path.dirname(self.path), os.W_OK)
        return True

    @staticmethod
    def _parse(raw: bytes, where: str) -> list[dict[str, Any]]:
        try:
            doc = json.loads(raw)
        except (ValueError, UnicodeDecodeError) as exc:
            raise KeyStoreError(f"{where}: not a valid JSON document ({exc})") from None
        if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
            raise KeyStoreError(f'{where}: expected a JSON object {{"keys": [...]}}')
        records: list[dict[str, Any]] = []
        for i, jwk in enumerate(doc["keys"]):
            at = f"{where}: keys[{i}]"
            if not isinstance(jwk, dict):
                raise KeyStoreError(f"{at}: not a JSON object")
            alg = jwk.get("alg")
            if alg not in SUPPORTED_ALGORITHMS:
                raise KeyStoreError(f"{at}: unsupported alg {alg!r}; supported: ES256, EdDSA, RS256")
            if jwk.get("kty") != _KTY_FOR_ALG[alg]:
                raise KeyStoreError(f"{at}: kty {jwk.get('kty')!r} does not fit alg {alg}")
            if not isinstance(jwk.get("kid"), str) or not jwk["kid"]:
                raise KeyStoreError(f"{at}: missing kid")
            for member in ("iat", "retired_at"):
                value = jwk.get(member, 0)
                if isinstance(value, bool) or not isinstance(value, int | float):
                    raise KeyStoreError(f"{at}: {member} must be a number")
            if "iat" not in jwk:
                raise KeyStoreError(f"{at}: missing iat")
            try:
                key = _private_key(jwk)
            except Exception:  # any parse failure of key material is the same operator problem
                raise KeyStoreError(f"{at}: not a valid private {alg} key") from None
            if isinstance(key, rsa.RSAPrivateKey) and key.key_size < MIN_RSA_BITS:
                # RFC 7518 s3.3: verifiers that enforce it (jose4j, Nimbus) would refuse every token it signs,
                # and the gateway itself no longer trusts such a key in an issuer's JWKS.
                raise KeyStoreError(f"{at}: a {key.key_size}-bit RSA key; RS256 needs at least {MIN_RSA_BITS} bits")
            records.append(jwk)
        return records

    @staticmethod
    def _pick_current(records: list[dict[str, Any]]) -> SigningKey:
        active = [r for r in records if "retired_at" not in r] or records
        # Newest by iat; the later entry wins a tie (it was appended later).
        rec = active[max(range(len(active)), key=lambda i: (active[i]["iat"], i))]
        return SigningKey(kid=rec["kid"], alg=rec["alg"], key=_private_key(rec), created=float(rec["iat"]))

    # -- writing ---------------------------------------------------------------------------

    @property
    def read_only(self) -> bool:
        """The store is managed elsewhere (read-only mount or file without owner write bit)."""
        return self._read_only

    def _refuse_if_read_only(self) -> None:
        if self._read_only:
            raise KeyStoreError(
                f"key store {self.path}: read-only (e.g. a mounted Secret), not rotating it here; rotate "
                f"a writable copy with `gateway keys rotate` and publish that"
            )

    def rotate(self) -> SigningKey:
        """Add a new key of the configured algorithm and make it current; retire the previous one."""
        self._refuse_if_read_only()  # before the lock: on a read-only mount even the lock file cannot be made
        with self._mutex, self._exclusive():
            self._read_file()
            self._refuse_if_read_only()
            self._rotate_locked()
            return self.current()

    def check(self) -> None:
        """The periodic job (every CHECK_INTERVAL): maybe_rotate() that never raises and never spams.

        Each distinct problem is logged once, and its end once; meanwhile the keys held in memory keep
        signing (an unwritable store must not take the gateway down, nor fill its log every second).
        """
        before = self._current.kid if self._current else None
        try:
            rotated = self.maybe_rotate()
        except KeyStoreError as exc:
            problem = str(exc)
            if problem != self._problem:
                self._problem = problem
                log.warning("%s; still signing with key %s", problem, before)
            return
        if self._problem is not None:
            self._problem = None
            log.info("key store %s: usable again", self.path)
        now = self._current.kid if self._current else None
        if now != before:
            how = "rotated (rotate_every)" if rotated else "picked up from the key store"
            log.info("signing key %s: %s, replacing %s", now, how, before)

    def maybe_rotate(self) -> bool:
        """Pick up another process's rotation; rotate when the current key is older than rotate_every.

        Returns True when this call rotated. Raises KeyStoreError when the file cannot be read or
        written; the keys held in memory stay in use.
        """
        self.reload_if_changed()
        if not self._due():
            return False
        self._refuse_if_read_only()
        with self._mutex, self._exclusive():
            self._read_file()
            if not self._due():  # another process rotated while we waited for the lock
                return False
            self._rotate_locked()
            return True

    def _due(self) -> bool:
        return self._current is None or self._clock() - self._current.created >= self._cfg.rotate_every

    def _rotate_locked(self) -> None:
        now = self._clock()
        keep_after = now - self._cfg.ttl - RETIRE_MARGIN
        records: list[dict[str, Any]] = []
        for rec in self._records:
            rec = dict(rec)
            rec.setdefault("retired_at", int(now))
            if rec["retired_at"] >= keep_after:  # tokens it signed may still be alive
                records.append(rec)
        records.append(generate_jwk(self._cfg.algorithm, now))
        self._write(records)

    @contextlib.contextmanager
    def _exclusive(self) -> Iterator[None]:
        try:
            os.makedirs(os.path.dirname(self.path), mode=0o700, exist_ok=True)
            fd = os.open(self._lock_path, os.O_RDWR | os.O_CREAT | getattr(os, "O_CLOEXEC", 0), 0o600)
        except OSError as exc:
            raise KeyStoreError(f"key store {self.path}: cannot create lock file: {exc.strerror}") from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield
        finally:
            os.close(fd)  # closing releases the flock

    def _write(self, records: list[dict[str, Any]]) -> None:
        directory, name = os.path.split(self.path)
        tmp = os.path.join(directory, f".{name}.{os.getpid()}.{threading.get_ident()}.tmp")
        data = json.dumps({"keys": records}, indent=1).encode()
        try:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            # O_EXCL + 0600 at creation: the private keys are never readable by others, not even briefly.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_CLOEXEC", 0), 0o600)
            try:
                os.write(fd, data)
                os.fsync(fd)
            finally:
                os.close(fd)
            os.replace(tmp, self.path)
            dir_fd = os.open(directory, os.O_RDONLY)
            try:
                os.fsync(dir_fd)
            except OSError as exc:  # some filesystems cannot fsync a directory
                if exc.errno not in (errno.EINVAL, errno.EBADF):
                    raise
            finally:
                os.close(dir_fd)
        except OSError as exc:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
            raise KeyStoreError(f"key store {self.path}: cannot write: {exc.strerror}") from None
        if not self._read_file():
            raise KeyStoreError(f"key store {self.path}: vanished right after it was written")

    # -- publishing ------------------------------------------------------------------------

    def public_jwks(self) -> dict[str, Any]:
        """The public JWKS: every key whose tokens may still be alive, newest first."""
        drop_before = self._clock() - self._cfg.ttl - RETIRE_MARGIN
        current = self._current.kid if self._current else None
        keys = []
        # Newest first, ties (two keys made in one second) broken by file order as _pick_current does,
        # so the first published key is always the one signing now.
        order = sorted(range(len(self._records)), key=lambda i: (self._records[i]["iat"], i), reverse=True)
        for rec in (self._records[i] for i in order):
            if rec["kid"] != current and rec.get("retired_at", float("inf")) < drop_before:
                continue
            public = {m: rec[m] for m in _PUBLIC_MEMBERS[rec["kty"]]}
            public.update(kid=rec["kid"], alg=rec["alg"], use="sig")
            keys.append(public)
        return {"keys": keys}

    def openid_configuration(self, issuer: str, jwks_uri: str) -> dict[str, Any]:
        """A minimal discovery document so standard verifiers find the JWKS from the issuer."""
        return discovery_document(issuer, jwks_uri, {rec["alg"] for rec in self._records} | {self._cfg.algorithm})


def discovery_document(issuer: str, jwks_uri: str, algs: set[str]) -> dict[str, Any]:
    """The internal issuer's OpenID discovery document (also served, keyless, with no internal_token)."""
    return {
        "issuer": issuer,
        "jwks_uri": jwks_uri,
        "id_token_signing_alg_values_supported": sorted(algs),
        "subject_types_supported": ["public"],
        "response_types_supported": ["id_token"],
    }
