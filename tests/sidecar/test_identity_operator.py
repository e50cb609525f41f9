"""The sidecar's identity from the REAL operator (kopf + signing API + emulated API server).

One story, in order, because each step needs the one before: the sidecar starts while
the operator is down (not ready, retrying), gets its certificate once the operator is
up (ready, /readyz 200), is revoked and re-keys with the new CRL applied, survives a
second outage and renews once the operator is back (10-second certificates).
"""

from __future__ import annotations

import contextlib
import os
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import dataplane
import operatorkit
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubemtls_sidecar import contract, crl
from operatorkit import Api, OperatorHandle, _until, _wait_ca, _wait_listening
from testkit import eventually, free_port, utcnow

pytestmark = pytest.mark.slow


def _key_id(obj: x509.Certificate | x509.CertificateRevocationList) -> bytes | None:
    try:
        return obj.extensions.get_extension_for_class(
            x509.AuthorityKeyIdentifier
        ).value.key_identifier
    except x509.ExtensionNotFound:
        return None


def revoked_in(crls: list[x509.CertificateRevocationList], leaf: x509.Certificate) -> bool:
    """Whether a CRL of ``leaf``'s issuer (same name and, when both say, same key) lists it."""
    for c in crls:
        if c.issuer != leaf.issuer:
            continue
        leaf_kid, crl_kid = _key_id(leaf), _key_id(c)
        if leaf_kid and crl_kid and leaf_kid != crl_kid:
            continue  # a CA of the same name but another key (a rollover)
        if c.get_revoked_certificate_by_serial_number(leaf.serial_number) is not None:
            return True
    return False


class Operator:
    """Starts and stops the operator on the same ports, so the signer URL stays put."""

    def __init__(self, k8s: Any, tmp: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
        operatorkit.use_emulator(k8s, tmp, monkeypatch)
        self.env = operatorkit.operator_env(cert_duration="10s", cert_duration_min="10s")
        operatorkit.set_operator_env(monkeypatch, self.env)
        self.handle: OperatorHandle | None = None

    @property
    def url(self) -> str:
        return self.env["SIGNER_URL"]

    async def start(self) -> None:
        self.handle = operatorkit.run_operator(self.env)
        await _wait_listening(self.handle)
        await _wait_ca(self.handle)

    async def stop(self) -> None:
        if self.handle is not None:
            await self.handle.stop()
            self.handle = None


@pytest.fixture
async def operator(
    k8s: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[Operator]:
    op = Operator(k8s, tmp_path, monkeypatch)
    try:
        yield op
    finally:
        await op.stop()


def write_token(token_dir: pathlib.Path, token: str) -> pathlib.Path:
    """As kubelet does: a new timestamped directory, then an atomic ``..data`` swap."""
    token_dir.mkdir(parents=True, exist_ok=True)
    stamp = token_dir / f"..{utcnow().timestamp():.6f}"
    stamp.mkdir()
    (stamp / "token").write_text(token)
    (token_dir / "..data_tmp").symlink_to(stamp.name)
    os.replace(token_dir / "..data_tmp", token_dir / "..data")
    link = token_dir / "token"
    if not link.is_symlink():
        link.symlink_to("..data/token")
    return link


async def readyz(port: int) -> int:
    async with (
        aiohttp.ClientSession() as s,
        s.get(f"http://127.0.0.1:{port}/readyz") as r,
    ):
        return r.status


def spki(cert: x509.Certificate) -> bytes:
    return cert.public_key().public_bytes(
        serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo
    )


async def test_identity_lifecycle_against_the_real_operator(
    k8s: Any, operator: Operator, tmp_path: pathlib.Path, echo_port: int
) -> None:
    await operator.start()
    async with aiohttp.ClientSession() as session:
        api = Api(k8s.url, session)
        await api.create_pod("web-1")
        await _until(lambda: api.trust("default"))
        token = await api.token_for("web-1")
        trust_cm = (await api.trust("default"))["data"]
    token_file = write_token(tmp_path / "token", token)
    trust_dir = tmp_path / "trust"
    trust_dir.mkdir()
    (trust_dir / contract.TRUST_CA_FILE).write_text(trust_cm[contract.TRUST_CA_FILE])
    if contract.TRUST_CRL_FILE in trust_cm:
        (trust_dir / contract.TRUST_CRL_FILE).write_text(trust_cm[contract.TRUST_CRL_FILE])

    await operator.stop()  # unreachable at the sidecar's start
    admin = free_port()
    args = [
        "--signer", operator.url, "--token-file", str(token_file), "--trust-dir", str(trust_dir),
        "--admin-port", str(admin), "--admin-address", "127.0.0.1",
        "--listen-address", "127.0.0.1", "--trust-poll-interval", "0.3",
        "--inbound", f"{free_port()}:127.0.0.1:{echo_port}",
    ]  # fmt: skip
    async with dataplane.running_sidecar(args) as r:
        store, metrics = r.sidecar.store, r.sidecar.metrics

        def failures() -> float:
            name = "kubemtls_sidecar_renewal_failures_total"
            return metrics.registry.get_sample_value(name) or 0.0

        await eventually(lambda: failures() >= 2, timeout=10)
        assert await readyz(admin) == 503
        assert store.current is None

        await operator.start()
        await eventually(store.ready, timeout=15)
        assert await readyz(admin) == 200
        first = store.current
        assert first is not None
        assert first.facts.spiffe_id == "spiffe://cluster.local/ns/default/sa/app"
        assert first.facts.common_name == "web-1"

        # Revoked: the CRL reaches the store and the sidecar re-keys (fresh key, new serial).
        async with aiohttp.ClientSession() as session:
            api = Api(k8s.url, session)

            async def recorded() -> bool:  # the status write follows the answer
                cert = await api.mtlscert("web-1")
                return bool(cert) and (cert.get("status") or {}).get("serial") == first.facts.serial

            await _until(recorded)
            group = f"/apis/{contract.CRD_GROUP}/{contract.CRD_VERSION}"
            path = f"{group}/namespaces/default/mtlscerts/web-1"
            await api.patch(
                path, {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}}
            )

        def revoked_and_rekeyed() -> bool:
            snap = store.current
            if snap is None or snap.crls is None or snap.facts.serial == first.facts.serial:
                return False
            return revoked_in(crl.load_crls(snap.crls.pem()), first.leaf)

        await eventually(revoked_and_rekeyed, timeout=30)
        second = store.current
        assert second is not None
        assert spki(second.leaf) != spki(first.leaf)

        # A second outage: renewals fail while the certificate still serves; then it renews.
        await operator.stop()
        failed = failures()
        await eventually(lambda: failures() > failed, timeout=15)
        await operator.start()
        await eventually(
            lambda: (
                store.current is not None
                and store.current.facts.serial != second.facts.serial
                and store.ready()
            ),
            timeout=20,
        )
        assert await readyz(admin) == 200
        with contextlib.suppress(Exception):
            await operator.stop()
