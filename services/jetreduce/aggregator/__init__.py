"""The aggregator: counts terminal items, publishes progress, and publishes ``map.complete``
exactly once when every item is terminal; it then turns phase outcomes into the workflow's
terminal event.

Counting is not a side-effect counter (Celery's chord bug, peers.md §0.2): it is recomputed
from the durable results log as a server-side distinct-subject count, so a crash, a duplicate
delivery or a restart cannot make it drift; ``map.complete`` is create-only on its subject.

Modules, one concern each: ``counting`` (how far a map is, and its completion), ``arrivals``
(results arriving wake the count, so the map completes within milliseconds of its last
result), ``finishing`` (the terminal events), ``usage`` (the utilisation in
``workflow.completed``), ``service`` (the service loop that drives them).
"""
