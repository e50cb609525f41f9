"""Certificate facts that the sidecar and the operator both need.

Pure functions over ``cryptography``: build and parse SPIFFE IDs, read a certificate's
facts (serial, SANs, validity, issuer, fingerprints), and the RFC 8705 ``x5t#S256``
thumbprint. No I/O, no Kubernetes, no network. The operator's own PKI (CA, signing,
CRLs) lives in ``kubemtls_operator.pki`` and builds on this module.

``cryptography`` is imported inside the functions that take its objects: the resident
sidecar uses ``spiffe_id``, ``CertFacts``, ``first_spiffe_id`` and the two fingerprints of
DER bytes (with ``der``) and must never load it (idle memory, see ``vet``).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import hashlib
import re
from typing import TYPE_CHECKING

from kubemtls_sidecar import errors

if TYPE_CHECKING:
    from cryptography import x509

__all__ = [
    "CertFacts",
    "common_name",
    "facts",
    "fingerprint_sha256",
    "first_spiffe_id",
    "load_pem_certificates",
    "parse_spiffe_id",
    "spiffe_id",
    "x5t_s256",
]

# RFC 1123 label (namespaces) and subdomain (service accounts, trust domains), as
# Kubernetes validates them. Always used with fullmatch: "$" would accept a trailing "\n".
_DNS_LABEL = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?")
_DNS_SUBDOMAIN = re.compile(r"[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*")
_SPIFFE = re.compile(r"spiffe://(?P<td>[^/]+)/ns/(?P<ns>[^/]+)/sa/(?P<sa>[^/]+)")


def _check_label(what: str, value: str, *, max_len: int, pattern: re.Pattern[str]) -> None:
    if not value or len(value) > max_len or not pattern.fullmatch(value):
        raise errors.IdentityError(
            f"{what} {value!r} is not a valid Kubernetes name: use at most {max_len} "
            "lower-case letters, digits and '-' (and '.' for a service account), "
            "starting and ending with a letter or digit"
        )


def spiffe_id(trust_domain: str, namespace: str, service_account: str) -> str:
    """``spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>``.

    Raises:
        IdentityError: a part is not a valid trust domain, namespace or SA name.
    """
    _check_label("trust domain", trust_domain, max_len=255, pattern=_DNS_SUBDOMAIN)
    _check_label("namespace", namespace, max_len=63, pattern=_DNS_LABEL)
    _check_label("service account", service_account, max_len=253, pattern=_DNS_SUBDOMAIN)
    return f"spiffe://{trust_domain}/ns/{namespace}/sa/{service_account}"


def parse_spiffe_id(uri: str) -> tuple[str, str, str]:
    """``(trust_domain, namespace, service_account)`` of a kubemtls SPIFFE ID.

    Raises:
        IdentityError: not of the form ``spiffe://TD/ns/NS/sa/SA``.
    """
    m = _SPIFFE.fullmatch(uri)
    if m is None:
        raise errors.IdentityError(
            f"{uri!r} is not a kubemtls SPIFFE ID; expected spiffe://<trust-domain>/ns/<ns>/sa/<sa>"
        )
    td, ns, sa = m.group("td"), m.group("ns"), m.group("sa")
    try:
        spiffe_id(td, ns, sa)  # validates each part
    except errors.IdentityError as e:
        raise errors.IdentityError(f"{uri!r} is not a valid SPIFFE ID: {e}") from e
    return td, ns, sa


def load_pem_certificates(pem: bytes) -> list[x509.Certificate]:
    """Every certificate in a PEM bundle, in order.

    Raises:
        ValueError: no certificate in the data.
    """
    from cryptography import x509

    try:
        return list(x509.load_pem_x509_certificates(pem))
    except ValueError as e:
        raise ValueError(f"no PEM certificate could be read: {e}") from e


def first_spiffe_id(uris: tuple[str, ...]) -> str | None:
    """The first ``spiffe://`` URI of a certificate's URI SANs, if any."""
    return next((u for u in uris if u.startswith("spiffe://")), None)


def _der(cert: x509.Certificate | bytes) -> bytes:
    if isinstance(cert, bytes):
        return cert
    from cryptography.hazmat.primitives import serialization

    return cert.public_bytes(serialization.Encoding.DER)


def fingerprint_sha256(cert: x509.Certificate | bytes) -> str:
    """Hex SHA-256 of the DER, upper case with colons (as ``openssl x509 -fingerprint``)."""
    return hashlib.sha256(_der(cert)).digest().hex(":").upper()


def x5t_s256(cert: x509.Certificate | bytes) -> str:
    """RFC 8705 §3.1 ``x5t#S256``: base64url (no padding) of the SHA-256 of the DER."""
    digest = hashlib.sha256(_der(cert)).digest()
    return base64.urlsafe_b64encode(digest).rstrip(b"=").decode("ascii")


@dataclasses.dataclass(frozen=True)
class CertFacts:
    """What a person (or a status field) wants to know about a certificate."""

    serial: str  # hex, lower case, no separators
    subject: str  # RFC 4514
    issuer: str  # RFC 4514
    not_before: datetime.datetime
    not_after: datetime.datetime
    uris: tuple[str, ...]
    dns_names: tuple[str, ...]
    ip_addresses: tuple[str, ...]
    is_ca: bool
    client_auth: bool
    server_auth: bool
    fingerprint_sha256: str
    x5t_s256: str

    @property
    def spiffe_id(self) -> str | None:
        """The first ``spiffe://`` URI SAN, if any."""
        return first_spiffe_id(self.uris)

    @property
    def common_name(self) -> str | None:
        return _cn_of(self.subject)


def _cn_of(rfc4514: str) -> str | None:
    from cryptography import x509
    from cryptography.x509.oid import NameOID

    attrs = x509.Name.from_rfc4514_string(rfc4514).get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None


def facts(cert: x509.Certificate) -> CertFacts:
    """Read a certificate's facts."""
    from cryptography import x509
    from cryptography.x509.oid import ExtendedKeyUsageOID

    uris: list[str] = []
    dns: list[str] = []
    ips: list[str] = []
    try:
        san = cert.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
        uris = san.get_values_for_type(x509.UniformResourceIdentifier)
        dns = san.get_values_for_type(x509.DNSName)
        ips = [str(ip) for ip in san.get_values_for_type(x509.IPAddress)]
    except x509.ExtensionNotFound:
        pass
    try:
        is_ca = cert.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    except x509.ExtensionNotFound:
        is_ca = False
    try:
        eku = set(cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value)
        client_auth = ExtendedKeyUsageOID.CLIENT_AUTH in eku
        server_auth = ExtendedKeyUsageOID.SERVER_AUTH in eku
    except x509.ExtensionNotFound:  # no EKU: any usage (RFC 5280 §4.2.1.12)
        client_auth = server_auth = True
    return CertFacts(
        serial=format(cert.serial_number, "x"),
        subject=cert.subject.rfc4514_string(),
        issuer=cert.issuer.rfc4514_string(),
        not_before=cert.not_valid_before_utc,
        not_after=cert.not_valid_after_utc,
        uris=tuple(uris),
        dns_names=tuple(dns),
        ip_addresses=tuple(ips),
        is_ca=is_ca,
        client_auth=client_auth,
        server_auth=server_auth,
        fingerprint_sha256=fingerprint_sha256(cert),
        x5t_s256=x5t_s256(cert),
    )


def common_name(cert: x509.Certificate) -> str | None:
    """The subject's CN, if any."""
    from cryptography.x509.oid import NameOID

    attrs = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
    return str(attrs[0].value) if attrs else None
