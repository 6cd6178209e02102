"""Fixtures for the Kubernetes path: the API emulator (kmock_plus) on a loopback port, in a
thread (``emulator``: its request log can be inspected) or in a process of its own
(``emulator_process``: for runs with many agents, see kmock_plus), and an official-client
``ApiClient`` pointed at each.

kmock registers a pytest plugin that imports ``pytest_asyncio``; the ``test`` extra installs
``pytest-asyncio`` for that reason (its strict mode leaves our ``anyio`` tests alone)."""

from __future__ import annotations

import asyncio
import secrets
from collections.abc import Iterator
from typing import Any

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


async def wait_for(predicate: Any, timeout_s: float = 10.0, every_s: float = 0.05) -> Any:
    """Poll a sync or async predicate until truthy; fail after ``timeout_s``. (The same as
    ``tests/conftest.py``'s, which this directory's ``conftest`` module name shadows.)"""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    while True:
        value = predicate()
        if asyncio.iscoroutine(value):
            value = await value
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"condition not met within {timeout_s}s")
        await asyncio.sleep(every_s)
