"""Where a workflow's items come from: ``map.input`` names a file, or else is a command.

One resolver for every place that needs to know: the setup agent (which reads the file or
runs the command), the submit-time upload (which sends the file to pods that do not share the
submitter's disk) and ``jetreduce run --dry-run`` (which counts the items). Each renders
``map.input`` with the same variables, those of `worker.secrets.resolve_environment`
(``env_files``, ``env``, the profile, ``--args``; secrets only where they can be read, in the
agent), so a dry run counts what the run will see.

Pure apart from asking whether a path is a file; running the command is the caller's job.
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any, Final

from jetreduce.lang.interpolate import ShellCommand, Variables, render_shell, render_text

__all__ = ["INPUT_COMMAND_TIMEOUT_S", "input_command", "input_file"]

INPUT_COMMAND_TIMEOUT_S: Final = 300.0
"""Longest an input command may run (setup agent and dry run alike)."""


def input_file(source: str, variables: Mapping[str, Any], workdir: str | Path) -> Path | None:
    """The file ``source`` names, rendered with ``variables`` and taken relative to
    ``workdir``, if it is a file here and now; None when it is not (a command, or a file that
    setup will write)."""
    try:
        path = Path(workdir, render_text(source, Variables(dict(variables))))
        return path if path.is_file() else None
    except (ValueError, OSError):  # not a path at all (a long command line, a NUL…)
        return None


def input_command(
    source: str, variables: Mapping[str, Any], *, spill_dir: Path | None = None
) -> ShellCommand:
    """``source`` as a shell command: values are passed in environment variables
    (`render_shell`), never pasted into the script."""
    return render_shell(source, Variables(dict(variables)), spill_dir=spill_dir)
