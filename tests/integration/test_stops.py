"""Background stops (launcher/backend.py ``Stops``) end with the term that started them,
including one already past its backend stop and running its ``after`` (an admission): fresh
clone 20 found such a task left running after the launcher had stopped."""

from __future__ import annotations

import asyncio

import pytest

from jetreduce.launcher.backend import Stops
from jetreduce.launcher.local import LocalBackend
from jetreduce.runtime.settings import NatsSettings

pytestmark = pytest.mark.anyio


async def test_cancel_ends_a_stop_that_is_running_its_after() -> None:
    backend = LocalBackend(NatsSettings(), warm=False)  # no agents: its stop returns at once
    in_after = asyncio.Event()
    forever = asyncio.Event()

    async def after(wf: str, phase: str | None) -> None:
        in_after.set()
        await forever.wait()  # an admission that takes long

    stops = Stops(backend, after)
    stops.start("wf", "map", 2)
    await asyncio.wait_for(in_after.wait(), 5)
    assert not stops.stopping("wf", "map") and stops.slots() == 0  # its slots are free
    await asyncio.wait_for(stops.cancel(), 5)
    assert not [t for t in asyncio.all_tasks() if t.get_name().startswith("stop wf/")]
    await backend.stop_all()
