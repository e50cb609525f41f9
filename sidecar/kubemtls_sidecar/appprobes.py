"""kubelet's probes of intercepted app ports, replayed by the admin server.

In transparent mode an httpGet or tcpSocket probe of an intercepted port would land in
the inbound redirect, where kubelet (plaintext, no certificate) cannot get through. The
webhook rewrites each such probe to ``GET :15020/app-health/<container>/<kind>`` and
hands the originals to the sidecar as ``--app-probes`` (JSON: path → ``{"httpGet":
{"port", "path", "scheme", "httpHeaders"}, "timeoutSeconds"}`` or ``{"tcpSocket":
{"port"}, "timeoutSeconds"}``). Each path becomes an admin route that runs the original
against 127.0.0.1 with kubelet's rules: an HTTP status from 200 to 399 passes (answered
200), any other status is passed on, no answer is 503; HTTPS is not verified (kubelet
does not verify either); a TCP connect that succeeds passes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import ssl

import h11

from kubemtls_sidecar import admin, contract, errors

__all__ = ["AppProbe", "parse", "register"]

_MAX_BODY = 64 * 1024


@dataclasses.dataclass(frozen=True)
class AppProbe:
    """One original probe: ``http`` (GET path) or ``tcp`` on 127.0.0.1:port."""

    kind: str  # "http" | "tcp"
    port: int
    path: str = "/"
    https: bool = False
    headers: tuple[tuple[str, str], ...] = ()
    timeout: float = 1.0


def _port(where: str, value: object) -> int:
    if not isinstance(value, int) or not 0 < value < 65536:
        raise errors.ConfigError(f"--app-probes {where}: port {value!r} is not a port number")
    return value


def parse(text: str | None) -> dict[str, AppProbe]:
    """``--app-probes`` JSON → probes by admin path.

    Raises:
        ConfigError: not JSON of the documented shape.
    """
    if not text:
        return {}
    try:
        doc = json.loads(text)
    except ValueError as e:
        raise errors.ConfigError(f"--app-probes is not JSON: {e}") from None
    if not isinstance(doc, dict):
        raise errors.ConfigError("--app-probes must be a JSON object of path -> probe")
    out: dict[str, AppProbe] = {}
    for path, spec in doc.items():
        if not isinstance(path, str) or not path.startswith(contract.APP_HEALTH_PREFIX):
            raise errors.ConfigError(
                f"--app-probes path {path!r} must start with {contract.APP_HEALTH_PREFIX}"
            )
        if not isinstance(spec, dict):
            raise errors.ConfigError(f"--app-probes {path}: a probe must be a JSON object")
        timeout = float(spec.get("timeoutSeconds") or 1)
        http, tcp = spec.get("httpGet"), spec.get("tcpSocket")
        if isinstance(http, dict):
            headers = tuple(
                (str(h.get("name")), str(h.get("value", "")))
                for h in http.get("httpHeaders") or []
                if isinstance(h, dict) and h.get("name")
            )
            out[path] = AppProbe(
                "http",
                _port(path, http.get("port")),
                str(http.get("path") or "/"),
                str(http.get("scheme") or "HTTP").upper() == "HTTPS",
                headers,
                timeout,
            )
        elif isinstance(tcp, dict):
            out[path] = AppProbe("tcp", _port(path, tcp.get("port")), timeout=timeout)
        else:
            raise errors.ConfigError(f"--app-probes {path}: needs httpGet or tcpSocket")
    return out


def _insecure_context() -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.check_hostname = False
    ctx.verify_mode = ssl.CERT_NONE  # kubelet does not verify probe certificates either
    return ctx


async def _http(probe: AppProbe) -> admin.Response:
    ctx = _insecure_context() if probe.https else None
    reader, writer = await asyncio.open_connection("127.0.0.1", probe.port, ssl=ctx)
    try:
        conn = h11.Connection(h11.CLIENT)
        headers = [
            ("Host", f"127.0.0.1:{probe.port}"),
            ("User-Agent", "kubemtls-probe"),
            ("Accept", "*/*"),
            ("Connection", "close"),
            *probe.headers,
        ]
        writer.write(conn.send(h11.Request(method="GET", target=probe.path, headers=headers)))
        writer.write(conn.send(h11.EndOfMessage()))
        await writer.drain()
        body = bytearray()
        status = 0
        while True:
            event = conn.next_event()
            if event is h11.NEED_DATA:
                conn.receive_data(await reader.read(65536))
            elif isinstance(event, h11.Response):
                status = event.status_code
            elif isinstance(event, h11.Data):
                body += event.data[: max(0, _MAX_BODY - len(body))]
            elif isinstance(event, h11.EndOfMessage | h11.ConnectionClosed):
                break
    finally:
        writer.close()
        with contextlib.suppress(OSError, ssl.SSLError):
            await writer.wait_closed()
    if 200 <= status < 400:
        return 200, "text/plain", b"ok\n"
    return status, "text/plain", bytes(body) or f"app answered {status}\n".encode()


async def _tcp(probe: AppProbe) -> admin.Response:
    _, writer = await asyncio.open_connection("127.0.0.1", probe.port)
    writer.close()
    with contextlib.suppress(OSError):
        await writer.wait_closed()
    return 200, "text/plain", b"ok\n"


def route(probe: AppProbe) -> admin.Route:
    """The admin route that replays ``probe``."""

    async def run(target: str) -> admin.Response:
        try:
            async with asyncio.timeout(probe.timeout):
                return await (_http(probe) if probe.kind == "http" else _tcp(probe))
        except (OSError, TimeoutError, ssl.SSLError, h11.ProtocolError) as e:
            why = str(e) or type(e).__name__
            return 503, "text/plain", f"app probe on port {probe.port} failed: {why}\n".encode()

    return run


def register(server: admin.AdminServer, probes: dict[str, AppProbe]) -> None:
    """Add one admin route per rewritten probe."""
    for path, probe in probes.items():
        server.add_route(path, route(probe))
