"""The gateway's signing key store: file mode, public JWKS, rotation, sharing between processes, bad files."""

from __future__ import annotations

import json
import os
import stat
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gateway.config_types import InternalTokenConfig
from gateway.errors import KeyStoreError
from gateway.keys import RETIRE_MARGIN, SUPPORTED_ALGORITHMS, KeyStore, thumbprint

REPO = Path(__file__).resolve().parent.parent
PRIVATE_MEMBERS = {"d", "p", "q", "dp", "dq", "qi", "oth", "k"}


class Clock:
    def __init__(self, now: float = 1_700_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def make(path: Path, clock: Clock | None = None, **kw: object) -> KeyStore:
    cfg = InternalTokenConfig(key_store=str(path), **kw)  # type: ignore[arg-type]
    store = KeyStore(cfg, clock=clock or Clock())
    store.load()
    return store


def file_keys(path: Path) -> list[dict[str, object]]:
    return json.loads(path.read_text())["keys"]  # type: ignore[no-any-return]


def test_created_with_mode_0600_in_a_new_directory(tmp_path: Path) -> None:
    path = tmp_path / "var" / "sub" / "keys.json"
    store = make(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    keys = file_keys(path)
    assert len(keys) == 1 and keys[0]["kid"] == store.current().kid
    assert "d" in keys[0]  # the private JWKS really holds the private key
    # A second store on the same file loads the same key rather than creating another.
    assert make(path).current().kid == store.current().kid
    assert len(file_keys(path)) == 1
    store.rotate()
    assert stat.S_IMODE(path.stat().st_mode) == 0o600  # rewrites keep the mode
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]


@pytest.mark.parametrize("alg", SUPPORTED_ALGORITHMS)
def test_public_jwks_has_no_private_member(tmp_path: Path, alg: str) -> None:
    clock = Clock()
    store = make(tmp_path / "k.json", clock, algorithm=alg)
    clock.now += 10
    store.rotate()
    jwks = store.public_jwks()
    assert len(jwks["keys"]) == 2
    for jwk in jwks["keys"]:
        assert not PRIVATE_MEMBERS & set(jwk), jwk
        assert jwk["alg"] == alg and jwk["use"] == "sig"
        assert jwk["kid"] == thumbprint(jwk)  # RFC 7638: anyone can recompute the kid
        assert "iat" not in jwk and "retired_at" not in jwk
    assert jwks["keys"][0]["kid"] == store.current().kid  # newest first
    text = json.dumps(jwks)
    for rec in file_keys(tmp_path / "k.json"):
        assert str(rec["d"]) not in text
    assert store.current().alg == alg


def test_thumbprint_matches_rfc7638_example() -> None:
    # RFC 7638 section 3.1 example key and its thumbprint.
    jwk = {
        "kty": "RSA",
        "n": "0vx7agoebGcQSuuPiLJXZptN9nndrQmbXEps2aiAFbWhM78LhWx4cbbfAAtVT86zwu1RK7aPFFxuhDR1L6tSoc_BJECP"
        "ebWKRXjBZCiFV4n3oknjhMstn64tZ_2W-5JsGY4Hc5n9yBXArwl93lqt7_RN5w6Cf0h4QyQ5v-65YGjQR0_FDW2QvzqY368QQ"
        "MicAtaSqzs8KJZgnYb9c7d0zgdAZHzu6qMQvRL5hajrn1n91CbOpbISD08qNLyrdkt-bFTWhAI4vMQFh6WeZu0fM4lFd2NcRw"
        "r3XPksINHaQ-G_xBniIqbw0Ls1jF44-csFCur-kEgU8awapJzKnqDKgw",
        "e": "AQAB",
        "alg": "RS256",
        "kid": "2011-04-29",
    }
    assert thumbprint(jwk) == "NzbLsXh8uDCcd-6MNwXF4W_7noWXFZAfHkxZsRGC9Xs"


def test_manual_rotation_keeps_old_key_until_its_tokens_expired(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path / "k.json", clock, ttl=60.0)
    old = store.current()
    clock.now += 5
    new = store.rotate()
    assert new.kid != old.kid and store.current() == new

    def published() -> list[str]:
        return [k["kid"] for k in store.public_jwks()["keys"]]

    assert published() == [new.kid, old.kid]
    retired_at = clock.now
    clock.now = retired_at + 60 + RETIRE_MARGIN  # the last token the old key signed is just expired
    assert published() == [new.kid, old.kid]
    clock.now += 1
    assert published() == [new.kid]  # dropped from the document ...
    assert old.kid in [k["kid"] for k in file_keys(tmp_path / "k.json")]
    third = store.rotate()  # ... and from the file at the next write
    kids = [k["kid"] for k in file_keys(tmp_path / "k.json")]
    assert old.kid not in kids and set(kids) == {new.kid, third.kid}
    assert published() == [third.kid, new.kid]


def test_rotate_every_with_injected_clock(tmp_path: Path) -> None:
    clock = Clock()
    store = make(tmp_path / "k.json", clock, rotate_every=3600.0, ttl=60.0)
    first = store.current().kid
    clock.now += 3599
    assert store.maybe_rotate() is False and store.current().kid == first
    clock.now += 1
    assert store.maybe_rotate() is True
    second = store.current().kid
    assert second != first
    assert store.maybe_rotate() is False  # the new key is fresh
    clock.now += 3600
    assert store.maybe_rotate() is True
    kids = [k["kid"] for k in store.public_jwks()["keys"]]
    assert kids[0] == store.current().kid and first not in kids and second in kids


def test_two_stores_on_one_file_agree_after_either_rotates(tmp_path: Path) -> None:
    clock = Clock()
    a = make(tmp_path / "k.json", clock)
    b = make(tmp_path / "k.json", clock)
    assert a.current().kid == b.current().kid
    clock.now += 1
    a.rotate()
    assert b.current().kid != a.current().kid  # b has not looked yet
    assert b.maybe_rotate() is False  # re-reads the replaced file, no rotation of its own
    assert b.current().kid == a.current().kid
    assert b.public_jwks() == a.public_jwks()
    clock.now += 1
    b.rotate()
    a.reload_if_changed()
    assert a.current().kid == b.current().kid
    assert len(file_keys(tmp_path / "k.json")) == 3  # nobody lost a key


def test_concurrent_stores_in_one_process_both_due_rotate_once(tmp_path: Path) -> None:
    clock = Clock()
    a = make(tmp_path / "k.json", clock, rotate_every=100.0)
    b = make(tmp_path / "k.json", clock, rotate_every=100.0)
    clock.now += 100
    assert a.maybe_rotate() is True
    assert b.maybe_rotate() is False  # due by its stale view, but the re-check sees a's fresh key
    assert len(file_keys(tmp_path / "k.json")) == 2


CHILD = r"""
import json, os, sys, time
from gateway.config_types import InternalTokenConfig
from gateway.keys import KeyStore
path, go, out, mode, arg = sys.argv[1:6]
now = float(arg)
store = KeyStore(InternalTokenConfig(key_store=path, ttl=3600.0, rotate_every=100.0),
                 clock=(lambda: now) if mode == "maybe" else time.time)
store.load()
open(out + ".ready", "w").close()
deadline = time.monotonic() + 20
while not os.path.exists(go) and time.monotonic() < deadline:
    time.sleep(0.0005)
if mode == "maybe":
    result = [store.maybe_rotate()]
else:
    result = [store.rotate().kid for _ in range(int(arg))]
with open(out + ".tmp", "w") as fh:
    json.dump(result, fh)
os.replace(out + ".tmp", out)
while not os.path.exists(go + "2") and time.monotonic() < deadline:
    time.sleep(0.0005)
store.reload_if_changed()
print(json.dumps({"result": result, "current": store.current().kid}))
"""


def run_pair(tmp_path: Path, mode: str, arg: str) -> list[dict[str, object]]:
    path, go = tmp_path / "k.json", tmp_path / "go"
    outs = [tmp_path / f"out{i}" for i in range(2)]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", CHILD, str(path), str(go), str(out), mode, arg],
            cwd=REPO, stdout=subprocess.PIPE, text=True,
        )
        for out in outs
    ]
    try:
        deadline = time.monotonic() + 20
        while not all(Path(f"{o}.ready").exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.005)
        go.touch()  # both start their rotations at once
        while not all(o.exists() for o in outs) and time.monotonic() < deadline:
            time.sleep(0.005)
        Path(f"{go}2").touch()  # both finished writing: now each re-reads
        return [json.loads(p.communicate(timeout=20)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()


def test_concurrent_rotation_from_two_processes_loses_no_key(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    first = make(path, Clock(time.time())).current().kid
    n = 8
    views = run_pair(tmp_path, "rotate", str(n))
    kids = [k["kid"] for k in file_keys(path)]
    minted = [kid for v in views for kid in v["result"]]  # type: ignore[attr-defined]
    assert len(minted) == 2 * n and set(kids) == {first, *minted}
    assert len(kids) == 1 + 2 * n
    active = [k for k in file_keys(path) if "retired_at" not in k]
    assert len(active) == 1
    # Both processes, and a fresh reader, agree on one current key: the last one written.
    assert views[0]["current"] == views[1]["current"] == active[0]["kid"]
    assert make(path).current().kid == active[0]["kid"]
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_rotation_race_between_processes_makes_one_new_key(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    make(path, Clock(1000.0), rotate_every=100.0)
    views = run_pair(tmp_path, "maybe", "1100.0")  # both see the key as due at the same moment
    assert sorted(v["result"][0] for v in views) == [False, True]  # type: ignore[index]
    keys = file_keys(path)
    assert len(keys) == 2
    assert views[0]["current"] == views[1]["current"] == keys[-1]["kid"]


def test_corrupt_json_names_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.write_text('{"keys": [')
    path.chmod(0o600)
    with pytest.raises(KeyStoreError, match=str(path)) as info:
        make(path)
    assert "JSON" in str(info.value) and "\n" not in str(info.value)


@pytest.mark.parametrize(
    "doc, words",
    [
        ({"nokeys": []}, "expected a JSON object"),
        ({"keys": ["x"]}, "keys[0]: not a JSON object"),
        ({"keys": [{"kty": "oct", "alg": "HS256", "k": "c2VjcmV0", "kid": "a", "iat": 1}]}, "unsupported alg"),
        ({"keys": [{"kty": "EC", "alg": "ES256", "crv": "P-256", "x": "AA", "y": "AA", "d": "AA", "kid": "a",
                    "iat": 1}]}, "not a valid private ES256 key"),
    ],
)
def test_invalid_store_content_names_the_file(tmp_path: Path, doc: object, words: str) -> None:
    path = tmp_path / "k.json"
    path.write_text(json.dumps(doc))
    path.chmod(0o600)
    with pytest.raises(KeyStoreError) as info:
        make(path)
    assert str(path) in str(info.value) and words in str(info.value)


def test_public_key_without_private_part_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    store = make(path)
    public = store.public_jwks()["keys"][0]
    path.write_text(json.dumps({"keys": [{**public, "iat": 1}]}))
    with pytest.raises(KeyStoreError, match="not a valid private ES256 key"):
        make(path)


def test_directory_in_place_of_the_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    path.mkdir()
    with pytest.raises(KeyStoreError, match=f"{path}: not a regular file"):
        make(path)


def test_group_or_world_accessible_file_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    make(path)
    path.chmod(0o644)
    with pytest.raises(KeyStoreError, match=rf"{path}: mode 0644 .*chmod 600"):
        make(path)
    path.chmod(0o440)  # group-readable, as a Kubernetes Secret with fsGroup mounts it: accepted
    make(path)


def test_unopenable_path(tmp_path: Path) -> None:
    (tmp_path / "file").write_text("")
    path = tmp_path / "file" / "k.json"  # a parent that is a file: ENOTDIR, even for root
    with pytest.raises(KeyStoreError, match=f"{path}: cannot open"):
        make(path)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads a file whatever its mode")
def test_unreadable_file(tmp_path: Path) -> None:
    path = tmp_path / "k.json"
    make(path)
    path.chmod(0o000)
    with pytest.raises(KeyStoreError, match=f"{path}: cannot open"):
        make(path)


def test_read_only_store_cannot_rotate_but_keeps_signing(tmp_path: Path) -> None:
    clock = Clock()
    path = tmp_path / "k.json"
    store = make(path, clock, rotate_every=10.0)
    kid = store.current().kid
    (tmp_path / "k.json.lock").unlink()
    (tmp_path / "k.json.lock").mkdir()  # the lock cannot be opened for writing
    clock.now += 10
    with pytest.raises(KeyStoreError, match=str(path)):
        store.maybe_rotate()
    assert store.current().kid == kid


def test_openid_configuration(tmp_path: Path) -> None:
    store = make(tmp_path / "k.json", algorithm="EdDSA")
    doc = store.openid_configuration("https://gateway.internal", "https://admin/.well-known/jwks.json")
    assert doc["issuer"] == "https://gateway.internal"
    assert doc["jwks_uri"] == "https://admin/.well-known/jwks.json"
    assert doc["id_token_signing_alg_values_supported"] == ["EdDSA"]


def test_mode_0400_store_is_read_only_never_rotated_and_logged_once(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # A Kubernetes Secret mount: files 0400/0440, no owner write bit. Root could still write it, so the
    # store goes by the mode bit, not access(2): it reads the file but never rewrites it.
    clock = Clock()
    path = tmp_path / "k.json"
    make(path, clock)
    path.chmod(0o400)
    before = path.read_bytes()
    store = make(path, clock, rotate_every=10.0)
    assert store.read_only
    kid = store.current().kid
    with pytest.raises(KeyStoreError, match=rf"{path}: read-only"):
        store.rotate()  # `gateway keys rotate` on the mount: a clear refusal
    clock.now += 10
    caplog.set_level("INFO", logger="gateway.keys")
    for _ in range(50):  # fifty check intervals past rotate_every
        store.check()
        clock.now += 1
    warnings = [r for r in caplog.records if r.levelname == "WARNING"]
    assert len(warnings) == 1 and "read-only" in warnings[0].getMessage()
    assert store.current().kid == kid and path.read_bytes() == before
    # The operator publishes a rotated copy (as an updated Secret would): picked up, logged once.
    path.chmod(0o600)
    writable = make(path, clock)
    writable.rotate()
    path.chmod(0o400)
    caplog.clear()
    store.check()
    assert store.current().kid == writable.current().kid != kid
    assert any("picked up" in r.getMessage() for r in caplog.records)


def test_check_logs_a_failure_once_and_its_recovery(tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    clock = Clock()
    path = tmp_path / "k.json"
    store = make(path, clock, rotate_every=10.0)
    lock = tmp_path / "k.json.lock"
    lock.unlink()
    lock.mkdir()  # rotation cannot take the lock: fails every time
    clock.now += 10
    caplog.set_level("INFO", logger="gateway.keys")
    for _ in range(5):
        store.check()
    assert len([r for r in caplog.records if r.levelname == "WARNING"]) == 1
    lock.rmdir()
    store.check()
    messages = [r.getMessage() for r in caplog.records]
    assert any("usable again" in m for m in messages)
    assert any("rotated (rotate_every)" in m for m in messages)


def test_first_published_key_is_the_current_one_even_within_one_second(tmp_path: Path) -> None:
    clock = Clock()  # the clock does not move: every key has the same iat
    store = make(tmp_path / "k.json", clock)
    for _ in range(3):
        key = store.rotate()
        assert store.public_jwks()["keys"][0]["kid"] == key.kid == store.current().kid
