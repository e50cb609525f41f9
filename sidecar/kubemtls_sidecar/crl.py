"""Certificate revocation lists: parse, keep the newest per issuer, judge freshness.

Pure functions over ``cryptography`` (no I/O). DESIGN.md: one CRL per CA in the bundle;
a sidecar applies the newest CRL number per issuer, whichever way it arrived (file or
``/v1/trust``); a missing or stale CRL must never turn into "every peer refused". OpenSSL's
``VERIFY_CRL_CHECK_LEAF`` refuses every peer of an issuer without a CRL and answers a stale
one with ``certificate_expired``, so ``tlsstore`` hands OpenSSL the CRLs only when every
CA that signs leaves has a fresh one, and otherwise checks revocation itself after the
handshake, with the CRLs it has. A CA of the bundle that issued another CA of the bundle
(a root above the operator's intermediate, whose key the operator does not hold) needs no
CRL: ``VERIFY_CRL_CHECK_LEAF`` consults only the CRL of the leaf's issuer. The sidecar
runs ``merge`` in its ``vet`` child (the long-running process never loads
``cryptography``) and keeps the result as ``vetted.CrlState``, whose ``fresh``/``revoked``
mirror the ones here.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import re
from collections.abc import Iterable, Mapping

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import serialization

__all__ = ["CrlSet", "ca_key", "issuer_label", "load_crls", "merge", "revoked"]

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
    """The newest CRL per trusted CA and the CAs without one.

    Keyed by the CA's public key (SHA-256 of its SPKI), not its name: a CA rollover may
    reuse the subject, and each CA's CRL must survive the other's.
    """

    by_issuer: Mapping[bytes, x509.CertificateRevocationList]
    missing: tuple[x509.Name, ...]  # trusted CAs that sign leaves, with no CRL

    def fresh(self, now: datetime.datetime) -> bool:
        """True when every CA that signs leaves has a current CRL: OpenSSL may enforce them."""
        return not self.missing and all(_current(c, now) for c in self.by_issuer.values())

    def fresh_until(self) -> datetime.datetime | None:
        """When the first CRL goes stale (None: no CRL)."""
        ends = [c.next_update_utc for c in self.by_issuer.values() if c.next_update_utc]
        return min(ends) if ends else None

    def pem(self) -> bytes:
        return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in self.by_issuer.values())


def _current(c: x509.CertificateRevocationList, now: datetime.datetime) -> bool:
    nu = c.next_update_utc
    return c.last_update_utc <= now + SKEW and (nu is None or now < nu)


def ca_key(ca: x509.Certificate) -> bytes:
    """The key of a CA in ``CrlSet.by_issuer``."""
    spki = ca.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )
    return hashlib.sha256(spki).digest()


def merge(
    cas: Iterable[x509.Certificate],
    known: Mapping[bytes, x509.CertificateRevocationList],
    new: Iterable[x509.CertificateRevocationList],
) -> CrlSet:
    """Keep, per trusted CA, the CRL with the highest number that the CA really signed.

    CRLs of CAs no longer trusted are dropped; a CRL whose signature does not verify with
    its issuer's key is ignored. Only a CA that signs leaves needs a CRL: a CA that issued
    another CA of the bundle (an enterprise root above the operator's intermediate, whose
    key the operator does not hold) is never ``missing`` (docs/revocation.md).
    """
    by_key = {ca_key(ca): ca for ca in cas}
    above = _issuers_of_cas(by_key)
    best = {k: v for k, v in known.items() if k in by_key}
    for c in new:
        for key, ca in by_key.items():
            if ca.subject != c.issuer or not _signed_by(c, ca):
                continue
            old = best.get(key)
            if old is None or crl_number(c) >= crl_number(old):
                best[key] = c
            break
    missing = tuple(ca.subject for k, ca in by_key.items() if k not in best and k not in above)
    return CrlSet(best, missing)


def _issuers_of_cas(by_key: Mapping[bytes, x509.Certificate]) -> frozenset[bytes]:
    """The keys of the CAs that signed another CA of the bundle (not only themselves)."""
    found: set[bytes] = set()
    for key, ca in by_key.items():
        for other_key, other in by_key.items():
            if other_key == key or other.issuer != ca.subject:
                continue
            try:
                other.verify_directly_issued_by(ca)
            except (ValueError, TypeError, exceptions.InvalidSignature):
                continue
            found.add(key)
            break
    return frozenset(found)


def _signed_by(c: x509.CertificateRevocationList, ca: x509.Certificate) -> bool:
    try:
        return c.is_signature_valid(ca.public_key())  # type: ignore[arg-type]
    except (TypeError, ValueError):
        return False


def revoked(crls: CrlSet, leaf: x509.Certificate) -> bool:
    """True when a CRL of the leaf's issuer lists its serial (stale CRLs still count)."""
    return any(
        c.issuer == leaf.issuer
        and c.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None
        for c in crls.by_issuer.values()
    )
