"""``python -m loadtest.services_host``: the services in their own process.

Why not ``jetreduce services up``: the load test needs the launcher's process cap
(``LocalBackend.max_processes``, the "few pods" of the agents scenario), the launcher's slot
cap (``--max-slots``: workflows competing for slots, the utilisation scenario) and a subset of
services (planner only, for the enqueue scenario), which the CLI does not expose. Running the
services apart from the harness also means ``/proc/<pid>`` of this process is exactly the
services' memory and py-spy can attach to it alone.

The process writes ``--ready-file`` once the services are running and stops cleanly on
SIGTERM (the launcher then stops every agent it started).
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from jetreduce.cli.host import SERVICE_NAMES, ServiceHost
from jetreduce.contract.topology import TopologySettings
from jetreduce.runtime.settings import NatsSettings


async def _main(args: argparse.Namespace) -> int:
    names = tuple(n for n in args.services.split(",") if n) or SERVICE_NAMES
    host = ServiceHost(
        NatsSettings(url=args.nats),
        names,
        log_dir=Path(args.log_dir) if args.log_dir else None,
        max_processes=args.max_processes,
        max_slots=args.max_slots,
        topology=TopologySettings(replicas=args.stream_replicas),
    )
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, host.stop.set)
    async with host.running():
        Path(args.ready_file).write_text("ready\n")
        await host.wait()
    return 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--nats", required=True)
    parser.add_argument("--ready-file", required=True)
    parser.add_argument("--log-dir", default="")
    parser.add_argument("--max-processes", type=int, default=None)
    parser.add_argument("--max-slots", type=int, default=None)
    parser.add_argument("--stream-replicas", type=int, default=1)
    parser.add_argument("--services", default=",".join(SERVICE_NAMES))
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    raise SystemExit(asyncio.run(_main(args)))


if __name__ == "__main__":
    main()
