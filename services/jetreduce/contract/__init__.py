"""The contract every service shares: event types, subjects, stream/KV topology, workflow model.

Nothing here does I/O except ``topology.declare`` (idempotent stream/KV declaration).
Services talk only through what this package defines.
"""
