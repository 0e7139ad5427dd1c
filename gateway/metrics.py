"""Every metric the gateway exports; the only module that imports prometheus_client.

Multiprocess: a worker started by the `--workers N` supervisor (workers.py) has both
`PROMETHEUS_MULTIPROC_DIR` and `GATEWAY_SUPERVISOR_PID` in its environment; it writes its samples to
that directory and the admin listener of any worker serves the aggregate of all of them. Every other
process (a single `gateway run`, `gateway revoke`, tests) keeps its metrics in memory even when
`PROMETHEUS_MULTIPROC_DIR` is set: it is the only writer, so files would add nothing but stale
samples from earlier processes (and a short-lived CLI command would leave its zeros in the aggregate).
"""

from __future__ import annotations

import contextlib
import glob
import os
import struct
from bisect import bisect_left
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    disable_created_metrics,
    generate_latest,
)
from prometheus_client import multiprocess as _mp
from prometheus_client import values as _values
from prometheus_client.metrics_core import Metric
from prometheus_client.registry import Collector

MULTIPROC_ENV = "PROMETHEUS_MULTIPROC_DIR"
WORKER_ENV = "GATEWAY_SUPERVISOR_PID"  # set by workers.supervise for its children only

MULTIPROC_DIR = os.environ.get(MULTIPROC_ENV) or None
MULTIPROCESS = MULTIPROC_DIR is not None and bool(os.environ.get(WORKER_ENV))
INDEX_ENV = "GATEWAY_WORKER_INDEX"  # 0, 1, ... for workers.supervise's children
COUNT_ENV = "GATEWAY_WORKER_COUNT"  # how many workers.supervise started (each child runs with --workers 1)
# Every worker reloads on the one SIGHUP the supervisor passes on: only the first counts it, so
# gateway_config_reloads_total summed over the workers counts reloads, not reloads times workers.
COUNTS_RELOADS = not MULTIPROCESS or os.environ.get(INDEX_ENV, "0") == "0"



class LoopValue(_values.MutexValue):
    """An in-memory metric value without the per-update threading.Lock.

    Every update comes from the event-loop thread (the request path, breakers, JWKS and revocation
    tasks; the executor threads, key checks and config parsing, never touch a metric), and a scrape
    reads on that same thread: a lock per inc() (three to five per request) guards nothing there.
    """

    def inc(self, amount: float) -> None:
        self._value += amount

    def set(self, value: float, timestamp: float | None = None) -> None:
        self._value = value

    def get(self) -> float:
        return self._value


if not MULTIPROCESS:
    # prometheus_client picks file-backed values whenever the variable is set; a process that is not a
    # supervised worker must not write there (see the module docstring), so it gets in-memory values.
    _values.ValueClass = LoopValue

# `*_created` series would double the series count for nothing a dashboard uses, and the multiprocess
# collector never emits them: without them, one worker and N workers expose the same families.
disable_created_metrics()  # type: ignore[no-untyped-call]

# The classic text format: every name here is a legacy name, so generate_latest's body is exactly
# 0.0.4, which every Prometheus parses (prometheus-client >= 0.22 announces 1.0.0 as "latest").
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"

# Sub-millisecond to tens of seconds: a proxy's own latency and its upstreams' both fit.
LATENCY_BUCKETS = (
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0,
)

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
# Gauges across workers: each worker has its own breakers, key caches and Redis view. The "live"
# modes drop a worker's value once the supervisor marks it dead, so an exited worker cannot hold a
# breaker "open" or the backend "down" forever. Worst case wins: max for breakers, min for the backend.
circuit_state = Gauge(
    "gateway_circuit_state", "Circuit breaker state per target: 0 closed, 1 open, 2 half-open.",
    ["upstream", "target"], multiprocess_mode="livemax",
)
jwks_refresh_total = Counter(
    "gateway_jwks_refresh_total", "JWKS fetches by issuer and result (ok, error).", ["issuer", "result"]
)
jwks_keys = Gauge(
    "gateway_jwks_keys", "Keys currently held for the issuer.", ["issuer"], multiprocess_mode="livemax"
)
revocation_checks_total = Counter(
    "gateway_revocation_checks_total",
    "Revocation checks by result (ok, revoked, backend_error_denied, backend_error_allowed).",
    ["result"],
)
revocation_backend_up = Gauge(
    "gateway_revocation_backend_up", "1 when the revocation backend is reachable and its view is live.",
    multiprocess_mode="livemin",
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

_DECLARED = (
    requests_total, request_duration_seconds, upstream_duration_seconds, auth_failures_total, circuit_state,
    jwks_refresh_total, jwks_keys, revocation_checks_total, revocation_backend_up, internal_tokens_minted_total,
    token_cache_hits_total, config_reloads_total, inflight_requests,
)


def incrementer(metric: Any) -> Callable[[float], None]:
    """`metric.inc` (a Counter's or Gauge's series) for the request path: its value's own `inc`.

    prometheus_client's inc() checks on every call that the series has its labels and that the amount
    is not negative, and looks for an exemplar: 3 Python calls around one addition, four to six times a
    request. A caller that resolved the labels once and passes a constant amount needs none of that.
    (`dec` is `incrementer(g)(-1)`.) Same value object, so scrapes and the multiprocess files see it.
    """
    metric._raise_if_not_observable()  # labels resolved: what prometheus_client would check per call
    return _lean_inc(metric._value)


_PACK_DOUBLE = struct.Struct("d").pack


def _lean_inc(value: Any) -> Callable[[float], None]:
    """`value.inc`, and for a supervised worker's file-backed value the same write without its overhead.

    prometheus_client's MmapedValue.inc takes a process-wide threading.Lock, calls os.getpid() to notice a
    fork, and writes the value and a zero timestamp through two more Python calls: about 450 ns, nine
    times a request in headers mode, against 80 ns for this. Neither guard has work here: only the
    event-loop thread updates a metric (see LoopValue), and a worker is exec'd by the supervisor, never
    forked once its metrics exist. So this writes the value's 8 bytes where the library keeps them. A
    key's place in the file never moves; the map object does when the file grows (a new label value),
    so it is read on every call. A library whose value lacks these parts gets its own inc()."""
    if not MULTIPROCESS:
        return value.inc  # type: ignore[no-any-return]  # LoopValue: already one addition
    mapped = getattr(value, "_file", None)
    if not (hasattr(mapped, "_m") and isinstance(getattr(mapped, "_positions", None), dict)):
        return value.inc  # type: ignore[no-any-return]
    value.inc(0)  # the library gives the key its place in the file (and a timestamp of 0, as inc() keeps)
    pos = mapped._positions[value._key]  # type: ignore[union-attr]
    if mapped._m[pos:pos + 8] != _PACK_DOUBLE(value._value):  # type: ignore[union-attr]
        return value.inc  # type: ignore[no-any-return]  # not the layout this was written for: the library's way

    def inc(amount: float) -> None:
        value._value = total = value._value + amount
        mapped._m[pos:pos + 8] = _PACK_DOUBLE(total)  # type: ignore[union-attr]

    return inc


def observer(histogram: Any) -> Callable[[float], None]:
    """`histogram.observe` for the request path: the bucket found by bisection instead of a Python loop
    over 17 bounds, and no per-call label check (see incrementer). The buckets are stored
    non-cumulative as prometheus_client stores them: the first bucket whose upper bound is >= amount."""
    histogram._raise_if_not_observable()
    bounds = tuple(histogram._upper_bounds)
    buckets = tuple(_lean_inc(b) for b in histogram._buckets)
    add_sum = _lean_inc(histogram._sum)

    def observe(amount: float) -> None:
        add_sum(amount)
        buckets[bisect_left(bounds, amount)](1)

    return observe


class _Aggregate(Collector):
    """Every worker's samples, summed, plus an empty family for each metric no worker has a sample of
    yet: the multiprocess collector knows only the files, so `gateway_requests_total` and
    `gateway_request_duration_seconds` were missing from a fresh `--workers N` scrape, where one worker
    already names and types them (SPEC 7: every metric, correct with --workers > 1)."""

    def __init__(self, directory: str) -> None:
        self._directory = directory

    def collect(self) -> Iterable[Metric]:
        files = glob.glob(os.path.join(glob.escape(self._directory), "*.db"))
        # prometheus-client creates a worker's file, then sizes it: read in between, a 0-byte file raised
        # struct.error and made the whole scrape a 500 (prometheus/client_python#1199). It holds no sample
        # yet. (A live gauge's file deleted meanwhile by mark_process_dead is skipped by merge itself.)
        files = [f for f in files if _has_header(f)]
        found: list[Metric] = list(_mp.MultiProcessCollector.merge(files))  # type: ignore[no-untyped-call]
        names = {family.name for family in found}
        yield from found
        for metric in _DECLARED:
            yield from (family for family in metric.describe() if family.name not in names)


def _has_header(path: str) -> bool:
    try:
        return os.path.getsize(path) >= 8  # the used-bytes header; a sized file is zeros, then samples
    except FileNotFoundError:
        return False


def drop_series(gauge: Gauge, *labels: str) -> None:
    """A gauge's series whose subject left the configuration (an issuer, an upstream target): set to 0
    first, since with --workers the value lives in the worker's file, which remove() does not touch (a
    live gauge of 0 adds nothing to the aggregate); then removed from this process's exposition."""
    gauge.labels(*labels).set(0)
    with contextlib.suppress(KeyError):
        gauge.remove(*labels)


def render() -> tuple[bytes, str]:
    """The exposition text for /metrics and its content type; the aggregate of all workers when supervised."""
    if MULTIPROCESS:
        assert MULTIPROC_DIR is not None  # MULTIPROCESS says so
        registry = CollectorRegistry()
        registry.register(_Aggregate(MULTIPROC_DIR))
        return generate_latest(registry), CONTENT_TYPE
    return generate_latest(REGISTRY), CONTENT_TYPE


def reset_multiprocess_dir(directory: str) -> None:
    """Create `directory` or delete the sample files in it: files of an earlier run would be summed
    with the new workers' (counters jumping, a dead run's breaker still "open"). Only prometheus-client's
    own `*.db` files go, so a wrongly chosen directory loses nothing else."""
    os.makedirs(directory, mode=0o700, exist_ok=True)
    for path in glob.glob(os.path.join(glob.escape(directory), "*.db")):
        os.remove(path)


def mark_process_dead(pid: int, directory: str | None = None) -> None:
    """Drop a finished worker's live gauges (its counters stay: what it counted still happened)."""
    directory = directory or (MULTIPROC_DIR if MULTIPROCESS else None)
    if directory is not None:
        _mp.mark_process_dead(pid, directory)  # type: ignore[no-untyped-call]


# Series that exist from the start at 0: a counter whose series is born with its first increment shows
# no increase() for that first event, so "config reload failed" would stay silent on the first failure.
for _result in ("ok", "error"):
    config_reloads_total.labels(result=_result)
# The reasons raised before any issuer is known (no/unreadable token, unknown iss), so the family is
# there before the first failure; per-issuer series appear with their first failure.
for _reason in ("missing_token", "malformed", "wrong_issuer"):
    auth_failures_total.labels(issuer="-", reason=_reason)
