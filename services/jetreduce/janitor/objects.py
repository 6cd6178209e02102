"""Which per-item objects (large items and outputs, dead items' logs) each workflow has in
the object store, kept up to date from the store's meta subjects, so that cleaning up after a
workflow costs its own objects only.

The object store keeps one meta message per object on ``$O.<bucket>.M.<base64 name>``. The
name is base64 encoded into a single subject token, and subject filters match whole tokens
only, so the server cannot select "the objects named ``items/<wf>/…``" for us: listing the
store (``ObjectStore.list``) reads the meta of every object of every workflow, at every
workflow end. Instead :class:`ObjectIndex` follows the meta subjects once (an ordered
consumer, last message per subject, then every change) and keeps the names of per-item
objects (``items/``, ``outputs/``, ``logs/``: ``contract/objects.py``) per workflow. Its memory
is a name per such object: items and outputs hold more than a message's worth of bytes each,
and logs exist for dead items only, so the index is a small fraction of the store.

Before answering for a workflow, :meth:`ObjectIndex.names` waits until the index has read up
to the newest meta message stored at the time of the call: an object put before the workflow
ended (its last output, say) is never missed because the consumer lags.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
from typing import Any

from nats.aio.msg import Msg
from nats.aio.subscription import Subscription
from nats.js import JetStreamContext
from nats.js.api import DeliverPolicy
from nats.js.errors import NotFoundError
from nats.js.object_store import OBJ_ALL_META_PRE_TEMPLATE, OBJ_STREAM_TEMPLATE

from jetreduce.contract.objects import object_owner

__all__ = ["CATCH_UP_S", "ObjectIndex"]

log = logging.getLogger(__name__)

CATCH_UP_S = 10.0
"""Longest wait (s) for the index to read the meta messages stored before a question; past
it :meth:`ObjectIndex.names` raises and the janitor's event is redelivered."""


def _owner(name: str) -> str | None:
    """The workflow id in a per-item object's name (``contract.objects.PER_ITEM_KINDS``);
    None for other objects."""
    owner = object_owner(name)
    return owner[0] if owner is not None else None


class ObjectIndex:
    """Names of the per-item objects (``items/``, ``outputs/``, ``logs/``) per workflow (see
    the module docstring). :meth:`run` follows the store; :meth:`names` answers once caught up."""

    def __init__(self, js: JetStreamContext, bucket: str) -> None:
        self._js = js
        self._stream = OBJ_STREAM_TEMPLATE.format(bucket=bucket)
        self._meta = OBJ_ALL_META_PRE_TEMPLATE.format(bucket=bucket)
        self._names: dict[str, set[str]] = {}
        self._seq = 0
        """Stream sequence of the last meta message applied."""
        self._progress = asyncio.Condition()

    async def run(self, stop: asyncio.Event, retry_s: float = 1.0) -> None:
        """Follow the meta subjects until ``stop`` (re-subscribing, after ``retry_s``, if the
        subscription cannot be made; the ordered consumer itself recovers from gaps)."""
        while not stop.is_set():
            sub: Subscription | None = None
            try:
                sub = await self._js.subscribe(
                    self._meta,
                    stream=self._stream,
                    cb=self._on_meta,
                    ordered_consumer=True,
                    deliver_policy=DeliverPolicy.LAST_PER_SUBJECT,
                )
                await stop.wait()
            except Exception as exc:
                log.warning("janitor: following the object store failed (%r); retrying", exc)
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(stop.wait(), retry_s)
            finally:
                if sub is not None:
                    with contextlib.suppress(Exception):  # cleanup: the connection may be closing
                        await sub.unsubscribe()

    async def _on_meta(self, msg: Msg) -> None:
        try:
            meta: Any = json.loads(msg.data)
            name, deleted = str(meta["name"]), bool(meta.get("deleted"))
        except (ValueError, KeyError, TypeError):
            name, deleted = "", True  # unreadable: nothing to index, but it was read
        wf = _owner(name)
        if wf is not None:
            if deleted:
                names = self._names.get(wf)
                if names is not None:
                    names.discard(name)
                    if not names:
                        del self._names[wf]
            else:
                self._names.setdefault(wf, set()).add(name)
        async with self._progress:
            self._seq = max(self._seq, msg.metadata.sequence.stream)
            self._progress.notify_all()

    async def names(self, wf: str, timeout_s: float = CATCH_UP_S) -> set[str]:
        """The names of ``wf``'s per-item objects stored when this is called.
        Raises ``TimeoutError`` when the index has not caught up within ``timeout_s``."""
        try:
            newest = (await self._js.get_last_msg(self._stream, self._meta)).seq or 0
        except NotFoundError:
            newest = 0  # an empty store
        async with self._progress:
            await asyncio.wait_for(self._progress.wait_for(lambda: self._seq >= newest), timeout_s)
        return set(self._names.get(wf, ()))
