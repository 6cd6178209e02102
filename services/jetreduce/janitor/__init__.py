"""The janitor: carries out cancellation and cleans up after finished workflows (queued items,
the per-workflow work consumer, the uploaded input). Every action is idempotent, so a
redelivered event or a restart re-runs it safely."""
