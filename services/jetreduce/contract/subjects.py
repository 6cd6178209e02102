"""Every wire name in one place: subjects, stream names, consumer names, KV buckets.

An installation may share a NATS account with others, so every subject starts with an optional
prefix and every stream/bucket name with the matching upper-case tag. Nothing outside this
module writes a subject literal. Tokens that come from users (workflow ids) are validated by
:func:`check_token` before they are placed in a subject, so a hostile id cannot widen a
wildcard or address another workflow's subjects.

The builders check again (defence in depth): a workflow token must be a valid id, ``*`` (a
filter) or ``""`` (only to build a prefix to compare with, never a subject to publish), and
an item token is the item's index, a non-negative int, or ``*``. Item ids (``item_<index>``)
are derived from that index, never from item data, so no user-supplied text ever becomes an
item token: data such as ``{"id": "a.b *>"}`` cannot change a subject.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from jetreduce.contract.errors import PermanentError

__all__ = [
    "MAX_INDEX",
    "TERMINAL_EVENTS",
    "TOKEN_RE",
    "InvalidToken",
    "Subjects",
    "check_token",
    "is_token",
]

TOKEN_RE = re.compile(r"[A-Za-z0-9_-]{1,80}")
"""What a workflow id (and any other user-chosen subject token) may look like. Use it with
``fullmatch`` only: with ``match`` and a ``$`` anchor, ``"wf\\n"`` would pass, and a newline
in a subject breaks the NATS protocol line it is sent on."""

MAX_INDEX = 2**63 - 1
"""Largest item index: what a JSON reader in any language holds as an integer."""


class InvalidToken(PermanentError, ValueError):
    """A value that would not be a single, literal subject token."""


def is_token(value: object) -> bool:
    """True if ``value`` is a string usable as one literal subject token (and KV key)."""
    return isinstance(value, str) and TOKEN_RE.fullmatch(value) is not None


def check_token(value: str, what: str = "workflow id") -> str:
    if not is_token(value):
        shown = value[:100] + "..." if isinstance(value, str) and len(value) > 100 else value
        raise InvalidToken(f"invalid {what} {shown!r}: use 1-80 characters of A-Z a-z 0-9 _ -")
    return value


def _wf(wf: str) -> str:
    """A workflow token: an id, ``*`` to match any, or ``""`` for a prefix (see module)."""
    if wf in ("*", "") or is_token(wf):
        return wf
    return check_token(wf)


def _item(item: int | str) -> str:
    """An item token: its index (a non-negative int, never a bool) or ``*``."""
    if isinstance(item, int) and not isinstance(item, bool) and 0 <= item <= MAX_INDEX:
        return str(item)
    if item == "*":
        return item
    raise InvalidToken(f"invalid item index {str(item)[:100]!r}: expected an int from 0")


LANES = ("p0", "p1", "p2")
"""Priority lanes of the work stream, highest first. ``p1`` is the default (normal)."""

PRIORITY_LANES = {"high": "p0", "normal": "p1", "low": "p2"}

TERMINAL_EVENTS = ("completed", "failed", "cancelled", "timed_out")
"""``workflow.<event>`` names that end a workflow: the one list every service, watcher and
test uses (``contract.records.Phase`` names its terminal phases after them)."""


@dataclass(frozen=True)
class Subjects:
    """Subject and resource names for one installation (one ``prefix``)."""

    prefix: str = ""

    def __post_init__(self) -> None:
        if self.prefix:
            for part in self.prefix.split("."):
                check_token(part, "subject prefix")

    # -- helpers ---------------------------------------------------------------------------
    def _s(self, *tokens: str) -> str:
        body = ".".join(tokens)
        return f"{self.prefix}.{body}" if self.prefix else body

    def _name(self, base: str) -> str:
        tag = self.prefix.replace(".", "_").upper()
        return f"{tag}_JR_{base}" if tag else f"JR_{base}"

    # -- streams, buckets -----------------------------------------------------------------
    @property
    def submit_stream(self) -> str:
        return self._name("SUBMIT")

    @property
    def events_stream(self) -> str:
        return self._name("EVENTS")

    @property
    def work_stream(self) -> str:
        return self._name("WORK")

    @property
    def results_stream(self) -> str:
        return self._name("RESULTS")

    @property
    def progress_stream(self) -> str:
        return self._name("PROGRESS")

    @property
    def dlq_stream(self) -> str:
        return self._name("DLQ")

    @property
    def advisories_stream(self) -> str:
        return self._name("ADVISORIES")

    @property
    def max_deliveries_advisories(self) -> str:
        """Server advisories for work items delivered ``max_deliver`` times (an agent kept
        dying on them). Captured in a stream: core advisories are lost if nobody listens."""
        return f"$JS.EVENT.ADVISORY.CONSUMER.MAX_DELIVERIES.{self.work_stream}.*"

    @property
    def workflows_bucket(self) -> str:
        return self._name("WORKFLOWS")

    @property
    def specs_bucket(self) -> str:
        return self._name("SPECS")

    @property
    def objects_bucket(self) -> str:
        return self._name("OBJECTS")

    @property
    def claims_bucket(self) -> str:
        """Who runs a one-agent phase (setup, reduce) of a workflow now (runtime/claim.py)."""
        return self._name("CLAIMS")

    def claim_key(self, phase: str, wf: str) -> str:
        """The key of a workflow's phase claim in :attr:`claims_bucket`."""
        return f"{check_token(phase, 'phase')}.{check_token(wf)}"

    # -- submissions ----------------------------------------------------------------------
    @property
    def submit(self) -> str:
        return self._s("workflow", "submit")

    # -- lifecycle events (EVENTS stream) -----------------------------------------------
    def workflow(self, event: str, wf: str) -> str:
        return self._s("workflow", event, _wf(wf))

    def setup(self, event: str, wf: str) -> str:
        return self._s("setup", event, _wf(wf))

    def telemetry_leases(self, wf: str) -> str:
        """Agents' lease reports (core NATS: outside every stream, so nothing is stored)."""
        return self._s("telemetry", "leases", wf)

    def map(self, event: str, wf: str) -> str:
        return self._s("map", event, _wf(wf))

    def reduce(self, event: str, wf: str) -> str:
        return self._s("reduce", event, _wf(wf))

    def agent(self, event: str, wf: str) -> str:
        return self._s("agent", event, _wf(wf))

    def item_failed(self, wf: str, item: int) -> str:
        return self._s("item", "failed", _wf(wf), _item(item))

    def workflow_ends(self, wf: str) -> list[str]:
        """The subjects of the events that end ``wf`` (an id, or ``*`` for any workflow)."""
        return [self.workflow(event, wf) for event in TERMINAL_EVENTS]

    def any_workflow(self, event: str = "*") -> str:
        return self._s("workflow", event, "*")

    def all_of(self, wf: str, *, done_items: bool = True) -> list[str]:
        """Subjects a watcher of one workflow subscribes to: events, progress, failed and
        dead items, and (``done_items``) every successful item, which is one message per
        item — leave it out when nobody shows them."""
        wf = _wf(wf)
        subjects = [
            self._s("*", "*", wf),
            self._s("item", "failed", wf, "*"),
            self._s("item", "dead", wf, "*"),
            self._s("progress", wf),
        ]
        if done_items:
            subjects.append(self._s("item", "done", wf, "*"))
        return subjects

    @property
    def events_subjects(self) -> list[str]:
        return [
            self._s("workflow", "*", "*"),
            self._s("setup", "*", "*"),
            self._s("map", "*", "*"),
            self._s("reduce", "*", "*"),
            self._s("agent", "*", "*"),
            self._s("item", "failed", "*", "*"),
        ]

    # -- work items -----------------------------------------------------------------------
    def work(self, lane: str, wf: str, item: int) -> str:
        return self._s("work", lane, _wf(wf), _item(item))

    def work_of(self, wf: str) -> str:
        return self._s("work", "*", _wf(wf), "*")

    def work_consumer(self, wf: str) -> str:
        return f"work-{check_token(wf)}"

    @property
    def work_subjects(self) -> list[str]:
        return [self._s("work", "*", "*", "*")]

    # -- results --------------------------------------------------------------------------
    def item_done(self, wf: str, item: int) -> str:
        return self._s("item", "done", _wf(wf), _item(item))

    def item_dead(self, wf: str, item: int) -> str:
        return self._s("item", "dead", _wf(wf), _item(item))

    def item_terminal(self, wf: str, item: int | str) -> str:
        """Both terminal subjects of one item: the create-only guard spans done and dead."""
        return self._s("item", "*", _wf(wf), _item(item))

    def dead_of(self, wf: str) -> str:
        return self._s("item", "dead", _wf(wf), "*")

    def done_of(self, wf: str) -> str:
        return self._s("item", "done", _wf(wf), "*")

    def terminal_of(self, wf: str) -> str:
        return self._s("item", "*", _wf(wf), "*")

    @property
    def results_subjects(self) -> list[str]:
        return [self._s("item", "done", "*", "*"), self._s("item", "dead", "*", "*")]

    # -- progress, dlq --------------------------------------------------------------------
    def progress(self, wf: str) -> str:
        return self._s("progress", _wf(wf))

    @property
    def progress_subjects(self) -> list[str]:
        return [self._s("progress", "*")]

    def dlq(self, wf: str, item: int) -> str:
        return self._s("dlq", _wf(wf), _item(item))

    def dlq_of(self, wf: str) -> str:
        return self._s("dlq", _wf(wf), "*")

    @property
    def dlq_subjects(self) -> list[str]:
        return [self._s("dlq", "*", "*")]
