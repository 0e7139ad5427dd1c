"""Regressions found by fuzzing the loader: every bad file is a ConfigError naming FILE:LINE: key, never another
exception, and a value that cannot work at `gateway run` is refused at load."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.test_config import MINIMAL, problems


@pytest.mark.parametrize("value", [
    "!!int abc", "!!float abc", "!!bool maybe", "!!timestamp nope", "!!binary ???", "!!seq x", "!!map x",
    "!!python/object:os.system x", "!foo x", "0b_", "0x_", "2020-13-45", "2001-12-14t99:99:99",
])
def test_a_scalar_yaml_cannot_build_is_a_problem_of_its_key(value: str) -> None:
    (p,) = problems(MINIMAL + f"server:\n  workers: {value}\n")
    assert p.startswith("gw.yaml:13: server.workers: ")


def test_deep_nesting_is_a_config_error() -> None:
    assert problems("[" * 2000 + "]" * 2000)[0].startswith("gw.yaml:1: (yaml): ")


def test_listen_port_must_be_ascii_digits() -> None:
    assert problems(MINIMAL + "server: {listen: '127.0.0.1:\u00b2'}\n")[0].startswith("gw.yaml:12: server.listen: ")


@pytest.mark.parametrize("key", ["shutdown_grace"])
def test_a_duration_too_long_for_a_float_is_refused(key: str) -> None:
    (p,) = problems(MINIMAL + f"server: {{{key}: {'9' * 400}s}}\n")
    assert p.startswith(f"gw.yaml:12: server.{key}: ")


def test_leeway_cannot_be_infinite() -> None:
    text = MINIMAL.replace("audiences: [api]", f"audiences: [api]\n    leeway: {'1' * 400}h")
    assert problems(text)[0].startswith("gw.yaml:5: issuers[0].leeway: ")


@pytest.mark.parametrize("target", ["http://127.0.0.1:99999", "http://x:abc", "'http://[::1'"])
def test_a_target_yarl_cannot_parse_is_refused_at_load(target: str) -> None:
    (p,) = problems(MINIMAL.replace("http://127.0.0.1:8081", target))
    assert p.startswith("gw.yaml:7: upstreams.orders.targets[0]: ")


def test_a_redis_url_with_a_bad_port_is_refused_at_load() -> None:
    (p,) = problems(MINIMAL + "revocation: {redis_url: 'redis://127.0.0.1:99999/0'}\n")
    assert p.startswith("gw.yaml:12: revocation.redis_url: ")


def test_admin_and_server_cannot_share_an_address() -> None:
    (p,) = problems(MINIMAL + "server: {listen: 127.0.0.1:9090}\nadmin: {listen: 127.0.0.1:9090}\n")
    assert p.startswith("gw.yaml:13: admin.listen: ")


def test_a_lone_surrogate_is_refused() -> None:
    (p,) = problems(MINIMAL.replace("name: orders", 'name: "orders\\ud800"'))
    assert p.startswith("gw.yaml:9: routes[0].name: ")


@pytest.mark.parametrize(("extra", "key"), [
    ("internal_token: {key_store: %s}\n", "internal_token.key_store"),
    ("server: {tls: {cert_file: %s, key_file: /nonexistent}}\n", "server.tls.cert_file"),
])
def test_a_file_name_too_long_is_a_problem_of_its_key(extra: str, key: str) -> None:
    ps = problems(MINIMAL + extra % ("x" * 300))
    assert any(p.startswith(f"gw.yaml:12: {key}: ") for p in ps), ps


@pytest.mark.parametrize("workers", [0, 257, 100000000])
def test_workers_are_bounded(workers: int) -> None:
    """A typo in workers must not fork processes until the machine falls over."""
    (p,) = problems(MINIMAL + f"server: {{workers: {workers}}}\n")
    assert p.startswith("gw.yaml:12: server.workers: ")


def test_a_key_store_that_is_a_directory_is_refused(tmp_path: Path) -> None:
    (p,) = problems(MINIMAL + f"internal_token: {{key_store: {tmp_path}}}\n")
    assert p == (f"gw.yaml:12: internal_token.key_store: {tmp_path} is a directory; "
                 "expected the path of a JSON key store file")
