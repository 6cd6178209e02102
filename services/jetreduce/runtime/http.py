"""A bare asyncio HTTP server for a few fixed ``GET`` routes on the service's own event loop
(``/metrics``, ``/healthz``, ``/readyz``): one request per connection, headers ignored, no
web framework for answers this small."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Mapping

__all__ = ["Answer", "RouteServer"]

log = logging.getLogger(__name__)

Answer = tuple[str, str, bytes]
"""(status line such as ``"200 OK"``, content type, body)."""


class RouteServer:
    """``GET <path>`` → ``routes[path]()`` on ``host:port`` (port 0 picks a free one: see
    :attr:`port`); anything else is a 404 naming the routes."""

    def __init__(
        self, routes: Mapping[str, Callable[[], Answer]], *, host: str = "0.0.0.0", port: int = 0
    ) -> None:
        self.routes = dict(routes)
        self.host = host
        self.requested_port = port
        self.port = port
        self._server: asyncio.Server | None = None

    async def start(self) -> RouteServer:
        self._server = await asyncio.start_server(self._serve, self.host, self.requested_port)
        self.port = self._server.sockets[0].getsockname()[1]
        log.info("serving %s on http://%s:%d", ", ".join(self.routes), self.host, self.port)
        return self

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
            with contextlib.suppress(Exception):  # shutting down: a stuck client must not hold it
                await asyncio.wait_for(self._server.wait_closed(), 2)
            self._server = None

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readline(), 5)
            while (await asyncio.wait_for(reader.readline(), 5)) not in (b"\r\n", b"\n", b""):
                pass  # headers: nothing in them matters here
            parts = request.decode("latin-1").split()
            route = self.routes.get(parts[1].split("?")[0]) if len(parts) >= 2 else None
            if route is None or parts[0] != "GET":
                text = f"try {' or '.join(self.routes)}\n"
                status, kind, body = "404 Not Found", "text/plain; charset=utf-8", text.encode()
            else:
                status, kind, body = route()
            writer.write(
                f"HTTP/1.1 {status}\r\nContent-Type: {kind}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n".encode()
                + body
            )
            await writer.drain()
        except Exception as exc:  # a client hanging up must not bother the service
            log.debug("http: request failed: %r", exc)
        finally:
            writer.close()
            with contextlib.suppress(Exception):  # the peer may be gone already
                await writer.wait_closed()
