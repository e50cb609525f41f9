"""Inbound: accept mTLS from peers, authorize them, hand the stream to the app.

Per connection: the TLS handshake under ``--handshake-timeout`` with the store's current
server context (so a reload applies to the next handshake and never to a live one), the
checks OpenSSL cannot do (``--allowed-peer`` on the SPIFFE ID; revocation by a stale or
partial CRL set), then the forwarder chosen by ``--protocol``: ``tcp`` pumps bytes
(``forward_tcp``), ``http`` is ``httpmode.forward`` with the same ``Forwarder``
signature. Every refusal is ONE log line with direction, peer address, identity when
known, alert and reason, and a metric.

Python's ``ssl`` has no verify callback, so the ``--allowed-peer`` decision comes after
the handshake: the connection is closed (close_notify) and logged ``access_denied``;
no ``access_denied`` alert reaches the wire (TESTING.md §4b2). Likewise a revocation
found in software (a CRL OpenSSL could not be given) is logged ``certificate_revoked``.
"""

from __future__ import annotations

import asyncio
import dataclasses
import fnmatch
import functools
import logging
import typing

from kubemtls_sidecar import (
    certs,
    config,
    conns,
    logs,
    metrics,
    pipe,
    tlsconn,
    tlsstore,
)
from kubemtls_sidecar import der as derlib  # ``der`` is also Peer's field

__all__ = ["Forwarder", "InboundListener", "Peer", "Refuse", "forward_tcp", "forwarder_for"]

logger = logging.getLogger(__name__)


@dataclasses.dataclass
class Peer:
    """The authenticated peer: its address and leaf certificate (parsed on first use).

    Parsed by ``der`` (OpenSSL verified it): the sidecar never loads ``cryptography``.
    """

    address: tuple[str, int] | None
    der: bytes

    @functools.cached_property
    def cert(self) -> derlib.Cert:
        return derlib.parse(self.der)

    @functools.cached_property
    def facts(self) -> certs.CertFacts:
        return derlib.facts(self.cert)


class Forwarder(typing.Protocol):
    """What runs after an accepted handshake (``--protocol``).

    ``downstream`` is the TLS side, both reader and writer: ``await read(n)`` (b"" at EOF),
    ``write(data)``, ``await drain()``, ``write_eof()``, ``close()``, ``await
    wait_closed()``; ``pipe.fuse(downstream, other)`` pumps it. The forwarder owns the
    connection until it returns; it must close ``downstream`` when done.
    """

    async def __call__(
        self,
        downstream: tlsconn.TlsEndpoint,
        peer: Peer,
        app_host: str,
        app_port: int,
        cfg: config.Config,
        m: metrics.Metrics,
    ) -> None: ...


async def forward_tcp(
    downstream: tlsconn.TlsEndpoint,
    peer: Peer,
    app_host: str,
    app_port: int,
    cfg: config.Config,
    m: metrics.Metrics,
) -> None:
    """``--protocol tcp``: connect to the app and pump bytes both ways."""
    loop = asyncio.get_running_loop()
    try:
        _, upstream = await loop.create_connection(pipe.PlainEndpoint, app_host, app_port)
    except OSError as e:
        m.connections.labels("inbound", "app_unreachable").inc()
        logs.event(
            logger,
            logging.WARNING,
            "app unreachable; closing the peer's connection",
            direction="inbound",
            peer=_addr(peer.address),
            app=f"{app_host}:{app_port}",
            reason=e.strerror or str(e),
        )
        downstream.write_eof()
        downstream.close()
        return
    assert isinstance(upstream, pipe.PlainEndpoint)
    try:
        await conns.pump("inbound", downstream, upstream, cfg.idle_timeout, m)
    finally:
        upstream.release()


def forwarder_for(protocol: str) -> Forwarder:
    """The forwarder of ``--protocol`` (``http`` lives in ``httpmode``)."""
    if protocol == "http":
        from kubemtls_sidecar import httpmode

        forward: Forwarder = httpmode.forward
        return forward
    return forward_tcp


def _addr(a: tuple[str, int] | None) -> str | None:
    return f"{a[0]}:{a[1]}" if a else None


class InboundListener:
    """One inbound TLS port: accept, handshake, authorize, forward."""

    def __init__(
        self,
        cfg: config.Config,
        store: tlsstore.TlsStore,
        m: metrics.Metrics,
        tracker: conns.Tracker,
        *,
        app_host: str,
        app_port: int,
    ) -> None:
        self.cfg, self.store, self.metrics, self.tracker = cfg, store, m, tracker
        self.app_host, self.app_port = app_host, app_port
        self.forward = forwarder_for(cfg.protocol)
        self._handshake_seconds = m.handshake_seconds.labels("inbound")  # bound once
        self._socket_io = cfg.tls_io == "socket"

    def protocol_factory(self) -> pipe.Endpoint:
        snap = self.store.current
        if snap is None or self.tracker.full():
            why = "no certificate yet" if snap is None else "over_limit"
            return Refuse(self.metrics, "inbound", why)
        ep = tlsconn.TlsEndpoint(
            snap.server_ctx,
            server_side=True,
            on_connect=lambda e: self._start(e, snap),
            socket_io=self._socket_io,
        )
        return ep

    def _start(self, ep: pipe.Endpoint, snap: tlsstore.Snapshot) -> None:
        assert isinstance(ep, tlsconn.TlsEndpoint)
        self.tracker.spawn(self._serve(ep, snap))

    async def _serve(self, ep: tlsconn.TlsEndpoint, snap: tlsstore.Snapshot) -> None:
        m, cfg = self.metrics, self.cfg
        loop = asyncio.get_running_loop()
        started = loop.time()
        try:
            try:
                # A timer rather than asyncio.timeout (its context manager costs more than
                # this per connection); it fails the wait with TimeoutError.
                timer = loop.call_later(cfg.handshake_timeout, ep.timed_out)
                try:
                    await ep.handshake
                finally:
                    timer.cancel()
            except TimeoutError:
                m.connections.labels("inbound", "timeout").inc()
                m.handshake_failures.labels("inbound", "none", "handshake_timeout").inc()
                logs.event(
                    logger,
                    logging.WARNING,
                    "TLS handshake refused",
                    direction="inbound",
                    peer=_addr(ep.peername),
                    alert=None,
                    reason=f"handshake not completed within {cfg.handshake_timeout:g}s",
                )
                return
            except tlsconn.HandshakeError as e:
                f = e.failure
                m.connections.labels("inbound", "refused").inc()
                m.handshake_failures.labels("inbound", f.alert or "none", f.code).inc()
                logs.event(
                    logger,
                    logging.WARNING,
                    "TLS handshake refused",
                    direction="inbound",
                    peer=_addr(ep.peername),
                    **e.presented,
                    alert=f.alert,
                    alert_sent_by=f.sent_by,
                    reason=f.reason,
                )
                return
            self._handshake_seconds.observe(loop.time() - started)
            der = ep.peer_certificate_der()
            assert der is not None
            peer = Peer(ep.peername, der)
            if not self._authorized(ep, peer, snap):
                return
            await self.forward(ep, peer, self.app_host, self.app_port, cfg, m)
        finally:
            ep.release()  # cancelled (drain cut) or failed: never cut a pending alert

    def _authorized(self, ep: tlsconn.TlsEndpoint, peer: Peer, snap: tlsstore.Snapshot) -> bool:
        alert = reason = None
        crls = snap.software_crl  # parse the peer's certificate only when needed
        if crls is not None and crls.revoked(peer.cert):
            alert, reason = "certificate_revoked", "the peer's certificate is on its issuer's CRL"
        elif self.cfg.allowed_peers:
            ident = peer.facts.spiffe_id
            if ident is None:
                alert, reason = "access_denied", "the peer's certificate has no SPIFFE ID"
            elif not any(fnmatch.fnmatchcase(ident, g) for g in self.cfg.allowed_peers):
                alert, reason = "access_denied", "identity not matched by --allowed-peer"
        if alert is None:
            return True
        m = self.metrics
        m.connections.labels("inbound", "refused").inc()
        m.handshake_failures.labels("inbound", alert, "post_handshake").inc()
        if alert == "access_denied":
            m.authz_denied.labels("inbound").inc()
        logs.event(
            logger,
            logging.WARNING,
            "peer refused after the handshake",
            direction="inbound",
            peer=_addr(peer.address),
            peer_identity=peer.facts.spiffe_id,
            serial=peer.facts.serial,
            alert=alert,
            alert_sent_by="none (closed: Python's ssl cannot send it after the handshake)",
            reason=reason,
        )
        ep.write_eof()
        ep.close()
        return False


class Refuse(pipe.Endpoint):
    """Accept and close at once (connection cap reached, or nothing to serve yet)."""

    def __init__(self, m: metrics.Metrics, direction: str, why: str) -> None:
        super().__init__()
        self.metrics, self.direction, self.why = m, direction, why

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        super().connection_made(transport)
        self.metrics.connections.labels(self.direction, "over_limit").inc()
        logs.event(
            logger,
            logging.WARNING,
            "connection refused",
            direction=self.direction,
            peer=_addr(self.peername),
            reason=self.why,
        )
        typing.cast(asyncio.Transport, transport).abort()
