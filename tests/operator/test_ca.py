"""The CA lifecycle against the emulated API: bootstrap races, missing/invalid CA, rollover."""

from __future__ import annotations

import asyncio
import base64
import datetime
from typing import Any

import kopf
from cryptography import x509
from kubemtls_operator import ca, config, kube, pki
from kubemtls_sidecar import certs, contract
from operatorkit import NAMESPACE, Api, _until, make_csr, sign
from testkit import TestPKI, utcnow

SECRET = f"/api/v1/namespaces/{NAMESPACE}/secrets/kubemtls-ca"
STATE = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{contract.STATE_CONFIGMAP}"


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode()


async def put_ca(api: Api, root: pki.CA, **extra: bytes) -> None:
    data = {"tls.crt": _b64(pki.cert_pem(root.cert)), "tls.key": _b64(pki.key_pem(root.key))}
    data.update({k.replace("_", "."): _b64(v) for k, v in extra.items()})
    body = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": "kubemtls-ca"}, "data": data}
    await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", body)


async def test_two_replicas_bootstrapping_at_once_agree_on_one_ca(k8s: Any) -> None:
    cfg = config.load({})
    clients = [kube.Client(kopf.ConnectionInfo(server=k8s.url)) for _ in range(2)]
    try:
        managers = [ca.Manager(c, cfg) for c in clients]
        a, b = await asyncio.gather(*(m.reconcile() for m in managers))
        assert a.signing_fingerprint == b.signing_fingerprint
        again = await ca.Manager(clients[0], cfg).reconcile()
        assert again.signing_fingerprint == a.signing_fingerprint
        assert a.state.crl_number >= 1
        assert a.crl_pem.startswith(b"-----BEGIN X509 CRL")
    finally:
        for c in clients:
            await c.close()


async def test_missing_ca_answers_503_with_a_condition_until_the_secret_appears(
    api: Api, start_operator: Any, test_pki: TestPKI
) -> None:
    handle = await start_operator(ca_bootstrap="false", wait_ca=False)
    await api.create_pod("early")
    token = await api.token_for("early")
    code, body = await sign(handle, "", token, {"csr": make_csr()[1]})
    assert (code, body["reason"]) == (503, "CAUnavailable")

    async def cond() -> Any:
        cert = await api.mtlscert("early")
        for c in (cert or {}).get("status", {}).get("conditions", []):
            if c["type"] == "Ready" and c["reason"] == "CAUnavailable":
                return c
        return None

    assert "does not exist" in (await _until(cond))["message"]
    events = (await api.get(f"/api/v1/namespaces/{NAMESPACE}/events"))["items"]
    assert any(e["reason"] == "CASecretMissing" and e["type"] == "Warning" for e in events)
    await put_ca(api, test_pki.ca)  # the fix: the operator retries with backoff and recovers

    async def signs() -> Any:
        code, body = await sign(handle, "", token, {"csr": make_csr()[1]})
        return body if code == 200 else None

    body = await _until(signs, timeout=15)
    leaf = x509.load_pem_x509_certificates(body["certificateChain"].encode())[0]
    assert leaf.issuer == test_pki.ca.cert.subject


async def test_invalid_ca_secret_is_reported_and_not_used(
    api: Api, start_operator: Any, test_pki: TestPKI
) -> None:
    leaf = test_pki.leaf()  # not a CA
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "kubemtls-ca"},
        "data": {"tls.crt": _b64(leaf.chain_pem), "tls.key": _b64(leaf.key_pem)},
    }
    await api.post(f"/api/v1/namespaces/{NAMESPACE}/secrets", body)
    handle = await start_operator(wait_ca=False)
    await api.create_pod("p")
    code, answer = await sign(handle, "", await api.token_for("p"), {"csr": make_csr()[1]})
    assert (code, answer["reason"]) == (503, "CAUnavailable")
    assert "not a CA" in answer["message"]

    async def event() -> Any:
        items = (await api.get(f"/api/v1/namespaces/{NAMESPACE}/events"))["items"]
        return [e for e in items if e["reason"] == "CASecretInvalid"]

    await _until(event)


def _anchors(pem: str) -> set[str]:
    return {certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(pem.encode())}


async def _state(api: Api) -> Any:
    import json

    return json.loads((await api.get(STATE))["data"]["state.json"])


async def test_rollover_publishes_then_signs_then_retires_across_a_restart(
    api: Api, start_operator: Any, test_pki: TestPKI
) -> None:
    old = pki.bootstrap_ca(now=utcnow(), common_name="rollover old root")
    new = pki.bootstrap_ca(now=utcnow(), common_name="rollover new root")
    fp_old, fp_new = certs.fingerprint_sha256(old.cert), certs.fingerprint_sha256(new.cert)
    await put_ca(api, old)
    first = await start_operator(ca_rollover_grace="3s")
    await api.create_pod("app-0")
    token = await api.token_for("app-0")
    ca_pem = (await _until(lambda: api.trust()))["data"]["ca.crt"]
    code, body = await sign(first, ca_pem, token, {"csr": make_csr()[1]})
    assert code == 200
    assert _issuer(body) == old.cert.subject

    # A person puts the next CA into the Secret: it is published everywhere first.
    patch = {
        "data": {"next.crt": _b64(pki.cert_pem(new.cert)), "next.key": _b64(pki.key_pem(new.key))}
    }
    await api.patch(SECRET, patch)

    async def published() -> Any:
        st = await _state(api)
        trust = await api.trust()
        return (
            st
            if st["rollover"]["phase"] == "NextPublished"
            and _anchors(trust["data"]["ca.crt"]) == {fp_old, fp_new}
            else None
        )

    st = await _until(published)
    assert st["rollover"]["nextFingerprint"] == fp_new
    assert st["rollover"]["publishedAt"]
    # One CRL per CA in the bundle (the next CA's too, empty).
    await _until(lambda: _crl_count(api, 2))
    # Still inside the grace period: the published-but-not-yet-active CA does not sign.
    code, body = await sign(first, ca_pem, token, {"csr": make_csr()[1]})
    assert code == 200
    assert _issuer(body) == old.cert.subject
    # Restart in the middle of the rollover: the new replica converges from the API's state.
    await first.stop()
    second = await start_operator(ca_rollover_grace="3s")

    async def active() -> Any:
        bundle = (await api.trust())["data"]["ca.crt"]  # what the sidecar has learnt by now
        code, body = await sign(second, bundle, token, {"csr": make_csr()[1]})
        return body if code == 200 and _issuer(body) == new.cert.subject else None

    await _until(active, timeout=20)
    published_at = datetime.datetime.fromisoformat(
        st["rollover"]["publishedAt"].replace("Z", "+00:00")
    )
    assert utcnow() >= published_at + datetime.timedelta(seconds=3)
    # The pod's certificate now chains to the new CA, so the old one is retired.

    async def retired() -> Any:
        trust = await api.trust()
        secret = await api.get(SECRET)
        st = await _state(api)
        return (
            _anchors(trust["data"]["ca.crt"]) == {fp_new}
            and "prev.crt" not in secret["data"]
            and st["rollover"]["phase"] == "Stable"
        )

    await _until(retired, timeout=20)
    reasons = {
        e["reason"] for e in (await api.get(f"/api/v1/namespaces/{NAMESPACE}/events"))["items"]
    }
    assert {"CANextPublished", "CAActivated", "CARetired"} <= reasons


async def test_a_ca_in_its_last_fifth_gets_a_generated_successor(
    api: Api, start_operator: Any
) -> None:
    now = utcnow()
    aging = pki.bootstrap_ca(
        now=now - datetime.timedelta(days=9), lifetime=datetime.timedelta(days=10)
    )
    await put_ca(api, aging)
    await start_operator()

    async def next_published() -> Any:
        secret = await api.get(SECRET)
        return (
            "next.crt" in secret["data"]
            and (await _state(api))["rollover"]["phase"] == "NextPublished"
        )

    await _until(next_published)


def _issuer(body: dict[str, Any]) -> x509.Name:
    return x509.load_pem_x509_certificates(body["certificateChain"].encode())[0].issuer


async def _crl_count(api: Api, n: int) -> bool:
    pem: str = (await api.trust())["data"]["crl.pem"]
    return pem.count("BEGIN X509 CRL") == n
