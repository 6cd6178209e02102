"""``error_policy`` (and its top-level aliases) of a workflow file → `ErrorPolicy`."""

from __future__ import annotations

import re
from typing import Any

from yaml.nodes import MappingNode, Node

from jetreduce.contract.workflow.model import (
    CircuitBreakerConfig,
    ErrorPolicy,
    RetryConfig,
)
from jetreduce.lang._fields import FieldParser
from jetreduce.lang._yaml_nodes import (
    Fields,
    join,
)

__all__ = ["POLICY_ALIASES", "PolicyParser"]

BACKOFF_KINDS = ("exponential", "fixed", "linear", "fibonacci")

# Top-level convenience aliases that override `error_policy.<same key>` (Prodigy get_error_policy).
POLICY_ALIASES = (
    "on_item_failure",
    "continue_on_failure",
    "max_failures",
    "failure_threshold",
    "error_collection",
)
_BATCHED = re.compile(r"batched\s*:\s*([0-9]{1,19})")


class PolicyParser(FieldParser):
    def error_policy(self, top: Fields) -> ErrorPolicy | None:
        """``error_policy:`` then the top-level aliases, which override its fields."""
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        retry = RetryConfig()
        circuit: CircuitBreakerConfig | None = None
        node = top.take_present("error_policy")
        if node is not None:
            fields = self.r.mapping(node, "error_policy")
            if fields is not None:
                for key in POLICY_ALIASES:
                    value_node = fields.take_present(key)
                    if value_node is not None:
                        self.policy_field(key, value_node, join("error_policy", key), values, extra)
                breaker = fields.take_present("circuit_breaker")
                if breaker is not None:
                    circuit = self.circuit_breaker(breaker, "error_policy.circuit_breaker")
                retry_node = fields.take_present("retry_config")
                if retry_node is not None:
                    retry = self.retry_config(retry_node, "error_policy.retry_config") or retry
                self.warn_unknown(fields, (*POLICY_ALIASES, "circuit_breaker", "retry_config"))
        for key in POLICY_ALIASES:
            value_node = top.take_present(key)
            if value_node is not None:
                self.policy_field(key, value_node, key, values, extra)
        return ErrorPolicy(**values, retry=retry, circuit_breaker=circuit, extra=extra)

    def policy_field(
        self, key: str, node: Node, path: str, values: dict[str, Any], extra: dict[str, Any]
    ) -> None:
        r = self.r
        if key == "on_item_failure":
            action = r.string(node, path, non_empty=True)
            if action is not None:
                values[key] = action
        elif key == "continue_on_failure":
            flag = r.boolean(node, path)
            if flag is not None:
                values[key] = flag
        elif key == "max_failures":
            count = r.integer(node, path, minimum=0)
            if count is not None:
                values[key] = count
        elif key == "failure_threshold":
            rate = r.number(node, path)
            if rate is not None and not 0.0 <= rate <= 1.0:
                r.error(path, f"must be a fraction between 0 and 1, got {rate:g}", node)
            elif rate is not None:
                values[key] = rate
        elif key == "error_collection":
            collection = self.error_collection(node, path)
            if collection is not None:
                extra[key] = collection

    def error_collection(self, node: Node, path: str) -> str | None:
        """``aggregate``, ``immediate``, ``batched:N`` or ``{batched: {size: N}}`` → a string."""
        what = "aggregate, immediate or batched:N"
        if isinstance(node, MappingNode):
            fields = self.r.mapping(node, path)
            batched = fields.take_present("batched") if fields else None
            if fields is None or batched is None or fields.rest():
                self.r.expected(path, what, node)
                return None
            size_fields = self.r.mapping(batched, join(path, "batched"), "a mapping with size")
            size_node = (
                self.require(size_fields, "size", join(path, "batched")) if size_fields else None
            )
            if size_fields is not None:
                self.warn_unknown(size_fields, ("size",))
            size = (
                self.r.integer(size_node, join(path, "batched.size"), minimum=1)
                if size_node is not None
                else None
            )
            return None if size is None else f"batched:{size}"
        text = self.r.string(node, path)
        if text is None:
            return None
        text = text.strip()
        if text in ("aggregate", "immediate"):
            return text
        match = _BATCHED.fullmatch(text)
        if match is not None and int(match.group(1)) >= 1:
            return f"batched:{int(match.group(1))}"
        self.r.expected(path, what, node)
        return None

    def circuit_breaker(self, node: Node, path: str) -> CircuitBreakerConfig | None:
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        values: dict[str, Any] = {}
        for key in ("failure_threshold", "success_threshold", "half_open_requests"):
            value = fields.take_present(key)
            if value is not None:
                count = self.r.integer(value, join(path, key), minimum=1)
                if count is not None:
                    values[key] = count
        timeout = fields.take_present("timeout")
        if timeout is not None:
            seconds = self.duration(timeout, join(path, "timeout"), positive=True)
            if seconds is not None:
                values["timeout_s"] = seconds
        self.warn_unknown(
            fields, ("failure_threshold", "success_threshold", "half_open_requests", "timeout")
        )
        return CircuitBreakerConfig(**values)

    def retry_config(self, node: Node, path: str) -> RetryConfig | None:
        """``{max_attempts, backoff: {<kind>: {...}}}``; ``max_delay`` is a jetreduce extension."""
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        values: dict[str, Any] = {}
        attempts = fields.take_present("max_attempts")
        if attempts is not None:
            count = self.r.integer(attempts, join(path, "max_attempts"), minimum=1)
            if count is not None:
                values["max_attempts"] = count
        backoff = fields.take_present("backoff")
        if backoff is not None:
            values.update(self.backoff(backoff, join(path, "backoff")))
        max_delay = fields.take_present("max_delay")
        if max_delay is not None:
            seconds = self.duration(max_delay, join(path, "max_delay"), positive=True)
            if seconds is not None:
                values["max_delay_s"] = seconds
        self.warn_unknown(fields, ("max_attempts", "backoff", "max_delay"))
        return RetryConfig(**values)

    def backoff(self, node: Node, path: str) -> dict[str, Any]:
        """Prodigy's externally tagged ``BackoffStrategy`` → RetryConfig fields."""
        what = "a mapping with one of " + ", ".join(BACKOFF_KINDS)
        fields = self.r.mapping(node, path, what)
        if fields is None:
            return {}
        entries = fields.rest()
        if len(entries) != 1 or entries[0].key not in BACKOFF_KINDS:
            self.r.expected(path, what, node)
            return {}
        kind = entries[0].key
        kind_path = join(path, kind)
        params = self.r.mapping(entries[0].value, kind_path)
        if params is None:
            return {}
        required = {
            "exponential": ("initial", "multiplier"),
            "fixed": ("delay",),
            "linear": ("initial", "increment"),
            "fibonacci": ("initial",),
        }[kind]
        values: dict[str, Any] = {"backoff": kind}
        for key in required:
            value_node = self.require(params, key, kind_path)
            if value_node is None:
                continue
            key_path = join(kind_path, key)
            if key == "multiplier":
                factor = self.r.number(value_node, key_path)
                if factor is not None and factor < 1.0:
                    self.r.error(key_path, f"must be at least 1, got {factor:g}", value_node)
                elif factor is not None:
                    values["multiplier"] = factor
                continue
            seconds = self.duration(value_node, key_path, positive=False)
            if seconds is None:
                continue
            field_name = {"initial": "initial_delay_s", "delay": "initial_delay_s"}.get(
                key, "increment_s"
            )
            values[field_name] = seconds
        if kind == "fixed":
            values["multiplier"] = 1.0
        self.warn_unknown(params, required)
        return values
