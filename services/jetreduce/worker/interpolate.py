"""Moved to `jetreduce.lang.interpolate` (the language layer); kept as a re-export for callers
outside this package's own modules (``cli/app.py``'s dry run) until they import it from there."""

from jetreduce.lang.interpolate import (
    ENV_PREFIX,
    SPILL_THRESHOLD_BYTES,
    InterpolationError,
    ShellCommand,
    Variables,
    item_scopes,
    render_shell,
    render_text,
    render_value,
)

__all__ = [
    "ENV_PREFIX",
    "SPILL_THRESHOLD_BYTES",
    "InterpolationError",
    "ShellCommand",
    "Variables",
    "item_scopes",
    "render_shell",
    "render_text",
    "render_value",
]
