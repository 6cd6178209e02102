"""One root for every error jetreduce raises on purpose, split by what a caller can do.

kopf's model (../shared/STYLE.md): a handler's error is either *temporary* (trying again
later may succeed: a server restarting, an election, a lease held by another, contention)
or *permanent* (trying again cannot help: bad input, a refusal, a missing object). Callers
decide on the kind, not on the class: retry loops catch :class:`TemporaryError`, and a
:class:`PermanentError` ends what it was for with its message.

Each concrete error also keeps the builtin base it had (``ValueError`` for bad input,
``RuntimeError``, ``ConnectionError``…), so code that catches those still does.
``tests/unit/test_errors.py`` checks that every exception class of the package descends from
exactly one of the two kinds.
"""

from __future__ import annotations

__all__ = ["JetreduceError", "PermanentError", "TemporaryError"]


class JetreduceError(Exception):
    """Root of the errors jetreduce raises on purpose (not bugs: those stay builtin)."""


class TemporaryError(JetreduceError):
    """Trying again later may succeed."""


class PermanentError(JetreduceError):
    """Trying again cannot help: the cause must change first."""
