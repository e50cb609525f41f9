"""The sidecar's identity from a signing API: get, renew, survive outages, re-key, trust.

``LocalSigner`` is a small aiohttp HTTPS server in this file that speaks the documented
signing API (DESIGN.md) with a test CA, so the client's behaviour can be steered (down,
refusing, revoking) without the whole operator. The real operator is exercised in
``test_identity_operator.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
import pathlib
import ssl
from collections.abc import AsyncIterator

import dataplane
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubemtls_operator import pki
from kubemtls_sidecar import certs, config, identity, metrics, tlsstore
from testkit import TestPKI, eventually, utcnow

SPIFFE = "spiffe://cluster.local/ns/billing/sa/api"


def _rfc3339(ts: datetime.datetime) -> str:
    return ts.astimezone(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


@dataclasses.dataclass
class LocalSigner:
    """The signing API, in the test: issues leaves from ``pki.ca`` for the bound token."""

    test_pki: TestPKI
    token: str = "token-1"
    lifetime: datetime.timedelta = datetime.timedelta(hours=1)
    renew_after: datetime.timedelta | None = None  # default: half the lifetime
    refuse: tuple[int, str, str] | None = None
    issued: list[x509.Certificate] = dataclasses.field(default_factory=list)
    tokens_seen: list[str] = dataclasses.field(default_factory=list)
    revoked: list[x509.Certificate] = dataclasses.field(default_factory=list)
    trust_calls: int = 0
    not_modified: int = 0

    def _crl(self) -> str:
        now = utcnow()
        entries = [pki.RevokedEntry(c.serial_number, "keyCompromise", now) for c in self.revoked]
        crl = pki.build_crl(self.test_pki.ca, entries, now=now, number=1 + len(entries))
        return pki.crl_pem(crl).decode()

    def _check(self, request: web.Request) -> None:
        auth = request.headers.get("Authorization", "")
        self.tokens_seen.append(auth)
        if self.refuse is not None:
            status, reason, message = self.refuse
            raise _JsonError(status, reason, message)
        if auth != f"Bearer {self.token}":
            raise _JsonError(401, "TokenInvalid", "the token is not valid for audience kubemtls")

    async def post(self, request: web.Request) -> web.Response:
        self._check(request)
        body = await request.json()
        csr = pki.load_csr(body["csr"].encode())
        now = utcnow()
        ident = pki.LeafIdentity(SPIFFE, "api-0", "billing", (), ())
        leaf = pki.issue_leaf(self.test_pki.ca, csr, ident, now=now, lifetime=self.lifetime)
        self.issued.append(leaf)
        renew = now + (self.renew_after or self.lifetime / 2)
        return web.json_response(
            {
                "certificateChain": pki.chain_pem(leaf, self.test_pki.ca).decode(),
                "trustBundle": pki.trust_bundle([self.test_pki.ca.anchor]).decode(),
                "crl": self._crl(),
                "notAfter": _rfc3339(leaf.not_valid_after_utc),
                "renewAt": _rfc3339(renew),
            }
        )

    async def trust(self, request: web.Request) -> web.Response:
        self._check(request)
        self.trust_calls += 1
        current = self.issued[-1] if self.issued else None
        payload = {
            "trustBundle": pki.trust_bundle([self.test_pki.ca.anchor]).decode(),
            "crl": self._crl(),
            "renewAt": _rfc3339(utcnow() + self.lifetime),
            "rekey": current is not None and current in self.revoked,
        }
        digest = json.dumps({**payload, "crl": [c.serial_number for c in self.revoked]})
        etag = '"' + hashlib.sha256(digest.encode()).hexdigest()[:16] + '"'
        if request.headers.get("If-None-Match") == etag:
            self.not_modified += 1
            return web.Response(status=304, headers={"ETag": etag})
        return web.json_response(payload, headers={"ETag": etag})


class _JsonError(web.HTTPException):
    def __init__(self, status: int, reason: str, message: str) -> None:
        self.status_code = status
        super().__init__(
            text=json.dumps({"reason": reason, "message": message}),
            content_type="application/json",
        )


@dataclasses.dataclass
class Served:
    signer: LocalSigner
    url: str
    runner: web.AppRunner
    site: web.TCPSite | None
    port: int
    ctx: ssl.SSLContext

    async def stop(self) -> None:
        assert self.site is not None
        await self.site.stop()
        self.site = None

    async def start(self) -> None:
        self.site = web.TCPSite(self.runner, "127.0.0.1", self.port, ssl_context=self.ctx)
        await self.site.start()


async def serve_signer(signer: LocalSigner, serving_pki: TestPKI, tmp: pathlib.Path) -> Served:
    cert, key = pki.issue_serving_cert(
        serving_pki.ca,
        dns_names=["kubemtls.kubemtls.svc"],
        ip_addresses=["127.0.0.1"],
        now=utcnow(),
    )
    (tmp / "signer.crt").write_bytes(pki.cert_pem(cert))
    (tmp / "signer.key").write_bytes(pki.key_pem(key))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ctx.load_cert_chain(tmp / "signer.crt", tmp / "signer.key")
    app = web.Application()
    app.router.add_post("/v1/certificates", signer.post)
    app.router.add_get("/v1/trust", signer.trust)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, ssl_context=ctx)
    await site.start()
    port = runner.addresses[0][1]
    return Served(signer, f"https://127.0.0.1:{port}", runner, site, port, ctx)


def write_token(token_dir: pathlib.Path, token: str) -> pathlib.Path:
    """Write the token as kubelet does: a new timestamped dir, then swap ``..data``."""
    token_dir.mkdir(parents=True, exist_ok=True)
    stamp = token_dir / f"..{utcnow().timestamp():.6f}"
    stamp.mkdir()
    (stamp / "token").write_text(token)
    tmp_link = token_dir / "..data_tmp"
    tmp_link.symlink_to(stamp.name)
    os.replace(tmp_link, token_dir / "..data")
    link = token_dir / "token"
    if not link.is_symlink():
        link.symlink_to("..data/token")
    return link


@dataclasses.dataclass
class Sidecar:
    store: tlsstore.TlsStore
    metrics: metrics.Metrics
    source: identity.SignerSource
    task: asyncio.Task[None] | None = None

    def serial(self) -> str | None:
        snap = self.store.current
        return snap.facts.serial if snap else None

    def failures(self) -> float:
        value = self.metrics.registry.get_sample_value("kubemtls_sidecar_renewal_failures_total")
        return value or 0.0


@contextlib.asynccontextmanager
async def sidecar(
    url: str, tmp: pathlib.Path, trust_pki: TestPKI, *, poll: float = 0.2
) -> AsyncIterator[Sidecar]:
    trust_dir = tmp / "trust"
    trust_pki.trust_dir(trust_dir)
    token_file = tmp / "tok" / "token"
    if not token_file.exists():
        write_token(tmp / "tok", "token-1")
    cfg = config.parse(
        [
            "--signer",
            url,
            "--token-file",
            str(token_file),
            "--trust-dir",
            str(trust_dir),
            "--trust-poll-interval",
            str(poll),
        ],
        env={},
    )
    m = metrics.Metrics()
    store = tlsstore.TlsStore(m)
    source = identity.SignerSource(cfg, store, m, backoff=identity.Backoff(base=0.05, cap=0.3))
    sc = Sidecar(store, m, source)
    sc.task = asyncio.create_task(source.run())
    try:
        yield sc
    finally:
        sc.task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await sc.task


@pytest.fixture
async def signer(test_pki: TestPKI, tmp_path: pathlib.Path) -> AsyncIterator[Served]:
    served = await serve_signer(LocalSigner(test_pki), test_pki, tmp_path)
    try:
        yield served
    finally:
        await served.runner.cleanup()


# --- tests ------------------------------------------------------------------------------


async def test_gets_a_certificate_and_only_then_is_ready(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    signer.signer.refuse = (503, "CAUnavailable", "no CA can sign right now")
    async with sidecar(signer.url, tmp_path, test_pki) as sc:
        await eventually(lambda: sc.failures() >= 2)
        assert not sc.store.ready()
        assert sc.store.current is None
        signer.signer.refuse = None
        await eventually(sc.store.ready)
        leaf = sc.store.current.leaf  # type: ignore[union-attr]
        assert certs.facts(leaf).spiffe_id == SPIFFE
        assert leaf == signer.signer.issued[-1]
        assert set(signer.signer.tokens_seen) == {"Bearer token-1"}
    # The key never touched the file system.
    for path in tmp_path.rglob("*"):
        if path.is_file() and path.name not in ("signer.key",):
            assert b"PRIVATE KEY" not in path.read_bytes(), path


async def test_refusal_reason_and_message_are_logged(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    signer.signer.refuse = (403, "PodNotOptedIn", "pod billing/api-0 has no kubemtls.io/inject")
    caplog.set_level(logging.WARNING, logger="kubemtls_sidecar.identity")
    async with sidecar(signer.url, tmp_path, test_pki) as sc:
        await eventually(lambda: sc.failures() >= 1)
        await eventually(lambda: "PodNotOptedIn" in caplog.text)
        assert "has no kubemtls.io/inject" in caplog.text
        assert not sc.store.ready()


async def test_renews_with_a_fresh_key_each_time(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    signer.signer.lifetime = datetime.timedelta(seconds=30)
    signer.signer.renew_after = datetime.timedelta(seconds=2)
    async with sidecar(signer.url, tmp_path, test_pki) as sc:
        await eventually(lambda: len(signer.signer.issued) >= 3, timeout=15)
        keys_seen = {
            c.public_key().public_bytes(
                serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
            )
            for c in signer.signer.issued
        }
        assert len(keys_seen) == len(signer.signer.issued)
        await eventually(lambda: sc.serial() == format(signer.signer.issued[-1].serial_number, "x"))


async def test_token_file_is_reread_after_a_kubelet_swap(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    signer.signer.lifetime = datetime.timedelta(seconds=30)
    signer.signer.renew_after = datetime.timedelta(seconds=2)
    async with sidecar(signer.url, tmp_path, test_pki) as sc:
        await eventually(sc.store.ready)
        signer.signer.token = "token-2"
        write_token(tmp_path / "tok", "token-2")
        count = len(signer.signer.issued)
        await eventually(lambda: len(signer.signer.issued) > count + 1, timeout=15)
        assert signer.signer.tokens_seen[-1] == "Bearer token-2"


async def test_survives_the_signer_being_down(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    await signer.stop()  # down before the sidecar starts
    signer.signer.lifetime = datetime.timedelta(seconds=4)
    signer.signer.renew_after = datetime.timedelta(seconds=1)
    async with sidecar(signer.url, tmp_path, test_pki) as sc:
        await eventually(lambda: sc.failures() >= 3)
        assert not sc.store.ready()
        await signer.start()
        await eventually(sc.store.ready, timeout=10)
        first = sc.serial()
        await signer.stop()  # down while serving: renewals fail, the cert keeps serving
        failures = sc.failures()
        await eventually(lambda: sc.failures() > failures + 2, timeout=10)
        assert sc.store.ready()
        assert sc.serial() == first
        # ... until it expires: then not ready.
        await eventually(lambda: not sc.store.ready(), timeout=10)
        await signer.start()
        await eventually(sc.store.ready, timeout=10)
        assert sc.serial() != first


async def test_revocation_applies_the_crl_and_rekeys(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    async with sidecar(signer.url, tmp_path, test_pki, poll=0.2) as sc:
        await eventually(sc.store.ready)
        first = signer.signer.issued[-1]
        # Each changed trust answer and each re-key starts a vetting child (~0.2 s CPU;
        # seconds on a busy CI machine): hence 15 s, not 5.
        await eventually(lambda: signer.signer.not_modified >= 1, timeout=15)  # ETag → 304
        signer.signer.revoked.append(first)
        await eventually(lambda: sc.serial() != format(first.serial_number, "x"), timeout=15)
        snap = sc.store.current
        assert snap is not None
        assert snap.crls is not None
        assert snap.crls.pem()  # the CRL that lists the first serial is loaded
        crl_list = x509.load_pem_x509_crl(snap.crls.pem())
        assert crl_list.get_revoked_certificate_by_serial_number(first.serial_number) is not None
        new = signer.signer.issued[-1]
        assert new.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        ) != first.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
        )
        # One re-key, not a loop.
        issued = len(signer.signer.issued)
        calls = signer.signer.trust_calls
        await eventually(lambda: signer.signer.trust_calls >= calls + 3, timeout=5)
        assert len(signer.signer.issued) == issued


async def test_a_signer_we_do_not_trust_is_refused(
    test_pki: TestPKI, other_pki: TestPKI, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve_signer(LocalSigner(test_pki), other_pki, tmp_path)
    caplog.set_level(logging.WARNING, logger="kubemtls_sidecar.identity")
    try:
        async with sidecar(served.url, tmp_path, test_pki) as sc:
            await eventually(lambda: sc.failures() >= 2)
            assert "SignerNotTrusted" in caplog.text
            assert not sc.store.ready()
            assert served.signer.tokens_seen == []  # the token never went to it
    finally:
        await served.runner.cleanup()


async def test_the_signer_hostname_is_verified(
    test_pki: TestPKI, tmp_path: pathlib.Path, caplog: pytest.LogCaptureFixture
) -> None:
    served = await serve_signer(LocalSigner(test_pki), test_pki, tmp_path)
    caplog.set_level(logging.WARNING, logger="kubemtls_sidecar.identity")
    try:
        url = served.url.replace("127.0.0.1", "localhost")  # not in the serving cert
        async with sidecar(url, tmp_path, test_pki) as sc:
            await eventually(lambda: sc.failures() >= 1)
            assert "SignerNotTrusted" in caplog.text
            assert served.signer.tokens_seen == []
    finally:
        await served.runner.cleanup()


async def test_signer_mode_never_loads_cryptography(
    signer: Served, test_pki: TestPKI, tmp_path: pathlib.Path
) -> None:
    """The key, the CSR and the vetting of each certificate come from the ``vet`` child."""
    signer.signer.lifetime = datetime.timedelta(seconds=30)
    signer.signer.renew_after = datetime.timedelta(seconds=2)
    trust_dir = test_pki.trust_dir(tmp_path / "trust")
    token = write_token(tmp_path / "tok", "token-1")
    args = [
        "--signer", signer.url, "--token-file", str(token), "--trust-dir", str(trust_dir),
        "--trust-poll-interval", "0.2", "--inbound", f"{dataplane.free_port()}:127.0.0.1:9",
        "--listen-address", "127.0.0.1",
    ]  # fmt: skip
    async with dataplane.sidecar_process(args, dataplane.free_port()) as proc:
        await eventually(lambda: len(signer.signer.issued) >= 2, timeout=15)  # a renewal
        assert dataplane.cryptography_mapped(proc.pid) == []
