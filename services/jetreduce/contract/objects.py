"""Every object-store name in one place, as ``subjects.py`` is for subjects.

A workflow's objects are named ``<kind>/<workflow id>[/<item index>]``. Names are built from
the workflow id and an item index only, never from event fields or item data, so no event
can point a service at another workflow's object (``SubmitOptions.input_upload`` and
``WorkItem.item_stored`` are flags for the same reason).

Who writes and who deletes each kind:

========================== ============================ ==================================
name                       written by                   deleted by (janitor at the end)
========================== ============================ ==================================
``input/<wf>``             setup agent (resolved input)  always
``upload/<wf>``            submitter (``--upload``)      always
``items/<wf>/<i>``         planner (item > a message)    unless item ``i`` is dead-lettered
``outputs/<wf>/<i>``       map agent (output > MAX_TEXT) always
``logs/<wf>/<i>``          map agent (an item died)      unless item ``i`` is dead-lettered
========================== ============================ ==================================

A dead-lettered item keeps its stored item (a DLQ retry runs it again) and its log (``dlq
show`` prints it); ``dlq purge`` deletes both. The bucket's TTL (the retention) ends every
object in the end.
"""

from __future__ import annotations

from collections.abc import Callable

from jetreduce.contract.subjects import is_token

__all__ = [
    "DEAD_LETTER_KINDS",
    "PER_ITEM_KINDS",
    "input_object",
    "input_upload_object",
    "item_object",
    "log_object",
    "object_owner",
    "object_prefix",
    "output_object",
    "whole_workflow_objects",
]


def input_object(workflow_id: str) -> str:
    """The map input as setup resolved it (``SetupCompleted.input_object``), for the planner."""
    return f"input/{workflow_id}"


def input_upload_object(workflow_id: str) -> str:
    """Object-store name of a workflow's uploaded map input (``SubmitOptions.input_upload``)."""
    return f"upload/{workflow_id}"


def item_object(workflow_id: str, index: int) -> str:
    """Object-store name of an item too large for its message (``WorkItem.item_stored``)."""
    return f"items/{workflow_id}/{index}"


def output_object(workflow_id: str, index: int) -> str:
    """Object-store name of an item's whole output when it exceeds ``MAX_TEXT``."""
    return f"outputs/{workflow_id}/{index}"


def log_object(workflow_id: str, index: int) -> str:
    """Object-store name of a dead item's last attempt output (``ItemDead.log_object``)."""
    return f"logs/{workflow_id}/{index}"


PER_ITEM_KINDS: tuple[Callable[[str, int], str], ...] = (item_object, output_object, log_object)
"""Names with an item index: the janitor's object index follows these per workflow."""

DEAD_LETTER_KINDS: tuple[Callable[[str, int], str], ...] = (item_object, log_object)
"""Per-item objects kept while their item is in the dead-letter queue (see the module)."""


def whole_workflow_objects(workflow_id: str) -> tuple[str, ...]:
    """Names without an item index, deleted by name at the end (no listing needed)."""
    return (input_object(workflow_id), input_upload_object(workflow_id))


def object_prefix(name_of: Callable[[str, int], str], workflow_id: str) -> str:
    """What every name ``name_of`` gives for ``workflow_id`` starts with (to list them)."""
    return name_of(workflow_id, 0).removesuffix("0")


def object_owner(name: str) -> tuple[str, int, Callable[[str, int], str]] | None:
    """``(workflow id, index, kind)`` of a per-item object's name; None for other names."""
    rest, sep, index = name.rpartition("/")
    if not sep or not (index.isascii() and index.isdigit()):
        return None
    wf = rest.partition("/")[2]
    if not is_token(wf):  # no workflow has this id: not one of ours
        return None
    for kind in PER_ITEM_KINDS:
        if kind(wf, int(index)) == name:
            return wf, int(index), kind
    return None
