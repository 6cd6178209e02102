"""The setup phase: steps, captures, and the map input handed to the planner."""

from __future__ import annotations

import logging
import os
import time
from pathlib import Path
from typing import Any

from jetreduce.contract.events import (
    SetupCompleted,
    SetupFailed,
    encode,
)
from jetreduce.contract.objects import input_object, input_upload_object
from jetreduce.lang.map_input import INPUT_COMMAND_TIMEOUT_S, input_command, input_file
from jetreduce.runtime.claim import Taken
from jetreduce.runtime.publish import publish_once
from jetreduce.runtime.telemetry import (
    trace_headers,
)
from jetreduce.worker.claimed import EXIT_SIGTERM
from jetreduce.worker.context import ENV_NAME, AgentBase
from jetreduce.worker.outcome import (
    ERROR_TAIL,
    clip,
    error_tail,
)
from jetreduce.worker.steps import run_process
from jetreduce.worker.workspace import WorkspaceError

__all__ = ["SetupRunner"]

log = logging.getLogger(__name__)


class SetupRunner(AgentBase):
    """Setup: the workflow's setup steps under the setup claim, then the map input stored for
    the planner (a setup-created file, the input file, its upload, or a command's output)."""

    async def run_setup(self) -> int:
        return await self._claimed("setup", self._run_setup)

    async def _run_setup(self, taken: Taken) -> int:
        self.vars_base["setup.attempt"] = taken.attempt
        self.env["SETUP_ATTEMPT"] = str(taken.attempt)
        setup = self.spec.workflow.setup
        steps = setup.steps if setup else []
        deadline = (time.monotonic() + setup.timeout_s) if setup and setup.timeout_s else None
        if self.env_problem is not None:
            await self._setup_failed(f"setup: {self.env_problem}", None)
            return 0
        if self.spec.options.workspace == "item":
            try:  # --worktrees without a usable repository fails here, before any step
                await self.workspaces.prepare()
            except WorkspaceError as exc:
                await self._setup_failed(f"setup: {exc}", None)
                return 0
        before = set(os.listdir(self.workdir))
        variables = dict(self.vars_base)
        captures: dict[str, str] = {}
        result = await self._steps(steps, variables, deadline=deadline, captures=captures)
        outcomes = result.outcomes
        failed = result.failed
        if failed is not None:
            error = self._describe(steps, result)
            detail = error_tail(failed).strip()
            await self._setup_failed(
                f"setup {error}: {detail}" if detail else f"setup {error}", failed.exit_code
            )
            return 0
        if setup:
            for name, ref in setup.capture_outputs.items():
                index = ref if isinstance(ref, int) else (ref or {}).get("command_index", 0)
                if isinstance(index, int) and 0 <= index < len(outcomes):
                    captures[name] = outcomes[index].stdout.strip()
        variables.update(captures)
        self.env.update({k: v for k, v in captures.items() if ENV_NAME.fullmatch(k)})
        path, is_command, problem = await self._resolve_input(before, variables)
        if problem is not None:
            await self._setup_failed(problem, None)
            return 0
        store = await self.ctx.js.object_store(self.s.objects_bucket)
        name = input_object(self.wf)
        size = path.stat().st_size
        with open(path, "rb") as f:
            await store.put(name, f)
        if not await self._still_held():
            return EXIT_SIGTERM
        await publish_once(
            self.ctx.js,
            self.s.setup("completed", self.wf),
            encode(
                SetupCompleted(
                    workflow_id=self.wf,
                    captures=captures,
                    input_object=name,
                    input_is_command=is_command,
                    input_bytes=size,
                )
            ),
            headers=trace_headers(self.trace),
        )
        return 0

    async def _resolve_input(
        self, before: set[str], variables: dict[str, Any]
    ) -> tuple[Path, bool, str | None]:
        """The map input as a file: a setup-created ``*work-items.json``, the input path, the
        copy of it the submitter uploaded (a pod does not see the submitter's disk; a file
        that setup wrote, or that is here, wins), or the input command's whole stdout
        (spooled to disk, never truncated)."""

        new_items = sorted(
            f for f in set(os.listdir(self.workdir)) - before if f.endswith("work-items.json")
        )
        if new_items:
            return Path(self.workdir, new_items[0]), False, None
        source = self.spec.workflow.map.input
        as_path = input_file(source, variables, self.workdir)
        if as_path is not None:
            return as_path, False, None
        if self.spec.options.input_upload:
            uploaded = self.scratch / "map-input.uploaded"
            name = input_upload_object(self.wf)
            try:
                store = await self.ctx.js.object_store(self.s.objects_bucket)
                with open(uploaded, "wb") as sink:
                    await store.get(name, writeinto=sink)
            except Exception as exc:
                why = f"map.input: the uploaded copy ({name}) is unreadable: {exc}"
                return uploaded, False, why
            return uploaded, False, None
        cmd = input_command(source, variables, spill_dir=self.scratch)
        spooled = self.scratch / "map-input"
        out = await run_process(
            ["sh", "-c", cmd.script],
            env={**self.env, **cmd.env},
            cwd=self.workdir,
            timeout_s=INPUT_COMMAND_TIMEOUT_S,
            stdout_path=spooled,
        )
        if not out.ok:
            why = "timed out" if out.timed_out else f"exited with code {out.exit_code}"
            detail = self.masker.mask(out.stderr).strip()[-ERROR_TAIL:]
            # A path that is not a file was run as a command: say both, not "not found".
            return (
                spooled,
                True,
                f"map.input {source!r} is neither a file nor a command that succeeded "
                f"(as a command it {why}: {detail})",
            )
        if self.masker:  # items are published: no secret may ride in them
            masked = self.scratch / "map-input.masked"
            with (
                open(spooled, encoding="utf-8", errors="surrogateescape") as src,
                open(masked, "w", encoding="utf-8", errors="surrogateescape") as dst,
            ):
                for line in src:
                    dst.write(self.masker.mask(line))
            masked.replace(spooled)
        return spooled, True, None

    async def _setup_failed(self, error: str, code: int | None) -> None:
        if not await self._still_held():
            return
        await publish_once(
            self.ctx.js,
            self.s.setup("failed", self.wf),
            encode(SetupFailed(workflow_id=self.wf, error=clip(error), exit_code=code)),
        )
