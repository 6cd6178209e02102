"""The reduce phase: the map's counts and results as variables, the reduce steps, the outcome."""

from __future__ import annotations

import json
import logging
import os
import time

import msgspec

from jetreduce.contract.events import (
    MapComplete,
    ReduceCompleted,
    ReduceFailed,
    ReduceStarted,
    decode_as,
    encode,
)
from jetreduce.contract.workflow.model import Step
from jetreduce.runtime.claim import Taken
from jetreduce.runtime.publish import publish_once, publish_retrying
from jetreduce.runtime.telemetry import (
    trace_headers,
)
from jetreduce.worker.claimed import EXIT_SIGTERM
from jetreduce.worker.context import RESULTS_REF, AgentBase
from jetreduce.worker.outcome import (
    clip,
    error_tail,
    failure,
)
from jetreduce.worker.results import ResultsSpool

__all__ = ["ReduceRunner"]

log = logging.getLogger(__name__)


class ReduceRunner(AgentBase):
    """Reduce: the reduce steps under the reduce claim, with the map's results."""

    async def run_reduce(self) -> int:
        return await self._claimed("reduce", self._run_reduce)

    async def _run_reduce(self, taken: Taken) -> int:
        reduce = self.spec.workflow.reduce
        steps = reduce.steps if reduce else []
        msg = await self.ctx.js.get_last_msg(self.s.events_stream, self.s.map("complete", self.wf))
        complete = decode_as(msg.data or b"", MapComplete)
        started = self.s.reduce("started", self.wf)
        await publish_retrying(  # once per attempt
            self.ctx.js,
            started,
            encode(ReduceStarted(workflow_id=self.wf, attempt=taken.attempt)),
            headers={"Nats-Msg-Id": f"{started}.{taken.attempt}.{os.getpid()}"},
        )
        # Reading every result back costs seconds per 100k items: only when a step (or one of
        # its handlers) refers to them. The counts come from map.complete either way.
        text = msgspec.json.encode(steps).decode()
        wants_results = "map.results" in text or "MAP_RESULTS_FILE" in text
        spool = ResultsSpool(self.scratch)
        spool.done, spool.dead = complete.done, complete.dead
        try:
            results_file = self.scratch / "map-results.jsonl"
            if wants_results:
                await spool.fill(self.ctx.js, self.s, self.wf, complete.done + complete.dead)
            spool.write_jsonl(results_file)
            variables = dict(self.vars_base)
            variables.update(
                {
                    "map.total": complete.total,
                    "map.successful": spool.done,
                    "map.failed": spool.dead,
                    "map.results_file": str(results_file),
                    "reduce.attempt": taken.attempt,
                }
            )
            if any(RESULTS_REF.search(_step_text(s)) for s in steps):
                variables["map.results"] = json.loads(spool.as_json_array())
            self.env.update(
                {
                    "MAP_TOTAL": str(complete.total),
                    "MAP_SUCCESSFUL": str(spool.done),
                    "MAP_FAILED": str(spool.dead),
                    "MAP_RESULTS_FILE": str(results_file),
                    "REDUCE_ATTEMPT": str(taken.attempt),
                }
            )
        finally:
            spool.close()
        start = time.monotonic()
        if self.env_problem is not None:
            result = failure(self.env_problem)
        else:
            result = await self._steps(steps, variables, deadline=None)
        outcomes, failed = result.outcomes, result.failed
        output = "\n".join(o.stdout.rstrip("\n") for o in outcomes if o.stdout)
        if not await self._still_held():
            return EXIT_SIGTERM
        if failed is not None:
            error = self._describe(steps, result)
            detail = error_tail(failed).strip()
            await publish_once(
                self.ctx.js,
                self.s.reduce("failed", self.wf),
                encode(
                    ReduceFailed(
                        workflow_id=self.wf,
                        error=f"reduce {error}: {detail}",
                        exit_code=failed.exit_code,
                        output=clip(output),
                    )
                ),
                headers=trace_headers(self.trace),
            )
            return 0
        await publish_once(
            self.ctx.js,
            self.s.reduce("completed", self.wf),
            encode(
                ReduceCompleted(
                    workflow_id=self.wf, output=clip(output), duration_s=time.monotonic() - start
                )
            ),
            headers=trace_headers(self.trace),
        )
        return 0


def _step_text(step: Step) -> str:
    parts = [step.shell or "", step.claude or ""]
    if step.write_file is not None:
        parts += [step.write_file.path, step.write_file.content]
    return " ".join(parts)
