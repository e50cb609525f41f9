"""The sidecar's current TLS material and the SSL contexts built from it.

``TlsStore`` is the one seam every certificate source feeds (the file watcher here, the
signing-API client in ``identity.py``): ``update(chain_pem, key)`` for our certificate
and ``update_trust(trust_pem, crl_pem)`` for the bundle and CRLs. Each call validates
first (key matches certificate, chain verifies against the trust bundle, inside its
validity), builds fresh contexts, then swaps one reference (ghostunnel
``certloader/certificate.go``: "if reloading failed, the old state is kept"). New
handshakes read ``store.current``; established connections keep the context they were
made with. A private key that came from memory is handed to OpenSSL through an anonymous
``memfd`` (TESTING.md §4b2): it never touches a file system. Nothing here logs key bytes.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import logging
import os
import ssl
from collections.abc import Iterator

from cryptography import exceptions, x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from kubemtls_sidecar import certs, crl, logs, metrics, tlsconn

__all__ = ["MaterialError", "Snapshot", "TlsStore", "build_contexts"]

logger = logging.getLogger(__name__)

PrivateKey = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey
# TLS 1.2: forward-secret AEAD suites only. SECLEVEL 2 refuses RSA < 2048 and SHA-1.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:@SECLEVEL=2"


class MaterialError(ValueError):
    """New material that must not be served (the old stays)."""


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent generation of material and the contexts built from it."""

    generation: int
    leaf: x509.Certificate
    facts: certs.CertFacts
    server_ctx: ssl.SSLContext  # inbound: CERT_REQUIRED, mesh trust (+ CRL)
    client_ctx: ssl.SSLContext  # outbound to mesh peers
    upstream_ctx: ssl.SSLContext  # outbound with --upstream-ca (or client_ctx)
    trust: tuple[x509.Certificate, ...]
    crls: crl.CrlSet | None  # None: no crl.pem at all
    crl_in_openssl: bool  # False: checked in software after the handshake

    @property
    def software_crl(self) -> crl.CrlSet | None:
        """CRLs to check after the handshake (those OpenSSL was not given), if any."""
        return None if self.crl_in_openssl else self.crls


@contextlib.contextmanager
def _memfile(name: str, data: bytes) -> Iterator[str]:
    """A path OpenSSL can open that lives in memory only (``/proc/self/fd/N``)."""
    fd = os.memfd_create(name, os.MFD_CLOEXEC)
    try:
        os.write(fd, data)
        yield f"/proc/self/fd/{fd}"
    finally:
        os.close(fd)


def _base_context(purpose: int, min_version: ssl.TLSVersion) -> ssl.SSLContext:
    ctx = ssl.SSLContext(purpose)
    ctx.minimum_version = min_version
    ctx.set_ciphers(CIPHERS_TLS12)
    ctx.options |= ssl.OP_NO_COMPRESSION | ssl.OP_NO_RENEGOTIATION
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.verify_flags |= ssl.VERIFY_X509_PARTIAL_CHAIN
    return ctx


def _load_trust(ctx: ssl.SSLContext, trust_pem: bytes, crl_pem: bytes | None) -> None:
    ctx.load_verify_locations(cadata=trust_pem.decode("ascii"))
    if crl_pem:
        with _memfile("kubemtls-crl", crl_pem) as path:
            ctx.load_verify_locations(cafile=path)
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_LEAF


def build_contexts(
    chain_pem: bytes,
    key: PrivateKey,
    trust_pem: bytes,
    crl_pem: bytes | None,
    upstream_pem: bytes | None,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """(server, client, upstream) contexts presenting ``chain_pem`` with ``key``."""
    key_pem = key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )
    server = _base_context(ssl.PROTOCOL_TLS_SERVER, min_version)
    # Our clients never resume; tickets would cost an encryption per connection.
    server.options |= ssl.OP_NO_TICKET
    server.num_tickets = 0
    server.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    client = _base_context(ssl.PROTOCOL_TLS_CLIENT, min_version)
    upstream = _base_context(ssl.PROTOCOL_TLS_CLIENT, min_version) if upstream_pem else client
    with _memfile("kubemtls-chain", chain_pem) as cpath, _memfile("kubemtls-key", key_pem) as kpath:
        for ctx in {id(c): c for c in (server, client, upstream)}.values():
            ctx.load_cert_chain(cpath, kpath)
    tlsconn.enable_peer_capture(server)
    tlsconn.enable_peer_capture(client)
    if upstream is not client:
        tlsconn.enable_peer_capture(upstream)
    _load_trust(server, trust_pem, crl_pem)
    _load_trust(client, trust_pem, crl_pem)
    if upstream_pem:
        _load_trust(upstream, upstream_pem, None)  # the mesh CRL never applies here
    return server, client, upstream


def _load_key(key: PrivateKey | bytes) -> PrivateKey:
    if isinstance(key, bytes):
        try:
            loaded = serialization.load_pem_private_key(key, password=None)
        except (ValueError, TypeError) as e:
            raise MaterialError(f"private key is not an unencrypted PEM key ({e})") from None
        if not isinstance(loaded, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
            raise MaterialError("private key must be ECDSA or RSA")
        return loaded
    return key


def verify_chain(
    chain: list[x509.Certificate], trust: tuple[x509.Certificate, ...], now: datetime.datetime
) -> None:
    """Check validity dates and that ``chain`` (leaf first) reaches a trusted certificate.

    Raises:
        MaterialError: expired, not yet valid, or not chaining to ``trust``.
    """
    leaf = chain[0]
    if now < leaf.not_valid_before_utc:
        raise MaterialError(f"certificate is not valid before {leaf.not_valid_before_utc}")
    if now >= leaf.not_valid_after_utc:
        raise MaterialError(f"certificate expired at {leaf.not_valid_after_utc}")
    for i, cert in enumerate(chain):
        if cert in trust:
            return
        for anchor in trust:
            with contextlib.suppress(ValueError, TypeError, exceptions.InvalidSignature):
                cert.verify_directly_issued_by(anchor)
                return
        if i + 1 >= len(chain):
            break
        try:
            cert.verify_directly_issued_by(chain[i + 1])
        except (ValueError, TypeError, exceptions.InvalidSignature):
            raise MaterialError(f"chain is broken after {cert.subject.rfc4514_string()}") from None
    raise MaterialError("certificate does not chain to the trust bundle")


class TlsStore:
    """Current material; ``update*`` validate, build, then swap one reference."""

    def __init__(
        self,
        m: metrics.Metrics,
        *,
        upstream_ca_pem: bytes | None = None,
        min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
    ) -> None:
        self.metrics = m
        self.upstream_ca_pem = upstream_ca_pem
        self.min_version = min_version
        self.current: Snapshot | None = None
        self.last_error: str | None = None
        self._generation = 0
        self._chain_pem: bytes | None = None
        self._key: PrivateKey | None = None
        self._trust_pem: bytes | None = None
        self._trust: tuple[x509.Certificate, ...] = ()
        self._crls: crl.CrlSet | None = None

    # --- the public seam ------------------------------------------------------------
    def update(self, chain_pem: bytes, key: PrivateKey | bytes, *, source: str = "file") -> bool:
        """Serve a new certificate chain (leaf first) and key; False (old kept) if invalid."""
        try:
            k = _load_key(key)
            chain = certs.load_pem_certificates(chain_pem)
            if not chain:
                raise MaterialError("no certificate in the chain PEM")
            if not _same_key(chain[0], k):
                raise MaterialError("private key does not match the certificate")
            verify_chain(chain, self._trust, _now())
            snap = self._build(chain_pem, k, self._trust_pem, self._crls)
        except (MaterialError, ValueError, ssl.SSLError) as e:
            return self._refuse("cert", source, e)
        self._chain_pem, self._key = chain_pem, k
        self._swap(snap, "cert", source)
        return True

    def update_trust(
        self, trust_pem: bytes, crl_pem: bytes | None, *, source: str = "file"
    ) -> bool:
        """Use a new trust bundle and CRLs (merged: newest number per issuer wins)."""
        try:
            cas = tuple(certs.load_pem_certificates(trust_pem))
            if not cas:
                raise MaterialError("trust bundle holds no certificate")
            known = dict(self._crls.by_issuer) if self._crls else {}
            new_crls = crl.load_crls(crl_pem) if crl_pem else []
            crls = crl.merge(cas, known, new_crls) if (crl_pem or known) else None
            snap = None
            if self._chain_pem is not None and self._key is not None:
                try:
                    verify_chain(certs.load_pem_certificates(self._chain_pem), cas, _now())
                except MaterialError as e:
                    logs.event(
                        logger,
                        logging.WARNING,
                        "our certificate does not chain to the "
                        "new trust bundle; peers using it will refuse us",
                        reason=str(e),
                    )
                snap = self._build(self._chain_pem, self._key, trust_pem, crls)
        except (MaterialError, ValueError, ssl.SSLError) as e:
            return self._refuse("trust", source, e)
        self._trust_pem, self._trust, self._crls = trust_pem, cas, crls
        if crls is not None and crls.missing:
            logs.event(
                logger,
                logging.WARNING,
                "no CRL for some trusted CAs: revocation of "
                "their peers is checked only against the CRLs present, after the "
                "handshake",
                source=source,
                issuers=[crl.issuer_label(n) for n in crls.missing],
            )
        self._report_crls()
        if snap is not None:
            self._swap(snap, "trust", source)
        else:
            self.metrics.reloads.labels("trust").inc()
        return True

    def refresh(self) -> None:
        """Rebuild when CRL freshness changed (called by the watcher's timer)."""
        self._report_crls()
        snap = self.current
        if snap is None or snap.crls is None or self._key is None or self._chain_pem is None:
            return
        if snap.crl_in_openssl != snap.crls.fresh(_now()):
            with contextlib.suppress(MaterialError, ValueError, ssl.SSLError):
                self._swap(
                    self._build(self._chain_pem, self._key, self._trust_pem, self._crls),
                    "trust",
                    "crl-freshness",
                )

    def ready(self) -> bool:
        """A certificate is loaded and inside its validity period."""
        snap = self.current
        now = _now()
        return (
            snap is not None
            and snap.leaf.not_valid_before_utc <= now < snap.leaf.not_valid_after_utc
        )

    # --- internals --------------------------------------------------------------------
    def _build(
        self,
        chain_pem: bytes,
        key: PrivateKey,
        trust_pem: bytes | None,
        crls: crl.CrlSet | None,
    ) -> Snapshot:
        if trust_pem is None:
            raise MaterialError("no trust bundle loaded yet")
        in_openssl = crls is not None and crls.fresh(_now())
        server, client, upstream = build_contexts(
            chain_pem,
            key,
            trust_pem,
            crls.pem() if crls and in_openssl else None,
            self.upstream_ca_pem,
            self.min_version,
        )
        leaf = certs.load_pem_certificates(chain_pem)[0]
        return Snapshot(
            self._generation + 1,
            leaf,
            certs.facts(leaf),
            server,
            client,
            upstream,
            tuple(certs.load_pem_certificates(trust_pem)),
            crls,
            in_openssl,
        )

    def _swap(self, snap: Snapshot, kind: str, source: str) -> None:
        self._generation = snap.generation
        old = self.current
        self.current = snap
        self.last_error = None
        m = self.metrics
        m.reloads.labels(kind).inc()
        m.cert_not_after.set(snap.leaf.not_valid_after_utc.timestamp())
        if old is None or old.facts.serial != snap.facts.serial:
            if old is not None:
                m.cert_serial_info.remove(old.facts.serial, old.facts.spiffe_id or "")
            m.cert_serial_info.labels(snap.facts.serial, snap.facts.spiffe_id or "").set(1)
        logs.event(
            logger,
            logging.INFO,
            f"{kind} material loaded",
            source=source,
            generation=snap.generation,
            serial=snap.facts.serial,
            identity=snap.facts.spiffe_id,
            not_after=snap.facts.not_after.isoformat(),
            crl_enforced_by=(
                "openssl" if snap.crl_in_openssl else "software" if snap.crls else "nobody"
            ),
        )

    def _refuse(self, kind: str, source: str, e: Exception) -> bool:
        self.last_error = str(e) or type(e).__name__
        self.metrics.reload_failures.labels(kind, type(e).__name__).inc()
        logs.event(
            logger,
            logging.ERROR,
            f"new {kind} material refused; keeping the old",
            source=source,
            reason=self.last_error,
        )
        return False

    def _report_crls(self) -> None:
        m, crls, now = self.metrics, self._crls, _now()
        m.crl_missing.set(1 if crls is None else 0)
        if crls is None:
            return
        for c in crls.by_issuer.values():
            label = crl.issuer_label(c.issuer)
            m.crl_age.labels(label).set((now - c.last_update_utc).total_seconds())
            nu = c.next_update_utc
            m.crl_stale.labels(label).set(1 if nu is not None and now >= nu else 0)
        for name in crls.missing:
            m.crl_stale.labels(crl.issuer_label(name)).set(1)


def _same_key(cert: x509.Certificate, key: PrivateKey) -> bool:
    fmt = (serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
    return cert.public_key().public_bytes(*fmt) == key.public_key().public_bytes(*fmt)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
