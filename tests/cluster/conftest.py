"""The cluster tier: one local 3-node JetStream cluster (``jetreduce.cluster``) per test run,
shared like the single ``nats_server``; tests isolate themselves by the ``prefix`` fixture.
A test may kill and restart nodes: ``cluster_url`` heals the cluster (every node running,
one meta leader) before each test, so one test's faults never reach the next."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

import hygiene
from jetreduce.cluster import LocalCluster


@pytest.fixture(scope="session")
def nats_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    cluster = LocalCluster(tmp_path_factory.mktemp("cluster"), size=3)
    cluster.start()
    try:
        yield cluster
    finally:
        cluster.stop()


def heal(cluster: LocalCluster) -> None:
    """Start every node a test left down (a restarted node is the session's, not a leak)."""
    for node in cluster.nodes:
        if not node.running:
            cluster.restart(node.name)
            assert node.proc is not None
            hygiene.keep(node.proc.pid)
    cluster.wait_ready()


@pytest.fixture
def cluster_url(nats_cluster: LocalCluster) -> Iterator[str]:
    """Every node's URL, comma-separated (what ``--nats`` takes), of a whole cluster."""
    heal(nats_cluster)
    yield nats_cluster.url
    heal(nats_cluster)
