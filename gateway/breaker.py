"""The per-target circuit breaker: a pure state machine (closed, open, half-open) on an injected clock."""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

from gateway.config_types import BreakerConfig

# The numbers are the values of gateway_circuit_state{upstream,target} (SPEC 7).
CLOSED = 0
OPEN = 1
HALF_OPEN = 2


class CircuitBreaker:
    """closed -> open after `failures` failures within `window` seconds (sliding); open refuses for
    `open_for` seconds; then half-open lets `half_open_requests` probes through at once; a probe's
    success closes the circuit, its failure reopens it.

    Usage per request: `if allow(): ... then exactly one of record_success(), record_failure() or
    release()`. allow() reserves a probe slot when half-open, so a request that ends without a verdict
    (the client went away) must call release() to give the slot back.

    Verdicts arriving while open (requests admitted before it opened) are ignored: they say nothing
    about the target after the open period. While half-open any verdict decides, since any request
    that reaches the target then is evidence about its current health.
    """

    __slots__ = ("_cfg", "_clock", "_on_change", "_state", "_failures", "_opened_at", "_probes")

    def __init__(
        self,
        cfg: BreakerConfig,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[int], None] | None = None,
    ) -> None:
        self._cfg = cfg
        self._clock = clock
        self._on_change = on_change
        self._state = CLOSED
        # Only the last `failures` timestamps can matter: the oldest of them decides whether they all
        # fall within the window, so the deque stays bounded whatever the failure rate.
        self._failures: deque[float] = deque(maxlen=max(1, cfg.failures))
        self._opened_at = 0.0
        self._probes = 0  # probe slots reserved while half-open

    @property
    def state(self) -> int:
        """The current state; reading it moves open -> half-open once `open_for` has passed."""
        if self._state == OPEN and self._clock() - self._opened_at >= self._cfg.open_for:
            self._set(HALF_OPEN)
        return self._state

    def allow(self) -> bool:
        """May a request go to this target now? Reserves a probe slot when half-open."""
        state = self._state
        if state == CLOSED:  # the hot path: one comparison
            return True
        if self.state == OPEN:
            return False
        if self._probes < self._cfg.half_open_requests:
            self._probes += 1
            return True
        return False

    def record_success(self) -> None:
        if self._state == HALF_OPEN:
            self._failures.clear()
            self._set(CLOSED)

    def record_failure(self) -> None:
        state = self._state
        if state == OPEN:
            return
        now = self._clock()
        if state == HALF_OPEN:
            self._trip(now)
            return
        failures = self._failures
        failures.append(now)
        if len(failures) == failures.maxlen and now - failures[0] <= self._cfg.window:
            self._trip(now)

    def release(self) -> None:
        """A request admitted by allow() ended without a verdict: free its probe slot."""
        if self._state == HALF_OPEN and self._probes > 0:
            self._probes -= 1

    def retry_after(self) -> float:
        """Seconds until the circuit half-opens (0 unless open)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self._opened_at + self._cfg.open_for - self._clock())

    def _trip(self, now: float) -> None:
        self._opened_at = now
        self._failures.clear()
        self._set(OPEN)

    def _set(self, state: int) -> None:
        if state == self._state:
            return
        self._state = state
        self._probes = 0
        if self._on_change is not None:
            self._on_change(state)
