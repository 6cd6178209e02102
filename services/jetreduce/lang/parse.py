"""Prodigy MapReduce YAML → `model.Workflow`, with every problem reported at once.

Compatibility target: what Prodigy's serde parser accepts (research/prodigy.md §1), so files
written for Prodigy run unchanged. In particular:

* sections with two shapes (``setup``, ``agent_template``, ``reduce``, ``merge``) accept both;
* numeric fields that Prodigy resolves from the environment (``max_parallel``,
  ``agent_timeout_secs``, ``setup.timeout``, step ``timeout``) accept ``$VAR`` / ``${VAR}``,
  looked up in the workflow's own ``env`` first, then in the mapping the caller passes;
* keys Prodigy defines but the model does not (yet) use are kept verbatim in ``extra`` dicts so
  they survive the trip through the wire format;
* keys nobody defines are *warnings*, not errors: Prodigy silently ignores them, and
  rejecting them would refuse files that Prodigy runs. Warning still catches typos.

Where Prodigy is vague or merely tolerant by accident, this parser is stricter and says why in
the message: duplicate keys, a bare string as a step, a step with two command kinds.

The parser works on YAML nodes (not constructed values) so each `Problem` carries the line and
column of the offending key or value.

Hostile input (invariant 5): whatever the text, `parse_workflow` returns a `ParseResult` or
raises `WorkflowInvalid` with at least one problem; never another exception, and never a run
time that grows faster than the text. Texts over `MAX_WORKFLOW_CHARS` are refused unread,
nesting, alias expansion and number sizes are bounded in `_yaml_nodes`, durations must be
finite and at most `MAX_DURATION_S`, and at most `MAX_PROBLEMS` errors (and as many warnings)
are reported, so the rejection always fits in one NATS message.
"""

from __future__ import annotations

import difflib
import json
import math
import re
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import yaml
from yaml.nodes import MappingNode, Node, ScalarNode, SequenceNode

from jetreduce.contract.workflow.durations import parse_duration
from jetreduce.contract.workflow.errors import ERROR, WARNING, Problem, WorkflowInvalid
from jetreduce.contract.workflow.model import (
    ErrorPolicy,
    MapPhase,
    ReducePhase,
    RetryConfig,
    SetupPhase,
    Step,
    Workflow,
    WriteFile,
)
from jetreduce.lang._yaml_nodes import (
    BOOL_TAG,
    FLOAT_TAG,
    INT_TAG,
    MAX_DEPTH,
    NULL_TAG,
    STR_TAG,
    BoundedLoader,
    Fields,
    Reader,
    describe,
    index,
    is_null,
    join,
)
from jetreduce.lang.pipeline import (
    PipelineError,
    validate_filter,
    validate_json_path,
    validate_sort,
)
from jetreduce.lang.pipeline.jsonpath import parse_field_path

__all__ = ["ParseResult", "parse_workflow", "workflow_text"]

SUPPORTED_MODE = "mapreduce"

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

# Step modifiers Prodigy defines that the model does not carry as fields: kept in Step.extra.
_STEP_EXTRA_BOOLS = (
    "commit_required",
    "auto_commit",
    "skip_validation",
    "ignore_validation_failure",
)
_STEP_EXTRA_STRINGS = ("when", "output_file")
_STEP_EXTRA_OTHER = (
    "on_failure",
    "on_success",
    "on_exit_code",
    "retry",
    "validate",
    "step_validate",
    "validation_timeout",
    "commit_config",
    "capture_streams",
)
_STEP_FIELDS = (
    "name",
    "timeout",
    "capture_output",
    "capture",
    "capture_format",
    "working_dir",
    "env",
)

CAPTURE_FORMATS = ("string", "json", "lines", "number", "boolean")
WRITE_FILE_FORMATS = ("text", "json", "yaml")
_CAPTURE_SOURCES = ("stdout", "stderr", "both", "combined")
_TIMEOUT_POLICIES = ("PerAgent", "PerCommand", "Hybrid")
_TIMEOUT_ACTIONS = ("Dlq", "Skip", "Fail", "GracefulTerminate")
_SECRET_PROVIDERS = ("env", "file", "vault", "aws", "custom")
_BACKOFF_KINDS = ("exponential", "fixed", "linear", "fibonacci")

# Top-level convenience aliases that override `error_policy.<same key>` (Prodigy get_error_policy).
_POLICY_ALIASES = (
    "on_item_failure",
    "continue_on_failure",
    "max_failures",
    "failure_threshold",
    "error_collection",
)
_TOP_EXTRA = ("secrets", "env_files", "profiles", "merge")
_TOP_KEYS = (
    "name",
    "mode",
    "env",
    "setup",
    "map",
    "reduce",
    "error_policy",
    *_POLICY_ALIASES,
    *_TOP_EXTRA,
)

# Keys people write from Prodigy's docs in the wrong place: say where they belong.
_MISPLACED_HINTS: dict[str, str] = {
    "retry_config": "it belongs under `error_policy:`",
    "circuit_breaker": "it belongs under `error_policy:`",
    "max_parallel": "it belongs under `map:`",
    "agent_template": "it belongs under `map:`",
    "agent_timeout_secs": "it belongs under `map:`",
    "timeout_config": "it belongs under `map:`",
    "input": "it belongs under `map:`",
}

_VAR = re.compile(r"\$(?:\{(\w+)\}|(\w+))")
_OCTAL_MODE = re.compile(r"[0-7]{3,4}")
# ASCII digits only: `\d` also matches digits `int()` refuses ('²') or reads as another
# number ('١٢'), and the length bound keeps `int()` under Python's 4300-digit limit.
_DECIMAL = re.compile(r"[0-9]{1,19}")
_BATCHED = re.compile(r"batched\s*:\s*([0-9]{1,19})")

MAX_WORKFLOW_CHARS = 4 * 1024 * 1024
"""Longest workflow text read at all. Real files are a few kilobytes; the YAML parser is pure
Python (about a second per megabyte), so the bound keeps a hostile submit from holding the
planner for long."""

MAX_DURATION_S = 1e9
"""Longest duration accepted (about 31 years): below ``threading.TIMEOUT_MAX``, so any timeout
we accept can be handed to a wait without an OverflowError."""

MAX_PROBLEMS = 100
"""Most errors (and, separately, warnings) reported; the rest are counted in one last line."""

_DURATION_EXPECTED = "a number of seconds, a duration such as '30s', or $VAR"


class ParseResult(msgspec.Struct, frozen=True, kw_only=True):
    """A valid workflow plus the non-fatal findings (unknown keys) met while parsing it."""

    workflow: Workflow
    warnings: list[Problem] = msgspec.field(default_factory=list)


def parse_workflow(
    text: str,
    *,
    env: Mapping[str, str] | None = None,
    source: str = "<workflow>",
) -> ParseResult:
    """Parse and validate a Prodigy MapReduce workflow.

    ``env`` resolves ``$VAR`` in numeric fields after the workflow's own ``env:``; pass
    ``os.environ`` to mirror Prodigy, or None to keep parsing independent of the process (the
    parse then depends on the file alone, which matters when a spec is re-parsed elsewhere).
    ``source`` only labels positions in messages (usually the file path).

    Raises `WorkflowInvalid` carrying every error found (YAML syntax errors stop at the first,
    since nothing after one can be trusted; past `MAX_PROBLEMS` the rest are only counted).
    Warnings are returned in the result, or attached to the exception.
    """
    if len(text) > MAX_WORKFLOW_CHARS:
        message = (
            f"the workflow is too large: {len(text)} characters (at most {MAX_WORKFLOW_CHARS})"
        )
        raise WorkflowInvalid([Problem("", message)], source=source)
    try:
        loader = BoundedLoader(text)
    except yaml.YAMLError as exc:  # non-printable characters are refused before parsing
        raise WorkflowInvalid([_yaml_problem(exc)], source=source) from None
    try:
        try:
            root = loader.get_single_node()
        except yaml.YAMLError as exc:
            raise WorkflowInvalid([_yaml_problem(exc)], source=source) from None
        reader = Reader(loader)
        workflow = _WorkflowParser(reader, env).parse(root)
    except RecursionError:
        # Defensive: the depth bound should make this unreachable, but a crash of the
        # planner's handler would leave the submitter without an answer.
        message = "the workflow is nested too deeply to be read"
        raise WorkflowInvalid([Problem("", message)], source=source) from None
    finally:
        loader.dispose()
    # Shape checks and verbatim copies may visit one node twice: report each finding once.
    unique = dict.fromkeys(reader.problems)
    problems = sorted(unique, key=lambda p: (p.line or 0, p.column or 0))
    errors = _at_most(MAX_PROBLEMS, [p for p in problems if p.severity == ERROR], ERROR)
    warnings = _at_most(MAX_PROBLEMS, [p for p in problems if p.severity != ERROR], WARNING)
    if workflow is None and not errors:  # defensive: every None path records an error
        errors.append(Problem("", "the workflow could not be read"))
    if errors or workflow is None:
        raise WorkflowInvalid(errors, warnings=warnings, source=source)
    return ParseResult(workflow=workflow, warnings=warnings)


def workflow_text(workflow: str | Mapping[str, Any], *, source: str = "<workflow>") -> str:
    """The text to parse for a submitted workflow: YAML text as is, or a JSON object (the other
    form ``workflow.submit`` accepts) rendered as indented JSON, which is YAML too.

    Use this instead of ``yaml.safe_dump``: the object is hostile input, and dumping one nested
    a few hundred levels deep dies of RecursionError. Raises `WorkflowInvalid` for an object
    nested deeper than the parser accepts (or one that cannot be rendered as JSON).
    """
    if isinstance(workflow, str):
        return workflow
    if _depth_exceeds(workflow, MAX_DEPTH):
        message = f"invalid YAML: nesting deeper than {MAX_DEPTH} levels is not supported"
        raise WorkflowInvalid([Problem("", message)], source=source)
    try:
        return json.dumps(workflow, indent=2, ensure_ascii=False, allow_nan=False)
    except (TypeError, ValueError) as exc:
        raise WorkflowInvalid([Problem("", f"not a JSON object: {exc}")], source=source) from None


def _depth_exceeds(value: Any, limit: int) -> bool:
    """True if containers in ``value`` nest deeper than ``limit`` (checked without recursion)."""
    stack: list[tuple[Any, int]] = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if isinstance(node, Mapping):
            children: Iterable[Any] = node.values()
        elif isinstance(node, list | tuple):
            children = node
        else:
            continue
        if depth > limit:
            return True
        stack.extend((child, depth + 1) for child in children)
    return False


def _at_most(limit: int, problems: list[Problem], severity: str) -> list[Problem]:
    """The first ``limit`` problems, plus one that counts the rest (a file of 100k unknown
    keys must not produce a rejection too large to publish)."""
    if len(problems) <= limit:
        return problems
    more = len(problems) - limit
    noun = "errors" if severity == ERROR else "warnings"
    return [*problems[:limit], Problem("", f"... and {more} more {noun}", severity=severity)]


def _yaml_problem(exc: yaml.YAMLError) -> Problem:
    """One problem for a YAML syntax error, at the position PyYAML blames."""
    if isinstance(exc, yaml.MarkedYAMLError):
        mark = exc.problem_mark or exc.context_mark
        parts = [part for part in (exc.context, exc.problem) if part]
        message = "invalid YAML: " + ", ".join(parts)
        if exc.problem == "mapping values are not allowed here":
            message += " (a value containing ': ' must be quoted)"
        if mark is not None:
            return Problem("", message, mark.line + 1, mark.column + 1)
        return Problem("", message)
    return Problem("", f"invalid YAML: {exc}")


class _WorkflowParser:
    """One parse: section readers that share the `Reader` (problems) and the variable scope."""

    def __init__(self, reader: Reader, process_env: Mapping[str, str] | None) -> None:
        self.r = reader
        self.process_env = process_env
        # Filled from the file's `env:` before anything that may reference it is read.
        self.workflow_env: dict[str, str] = {}

    # -- top level -------------------------------------------------------------------------

    def parse(self, root: Node | None) -> Workflow | None:
        r = self.r
        if is_null(root) or root is None:
            r.error(
                "", "the workflow is empty: expected a mapping with at least name and map", root
            )
            return None
        fields = r.mapping(root, "", "a mapping of workflow keys (name, mode, map, ...)")
        if fields is None:
            return None

        env_node = fields.take_present("env")
        env = self.env(env_node, "env", top_level=True) if env_node is not None else {}
        self.workflow_env = env

        name = self.required_string(fields, "name")
        mode = self.mode(fields.take_present("mode"))
        setup_node = fields.take_present("setup")
        setup = self.setup(setup_node) if setup_node is not None else None
        map_phase = self.map_phase(fields)
        reduce_node = fields.take_present("reduce")
        reduce = self.reduce(reduce_node) if reduce_node is not None else None
        error_policy = self.error_policy(fields)
        extra = self.top_extra(fields)
        self.warn_unknown(fields, _TOP_KEYS)

        if name is None or map_phase is None or error_policy is None:
            return None
        return Workflow(
            name=name,
            map=map_phase,
            mode=mode,
            env=env,
            setup=setup,
            reduce=reduce,
            error_policy=error_policy,
            extra=extra,
        )

    def mode(self, node: Node | None) -> str:
        if node is None:
            return SUPPORTED_MODE
        mode = self.r.string(node, "mode")
        if mode is not None and mode != SUPPORTED_MODE:
            self.r.error(
                "mode",
                f"unsupported mode {mode!r}: jetreduce runs MapReduce workflows only "
                f"(mode: {SUPPORTED_MODE})",
                node,
            )
        return SUPPORTED_MODE

    def env(self, node: Node, path: str, *, top_level: bool = False) -> dict[str, str]:
        """``map<string, string>``; numbers and booleans are kept as written (``5``, ``true``)."""
        fields = self.r.mapping(node, path, "a mapping of variable names to strings")
        if fields is None:
            return {}
        result: dict[str, str] = {}
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            value = entry.value
            if isinstance(value, ScalarNode) and value.tag != NULL_TAG:
                result[entry.key] = str(value.value)
            elif isinstance(value, MappingNode):
                hint = " (put secret values under top-level `secrets:`)" if top_level else ""
                self.r.error(
                    entry_path,
                    "expected a string value, got a mapping: env values must be strings in "
                    f"MapReduce workflows, and Prodigy rejects this too{hint}",
                    entry.key_node,
                )
            elif isinstance(value, ScalarNode):
                self.r.error(
                    entry_path, 'expected a string value, got null (write "" for empty)', value
                )
            else:
                self.r.expected(entry_path, "a string value", value)
        return result

    def top_extra(self, fields: Fields) -> dict[str, Any]:
        """Prodigy's top-level keys the model does not carry: shape-checked, kept verbatim."""
        extra: dict[str, Any] = {}
        checks = {
            "secrets": self.check_secrets,
            "env_files": self.check_env_files,
            "profiles": self.check_profiles,
            "merge": self.check_merge,
        }
        for key, check in checks.items():
            node = fields.take_present(key)
            if node is not None:
                check(node, key)
                extra[key] = self.r.plain(node, key)
        return extra

    def check_secrets(self, node: Node, path: str) -> None:
        fields = self.r.mapping(node, path, "a mapping of secret names")
        if fields is None:
            return
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            if isinstance(entry.value, MappingNode):
                secret = self.r.mapping(entry.value, entry_path)
                if secret is None:
                    continue
                provider_node = self.require(secret, "provider")
                if provider_node is not None:
                    self.choice(provider_node, join(entry_path, "provider"), _SECRET_PROVIDERS)
                key_node = self.require(secret, "key")
                if key_node is not None:
                    self.r.string(key_node, join(entry_path, "key"), non_empty=True)
            else:
                self.r.string(entry.value, entry_path)

    def check_env_files(self, node: Node, path: str) -> None:
        items = self.r.sequence(node, path, "a list of file paths")
        for i, item in enumerate(items or ()):
            self.r.string(item, index(path, i), non_empty=True)

    def check_profiles(self, node: Node, path: str) -> None:
        fields = self.r.mapping(node, path, "a mapping of profile names")
        if fields is None:
            return
        for entry in fields.rest():
            self.env(entry.value, join(path, entry.key))

    def check_merge(self, node: Node, path: str) -> None:
        """``merge`` is a list of steps or ``{commands, timeout}``; a mapping without
        ``commands`` is an error in Prodigy too."""
        result = self.phase_commands(node, path)
        if result is None:
            return
        _steps, fields = result
        if fields is not None:
            timeout = fields.take_present("timeout")
            if timeout is not None:
                self.duration(timeout, join(path, "timeout"), positive=True)
            self.warn_unknown(fields, ("commands", "timeout"))

    # -- phases ----------------------------------------------------------------------------

    def setup(self, node: Node) -> SetupPhase | None:
        result = self.phase_commands(node, "setup", extra_keys=True)
        if result is None:
            return None
        steps, fields = result
        if fields is None:
            return SetupPhase(steps=steps)
        timeout_node = fields.take_present("timeout")
        timeout_s = (
            self.duration(timeout_node, "setup.timeout", positive=True)
            if timeout_node is not None
            else None
        )
        captures_node = fields.take_present("capture_outputs")
        captures = (
            self.capture_outputs(captures_node, "setup.capture_outputs", len(steps))
            if captures_node is not None
            else {}
        )
        self.warn_unknown(fields, ("commands", "timeout", "capture_outputs"))
        return SetupPhase(steps=steps, timeout_s=timeout_s, capture_outputs=captures)

    def capture_outputs(self, node: Node, path: str, step_count: int) -> dict[str, Any]:
        """``VAR: <step index>`` (legacy) or ``VAR: {command_index, source, ...}``."""
        fields = self.r.mapping(node, path, "a mapping of variable names to capture settings")
        if fields is None:
            return {}
        result: dict[str, Any] = {}
        for entry in fields.rest():
            entry_path = join(path, entry.key)
            if isinstance(entry.value, MappingNode):
                config = self.r.mapping(entry.value, entry_path)
                if config is None:
                    continue
                index_node = self.require(config, "command_index")
                if index_node is not None:
                    self.step_index(index_node, join(entry_path, "command_index"), step_count)
                source = config.take_present("source")
                if source is not None:
                    self.choice(source, join(entry_path, "source"), _CAPTURE_SOURCES)
            else:
                self.step_index(entry.value, entry_path, step_count)
            result[entry.key] = self.r.plain(entry.value, entry_path)
        return result

    def step_index(self, node: Node, path: str, step_count: int) -> None:
        position = self.r.integer(node, path, minimum=0)
        if position is not None and position >= step_count:
            self.r.error(
                path,
                f"step index {position} is out of range: setup has {step_count} command(s)",
                node,
            )

    def map_phase(self, top: Fields) -> MapPhase | None:
        r = self.r
        node = self.require(top, "map")
        if node is None:
            return None
        fields = r.mapping(node, "map", "a mapping with input and agent_template")
        if fields is None:
            return None

        input_node = self.require(fields, "input")
        source = (
            r.string(input_node, "map.input", non_empty=True) if input_node is not None else None
        )
        json_path = self.expression(fields, "json_path", validate_json_path) or ""
        filter_ = self.expression(fields, "filter", validate_filter)
        sort_by = self.expression(fields, "sort_by", validate_sort)
        distinct = self.expression(fields, "distinct", parse_field_path)
        offset = self.optional_int(fields, "offset", "map", minimum=0)
        max_items = self.optional_int(fields, "max_items", "map", minimum=0)

        parallel_node = fields.take_present("max_parallel")
        max_parallel = (
            self.int_or_var(parallel_node, "map.max_parallel", minimum=1)
            if parallel_node is not None
            else 10
        )

        template_node = self.require(fields, "agent_template")
        agent_template: list[Step] | None = None
        if template_node is not None:
            result = self.phase_commands(template_node, "map.agent_template")
            if result is not None:
                agent_template, template_fields = result
                if template_fields is not None:
                    self.warn_unknown(template_fields, ("commands",))

        timeout_node = fields.take_present("agent_timeout_secs")
        agent_timeout_s = (
            self.duration(timeout_node, "map.agent_timeout_secs", positive=True)
            if timeout_node is not None
            else None
        )
        extra: dict[str, Any] = {}
        config_node = fields.take_present("timeout_config")
        if config_node is not None:
            config_timeout = self.timeout_config(config_node, "map.timeout_config")
            if timeout_node is None:
                agent_timeout_s = config_timeout
            extra["timeout_config"] = r.plain(config_node, "map.timeout_config")

        self.warn_unknown(
            fields,
            (
                "input",
                "json_path",
                "filter",
                "sort_by",
                "distinct",
                "offset",
                "max_items",
                "max_parallel",
                "agent_template",
                "agent_timeout_secs",
                "timeout_config",
            ),
        )
        if source is None or agent_template is None or max_parallel is None:
            return None
        return MapPhase(
            input=source,
            agent_template=agent_template,
            json_path=json_path,
            filter=filter_,
            sort_by=sort_by,
            distinct=distinct,
            offset=offset,
            max_items=max_items,
            max_parallel=max_parallel,
            agent_timeout_s=agent_timeout_s,
            extra=extra,
        )

    def expression(self, fields: Fields, key: str, validate: Callable[[str], object]) -> str | None:
        """A ``map`` pipeline expression, compiled now so that a typo is refused at submit (at
        its line and column) instead of failing the workflow after setup has run."""
        node = fields.take_present(key)
        path = join("map", key)
        text = None if node is None else self.r.string(node, path)
        if text is None or node is None:
            return None
        try:
            validate(text)
        except PipelineError as exc:
            self.r.error(path, f"invalid {key} expression: {exc}", node)
            return None
        return text

    def timeout_config(self, node: Node, path: str) -> float | None:
        """Check Prodigy's ``timeout_config`` block; return its ``agent_timeout_secs``."""
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        agent_timeout: float | None = None
        agent_node = fields.take_present("agent_timeout_secs")
        if agent_node is not None:
            agent_timeout = self.duration(
                agent_node, join(path, "agent_timeout_secs"), positive=True
            )
        commands = fields.take_present("command_timeouts")
        if commands is not None:
            command_fields = self.r.mapping(commands, join(path, "command_timeouts"))
            for entry in command_fields.rest() if command_fields else ():
                self.duration(
                    entry.value, join(join(path, "command_timeouts"), entry.key), positive=True
                )
        for key, allowed in (
            ("timeout_policy", _TIMEOUT_POLICIES),
            ("timeout_action", _TIMEOUT_ACTIONS),
        ):
            value = fields.take_present(key)
            if value is not None:
                self.choice(value, join(path, key), allowed)
        grace = fields.take_present("cleanup_grace_period_secs")
        if grace is not None:
            self.r.integer(grace, join(path, "cleanup_grace_period_secs"), minimum=0)
        monitoring = fields.take_present("enable_monitoring")
        if monitoring is not None:
            self.r.boolean(monitoring, join(path, "enable_monitoring"))
        self.warn_unknown(
            fields,
            (
                "agent_timeout_secs",
                "command_timeouts",
                "timeout_policy",
                "timeout_action",
                "cleanup_grace_period_secs",
                "enable_monitoring",
            ),
        )
        return agent_timeout

    def reduce(self, node: Node) -> ReducePhase | None:
        result = self.phase_commands(node, "reduce")
        if result is None:
            return None
        steps, fields = result
        if fields is not None:
            self.warn_unknown(fields, ("commands",))
        return ReducePhase(steps=steps)

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

    # -- steps -----------------------------------------------------------------------------

    def steps(self, node: SequenceNode, path: str) -> list[Step]:
        steps: list[Step] = []
        for i, item in enumerate(node.value):
            step = self.step(item, index(path, i))
            if step is not None:
                steps.append(step)
        return steps

    def step(self, node: Node, path: str) -> Step | None:
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
        extra = self.step_extra(fields, path)
        self.warn_unknown(
            fields,
            (
                *STEP_KINDS,
                *_STEP_FIELDS,
                *_STEP_EXTRA_BOOLS,
                *_STEP_EXTRA_STRINGS,
                *_STEP_EXTRA_OTHER,
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
            extra=extra,
        )

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
        """Modifiers Prodigy defines and this version does not execute: kept verbatim, with
        the flags that later stages may enforce (``commit_required``) type-checked now."""
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

    # -- error policy ----------------------------------------------------------------------

    def error_policy(self, top: Fields) -> ErrorPolicy | None:
        """``error_policy:`` then the top-level aliases, which override its fields."""
        values: dict[str, Any] = {}
        extra: dict[str, Any] = {}
        retry = RetryConfig()
        node = top.take_present("error_policy")
        if node is not None:
            fields = self.r.mapping(node, "error_policy")
            if fields is not None:
                for key in _POLICY_ALIASES:
                    value_node = fields.take_present(key)
                    if value_node is not None:
                        self.policy_field(key, value_node, join("error_policy", key), values, extra)
                breaker = fields.take_present("circuit_breaker")
                if breaker is not None:
                    self.check_circuit_breaker(breaker, "error_policy.circuit_breaker")
                    extra["circuit_breaker"] = self.r.plain(breaker, "error_policy.circuit_breaker")
                retry_node = fields.take_present("retry_config")
                if retry_node is not None:
                    retry = self.retry_config(retry_node, "error_policy.retry_config") or retry
                self.warn_unknown(fields, (*_POLICY_ALIASES, "circuit_breaker", "retry_config"))
        for key in _POLICY_ALIASES:
            value_node = top.take_present(key)
            if value_node is not None:
                self.policy_field(key, value_node, key, values, extra)
        return ErrorPolicy(**values, retry=retry, extra=extra)

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

    def check_circuit_breaker(self, node: Node, path: str) -> None:
        fields = self.r.mapping(node, path)
        if fields is None:
            return
        for key in ("failure_threshold", "success_threshold", "half_open_requests"):
            value = fields.take_present(key)
            if value is not None:
                self.r.integer(value, join(path, key), minimum=1)
        timeout = fields.take_present("timeout")
        if timeout is not None:
            self.duration(timeout, join(path, "timeout"), positive=True)
        self.warn_unknown(
            fields, ("failure_threshold", "success_threshold", "half_open_requests", "timeout")
        )

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
        what = "a mapping with one of " + ", ".join(_BACKOFF_KINDS)
        fields = self.r.mapping(node, path, what)
        if fields is None:
            return {}
        entries = fields.rest()
        if len(entries) != 1 or entries[0].key not in _BACKOFF_KINDS:
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

    # -- typed field helpers ---------------------------------------------------------------

    def require(self, fields: Fields, key: str, path: str | None = None) -> Node | None:
        """The value node of a required key; a missing key is reported at the mapping."""
        base = fields.path if path is None else path
        if not fields.has(key):
            self.r.error(join(base, key), "required key is missing", fields.node)
            return None
        return fields.take(key)

    def required_string(self, fields: Fields, key: str) -> str | None:
        node = self.require(fields, key)
        return None if node is None else self.r.string(node, join(fields.path, key), non_empty=True)

    def optional_string(
        self, fields: Fields, key: str, path: str, *, non_empty: bool = False
    ) -> str | None:
        node = fields.take_present(key)
        return None if node is None else self.r.string(node, join(path, key), non_empty=non_empty)

    def optional_int(
        self, fields: Fields, key: str, path: str, *, minimum: int | None = None
    ) -> int | None:
        node = fields.take_present(key)
        return None if node is None else self.r.integer(node, join(path, key), minimum=minimum)

    def choice(self, node: Node, path: str, allowed: Iterable[str]) -> str | None:
        options = tuple(allowed)
        text = self.r.string(node, path)
        if text is None:
            return None
        if text not in options:
            self.r.error(path, f"expected one of {', '.join(options)}, got {text!r}", node)
            return None
        return text

    def lookup(self, name: str, path: str, node: Node) -> str | None:
        """``$name`` from the workflow env, then the caller's env (Prodigy's order)."""
        if name in self.workflow_env:
            return self.workflow_env[name]
        if self.process_env is not None and name in self.process_env:
            return self.process_env[name]
        where = "the workflow env" + (" or the environment" if self.process_env is not None else "")
        self.r.error(path, f"variable {name} not found in {where}", node)
        return None

    def variable(self, node: Node) -> str | None:
        """The variable name if ``node`` is exactly ``$NAME`` or ``${NAME}``."""
        if not isinstance(node, ScalarNode) or node.tag != STR_TAG:
            return None
        match = _VAR.fullmatch(str(node.value).strip())
        if match is None:
            return None
        return match.group(1) or match.group(2)

    def int_or_var(self, node: Node, path: str, *, minimum: int) -> int | None:
        """An integer, a quoted integer, or ``$VAR`` naming one (``max_parallel``)."""
        name = self.variable(node)
        if name is not None:
            raw = self.lookup(name, path, node)
            if raw is None:
                return None
            if not _DECIMAL.fullmatch(raw.strip()):
                self.r.error(path, f"variable {name} = {raw!r} is not an integer", node)
                return None
            return self.r.check_minimum(int(raw.strip()), path, node, minimum)
        if (
            isinstance(node, ScalarNode)
            and node.tag == STR_TAG
            and _DECIMAL.fullmatch(str(node.value).strip())
        ):
            return self.r.check_minimum(int(str(node.value).strip()), path, node, minimum)
        if isinstance(node, ScalarNode) and node.tag == INT_TAG:
            return self.r.integer(node, path, minimum=minimum)
        self.r.expected(path, "an integer or $VAR", node)
        return None

    def duration(self, node: Node, path: str, *, positive: bool) -> float | None:
        """Seconds from a number, a humantime string, ``{secs, nanos}``, or ``$VAR`` naming
        either of the first two. ``positive`` rejects 0, which as a timeout would kill every
        command before it starts."""
        seconds = self._duration(node, path)
        if seconds is not None and not (math.isfinite(seconds) and seconds <= MAX_DURATION_S):
            self.r.error(path, f"must be at most {MAX_DURATION_S:.0f} seconds", node)
            return None
        if seconds is not None and positive and seconds <= 0:
            self.r.error(path, f"must be greater than 0, got {seconds:g}", node)
            return None
        return seconds

    def _duration(self, node: Node, path: str) -> float | None:
        r = self.r
        name = self.variable(node)
        if name is not None:
            raw = self.lookup(name, path, node)
            if raw is None:
                return None
            try:
                return parse_duration(raw)
            except ValueError:
                r.error(
                    path,
                    f"variable {name} = {raw!r} is not a number of seconds or a duration",
                    node,
                )
                return None
        if isinstance(node, ScalarNode) and node.tag in (INT_TAG, FLOAT_TAG):
            value = r.number(node, path)
            if value is not None and value < 0:
                r.error(path, f"must not be negative, got {value:g}", node)
                return None
            return value
        if isinstance(node, ScalarNode) and node.tag == STR_TAG:
            try:
                return parse_duration(str(node.value))
            except ValueError as exc:
                message = f"expected {_DURATION_EXPECTED}, got {describe(node)}"
                detail = str(exc).split(": ", 1)[-1]
                if detail.startswith("unknown unit"):
                    message += f" ({detail})"
                r.error(path, message, node)
                return None
        if isinstance(node, MappingNode):
            return self.secs_nanos(node, path)
        r.expected(path, _DURATION_EXPECTED, node)
        return None

    def secs_nanos(self, node: MappingNode, path: str) -> float | None:
        """serde's ``Duration`` shape ``{secs, nanos}``, as Prodigy's retry_config writes it."""
        fields = self.r.mapping(node, path)
        if fields is None:
            return None
        secs_node = self.require(fields, "secs")
        secs = (
            self.r.integer(secs_node, join(path, "secs"), minimum=0)
            if secs_node is not None
            else None
        )
        nanos_node = fields.take_present("nanos")
        nanos = (
            self.r.integer(nanos_node, join(path, "nanos"), minimum=0)
            if nanos_node is not None
            else 0
        )
        self.warn_unknown(fields, ("secs", "nanos"))
        if secs is None or nanos is None:
            return None
        return secs + nanos / 1e9

    def warn_unknown(self, fields: Fields, known: Iterable[str]) -> None:
        """Warn about every key left in ``fields``: Prodigy ignores unknown keys silently, so
        they are not errors here either, but a typo should not pass unnoticed."""
        choices = list(known)
        for entry in fields.rest():
            message = f"unknown key {entry.key!r} is ignored"
            hint = _MISPLACED_HINTS.get(entry.key) if fields.path == "" else None
            close = difflib.get_close_matches(entry.key, choices, n=1)
            if hint:
                message += f"; {hint}"
            elif close:
                message += f"; did you mean {close[0]!r}?"
            self.r.warn(join(fields.path, entry.key), message, entry.key_node)
