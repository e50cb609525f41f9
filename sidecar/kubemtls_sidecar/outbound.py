"""Outbound: plaintext from the app on 127.0.0.1, mutual TLS to the upstream.

Per accepted connection, a new TLS client connection presents our certificate, sends
SNI, and verifies the upstream's chain against ``--upstream-ca`` (default: the mesh
bundle, with the mesh CRL) and its hostname. A refused upstream closes the app's
connection and logs one line with the alert and the reason. Nothing is ever sent in
plaintext past this point: if TLS fails, the app's bytes are dropped.
"""

from __future__ import annotations

import asyncio
import functools
import logging

from kubemtls_sidecar import alerts, config, conns, inbound, logs, metrics, pipe, tlsconn, tlsstore

__all__ = ["OutboundListener", "connect_upstream"]

logger = logging.getLogger(__name__)


@functools.lru_cache(maxsize=256)
def _sni(host: str) -> bytes:
    """The IDNA form of ``host``, encoded once (``ssl`` would run the idna codec on every
    connection; given bytes it only decodes ASCII)."""
    return host.encode("idna")


async def connect_upstream(
    store: tlsstore.TlsStore, cfg: config.Config, host: str, port: int
) -> tlsconn.TlsEndpoint:
    """An established mTLS connection to ``host:port`` (also used by transparent mode).

    Raises:
        tlsconn.HandshakeError: the upstream refused us or we refused it.
        OSError: TCP connect failed.
        TimeoutError: no handshake within ``--handshake-timeout``.
    """
    snap = store.current
    if snap is None:
        raise OSError("no certificate loaded yet")
    ctx = snap.upstream_ctx if cfg.upstream_ca else snap.client_ctx
    loop = asyncio.get_running_loop()
    address = dict(cfg.resolve).get(host, host)
    async with asyncio.timeout(cfg.handshake_timeout):
        _, ep = await loop.create_connection(
            lambda: tlsconn.TlsEndpoint(
                ctx,
                server_side=False,
                server_hostname=_sni(host),
                socket_io=cfg.tls_io == "socket",
            ),
            address,
            port,
        )
        assert isinstance(ep, tlsconn.TlsEndpoint)
        try:
            await ep.handshake
        except BaseException:
            ep.abort() if not ep.closed.done() else None
            raise
    return ep


class OutboundListener:
    """One local plaintext port bound to one upstream."""

    def __init__(
        self,
        cfg: config.Config,
        store: tlsstore.TlsStore,
        m: metrics.Metrics,
        tracker: conns.Tracker,
        *,
        upstream_host: str,
        upstream_port: int,
    ) -> None:
        self.cfg, self.store, self.metrics, self.tracker = cfg, store, m, tracker
        self.host, self.port = upstream_host, upstream_port
        self._handshake_seconds = m.handshake_seconds.labels("outbound")  # bound once

    def protocol_factory(self) -> pipe.Endpoint:
        if self.tracker.full():
            return inbound.Refuse(self.metrics, "outbound", "over_limit")
        return pipe.PlainEndpoint(on_connect=self._start)

    def _start(self, ep: pipe.Endpoint) -> None:
        assert isinstance(ep, pipe.PlainEndpoint)
        self.tracker.spawn(self._serve(ep))

    async def serve(self, app: pipe.PlainEndpoint) -> None:
        """Serve one accepted app connection (transparent mode's capture calls this)."""
        await self._serve(app)

    async def _serve(self, app: pipe.PlainEndpoint) -> None:
        m, loop = self.metrics, asyncio.get_running_loop()
        started = loop.time()
        upstream: tlsconn.TlsEndpoint | None = None
        where = f"{self.host}:{self.port}"
        try:
            try:
                upstream = await connect_upstream(self.store, self.cfg, self.host, self.port)
            except tlsconn.HandshakeError as e:
                m.connections.labels("outbound", "refused").inc()
                _refused(m, where, e.failure, e.presented)
                app.close()  # FIN: the app sees the connection end
                return
            except (OSError, TimeoutError) as e:
                m.connections.labels("outbound", "upstream_unreachable").inc()
                logs.event(
                    logger,
                    logging.WARNING,
                    "upstream unreachable; closing the app's connection",
                    direction="outbound",
                    upstream=where,
                    reason=(
                        e.strerror
                        if isinstance(e, OSError) and e.strerror
                        else str(e) or "handshake timeout"
                    ),
                )
                app.close()  # FIN: the app sees the connection end
                return
            self._handshake_seconds.observe(loop.time() - started)
            await conns.pump("outbound", upstream, app, self.cfg.idle_timeout, m)
            if upstream.failure is not None:  # TLS 1.3: refused after our side finished
                _refused(m, where, upstream.failure, {})
        finally:
            app.release()
            if upstream is not None:
                upstream.release()


def _refused(
    m: metrics.Metrics, where: str, f: alerts.Failure, presented: dict[str, str | None]
) -> None:
    """Count and log one refused upstream handshake, with the alert and who sent it."""
    m.handshake_failures.labels("outbound", f.alert or "none", f.code).inc()
    logs.event(
        logger,
        logging.WARNING,
        "upstream TLS handshake failed; closing the app's connection",
        direction="outbound",
        upstream=where,
        **presented,
        alert=f.alert,
        alert_sent_by=f.sent_by,
        reason=f.reason,
    )
