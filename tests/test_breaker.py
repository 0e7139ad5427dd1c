"""The circuit breaker state machine, driven by a fake clock."""

from __future__ import annotations

from gateway.breaker import CLOSED, HALF_OPEN, OPEN, CircuitBreaker
from gateway.config_types import BreakerConfig


class FakeClock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


def make(
    failures: int = 3, window: float = 10.0, open_for: float = 30.0, half_open: int = 1
) -> tuple[CircuitBreaker, FakeClock, list[int]]:
    clock = FakeClock()
    changes: list[int] = []
    cfg = BreakerConfig(failures=failures, window=window, open_for=open_for, half_open_requests=half_open)
    return CircuitBreaker(cfg, clock=clock, on_change=changes.append), clock, changes


def test_starts_closed_and_allows() -> None:
    b, _, changes = make()
    assert b.state == CLOSED
    assert all(b.allow() for _ in range(100))
    assert b.retry_after() == 0.0
    assert changes == []


def test_opens_at_threshold_within_window() -> None:
    b, clock, changes = make(failures=3, window=10.0)
    b.record_failure()
    clock.advance(4)
    b.record_failure()
    assert b.state == CLOSED
    clock.advance(4)
    b.record_failure()  # three failures within 8 s <= 10 s
    assert b.state == OPEN
    assert changes == [OPEN]
    assert not b.allow()


def test_failures_outside_window_are_forgotten() -> None:
    b, clock, changes = make(failures=3, window=10.0)
    for _ in range(10):  # one failure every 6 s: never three within 10 s
        b.record_failure()
        clock.advance(6)
    assert b.state == CLOSED
    assert changes == []
    b.record_failure()
    clock.advance(1)
    b.record_failure()  # now the last three span 7 s
    assert b.state == OPEN


def test_successes_do_not_reset_the_window_count_when_closed() -> None:
    # A sliding window counts failures in time, not consecutive ones: a flapping target still trips.
    b, _, _ = make(failures=3)
    for _ in range(3):
        b.record_failure()
        b.record_success()
    assert b.state == OPEN


def test_open_refuses_until_open_for_then_half_opens() -> None:
    b, clock, changes = make(failures=1, open_for=30.0)
    b.record_failure()
    assert b.state == OPEN
    assert b.retry_after() == 30.0
    clock.advance(29.5)
    assert not b.allow()
    assert b.retry_after() == 0.5
    clock.advance(0.5)
    assert b.retry_after() == 0.0
    assert b.state == HALF_OPEN
    assert changes == [OPEN, HALF_OPEN]


def test_half_open_lets_exactly_the_probe_count_through() -> None:
    b, clock, _ = make(failures=1, open_for=5.0, half_open=2)
    b.record_failure()
    clock.advance(5)
    assert [b.allow() for _ in range(5)] == [True, True, False, False, False]
    b.release()  # one probe went away without a verdict: its slot is free again
    assert b.allow()
    assert not b.allow()
    assert b.state == HALF_OPEN


def test_probe_success_closes() -> None:
    b, clock, changes = make(failures=2, open_for=5.0)
    b.record_failure()
    b.record_failure()
    clock.advance(5)
    assert b.allow()
    b.record_success()
    assert b.state == CLOSED
    assert changes == [OPEN, HALF_OPEN, CLOSED]
    # The failures before opening are forgotten: it takes a full threshold again.
    b.record_failure()
    assert b.state == CLOSED
    b.record_failure()
    assert b.state == OPEN


def test_probe_failure_reopens_for_a_full_period() -> None:
    b, clock, changes = make(failures=5, open_for=5.0)
    for _ in range(5):
        b.record_failure()
    clock.advance(7)
    assert b.allow()
    b.record_failure()  # one failure is enough when half-open
    assert b.state == OPEN
    assert b.retry_after() == 5.0
    assert not b.allow()
    assert changes == [OPEN, HALF_OPEN, OPEN]
    clock.advance(5)
    assert b.allow()
    b.record_success()
    assert changes == [OPEN, HALF_OPEN, OPEN, HALF_OPEN, CLOSED]


def test_verdicts_while_open_are_ignored() -> None:
    b, clock, changes = make(failures=1, open_for=5.0)
    b.record_failure()
    b.record_success()  # a request admitted before the trip answered late
    b.record_failure()
    assert b.state == OPEN
    assert b.retry_after() == 5.0  # a late failure does not extend the open period
    assert changes == [OPEN]
    clock.advance(5)
    assert b.state == HALF_OPEN


def test_release_when_closed_is_harmless() -> None:
    b, _, changes = make()
    assert b.allow()
    b.release()
    assert b.state == CLOSED
    assert changes == []
