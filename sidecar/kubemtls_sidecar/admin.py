"""The admin port (15020): ``/healthz``, ``/readyz``, ``/metrics``.

A small asyncio + h11 responder instead of aiohttp: aiohttp adds ~17 MiB RSS to a process
that runs once per pod (STYLE.md), and three GET routes need no framework. One request
per connection (``Connection: close``), which is what kubelet probes and Prometheus do
well with. Other modes add routes with ``add_route`` (transparent mode forwards rewritten
httpGet probes from here).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable

import h11
import prometheus_client

from kubemtls_sidecar import metrics

__all__ = ["AdminServer", "Response", "Route"]

logger = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str], Awaitable[Response]]  # called with the request target (path?query)

_MAX_REQUEST = 16 * 1024


class AdminServer:
    """Serves the probes and metrics; ``ready`` says why the sidecar is not ready, or None."""

    def __init__(self, m: metrics.Metrics, ready: Callable[[], str | None]) -> None:
        self.metrics = m
        self.ready = ready
        self.routes: dict[str, Route] = {
            "/healthz": self._healthz,
            "/readyz": self._readyz,
            "/metrics": self._metrics,
        }
        self.server: asyncio.Server | None = None

    def add_route(self, path: str, route: Route) -> None:
        self.routes[path] = route

    async def start(self, host: str, port: int) -> asyncio.Server:
        self.server = await asyncio.start_server(self._handle, host, port, reuse_address=True)
        return self.server

    async def close(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()

    async def _healthz(self, target: str) -> Response:
        return 200, "text/plain", b"ok\n"

    async def _readyz(self, target: str) -> Response:
        why = self.ready()
        if why is None:
            return 200, "text/plain", b"ready\n"
        return 503, "text/plain", f"not ready: {why}\n".encode()

    async def _metrics(self, target: str) -> Response:
        return 200, prometheus_client.CONTENT_TYPE_LATEST, self.metrics.exposition()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            async with asyncio.timeout(10):
                request = await self._request(conn, reader)
                if request is None:
                    return
                target = request.target.decode("ascii", "replace")
                path = target.split("?", 1)[0]
                route = self.routes.get(path)
                if request.method not in (b"GET", b"HEAD"):
                    status, ctype, body = 405, "text/plain", b"method not allowed\n"
                elif route is None:
                    status, ctype, body = 404, "text/plain", b"not found\n"
                else:
                    status, ctype, body = await route(target)
                headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                out = conn.send(h11.Response(status_code=status, headers=headers))
                if request.method != b"HEAD":
                    out += conn.send(h11.Data(data=body))
                out += conn.send(h11.EndOfMessage())
                writer.write(out)
                await writer.drain()
        except (TimeoutError, ConnectionError, h11.RemoteProtocolError) as e:
            logger.debug("admin request failed: %r", e)
        finally:
            writer.close()

    async def _request(
        self, conn: h11.Connection, reader: asyncio.StreamReader
    ) -> h11.Request | None:
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                data = await reader.read(_MAX_REQUEST)
                conn.receive_data(data)
                if not data:
                    return None
                continue
            if isinstance(event, h11.Request):
                return event
            return None
