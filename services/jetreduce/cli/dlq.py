"""``jetreduce dlq``: list, show, retry and purge dead-lettered items."""

from __future__ import annotations

import contextlib
import json
from typing import Annotated, Any

import msgspec
import typer
from nats.js.errors import NotFoundError

from jetreduce.cli import exit_codes
from jetreduce.cli.options import Nats, item_argument
from jetreduce.cli.session import Body, run_connected
from jetreduce.contract import events as ev
from jetreduce.contract.objects import DEAD_LETTER_KINDS, object_prefix
from jetreduce.contract.subjects import Subjects
from jetreduce.lang.pipeline import PipelineError, compile_filter
from jetreduce.runtime.store import read_events

__all__ = ["build"]


async def _entries(nc: Any, subjects: Subjects, wf: str | None) -> list[ev.ItemDead]:
    subject = subjects.dlq_of(wf) if wf else subjects.dlq_of("*")
    stored = await read_events(nc.jetstream(), subjects.dlq_stream, subject)
    out = [e for e in stored if isinstance(e, ev.ItemDead)]
    return sorted(out, key=lambda e: (e.workflow_id, e.index))


def build(settings_of: Any) -> typer.Typer:
    """The ``dlq`` sub-app; ``settings_of(nats)`` gives the connection settings."""
    app = typer.Typer(
        help="Dead-lettered items: list, show, retry, purge.",
        no_args_is_help=True,
        rich_markup_mode="markdown",
    )

    def run(body: Body, nats: str | None) -> None:
        run_connected(settings_of(nats), body)

    @app.command("list")
    def list_cmd(
        workflow_id: Annotated[
            str | None, typer.Argument(help="Workflow id (all if omitted).")
        ] = None,
        nats: Nats = None,
    ) -> None:
        """One line per dead item: workflow, item, error type, attempts, error."""

        async def go(nc: Any, s: Subjects) -> int:
            for e in await _entries(nc, s, workflow_id):
                typer.echo(
                    f"{e.workflow_id}  {e.item_id}  {e.error_type}  attempts={e.attempts}  "
                    f"{e.error}"
                )
            return exit_codes.OK

        run(go, nats)

    @app.command("show")
    def show_cmd(
        workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
        item: Annotated[str, typer.Argument(help="Item id (item_N or N).")],
        nats: Nats = None,
    ) -> None:
        """Everything about one dead item: its data, error, attempts and log."""
        index = item_argument(item)

        async def go(nc: Any, s: Subjects) -> int:
            js = nc.jetstream()
            try:
                msg = await js.get_last_msg(s.dlq_stream, s.dlq(workflow_id, index))
            except NotFoundError:
                typer.echo(f"no dead item {item} in {workflow_id}", err=True)
                return exit_codes.FAILED
            event = ev.decode(msg.data)
            typer.echo(json.dumps(msgspec.to_builtins(event), indent=2))
            if isinstance(event, ev.ItemDead) and event.log_object:
                try:
                    store = await js.object_store(s.objects_bucket)
                    log = await store.get(event.log_object)
                    typer.echo(f"--- log ({event.log_object})")
                    typer.echo((log.data or b"").decode(errors="replace"))
                except Exception as exc:
                    typer.echo(f"(log unavailable: {exc})", err=True)
            return exit_codes.OK

        run(go, nats)

    @app.command("retry")
    def retry_cmd(
        workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
        item: Annotated[
            list[str] | None, typer.Option("--item", help="Only these items (repeatable).")
        ] = None,
        filter_expr: Annotated[
            str | None,
            typer.Option("--filter", help="Only items whose data matches (map.filter syntax)."),
        ] = None,
        nats: Nats = None,
    ) -> None:
        """Run dead items again. A finished workflow re-opens: its reduce runs again once the
        retried items are terminal."""
        wanted = {item_argument(i) for i in item} if item else None
        try:
            matches = compile_filter(filter_expr) if filter_expr else None
        except PipelineError as exc:
            raise typer.BadParameter(str(exc), param_hint="--filter") from None

        async def go(nc: Any, s: Subjects) -> int:
            entries = [
                e
                for e in await _entries(nc, s, workflow_id)
                if (wanted is None or e.index in wanted) and (matches is None or matches(e.item))
            ]
            if not entries:
                typer.echo("no matching dead items", err=True)
                return exit_codes.FAILED
            request = ev.WorkflowRetryRequested(
                workflow_id=workflow_id, indices=[e.index for e in entries]
            )
            await nc.jetstream().publish(s.workflow("retry", workflow_id), ev.encode(request))
            typer.echo(f"{len(entries)} item(s) of {workflow_id} queued for retry")
            return exit_codes.OK

        run(go, nats)

    @app.command("purge")
    def purge_cmd(
        workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
        nats: Nats = None,
    ) -> None:
        """Forget a workflow's dead-lettered items (their results stay recorded as dead)."""

        async def go(nc: Any, s: Subjects) -> int:
            js = nc.jetstream()
            await js.purge_stream(s.dlq_stream, subject=s.dlq_of(workflow_id))
            # Stored items and logs stay while dead-lettered (contract/objects.py): not now.
            with contextlib.suppress(NotFoundError):
                store = await js.object_store(s.objects_bucket)
                prefix = tuple(object_prefix(kind, workflow_id) for kind in DEAD_LETTER_KINDS)
                for info in await store.list(ignore_deletes=True):
                    if info.name.startswith(prefix):
                        await store.delete(info.name)
            typer.echo(f"dead-letter queue of {workflow_id} purged")
            return exit_codes.OK

        run(go, nats)

    return app
