"""Entry point of an agent process (``jetreduce worker``, or ``python -m
jetreduce.cli.agent_main`` as the local backend starts it: without the CLI's imports, which
cost a third of a second at every agent start): everything comes from environment variables,
as a pod's would."""

from __future__ import annotations

import asyncio

from jetreduce.cli.logs import configure
from jetreduce.runtime import telemetry
from jetreduce.runtime.settings import NatsSettings
from jetreduce.worker.agent import AgentConfig, run_agent


def main() -> int:
    configure()
    settings = NatsSettings.from_env()
    config = AgentConfig.from_env()
    telemetry.configure(f"jetreduce-agent-{config.phase}")
    try:
        return asyncio.run(run_agent(settings, config))
    finally:
        telemetry.shutdown()  # flush the last spans before the process ends


if __name__ == "__main__":
    raise SystemExit(main())
