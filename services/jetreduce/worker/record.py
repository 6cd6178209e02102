"""Recording an item's terminal result, first write wins — among those who may write it.

``item.done`` / ``item.dead`` are create-only across both subjects of an item, so a twin
(an agent whose lease expired and whose item another agent ran again) never overwrites the
result recorded first. But anyone who can publish could store a result first for an item
that is not theirs (before it even runs), and the real one would then be dropped. So when
its write is refused, the agent looks at what is stored. It keeps it only if it can be a
twin's: written by an agent at another delivery of the item than this one (an earlier
lease that expired while its agent still ran, or a later one given out when this agent's
own lease expired: the usual case, since the later delivery often finishes first), or by
this very agent (a retried publish, or another of its slots), or the janitor's
``AgentCrashed`` verdict. Anything else (no agent, no attempt, another agent claiming this
very delivery) is removed, and the agent's own result is stored in its place.

Under per-role users (runtime/permissions.py) only agents and services may publish results,
and agents may not delete them: a refused delete leaves the stored result standing (the
forger was another agent). Without them, this bounds what a forger can do: a result stored
before the item's first delivery finishes is replaced unless it names another delivery; one
that does stands (which delivery numbers happened is known only to the server).
"""

from __future__ import annotations

import asyncio
import logging

from nats.errors import NoRespondersError
from nats.errors import TimeoutError as NatsTimeoutError
from nats.js import JetStreamContext
from nats.js.errors import APIError, NotFoundError

from jetreduce.contract.events import BadEvent, ItemDead, ItemDone, decode, encode
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.publish import AckMux

__all__ = ["record_result"]

log = logging.getLogger(__name__)

_TRIES = 3
DELETE_TIMEOUT_S = 2.0
"""A refused delete gets no answer: how long to wait for one before the result stands."""


async def record_result(
    acks: AckMux,
    js: JetStreamContext,
    s: Subjects,
    result: ItemDone | ItemDead,
    headers: dict[str, str],
) -> bool:
    """Store ``result`` create-only; True if it is the item's result now."""
    wf, index = result.workflow_id, result.index
    subject = s.item_done(wf, index) if isinstance(result, ItemDone) else s.item_dead(wf, index)
    payload = encode(result)
    for _ in range(_TRIES):
        guard = s.item_terminal(wf, index)
        if await acks.publish_once(subject, payload, guard=guard, headers=headers):
            return True
        if not await _remove_false(js, s, result):
            return False
    return False


async def _remove_false(js: JetStreamContext, s: Subjects, mine: ItemDone | ItemDead) -> bool:
    """Remove the stored result of ``mine``'s item if no agent with a lease can have written
    it; True if removed (or gone), False if it stands."""
    wf, index = mine.workflow_id, mine.index
    for subject in (s.item_done(wf, index), s.item_dead(wf, index)):
        try:
            raw = await js.get_last_msg(s.results_stream, subject)
        except NotFoundError:
            continue
        try:  # an item's subject ends with its index, not a workflow id: checked below
            stored = decode(raw.data or b"")
        except BadEvent:
            stored = None
        if isinstance(stored, ItemDone | ItemDead) and _possible(stored, mine):
            return False
        if raw.seq is not None:
            try:
                await asyncio.wait_for(js.delete_msg(s.results_stream, raw.seq), DELETE_TIMEOUT_S)
            except NotFoundError:
                pass  # removed meanwhile
            except (TimeoutError, NatsTimeoutError, NoRespondersError, APIError) as exc:
                # Under per-role users agents may not delete results (runtime/permissions):
                # the server refuses without an answer, and the stored one stands. Only
                # another agent could have written it there.
                log.error(
                    "item %d: a result no lease of it can have written was stored, and it "
                    "cannot be removed (%s): it stands",
                    index,
                    type(exc).__name__,
                )
                return False
        log.error("item %d: a result no lease of it can have written was stored; replaced", index)
        return True
    return True  # nothing stored (removed meanwhile): try again


def _possible(stored: ItemDone | ItemDead, mine: ItemDone | ItemDead) -> bool:
    if isinstance(stored, ItemDead) and stored.error_type == "AgentCrashed" and not stored.agent:
        return True  # the janitor's, for an item whose agents kept dying
    if (stored.workflow_id, stored.index) != (mine.workflow_id, mine.index) or not stored.agent:
        return False
    if stored.attempts < 1:
        return False
    # This agent (a retried publish, or another of its slots holding another delivery), or
    # another agent at another delivery, whether its lease came before ours or after (ours
    # expired while we ran). Never two agents at the same delivery.
    return stored.agent == mine.agent or stored.attempts != mine.attempts
