"""``jetreduce logs WF ITEM``: everything recorded about one item's runs.

An item's output lives in three places, each written once by the agent that ran it: every
failed attempt is an ``item.failed`` event (exit code, error, stderr tail), the terminal
result is ``item.done`` (its output) or ``item.dead``, and a dead item's full step log is an
object ``logs/<wf>/<index>`` in the object store (``worker/recording.py`` ``_store_log``). This
reads them back in that order. Nothing here is a live tail: agents publish on completion.
"""

from __future__ import annotations

from typing import Annotated, Any

import typer
from nats.js.errors import NotFoundError

from jetreduce.cli import exit_codes
from jetreduce.cli.options import Nats, item_argument
from jetreduce.cli.session import run_connected
from jetreduce.contract import events as ev
from jetreduce.contract.subjects import Subjects
from jetreduce.runtime.store import read_events

__all__ = ["item_logs", "register"]


async def _failed_attempts(js: Any, s: Subjects, wf: str, index: int) -> list[ev.ItemFailed]:
    """Every stored ``item.failed`` of the item, oldest first (``runtime/store.py``)."""
    stored = await read_events(js, s.events_stream, s.item_failed(wf, index))
    return [e for e in stored if isinstance(e, ev.ItemFailed)]


async def _last(js: Any, stream: str, subject: str) -> ev.Event | None:
    try:
        msg = await js.get_last_msg(stream, subject)
    except NotFoundError:
        return None
    return ev.decode(msg.data or b"")


async def item_logs(nc: Any, s: Subjects, wf: str, index: int) -> tuple[str, bool]:
    """The report for one item, and whether anything at all was recorded for it."""
    js = nc.jetstream()
    lines: list[str] = []
    found = False
    for failed in await _failed_attempts(js, s, wf, index):
        found = True
        retry = f", retried after {failed.retry_in_s:.1f}s" if failed.retry_in_s else ""
        lines.append(f"=== attempt {failed.attempt}: failed (exit code {failed.exit_code}{retry})")
        lines.append(failed.error)
        if failed.stderr_tail:
            lines.append("--- stderr (tail)")
            lines.append(failed.stderr_tail.rstrip("\n"))
    done = await _last(js, s.results_stream, s.item_done(wf, index))
    if isinstance(done, ev.ItemDone):
        found = True
        lines.append(
            f"=== done: attempt {done.attempts}, exit code {done.exit_code}, "
            f"{done.duration_s:.2f}s on {done.agent or 'an agent'}"
        )
        lines.append("--- output")
        lines.append(done.output.rstrip("\n"))
    dead = await _last(js, s.results_stream, s.item_dead(wf, index))
    if isinstance(dead, ev.ItemDead):
        found = True
        lines.append(
            f"=== dead after {dead.attempts} attempt(s): {dead.error_type} "
            f"(exit code {dead.exit_code})"
        )
        lines.append(dead.error)
        if dead.log_object:
            lines.append(f"--- stored log ({dead.log_object})")
            try:
                store = await js.object_store(s.objects_bucket)
                stored = await store.get(dead.log_object)
                lines.append((stored.data or b"").decode(errors="replace").rstrip("\n"))
            except Exception as exc:
                lines.append(f"(log unavailable: {exc})")
        elif dead.stderr_tail:
            lines.append("--- stderr (tail)")
            lines.append(dead.stderr_tail.rstrip("\n"))
    return "\n".join(lines), found


def register(app: typer.Typer, settings_of: Any) -> None:
    """Add ``logs`` to ``app``; ``settings_of(nats)`` gives the connection settings."""

    @app.command("logs")
    def logs_cmd(
        workflow_id: Annotated[str, typer.Argument(help="Workflow id.")],
        item: Annotated[str, typer.Argument(help="Item id (item_N or N).")],
        nats: Nats = None,
    ) -> None:
        """An item's recorded output: each failed attempt (exit code, stderr tail), its
        output when done, and the stored log of a dead item."""
        index = item_argument(item)

        async def go(nc: Any, s: Subjects) -> int:
            report, found = await item_logs(nc, s, workflow_id, index)
            if not found:
                typer.echo(f"nothing recorded for {item} of {workflow_id} (yet)", err=True)
                return exit_codes.FAILED
            typer.echo(report)
            return exit_codes.OK

        run_connected(settings_of(nats), go)
