"""jetreduce load tests: scenarios, same-run ceilings and the report in ``docs/performance.md``.

Run ``python -m loadtest --help``. Every scenario starts its own servers (a fresh embedded
nats-server, plus redis-server / moto_server / a Celery worker where needed) and a separate
*services process* (planner, launcher, aggregator and janitor in one process, exactly as
``jetreduce run`` hosts them), so its figures are not polluted by earlier scenarios and its
memory can be read from ``/proc``. Figures are reported as ratios to ceilings measured in the
same run, because absolute rates drift on a shared 2-core machine.

Modules: ``common`` (options, workflow texts, following a workflow, its stored events),
``dispatching`` (the no-op dispatch shapes), ``micro`` (enqueue, latency), ``workloads``
(efficiency, shell, the Celery peer), ``tiny`` (a tiny workflow's fixed costs, ``jetreduce
run``), ``utilisation`` (slots held vs used), ``agents1000``, ``durability``; ``infra``
(servers, the services process), ``procs`` (``/proc``: CPU, memory, agents), ``ceilings``,
``report`` and ``summary`` (the tables), ``registry`` (scenarios by name).

This package is a measuring tool, not part of the product: it reaches into ``jetreduce``
internals (the queue adapter, the state store) where a scenario needs to bypass a phase.
"""
