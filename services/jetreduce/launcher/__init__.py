"""The launcher: turns phases into running agents (setup: one, map: a pool of
``min(max_parallel, items)`` slots, reduce: one) on a backend, and stops them when the
workflow ends. The ``local`` backend runs agents as child processes and restarts crashed ones
the way the Job controller restarts pods."""
