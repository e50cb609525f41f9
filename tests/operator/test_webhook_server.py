"""The process the injection webhook runs in: kopf's WebhookServer with our serving cert.

Managed mode registers the MutatingWebhookConfiguration itself (url on 127.0.0.1, caBundle
= the cluster CA); otherwise only ``caBundle`` of the chart-owned configuration is patched.
"""

from __future__ import annotations

import base64
import ssl
from typing import Any

from cryptography import x509
from kubemtls_sidecar import certs, contract
from operatorkit import Api, _until

MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


async def _ca_bundle(api: Api) -> set[str]:
    secret = await api.get("/api/v1/namespaces/kubemtls/secrets/kubemtls-ca")
    pem = base64.b64decode(secret["data"]["tls.crt"])
    return {certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(pem)}


async def test_managed_webhook_is_served_with_a_cert_from_the_cluster_ca(
    api: Api, start_operator: Any
) -> None:
    handle = await start_operator(webhook_managed="true")

    async def registered() -> Any:
        cfg = await api.get_or_none(f"{MWC}/kubemtls-injector")
        hooks = (cfg or {}).get("webhooks") or []
        return hooks[0] if hooks and hooks[0].get("clientConfig", {}).get("caBundle") else None

    hook = await _until(registered, timeout=15)
    url = hook["clientConfig"]["url"]
    assert url == f"https://127.0.0.1:{handle.webhook_port}/{contract.WEBHOOK_HANDLER_ID}"
    bundle = base64.b64decode(hook["clientConfig"]["caBundle"])
    assert {
        certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(bundle)
    } == await _ca_bundle(api)
    # A TLS client trusting only that caBundle accepts the webhook server's certificate.
    ctx = ssl.create_default_context(cadata=bundle.decode())
    import asyncio

    _, writer = await asyncio.open_connection("127.0.0.1", handle.webhook_port, ssl=ctx)
    writer.close()


async def test_chart_owned_configuration_gets_the_ca_bundle_patched(
    api: Api, start_operator: Any
) -> None:
    body = {
        "apiVersion": "admissionregistration.k8s.io/v1",
        "kind": "MutatingWebhookConfiguration",
        "metadata": {"name": "kubemtls-injector"},
        "webhooks": [
            {
                "name": "inject.kubemtls.io",
                "admissionReviewVersions": ["v1"],
                "sideEffects": "None",
                "failurePolicy": "Ignore",
                "clientConfig": {
                    "service": {"name": "kubemtls", "namespace": "kubemtls", "path": "/inject"}
                },
                "rules": [
                    {
                        "operations": ["CREATE"],
                        "apiGroups": [""],
                        "apiVersions": ["v1"],
                        "resources": ["pods"],
                    }
                ],
            }
        ],
    }
    await api.post(MWC, body)
    await start_operator()

    async def patched() -> Any:
        hook = (await api.get(f"{MWC}/kubemtls-injector"))["webhooks"][0]
        return hook["clientConfig"].get("caBundle")

    bundle = base64.b64decode(await _until(patched))
    assert {
        certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(bundle)
    } == await _ca_bundle(api)


async def test_managed_webhook_injects_and_the_operator_sees_the_sidecar(
    api: Api, start_operator: Any
) -> None:
    await start_operator(webhook_managed="true")

    async def registered() -> Any:
        cfg = await api.get_or_none(f"{MWC}/kubemtls-injector")
        return (cfg or {}).get("webhooks")

    await _until(registered, timeout=15)
    pod = await api.create_pod("fresh", sidecar=False)  # the emulator calls our webhook
    names = [c["name"] for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]]
    assert contract.SIDECAR_CONTAINER_NAME in names

    async def injected() -> Any:
        cert = await api.mtlscert("fresh")
        conds = {c["type"]: c for c in ((cert or {}).get("status") or {}).get("conditions", [])}
        return conds.get("Injected", {}).get("status") == "True"

    await _until(injected)
