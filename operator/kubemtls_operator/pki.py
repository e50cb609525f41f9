"""The PKI core: load or bootstrap a CA, check a CSR, issue leaves, build CRLs and bundles.

Pure functions over ``cryptography``. No Kubernetes, no network, no clock: every function
that needs the time takes ``now``. Errors are subclasses of :class:`PKIError` whose
message says what is wrong and what to do; callers decide whether that is retryable.

Certificate facts shared with the sidecar (SPIFFE IDs, fingerprints, ``x5t#S256``) live
in ``kubemtls_sidecar.certs``.
"""

from __future__ import annotations

import dataclasses
import datetime
import ipaddress
import random
import secrets
from collections.abc import Iterable, Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubemtls_sidecar import certs, errors

__all__ = [
    "CA",
    "REVOCATION_REASONS",
    "CAExpired",
    "CAInvalid",
    "CAKeyEncrypted",
    "CAKeyMismatch",
    "CSRInvalid",
    "CSRWeakKey",
    "LeafIdentity",
    "NotACA",
    "PKIError",
    "RevokedEntry",
    "bootstrap_ca",
    "build_crl",
    "cert_pem",
    "chain_pem",
    "crl_pem",
    "generate_key",
    "issue_intermediate_ca",
    "issue_leaf",
    "issue_serving_cert",
    "key_pem",
    "load_ca",
    "load_csr",
    "renewal_time",
    "trust_bundle",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

#: How far notBefore is set back, so a peer whose clock is a little behind accepts the leaf.
CLOCK_SKEW = datetime.timedelta(minutes=5)
BOOTSTRAP_CA_LIFETIME = datetime.timedelta(days=3650)
MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}

#: RFC 5280 §5.3.1 reason codes, by the camelCase names users type.
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


# --- errors -----------------------------------------------------------------------------
class PKIError(errors.KubemtlsError):
    """A PKI input that cannot be used; the message says why and what to do."""


class CAInvalid(PKIError):
    """The CA certificate or key cannot be read at all."""


class CAKeyEncrypted(CAInvalid):
    """The CA key is password-protected; kubemtls needs it unencrypted in the Secret."""


class CAKeyMismatch(CAInvalid):
    """The CA key is not the key of the CA certificate."""


class NotACA(CAInvalid):
    """The certificate lacks basicConstraints CA:TRUE or the keyCertSign usage."""


class CAExpired(CAInvalid):
    """The CA certificate is outside its validity period."""


class CSRInvalid(PKIError):
    """A CSR that is not PEM, not a CSR, or whose signature does not verify."""


class CSRWeakKey(CSRInvalid):
    """A CSR whose key type or size kubemtls does not sign."""


# --- values -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CA:
    """A signing CA: its certificate, key, and the chain above it (issuer first)."""

    cert: x509.Certificate
    key: PrivateKey
    chain: tuple[x509.Certificate, ...] = ()

    @property
    def is_root(self) -> bool:
        return _self_signed(self.cert)

    @property
    def anchor(self) -> x509.Certificate:
        """The certificate peers trust: the top of the chain (a root, when it was given)."""
        return self.chain[-1] if self.chain else self.cert

    @property
    def intermediates(self) -> tuple[x509.Certificate, ...]:
        """What a leaf's chain carries after the leaf: every CA below the anchor."""
        path = (self.cert, *self.chain)
        return tuple(c for c in path if c is not self.anchor)

    @property
    def facts(self) -> certs.CertFacts:
        return certs.facts(self.cert)

    def __repr__(self) -> str:  # never print key material
        subject = self.cert.subject.rfc4514_string()
        return f"CA(subject={subject!r}, serial={self.cert.serial_number:x})"


@dataclasses.dataclass(frozen=True)
class LeafIdentity:
    """Who a leaf certificate names. The signer builds it from the pod, never from a CSR."""

    spiffe_id: str
    common_name: str
    organizational_unit: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@dataclasses.dataclass(frozen=True)
class RevokedEntry:
    """One revoked serial as the CRL lists it."""

    serial: int
    reason: str  # a key of REVOCATION_REASONS
    revoked_at: datetime.datetime


# --- keys and PEM -----------------------------------------------------------------------
def generate_key(key_type: str = "ecdsa-p256") -> PrivateKey:
    """A new private key: ``ecdsa-p256``, ``ecdsa-p384``, ``rsa-2048`` or ``rsa-3072``.

    Raises:
        ValueError: an unknown key type.
    """
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ecdsa-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise ValueError(f"unknown key type {key_type!r}; use ecdsa-p256, rsa-2048 or rsa-3072")


def cert_pem(*cs: x509.Certificate) -> bytes:
    """PEM of one or more certificates, concatenated in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in cs)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM. Only for the CA Secret and tests: never log it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _hash_for(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def _same_public_key(a: PublicKey | object, b: PublicKey | object) -> bool:
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    enc = serialization.Encoding.DER
    try:
        return bool(a.public_bytes(enc, fmt) == b.public_bytes(enc, fmt))  # type: ignore[attr-defined]
    except AttributeError:
        return False


# --- CA ---------------------------------------------------------------------------------
def load_ca(cert_pem_data: bytes, key_pem_data: bytes, *, now: datetime.datetime) -> CA:
    """Load a CA from PEM: the CA certificate first, then (optionally) its chain up to the root.

    Raises:
        CAInvalid: the certificate or key is not PEM, or the key type is not EC/RSA.
        CAKeyEncrypted: the key is password-protected.
        CAKeyMismatch: the key does not belong to the certificate.
        NotACA: the certificate is not a CA (basicConstraints, keyUsage).
        CAExpired: the CA is expired or not yet valid at ``now``.
    """
    try:
        chain = certs.load_pem_certificates(cert_pem_data)
    except ValueError as e:
        raise CAInvalid(f"the CA certificate is not a PEM certificate: {e}") from e
    try:
        key = serialization.load_pem_private_key(key_pem_data, password=None)
    except TypeError as e:
        raise CAKeyEncrypted(
            "the CA key is encrypted; store it unencrypted in the CA Secret "
            "(e.g. `openssl pkey -in ca.key -out tls.key`) and protect the Secret with RBAC"
        ) from e
    except ValueError as e:
        raise CAInvalid(f"the CA key is not a PEM private key: {e}") from e
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise CAInvalid(f"the CA key is a {type(key).__name__}; kubemtls needs an EC or RSA key")
    cert, rest = chain[0], tuple(chain[1:])
    if not _same_public_key(key.public_key(), cert.public_key()):
        raise CAKeyMismatch(
            "the CA key does not match the CA certificate (the first certificate in tls.crt); "
            "check that tls.crt and tls.key come from the same pair"
        )
    _check_is_ca(cert)
    for c in (cert, *rest):
        nb, na = c.not_valid_before_utc, c.not_valid_after_utc
        name = c.subject.rfc4514_string()
        if now < nb:
            raise CAExpired(f"the CA certificate {name} is not valid before {nb.isoformat()}")
        if now >= na:
            raise CAExpired(
                f"the CA certificate {name} expired at {na.isoformat()}; "
                "put a new CA into the Secret (see docs: CA rollover)"
            )
    for child, parent in zip((cert, *rest), rest, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAInvalid(
                f"the chain in the CA Secret is broken: {child.subject.rfc4514_string()} "
                f"was not issued by {parent.subject.rfc4514_string()}"
            ) from e
    return CA(cert=cert, key=key, chain=rest)


def _check_is_ca(cert: x509.Certificate) -> None:
    name = cert.subject.rfc4514_string()
    try:
        bc = cert.extensions.get_extension_for_class(x509.BasicConstraints).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise NotACA(f"{name} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
        if not ku.key_cert_sign or not ku.crl_sign:
            raise NotACA(
                f"{name} may not sign certificates and CRLs (keyUsage keyCertSign, cRLSign)"
            )
    except x509.ExtensionNotFound:
        pass


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: PublicKey,
    *,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
    path_length: int | None,
) -> x509.CertificateBuilder:
    ski = x509.SubjectKeyIdentifier.from_public_key(public_key)
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(now - CLOCK_SKEW)
        .not_valid_after(now + lifetime)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(ski, critical=False)
    )


def bootstrap_ca(
    *,
    now: datetime.datetime,
    common_name: str = "kubemtls bootstrap root CA",
    lifetime: datetime.timedelta = BOOTSTRAP_CA_LIFETIME,
    path_length: int = 1,
) -> CA:
    """A new self-signed ECDSA P-256 root CA (for clusters without a CA of their own).

    Production should bring its own CA (an intermediate of the enterprise PKI); the
    operator logs a warning whenever it bootstraps one.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubemtls"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    builder = _ca_builder(
        name, name, key.public_key(), now=now, lifetime=lifetime, path_length=path_length
    )
    builder = builder.add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
    )
    return CA(cert=builder.sign(key, _hash_for(key)), key=key)


def issue_intermediate_ca(
    parent: CA,
    *,
    now: datetime.datetime,
    common_name: str,
    lifetime: datetime.timedelta,
    path_length: int = 0,
    key_type: str = "ecdsa-p256",
) -> CA:
    """An intermediate CA signed by ``parent`` (as an enterprise PKI would issue one)."""
    key = generate_key(key_type)
    name = x509.Name(
        [
            x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubemtls"),
            x509.NameAttribute(NameOID.COMMON_NAME, common_name),
        ]
    )
    not_after = min(now + lifetime, parent.cert.not_valid_after_utc)
    builder = _ca_builder(
        name,
        parent.cert.subject,
        key.public_key(),
        now=now,
        lifetime=not_after - now,
        path_length=path_length,
    ).add_extension(_aki(parent), critical=False)
    cert = builder.sign(parent.key, _hash_for(parent.key))
    return CA(cert=cert, key=key, chain=(parent.cert, *parent.chain))


def _aki(ca: CA) -> x509.AuthorityKeyIdentifier:
    try:
        ski = ca.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
        return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(ca.key.public_key())


def _serial() -> int:
    # RFC 5280 allows 20 octets; 159 random bits keep it positive with ≥64 bits of entropy
    # (CA/B Forum BR 7.1). secrets, not random: serials must be unpredictable.
    return secrets.randbits(159) | (1 << 64)


# --- CSR --------------------------------------------------------------------------------
def load_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its signature and key.

    Allowed keys: ECDSA P-256 and P-384, RSA 2048 to 8192 bits.

    Raises:
        CSRInvalid: not PEM, not a CSR, or the signature does not verify.
        CSRWeakKey: another key type, curve, or a short RSA key.
    """
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise CSRInvalid("the CSR is not PEM: expected '-----BEGIN CERTIFICATE REQUEST-----'")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CSRInvalid(f"the CSR cannot be parsed: {e}") from e
    _check_public_key(csr.public_key())
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # unsupported signature algorithm
        raise CSRInvalid(f"the CSR's signature cannot be checked: {e}") from e
    if not valid:
        raise CSRInvalid("the CSR's signature does not verify: it was not signed by its own key")
    return csr


def _check_public_key(key: object) -> None:
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise CSRWeakKey(
                f"EC curve {key.curve.name} is not allowed; use P-256 (ecdsa-p256) or P-384"
            )
        return
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRWeakKey(
                f"RSA-{key.key_size} is too weak; use at least RSA-{MIN_RSA_BITS} or ecdsa-p256"
            )
        if key.key_size > MAX_RSA_BITS:
            raise CSRWeakKey(f"RSA-{key.key_size} is larger than the {MAX_RSA_BITS}-bit maximum")
        return
    raise CSRWeakKey(
        f"{type(key).__name__.removeprefix('_')} keys are not allowed; "
        "use ECDSA P-256/P-384 or RSA of at least 2048 bits"
    )


# --- leaves -----------------------------------------------------------------------------
def issue_leaf(
    ca: CA,
    subject_key: x509.CertificateSigningRequest | PublicKey,
    identity: LeafIdentity,
    *,
    now: datetime.datetime,
    lifetime: datetime.timedelta,
    server_auth: bool = True,
    client_auth: bool = True,
) -> x509.Certificate:
    """Sign a leaf for ``identity`` over the CSR's (already validated) public key.

    Whatever subject or SANs the CSR asks for are ignored: the identity is the caller's.
    notAfter is never later than the issuing CA's notAfter.

    Raises:
        CSRWeakKey: the public key is not an allowed type.
        IdentityError: the SPIFFE ID, DNS names or IPs are malformed.
    """
    public_key = (
        subject_key.public_key()
        if isinstance(subject_key, x509.CertificateSigningRequest)
        else subject_key
    )
    _check_public_key(public_key)
    assert isinstance(public_key, ec.EllipticCurvePublicKey | rsa.RSAPublicKey)
    if identity.spiffe_id:
        certs.parse_spiffe_id(identity.spiffe_id)
    sans: list[x509.GeneralName] = []
    if identity.spiffe_id:
        sans.append(x509.UniformResourceIdentifier(identity.spiffe_id))
    for dns in identity.dns_names:
        sans.append(x509.DNSName(_check_dns_name(dns)))
    for ip in identity.ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise errors.IdentityError(f"{ip!r} is not an IP address") from e
    if not sans:
        raise errors.IdentityError("a leaf needs at least one SAN (SPIFFE ID, DNS name or IP)")
    name_attrs = [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubemtls")]
    if identity.organizational_unit:
        name_attrs.append(
            x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, identity.organizational_unit)
        )
    if identity.common_name:
        name_attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, identity.common_name[:64]))
    usages = []
    if server_auth:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    not_after = min(now + lifetime, ca.cert.not_valid_after_utc)
    not_before = max(now - CLOCK_SKEW, ca.cert.not_valid_before_utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name(name_attrs))
        .issuer_name(ca.cert.subject)
        .public_key(public_key)
        .serial_number(_serial())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=is_rsa,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(x509.ExtendedKeyUsage(usages), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(_aki(ca), critical=False)
        # A SPIFFE-only leaf has an empty-ish subject meaning; SANs are critical then
        # (RFC 5280 §4.2.1.6) only when the subject is empty, which ours never is.
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
    )
    return builder.sign(ca.key, _hash_for(ca.key))


def _check_dns_name(name: str) -> str:
    labels = name.split(".")
    ok = (
        0 < len(name) <= 253
        and all(
            0 < len(lb) <= 63 and lb.replace("-", "").isalnum() and lb.isascii() for lb in labels
        )
        and not any(lb.startswith("-") or lb.endswith("-") for lb in labels)
    )
    if not ok:
        raise errors.IdentityError(f"{name!r} is not a valid DNS name")
    return name.lower()


def issue_serving_cert(
    ca: CA,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    now: datetime.datetime,
    lifetime: datetime.timedelta = datetime.timedelta(days=90),
) -> tuple[x509.Certificate, PrivateKey]:
    """A serverAuth certificate and its new key, for the operator's own webhook and signer."""
    key = ec.generate_private_key(ec.SECP256R1())
    first = (list(dns_names) or list(ip_addresses) or ["kubemtls"])[0]
    identity = LeafIdentity(
        spiffe_id="",
        common_name=first,
        organizational_unit="kubemtls-operator",
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
    cert = issue_leaf(ca, key.public_key(), identity, now=now, lifetime=lifetime, client_auth=False)
    return cert, key


def renewal_time(
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    *,
    fraction: float = 2 / 3,
    jitter: float = 0.05,
    rng: random.Random | None = None,
) -> datetime.datetime:
    """When to renew: ``fraction`` of the lifetime, minus up to ``jitter`` of it at random.

    The jitter only moves renewal earlier, so a fleet issued together spreads out and
    nobody renews later than asked (cert-manager renews at 2/3 by default).
    """
    if not 0 < fraction < 1:
        raise ValueError(f"renewal fraction must be between 0 and 1, not {fraction}")
    life = not_after - not_before
    spread = (rng or random).uniform(0, jitter) if jitter > 0 else 0.0
    return not_before + life * max(fraction - spread, 0.05)


# --- CRLs and bundles -------------------------------------------------------------------
def build_crl(
    ca: CA,
    revoked: Iterable[RevokedEntry],
    *,
    now: datetime.datetime,
    number: int,
    next_update: datetime.timedelta = datetime.timedelta(days=7),
) -> x509.CertificateRevocationList:
    """A CRL signed by ``ca`` listing ``revoked`` (RFC 5280 reasons), with a CRL number.

    Raises:
        ValueError: an unknown revocation reason.
    """
    builder = (
        x509.CertificateRevocationListBuilder()
        .issuer_name(ca.cert.subject)
        .last_update(now)
        .next_update(now + next_update)
        .add_extension(x509.CRLNumber(number), critical=False)
        .add_extension(_aki(ca), critical=False)
    )
    for entry in sorted(revoked, key=lambda e: e.serial):
        if entry.reason not in REVOCATION_REASONS:
            raise ValueError(
                f"unknown revocation reason {entry.reason!r}; use one of "
                + ", ".join(REVOCATION_REASONS)
            )
        rc = x509.RevokedCertificateBuilder().serial_number(entry.serial)
        rc = rc.revocation_date(entry.revoked_at)
        if entry.reason != "unspecified":
            rc = rc.add_extension(x509.CRLReason(REVOCATION_REASONS[entry.reason]), critical=False)
        builder = builder.add_revoked_certificate(rc.build())
    return builder.sign(ca.key, _hash_for(ca.key))


def crl_pem(*crls: x509.CertificateRevocationList) -> bytes:
    """PEM of one or more CRLs."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in crls)


def trust_bundle(cas: Iterable[x509.Certificate]) -> bytes:
    """PEM of the given CA certificates, de-duplicated, in the order first seen."""
    seen: set[bytes] = set()
    out: list[x509.Certificate] = []
    for c in cas:
        fp = c.fingerprint(hashes.SHA256())
        if fp not in seen:
            seen.add(fp)
            out.append(c)
    return cert_pem(*out)


def chain_pem(leaf: x509.Certificate, ca: CA) -> bytes:
    """The leaf followed by the intermediates peers need to reach the trust anchor."""
    return cert_pem(leaf, *ca.intermediates)
