"""The sidecar's private key and certificate signing request, in memory only.

The workload key is generated here, at start and again at every renewal, and handed to
the TLS store as an object. This module never serialises a private key, never writes
one to disk and never logs one; the CSR it builds carries only the public key (the
operator sets the certificate's identity from the pod, not from the CSR's subject).
"""

from __future__ import annotations

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import NameOID

from kubemtls_sidecar import contract, errors

__all__ = ["PrivateKey", "build_csr", "describe", "generate_key"]

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

# The CSR's subject is ignored by the operator; a fixed CN keeps CSRs recognisable.
_CSR_COMMON_NAME = "kubemtls-sidecar"


def generate_key(key_type: str) -> PrivateKey:
    """A fresh private key of one of ``contract.KEY_TYPES``.

    Raises:
        ConfigError: an unknown key type.
    """
    if key_type == "ecdsa-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type in ("rsa-2048", "rsa-3072"):
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise errors.ConfigError(
        f"--key-type {key_type!r} is not supported; use one of {', '.join(contract.KEY_TYPES)}"
    )


def build_csr(key: PrivateKey) -> bytes:
    """A PEM PKCS#10 request for ``key``'s public key, signed by ``key`` (SHA-256)."""
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, _CSR_COMMON_NAME)])
    csr = x509.CertificateSigningRequestBuilder().subject_name(subject).sign(key, hashes.SHA256())
    return csr.public_bytes(serialization.Encoding.PEM)


def describe(key: PrivateKey) -> str:
    """A loggable description of a key: its type, never its bytes."""
    if isinstance(key, ec.EllipticCurvePrivateKey):
        return f"ecdsa-{key.curve.name}"
    return f"rsa-{key.key_size}"
