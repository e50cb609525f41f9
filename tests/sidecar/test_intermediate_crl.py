"""Revocation when the operator's CA is an intermediate (existing-Secret mode with a chain).

The real operator signs with an intermediate under a root whose key it does not hold; an
MTLSCert is revoked; then every relying party that reads what the operator publishes must
refuse the revoked leaf with ``certificate_revoked`` and accept a fresh one: an inbound
sidecar in file mode (``--trust-dir`` = the published ConfigMap), one in signer mode
(trust and CRL from ``GET /v1/trust``, started before the revocation) and the mock EHR.
"""

from __future__ import annotations

import base64
import datetime
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import dataplane
import operatorkit
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from kubemtls_operator import pki
from kubemtls_operator.demo import ehr
from kubemtls_sidecar import contract, crl, tlsstore
from operatorkit import (
    NAMESPACE,
    Api,
    OperatorHandle,
    _issued,
    _until,
    _wait_ca,
    _wait_listening,
    make_csr,
    sign,
)
from testkit import TestPKI, eventually, free_port, utcnow

pytestmark = pytest.mark.slow

DAY = datetime.timedelta(days=1)
MTLSCERTS = f"/apis/{contract.CRD_GROUP}/{contract.CRD_VERSION}/namespaces/default/mtlscerts"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


@pytest.fixture
async def operator(
    k8s: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[OperatorHandle]:
    """One operator (real kopf) on free ports, stopped at teardown."""
    operatorkit.use_emulator(k8s, tmp_path, monkeypatch)
    env = operatorkit.operator_env(ca_bootstrap="false")
    operatorkit.set_operator_env(monkeypatch, env)
    handle = operatorkit.run_operator(env)
    try:
        yield handle
    finally:
        await handle.stop()


def _write_trust(directory: pathlib.Path, data: dict[str, str]) -> pathlib.Path:
    directory.mkdir(parents=True, exist_ok=True)
    (directory / contract.TRUST_CA_FILE).write_text(data[contract.TRUST_CA_FILE])
    (directory / contract.TRUST_CRL_FILE).write_text(data[contract.TRUST_CRL_FILE])
    return directory


def _client_files(where: pathlib.Path, key: Any, chain_pem: str) -> list[str]:
    """``openssl s_client`` flags presenting ``chain_pem`` (leaf, then the intermediate)."""
    where.mkdir(parents=True)
    leaf, *rest = x509.load_pem_x509_certificates(chain_pem.encode())
    (where / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    (where / "chain.pem").write_bytes(pki.cert_pem(*rest))
    (where / "key.pem").write_bytes(pki.key_pem(key))
    return [
        "-cert", str(where / "leaf.pem"), "-cert_chain", str(where / "chain.pem"),
        "-key", str(where / "key.pem"),
    ]  # fmt: skip


def _enforced_by_openssl(store: tlsstore.TlsStore) -> None:
    """The intermediate's CRL is kept, the root misses none: OpenSSL enforces it."""
    snap = store.current
    assert snap is not None
    assert snap.crls is not None
    assert snap.crls.missing == ()
    assert snap.crl_in_openssl
    stale = {
        sample.labels["issuer"]: sample.value
        for metric in store.metrics.registry.collect()
        if metric.name == "kubemtls_sidecar_crl_stale"
        for sample in metric.samples
    }
    assert stale
    assert not any(stale.values()), stale  # the root is not "stale" forever


async def _refused_then_accepted(
    port: int, trust: pathlib.Path, revoked: list[str], fresh: list[str]
) -> None:
    for version in ("-tls1_3", "-tls1_2"):
        out = await dataplane.s_client(port, version, "-CAfile", str(trust), *revoked)
        assert "alert certificate revoked" in out, out
    ok = await dataplane.s_client(port, "-CAfile", str(trust), *fresh, until="ping")
    assert "ping" in ok, ok


async def test_a_leaf_revoked_under_an_intermediate_ca_is_refused_everywhere(
    k8s: Any,
    operator: OperatorHandle,
    test_pki: TestPKI,
    tmp_path: pathlib.Path,
    echo_port: int,
) -> None:
    # The operator's CA: an intermediate, with its root in tls.crt (the root's key elsewhere).
    inter = pki.issue_intermediate_ca(
        test_pki.ca, now=utcnow(), common_name="kubemtls intermediate (test)", lifetime=90 * DAY
    )
    data = {
        "tls.crt": _b64(pki.cert_pem(inter.cert, *inter.chain)),
        "tls.key": _b64(pki.key_pem(inter.key)),
    }
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemtls-ca"}}
    async with aiohttp.ClientSession() as session:
        api = Api(k8s.url, session)
        await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", {**secret, "data": data})
        await _wait_listening(operator)
        await _wait_ca(operator)
        for pod in ("server-0", "client-a", "client-b"):
            await api.create_pod(pod)
        await _until(lambda: api.trust("default"))
        published = (await api.trust("default"))["data"]
        ca_pem = published[contract.TRUST_CA_FILE]
        clients = {}
        for pod in ("client-a", "client-b"):
            token = await api.token_for(pod)
            key, csr = make_csr()
            code, body = await sign(operator, ca_pem, token, {"csr": csr})
            assert code == 200, body
            chain = body["certificateChain"]
            assert x509.load_pem_x509_certificates(chain.encode())[0].issuer == inter.cert.subject
            clients[pod] = (_client_files(tmp_path / pod, key, chain), chain)
            await _until(lambda pod=pod: _issued(api, pod))
        revoked_serial = x509.load_pem_x509_certificates(clients["client-a"][1].encode())[
            0
        ].serial_number

        # A signer-mode sidecar, started before the revocation: the CRL must reach it
        # through GET /v1/trust (its trust dir keeps the pre-revocation files).
        token_file = tmp_path / "token"
        token_file.write_text(await api.token_for("server-0"))
        signer_trust = _write_trust(tmp_path / "signer-trust", published)
        signer_port = free_port()
        signer_args = [
            "--signer", f"https://127.0.0.1:{operator.signer_port}",
            "--token-file", str(token_file), "--trust-dir", str(signer_trust),
            "--admin-port", str(free_port()), "--admin-address", "127.0.0.1",
            "--listen-address", "127.0.0.1", "--trust-poll-interval", "0.3",
            "--inbound", f"{signer_port}:127.0.0.1:{echo_port}",
        ]  # fmt: skip
        async with dataplane.running_sidecar(signer_args) as signer_mode:
            store = signer_mode.sidecar.store
            await eventually(store.ready, timeout=15)

            await api.patch(
                f"{MTLSCERTS}/client-a",
                {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}},
            )

            async def crl_lists_serial() -> Any:
                cm = (await api.trust("default"))["data"]
                crls = crl.load_crls(cm[contract.TRUST_CRL_FILE].encode())
                listed = any(
                    c.get_revoked_certificate_by_serial_number(revoked_serial) for c in crls
                )
                return cm if listed else None

            published = await _until(crl_lists_serial)
            trust_dir = _write_trust(tmp_path / "trust", published)
            bundle = trust_dir / contract.TRUST_CA_FILE

            # File mode: the published ConfigMap as --trust-dir.
            server = test_pki.leaf("default", "server", issuer=inter).write(tmp_path / "srv")
            file_port = free_port()
            file_args = [
                "--cert-dir", str(server), "--trust-dir", str(trust_dir),
                "--admin-port", str(free_port()), "--admin-address", "127.0.0.1",
                "--listen-address", "127.0.0.1",
                "--inbound", f"{file_port}:127.0.0.1:{echo_port}",
            ]  # fmt: skip
            async with dataplane.running_sidecar(file_args) as file_mode:
                _enforced_by_openssl(file_mode.sidecar.store)
                await _refused_then_accepted(
                    file_port, bundle, clients["client-a"][0], clients["client-b"][0]
                )

            # Signer mode: once /v1/trust delivered the new CRL.
            def signer_knows() -> bool:
                snap = store.current
                return bool(
                    snap
                    and snap.crls
                    and any(revoked_serial in e.revoked for e in snap.crls.entries)
                )

            await eventually(signer_knows, timeout=10)
            _enforced_by_openssl(store)
            await _refused_then_accepted(
                signer_port, bundle, clients["client-a"][0], clients["client-b"][0]
            )

        # The mock EHR, reading the same published bundle and CRL.
        mock = ehr.MockEHR(
            host="127.0.0.1",
            port=0,
            cert_file=server / "tls.crt",
            key_file=server / "tls.key",
            trust=lambda: (
                (trust_dir / contract.TRUST_CA_FILE).read_bytes(),
                (trust_dir / contract.TRUST_CRL_FILE).read_bytes(),
            ),
            refresh=60,
        )
        mock.start()
        try:
            out = await dataplane.s_client(
                mock.port, "-CAfile", str(bundle), *clients["client-a"][0]
            )
            assert "alert certificate revoked" in out, out
            ok = await dataplane.s_client(
                mock.port,
                "-CAfile",
                str(bundle),
                *clients["client-b"][0],
                data=b"GET /fhir/metadata HTTP/1.0\r\n\r\n",
                until="HTTP/1.0 200",
            )
            assert "200" in ok, ok
        finally:
            mock.stop()
