"""The sidecar's Prometheus metrics, in a registry of their own.

One ``Metrics`` object per process (tests make one per sidecar, so counters never leak
between them). Names start with ``kubemtls_sidecar_``. The hot path never touches a
metric per chunk: connections count bytes in plain ints (``pipe.Endpoint.bytes_in``/
``bytes_out``), and each open connection is registered as a ``Flow`` whose growth is added
to ``kubemtls_sidecar_bytes_total`` at every scrape and once more when it closes. So a
long-lived connection's bytes show up while it is open, at no cost per chunk: the work is
one subtraction per open connection per scrape.

The metric classes and the registry are prometheus-client's; ``promtext`` loads them
without the package's HTTP/WSGI exposition stack (~4 MiB per pod) and renders the text
format the library's ``generate_latest`` would.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Protocol

from kubemtls_sidecar import promtext

__all__ = ["Counted", "Flow", "Metrics"]

_HANDSHAKE_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 10.0)


class Counted(Protocol):
    """A connection side that counts its plaintext (``pipe.Endpoint``)."""

    bytes_in: int
    bytes_out: int


class Flow:
    """One open connection's byte counts, added to the counter as they grow."""

    __slots__ = ("_in", "_out", "_rx", "_side", "_tx")

    def __init__(self, rx: promtext.Counter, tx: promtext.Counter, side: Counted) -> None:
        self._rx, self._tx, self._side = rx, tx, side
        self._in = self._out = 0

    def flush(self) -> None:
        """Add what moved since the last flush."""
        side = self._side
        if (n := side.bytes_in - self._in) > 0:
            self._rx.inc(n)
            self._in += n
        if (n := side.bytes_out - self._out) > 0:
            self._tx.inc(n)
            self._out += n


class Metrics:
    """Every metric the sidecar exports."""

    def __init__(self) -> None:
        self._flows: set[Flow] = set()
        self._bytes_children: dict[str, tuple[promtext.Counter, promtext.Counter]] = {}
        r = self.registry = promtext.CollectorRegistry(auto_describe=True)
        p = "kubemtls_sidecar_"
        self.connections = promtext.Counter(
            p + "connections",
            "Connections by direction and result "
            "(ok, refused, app_unreachable, upstream_unreachable, over_limit, timeout, error)",
            ["direction", "result"],
            registry=r,
        )
        self.active = promtext.Gauge(
            p + "active_connections", "Open proxied connections", ["direction"], registry=r
        )
        self.bytes = promtext.Counter(
            p + "bytes",
            "Plaintext bytes proxied, by direction and "
            "flow (rx: from the TLS peer, tx: to the TLS peer)",
            ["direction", "flow"],
            registry=r,
        )
        self.handshake_failures = promtext.Counter(
            p + "handshake_failures",
            "Refused or failed TLS handshakes by alert and reason",
            ["direction", "alert", "reason"],
            registry=r,
        )
        self.handshake_seconds = promtext.Histogram(
            p + "handshake_duration_seconds",
            "TLS handshake duration",
            ["direction"],
            buckets=_HANDSHAKE_BUCKETS,
            registry=r,
        )
        self.cert_not_after = promtext.Gauge(
            p + "certificate_not_after_timestamp_seconds",
            "notAfter of the certificate being served (Unix time)",
            registry=r,
        )
        self.cert_serial_info = promtext.Gauge(
            p + "certificate_info",
            "The certificate being served (value 1)",
            ["serial", "spiffe_id"],
            registry=r,
        )
        self.reloads = promtext.Counter(
            p + "reloads", "Material swapped in, by kind (cert, trust)", ["kind"], registry=r
        )
        self.reload_failures = promtext.Counter(
            p + "reload_failures",
            "New material refused (the old one kept serving)",
            ["kind", "reason"],
            registry=r,
        )
        self.crl_age = promtext.Gauge(
            p + "crl_age_seconds",
            "Age of the newest CRL (since thisUpdate) per issuer",
            ["issuer"],
            registry=r,
        )
        self.crl_stale = promtext.Gauge(
            p + "crl_stale",
            "1 when an issuer's CRL is past nextUpdate "
            "or missing (checked in software, never refusing everyone)",
            ["issuer"],
            registry=r,
        )
        self.crl_missing = promtext.Gauge(
            p + "crl_missing",
            "1 when no crl.pem is available: revocation is not enforced",
            registry=r,
        )
        self.authz_denied = promtext.Counter(
            p + "authorization_denied",
            "Peers refused by --allowed-peer after the handshake",
            ["direction"],
            registry=r,
        )
        self.renewal_failures = promtext.Counter(
            p + "renewal_failures",
            "Failed attempts to get a certificate from the signing "
            "API (--signer): the current certificate keeps serving while valid",
            registry=r,
        )

    @contextlib.contextmanager
    def flow(self, direction: str, side: Counted) -> Iterator[Flow]:
        """Count ``side``'s bytes (rx: from its peer, tx: to it) while the block runs."""
        pair = self._bytes_children.get(direction)  # labels() per connection costs µs
        if pair is None:
            pair = self._bytes_children[direction] = (
                self.bytes.labels(direction, "rx"),
                self.bytes.labels(direction, "tx"),
            )
        f = Flow(*pair, side)
        self._flows.add(f)
        try:
            yield f
        finally:
            self._flows.discard(f)
            f.flush()

    def exposition(self) -> bytes:
        """The text format served on /metrics (open connections' bytes included)."""
        for f in self._flows:
            f.flush()
        return promtext.render(self.registry)
