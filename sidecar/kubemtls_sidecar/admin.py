"""The admin port (15020): ``/healthz``, ``/readyz``, ``/metrics``, ``POST /quitquitquit``.

A small asyncio + h11 responder instead of aiohttp: aiohttp adds ~17 MiB RSS to a process
that runs once per pod (STYLE.md), and three GET routes need no framework. One request
per connection (``Connection: close``), which is what kubelet probes and Prometheus do
well with. Other modes add routes with ``add_route`` (transparent mode forwards rewritten
httpGet probes from here; ``app`` adds ``POST /quitquitquit``).

A route may be ``loopback_only``: the admin port listens on 0.0.0.0 because kubelet probes
the pod IP, so anything that can reach the pod can reach it. Inside a pod, the pod's own
containers share its network namespace and reach the sidecar on 127.0.0.1 (source
127.0.0.1); kubelet and other pods arrive from outside, with a non-loopback source (the
kernel drops packets from 127.0.0.0/8 that arrive on a real interface). So "the peer
address is a loopback address" means "a container of this pod", which is who may stop it.
"""

from __future__ import annotations

import asyncio
import dataclasses
import ipaddress
import logging
from collections.abc import Awaitable, Callable

import h11

from kubemtls_sidecar import logs, metrics, promtext

__all__ = ["AdminServer", "Response", "Route", "is_loopback"]

logger = logging.getLogger(__name__)

Response = tuple[int, str, bytes]  # status, content type, body
Route = Callable[[str], Awaitable[Response]]  # called with the request target (path?query)

_MAX_REQUEST = 16 * 1024


@dataclasses.dataclass(frozen=True)
class _Entry:
    route: Route
    methods: frozenset[bytes]
    loopback_only: bool


def is_loopback(host: str) -> bool:
    """Whether a peer address is loopback (127.0.0.0/8, ::1, or IPv4-mapped 127.x)."""
    try:
        ip = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return ip.ipv4_mapped.is_loopback
    return ip.is_loopback


class AdminServer:
    """Serves the probes and metrics; ``ready`` says why the sidecar is not ready, or None."""

    def __init__(self, m: metrics.Metrics, ready: Callable[[], str | None]) -> None:
        self.metrics = m
        self.ready = ready
        self.routes: dict[str, _Entry] = {}
        for path, route in (
            ("/healthz", self._healthz),
            ("/readyz", self._readyz),
            ("/metrics", self._metrics),
        ):
            self.add_route(path, route)
        self.server: asyncio.Server | None = None

    def add_route(
        self, path: str, route: Route, *, method: str = "GET", loopback_only: bool = False
    ) -> None:
        """Serve ``path`` (GET also answers HEAD); ``loopback_only``: 403 for other peers."""
        methods = {method.encode("ascii")} | ({b"HEAD"} if method == "GET" else set())
        self.routes[path] = _Entry(route, frozenset(methods), loopback_only)

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
        return 200, promtext.CONTENT_TYPE, self.metrics.exposition()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_REQUEST)
        try:
            async with asyncio.timeout(10):
                request = await self._request(conn, reader)
                if request is None:
                    return
                target = request.target.decode("ascii", "replace")
                peer = writer.get_extra_info("peername")
                status, ctype, body, allow = await self._dispatch(
                    request.method, target, str(peer[0]) if peer else ""
                )
                headers = [
                    ("content-type", ctype),
                    ("content-length", str(len(body))),
                    ("connection", "close"),
                ]
                if allow:
                    headers.append(("allow", allow))
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

    async def _dispatch(
        self, method: bytes, target: str, peer_host: str
    ) -> tuple[int, str, bytes, str]:
        """(status, content type, body, Allow header or "") for one request."""
        entry = self.routes.get(target.split("?", 1)[0])
        if entry is None:
            return 404, "text/plain", b"not found\n", ""
        if method not in entry.methods:
            allow = ", ".join(sorted(m.decode() for m in entry.methods))
            return 405, "text/plain", b"method not allowed\n", allow
        if entry.loopback_only and not is_loopback(peer_host):
            logs.event(
                logger,
                logging.WARNING,
                "admin request refused: accepted from loopback only",
                method=method.decode("ascii", "replace"),
                path=target,
                peer=peer_host,
            )
            return 403, "text/plain", b"forbidden: accepted from loopback only\n", ""
        status, ctype, body = await entry.route(target)
        return status, ctype, body, ""

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
