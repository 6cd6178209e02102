"""Fixtures for the Kubernetes path: the API emulator (kmock_plus) on a loopback port, in a
thread (``emulator``: its request log can be inspected) or in a process of its own
(``emulator_process``: for runs with many agents, see kmock_plus), and an official-client
``ApiClient`` pointed at each.

kmock registers a pytest plugin that imports ``pytest_asyncio``; the ``test`` extra installs
``pytest-asyncio`` for that reason (its strict mode leaves our ``anyio`` tests alone)."""

from __future__ import annotations

import secrets
from collections.abc import Iterator

import pytest
from kmock_plus import EmulatorProcess, EmulatorThread
from kubernetes import client as k8s


@pytest.fixture
def emulator() -> Iterator[EmulatorThread]:
    with EmulatorThread() as emu:
        yield emu


@pytest.fixture
def emulator_process() -> Iterator[EmulatorProcess]:
    with EmulatorProcess() as emu:
        yield emu


def _api(url: str) -> k8s.ApiClient:
    config = k8s.Configuration(host=url)
    # The process kubelet calls from 32 threads; a smaller pool would open and discard a
    # connection per call beyond it.
    config.connection_pool_maxsize = 64
    return k8s.ApiClient(config)


@pytest.fixture
def api_client(emulator: EmulatorThread) -> Iterator[k8s.ApiClient]:
    api = _api(emulator.url)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def process_api_client(emulator_process: EmulatorProcess) -> Iterator[k8s.ApiClient]:
    api = _api(emulator_process.url)
    try:
        yield api
    finally:
        api.close()


@pytest.fixture
def namespace() -> str:
    return f"jr-{secrets.token_hex(3)}"
