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

from jetreduce.contract.workflow.model import CaptureStreams, Step, WriteFile
from jetreduce.lang._handlers import MAX_HANDLER_DEPTH, HandlerParser
from jetreduce.lang._yaml_nodes import (
    BOOL_TAG,
    NULL_TAG,
    STR_TAG,
    Fields,
    describe,
    index,
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

_STREAMS = ("stdout", "stderr", "exit_code", "success", "duration")

CAPTURE_FORMATS = ("string", "json", "lines", "number", "boolean")
WRITE_FILE_FORMATS = ("text", "json", "yaml")
_OCTAL_MODE = re.compile(r"[0-7]{3,4}")


class StepParser(HandlerParser):
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
