"""Steps of a workflow file → `Step`: the command, its modifiers and its handlers.

Handlers (``on_failure`` in its five shapes, ``on_success``, ``on_exit_code``) are full steps,
parsed here like any other with their own positions, and ``when`` is parsed with the ``when``
language: nothing about a step is left to be interpreted at run time.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any

from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jetreduce.contract.workflow.model import CaptureStreams, OnFailure, Step, WriteFile
from jetreduce.lang._fields import DECIMAL, FieldParser
from jetreduce.lang._yaml_nodes import (
    BOOL_TAG,
    NULL_TAG,
    STR_TAG,
    Fields,
    describe,
    index,
    is_null,
    join,
)
from jetreduce.lang.when import WhenError, parse_when

__all__ = ["CAPTURE_FORMATS", "MAX_HANDLER_DEPTH", "STEP_KINDS", "StepParser"]

STEP_KINDS = ("shell", "claude", "write_file")
"""Command kinds a MapReduce step may have; exactly one per step."""

# Step kinds Prodigy knows but does not run in MapReduce phases: its coordinator fails them with
# "Step must have either 'claude', 'shell', or 'write_file'". Rejecting at parse time is kinder.
_UNSUPPORTED_STEP_KINDS: dict[str, str] = {
    "foreach": "`foreach` steps are not supported in MapReduce workflows "
    "(only shell, claude and write_file steps run in setup, map and reduce)",
    "goal_seek": "`goal_seek` is not supported in MapReduce workflows "
    "(removed from Prodigy; use a shell or claude step with `validate:`)",
    "command": "legacy `command` steps are not supported in MapReduce workflows; "
    "use `claude:` for a /slash-command or `shell:` for anything else",
    "test": "legacy `test` steps are not supported in MapReduce workflows; "
    "use `shell:` with `on_failure:`",
    "handler": "`handler` steps are not supported in MapReduce workflows",
}

# Step modifiers Prodigy defines that the worker does not execute: kept in Step.extra.
_STEP_EXTRA_BOOLS = (
    "auto_commit",
    "skip_validation",
    "ignore_validation_failure",
)
_STEP_EXTRA_STRINGS = ("output_file",)
_STEP_EXTRA_OTHER = (
    "retry",
    "validate",
    "step_validate",
    "validation_timeout",
    "commit_config",
)
_STEP_FIELDS = (
    "name",
    "timeout",
    "capture_output",
    "capture",
    "capture_format",
    "working_dir",
    "env",
    "when",
    "on_failure",
    "on_success",
    "on_exit_code",
    "commit_required",
    "capture_streams",
)

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
_STREAMS = ("stdout", "stderr", "exit_code", "success", "duration")

CAPTURE_FORMATS = ("string", "json", "lines", "number", "boolean")
WRITE_FILE_FORMATS = ("text", "json", "yaml")
_OCTAL_MODE = re.compile(r"[0-7]{3,4}")


class StepParser(FieldParser):
    def phase_commands(
        self, node: Node, path: str, *, extra_keys: bool = False
    ) -> tuple[list[Step], Fields | None] | None:
        """A list of steps, or the mapping form ``{commands: [...], ...}``.

        Returns the steps plus, for the mapping form, the mapping's remaining fields so the
        caller can read its own keys (``timeout``…) and warn about the rest.
        """
        what = "a list of steps or a mapping with `commands:`"
        if isinstance(node, SequenceNode):
            return self.steps(node, path), None
        if not isinstance(node, MappingNode):
            self.r.expected(path, what, node)
            return None
        fields = self.r.mapping(node, path, what)
        if fields is None:
            return None
        commands = fields.take("commands")
        if commands is None:
            self.r.error(
                path,
                "the mapping form needs a `commands:` list of steps"
                + (" (other keys: timeout, capture_outputs)" if extra_keys else ""),
                node,
            )
            self.warn_unknown(fields, ("commands", "timeout", "capture_outputs"))
            return None
        commands_path = join(path, "commands")
        if not isinstance(commands, SequenceNode):
            self.r.expected(commands_path, "a list of steps", commands)
            return [], fields
        return self.steps(commands, commands_path), fields

    def steps(self, node: SequenceNode, path: str) -> list[Step]:
        steps: list[Step] = []
        for i, item in enumerate(node.value):
            step = self.step(item, index(path, i))
            if step is not None:
                steps.append(step)
        return steps

    def step(self, node: Node, path: str, depth: int = 0) -> Step | None:
        """A step mapping; ``depth`` counts the handlers it is nested in."""
        r = self.r
        if isinstance(node, ScalarNode) and node.tag != NULL_TAG:
            text = str(node.value).strip().splitlines()[0] if str(node.value).strip() else ""
            r.error(
                path,
                f"a step must be a mapping, got the bare string {describe(node)}; "
                f"did you mean `- shell: {text}`?",
                node,
            )
            return None
        fields = r.mapping(node, path, "a step mapping (shell:, claude: or write_file:)")
        if fields is None:
            return None
        return self.step_fields(fields, node, path, depth)

    def step_fields(
        self, fields: Fields, node: Node, path: str, depth: int, *, also: Iterable[str] = ()
    ) -> Step | None:
        """The step held by ``fields`` (a step mapping, or what is left of a handler mapping
        once its own keys are taken: ``also`` names those for the unknown-key hint)."""
        r = self.r
        unsupported = [key for key in _UNSUPPORTED_STEP_KINDS if fields.has(key)]
        for key in unsupported:
            r.error(join(path, key), _UNSUPPORTED_STEP_KINDS[key], fields.key_node(key))
            fields.take(key)
        kinds = [key for key in STEP_KINDS if fields.has(key)]
        if not kinds and not unsupported:
            r.error(
                path, "step has no command: expected exactly one of shell, claude, write_file", node
            )
        elif len(kinds) > 1:
            r.error(
                path,
                f"step has {len(kinds)} commands ({', '.join(kinds)}): "
                "expected exactly one of shell, claude, write_file",
                node,
            )

        shell_node = fields.take("shell")
        shell = (
            r.string(shell_node, join(path, "shell"), non_empty=True)
            if shell_node is not None
            else None
        )
        claude_node = fields.take("claude")
        claude = (
            r.string(claude_node, join(path, "claude"), non_empty=True)
            if claude_node is not None
            else None
        )
        write_node = fields.take("write_file")
        write_file = (
            self.write_file(write_node, join(path, "write_file"))
            if write_node is not None
            else None
        )

        name = self.optional_string(fields, "name", path)
        timeout_node = fields.take_present("timeout")
        timeout_s = (
            self.duration(timeout_node, join(path, "timeout"), positive=True)
            if timeout_node is not None
            else None
        )
        capture_output = self.capture_output(fields.take_present("capture_output"), path)
        capture = self.optional_string(fields, "capture", path, non_empty=True)
        format_node = fields.take_present("capture_format")
        capture_format = (
            self.choice(format_node, join(path, "capture_format"), CAPTURE_FORMATS)
            if format_node is not None
            else "string"
        )
        working_dir = self.optional_string(fields, "working_dir", path, non_empty=True)
        env_node = fields.take_present("env")
        env = self.env(env_node, join(path, "env")) if env_node is not None else {}
        when = self.when(fields.take_present("when"), join(path, "when"))
        on_failure = self.on_failure(fields.take_present("on_failure"), path, depth)
        success_node = fields.take_present("on_success")
        on_success = (
            self.handler(success_node, join(path, "on_success"), depth)
            if success_node is not None
            else None
        )
        on_exit_code = self.on_exit_code(fields.take_present("on_exit_code"), path, depth)
        commit_node = fields.take_present("commit_required")
        commit_required = (
            r.boolean(commit_node, join(path, "commit_required")) if commit_node else False
        )
        streams_node = fields.take_present("capture_streams")
        capture_streams = (
            self.capture_streams(streams_node, join(path, "capture_streams"))
            if streams_node is not None
            else None
        )
        extra = self.step_extra(fields, path)
        self.warn_unknown(
            fields,
            (
                *STEP_KINDS,
                *_STEP_FIELDS,
                *_STEP_EXTRA_BOOLS,
                *_STEP_EXTRA_STRINGS,
                *_STEP_EXTRA_OTHER,
                *also,
            ),
        )

        if len(kinds) != 1 or unsupported:
            return None
        if shell is None and claude is None and write_file is None:
            return None  # the command itself was invalid and has been reported
        return Step(
            shell=shell,
            claude=claude,
            write_file=write_file,
            name=name,
            timeout_s=timeout_s,
            capture_output=capture_output,
            capture=capture,
            capture_format=capture_format or "string",
            working_dir=working_dir,
            env=env,
            when=when,
            on_failure=on_failure,
            on_success=on_success,
            on_exit_code=on_exit_code,
            commit_required=bool(commit_required),
            capture_streams=capture_streams,
            extra=extra,
        )

    # -- modifiers -------------------------------------------------------------------------

    def when(self, node: Node | None, path: str) -> str | None:
        """A ``when`` condition, parsed now (the worker evaluates the same parse)."""
        if node is None:
            return None
        text = self.r.string(node, path)
        if text is None or not text.strip():
            return None
        try:
            parse_when(text)
        except WhenError as exc:
            self.r.error(path, f"invalid when expression: {exc}", node)
            return None
        return text

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

    def capture_streams(self, node: Node, path: str) -> CaptureStreams | None:
        fields = self.r.mapping(node, path, "a mapping of stream names to true or false")
        if fields is None:
            return None
        values: dict[str, bool] = {}
        for key in _STREAMS:
            flag_node = fields.take_present(key)
            if flag_node is not None:
                flag = self.r.boolean(flag_node, join(path, key))
                if flag is not None:
                    values[key] = flag
        self.warn_unknown(fields, _STREAMS)
        return CaptureStreams(**values)

    def capture_output(self, node: Node | None, path: str) -> bool | str:
        """``true`` = the default variable, a string = a custom variable name (deprecated)."""
        if node is None:
            return False
        if isinstance(node, ScalarNode) and node.tag == BOOL_TAG:
            value = self.r.boolean(node, join(path, "capture_output"))
            return bool(value)
        if isinstance(node, ScalarNode) and node.tag == STR_TAG and str(node.value).strip():
            return str(node.value)
        self.r.expected(join(path, "capture_output"), "true, false or a variable name", node)
        return False

    def step_extra(self, fields: Fields, path: str) -> dict[str, Any]:
        """Modifiers Prodigy defines and the worker does not execute: kept verbatim, flags
        type-checked."""
        extra: dict[str, Any] = {}
        for key in _STEP_EXTRA_BOOLS:
            node = fields.take_present(key)
            if node is not None:
                value = self.r.boolean(node, join(path, key))
                if value is not None:
                    extra[key] = value
        for key in _STEP_EXTRA_STRINGS:
            value_str = self.optional_string(fields, key, path)
            if value_str is not None:
                extra[key] = value_str
        for key in _STEP_EXTRA_OTHER:
            node = fields.take_present(key)
            if node is not None:
                extra[key] = self.r.plain(node, join(path, key))
        return extra

    def write_file(self, node: Node, path: str) -> WriteFile | None:
        r = self.r
        fields = r.mapping(node, path, "a mapping with path and content")
        if fields is None:
            return None
        path_node = self.require(fields, "path", path)
        target = (
            r.string(path_node, join(path, "path"), non_empty=True)
            if path_node is not None
            else None
        )
        content_node = self.require(fields, "content", path)
        content = (
            r.string(content_node, join(path, "content")) if content_node is not None else None
        )
        format_node = fields.take_present("format")
        file_format = (
            self.choice(format_node, join(path, "format"), WRITE_FILE_FORMATS)
            if format_node is not None
            else "text"
        )
        mode = "0644"
        mode_node = fields.take_present("mode")
        if mode_node is not None:
            # Read as text: YAML 1.1 would turn an unquoted 0644 into the integer 420.
            mode_text = r.string(mode_node, join(path, "mode"))
            if mode_text is not None and not _OCTAL_MODE.fullmatch(mode_text):
                r.error(
                    join(path, "mode"),
                    f"expected an octal file mode such as '0644', got {mode_text!r}",
                    mode_node,
                )
            elif mode_text is not None:
                mode = mode_text
        create_node = fields.take_present("create_dirs")
        create_dirs = (
            r.boolean(create_node, join(path, "create_dirs")) if create_node is not None else False
        )
        self.warn_unknown(fields, ("path", "content", "format", "mode", "create_dirs"))
        if target is None or content is None or file_format is None:
            return None
        return WriteFile(
            path=target,
            content=content,
            format=file_format,
            mode=mode,
            create_dirs=bool(create_dirs),
        )
