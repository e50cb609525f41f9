"""Revocation lists and trust bundles: what the operator publishes to every namespace.

Pure functions over ``cryptography``: build a CRL signed by a CA (RFC 5280 §5, with a
CRL number and reason codes), encode CRLs, and assemble a de-duplicated trust bundle.
Which serials are revoked, and when CRLs are re-signed, is the CA lifecycle's business
(``kubemtls_operator.ca``), not this module's. No clock: callers pass ``now``.

Every name here is also reachable as ``pki.<name>``; callers should use ``pki``.
"""

from __future__ import annotations

import dataclasses
import datetime
from collections.abc import Iterable

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from kubemtls_operator import keys

__all__ = [
    "DEFAULT_NEXT_UPDATE",
    "REVOCATION_REASONS",
    "RevokedEntry",
    "build_crl",
    "crl_pem",
    "trust_bundle",
]

#: DESIGN.md: nextUpdate at least 7 days ahead, so a late re-sign never fails every peer.
DEFAULT_NEXT_UPDATE = datetime.timedelta(days=7)

#: RFC 5280 §5.3.1 reason codes, by the camelCase names users type
#: (``kubectl annotate mtlscert NAME kubemtls.io/revoke=keyCompromise``).
REVOCATION_REASONS: dict[str, x509.ReasonFlags] = {
    "unspecified": x509.ReasonFlags.unspecified,
    "keyCompromise": x509.ReasonFlags.key_compromise,
    "cACompromise": x509.ReasonFlags.ca_compromise,
    "affiliationChanged": x509.ReasonFlags.affiliation_changed,
    "superseded": x509.ReasonFlags.superseded,
    "cessationOfOperation": x509.ReasonFlags.cessation_of_operation,
    "certificateHold": x509.ReasonFlags.certificate_hold,
    "privilegeWithdrawn": x509.ReasonFlags.privilege_withdrawn,
    "aACompromise": x509.ReasonFlags.aa_compromise,
}


@dataclasses.dataclass(frozen=True)
class RevokedEntry:
    """One revoked serial as the CRL lists it."""

    serial: int
    reason: str  # a key of REVOCATION_REASONS
    revoked_at: datetime.datetime


def build_crl(
    ca: keys.Issuer,
    revoked: Iterable[RevokedEntry],
    *,
    now: datetime.datetime,
    number: int,
    next_update: datetime.timedelta = DEFAULT_NEXT_UPDATE,
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``revoked`` by serial, with a CRL number.

    ``unspecified`` is written without a reason extension, as RFC 5280 §5.3.1 asks.

    Raises:
        ValueError: an unknown revocation reason, a negative CRL number, or a
            ``next_update`` that is not in the future.
    """
    if number < 0:
        raise ValueError(f"a CRL number is a non-negative integer, not {number}")
    if next_update <= datetime.timedelta(0):
        raise ValueError(f"the CRL's next update must be in the future, not {next_update}")
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(keys.authority_key_identifier(ca), critical=False)
    )
    for entry in sorted(revoked, key=lambda e: e.serial):
        reason = REVOCATION_REASONS.get(entry.reason)
        if reason is None:
            raise ValueError(
                f"unknown revocation reason {entry.reason!r}; use one of "
                + ", ".join(REVOCATION_REASONS)
            )
        rc = x509.RevokedCertificateBuilder().serial_number(entry.serial)
        rc = rc.revocation_date(entry.revoked_at)
        if reason is not x509.ReasonFlags.unspecified:
            rc = rc.add_extension(x509.CRLReason(reason), critical=False)
        builder = builder.add_revoked_certificate(rc.build())
    return builder.sign(ca.key, keys.signature_hash(ca.key))


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    """PEM of one or more CRLs, concatenated in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def trust_bundle(cas: Iterable[x509.Certificate]) -> bytes:
    """PEM of the given CA certificates, de-duplicated, in the order first seen."""
    seen: set[bytes] = set()
    unique: list[x509.Certificate] = []
    for c in cas:
        fp = c.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            unique.append(c)
    return keys.cert_pem(*unique)
