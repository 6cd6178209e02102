"""Every scenario by name, in the order ``all`` runs them."""

from __future__ import annotations

from collections.abc import Callable

from loadtest.agents1000 import agents1000
from loadtest.common import Run
from loadtest.dispatching import agents, backends, dispatch, memory
from loadtest.durability import cluster, durability
from loadtest.micro import enqueue, latency
from loadtest.report import Result
from loadtest.tiny import cli_run, tiny
from loadtest.utilisation import utilisation
from loadtest.workloads import efficiency, peer, shell

__all__ = ["SCENARIOS"]

SCENARIOS: dict[str, Callable[[Run], Result]] = {
    "enqueue": enqueue,
    "dispatch": dispatch,
    "latency": latency,
    "tiny": tiny,
    "run": cli_run,
    "agents": agents,
    "efficiency": efficiency,
    "utilisation": utilisation,
    "shell": shell,
    "memory": memory,
    "backends": backends,
    "peer": peer,
    "durability": durability,
    "cluster": cluster,
    "agents1000": agents1000,
}
