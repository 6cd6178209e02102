"""Running the orchestrator: ``service NAME`` (one service, as a Deployment runs it),
``services up`` (all four in one process), ``worker`` (the agent entry point) and ``server``
(the embedded nats-server). :func:`host_services` is the seam between option parsing and
serving: tests replace it to see what a command would serve without connecting."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, NoReturn

import typer

from jetreduce.cli import context, exit_codes
from jetreduce.cli import workflow_options as opts
from jetreduce.cli.context import fail
from jetreduce.cli.host import SERVICE_NAMES, ServiceHost
from jetreduce.cli.k8s_settings import kubernetes_settings
from jetreduce.cli.local_run import DEFAULT_DATA_DIR, busy_message
from jetreduce.cli.option_group import expand_groups
from jetreduce.cli.options import Nats
from jetreduce.cli.roles import agent_settings
from jetreduce.cli.signals import Signals, block_until_signalled
from jetreduce.launcher.k8s_settings import KubernetesSettings
from jetreduce.runtime import telemetry
from jetreduce.runtime.connection import ConnectFailed

__all__ = ["ServeArgs", "host_services", "server", "service", "services_up", "worker"]

LogDir = Annotated[Path | None, typer.Option("--log-dir", help="Local agents' logs.")]

StreamReplicas = Annotated[
    int,
    typer.Option(
        "--stream-replicas",
        envvar="JETREDUCE_STREAM_REPLICAS",
        min=1,
        help="Replicas of streams and buckets (3 on a production cluster).",
    ),
]
DefaultQueue = Annotated[
    str | None,
    typer.Option(
        "--queue",
        envvar="JETREDUCE_QUEUE",
        help="The installation's item queue for workflows that name none (planner): "
        "jetstream, redis://host:port/db or sqs://QUEUE?region=R&endpoint=URL.",
    ),
]
MaxSlots = Annotated[
    int | None,
    typer.Option(
        "--max-slots",
        envvar="JETREDUCE_MAX_SLOTS",
        min=1,
        help="Map agent slots of all workflows together (launcher). Workflows beyond it wait "
        "and start by --priority (high, normal, low; FIFO within one; a long wait lifts a "
        "workflow a lane). Default: no limit.",
    ),
]
WorkflowNamespaces = Annotated[
    list[str] | None,
    typer.Option(
        "--workflow-namespace",
        envvar="JETREDUCE_K8S_WORKFLOW_NAMESPACES",
        help="Another namespace workflows may ask for with --namespace (kubernetes; repeat "
        "it, or list them space-separated in the variable). The launcher's and janitor's "
        "Role must exist there too.",
    ),
]
AgentEnv = Annotated[
    Path | None,
    typer.Option(
        "--agent-env",
        envvar="JETREDUCE_AGENT_ENV",
        help="A file of JETREDUCE_NATS_* lines (as `jetreduce server --roles` writes "
        "agents.env) giving local agents a NATS identity of their own instead of the "
        "services' (launcher, local backend; on Kubernetes: the agents' "
        "nats.credentialsSecret setting).",
    ),
]
MetricsPort = Annotated[
    int | None,
    typer.Option(
        "--metrics-port",
        envvar="JETREDUCE_METRICS_PORT",
        min=0,
        max=65535,
        help="Serve Prometheus /metrics on this port (all interfaces; 9464 by convention). "
        "Default: off.",
    ),
]


def host_services(
    names: tuple[str, ...],
    nats: str | None,
    log_dir: Path | None,
    backend: str,
    k8s: KubernetesSettings,
    replicas: int = 1,
    *,
    max_slots: int | None = None,
    default_queue: str | None = None,
    metrics_port: int | None = None,
    agent_env: Path | None = None,
) -> int:
    from jetreduce.contract.topology import TopologySettings

    service_name = f"jetreduce-{names[0]}" if len(names) == 1 else "jetreduce-services"
    config = telemetry.configure(service_name, prometheus=metrics_port is not None)
    if metrics_port is None:
        metrics_port = config.prometheus_port  # OTEL_METRICS_EXPORTER=prometheus

    async def go() -> int:
        settings = context.settings(nats)
        try:
            agents = agent_settings(settings, agent_env)
        except OSError as exc:
            typer.echo(f"cannot read --agent-env {agent_env}: {exc.strerror or exc}", err=True)
            return exit_codes.USAGE
        try:
            host = ServiceHost(
                settings,
                names,
                agents=agents,
                log_dir=log_dir,
                backend=backend,
                k8s=k8s,
                topology=TopologySettings(replicas=replicas),
                max_slots=max_slots,
                default_queue=default_queue,
                metrics_port=metrics_port,
            )
        except ValueError as exc:
            typer.echo(str(exc), err=True)
            return exit_codes.USAGE
        # Until the services run, a signal cancels whatever is being waited for (the
        # first connection); from then on it stops the services cleanly.
        with Signals() as signals:
            try:
                async with host.running():
                    signals.handle()
                    stop = asyncio.create_task(signals.event.wait())
                    stop.add_done_callback(lambda _: host.stop.set())
                    typer.echo(
                        f"jetreduce services running: {', '.join(names)} on {settings.url}",
                        err=True,
                    )
                    await host.wait()
            except asyncio.CancelledError as exc:
                if not signals.interrupted_by(exc):
                    raise
                typer.echo(signals.why, err=True)
                return signals.exit_code
            except ConnectFailed as exc:
                typer.echo(str(exc), err=True)
                return exit_codes.UNREACHABLE
        return exit_codes.OK

    return asyncio.run(go())


@dataclass(frozen=True)
class ServeArgs:
    """The options ``service`` and ``services up`` both take (typer fills them: see
    ``cli/option_group.py``)."""

    nats: Nats = None
    log_dir: LogDir = None
    backend: opts.Backend = "local"
    namespace: opts.Namespace = None
    image: opts.Image = None
    stream_replicas: StreamReplicas = 1
    max_slots: MaxSlots = None
    queue: DefaultQueue = None
    metrics_port: MetricsPort = None
    workflow_namespace: WorkflowNamespaces = None
    agent_env: AgentEnv = None


@expand_groups
def service(
    name: Annotated[str, typer.Argument(help="planner, launcher, aggregator or janitor.")],
    how: ServeArgs,
) -> None:
    """Run one service (what a Kubernetes Deployment runs)."""
    if name not in SERVICE_NAMES:
        raise fail(
            f"unknown service {name!r}: choose from {', '.join(SERVICE_NAMES)}", exit_codes.USAGE
        )
    _serve_command((name,), how)


@expand_groups
def services_up(how: ServeArgs) -> None:
    """Run planner, launcher, aggregator and janitor in one process."""
    _serve_command(SERVICE_NAMES, how)


def _serve_command(names: tuple[str, ...], how: ServeArgs) -> NoReturn:
    """What ``service`` and ``services up`` share once their options are parsed."""
    opts.check_queue(how.queue)
    k8s = kubernetes_settings(how.namespace, how.image, how.workflow_namespace or [])
    raise typer.Exit(
        host_services(
            names,
            how.nats,
            how.log_dir,
            how.backend,
            k8s,
            how.stream_replicas,
            max_slots=how.max_slots,
            default_queue=how.queue,
            metrics_port=how.metrics_port,
            agent_env=how.agent_env,
        )
    )


def worker() -> None:
    """Agent entry point, configured by environment variables as a pod is:
    JETREDUCE_NATS_URL, JETREDUCE_WORKFLOW_ID, JETREDUCE_PHASE (setup|map|reduce),
    JETREDUCE_SLOTS, JOB_COMPLETION_INDEX."""
    from jetreduce.cli.agent_main import main as agent_main

    raise typer.Exit(agent_main())


def server(
    data_dir: Annotated[Path, typer.Option("--data-dir")] = Path(DEFAULT_DATA_DIR),
    port: Annotated[int, typer.Option(help="-1 picks a free port.")] = 4222,
    host: Annotated[
        str,
        typer.Option(
            help="Address to listen on. Beyond loopback, credentials are generated and "
            "written to DATA_DIR/nats/client.env (mode 0600); clients need them."
        ),
    ] = "127.0.0.1",
    cluster: Annotated[
        int, typer.Option(help="Run N routed nodes on loopback (ports PORT..PORT+N-1).")
    ] = 0,
    roles: Annotated[
        bool,
        typer.Option(
            "--roles",
            help="A user per role (services, agents, clients) with the permissions of "
            "docs/operations.md; their credentials go to DATA_DIR/nats/ROLE.env (mode 0600). "
            "Start the services with the services' file and --agent-env with the agents'.",
        ),
    ] = False,
) -> None:
    """Run the embedded nats-server in the foreground until Ctrl-C (loopback by default)."""
    from jetreduce.embedded import DataDirBusy, EmbeddedServer

    if cluster:  # client ports PORT and up (free ones for -1), one line of URLs for --nats
        from jetreduce.cluster import LocalCluster

        nodes = LocalCluster(data_dir / "cluster", size=cluster, base_port=port).start()
        try:
            typer.echo(nodes.url)
            block_until_signalled(lambda: all(n.running for n in nodes.nodes))
        finally:
            nodes.stop()
        return

    try:
        srv = EmbeddedServer(
            data_dir / "nats",
            port=port,
            host=host,
            command="jetreduce server",
            roles=context.Global.settings.prefix if roles else None,
        ).start()
    except DataDirBusy as exc:
        raise fail(busy_message(data_dir, exc), exit_codes.FAILED) from None
    typer.echo(srv.url)
    if roles:
        typer.echo(
            f"users per role: credentials in {srv.data_dir}/{{services,agents,clients}}.env "
            f"(services: set -a; . services.env; set +a, and --agent-env agents.env)",
            err=True,
        )
    if srv.credentials_file is not None:
        typer.echo(
            f"listening on {host}: clients need the credentials in {srv.credentials_file} "
            "(for the services and CLI: set -a; . that file; set +a)",
            err=True,
        )
    try:
        block_until_signalled(lambda: srv.proc is not None and srv.proc.poll() is None)
    finally:
        srv.stop()
