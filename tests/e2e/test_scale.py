"""Scale from day one: 100,000 no-op items end to end in embedded mode (marked slow; CI runs
it). The figure worth tracking lives in loadtest/, not here: this only proves it completes
with every item counted once and the reduce phase seeing them all."""

from __future__ import annotations

from pathlib import Path

import pytest

from helpers import services
from jetreduce.contract import events as ev

pytestmark = [pytest.mark.anyio, pytest.mark.slow]


async def test_hundred_thousand_noop_items(
    nats_url: str, prefix: str, tmp_path: Path, workdir: Path
) -> None:
    text = """
name: noop-100k
mode: mapreduce
map:
  input: "seq 1 100000"
  max_parallel: 64
  agent_template: []
reduce:
  - shell: "echo ${map.successful}/${map.total}; wc -l < ${map.results_file}"
"""
    async with services(nats_url, prefix, tmp_path) as h:
        done = await h.run(text, workdir, timeout_s=600)
        assert isinstance(done, ev.WorkflowCompleted), h.agent_logs()
    assert (done.total, done.done, done.dead) == (100_000, 100_000, 0)
    assert done.reduce_output.split() == ["100000/100000", "100000"]
