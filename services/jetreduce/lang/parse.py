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

import json
from collections.abc import Callable, Iterable, Mapping
from typing import Any

import msgspec
import yaml
from yaml.nodes import MappingNode, Node

from jetreduce.contract.workflow.errors import ERROR, WARNING, Problem, WorkflowInvalid
from jetreduce.contract.workflow.model import (
    MapPhase,
    ReducePhase,
    SetupPhase,
    Step,
    Workflow,
)
from jetreduce.lang._environment import EnvironmentParser
from jetreduce.lang._policy import POLICY_ALIASES, PolicyParser
from jetreduce.lang._steps import StepParser
from jetreduce.lang._yaml_nodes import (
    MAX_DEPTH,
    BoundedLoader,
    Fields,
    Reader,
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

_CAPTURE_SOURCES = ("stdout", "stderr", "both", "combined")
_TIMEOUT_POLICIES = ("PerAgent", "PerCommand", "Hybrid")
_TIMEOUT_ACTIONS = ("Dlq", "Skip", "Fail", "GracefulTerminate")
_TOP_EXTRA = ("secrets", "env_files", "profiles", "merge")
_TOP_KEYS = (
    "name",
    "mode",
    "env",
    "setup",
    "map",
    "reduce",
    "error_policy",
    *POLICY_ALIASES,
    *_TOP_EXTRA,
)

MERGE_NOT_RUN = (
    "`merge:` is checked but not run: in Prodigy it replaces the final merge of the session "
    "worktree into your branch, and jetreduce has no session worktree (setup and reduce run "
    "in the workflow directory, and each item's commits are merged into the workflow branch "
    "as soon as the item succeeds), so there is no merge for these commands to replace"
)
"""Why a workflow's ``merge:`` does nothing here (docs/prodigy-compatibility.md §3.1)."""

MAX_WORKFLOW_CHARS = 4 * 1024 * 1024
"""Longest workflow text read at all. Real files are a few kilobytes; the YAML parser is pure
Python (about a second per megabyte), so the bound keeps a hostile submit from holding the
planner for long."""

MAX_PROBLEMS = 100
"""Most errors (and, separately, warnings) reported; the rest are counted in one last line."""


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


class _WorkflowParser(StepParser, PolicyParser, EnvironmentParser):
    """One parse: section readers that share the `Reader` (problems) and the variable scope."""

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
        environment = self.environment(fields)
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
            **environment,
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

    def environment(self, fields: Fields) -> dict[str, Any]:
        """The typed ``secrets``, ``env_files`` and ``profiles`` (keyword arguments of
        `Workflow`)."""
        values: dict[str, Any] = {}
        readers = {
            "secrets": self.secrets,
            "env_files": self.env_files,
            "profiles": self.profiles,
        }
        for key, read in readers.items():
            node = fields.take_present(key)
            if node is not None:
                values[key] = read(node, key)
        return values

    def top_extra(self, fields: Fields) -> dict[str, Any]:
        """``merge``: shape-checked, kept verbatim, not run (and warned about)."""
        extra: dict[str, Any] = {}
        key_node = fields.key_node("merge")
        node = fields.take_present("merge")
        if node is not None:
            self.check_merge(node, "merge")
            extra["merge"] = self.r.plain(node, "merge")
            self.r.warn("merge", MERGE_NOT_RUN, key_node)
        return extra

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
