"""Key material for the operator's PKI: which keys kubemtls signs for, CSRs, PEM.

The lowest layer of the PKI core (``pki`` and ``crl`` build on it): the key policy
(ECDSA P-256/P-384, RSA 2048 to 8192 bits), reading and checking a CSR, generating keys,
PEM encoding, and the small signing helpers every certificate or CRL builder needs. Pure
functions over ``cryptography``: no clock, no I/O. It never logs a key; ``key_pem`` exists
for the CA Secret and for tests only.

Every name here is also reachable as ``pki.<name>``; callers should use ``pki``.
"""

from __future__ import annotations

from typing import Protocol, TypeAlias

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.hazmat.primitives.asymmetric.types import CertificatePublicKeyTypes
from kubemtls_sidecar import errors

__all__ = [
    "ALLOWED_CURVES",
    "MAX_RSA_BITS",
    "MIN_RSA_BITS",
    "CSRBadSignature",
    "CSRInvalid",
    "CSRWeakKey",
    "Issuer",
    "PKIError",
    "PrivateKey",
    "PublicKey",
    "authority_key_identifier",
    "cert_pem",
    "check_public_key",
    "generate_key",
    "key_pem",
    "load_csr",
    "load_csr_key",
    "preencoded",
    "same_public_key",
    "signature_hash",
]

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
PublicKey: TypeAlias = ec.EllipticCurvePublicKey | rsa.RSAPublicKey

MIN_RSA_BITS = 2048
MAX_RSA_BITS = 8192
#: Curves we sign for, by OpenSSL name. P-521 is left out on purpose: Go's and several
#: EHR vendors' TLS stacks do not offer it by default, so a P-521 leaf fails handshakes.
ALLOWED_CURVES = {"secp256r1": "P-256", "secp384r1": "P-384"}


class PKIError(errors.KubemtlsError):
    """A PKI input that cannot be used; the message says why and what to do."""


class CSRInvalid(PKIError):
    """A CSR that is not PEM or not a CSR."""


class CSRBadSignature(CSRInvalid):
    """A CSR whose signature does not verify with its own public key."""


class CSRWeakKey(CSRInvalid):
    """A CSR whose key type, curve or size kubemtls does not sign."""


class Issuer(Protocol):
    """What signs a certificate or CRL: a CA certificate and its key (``pki.CA`` is one)."""

    @property
    def cert(self) -> x509.Certificate: ...

    @property
    def key(self) -> PrivateKey: ...


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
    raise ValueError(
        f"unknown key type {key_type!r}; use ecdsa-p256, ecdsa-p384, rsa-2048 or rsa-3072"
    )


def cert_pem(*certificates: x509.Certificate) -> bytes:
    """PEM of one or more certificates, concatenated in the order given."""
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certificates)


def key_pem(key: PrivateKey) -> bytes:
    """Unencrypted PKCS#8 PEM. Only for the CA Secret and tests: never log it."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def signature_hash(key: PrivateKey) -> hashes.SHA256 | hashes.SHA384:
    """The digest to sign with: SHA-384 for P-384 and larger curves, SHA-256 otherwise."""
    if isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.key_size >= 384:
        return hashes.SHA384()
    return hashes.SHA256()


def same_public_key(a: CertificatePublicKeyTypes, b: CertificatePublicKeyTypes) -> bool:
    """Whether two public keys are the same key (compared as DER SubjectPublicKeyInfo)."""
    fmt = serialization.PublicFormat.SubjectPublicKeyInfo
    der = serialization.Encoding.DER
    return a.public_bytes(der, fmt) == b.public_bytes(der, fmt)


def authority_key_identifier(issuer: Issuer) -> x509.AuthorityKeyIdentifier:
    """The AKI for what ``issuer`` signs: its SKI when it has one (RFC 5280 §4.2.1.1)."""
    try:
        ski = issuer.cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value
    except x509.ExtensionNotFound:
        return x509.AuthorityKeyIdentifier.from_issuer_public_key(issuer.key.public_key())
    return x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(ski)


def preencoded(value: x509.ExtensionType) -> x509.UnrecognizedExtension:
    """``value`` encoded to DER once, for an extension many certificates repeat.

    A builder copies the bytes of an ``UnrecognizedExtension`` instead of encoding the
    value again for every certificate. The certificate's DER is the same, and so is what
    ``cryptography`` parses back from it (``bench/pki_bench.py`` measures the saving).
    """
    return x509.UnrecognizedExtension(value.oid, value.public_bytes())


def check_public_key(key: object) -> PublicKey:
    """``key``, if kubemtls signs for it.

    Raises:
        CSRWeakKey: another key type (DSA, Ed25519, ...), another curve, or an RSA size
            out of bounds.
    """
    if isinstance(key, ec.EllipticCurvePublicKey):
        if key.curve.name not in ALLOWED_CURVES:
            raise CSRWeakKey(
                f"EC curve {key.curve.name} is not allowed; "
                "use P-256 (key type ecdsa-p256) or P-384"
            )
        return key
    if isinstance(key, rsa.RSAPublicKey):
        if key.key_size < MIN_RSA_BITS:
            raise CSRWeakKey(
                f"RSA-{key.key_size} is too weak; use at least RSA-{MIN_RSA_BITS} or ecdsa-p256"
            )
        if key.key_size > MAX_RSA_BITS:
            raise CSRWeakKey(f"RSA-{key.key_size} is larger than the {MAX_RSA_BITS}-bit maximum")
        return key
    kind = type(key).__name__.removeprefix("_")
    raise CSRWeakKey(
        f"{kind} keys are not allowed; use ECDSA P-256/P-384 or RSA of at least 2048 bits"
    )


def load_csr(pem: bytes | str) -> x509.CertificateSigningRequest:
    """Parse a PEM CSR and check its key and its signature.

    Raises:
        CSRInvalid: not PEM or not a CSR.
        CSRWeakKey: a key kubemtls does not sign for (see :func:`check_public_key`).
        CSRBadSignature: the signature does not verify with the CSR's own key.
    """
    return load_csr_key(pem)[0]


def load_csr_key(pem: bytes | str) -> tuple[x509.CertificateSigningRequest, PublicKey]:
    """:func:`load_csr`, and the CSR's checked public key (the signer's hot path: the key
    object is built once, not again by ``issue_leaf``). Raises as :func:`load_csr`."""
    data = pem.encode() if isinstance(pem, str) else pem
    if b"-----BEGIN CERTIFICATE REQUEST-----" not in data:
        raise CSRInvalid("the CSR is not PEM: expected '-----BEGIN CERTIFICATE REQUEST-----'")
    try:
        csr = x509.load_pem_x509_csr(data)
    except ValueError as e:
        raise CSRInvalid(f"the CSR cannot be parsed: {e}") from e
    # The key first: a key we refuse (DSA, Ed25519) gets the useful message, not a
    # complaint about its signature algorithm.
    try:
        public_key = csr.public_key()
    except (ValueError, UnsupportedAlgorithm) as e:
        raise CSRWeakKey(f"the CSR's key type is not supported: {e}") from e
    checked = check_public_key(public_key)
    try:
        valid = csr.is_signature_valid
    except Exception as e:  # an unsupported signature algorithm
        raise CSRBadSignature(f"the CSR's signature cannot be checked: {e}") from e
    if not valid:
        raise CSRBadSignature(
            "the CSR's signature does not verify: it was not signed by its own key "
            "or was changed after signing"
        )
    return csr, checked
