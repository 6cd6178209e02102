"""jetreduce: a MapReduce orchestrator on NATS JetStream.

Layers, lowest first (held by ``tests/unit/test_layers.py``):
``contract`` (wire types, subjects, topology, the workflow model) < ``runtime`` and ``queues``
(connections, service loop, item-queue adapters) < the five services (``planner``, ``launcher``,
``worker``, ``aggregator``, ``janitor``; never importing one another) < ``cli``.
"""

import sys

__version__ = "0.1.0"


def _nats_without_websockets() -> None:
    """Load nats-py's transports without aiohttp, which it imports only for its WebSocket
    transport (``ws://``): jetreduce connects over TCP and TLS alone, and aiohttp (installed
    as a dependency of ``kubernetes``) costs ~0.2-0.4 s of every process start, agents and
    every CLI command included. aiohttp stays importable for whoever needs it afterwards;
    ``runtime/connection.py`` refuses ``ws://`` URLs with a clear error."""
    if "nats.aio.transport" in sys.modules or "aiohttp" in sys.modules:
        return
    sys.modules["aiohttp"] = None  # type: ignore[assignment]  # makes `import aiohttp` fail
    try:
        import nats.aio.transport  # noqa: F401
    finally:
        if sys.modules.get("aiohttp", 0) is None:
            del sys.modules["aiohttp"]


_nats_without_websockets()
