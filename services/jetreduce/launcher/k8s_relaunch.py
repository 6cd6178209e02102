"""The ``kubernetes`` backend's answer to a failed Job: run the phase again, or give it up.

A Job that fails as a whole (its per-index or overall backoff is used up) leaves the phase
with no agents while items remain. The poller then creates the phase's next Job
(``jr-<slug>-<phase>-<n>``, annotated ``jetreduce.io/attempt``) up to
``KubernetesSettings.max_relaunches`` times, keeping the failed ones for their pods' logs.
Past that bound, when the Job ran out of time (``DeadlineExceeded``), when an agent exited
with a non-retriable code, or when no pod could start within ``startup_deadline_s``, it
reports a final
``agent.exited`` with ``restarted=False, remaining=0``: the event on which the aggregator
fails the workflow, the same one the local backend sends when it gives up on its last agent.
Which Job is current is read from the API server (the highest attempt of a workflow phase),
so a restarted launcher picks up where the last one stopped.

Kept apart from the polling (:mod:`jetreduce.launcher.k8s_poller`), which only finds the
failed Job, because this is a policy of its own: the budget, the delay, and how the next run
is rebuilt from the failed Job alone (any launcher replica can do it, without the spec).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping
from dataclasses import replace
from typing import Any

from jetreduce.launcher.k8s_manifests import (
    AGENT_CONTAINER,
    IMAGE_ANNOTATION,
    build_phase_job,
    job_name,
)
from jetreduce.launcher.k8s_reports import JobReporter
from jetreduce.launcher.k8s_status import JobSeen, agent_slots, exit_code, held_slots

__all__ = ["JobRelauncher"]

log = logging.getLogger(__name__)


class JobRelauncher(JobReporter):
    """Relaunches and give-ups of :class:`~jetreduce.launcher.k8s_poller.JobPoller`, which
    extends it."""

    may_act: Callable[[], bool]
    """The launcher's leadership fence: no poll, relaunch or report without it."""

    def _nats_plain_env(self) -> dict[str, str]:
        raise NotImplementedError  # the backend's: the agents' NATS environment

    def _may_relaunch(self, seen: JobSeen, reason: str) -> bool:
        """Within the phase's budget: a relaunch left, and time left (a Job that hit its
        ``activeDeadlineSeconds`` used the phase's time; another run would only extend it);
        and no agent exited with a code that no new run can change."""
        return (
            reason != "DeadlineExceeded"
            and seen.permanent is None
            and seen.attempt < self.settings.max_relaunches
        )

    def _note_permanent(self, seen: JobSeen, pods: Mapping[str, Any]) -> None:
        """Remember a failed pod whose exit code is non-retriable (its index was failed by
        the Job's ``FailIndex`` rule)."""
        for pod in pods.get("items", []):
            pod_status = pod.get("status") or {}
            code = exit_code(pod_status)
            if (
                pod_status.get("phase") == "Failed"
                and code in self.settings.non_retriable_exit_codes
            ):
                seen.permanent = code

    async def _after_job_failed(
        self, seen: JobSeen, job: Mapping[str, Any], reason: str, relaunch: bool, reported: int
    ) -> None:
        """The phase's current Job failed: its pods are gone and will not come back. Create
        the next run once its delay is over, or, with no budget left, send the final
        ``agent.exited`` (``restarted=False, remaining=0``) on which the workflow fails."""
        if seen.relaunched or seen.gave_up:
            return
        why = reason or "no reason given"
        if not relaunch:
            seen.gave_up = True
            log.warning(
                "workflow %s: %s Job %s failed (%s) after %d relaunch(es); giving up",
                seen.wf,
                seen.phase,
                job_name(seen.wf, seen.phase, seen.attempt),
                why,
                seen.attempt,
            )
            if not reported:  # the pods' own reports (remaining=0) already said so
                await self._notify(
                    seen.wf,
                    seen.phase,
                    seen.last_index,
                    seen.last_code,
                    False,
                    0,
                    self._give_up_reason(seen, reason, seen.last_code),
                )
            return
        loop = asyncio.get_running_loop()
        if seen.relaunch_at is None:
            delay = self.settings.relaunch_delay_s * (seen.attempt + 1)
            seen.relaunch_at = loop.time() + delay
            log.warning(
                "workflow %s: %s Job failed (%s); relaunch %d of %d in %gs",
                seen.wf,
                seen.phase,
                why,
                seen.attempt + 1,
                self.settings.max_relaunches,
                delay,
            )
        if loop.time() >= seen.relaunch_at:
            await self._relaunch(seen, job)
            seen.relaunched = True

    async def _relaunch(self, seen: JobSeen, failed: Mapping[str, Any]) -> None:
        """Create the phase's next Job from what the failed one says about the workflow
        (namespace, completions, slots, secret keys, owner, deadline, and the image if the
        workflow chose it), with this installation's current pod settings otherwise; the
        launcher's spec is not needed, so any launcher replica can do it."""
        meta = failed.get("metadata") or {}
        spec = failed.get("spec") or {}
        containers = ((spec.get("template") or {}).get("spec") or {}).get("containers") or []
        container: Mapping[str, Any] = next(
            (c for c in containers if c.get("name") == AGENT_CONTAINER), {}
        )
        env = container.get("env") or []
        secret_keys = [e["name"] for e in env if "secretKeyRef" in (e.get("valueFrom") or {})]
        owners = meta.get("ownerReferences") or []
        deadline = spec.get("activeDeadlineSeconds")
        timeout_s = max(1, int(deadline) - self.settings.deadline_margin_s) if deadline else None
        image = (meta.get("annotations") or {}).get(IMAGE_ANNOTATION)
        settings = replace(
            self.settings,
            namespace=meta.get("namespace") or seen.namespace or self.settings.namespace,
            image=image or self.settings.image,
        )
        body = build_phase_job(
            seen.wf,
            seen.phase,
            completions=int(spec.get("completions") or 1),
            slots=agent_slots(failed),
            settings=settings,
            nats_env=self._nats_plain_env(),
            secret_keys=secret_keys,
            owner=owners[0] if owners else None,
            timeout_s=timeout_s,
            attempt=seen.attempt + 1,
            workflow_image=bool(image),
        )
        # 409: another launcher replica (or this one before a restart) got there first.
        if not self.may_act():
            return
        await self.kube.create(self.kube.batch.create_namespaced_job, body)
        name = body["metadata"]["name"]
        self._seen.setdefault(
            name,
            JobSeen(
                seen.wf,
                seen.phase,
                seen.attempt + 1,
                namespace=settings.namespace,
                held=held_slots(body),
            ),
        )
        log.warning("workflow %s: relaunched the %s phase as Job %s", seen.wf, seen.phase, name)
