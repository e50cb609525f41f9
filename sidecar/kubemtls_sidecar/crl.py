"""Certificate revocation lists: parse, keep the newest per issuer, judge freshness.

Pure functions over ``cryptography`` (no I/O). DESIGN.md: one CRL per CA in the bundle;
a sidecar applies the newest CRL number per issuer, whichever way it arrived (file or
``/v1/trust``); a missing or stale CRL must never turn into "every peer refused". OpenSSL's
``VERIFY_CRL_CHECK_LEAF`` refuses every peer of an issuer without a CRL and answers a stale
one with ``certificate_expired``, so ``tlsstore`` hands OpenSSL the CRLs only when every
CA has a fresh one, and otherwise checks revocation itself after the handshake
(``revoked()``), with the CRLs it has.
"""

from __future__ import annotations

import dataclasses
import datetime
import re
from collections.abc import Iterable, Mapping

from cryptography import x509

__all__ = ["CrlSet", "issuer_label", "load_crls", "merge", "revoked"]

_PEM_CRL = re.compile(rb"-----BEGIN X509 CRL-----.+?-----END X509 CRL-----", re.S)
SKEW = datetime.timedelta(minutes=5)


def load_crls(pem: bytes) -> list[x509.CertificateRevocationList]:
    """Every CRL in a PEM file.

    Raises:
        ValueError: a block is not a CRL.
    """
    return [x509.load_pem_x509_crl(block) for block in _PEM_CRL.findall(pem)]


def crl_number(crl: x509.CertificateRevocationList) -> int:
    try:
        ext = crl.extensions.get_extension_for_class(x509.CRLNumber)
        return int(ext.value.crl_number)
    except x509.ExtensionNotFound:
        return -1


def issuer_label(name: x509.Name) -> str:
    """A short, stable label for metrics and logs."""
    return name.rfc4514_string()


@dataclasses.dataclass(frozen=True)
class CrlSet:
    """The newest CRL per trusted CA (keyed by the CA subject's DER) and what is missing."""

    by_issuer: Mapping[bytes, x509.CertificateRevocationList]
    missing: tuple[x509.Name, ...]  # trusted CAs with no CRL

    def fresh(self, now: datetime.datetime) -> bool:
        """True when every CA has a CRL that is current: OpenSSL may enforce them."""
        return not self.missing and all(_current(c, now) for c in self.by_issuer.values())

    def fresh_until(self) -> datetime.datetime | None:
        """When the first CRL goes stale (None: no CRL)."""
        ends = [c.next_update_utc for c in self.by_issuer.values() if c.next_update_utc]
        return min(ends) if ends else None

    def pem(self) -> bytes:
        from cryptography.hazmat.primitives import serialization

        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.by_issuer.values())


def _current(c: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    nu = c.next_update_utc
    return c.last_update_utc <= now + SKEW and (nu is None or now < nu)


def merge(
    cas: Iterable[x509.Certificate],
    known: Mapping[bytes, x509.CertificateRevocationList],
    new: Iterable[x509.CertificateRevocationList],
) -> CrlSet:
    """Keep, per trusted CA, the CRL with the highest number that the CA really signed.

    CRLs of CAs no longer trusted are dropped; a CRL whose signature does not verify with
    its issuer's key is ignored.
    """
    ca_by_subject: dict[bytes, list[x509.Certificate]] = {}
    for ca in cas:
        ca_by_subject.setdefault(ca.subject.public_bytes(), []).append(ca)
    best: dict[bytes, x509.CertificateRevocationList] = {
        k: v for k, v in known.items() if k in ca_by_subject
    }
    for c in new:
        key = c.issuer.public_bytes()
        issuers = ca_by_subject.get(key, [])
        if not any(_signed_by(c, ca) for ca in issuers):
            continue
        old = best.get(key)
        if old is None or crl_number(c) >= crl_number(old):
            best[key] = c
    missing = tuple(v[0].subject for k, v in ca_by_subject.items() if k not in best)
    return CrlSet(best, missing)


def _signed_by(c: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return c.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def revoked(crls: CrlSet, leaf: x509.Certificate) -> bool:
    """True when the leaf's issuer's CRL lists its serial (stale CRLs still count)."""
    c = crls.by_issuer.get(leaf.issuer.public_bytes())
    return (
        c is not None and c.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
    )
