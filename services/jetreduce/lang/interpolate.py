"""Variable interpolation (Prodigy's ``${path}`` syntax) and safe rendering into shell scripts.

Syntax, as in Prodigy's ``interpolation.rs``: ``${path}``, ``${path:-default}``, ``$NAME`` and
``$1``; paths use dots and ``[n]`` (``${item.tags[0]}``, ``${map.total}``). A reference that
does not resolve and has no default is left verbatim (Prodigy's non-strict mode), so inside
``sh -c`` the shell may still expand its own variables.

Values render as Prodigy's ``value_to_string``: strings raw, numbers and booleans as JSON text,
null as ``""``, an array of strings joined with ``", "``, other arrays and objects as compact
JSON. ``${item}`` renders a non-string item as compact JSON (whatever its shape).

Two renderers:

* :func:`render_text` pastes values into the text. For text that is never parsed by a shell:
  ``write_file`` content and paths, the ``claude`` argument (passed as one argv element).
* :func:`render_shell` never pastes a value into the script. Each resolved reference becomes a
  parameter expansion of a fresh environment variable (``JR_V0``, ``JR_V1`` …) carried in
  :attr:`ShellCommand.env`, quoted for the shell context where it stands. The shell does not
  re-parse the result of a parameter expansion, so item data such as ``$(touch x)``,
  backticks, ``; rm -rf /``, quotes or newlines is passed on as inert text. See
  :func:`render_shell` for the exact rewriting and its limits.

Errors: :class:`InterpolationError` (a ``ValueError``).

This module is the public face of both halves, which live apart because they are separate
concerns of different size: :mod:`._variables` (what a reference names and how its value
reads as text; :func:`render_text`) and :mod:`._shell` (the quoting-context lexer behind
:func:`render_shell`). Import from here, as the worker and the rest of the language do.
"""

from jetreduce.lang._shell import (
    ENV_PREFIX,
    SPILL_THRESHOLD_BYTES,
    InterpolationError,
    ShellCommand,
    render_shell,
)
from jetreduce.lang._variables import Variables, item_scopes, render_text, render_value

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
