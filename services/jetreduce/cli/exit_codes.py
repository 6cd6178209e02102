"""Exit codes of every command, in one place (documented in ``jetreduce --help``)."""

OK = 0
FAILED = 1
"""The workflow failed, was cancelled or timed out; or a command could not do its job."""
USAGE = 2
"""Bad arguments or an invalid workflow file."""
DEAD_ITEMS = 3
"""The workflow completed, but some items failed permanently (they are in the DLQ)."""
UNREACHABLE = 4
"""No NATS server could be reached."""
INTERRUPTED = 130
"""SIGINT: a ``run`` interrupted this way leaves its workflow resumable."""
TERMINATED = 143
"""SIGTERM (128 + 15), as Prodigy and shells report it."""
