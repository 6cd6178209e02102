"""A circuit breaker around an agent's dispatch (``error_policy.circuit_breaker``).

Closed: items flow. After ``failure_threshold`` consecutive failed attempts it opens: the agent
takes no items for ``timeout``; then half-open: at most ``half_open_requests`` probe items run;
``success_threshold`` successes close it, any failure re-opens it. Each agent keeps its own
breaker (like a client-side breaker in front of a flaky dependency), and every transition is
published as an event so operators see it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from jetreduce.contract.workflow import CircuitBreakerConfig

__all__ = ["CircuitBreaker"]


@dataclass
class CircuitBreaker:
    failure_threshold: int = 5
    success_threshold: int = 3
    timeout_s: float = 30.0
    half_open_requests: int = 3
    state: str = "closed"
    failures: int = 0
    successes: int = 0
    probes: int = 0
    opened_at: float = 0.0
    clock: Any = field(default=time.monotonic, repr=False)

    @classmethod
    def from_config(cls, config: CircuitBreakerConfig | None) -> CircuitBreaker | None:
        """The breaker of ``error_policy.circuit_breaker`` (None: the workflow has none)."""
        if config is None:
            return None
        return cls(
            failure_threshold=config.failure_threshold,
            success_threshold=config.success_threshold,
            timeout_s=config.timeout_s,
            half_open_requests=config.half_open_requests,
        )

    def allowance(self, wanted: int) -> int:
        """How many new items may start now (0 while open)."""
        if self.state == "open":
            if self.clock() - self.opened_at < self.timeout_s:
                return 0
            self._to("half_open")
        if self.state == "half_open":
            return max(0, min(wanted, self.half_open_requests - self.probes))
        return wanted

    def started(self, n: int) -> None:
        if self.state == "half_open":
            self.probes += n

    def record(self, ok: bool) -> str | None:
        """Count an attempt's outcome; returns the new state if it changed."""
        before = self.state
        if ok:
            self.failures = 0
            if self.state == "half_open":
                self.successes += 1
                if self.successes >= self.success_threshold:
                    self._to("closed")
        else:
            self.failures += 1
            if self.state == "half_open" or (
                self.state == "closed" and self.failures >= self.failure_threshold
            ):
                self._to("open")
        return self.state if self.state != before else None

    def _to(self, state: str) -> None:
        self.state = state
        self.successes = 0
        self.probes = 0
        if state == "open":
            self.opened_at = self.clock()
        if state == "closed":
            self.failures = 0
