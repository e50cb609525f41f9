"""The operator's Prometheus metrics (served on METRICS_PORT at ``/metrics``).

Names are part of the public interface (the chart ships alert rules on them). Metric
objects are module-level, as prometheus-client intends: one registry per process.
"""

from __future__ import annotations

import contextlib
from typing import TYPE_CHECKING

import prometheus_client as prom

if TYPE_CHECKING:
    from kubemtls_operator import rollover

__all__ = [
    "CA_AVAILABLE",
    "CA_EXPIRY",
    "CA_ROLLOVER_PHASE",
    "CERT_EXPIRY",
    "ISSUED",
    "REFUSED",
    "REVOKED",
    "SIGNING_LATENCY",
    "SIGNING_WORKERS",
    "forget_cert",
    "observe_authority",
    "render",
]

ISSUED = prom.Counter("kubemtls_certificates_issued", "Leaf certificates signed", ["namespace"])
REFUSED = prom.Counter(
    "kubemtls_signing_refusals", "Signing API requests refused, by reason", ["reason"]
)
REVOKED = prom.Counter("kubemtls_certificates_revoked", "Certificates revoked", ["reason"])
SIGNING_LATENCY = prom.Histogram(
    "kubemtls_signing_duration_seconds",
    "Time to answer POST /v1/certificates",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)
SIGNING_WORKERS = prom.Gauge(
    "kubemtls_signing_workers",
    "Signing worker processes running (SIGNING_WORKERS; 0 when signing in process)",
)
CERT_EXPIRY = prom.Gauge(
    "kubemtls_certificate_expiry_timestamp_seconds",
    "notAfter of each pod's current certificate",
    ["namespace", "name"],
)
CERT_NOT_BEFORE = prom.Gauge(
    "kubemtls_certificate_not_before_timestamp_seconds",
    "notBefore of each pod's current certificate (expiry minus this is its lifetime)",
    ["namespace", "name"],
)
CERT_RENEWAL = prom.Gauge(
    "kubemtls_certificate_renewal_timestamp_seconds",
    "When each pod's current certificate is due to renew (status.renewalTime)",
    ["namespace", "name"],
)
PODS_NOT_INJECTED = prom.Gauge(
    "kubemtls_pods_not_injected",
    "Pods that opted in but run without the kubemtls sidecar (the webhook did not inject them)",
)
CA_EXPIRY = prom.Gauge(
    "kubemtls_ca_expiry_timestamp_seconds", "notAfter of each trusted CA", ["role", "subject"]
)
CA_AVAILABLE = prom.Gauge("kubemtls_ca_available", "1 when a usable CA signs, 0 otherwise")
CA_ROLLOVER_PHASE = prom.Gauge(
    "kubemtls_ca_rollover_phase", "CA rollover phase (1 for the current one)", ["phase"]
)
CRL_NUMBER = prom.Gauge("kubemtls_crl_number", "The CRL number last published")

_PHASES = ("Stable", "NextPublished", "Retiring")


def observe_authority(auth: rollover.Authority) -> None:
    """Refresh the CA gauges from ``auth``."""
    from kubemtls_operator import rollover

    CA_AVAILABLE.set(1)
    CA_EXPIRY.clear()
    # The retiring CA from prev.crt, also when its key is gone (auth.previous is None then);
    # it leaves the gauge when it retires (or, expired, is pruned): the clear() above.
    retiring = auth.retiring[0] if auth.retiring else None
    for role, cert in (
        ("signing", auth.signing.cert),
        ("next", auth.next.cert if auth.next else None),
        ("previous", retiring),
    ):
        if cert is not None:
            subject = cert.subject.rfc4514_string()
            CA_EXPIRY.labels(role, subject).set(cert.not_valid_after_utc.timestamp())
    phase = rollover.phase_of(auth)
    for p in _PHASES:
        CA_ROLLOVER_PHASE.labels(p).set(1 if p == phase else 0)
    CRL_NUMBER.set(auth.state.crl_number)


def forget_cert(namespace: str, name: str) -> None:
    for gauge in (CERT_EXPIRY, CERT_NOT_BEFORE, CERT_RENEWAL):
        with contextlib.suppress(KeyError):
            gauge.remove(namespace, name)


def render() -> tuple[bytes, str]:
    """The exposition text and its content type."""
    return prom.generate_latest(prom.REGISTRY), prom.CONTENT_TYPE_LATEST
