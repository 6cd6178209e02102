"""Per-role NATS users (runtime/permissions.py) on an embedded server started with ``roles``:
each forgery of issue 13 is refused by the server for the role that must not make it, and
the same publish by the role that may is stored."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout

from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import EmbeddedServer
from jetreduce.runtime.permissions import ROLES
from jetreduce.runtime.publish import is_stored

pytestmark = pytest.mark.anyio

WF = "wf-a"


@pytest.fixture
def server(tmp_path: Path, prefix: str) -> Iterator[EmbeddedServer]:
    with EmbeddedServer(tmp_path / "nats", roles=prefix) as srv:
        yield srv


@contextlib.asynccontextmanager
async def as_role(server: EmbeddedServer, role: str) -> AsyncIterator[tuple[Any, list[str]]]:
    """A connection as ``role`` (its ``<role>.env``), and the errors the server sent it."""
    env = dict(line.split("=", 1) for line in (server.data_dir / f"{role}.env").read_text().split())
    errors: list[str] = []

    async def on_error(exc: Exception) -> None:
        errors.append(str(exc))

    nc = await nats.connect(
        server.url,
        user=env["JETREDUCE_NATS_USER"],
        password=env["JETREDUCE_NATS_PASSWORD"],
        error_cb=on_error,
        allow_reconnect=False,
    )
    try:
        yield nc, errors
    finally:
        await nc.close()


async def stored_by(nc: Any, errors: list[str], subject: str, payload: bytes) -> bool:
    """Publish through JetStream; True if stored, False if the server refused it."""
    try:
        await nc.jetstream().publish(subject, payload, timeout=1.0)
    except NatsTimeout:
        await nc.flush()
        assert any("permissions violation" in e.lower() for e in errors), errors
        return False
    return True


async def test_each_role_may_publish_only_its_own(server: EmbeddedServer, prefix: str) -> None:
    s = Subjects(prefix)
    done = ev.encode(
        ev.ItemDone(
            workflow_id=WF,
            index=0,
            item_id="item_0",
            output="x",
            exit_code=0,
            duration_s=0,
            attempts=1,
            agent="a",
        )
    )
    complete = ev.encode(ev.MapComplete(workflow_id=WF, total=1, done=1, dead=0))
    cancel = ev.encode(ev.WorkflowCancelRequested(workflow_id=WF, reason="r"))
    async with as_role(server, "services") as (nc, _):
        await declare(nc.jetstream(), s)  # the services own the topology
        js = nc.jetstream()

    async with as_role(server, "clients") as (nc, errors):
        assert not await stored_by(nc, errors, s.item_done(WF, 0), done)
        assert not await stored_by(nc, errors, s.map("complete", WF), complete)
        assert not await stored_by(nc, errors, f"$KV.{s.workflows_bucket}.{WF}", b"{}")
        assert not await stored_by(nc, errors, f"$KV.{s.claims_bucket}.reduce.{WF}", b"{}")
        assert await stored_by(nc, errors, s.workflow("cancel", WF), cancel)
        # Read access: what it may not write, it may read.
        assert await is_stored(nc.jetstream(), s.events_stream, s.workflow("cancel", WF))

    async with as_role(server, "agents") as (nc, errors):
        assert not await stored_by(nc, errors, s.workflow("cancel", "other"), cancel)
        assert not await stored_by(nc, errors, s.map("complete", WF), complete)
        assert not await stored_by(nc, errors, f"$KV.{s.workflows_bucket}.{WF}", b"{}")
        assert await stored_by(nc, errors, s.item_done(WF, 0), done)
        assert await stored_by(nc, errors, f"$KV.{s.claims_bucket}.reduce.{WF}", b"{}")

    async with as_role(server, "services") as (nc, errors):
        assert await stored_by(nc, errors, s.map("complete", WF), complete)
        js = nc.jetstream()
        assert await is_stored(js, s.events_stream, s.map("complete", WF))
        assert not await is_stored(js, s.events_stream, s.workflow("cancel", "other"))
    assert set(ROLES) == {"services", "agents", "clients"}


async def test_credentials_are_private_files(server: EmbeddedServer) -> None:
    for role in ROLES:
        path = server.data_dir / f"{role}.env"
        assert path.stat().st_mode & 0o777 == 0o600
    with pytest.raises(Exception):  # noqa: B017 - no anonymous access with roles
        await nats.connect(server.url, allow_reconnect=False, max_reconnect_attempts=0)
