"""Revocation end to end: annotate → CRL (openssl), status, rekey, annotation gone, new serial."""

from __future__ import annotations

import pathlib
import subprocess
from typing import Any

from cryptography import x509
from kubemtls_sidecar import contract
from operatorkit import (
    Api,
    OperatorHandle,
    _issued,
    _until,
    make_csr,
    openssl_verify,
    ready_pod,
    sign,
    trust,
)


async def test_revoke_puts_the_serial_in_the_crl_and_orders_a_rekey(
    api: Api, operator: OperatorHandle, tmp_path: pathlib.Path
) -> None:
    token, ca_pem = await ready_pod(api, "billing-0")
    _, csr = make_csr()
    code, first = await sign(operator, ca_pem, token, {"csr": csr})
    assert code == 200
    serial = (
        f"{x509.load_pem_x509_certificates(first['certificateChain'].encode())[0].serial_number:x}"
    )
    await _until(lambda: _issued(api, "billing-0"))

    path = "/apis/kubemtls.io/v1alpha1/namespaces/default/mtlscerts/billing-0"
    await api.patch(path, {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}})

    async def revoked() -> Any:
        cert = await api.mtlscert("billing-0")
        st = cert.get("status") or {}
        anns = cert["metadata"].get("annotations") or {}
        return cert if st.get("phase") == "Revoked" and contract.ANN_REVOKE not in anns else None

    cert = await _until(revoked)
    st = cert["status"]
    assert [(r["serial"], r["reason"]) for r in st["revocations"]] == [(serial, "keyCompromise")]
    cond = {c["type"]: c for c in st["conditions"]}
    assert cond["Revoked"]["status"] == "True"
    assert cond["Ready"]["status"] == "False"

    async def crl_lists_serial() -> Any:
        crl = (await api.trust())["data"][contract.TRUST_CRL_FILE]
        (tmp_path / "crl.pem").write_text(crl)
        text = subprocess.run(
            ["openssl", "crl", "-in", str(tmp_path / "crl.pem"), "-noout", "-text"],
            capture_output=True,
            text=True,
            check=True,
        ).stdout
        return (
            crl
            if serial.upper() in text.replace(":", "").upper() and "Key Compromise" in text
            else None
        )

    crl = await _until(crl_lists_serial)
    done = openssl_verify(tmp_path, first["trustBundle"], first["certificateChain"], crl)
    assert done.returncode != 0
    assert "revoked" in (done.stdout + done.stderr)

    code, tb, _ = await trust(operator, ca_pem, token)
    assert code == 200
    assert tb["rekey"] is True
    assert tb["crl"] == crl

    _, csr2 = make_csr()
    code, second = await sign(operator, ca_pem, token, {"csr": csr2})
    assert code == 200
    serial2 = (
        f"{x509.load_pem_x509_certificates(second['certificateChain'].encode())[0].serial_number:x}"
    )
    assert serial2 != serial
    code, tb, _ = await trust(operator, ca_pem, token)
    assert tb["rekey"] is False
    cert = await _until(lambda: _issued(api, "billing-0"))
    assert cert["status"]["serial"] == serial2
    assert [r["serial"] for r in cert["status"]["revocations"]] == [serial]
    # The state ConfigMap keeps the revocation (restart-safe).
    state = await api.get(f"/api/v1/namespaces/kubemtls/configmaps/{contract.STATE_CONFIGMAP}")
    assert serial in state["data"]["state.json"]


async def test_unknown_reason_is_refused_and_the_annotation_removed(
    api: Api, operator: OperatorHandle
) -> None:
    await api.create_pod("p1")
    await _until(lambda: api.mtlscert("p1"))
    path = "/apis/kubemtls.io/v1alpha1/namespaces/default/mtlscerts/p1"
    await api.patch(path, {"metadata": {"annotations": {contract.ANN_REVOKE: "because"}}})

    async def gone() -> Any:
        cert = await api.mtlscert("p1")
        return contract.ANN_REVOKE not in (cert["metadata"].get("annotations") or {})

    await _until(gone)
    events = await _until(lambda: _events_with(api, "InvalidRevocationReason"))
    assert events
    assert not ((await api.mtlscert("p1")).get("status") or {}).get("revocations")


async def _events_with(api: Api, reason: str) -> Any:
    return [e for e in await api.events() if e.get("reason") == reason]
