"""The ``kubernetes`` backend's settings as the command line resolves them (``run``,
``service``, ``services up``): the installation's defaults with the flags' choices, checked
before anything connects. Kept out of :mod:`jetreduce.cli.app` so the Kubernetes options
grow here, in one place, without touching the commands."""

from __future__ import annotations

import os
import re
from dataclasses import replace
from pathlib import Path

import typer
import yaml

from jetreduce.cli import exit_codes
from jetreduce.launcher.k8s_settings import KubernetesSettings, SettingsFileError, from_file_data

__all__ = ["SETTINGS_FILE_ENV", "kubernetes_settings"]

SETTINGS_FILE_ENV = "JETREDUCE_K8S_SETTINGS"
"""Path of the installation's agent settings file (YAML, keys in ``docs/kubernetes.md``);
the deployment mounts the ``jetreduce-agents`` ConfigMap there."""

_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]{0,61}[a-z0-9])?")


def _usage(message: str) -> typer.Exit:
    typer.echo(message, err=True)
    return typer.Exit(exit_codes.USAGE)


def _from_file(path: str | None) -> KubernetesSettings:
    """The defaults with the settings file's values, if a file is named; a file that cannot
    be read or says something wrong stops the command (exit 2) with every problem."""
    if not path:
        return KubernetesSettings()
    try:
        data = yaml.safe_load(Path(path).read_text())
    except OSError as exc:
        raise _usage(f"{SETTINGS_FILE_ENV}: cannot read {path}: {exc.strerror or exc}") from None
    except yaml.YAMLError as exc:
        raise _usage(f"{SETTINGS_FILE_ENV}: {path} is not YAML: {exc}") from None
    try:
        return from_file_data(data)
    except SettingsFileError as exc:
        raise _usage(f"{SETTINGS_FILE_ENV}: {path}: {exc}") from None


def kubernetes_settings(
    namespace: str | None,
    image: str | None,
    workflow_namespaces: list[str],
    settings_file: str | None = None,
) -> KubernetesSettings:
    """The installation's Kubernetes settings: defaults, then the settings file
    (``settings_file``, else ``$JETREDUCE_K8S_SETTINGS``), then the command line's choices
    (namespaces checked here: a typo would otherwise surface only as a workflow's refusal).
    An empty workflow namespace (an unset ConfigMap key) is no namespace."""
    workflow_namespaces = [n for n in workflow_namespaces if n]
    for name in [namespace or "", *workflow_namespaces]:
        if name and not _DNS_LABEL.fullmatch(name):
            raise _usage(f"{name!r} is not a Kubernetes namespace name")
    k8s = _from_file(settings_file or os.environ.get(SETTINGS_FILE_ENV))
    return replace(
        k8s,
        namespace=namespace or k8s.namespace,
        image=image or k8s.image,
        workflow_namespaces=tuple(dict.fromkeys(workflow_namespaces)),
    )
