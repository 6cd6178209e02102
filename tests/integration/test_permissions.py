"""Per-role NATS users (runtime/permissions.py) on an embedded server started with ``roles``:
each forgery of issue 13 is refused by the server for the role that must not make it, the
same publish by the role that may is stored, and the real code path of each role works with
its own user (the whole of ``jetreduce run``: tests/e2e/test_roles.py)."""

from __future__ import annotations

import contextlib
import json
from collections.abc import AsyncIterator, Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import msgspec
import nats
import pytest
from nats.errors import TimeoutError as NatsTimeout
from nats.js.api import AckPolicy, ConsumerConfig
from nats.js.errors import BadRequestError, ObjectNotFoundError

from helpers import connected_as, stored_or_refused
from jetreduce.cli.host import ServiceHost
from jetreduce.cli.submit import SubmitRejected, submit
from jetreduce.cli.upload import delete_upload, upload_input
from jetreduce.contract import events as ev
from jetreduce.contract.objects import input_upload_object
from jetreduce.contract.subjects import Subjects
from jetreduce.contract.topology import declare
from jetreduce.embedded import EmbeddedServer, role_settings
from jetreduce.queues.jetstream import JetStreamQueue
from jetreduce.runtime.permissions import ROLES
from jetreduce.runtime.publish import AckMux, is_stored
from jetreduce.runtime.service import ServiceContext
from jetreduce.runtime.settings import NatsSettings
from jetreduce.worker.record import record_result

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
    user, password = env["JETREDUCE_NATS_USER"], env["JETREDUCE_NATS_PASSWORD"]
    async with connected_as(server.url, user, password) as (nc, errors):
        yield nc, errors


stored_by = stored_or_refused


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
        assert await stored_by(nc, errors, f"$KV.{s.claims_bucket}.setup.{WF}", b"{}")
        # The launcher's lease: an agent holding it would stall every launcher.
        lease = f"$KV.{s.claims_bucket}.{s.claim_key('leader', 'launcher')}"
        assert not await stored_by(nc, errors, lease, b"{}")

    async with as_role(server, "services") as (nc, errors):
        assert await stored_by(nc, errors, s.map("complete", WF), complete)
        lease = f"$KV.{s.claims_bucket}.{s.claim_key('leader', 'launcher')}"
        assert await stored_by(nc, errors, lease, b"{}")
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


async def refused(nc: Any, errors: list[str], subject: str, payload: bytes = b"") -> bool:
    """A request the server refuses to deliver (no reply, and a permissions violation for
    exactly this subject); False if anything answered."""
    try:
        await nc.request(subject, payload, timeout=0.2)
    except NatsTimeout:
        await nc.flush()
        return any(
            "permissions violation" in e.lower() and subject.lower() in e.lower() for e in errors
        )
    return False


def _work_item(index: int) -> bytes:
    return ev.encode(ev.WorkItem(workflow_id=WF, index=index, item=index))


async def test_no_client_or_agent_may_consume_the_work_queue(
    server: EmbeddedServer, prefix: str
) -> None:
    """Reading is not harmless on the work stream. A consumer with AckNone there would remove
    each message as it delivers it: the server refuses to create one on a work-queue stream
    (10098, shown here as the services, who may create anything). But any consumer that pulls
    spends the items' deliveries (``max_deliver``: they end dead-lettered) and a consumer
    whose filter overlaps a workflow's keeps the planner from creating that workflow's own;
    so neither clients nor agents may create consumers there, and clients may not pull."""
    s = Subjects(prefix)
    async with as_role(server, "services") as (nc, _):
        js = nc.jetstream()
        await declare(js, s)
        for index in range(3):
            await js.publish(s.work("p1", WF, index), _work_item(index))
        with pytest.raises(BadRequestError) as refusal:
            await js.add_consumer(
                s.work_stream,
                ConsumerConfig(
                    ack_policy=AckPolicy.NONE, filter_subject=s.work_of(WF), deliver_subject="x"
                ),
            )
        assert refusal.value.err_code == 10098  # "workqueue stream requires explicit ack"
        assert (await js.stream_info(s.work_stream)).state.messages == 3
    create = json.dumps(
        {"stream_name": s.work_stream, "config": {"ack_policy": "none", "deliver_subject": "x"}}
    ).encode()
    for role in ("clients", "agents"):
        async with as_role(server, role) as (nc, errors):
            for subject in (
                f"$JS.API.CONSUMER.CREATE.{s.work_stream}",
                f"$JS.API.CONSUMER.CREATE.{s.work_stream}.drain.{s.work_of(WF)}",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{s.work_stream}.drain",
                f"$JS.API.STREAM.PURGE.{s.work_stream}",
            ):
                assert await refused(nc, errors, subject, create), (role, subject)
            if role == "clients":  # nor pull from the workflow's own consumer
                subject = f"$JS.API.CONSUMER.MSG.NEXT.{s.work_stream}.{s.work_consumer(WF)}"
                assert await refused(nc, errors, subject, b"1"), subject


async def test_agents_run_the_map_as_themselves(server: EmbeddedServer, prefix: str) -> None:
    """The real queue code path of a map agent works as ``agents`` (lease, heartbeat, ack,
    retry, dead), once the services made the workflow's consumer; the launcher's events,
    deleting a result, writing workflow records or specs are refused."""
    s = Subjects(prefix)
    async with as_role(server, "services") as (nc, _):
        ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=s)
        await declare(ctx.js, s)
        queue = JetStreamQueue(ctx, WF)
        await queue.prepare(visibility_s=30, max_attempts=3, parallel=2)
        await queue.enqueue(ev.WorkItem(workflow_id=WF, index=i, item=i) for i in range(3))
        stored = await ctx.js.publish(s.item_done(WF, 9), b"{}")
    async with as_role(server, "agents") as (nc, errors):
        ctx = ServiceContext(nc=nc, js=nc.jetstream(), subjects=s)
        agents = JetStreamQueue(ctx, WF)
        leases = await agents.lease(3, 5)
        assert sorted(lease.item.index for lease in leases) == [0, 1, 2]
        await agents.heartbeat(leases[0])
        await agents.ack(leases[0])
        await agents.retry(leases[1], 0.01)
        await agents.dead(leases[2], "no")
        (again,) = await agents.lease(1, 5)
        assert again.item.index == 1 and again.attempt == 2
        await agents.ack(again)
        await agents.close()
        await nc.flush()
        assert not errors, errors
        exited = ev.encode(
            ev.AgentExited(workflow_id=WF, phase="map", index=0, exit_code=0, restarted=False)
        )
        assert not await stored_by(nc, errors, s.agent("exited", WF), exited)
        assert not await stored_by(nc, errors, s.agent("launched", WF), b"{}")
        assert not await stored_by(nc, errors, f"$KV.{s.specs_bucket}.{WF}", b"{}")
        delete = json.dumps({"seq": stored.seq}).encode()
        assert await refused(nc, errors, f"$JS.API.STREAM.MSG.DELETE.{s.results_stream}", delete)
        assert await refused(nc, errors, f"$JS.API.STREAM.PURGE.{s.results_stream}")
        assert await refused(nc, errors, f"$JS.API.STREAM.DELETE.{s.events_stream}")
        assert await refused(
            nc, errors, f"$JS.API.STREAM.UPDATE.{s.events_stream}", b'{"name":"x"}'
        )
        # What it may: its own phase events, the claims bucket, its queue status.
        assert await stored_by(nc, errors, s.reduce("started", WF), b"{}")
        assert await stored_by(nc, errors, s.agent("queue", WF), b"{}")
    async with as_role(server, "services") as (nc, _):
        assert await is_stored(nc.jetstream(), s.results_stream, s.item_done(WF, 9))
        info = await nc.jetstream().stream_info(s.work_stream)
        assert info.state.messages == 0  # every item acked or terminated by the agent


async def test_clients_may_not_write_what_the_services_or_agents_write(
    server: EmbeddedServer, prefix: str
) -> None:
    s = Subjects(prefix)
    async with as_role(server, "services") as (nc, _):
        await declare(nc.jetstream(), s)
    async with as_role(server, "clients") as (nc, errors):
        for subject in (
            s.item_dead(WF, 0),
            s.item_failed(WF, 0),
            s.map("failed", WF),
            s.reduce("completed", WF),
            s.setup("completed", WF),
            s.workflow("completed", WF),
            s.agent("exited", WF),
            s.dlq(WF, 0),
            s.progress(WF),
            f"$KV.{s.specs_bucket}.{WF}",
        ):
            assert not await stored_by(nc, errors, subject, b"{}"), subject
        for subject in (
            f"$JS.API.STREAM.MSG.DELETE.{s.results_stream}",
            f"$JS.API.STREAM.PURGE.{s.events_stream}",
            f"$JS.API.STREAM.CREATE.{s.events_stream}",
            f"$JS.API.CONSUMER.MSG.NEXT.{s.events_stream}.x",
        ):
            assert await refused(nc, errors, subject, b"{}"), subject


async def test_clients_upload_and_remove_a_submission_input(
    server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    """``submit`` of a pod workflow uploads the map input, and removes it if the submission
    is refused: both work as ``clients`` (cli/upload.py, the real functions); an agent reads
    it back."""
    s = Subjects(prefix)
    source = tmp_path / "items.json"
    source.write_bytes(b"[1, 2, 3]" * 20000)  # several chunks
    async with as_role(server, "services") as (nc, _):
        await declare(nc.jetstream(), s)
    async with as_role(server, "clients") as (nc, errors):
        js = nc.jetstream()
        await upload_input(js, s, WF, source)
        assert not errors, errors
    async with as_role(server, "agents") as (nc, errors):
        store = await nc.jetstream().object_store(s.objects_bucket)
        assert (await store.get(input_upload_object(WF))).data == source.read_bytes()
    async with as_role(server, "clients") as (nc, errors):
        js = nc.jetstream()
        await delete_upload(js, s, WF)
        store = await js.object_store(s.objects_bucket)
        with pytest.raises(ObjectNotFoundError):
            await store.get(input_upload_object(WF))
        assert not errors, errors


async def test_the_planner_answers_a_submission_only_on_an_inbox(
    server: EmbeddedServer, prefix: str, tmp_path: Path
) -> None:
    """The reply subject of a submission is the submitter's choice and the planner may
    publish anything: a client naming ``reduce.completed.<wf>`` would have the planner store
    its answer there, a publish the client itself is refused. The planner answers on inboxes
    only; a submission with an inbox gets its answer as before."""
    s = Subjects(prefix)
    services = role_settings(server.data_dir, "services", NatsSettings(url=server.url))
    assert services is not None
    host = ServiceHost(replace(services, prefix=prefix), names=("planner",), log_dir=tmp_path)
    async with host.running(), as_role(server, "clients") as (nc, errors):
        target = s.reduce("completed", "victim")
        assert not await stored_by(nc, errors, target, b"{}")  # not by itself
        bad = ev.WorkflowSubmit(workflow_id="wf-x", workflow="name: x\n")
        await nc.jetstream().publish(s.submit, ev.encode(bad), headers={ev.REPLY_HEADER: target})
        # The same submission with an inbox is answered (rejected: no map): so the one
        # before it was handled, and not answered on the stream.
        with pytest.raises(SubmitRejected):
            await submit(nc, s, "name: x\n", ev.SubmitOptions(), workflow_id="wf-y", source="t")
        assert not await is_stored(nc.jetstream(), s.events_stream, target)


async def test_no_client_or_agent_may_change_or_delete_a_services_consumer(
    server: EmbeddedServer, prefix: str
) -> None:
    """Readers create ephemeral consumers only: the services' durable consumers on the
    events stream (whose loss or change would lose events) cannot be deleted, updated or
    replaced by a client or an agent."""
    s = Subjects(prefix)
    async with as_role(server, "services") as (nc, _):
        js = nc.jetstream()
        await declare(js, s)
        filter_subject = s.workflow("*", "*")
        await js.add_consumer(
            s.events_stream,
            ConsumerConfig(
                durable_name="launcher",
                ack_policy=AckPolicy.EXPLICIT,
                filter_subject=filter_subject,
            ),
        )
    durable = {"durable_name": "launcher", "ack_policy": "explicit", "filter_subject": ">"}
    update = json.dumps(
        {"stream_name": s.events_stream, "config": durable, "action": "update"}
    ).encode()
    for role in ("clients", "agents"):
        async with as_role(server, role) as (nc, errors):
            for subject in (
                f"$JS.API.CONSUMER.DELETE.{s.events_stream}.launcher",
                f"$JS.API.CONSUMER.CREATE.{s.events_stream}.launcher",
                f"$JS.API.CONSUMER.CREATE.{s.events_stream}.launcher.>",
                f"$JS.API.CONSUMER.DURABLE.CREATE.{s.events_stream}.launcher",
            ):
                assert await refused(nc, errors, subject, update), (role, subject)
            # The one create subject a reader may use takes no durable (the server's rule).
            answer = await nc.request(
                f"$JS.API.CONSUMER.CREATE.{s.events_stream}", update, timeout=2
            )
            assert json.loads(answer.data)["error"]["err_code"] == 10020
            # What it is for still works: an ordered consumer reads the stream.
            before = len(errors)
            sub = await nc.jetstream().subscribe(
                s.workflow("*", "*"), stream=s.events_stream, ordered_consumer=True
            )
            await sub.unsubscribe()
            await nc.flush()
            assert errors[before:] == []
    async with as_role(server, "services") as (nc, _):
        info = await nc.jetstream().consumer_info(s.events_stream, "launcher")
        assert info.config.filter_subject == filter_subject


async def test_an_agent_that_may_not_delete_a_false_result_lets_it_stand(
    server: EmbeddedServer, prefix: str
) -> None:
    """worker/record.py removes a result no lease can have written; as ``agents`` it may not
    (the server refuses without an answer): the attempt ends with the stored result standing
    instead of failing, and it is not retried until the item's deliveries run out."""
    s = Subjects(prefix)
    async with as_role(server, "services") as (nc, _):
        await declare(nc.jetstream(), s)
    forged = ev.ItemDone(
        workflow_id=WF,
        index=0,
        item_id="item_0",
        output="forged",
        exit_code=0,
        duration_s=0,
        attempts=0,
        agent="",
    )
    mine = msgspec.structs.replace(forged, output="real", attempts=1, agent="h/1/map-0")
    async with as_role(server, "agents") as (nc, errors):
        js = nc.jetstream()
        assert await stored_by(nc, errors, s.item_done(WF, 0), ev.encode(forged))
        acks = await AckMux(nc).start()
        try:
            assert not await record_result(acks, js, s, mine, {})
        finally:
            await acks.close()
        stored = ev.decode((await js.get_last_msg(s.results_stream, s.item_done(WF, 0))).data)
        assert isinstance(stored, ev.ItemDone) and stored.output == "forged"
        assert any("permissions violation" in e.lower() for e in errors), errors
