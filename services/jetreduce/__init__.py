"""jetreduce: a MapReduce orchestrator on NATS JetStream.

Layers, lowest first (held by ``tests/unit/test_layers.py``):
``contract`` (wire types, subjects, topology, the workflow model) < ``runtime`` and ``queues``
(connections, service loop, item-queue adapters) < the five services (``planner``, ``launcher``,
``worker``, ``aggregator``, ``janitor``; never importing one another) < ``cli``.
"""

__version__ = "0.1.0"
