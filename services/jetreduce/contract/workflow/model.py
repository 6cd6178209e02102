"""The parsed, normalised workflow: what every service and agent reads.

A workflow file (Prodigy's MapReduce YAML) has several accepted shapes per section; the parser
(`jetreduce.lang.parse`) folds them into these types, so nothing downstream ever
looks at raw YAML. These structs travel on the wire (inside `workflow.submit` and the spec KV
entry), so they are msgspec Structs with JSON-friendly fields and stable names, and their JSON
Schema is generated into `schemas/`.

Durations are seconds (float) everywhere here, whatever form the file used.
"""

from __future__ import annotations

from typing import Any

import msgspec

__all__ = [
    "CaptureFormat",
    "CaptureStreams",
    "CircuitBreakerConfig",
    "ErrorPolicy",
    "MapPhase",
    "OnFailure",
    "ReducePhase",
    "RetryConfig",
    "Secret",
    "SetupPhase",
    "Step",
    "Workflow",
    "WriteFile",
]

CaptureFormat = str
"""One of ``string``, ``json``, ``lines``, ``number``, ``boolean``."""


class WriteFile(msgspec.Struct, frozen=True, kw_only=True):
    """A ``write_file`` step: content rendered with variables (never through a shell)."""

    path: str
    content: str
    format: str = "text"
    mode: str = "0644"
    create_dirs: bool = False


class CaptureStreams(msgspec.Struct, frozen=True, kw_only=True):
    """``capture_streams``: which fields a named capture gets besides its value (Prodigy's
    defaults): ``${NAME.exit_code}``, ``.success``, ``.duration``, ``.stderr``; ``stdout``
    false with ``stderr`` true captures stderr as the value."""

    stdout: bool = True
    stderr: bool = False
    exit_code: bool = True
    success: bool = True
    duration: bool = True


class OnFailure(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """``on_failure`` folded from any of its five shapes (``true``; a command; a list of
    commands; ``{commands: [...]}``; ``{shell|claude, max_attempts, fail_workflow}``)."""

    handlers: list[Step] = msgspec.field(default_factory=list)
    """Steps run when the step fails, in order (a ``/command`` string became a claude step)."""
    continue_on_error: list[bool] = msgspec.field(default_factory=list)
    """Per handler: a failing handler does not stop the ones after it."""
    ignore: bool = False
    """``on_failure: true``: the failure is ignored."""
    fail_workflow: bool = False
    max_attempts: int = 1
    """Runs of the original step in all, the handlers running after each failed one."""
    timeout_s: float | None = None
    """Cap on each handler command (the ``commands`` shape's ``timeout``)."""


class Step(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """One command of a phase. Exactly one of ``shell`` / ``claude`` / ``write_file`` is set.

    The modifiers the worker executes are typed fields, checked by the parser (handlers are
    full steps, ``when`` has been parsed), so a step that parsed cannot fail at run time for a
    language reason. ``extra`` keeps the modifiers this version parses but does not execute
    (``validate``, ``retry``, ``output_file``…), so they survive the wire format untouched.
    """

    shell: str | None = None
    claude: str | None = None
    write_file: WriteFile | None = None
    name: str | None = None
    timeout_s: float | None = None
    capture_output: bool | str = False
    capture: str | None = None
    capture_format: CaptureFormat = "string"
    working_dir: str | None = None
    env: dict[str, str] = msgspec.field(default_factory=dict)
    when: str | None = None
    """A condition in the ``when`` language (`jetreduce.lang.when`), checked by the parser;
    false skips the step."""
    on_failure: OnFailure | None = None
    on_success: Step | None = None
    on_exit_code: dict[int, Step] = msgspec.field(default_factory=dict)
    """The step run for an exit code; for a failed step, its success recovers the step."""
    commit_required: bool = False
    """A successful run must have moved git HEAD (else the step fails)."""
    capture_streams: CaptureStreams | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)

    @property
    def kind(self) -> str:
        if self.shell is not None:
            return "shell"
        if self.claude is not None:
            return "claude"
        return "write_file"


class SetupPhase(msgspec.Struct, frozen=True, kw_only=True):
    steps: list[Step] = msgspec.field(default_factory=list)
    timeout_s: float | None = None
    capture_outputs: dict[str, Any] = msgspec.field(default_factory=dict)


class MapPhase(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    input: str
    agent_template: list[Step]
    json_path: str = ""
    filter: str | None = None
    sort_by: str | None = None
    distinct: str | None = None
    offset: int | None = None
    max_items: int | None = None
    max_parallel: int = 10
    agent_timeout_s: float | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Prodigy ``map`` keys kept verbatim but not modelled (``timeout_config``)."""


class ReducePhase(msgspec.Struct, frozen=True, kw_only=True):
    steps: list[Step] = msgspec.field(default_factory=list)


class RetryConfig(msgspec.Struct, frozen=True, kw_only=True):
    """How a failed item is retried. ``max_attempts`` counts the first attempt too."""

    max_attempts: int = 3
    initial_delay_s: float = 1.0
    multiplier: float = 2.0
    max_delay_s: float = 60.0
    backoff: str = "exponential"
    """Prodigy's backoff kind: ``exponential`` (initial * multiplier^n), ``fixed`` (always
    ``initial_delay_s``; multiplier 1), ``linear`` (initial + n * ``increment_s``) or
    ``fibonacci`` (initial * fib(n))."""
    increment_s: float | None = None
    """Step of a ``linear`` backoff; None for the other kinds."""

    def delay(self, attempt: int) -> float:
        """Seconds to wait before the attempt after failed attempt ``attempt`` (1-based), by
        ``backoff`` (n = ``attempt``): ``fixed`` initial; ``linear`` initial + (n-1) *
        increment; ``exponential`` initial * multiplier^(n-1); ``fibonacci`` initial * F(n)
        with F = 1, 1, 2, 3, 5…; never more than ``max_delay_s``. No jitter: the caller
        spreads retries of many items if it wants to."""
        n = max(1, attempt)
        initial, cap = self.initial_delay_s, self.max_delay_s
        if self.backoff == "fixed":
            seconds = initial
        elif self.backoff == "linear":
            seconds = initial + (n - 1) * (self.increment_s or 0.0)
        elif self.backoff == "fibonacci":
            a, b = 1, 1
            for _ in range(n - 1):  # stops growing once past the cap: n may be large
                if initial * a >= cap:
                    break
                a, b = b, a + b
            seconds = initial * a
        else:
            seconds = initial
            for _ in range(n - 1):  # a loop, not **: 2.0 ** 5000 overflows
                if seconds >= cap:
                    break
                seconds *= self.multiplier
        return min(cap, seconds)


class CircuitBreakerConfig(msgspec.Struct, frozen=True, kw_only=True):
    """``error_policy.circuit_breaker`` (Prodigy's defaults); run by `worker/breaker.py`."""

    failure_threshold: int = 5
    """Consecutive failed attempts that open the circuit."""
    success_threshold: int = 3
    """Successful probes that close it again."""
    timeout_s: float = 30.0
    """How long it stays open before probing (half-open)."""
    half_open_requests: int = 3
    """Probe items allowed while half-open."""


class ErrorPolicy(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    on_item_failure: str = "dlq"
    continue_on_failure: bool = True
    max_failures: int | None = None
    failure_threshold: float | None = None
    retry: RetryConfig = msgspec.field(default_factory=RetryConfig)
    circuit_breaker: CircuitBreakerConfig | None = None
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Keys parsed but not run (``error_collection``)."""


class Secret(msgspec.Struct, frozen=True, kw_only=True):
    """Where an agent reads a secret's value (the value itself never travels)."""

    provider: str
    """``env``: the agent's environment variable ``key``; ``file``: the content of file
    ``key`` (relative to the workflow directory), without its final newline."""
    key: str


class Workflow(msgspec.Struct, frozen=True, kw_only=True, omit_defaults=True):
    """A validated workflow. ``env`` values are already strings; ``$VAR`` in numeric fields
    (``max_parallel``, timeouts) has been resolved by the parser."""

    name: str
    map: MapPhase
    mode: str = "mapreduce"
    env: dict[str, str] = msgspec.field(default_factory=dict)
    setup: SetupPhase | None = None
    reduce: ReducePhase | None = None
    error_policy: ErrorPolicy = msgspec.field(default_factory=ErrorPolicy)
    secrets: dict[str, Secret] = msgspec.field(default_factory=dict)
    """Secret name → where the agent reads it (names and providers only, never values)."""
    env_files: list[str] = msgspec.field(default_factory=list)
    """``KEY=value`` files (relative to the workflow directory) read by agents, in order."""
    profiles: dict[str, dict[str, str]] = msgspec.field(default_factory=dict)
    """Profile name → its variables (its ``description`` left out)."""
    extra: dict[str, Any] = msgspec.field(default_factory=dict)
    """Top-level Prodigy keys kept verbatim but not run (``merge``)."""
