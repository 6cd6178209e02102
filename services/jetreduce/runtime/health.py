"""``GET /healthz`` and ``GET /readyz`` of a service process, for Kubernetes probes.

A check is a function returning None when all is well, else the reason (the body of the
503). ``/healthz`` (liveness, startup) answers from the event loop itself, so a wedged loop
fails it by not answering at all; ``/readyz`` (readiness) is stricter. What each checks is the
host's choice (``cli/host.py``: the services' tasks, the NATS connection).
"""

from __future__ import annotations

from collections.abc import Callable

from jetreduce.runtime.http import Answer, RouteServer

__all__ = ["Check", "health_server"]

Check = Callable[[], str | None]
Detail = Callable[[], list[str]]
"""Lines added to a healthy answer (say, which replica leads: a standby is ready too, or a
rolling update would wait for it forever)."""
TEXT = "text/plain; charset=utf-8"


def _route(check: Check, detail: Detail | None = None) -> Callable[[], Answer]:
    def answer() -> Answer:
        problem = check()
        if problem is None:
            lines = ["ok", *(detail() if detail is not None else [])]
            return "200 OK", TEXT, "".join(f"{line}\n" for line in lines).encode()
        return "503 Service Unavailable", TEXT, (problem + "\n").encode()

    return answer


def health_server(
    live: Check,
    ready: Check,
    *,
    host: str = "0.0.0.0",
    port: int = 0,
    detail: Detail | None = None,
) -> RouteServer:
    """``/healthz`` from ``live``, ``/readyz`` from ``ready`` (with ``detail``'s lines
    after ``ok``); call ``start()`` on it."""
    return RouteServer(
        {"/healthz": _route(live), "/readyz": _route(ready, detail)}, host=host, port=port
    )
