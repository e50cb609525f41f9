"""The sidecar's current TLS material and the SSL contexts built from it.

``TlsStore`` is the one seam every certificate source feeds (the file watcher here, the
signing-API client in ``identity.py``): ``await update(chain_pem, key_pem)`` for our
certificate and ``await update_trust(trust_pem, crl_pem)`` for the bundle and CRLs. Each
call validates first (key matches certificate, chain verifies against the trust bundle,
inside its validity; CRLs signed by their CA, newest number per CA), builds fresh
contexts, then swaps one reference (ghostunnel ``certloader/certificate.go``: "if
reloading failed, the old state is kept"). Validation needs ``cryptography``, which this
long-running process never loads (idle memory): it runs in the short-lived ``vet`` child
(``vetted.call``), only when the material changed; its failure is a refused reload. The
facts kept about our leaf come from ``der``. New handshakes read ``store.current``;
established connections keep the context they were made with. A private key is handed
to OpenSSL through an anonymous ``memfd`` (TESTING.md §4b2): it never touches a file
system. Nothing here logs key bytes.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import logging
import os
import ssl
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from kubemtls_sidecar import certs, der, logs, metrics, sslknobs, tlsconn, vetted

if TYPE_CHECKING:
    from cryptography import x509

__all__ = ["MaterialError", "Snapshot", "TlsStore", "build_contexts"]

logger = logging.getLogger(__name__)

# TLS 1.2: forward-secret AEAD suites only. SECLEVEL 2 refuses RSA < 2048 and SHA-1.
CIPHERS_TLS12 = "ECDHE+AESGCM:ECDHE+CHACHA20:!aNULL:!eNULL:@SECLEVEL=2"

MaterialError = vetted.MaterialError


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """One consistent generation of material and the contexts built from it."""

    generation: int
    cert: der.Cert  # our leaf
    facts: certs.CertFacts
    server_ctx: ssl.SSLContext  # inbound: CERT_REQUIRED, mesh trust (+ CRL)
    client_ctx: ssl.SSLContext  # outbound to mesh peers
    upstream_ctx: ssl.SSLContext  # outbound with --upstream-ca (or client_ctx)
    trust: tuple[bytes, ...]  # DER of the trusted CAs
    crls: vetted.CrlState | None  # None: no crl.pem at all
    crl_in_openssl: bool  # False: checked in software after the handshake

    @property
    def software_crl(self) -> vetted.CrlState | None:
        """CRLs to check after the handshake (those OpenSSL was not given), if any."""
        return None if self.crl_in_openssl else self.crls

    @property
    def leaf(self) -> x509.Certificate:
        """Our leaf as a ``cryptography`` object: for tests and tools, never the sidecar."""
        from cryptography import x509

        return x509.load_der_x509_certificate(self.cert.der)


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
    key_pem: bytes,
    trust_pem: bytes,
    crl_pem: bytes | None,
    upstream_pem: bytes | None,
    min_version: ssl.TLSVersion = ssl.TLSVersion.TLSv1_2,
) -> tuple[ssl.SSLContext, ssl.SSLContext, ssl.SSLContext]:
    """(server, client, upstream) contexts presenting ``chain_pem`` with ``key_pem``.

    ``key_pem`` must have been vetted (``vet``): OpenSSL would prompt for the password of
    an encrypted key.
    """
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
    for ctx in {id(c): c for c in (server, client, upstream)}.values():
        sslknobs.omit_trust_anchor(ctx)  # do not send our own root with every handshake
    return server, client, upstream


class TlsStore:
    """Current material; ``update*`` validate (in the ``vet`` child), build, then swap."""

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
        self._key_pem: bytes | None = None
        self._trust_pem: bytes | None = None
        self._crls: vetted.CrlState | None = None
        self._lock = asyncio.Lock()  # one vetting at a time: each builds on the last

    # --- the public seam ------------------------------------------------------------
    async def update(
        self,
        chain_pem: bytes,
        key_pem: bytes,
        *,
        source: str = "file",
        session: vetted.Session | None = None,
    ) -> bool:
        """Serve a new certificate chain (leaf first) and key; False (old kept) if invalid.

        ``session``: the vetting child to ask (default: a new one for this question).
        """
        return all(await self._vet_and_take(source, cert=(chain_pem, key_pem), session=session))

    async def update_trust(
        self,
        trust_pem: bytes,
        crl_pem: bytes | None,
        *,
        source: str = "file",
        session: vetted.Session | None = None,
    ) -> bool:
        """Use a new trust bundle and CRLs (merged: newest number per issuer wins)."""
        return all(await self._vet_and_take(source, trust=(trust_pem, crl_pem), session=session))

    async def update_all(
        self,
        trust_pem: bytes,
        crl_pem: bytes | None,
        chain_pem: bytes,
        key_pem: bytes,
        *,
        source: str = "file",
        session: vetted.Session | None = None,
    ) -> tuple[bool, bool]:
        """``update_trust`` then ``update``, vetted by one child: (trust taken, cert taken).

        A refused trust bundle refuses the certificate too (it was checked against it).
        """
        return await self._vet_and_take(
            source, trust=(trust_pem, crl_pem), cert=(chain_pem, key_pem), session=session
        )

    async def _vet_and_take(
        self,
        source: str,
        *,
        trust: tuple[bytes, bytes | None] | None = None,
        cert: tuple[bytes, bytes] | None = None,
        session: vetted.Session | None = None,
    ) -> tuple[bool, bool]:
        async with self._lock:
            request: dict[str, bytes | None] = {}
            if trust is not None:
                request["trust_pem"], request["crl_pem"] = trust
                request["known_crl_pem"] = self._crls.pem() if self._crls else None
                request["our_chain_pem"] = self._chain_pem
            if cert is not None:
                request["chain_pem"], request["key_pem"] = cert
                request["current_trust_pem"] = self._trust_pem
            try:
                answer = await vetted.call(
                    "material",
                    {k: v.decode("latin-1") if v else None for k, v in request.items()},
                    session,
                )
            except MaterialError as e:
                self._refuse("trust" if trust is not None else "cert", source, e)
                return False, False
            trust_ok = cert_ok = True
            if trust is not None:
                trust_ok = self._take_trust(answer.get("trust"), *trust, source)
            if cert is not None:
                cert_ok = trust_ok and self._take_cert(answer.get("cert"), *cert, source)
            return trust_ok, cert_ok

    def _take_cert(
        self, verdict: dict[str, Any] | None, chain_pem: bytes, key_pem: bytes, source: str
    ) -> bool:
        try:
            vetted.check(verdict)
            snap = self._build(chain_pem, key_pem, self._trust_pem, self._crls)
        except (MaterialError, ValueError, ssl.SSLError) as e:
            return self._refuse("cert", source, e)
        self._chain_pem, self._key_pem = chain_pem, key_pem
        self._swap(snap, "cert", source)
        return True

    def _take_trust(
        self, verdict: dict[str, Any] | None, trust_pem: bytes, crl_pem: bytes | None, source: str
    ) -> bool:
        try:
            part = vetted.check(verdict)
            crls = vetted.CrlState.from_json(part["crls"]) if part["crls"] else None
            snap = None
            if self._chain_pem is not None and self._key_pem is not None:
                if part["chain_warning"]:
                    logs.event(
                        logger,
                        logging.WARNING,
                        "our certificate does not chain to the "
                        "new trust bundle; peers using it will refuse us",
                        reason=part["chain_warning"],
                    )
                snap = self._build(self._chain_pem, self._key_pem, trust_pem, crls)
        except (MaterialError, ValueError, KeyError, TypeError, ssl.SSLError) as e:
            return self._refuse("trust", source, e)
        self._trust_pem, self._crls = trust_pem, crls
        if crls is not None and crls.missing:
            logs.event(
                logger,
                logging.WARNING,
                "no CRL for some trusted CAs: revocation of "
                "their peers is checked only against the CRLs present, after the "
                "handshake",
                source=source,
                issuers=list(crls.missing),
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
        if snap is None or snap.crls is None or self._key_pem is None or self._chain_pem is None:
            return
        if snap.crl_in_openssl != snap.crls.fresh(_now()):
            with contextlib.suppress(MaterialError, ValueError, ssl.SSLError):
                self._swap(
                    self._build(self._chain_pem, self._key_pem, self._trust_pem, self._crls),
                    "trust",
                    "crl-freshness",
                )

    def ready(self) -> bool:
        """A certificate is loaded and inside its validity period."""
        snap = self.current
        now = _now()
        return (
            snap is not None
            and snap.cert.not_valid_before_utc <= now < snap.cert.not_valid_after_utc
        )

    # --- internals --------------------------------------------------------------------
    def _build(
        self,
        chain_pem: bytes,
        key_pem: bytes,
        trust_pem: bytes | None,
        crls: vetted.CrlState | None,
    ) -> Snapshot:
        if trust_pem is None:
            raise MaterialError("no trust bundle loaded yet")
        in_openssl = crls is not None and crls.fresh(_now())
        server, client, upstream = build_contexts(
            chain_pem,
            key_pem,
            trust_pem,
            crls.pem() if crls and in_openssl else None,
            self.upstream_ca_pem,
            self.min_version,
        )
        leaf = der.parse(der.pem_certificates(chain_pem)[0])
        return Snapshot(
            self._generation + 1,
            leaf,
            der.facts(leaf),
            server,
            client,
            upstream,
            tuple(der.pem_certificates(trust_pem)),
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
        m.cert_not_after.set(snap.cert.not_valid_after_utc.timestamp())
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
        reason = e.kind if isinstance(e, MaterialError) else type(e).__name__
        self.metrics.reload_failures.labels(kind, reason).inc()
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
        for c in crls.entries:
            m.crl_age.labels(c.issuer).set((now - c.last_update).total_seconds())
            nu = c.next_update
            m.crl_stale.labels(c.issuer).set(1 if nu is not None and now >= nu else 0)
        for name in crls.missing:
            m.crl_stale.labels(name).set(1)


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)
