"""Shared fixtures: each support module owns one kind of real part (issuer, Redis, upstreams)."""

pytest_plugins = [
    "tests.support.issuer",
    "tests.support.redis_server",
    "tests.support.upstreams",
    "tests.support.gateway",
]
