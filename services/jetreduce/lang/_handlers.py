"""Step handlers → typed values: ``on_failure`` in Prodigy's five shapes (`OnFailure`),
``on_success`` and ``on_exit_code`` (`Step`s). Handlers are full steps, parsed by the step
parser with their own positions, nested at most `MAX_HANDLER_DEPTH` deep."""

from __future__ import annotations

from collections.abc import Iterable

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jetreduce.contract.workflow.model import OnFailure, Step
from jetreduce.lang._fields import DECIMAL, FieldParser
from jetreduce.lang._yaml_nodes import (
    BOOL_TAG,
    STR_TAG,
    Fields,
    describe,
    index,
    is_null,
    join,
)

__all__ = ["MAX_HANDLER_DEPTH", "HandlerParser"]

MAX_HANDLER_DEPTH = 8
"""Handlers may have handlers; deeper than this is refused (a workflow is finite, but a
generated one could still nest absurdly)."""

# on_failure's mapping shapes: `{commands: [...], ...}` and `{shell|claude, ...}`.
_ON_FAILURE_COMMANDS_KEYS = (
    "commands",
    "fail_workflow",
    "timeout",
    # Prodigy's FailureHandlerConfig keys that are accepted and not executed (as before).
    "handler_failure_fatal",
    "strategy",
    "capture",
)
_ON_FAILURE_POLICY_KEYS = ("fail_workflow", "max_attempts", "max_retries", "retry_original")
_HANDLER_STRATEGIES = ("recovery", "fallback", "cleanup", "custom")


class HandlerParser(FieldParser):
    """Handler readers; the steps they hold are read by `StepParser`, which extends this."""

    def step(self, node: Node, path: str, depth: int = 0) -> Step | None:
        raise NotImplementedError  # StepParser.step

    def step_fields(
        self, fields: Fields, node: Node, path: str, depth: int, *, also: Iterable[str] = ()
    ) -> Step | None:
        raise NotImplementedError  # StepParser.step_fields

    def nested_too_deep(self, node: Node, path: str, depth: int) -> bool:
        if depth < MAX_HANDLER_DEPTH:
            return False
        self.r.error(path, f"handlers are nested more than {MAX_HANDLER_DEPTH} deep", node)
        return True

    def handler(self, node: Node, path: str, depth: int) -> Step | None:
        """An ``on_success`` / ``on_exit_code`` step: a step mapping or a command string."""
        if self.nested_too_deep(node, path, depth):
            return None
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            return self.command(node, path)
        return self.step(node, path, depth + 1)

    def command(self, node: Node, path: str) -> Step | None:
        """Prodigy's string handler: a ``/slash-command`` is claude, anything else shell."""
        text = self.r.string(node, path, non_empty=True)
        if text is None:
            return None
        text = text.strip()
        return Step(claude=text) if text.startswith("/") else Step(shell=text)

    def on_exit_code(self, node: Node | None, path: str, depth: int) -> dict[int, Step]:
        if node is None:
            return {}
        path = join(path, "on_exit_code")
        fields = self.r.mapping(node, path, "a mapping of exit codes to steps")
        if fields is None:
            return {}
        handlers: dict[int, Step] = {}
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            text = entry.key.strip()
            if not DECIMAL.fullmatch(text.removeprefix("-")):
                self.r.error(entry_path, f"{entry.key!r} is not an exit code", entry.key_node)
                continue
            step = self.handler(entry.value, entry_path, depth)
            if step is not None:
                handlers[int(text)] = step
        return handlers

    def on_failure(self, node: Node | None, path: str, depth: int) -> OnFailure | None:
        """``on_failure`` in any of Prodigy's five shapes, tried in its order: a bool; a
        command string; a list of command strings; ``{commands: [...], fail_workflow,
        timeout}``; any other mapping is ``{shell|claude, fail_workflow,
        max_attempts|max_retries, retry_original}`` plus the handler step's own modifiers."""
        if node is None:
            return None
        r = self.r
        path = join(path, "on_failure")
        if self.nested_too_deep(node, path, depth):
            return None
        if isinstance(node, ScalarNode) and node.tag == BOOL_TAG:
            return OnFailure(ignore=True) if r.boolean(node, path) else None
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            step = self.command(node, path)
            return None if step is None else OnFailure(handlers=[step], continue_on_error=[False])
        if isinstance(node, SequenceNode):
            return self.on_failure_list(node, path)
        if not isinstance(node, MappingNode):
            r.expected(path, "true, false, a command, a list of commands or a mapping", node)
            return None
        fields = r.mapping(node, path)
        if fields is None:
            return None
        if fields.has("commands"):
            return self.on_failure_commands(fields, path, depth)
        return self.on_failure_handler(fields, node, path, depth)

    def on_failure_list(self, node: SequenceNode, path: str) -> OnFailure | None:
        handlers: list[Step] = []
        ok = True
        for i, entry in enumerate(node.value):
            entry_path = index(path, i)
            if isinstance(entry, ScalarNode) and entry.tag == STR_TAG:
                step = self.command(entry, entry_path)
                ok = ok and step is not None
                handlers.extend([step] if step is not None else [])
                continue
            ok = False
            self.r.error(
                entry_path,
                f"on_failure list entries must be command strings, got {describe(entry)}; "
                "for a list of handler steps write `on_failure: {commands: [...]}`",
                entry,
            )
        if not ok:
            return None
        return OnFailure(handlers=handlers, continue_on_error=[False] * len(handlers))

    def on_failure_commands(self, fields: Fields, path: str, depth: int) -> OnFailure | None:
        r = self.r
        commands = fields.take("commands")
        commands_path = join(path, "commands")
        handlers: list[Step] = []
        flags: list[bool] = []
        ok = True
        if isinstance(commands, SequenceNode):
            for i, entry in enumerate(commands.value):
                entry_path = index(commands_path, i)
                keep_going: bool | None = False
                step: Step | None
                if isinstance(entry, ScalarNode) and entry.tag == STR_TAG:
                    step = self.command(entry, entry_path)
                elif isinstance(entry, MappingNode) and not self.nested_too_deep(
                    entry, entry_path, depth + 1
                ):
                    entry_fields = r.mapping(entry, entry_path)
                    if entry_fields is None:
                        ok = False
                        continue
                    flag_node = entry_fields.take_present("continue_on_error")
                    if flag_node is not None:
                        keep_going = r.boolean(flag_node, join(entry_path, "continue_on_error"))
                    step = self.step_fields(
                        entry_fields, entry, entry_path, depth + 1, also=("continue_on_error",)
                    )
                else:
                    if isinstance(entry, MappingNode):
                        ok = False
                        continue  # nested too deeply: reported
                    r.expected(entry_path, "a command string or a step mapping", entry)
                    step = None
                if step is None or keep_going is None:
                    ok = False
                    continue
                handlers.append(step)
                flags.append(keep_going)
        elif not is_null(commands) and commands is not None:
            r.expected(commands_path, "a list of handler steps", commands)
            ok = False
        fail_node = fields.take_present("fail_workflow")
        fail_workflow = (
            r.boolean(fail_node, join(path, "fail_workflow")) if fail_node is not None else False
        )
        timeout_node = fields.take_present("timeout")
        timeout_s = (
            self.duration(timeout_node, join(path, "timeout"), positive=True)
            if timeout_node is not None
            else None
        )
        fatal_node = fields.take_present("handler_failure_fatal")
        if fatal_node is not None:
            r.boolean(fatal_node, join(path, "handler_failure_fatal"))
        strategy_node = fields.take_present("strategy")
        if strategy_node is not None:
            self.choice(strategy_node, join(path, "strategy"), _HANDLER_STRATEGIES)
        fields.take("capture")
        self.warn_unknown(fields, _ON_FAILURE_COMMANDS_KEYS)
        if not ok or fail_workflow is None:
            return None
        return OnFailure(
            handlers=handlers,
            continue_on_error=flags,
            fail_workflow=fail_workflow,
            timeout_s=timeout_s,
        )

    def on_failure_handler(
        self, fields: Fields, node: Node, path: str, depth: int
    ) -> OnFailure | None:
        r = self.r
        fail_node = fields.take_present("fail_workflow")
        fail_workflow = (
            r.boolean(fail_node, join(path, "fail_workflow")) if fail_node is not None else False
        )
        attempts: int | None = 1
        for key in ("max_attempts", "max_retries"):
            count_node = fields.take_present(key)
            if count_node is not None:
                count = self.int_or_var(count_node, join(path, key), minimum=0)
                attempts = None if count is None or attempts is None else max(attempts, count)
        retry_node = fields.take_present("retry_original")
        retry_original = (
            r.boolean(retry_node, join(path, "retry_original")) if retry_node is not None else False
        )
        if retry_original and attempts == 1:
            attempts = 2  # deprecated flag: "retry the original once"
        handlers: list[Step] = []
        ok = True
        if fields.has("shell") or fields.has("claude") or fields.has("write_file"):
            step = self.step_fields(fields, node, path, depth + 1, also=_ON_FAILURE_POLICY_KEYS)
            ok = step is not None
            handlers = [step] if step is not None else []
        else:
            self.warn_unknown(fields, (*_ON_FAILURE_POLICY_KEYS, "shell", "claude"))
        if not ok or attempts is None or fail_workflow is None or retry_original is None:
            return None
        return OnFailure(
            handlers=handlers,
            continue_on_error=[False] * len(handlers),
            fail_workflow=fail_workflow,
            max_attempts=attempts,
        )
