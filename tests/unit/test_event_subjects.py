"""An event consumed from a subject must be the kind of event that subject names, about the
workflow it names (contract/events.py ``decode(subject=…)``): a payload of one type
published on another's subject (which its publisher may write) is refused."""

from __future__ import annotations

import pytest

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects

s = Subjects("pfx")
COMPLETE = ev.encode(ev.MapComplete(workflow_id="wf", total=0, done=0, dead=0))


def test_the_event_its_subject_names_is_accepted() -> None:
    assert isinstance(ev.decode(COMPLETE, subject=s.map("complete", "wf")), ev.MapComplete)


def test_another_kind_of_event_on_a_subject_is_refused() -> None:
    with pytest.raises(ev.BadEvent, match=r"carries a map\.complete event"):
        ev.decode(COMPLETE, subject=s.map("failed", "wf"))
    with pytest.raises(ev.BadEvent):
        ev.decode(COMPLETE, subject=s.agent("exited", "wf"))


def test_an_event_of_another_workflow_is_refused() -> None:
    with pytest.raises(ev.BadEvent, match="of workflow"):
        ev.decode(COMPLETE, subject=s.map("complete", "other"))
