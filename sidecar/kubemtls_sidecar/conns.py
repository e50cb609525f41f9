"""Track connection tasks: the cap, and the drain on shutdown.

3.11's ``Server.close()`` stops accepting but does not touch open connections (STYLE.md
convention 9), so each connection runs in a task registered here; on SIGTERM the app
closes the listeners, waits for these tasks up to ``--drain-timeout``, then cancels the
rest (each task aborts its sockets in ``finally``).
"""

from __future__ import annotations

import asyncio
import logging
import resource
import weakref
from collections.abc import Coroutine
from typing import Any

from kubemtls_sidecar import metrics, pipe, tlsconn

__all__ = ["Tracker", "raise_fd_limit"]

logger = logging.getLogger(__name__)


# Descriptors one proxied connection holds: the TLS socket, its duplicate (sockio: the data
# phase on the socket) and the plaintext side's socket.
_FDS_PER_CONNECTION = 3
_FDS_SPARE = 64  # listeners, the admin server, the event loop, files being reloaded


def raise_fd_limit(max_connections: int) -> int:
    """Raise the soft descriptor limit to the hard one, as Go's runtime does (1.19+).

    Container runtimes commonly give a soft limit of 1,024 under a much higher hard
    one; ``--max-connections`` 4,096 needs ~12,300. Returns the soft limit now in force;
    warns if even that cannot hold ``max_connections``.
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.debug("could not raise RLIMIT_NOFILE: %r", e)
    need = _FDS_PER_CONNECTION * max_connections + _FDS_SPARE
    if soft != resource.RLIM_INFINITY and soft < need:
        logger.warning(
            "--max-connections %d needs about %d file descriptors; the limit is %d: "
            "connections beyond it will fail to open (lower --max-connections or raise "
            "the container's nofile limit)",
            max_connections,
            need,
            soft,
        )
    return soft


class Tracker:
    """The set of live connection tasks, bounded by ``max_connections``."""

    def __init__(self, max_connections: int) -> None:
        self.max_connections = max_connections
        self.tasks: set[asyncio.Task[None]] = set()

    def full(self) -> bool:
        return len(self.tasks) >= self.max_connections

    def spawn(self, coro: Coroutine[Any, Any, None]) -> asyncio.Task[None]:
        task = asyncio.get_running_loop().create_task(coro)
        self.tasks.add(task)
        task.add_done_callback(self.tasks.discard)
        return task

    async def drain(self, limit: float) -> int:
        """Wait for open connections up to ``limit`` s, then cancel; returns how many were cut."""
        if self.tasks:
            _, pending = await asyncio.wait(set(self.tasks), timeout=limit)
        else:
            pending = set()
        for t in pending:
            t.cancel()
        if pending:
            await asyncio.wait(pending, timeout=1)
        return len(pending)


_CHILDREN: weakref.WeakKeyDictionary[metrics.Metrics, dict[str, tuple[Any, Any]]] = (
    weakref.WeakKeyDictionary()
)


def _children(m: metrics.Metrics, direction: str) -> tuple[Any, Any]:
    """The ``ok`` counter and ``active`` gauge of ``direction``, bound once per Metrics
    (``labels()`` locks and validates: a few µs each time, twice per connection)."""
    by_direction = _CHILDREN.setdefault(m, {})
    pair = by_direction.get(direction)
    if pair is None:
        pair = by_direction[direction] = (
            m.connections.labels(direction, "ok"),
            m.active.labels(direction),
        )
    return pair


async def pump(
    direction: str,
    tls_side: tlsconn.TlsEndpoint,
    plain_side: pipe.PlainEndpoint,
    idle_timeout: float,
    m: metrics.Metrics,
) -> None:
    """Fuse an established connection's two sides, counted as ``direction`` in metrics."""
    ok, active = _children(m, direction)
    ok.inc()
    active.inc()
    try:
        with m.flow(direction, tls_side):
            await pipe.fuse(tls_side, plain_side, idle_timeout=idle_timeout)
    finally:
        active.dec()
