"""Names and decisions shared by services have one home in the contract: the events that end
a workflow (``subjects.TERMINAL_EVENTS``, the terminal phases named after them), the
object-store names (``contract/objects.py``), whose owner the janitor reads back, and whether
a workflow runs a reduce (``records.needs_reduce``: the launcher and the aggregator agree)."""

from __future__ import annotations

import msgspec

from jetreduce.contract import events as ev
from jetreduce.contract.objects import (
    DEAD_LETTER_KINDS,
    PER_ITEM_KINDS,
    input_object,
    input_upload_object,
    item_object,
    log_object,
    object_owner,
    object_prefix,
    output_object,
    whole_workflow_objects,
)
from jetreduce.contract.records import Phase, StoredSpec, needs_reduce
from jetreduce.contract.subjects import TERMINAL_EVENTS, Subjects
from jetreduce.lang import parse_workflow


def test_the_terminal_phases_are_the_terminal_events() -> None:
    assert {p.value for p in Phase if p.terminal} == set(TERMINAL_EVENTS)


def test_each_terminal_event_has_its_event_type() -> None:
    tags = {
        t.__struct_config__.tag
        for t in ev.Event.__args__  # type: ignore[attr-defined]
        if issubclass(t, msgspec.Struct)
    }
    assert {f"workflow.{e}" for e in TERMINAL_EVENTS} <= tags


def test_workflow_ends_are_the_terminal_subjects() -> None:
    s = Subjects("pfx")
    assert s.workflow_ends("wf") == [
        "pfx.workflow.completed.wf",
        "pfx.workflow.failed.wf",
        "pfx.workflow.cancelled.wf",
        "pfx.workflow.timed_out.wf",
    ]
    assert s.workflow_ends("*") == [s.workflow(e, "*") for e in TERMINAL_EVENTS]


def test_object_names() -> None:
    assert input_object("wf") == "input/wf"
    assert input_upload_object("wf") == "upload/wf"
    assert log_object("wf", 3) == "logs/wf/3"
    assert whole_workflow_objects("wf") == ("input/wf", "upload/wf")
    assert object_prefix(log_object, "wf") == "logs/wf/"
    assert set(DEAD_LETTER_KINDS) <= set(PER_ITEM_KINDS)


def test_a_per_item_objects_owner_is_read_back_from_its_name() -> None:
    for kind in PER_ITEM_KINDS:
        assert object_owner(kind("wf-1", 12)) == ("wf-1", 12, kind)
    assert object_owner(item_object("a", 0)) == ("a", 0, item_object)
    assert object_owner(output_object("a", 7)) == ("a", 7, output_object)


def test_other_names_have_no_owner() -> None:
    for name in [
        input_object("wf"),
        input_upload_object("wf"),
        "items/wf",  # no index
        "items/wf/x",
        "items/wf/²",  # a digit to str.isdigit, not to int()
        "items//3",
        "items/a/b/3",  # the id would hold a slash
        "other/wf/3",
        "",
    ]:
        assert object_owner(name) is None, name


def spec(reduce: str) -> StoredSpec:
    text = f'name: r\nmap:\n  input: "seq 1 3"\n  agent_template:\n    - shell: "true"\n{reduce}'
    return StoredSpec(workflow=parse_workflow(text, env={}).workflow, options=ev.SubmitOptions())


def test_a_reduce_runs_when_there_are_steps_and_items() -> None:
    with_reduce = spec('reduce:\n  - shell: "echo done"\n')
    assert needs_reduce(with_reduce, 3)
    assert not needs_reduce(with_reduce, 0)  # Prodigy: no items skips map and reduce
    assert not needs_reduce(spec(""), 3)
    assert not needs_reduce(spec("reduce: []\n"), 3)
