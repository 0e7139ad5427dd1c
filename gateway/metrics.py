"""Every metric the gateway exports; the only module that imports prometheus_client.

With several worker processes, `PROMETHEUS_MULTIPROC_DIR` must be set before this module is
imported (cli.py does it); then each worker writes its samples to that directory and the admin
listener of any worker serves the aggregate.
"""

from __future__ import annotations

import os

from prometheus_client import (
    CONTENT_TYPE_LATEST,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
)
from prometheus_client import multiprocess as _mp

# Sub-millisecond to tens of seconds: a proxy's own latency and its upstreams' both fit.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

MULTIPROCESS = bool(os.environ.get("PROMETHEUS_MULTIPROC_DIR"))

requests_total = Counter(
    "gateway_requests_total", "Requests answered, by route, method and status.", ["route", "method", "status"]
)
request_duration_seconds = Histogram(
    "gateway_request_duration_seconds", "Time to answer a request, by route.", ["route"],
    buckets=LATENCY_BUCKETS,
)
upstream_duration_seconds = Histogram(
    "gateway_upstream_duration_seconds", "Time until the upstream's response headers, by upstream.",
    ["upstream"], buckets=LATENCY_BUCKETS,
)
auth_failures_total = Counter(
    "gateway_auth_failures_total", "Requests refused by authentication or authorization, by reason.",
    ["issuer", "reason"],
)
circuit_state = Gauge(
    "gateway_circuit_state", "Circuit breaker state per target: 0 closed, 1 open, 2 half-open.",
    ["upstream", "target"], multiprocess_mode="max",
)
jwks_refresh_total = Counter(
    "gateway_jwks_refresh_total", "JWKS fetches by issuer and result (ok, error).", ["issuer", "result"]
)
jwks_keys = Gauge(
    "gateway_jwks_keys", "Keys currently held for the issuer.", ["issuer"], multiprocess_mode="max"
)
revocation_checks_total = Counter(
    "gateway_revocation_checks_total",
    "Revocation checks by result (ok, revoked, backend_error_denied, backend_error_allowed).",
    ["result"],
)
revocation_backend_up = Gauge(
    "gateway_revocation_backend_up", "1 when the revocation backend is reachable and its view is live.",
    multiprocess_mode="min",
)
internal_tokens_minted_total = Counter(
    "gateway_internal_tokens_minted_total", "Internal tokens signed (cache misses of the minted-token cache)."
)
token_cache_hits_total = Counter(
    "gateway_token_cache_hits_total", "Requests whose token was found in the verified-token cache."
)
config_reloads_total = Counter(
    "gateway_config_reloads_total", "Configuration reloads by result (ok, error).", ["result"]
)
inflight_requests = Gauge(
    "gateway_inflight_requests", "Requests being answered now.", multiprocess_mode="livesum"
)


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics and its content type; aggregates workers when multiprocess."""
    if MULTIPROCESS:
        registry = CollectorRegistry()
        _mp.MultiProcessCollector(registry)  # type: ignore[no-untyped-call]
        return generate_latest(registry), CONTENT_TYPE_LATEST
    return generate_latest(), CONTENT_TYPE_LATEST


def mark_process_dead(pid: int) -> None:
    """Drop a finished worker's live gauges (multiprocess mode only)."""
    if MULTIPROCESS:
        _mp.mark_process_dead(pid)  # type: ignore[no-untyped-call]
