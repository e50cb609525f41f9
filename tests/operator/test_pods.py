"""Opted-in pods get their MTLSCert (owned, GC'd with the pod); missed injection is reported."""

from __future__ import annotations

from typing import Any

import aiohttp
from kubemtls_sidecar import contract
from operatorkit import Api, OperatorHandle, _until


async def test_opted_in_pod_gets_an_owned_mtlscert_that_goes_with_it(
    api: Api, operator: OperatorHandle
) -> None:
    pod = await api.create_pod(
        "db-0",
        "ehr",
        annotations={
            contract.ANN_INJECT: "true",
            contract.ANN_CERT_DURATION: "2h",
            contract.ANN_DNS_NAMES: "db.ehr.svc",
            contract.ANN_KEY_TYPE: "rsa-2048",
        },
        hostname="db-0",
        subdomain="db",
    )
    cert = await _until(lambda: _with_phase(api, "db-0", "ehr"))
    assert cert["spec"] == {
        "podName": "db-0",
        "podUID": pod["metadata"]["uid"],
        "serviceAccount": "app",
        "identity": "spiffe://cluster.local/ns/ehr/sa/app",
        "dnsNames": ["db-0.db.ehr.svc.cluster.local", "db.ehr.svc"],
        "duration": "2h",
        "keyType": "rsa-2048",
    }
    (owner,) = cert["metadata"]["ownerReferences"]
    assert owner["uid"] == pod["metadata"]["uid"]
    assert owner["controller"]
    assert owner["blockOwnerDeletion"]
    assert cert["status"]["phase"] == "Pending"
    cond = {c["type"]: c["status"] for c in cert["status"]["conditions"]}
    assert cond["Injected"] == "True"
    assert cond["Ready"] == "False"
    assert await api.trust("ehr")  # the namespace got its trust ConfigMap
    await api.delete("/api/v1/namespaces/ehr/pods/db-0")
    await _until(lambda: _gone(api, "db-0", "ehr"))


async def test_a_label_opts_in_too_and_a_plain_pod_gets_nothing(
    api: Api, operator: OperatorHandle
) -> None:
    await api.create_pod("plain", annotations={})
    await api.create_pod("labelled", annotations={}, labels={contract.ANN_INJECT: "true"})
    await _until(lambda: _with_phase(api, "labelled"))
    assert await api.mtlscert("plain") is None


async def test_opted_in_pod_without_sidecar_gets_event_and_not_injected(
    api: Api, operator: OperatorHandle
) -> None:
    await api.create_pod("legacy", sidecar=False)
    cert = await _until(lambda: _with_phase(api, "legacy"))
    cond = next(c for c in cert["status"]["conditions"] if c["type"] == "Injected")
    assert (cond["status"], cond["reason"]) == ("False", "NotInjected")

    async def event() -> Any:
        return [
            e
            for e in await api.events()
            if e.get("reason") == "NotInjected"
            and e["involvedObject"]["kind"] == "Pod"
            and e["involvedObject"]["name"] == "legacy"
        ]

    (ev, *_) = await _until(event)
    assert ev["type"] == "Warning"
    # ... and a metric the shipped KubemtlsPodsNotInjected alert reads; gone with the pod.
    assert "kubemtls_pods_not_injected 1.0" in await _metrics(operator)
    await api.delete("/api/v1/namespaces/default/pods/legacy")

    async def cleared() -> bool:
        return "kubemtls_pods_not_injected 0.0" in await _metrics(operator)

    await _until(cleared)


async def _metrics(handle: OperatorHandle) -> str:
    async with aiohttp.ClientSession() as s, s.get(handle.metrics_url) as r:
        return await r.text()


async def test_restart_converges_without_duplicates(api: Api, start_operator: Any) -> None:
    first = await start_operator()
    await api.create_pod("w-1")
    await _until(lambda: _with_phase(api, "w-1"))
    await first.stop()
    await api.create_pod("w-2")  # created while no operator runs
    await start_operator()
    await _until(lambda: _with_phase(api, "w-2"))
    items = (await api.get("/apis/kubemtls.io/v1alpha1/namespaces/default/mtlscerts"))["items"]
    assert sorted(i["metadata"]["name"] for i in items) == ["w-1", "w-2"]


async def _with_phase(api: Api, name: str, ns: str = "default") -> Any:
    cert = await api.mtlscert(name, ns)
    return cert if cert and (cert.get("status") or {}).get("phase") else None


async def _gone(api: Api, name: str, ns: str = "default") -> bool:
    return await api.mtlscert(name, ns) is None
