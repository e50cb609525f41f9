"""Wire the sidecar together and run it: source → store → listeners → admin; then drain.

Order matters: everything is validated and the first material loaded before any socket
is bound (a bad file is a one-line exit 2, never a half-started proxy). Listeners come
from ``LISTENERS``, a table of builders each returning the sockets one mode needs, so
transparent mode adds its capture ports with one entry. SIGTERM (or ``POST /quitquitquit``
on the admin port, from a container of the pod: how a Job's app ends a sidecar that is not
native) stops accepting, drains open connections up to ``--drain-timeout``, then exits 0;
SIGHUP re-reads the files.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import signal
import ssl
from collections.abc import Callable
from typing import Any, Protocol

from kubemtls_sidecar import (
    admin,
    config,
    conns,
    errors,
    inbound,
    logs,
    metrics,
    outbound,
    tlsstore,
    watch,
)

__all__ = ["LISTENERS", "ListenerSpec", "Sidecar", "Source", "run"]

logger = logging.getLogger(__name__)


class Source(Protocol):
    """Feeds the store forever (``watch.FileSource``, ``identity.SignerSource``)."""

    async def run(self) -> None: ...


@dataclasses.dataclass(frozen=True)
class ListenerSpec:
    """One socket to bind: what it is (for logs and errors), where, and its protocol."""

    name: str
    host: str
    port: int
    factory: Callable[[], asyncio.BaseProtocol]
    extra: dict[str, Any] = dataclasses.field(default_factory=dict)  # create_server kwargs


class Sidecar:
    """The running parts, shared with listener builders."""

    def __init__(self, cfg: config.Config) -> None:
        self.cfg = cfg
        self.metrics = metrics.Metrics()
        upstream_pem = cfg.upstream_ca.read_bytes() if cfg.upstream_ca else None
        min_version = (
            ssl.TLSVersion.TLSv1_3 if cfg.tls_min_version == "1.3" else ssl.TLSVersion.TLSv1_2
        )
        self.store = tlsstore.TlsStore(
            self.metrics, upstream_ca_pem=upstream_pem, min_version=min_version
        )
        self.tracker = conns.Tracker(cfg.max_connections)
        self.files = watch.FileSource(cfg, self.store, self.metrics, watch_cert=cfg.signer is None)
        self.servers: list[asyncio.Server] = []
        self.admin = admin.AdminServer(self.metrics, self.not_ready)
        self.draining = False
        self.bound = False

    def not_ready(self) -> str | None:
        if self.draining:
            return "draining"
        if not self.bound:
            return "listeners not bound"
        if not self.store.ready():
            return "no valid certificate"
        return None


def explicit_listeners(s: Sidecar) -> list[ListenerSpec]:
    """``--inbound LISTEN:HOST:PORT`` TLS ports and ``--outbound`` plaintext ports."""
    cfg, out = s.cfg, []
    for i in cfg.inbound:
        if i.listen_port is None:
            continue  # transparent mode: served on the capture port
        lst = inbound.InboundListener(
            cfg, s.store, s.metrics, s.tracker, app_host=i.app_host, app_port=i.app_port
        )
        out.append(
            ListenerSpec(
                f"--inbound {i.listen_port}",
                cfg.listen_address,
                i.listen_port,
                lst.protocol_factory,
            )
        )
    if cfg.mode == "explicit":
        for o in cfg.outbound:
            ob = outbound.OutboundListener(
                cfg,
                s.store,
                s.metrics,
                s.tracker,
                upstream_host=o.upstream_host,
                upstream_port=o.upstream_port,
            )
            out.append(
                ListenerSpec(
                    f"--outbound {o.local_port}", "127.0.0.1", o.local_port, ob.protocol_factory
                )
            )
    return out


def transparent_listeners(s: Sidecar) -> list[ListenerSpec]:
    """``--mode transparent``: the inbound and outbound capture ports (``capture``)."""
    if s.cfg.mode != "transparent":
        return []
    from kubemtls_sidecar import capture

    return capture.listeners(s)


#: Builders of the sockets to bind; transparent mode appends its own.
LISTENERS: list[Callable[[Sidecar], list[ListenerSpec]]] = [
    explicit_listeners,
    transparent_listeners,
]


def make_source(s: Sidecar) -> Source:
    """The certificate source: the signing API with --signer, else the files."""
    if s.cfg.signer:
        from kubemtls_sidecar import identity

        source: Source = identity.SignerSource(s.cfg, s.store, s.metrics)
        return source
    return s.files


async def serve(s: Sidecar, stop: asyncio.Event) -> int:
    """Run until ``stop`` is set, then drain. Returns the exit code.

    Raises:
        ConfigError: material invalid at start, or a port cannot be bound.
    """
    cfg, loop = s.cfg, asyncio.get_running_loop()
    await s.files.load()
    source = make_source(s)
    specs = [spec for build in LISTENERS for spec in build(s)]
    for spec in specs:
        try:
            server = await loop.create_server(
                spec.factory, spec.host, spec.port, reuse_address=True, backlog=1024, **spec.extra
            )
        except OSError as e:
            await _close_all(s)
            raise errors.ConfigError(
                f"{spec.name}: cannot listen on {spec.host}:{spec.port}: {e.strerror or e}"
            ) from None
        s.servers.append(server)

    async def quit_route(target: str) -> admin.Response:
        if not stop.is_set():
            logs.event(logger, logging.INFO, "stop requested on /quitquitquit")
            stop.set()
        return 200, "text/plain", b"draining\n"

    s.admin.add_route("/quitquitquit", quit_route, method="POST", loopback_only=True)
    try:
        await s.admin.start(cfg.admin_address, cfg.admin_port)
    except OSError as e:
        await _close_all(s)
        raise errors.ConfigError(
            f"--admin-port: cannot listen on {cfg.admin_address}:"
            f"{cfg.admin_port}: {e.strerror or e}"
        ) from None
    s.bound = True
    logs.event(
        logger,
        logging.INFO,
        "sidecar started",
        listeners=[x.name for x in specs],
        admin=f"{cfg.admin_address}:{cfg.admin_port}",
        protocol=cfg.protocol,
        mode=cfg.mode,
        pod=cfg.pod_name,
        namespace=cfg.pod_namespace,
    )
    tasks = [loop.create_task(source.run(), name="source")]
    if source is not s.files:
        tasks.append(loop.create_task(s.files.run(), name="trust-files"))
    await stop.wait()
    s.draining = True
    for server in s.servers:
        server.close()  # stop accepting; open connections carry on
    open_now = len(s.tracker.tasks)
    logs.event(
        logger,
        logging.INFO,
        "stopping: draining connections",
        open=open_now,
        drain_timeout=cfg.drain_timeout,
    )
    cut = await s.tracker.drain(cfg.drain_timeout)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    await _close_all(s)
    logs.event(logger, logging.INFO, "stopped", drained=open_now - cut, cut=cut)
    return 0


async def _close_all(s: Sidecar) -> None:
    for server in s.servers:
        server.close()
    await s.admin.close()


async def run(cfg: config.Config) -> int:
    """The sidecar's main coroutine: signals in, exit code out."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    conns.raise_fd_limit(cfg.max_connections)
    s = Sidecar(cfg)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    loop.add_signal_handler(signal.SIGHUP, s.files.reload_soon, "SIGHUP")
    try:
        return await serve(s, stop)
    finally:
        for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
            loop.remove_signal_handler(sig)
