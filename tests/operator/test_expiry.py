"""MTLSCert phases over time with short lifetimes: renewal overdue → Expiring → Expired."""

from __future__ import annotations

from typing import Any

from kubemtls_sidecar import contract
from operatorkit import Api, OperatorHandle, _until, make_csr, ready_pod, sign


async def test_short_leaf_goes_expiring_when_renewal_is_overdue_then_expired(
    api: Api, start_operator: Any
) -> None:
    handle: OperatorHandle = await start_operator(cert_duration_min="1s")
    token, ca_pem = await ready_pod(
        api, "short", annotations={contract.ANN_INJECT: "true", contract.ANN_CERT_DURATION: "6s"}
    )
    code, _ = await sign(handle, ca_pem, token, {"csr": make_csr()[1]})
    assert code == 200

    async def phase(want: str) -> Any:
        cert = await api.mtlscert("short")
        st = (cert or {}).get("status") or {}
        return st if st.get("phase") == want else None

    await _until(lambda: phase("Issued"))
    st = await _until(lambda: phase("Expiring"))  # renewal due at 2/3 of 6s, not done
    cond = {c["type"]: c for c in st["conditions"]}
    assert (cond["Expiring"]["status"], cond["Expiring"]["reason"]) == ("True", "RenewalOverdue")
    assert cond["Ready"]["status"] == "True"
    st = await _until(lambda: phase("Expired"), timeout=10)
    cond = {c["type"]: c for c in st["conditions"]}
    assert (cond["Ready"]["status"], cond["Ready"]["reason"]) == ("False", "Expired")

    async def warned() -> Any:
        evs = [e for e in await api.events() if e["involvedObject"]["name"] == "short"]
        return {e["reason"] for e in evs if e["type"] == "Warning"} >= {"RenewalOverdue", "Expired"}

    await _until(warned)
    # Renewal brings it back: a fresh certificate is Issued/Ready again.
    code, _body = await sign(handle, ca_pem, token, {"csr": make_csr()[1]})
    assert code == 200
    st = await _until(lambda: phase("Issued"))
    assert st["rotations"] == 2
    assert {c["type"]: c["status"] for c in st["conditions"]}["Ready"] == "True"


async def test_healthy_day_long_leaf_raises_no_alarm(api: Api, operator: OperatorHandle) -> None:
    token, ca_pem = await ready_pod(api, "calm")
    assert (await sign(operator, ca_pem, token, {"csr": make_csr()[1]}))[0] == 200

    async def issued() -> Any:
        cert = await api.mtlscert("calm")
        return (cert.get("status") or {}).get("phase") == "Issued"

    await _until(issued)
    cond = {c["type"]: c for c in (await api.mtlscert("calm"))["status"]["conditions"]}
    assert cond["Expiring"]["status"] == "False"
    text = await _metrics(operator)
    assert 'kubemtls_certificate_expiry_timestamp_seconds{name="calm",namespace="default"}' in text
    assert "kubemtls_ca_expiry_timestamp_seconds" in text
    assert 'kubemtls_ca_rollover_phase{phase="Stable"} 1.0' in text
    assert "kubemtls_signing_duration_seconds_bucket" in text


async def _metrics(handle: OperatorHandle) -> str:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(handle.metrics_url) as r:
        return await r.text()
