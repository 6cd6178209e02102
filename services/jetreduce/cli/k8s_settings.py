"""The ``kubernetes`` backend's settings as the command line resolves them (``run``,
``service``, ``services up``): the installation's defaults with the flags' choices, checked
before anything connects. Kept out of :mod:`jetreduce.cli.app` so the Kubernetes options
grow here, in one place, without touching the commands."""

from __future__ import annotations

import re
from dataclasses import replace

import typer

from jetreduce.cli import exit_codes
from jetreduce.launcher.k8s_settings import KubernetesSettings

__all__ = ["kubernetes_settings"]

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _usage(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(exit_codes.USAGE)


def kubernetes_settings(
    namespace: str | None, image: str | None, workflow_namespaces: list[str]
) -> KubernetesSettings:
    """The installation's Kubernetes settings with the command line's choices (namespaces
    checked here: a typo would otherwise surface only as a workflow's refusal)."""
    for name in [namespace or "", *workflow_namespaces]:
        if name and not _DNS_LABEL.fullmatch(name):
            raise _usage(f"{name!r} is not a Kubernetes namespace name")
    k8s = KubernetesSettings()
    return replace(
        k8s,
        namespace=namespace or k8s.namespace,
        image=image or k8s.image,
        workflow_namespaces=tuple(dict.fromkeys(workflow_namespaces)),
    )
