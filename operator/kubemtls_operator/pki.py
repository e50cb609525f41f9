"""The PKI core: issue leaves, decide renewal, and the one module callers import.

Pure functions over ``cryptography``. No Kubernetes, no network, no clock: every function
that needs the time takes ``now``. Errors are subclasses of :class:`PKIError` whose
message says what is wrong and what to do; callers decide whether that is retryable.

Callers import this module only (``from kubemtls_operator import pki``). The PKI core is
split by concept and re-exported here: the key policy and CSRs (``keys``), the issuing
CA (``authority``), CRLs and trust bundles (``crl``). Certificate facts shared with the
sidecar (SPIFFE IDs, fingerprints, ``x5t#S256``) live in ``kubemtls_sidecar.certs``.
"""

from __future__ import annotations

import dataclasses
import datetime
import functools
import ipaddress
import random
from collections.abc import Sequence
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives.asymmetric import ec, rsa
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID
from kubemtls_sidecar import certs, errors

from kubemtls_operator import authority, crl, keys

__all__ = [
    "CA",
    "CLOCK_SKEW",
    "REVOCATION_REASONS",
    "CAExpired",
    "CAInvalid",
    "CAKeyEncrypted",
    "CAKeyMismatch",
    "CANotYetValid",
    "CSRBadSignature",
    "CSRInvalid",
    "CSRWeakKey",
    "LeafIdentity",
    "NotACA",
    "PKIError",
    "PrivateKey",
    "PublicKey",
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
    "load_csr_key",
    "renewal_time",
    "trust_bundle",
]

# --- the PKI core's names, re-exported so that ``pki.<name>`` is the one way in ----------
PrivateKey: TypeAlias = keys.PrivateKey
PublicKey: TypeAlias = keys.PublicKey
PKIError = keys.PKIError
CSRInvalid = keys.CSRInvalid
CSRBadSignature = keys.CSRBadSignature
CSRWeakKey = keys.CSRWeakKey
generate_key = keys.generate_key
load_csr = keys.load_csr
load_csr_key = keys.load_csr_key
cert_pem = keys.cert_pem
key_pem = keys.key_pem
CA = authority.CA
CAInvalid = authority.CAInvalid
CAKeyEncrypted = authority.CAKeyEncrypted
CAKeyMismatch = authority.CAKeyMismatch
NotACA = authority.NotACA
CAExpired = authority.CAExpired
CANotYetValid = authority.CANotYetValid
CLOCK_SKEW = authority.CLOCK_SKEW
load_ca = authority.load_ca
bootstrap_ca = authority.bootstrap_ca
issue_intermediate_ca = authority.issue_intermediate_ca
REVOCATION_REASONS = crl.REVOCATION_REASONS
RevokedEntry = crl.RevokedEntry
build_crl = crl.build_crl
crl_pem = crl.crl_pem
trust_bundle = crl.trust_bundle


# --- leaves -----------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class LeafIdentity:
    """Who a leaf certificate names. The signer builds it from the pod, never from a CSR."""

    spiffe_id: str
    common_name: str
    organizational_unit: str
    dns_names: tuple[str, ...] = ()
    ip_addresses: tuple[str, ...] = ()


@functools.cache
def _usage_extensions(
    is_rsa: bool, server_auth: bool, client_auth: bool
) -> tuple[tuple[x509.UnrecognizedExtension, bool], ...]:
    """basicConstraints, keyUsage and extendedKeyUsage of a leaf, pre-encoded, with criticality.

    RSA leaves also get keyEncipherment: TLS 1.2 RSA key exchange encrypts with the leaf's
    key (RFC 5280 §4.2.1.3).
    """
    usages = []
    if server_auth:
        usages.append(ExtendedKeyUsageOID.SERVER_AUTH)
    if client_auth:
        usages.append(ExtendedKeyUsageOID.CLIENT_AUTH)
    if not usages:
        raise ValueError("a leaf needs serverAuth, clientAuth or both")
    key_usage = authority.key_usage(digital_signature=True, key_encipherment=is_rsa, ca=False)
    return (
        (keys.preencoded(x509.BasicConstraints(ca=False, path_length=None)), True),
        (keys.preencoded(key_usage), True),
        (keys.preencoded(x509.ExtendedKeyUsage(usages)), False),
    )


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
    notBefore is backdated by :data:`CLOCK_SKEW`; notAfter is never later than the
    issuing CA's notAfter.

    Raises:
        CSRWeakKey: the public key is not an allowed type.
        IdentityError: the SPIFFE ID, DNS names or IPs are malformed, or there are none.
        CAExpired: the CA has expired at ``now``.
        ValueError: ``lifetime`` is not positive, or neither usage is asked for.
    """
    public_key = keys.check_public_key(
        subject_key.public_key()
        if isinstance(subject_key, x509.CertificateSigningRequest)
        else subject_key
    )
    if lifetime <= datetime.timedelta(0):
        raise ValueError(f"a leaf's lifetime must be positive, not {lifetime}")
    signing = ca.signing
    if now >= signing.not_after:
        raise CAExpired(
            f"the CA {signing.subject.rfc4514_string()} expired at "
            f"{signing.not_after.isoformat()}; it cannot issue certificates"
        )
    builder = (
        x509.CertificateBuilder()
        .subject_name(_leaf_subject(identity))
        .issuer_name(signing.subject)
        .public_key(public_key)
        .serial_number(authority.serial_number())
        .not_valid_before(max(now - CLOCK_SKEW, signing.not_before))
        .not_valid_after(min(now + lifetime, signing.not_after))
    )
    is_rsa = isinstance(public_key, rsa.RSAPublicKey)
    for extension, critical in _usage_extensions(is_rsa, server_auth, client_auth):
        builder = builder.add_extension(extension, critical=critical)
    builder = (
        builder.add_extension(x509.SubjectKeyIdentifier.from_public_key(public_key), critical=False)
        .add_extension(signing.aki, critical=False)
        # Not critical: our subject is never empty (RFC 5280 §4.2.1.6).
        .add_extension(x509.SubjectAlternativeName(_sans(identity)), critical=False)
    )
    return builder.sign(ca.key, signing.digest)


# What many leaves share, checked and built once (a namespace's OU, a service account's SPIFFE
# ID, a Service's DNS names): ~25 us of each leaf's ~40 us of subject and SANs. Bounded LRUs
# of small immutable values; a malformed name raises every time (errors are not cached).
@functools.lru_cache(maxsize=1024)
def _ou(organizational_unit: str) -> x509.NameAttribute[str]:
    return x509.NameAttribute(NameOID.ORGANIZATIONAL_UNIT_NAME, organizational_unit)


@functools.lru_cache(maxsize=4096)
def _spiffe_uri(spiffe_id: str) -> x509.UniformResourceIdentifier:
    certs.parse_spiffe_id(spiffe_id)  # raises IdentityError
    return x509.UniformResourceIdentifier(spiffe_id)


@functools.lru_cache(maxsize=4096)
def _dns_name(name: str) -> x509.DNSName:
    return x509.DNSName(_check_dns_name(name))


def _leaf_subject(identity: LeafIdentity) -> x509.Name:
    attrs = [authority.ORGANIZATION]
    if identity.organizational_unit:
        attrs.append(_ou(identity.organizational_unit[:64]))  # ub-organizational-unit-name
    if identity.common_name:
        cn = identity.common_name[:64]  # ub-common-name; pod names may be up to 253
        attrs.append(x509.NameAttribute(NameOID.COMMON_NAME, cn))
    return x509.Name(attrs)


def _sans(identity: LeafIdentity) -> list[x509.GeneralName]:
    sans: list[x509.GeneralName] = []
    if identity.spiffe_id:
        sans.append(_spiffe_uri(identity.spiffe_id))  # raises IdentityError
    sans.extend([_dns_name(dns) for dns in identity.dns_names])
    for ip in identity.ip_addresses:
        try:
            sans.append(x509.IPAddress(ipaddress.ip_address(ip)))
        except ValueError as e:
            raise errors.IdentityError(f"{ip!r} is not an IP address") from e
    if not sans:
        raise errors.IdentityError("a leaf needs at least one SAN (SPIFFE ID, DNS name or IP)")
    return sans


def _check_dns_name(name: str) -> str:
    labels = name.split(".")
    ok = (
        0 < len(name) <= 253
        and name.isascii()
        and all(0 < len(lb) <= 63 and lb.replace("-", "").isalnum() for lb in labels)
        and not any(lb.startswith("-") or lb.endswith("-") for lb in labels)
    )
    if not ok:
        raise errors.IdentityError(
            f"{name!r} is not a valid DNS name: use dot-separated labels of letters, digits "
            "and '-' (at most 63 characters each, 253 in all), no wildcards"
        )
    return name.lower()


def issue_serving_cert(
    ca: CA,
    *,
    dns_names: Sequence[str],
    ip_addresses: Sequence[str] = (),
    now: datetime.datetime,
    lifetime: datetime.timedelta = datetime.timedelta(days=90),
) -> tuple[x509.Certificate, PrivateKey]:
    """A serverAuth certificate and its new P-256 key, for the operator's webhook and signer.

    Raises:
        IdentityError: no names at all, or a malformed DNS name or IP.
    """
    key = ec.generate_private_key(ec.SECP256R1())
    first = (list(dns_names) or list(ip_addresses) or [""])[0]
    identity = LeafIdentity(
        spiffe_id="",
        common_name=first,
        organizational_unit="kubemtls-operator",
        dns_names=tuple(dns_names),
        ip_addresses=tuple(ip_addresses),
    )
    cert = issue_leaf(ca, key.public_key(), identity, now=now, lifetime=lifetime, client_auth=False)
    return cert, key


def chain_pem(leaf: x509.Certificate, ca: CA) -> bytes:
    """The leaf followed by the intermediates peers need to reach the trust anchor."""
    return keys.cert_pem(leaf, *ca.intermediates)


# --- renewal ----------------------------------------------------------------------------
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
    nobody renews later than asked (cert-manager renews at 2/3 by default). The result
    lies in ``[not_before + (fraction - jitter) * life, not_before + fraction * life]``.

    Raises:
        ValueError: ``fraction`` not in (0, 1), ``jitter`` not in [0, fraction), or
            ``not_after`` not after ``not_before``.
    """
    if not 0 < fraction < 1:
        raise ValueError(f"the renewal fraction must be between 0 and 1, not {fraction}")
    if not 0 <= jitter < fraction:
        raise ValueError(f"the renewal jitter must be in [0, {fraction:.4g}), not {jitter}")
    life = not_after - not_before
    if life <= datetime.timedelta(0):
        raise ValueError(f"notAfter {not_after.isoformat()} is not after notBefore")
    spread = (rng or random).uniform(0, jitter) if jitter else 0.0
    return not_before + life * (fraction - spread)
