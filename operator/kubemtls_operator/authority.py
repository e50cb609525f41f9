"""The issuing CA: load one from PEM and check it, bootstrap a root, issue intermediates.

Pure functions over ``cryptography``; no clock (callers pass ``now``), no Secret or API
access: reading the CA Secret, rollover and retirement belong to ``kubemtls_operator.ca``.
A CA that loads here is fit to sign: its key matches, it is a CA, every certificate up
to the anchor is valid at ``now`` and the chain verifies link by link.

Every public name here is also reachable as ``pki.<name>``; callers should use ``pki``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import secrets

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID
from kubemtls_sidecar import certs

from kubemtls_operator import keys

__all__ = [
    "BOOTSTRAP_CA_LIFETIME",
    "CA",
    "CLOCK_SKEW",
    "ORGANIZATION",
    "CAExpired",
    "CAInvalid",
    "CAKeyEncrypted",
    "CAKeyMismatch",
    "CANotYetValid",
    "NotACA",
    "Signing",
    "bootstrap_ca",
    "issue_intermediate_ca",
    "key_usage",
    "load_ca",
    "serial_number",
]

#: How far notBefore is set back, so a peer whose clock is a little behind accepts the leaf.
CLOCK_SKEW = datetime.timedelta(minutes=5)
BOOTSTRAP_CA_LIFETIME = datetime.timedelta(days=3650)
#: The O= of every certificate kubemtls issues.
ORGANIZATION = x509.NameAttribute(NameOID.ORGANIZATION_NAME, "kubemtls")


# --- errors -----------------------------------------------------------------------------
class CAInvalid(keys.PKIError):
    """The CA certificate or key cannot be read, or the chain does not hold together."""


class CAKeyEncrypted(CAInvalid):
    """The CA key is password-protected; kubemtls needs it unencrypted in the Secret."""


class CAKeyMismatch(CAInvalid):
    """The CA key is not the key of the CA certificate."""


class NotACA(CAInvalid):
    """The certificate lacks basicConstraints CA:TRUE or the keyCertSign usage."""


class CAExpired(CAInvalid):
    """The CA certificate (or one above it) has expired."""


class CANotYetValid(CAInvalid):
    """The CA certificate (or one above it) is not valid yet: a clock or issuing mistake."""


# --- values -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class CA:
    """A signing CA: its certificate, key, and the chain above it (issuer first)."""

    cert: x509.Certificate
    key: keys.PrivateKey
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

    @functools.cached_property
    def signing(self) -> Signing:
        """What every certificate this CA issues repeats from it, computed once.

        Issuing a leaf is the signing API's hot path (``bench/pki_bench.py``).
        """
        return Signing(
            subject=self.cert.subject,
            not_before=self.cert.not_valid_before_utc,
            not_after=self.cert.not_valid_after_utc,
            aki=keys.preencoded(keys.authority_key_identifier(self)),
            digest=keys.signature_hash(self.key),
        )

    def __repr__(self) -> str:  # never print key material
        subject = self.cert.subject.rfc4514_string()
        return f"CA(subject={subject!r}, serial={self.cert.serial_number:x})"


@dataclasses.dataclass(frozen=True)
class Signing:
    """What every certificate a CA issues repeats from it."""

    subject: x509.Name
    not_before: datetime.datetime
    not_after: datetime.datetime
    aki: x509.UnrecognizedExtension  # the AuthorityKeyIdentifier, pre-encoded
    digest: hashes.SHA256 | hashes.SHA384


def _self_signed(cert: x509.Certificate) -> bool:
    if cert.issuer != cert.subject:
        return False
    try:
        cert.verify_directly_issued_by(cert)
    except (ValueError, TypeError, InvalidSignature):
        return False
    return True


def key_usage(*, digital_signature: bool, key_encipherment: bool, ca: bool) -> x509.KeyUsage:
    """A keyUsage extension value with only the named bits set (the rest false)."""
    return x509.KeyUsage(
        digital_signature=digital_signature,
        content_commitment=False,
        key_encipherment=key_encipherment,
        data_encipherment=False,
        key_agreement=False,
        key_cert_sign=ca,
        crl_sign=ca,
        encipher_only=False,
        decipher_only=False,
    )


_CA_KEY_USAGE = key_usage(digital_signature=True, key_encipherment=False, ca=True)


def serial_number() -> int:
    """A fresh certificate serial: positive, below 2**159, with at least 64 random bits.

    RFC 5280 §4.1.2.2 allows 20 octets; CA/B Forum BR 7.1 asks for 64 bits of CSPRNG
    output. Bit 64 is always set so the serial is never short. ``secrets``, not
    ``random``: serials must be unpredictable.
    """
    return secrets.randbits(159) | (1 << 64)


# --- CA ---------------------------------------------------------------------------------
def load_ca(cert_pem_data: bytes, key_pem_data: bytes, *, now: datetime.datetime) -> CA:
    """Load a CA from PEM: the CA certificate first, then (optionally) its chain up to the root.

    Raises:
        CAInvalid: the certificate or key is not PEM, the key type is not EC/RSA, or the
            chain is broken.
        CAKeyEncrypted: the key is password-protected.
        CAKeyMismatch: the key does not belong to the certificate.
        NotACA: the certificate is not a CA (basicConstraints, keyUsage).
        CAExpired: the CA, or a certificate above it, has expired at ``now``.
        CANotYetValid: the CA, or a certificate above it, is not valid until after ``now``.
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
    if not keys.same_public_key(key.public_key(), cert.public_key()):
        raise CAKeyMismatch(
            "the CA key does not match the CA certificate (the first certificate in tls.crt); "
            "check that tls.crt and tls.key come from the same pair"
        )
    _check_is_ca(cert)
    for c in (cert, *rest):
        _check_validity(c, now)
    for child, parent in zip((cert, *rest), rest, strict=False):
        try:
            child.verify_directly_issued_by(parent)
        except (ValueError, TypeError, InvalidSignature) as e:
            raise CAInvalid(
                f"the chain in the CA Secret is broken: {child.subject.rfc4514_string()} "
                f"was not issued by {parent.subject.rfc4514_string()}"
            ) from e
    return CA(cert=cert, key=key, chain=rest)


def _check_validity(cert: x509.Certificate, now: datetime.datetime) -> None:
    nb, na = cert.not_valid_before_utc, cert.not_valid_after_utc
    name = cert.subject.rfc4514_string()
    if now < nb:
        raise CANotYetValid(
            f"the CA certificate {name} is not valid before {nb.isoformat()}; "
            "check the clocks, or wait until then"
        )
    if now >= na:
        raise CAExpired(
            f"the CA certificate {name} expired at {na.isoformat()}; "
            "put a new CA into the Secret (see docs: CA rollover)"
        )


def _check_is_ca(cert: x509.Certificate) -> None:
    name = cert.subject.rfc4514_string()
    try:
        bc: x509.BasicConstraints | None = cert.extensions.get_extension_for_class(
            x509.BasicConstraints
        ).value
    except x509.ExtensionNotFound:
        bc = None
    if bc is None or not bc.ca:
        raise NotACA(f"{name} is not a CA certificate (basicConstraints CA:TRUE is missing)")
    try:
        ku = cert.extensions.get_extension_for_class(x509.KeyUsage).value
    except x509.ExtensionNotFound:
        return  # no keyUsage: any usage (RFC 5280 §4.2.1.3)
    if not ku.key_cert_sign or not ku.crl_sign:
        raise NotACA(f"{name} may not sign certificates and CRLs (keyUsage keyCertSign, cRLSign)")


def _ca_name(common_name: str) -> x509.Name:
    return x509.Name([ORGANIZATION, x509.NameAttribute(NameOID.COMMON_NAME, common_name)])


def _ca_builder(
    subject: x509.Name,
    issuer: x509.Name,
    public_key: keys.PublicKey,
    *,
    not_before: datetime.datetime,
    not_after: datetime.datetime,
    path_length: int | None,
) -> x509.CertificateBuilder:
    return (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(issuer)
        .public_key(public_key)
        .serial_number(serial_number())
        .not_valid_before(not_before)
        .not_valid_after(not_after)
        .add_extension(x509.BasicConstraints(ca=True, path_length=path_length), critical=True)
        .add_extension(_CA_KEY_USAGE, critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
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
    name = _ca_name(common_name)
    builder = _ca_builder(
        name,
        name,
        key.public_key(),
        not_before=now - CLOCK_SKEW,
        not_after=now + lifetime,
        path_length=path_length,
    ).add_extension(
        x509.AuthorityKeyIdentifier.from_issuer_public_key(key.public_key()), critical=False
    )
    return CA(cert=builder.sign(key, keys.signature_hash(key)), key=key)


def issue_intermediate_ca(
    parent: CA,
    *,
    now: datetime.datetime,
    common_name: str,
    lifetime: datetime.timedelta,
    path_length: int = 0,
    key_type: str = "ecdsa-p256",
) -> CA:
    """An intermediate CA signed by ``parent`` (as an enterprise PKI would issue one).

    Its notAfter is clamped to the parent's.
    """
    key = keys.generate_key(key_type)
    signing = parent.signing
    builder = _ca_builder(
        _ca_name(common_name),
        signing.subject,
        key.public_key(),
        not_before=max(now - CLOCK_SKEW, signing.not_before),
        not_after=min(now + lifetime, signing.not_after),
        path_length=path_length,
    ).add_extension(signing.aki, critical=False)
    cert = builder.sign(parent.key, signing.digest)
    return CA(cert=cert, key=key, chain=(parent.cert, *parent.chain))
