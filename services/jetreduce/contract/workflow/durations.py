"""Duration text as Prodigy workflows write it, turned into seconds.

Prodigy reads most durations with the Rust ``humantime`` crate (``"30s"``, ``"1h 30m"``,
``"500ms"``), but a few (``error_policy.retry_config`` backoffs) use serde's plain
``{secs, nanos}`` form, and the docs write humantime there anyway. Accepting both, plus a bare
number meaning seconds, means a file written from either the docs or the code parses.

Units follow humantime, which is case sensitive: ``m`` is minutes, ``M`` is months.
"""

from __future__ import annotations

import math
import re

__all__ = ["parse_duration"]

_SECOND = 1.0
_MINUTE = 60.0
_HOUR = 3600.0
_DAY = 86400.0

# humantime 2.x unit names; month and year are its fixed averages (30.44 and 365.25 days).
_UNITS: dict[str, float] = {
    **dict.fromkeys(("nanos", "nsec", "ns"), 1e-9),
    **dict.fromkeys(("usec", "us", "µs"), 1e-6),
    **dict.fromkeys(("millis", "msec", "ms"), 1e-3),
    **dict.fromkeys(("seconds", "second", "secs", "sec", "s"), _SECOND),
    **dict.fromkeys(("minutes", "minute", "mins", "min", "m"), _MINUTE),
    **dict.fromkeys(("hours", "hour", "hrs", "hr", "h"), _HOUR),
    **dict.fromkeys(("days", "day", "d"), _DAY),
    **dict.fromkeys(("weeks", "week", "w"), 7 * _DAY),
    **dict.fromkeys(("months", "month", "M"), 30.44 * _DAY),
    **dict.fromkeys(("years", "year", "y"), 365.25 * _DAY),
}

_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_PART = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-zµ]+)\s*")


def parse_duration(text: str) -> float:
    """Return the number of seconds ``text`` denotes.

    Accepts a bare non-negative number (seconds, as Prodigy's ``u64`` timeouts) or a humantime
    sequence such as ``"1m30s"`` / ``"2 hours 5 min"``. Fractions (``"1.5s"``) are accepted
    although humantime itself rejects them: being stricter than needed would only annoy.

    Raises ValueError with a message naming the bad part, and for a duration too large to be
    a float (``"1" * 400 + "s"`` would otherwise be ``inf``, which no timer accepts).
    """
    stripped = text.strip()
    if not stripped:
        raise ValueError("empty duration")
    if _NUMBER.fullmatch(stripped):
        return _finite(float(stripped), text)
    total = 0.0
    position = 0
    while position < len(stripped):
        match = _PART.match(stripped, position)
        if match is None:
            raise ValueError(
                f"invalid duration {text!r}: expected a number followed by a unit "
                "such as 500ms, 30s, 5m, 2h"
            )
        number, unit = match.groups()
        factor = _UNITS.get(unit)
        if factor is None:
            raise ValueError(
                f"invalid duration {text!r}: unknown unit {unit!r}; "
                "use ns, us, ms, s, m, h, d, w, M or y"
            )
        total += float(number) * factor
        position = match.end()
    return _finite(total, text)


def _finite(seconds: float, text: str) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"invalid duration {text[:60]!r}: too large")
    return seconds
