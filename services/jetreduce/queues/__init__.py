"""Item queues: one protocol (``base.ItemQueue``), one module per backend.

Only this package knows a backend's client library; above it, callers see ``QueueError``.
Results, events and state always stay on JetStream, whichever queue carries the items.
"""
