"""Transparent mode's two capture listeners: redirected connections in and out.

The init container's iptables rules (``transparent.redirect_rules``) send inbound TCP for
the app ports to the inbound capture port (15006) and the app's outbound TCP for the
``--outbound`` ports to the outbound capture port (15001). Here the sidecar accepts them
and recovers where each was going (``SO_ORIGINAL_DST``):

- inbound: mutual TLS exactly as an explicit ``--inbound`` port (same handshake checks,
  ``--allowed-peer``, ``--protocol``), then plaintext to ``127.0.0.1:<original port>``,
  only for a port the pod annotated (anything else is refused, so the capture port can
  never be used to reach an unlisted local port).
- kubelet's probes of intercepted ports arrive on the admin port (``appprobes``).
- outbound: the upstream comes from ``--outbound PORT=HOST:UPSTREAM_PORT`` by the
  original port; when several entries share a port, or with ``--protocol http``, the
  request's ``Host`` picks the entry. A connection with no entry is refused and closed:
  nothing is ever passed on in plaintext.
"""

from __future__ import annotations

import asyncio
import logging

import h11

from kubemtls_sidecar import (
    app,
    appprobes,
    config,
    inbound,
    logs,
    metrics,
    outbound,
    pipe,
    tlsconn,
    transparent,
)

__all__ = ["CaptureInbound", "CaptureOutbound", "choose_upstream", "listeners"]

logger = logging.getLogger(__name__)

_MAX_HEAD = 64 * 1024


def _original_port(ep: pipe.Endpoint) -> tuple[str, int] | None:
    sock = ep.transport.get_extra_info("socket") if ep.transport is not None else None
    if sock is None:
        return None
    try:
        return transparent.original_dst(sock)
    except OSError:
        return None


class CaptureInbound(inbound.InboundListener):
    """Inbound capture: TLS as an explicit port, the app port from the original destination."""

    def __init__(self, s: app.Sidecar) -> None:
        super().__init__(s.cfg, s.store, s.metrics, s.tracker, app_host="127.0.0.1", app_port=0)
        self._ports = frozenset(i.app_port for i in s.cfg.inbound)
        self._inner = self.forward
        self.forward = self._to_original_port

    async def _to_original_port(
        self,
        downstream: tlsconn.TlsEndpoint,
        peer: inbound.Peer,
        app_host: str,
        app_port: int,
        cfg: config.Config,
        m: metrics.Metrics,
    ) -> None:
        dst = _original_port(downstream)
        if dst is None or dst[1] not in self._ports:
            m.connections.labels("inbound", "refused").inc()
            logs.event(
                logger,
                logging.WARNING,
                "captured inbound connection refused: not to an intercepted app port",
                direction="inbound",
                peer_identity=peer.facts.spiffe_id,
                original_dst=f"{dst[0]}:{dst[1]}" if dst else "unknown (not redirected)",
                app_ports=",".join(map(str, sorted(self._ports))),
            )
            downstream.write_eof()
            downstream.close()
            return
        await self._inner(downstream, peer, "127.0.0.1", dst[1], cfg, m)


def choose_upstream(
    entries: tuple[config.Outbound, ...], port: int, host: str | None
) -> config.Outbound | None:
    """The ``--outbound`` entry for a captured connection to ``port`` (``host``: from Host).

    With ``host`` given it must name the entry (case-insensitive, port ignored); without
    it, the port must have exactly one entry.
    """
    candidates = [e for e in entries if e.local_port == port]
    if host is None:
        return candidates[0] if len(candidates) == 1 else None
    name = host.lower().rstrip(".")
    return next((e for e in candidates if e.upstream_host.lower().rstrip(".") == name), None)


def _host_of(head: bytes) -> str | None:
    """The Host of the first request in ``head`` (a complete request head), if any."""
    conn = h11.Connection(h11.SERVER, max_incomplete_event_size=_MAX_HEAD)
    conn.receive_data(head)
    try:
        event = conn.next_event()
    except h11.RemoteProtocolError:
        return None
    if not isinstance(event, h11.Request):
        return None
    value = next((v for n, v in event.headers if n == b"host"), None)
    if value is None:
        return None
    text = value.decode("latin-1").strip()
    if text.startswith("["):  # [v6]:port
        return text[1 : text.find("]")] if "]" in text else None
    return text.rsplit(":", 1)[0] if ":" in text else text


class CaptureOutbound:
    """Outbound capture: pick the upstream, then exactly what ``OutboundListener`` does."""

    def __init__(self, s: app.Sidecar) -> None:
        self.s = s
        self.cfg = s.cfg
        self._http = s.cfg.protocol == "http"

    def protocol_factory(self) -> pipe.Endpoint:
        if self.s.tracker.full():
            return inbound.Refuse(self.s.metrics, "outbound", "over_limit")
        return pipe.PlainEndpoint(on_connect=self._start)

    def _start(self, ep: pipe.Endpoint) -> None:
        assert isinstance(ep, pipe.PlainEndpoint)
        self.s.tracker.spawn(self._serve(ep))

    async def _serve(self, app_side: pipe.PlainEndpoint) -> None:
        try:
            await self._route(app_side)
        finally:
            app_side.release()  # a 502 or FIN already on its way still goes out

    async def _route(self, app_side: pipe.PlainEndpoint) -> None:
        dst = _original_port(app_side)
        if dst is None:
            return self._refuse(app_side, None, None, "not a redirected connection")
        port = dst[1]
        head = b""
        host = None
        several = sum(1 for e in self.cfg.outbound if e.local_port == port) > 1
        if self._http or several:
            head = await self._read_head(app_side)
            host = _host_of(head)
            if host is None:
                return self._refuse(app_side, dst, None, "no HTTP Host header to route by")
        entry = choose_upstream(self.cfg.outbound, port, host)
        if entry is None:
            return self._refuse(app_side, dst, host, "no --outbound entry for this destination")
        ob = outbound.OutboundListener(
            self.cfg,
            self.s.store,
            self.s.metrics,
            self.s.tracker,
            upstream_host=entry.upstream_host,
            upstream_port=entry.upstream_port,
        )
        # The bytes read to find Host go back in front: fuse() sends them first.
        app_side.unread(head)
        await ob.serve(app_side)

    async def _read_head(self, app_side: pipe.PlainEndpoint) -> bytes:
        head = bytearray()
        try:
            async with asyncio.timeout(self.cfg.handshake_timeout):
                while b"\r\n\r\n" not in head and len(head) < _MAX_HEAD:
                    data = await app_side.read(_MAX_HEAD - len(head))
                    if not data:
                        break
                    head += data
        except TimeoutError:
            pass
        return bytes(head)

    def _refuse(
        self,
        app_side: pipe.PlainEndpoint,
        dst: tuple[str, int] | None,
        host: str | None,
        reason: str,
    ) -> None:
        self.s.metrics.connections.labels("outbound", "refused").inc()
        logs.event(
            logger,
            logging.WARNING,
            "captured outbound connection refused (never sent in plaintext)",
            direction="outbound",
            original_dst=f"{dst[0]}:{dst[1]}" if dst else None,
            host=host,
            reason=reason,
        )
        if self._http and dst is not None:
            body = f"kubemtls: {reason}; refused, never sent in plaintext\n".encode()
            app_side.write(
                b"HTTP/1.1 502 Bad Gateway\r\nContent-Type: text/plain\r\nConnection: close\r\n"
                b"Content-Length: %d\r\n\r\n%s" % (len(body), body)
            )
        app_side.write_eof()
        app_side.close()


def listeners(s: app.Sidecar) -> list[app.ListenerSpec]:
    """The two capture sockets of ``--mode transparent`` (none in explicit mode).

    Also adds the admin routes of the app probes the webhook rewrote (``appprobes``).

    Raises:
        ConfigError: ``--app-probes`` is not valid.
    """
    if s.cfg.mode != "transparent":
        return []
    cfg = s.cfg
    appprobes.register(s.admin, appprobes.parse(cfg.app_probes))
    specs = []
    if cfg.inbound:
        ib = CaptureInbound(s)
        specs.append(
            app.ListenerSpec(
                f"inbound capture {cfg.inbound_capture_port}",
                cfg.listen_address,
                cfg.inbound_capture_port,
                ib.protocol_factory,
            )
        )
    if cfg.outbound:
        ob = CaptureOutbound(s)
        # REDIRECT in OUTPUT rewrites the destination to 127.0.0.1.
        specs.append(
            app.ListenerSpec(
                f"outbound capture {cfg.outbound_capture_port}",
                "127.0.0.1",
                cfg.outbound_capture_port,
                ob.protocol_factory,
            )
        )
    return specs
