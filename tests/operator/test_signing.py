"""The signing API end to end: real kopf, real HTTPS, TokenReview by the emulated API."""

from __future__ import annotations

import pathlib

import aiohttp
import pytest
from cryptography import x509
from cryptography.x509.oid import NameOID
from kubemtls_sidecar import certs, contract
from operatorkit import (
    Api,
    OperatorHandle,
    _issued,
    _until,
    bad_body,
    make_csr,
    openssl_verify,
    ready_pod,
    sign,
    trust,
)


async def test_sidecar_gets_a_chain_that_openssl_verifies(
    api: Api, operator: OperatorHandle, tmp_path: pathlib.Path
) -> None:
    token, ca_pem = await ready_pod(
        api,
        "web-1",
        annotations={contract.ANN_INJECT: "true", contract.ANN_DNS_NAMES: "web.default.svc"},
    )
    _, csr = make_csr(common_name="admin", dns=("evil.example.com",))
    status, body = await sign(operator, ca_pem, token, {"csr": csr})
    assert status == 200, body
    assert set(body) == {"certificateChain", "trustBundle", "crl", "notAfter", "renewAt"}
    done = openssl_verify(tmp_path, body["trustBundle"], body["certificateChain"], body["crl"])
    assert done.returncode == 0, done.stdout + done.stderr
    leaf = x509.load_pem_x509_certificates(body["certificateChain"].encode())[0]
    f = certs.facts(leaf)
    assert f.spiffe_id == "spiffe://cluster.local/ns/default/sa/app"
    assert f.dns_names == ("web.default.svc",)  # the CSR's evil.example.com is ignored
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "web-1"
    assert (
        leaf.subject.get_attributes_for_oid(NameOID.ORGANIZATIONAL_UNIT_NAME)[0].value == "default"
    )
    # The serial is in the API BEFORE the answer (read at once, no waiting): a crash after
    # signing can never leave a certificate in a pod's hands that revocation cannot find.
    cert = await api.mtlscert("web-1")
    st = cert["status"]
    assert st["serial"] == f.serial
    assert st["phase"] == "Issued"
    assert st["fingerprintSHA256"] == f.fingerprint_sha256
    assert st["rotations"] == 1
    assert st["notAfter"] == body["notAfter"]
    ready = next(c for c in st["conditions"] if c["type"] == "Ready")
    assert ready["status"] == "True"
    # /v1/trust: same bundle, an ETag, and 304 when nothing changed.
    code, tb, etag = await trust(operator, ca_pem, token)
    assert code == 200
    assert tb["rekey"] is False
    assert tb["trustBundle"] == body["trustBundle"]
    assert tb["renewAt"] == body["renewAt"]
    code, _, _ = await trust(operator, ca_pem, token, etag)
    assert code == 304


async def test_token_of_pod_a_never_yields_a_cert_for_pod_b(
    api: Api, operator: OperatorHandle
) -> None:
    token_a, ca_pem = await ready_pod(api, "pod-a")
    await api.create_pod("pod-b", service_account="other")
    _, csr = make_csr(common_name="pod-b")  # asks for B's identity
    status, body = await sign(operator, ca_pem, token_a, {"csr": csr})
    assert status == 200
    leaf = x509.load_pem_x509_certificates(body["certificateChain"].encode())[0]
    assert certs.facts(leaf).spiffe_id == "spiffe://cluster.local/ns/default/sa/app"
    assert leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)[0].value == "pod-a"
    await _until(lambda: _issued(api, "pod-a"))
    b = await api.mtlscert("pod-b")
    assert not (b.get("status") or {}).get("serial")


@pytest.mark.parametrize(
    ("case", "status", "reason"),
    [
        ("malformed-json", 400, "MalformedJSON"),
        ("no-csr-field", 400, "MalformedJSON"),
        ("not-pem", 400, "InvalidCSR"),
        ("bad-signature", 400, "BadSignature"),
        ("weak-rsa", 400, "WeakKey"),
        ("dsa", 400, "WeakKey"),
        ("no-token", 401, "TokenMissing"),
        ("unknown-token", 401, "TokenInvalid"),
        ("other-audience", 401, "TokenInvalid"),
        ("oversized", 413, "BodyTooLarge"),
        ("not-opted-in", 403, "PodNotOptedIn"),
        ("deleted-pod", 403, "PodNotFound"),
        ("deleted-pod-uncached", 401, "TokenInvalid"),
        ("recreated-pod", 403, "PodUIDMismatch"),
    ],
)
async def test_bad_requests_get_the_documented_answer(
    api: Api, operator: OperatorHandle, case: str, status: int, reason: str
) -> None:
    token, ca_pem = await ready_pod(api, "p")
    _, good = make_csr()
    body, raw = bad_body(case, good)
    if case == "no-token":
        token = ""
    elif case == "unknown-token":
        token = "not-a-token"
    elif case == "other-audience":
        token = await api.token_for("p", audience="https://kubernetes.default.svc")
    elif case == "not-opted-in":
        await api.create_pod("plain", annotations={})
        token = await api.token_for("plain")
    elif case == "deleted-pod":  # the review is cached from an earlier request: the index says
        assert (await sign(operator, ca_pem, token, body))[0] == 200
        await api.delete("/api/v1/namespaces/default/pods/p")

        async def forgotten() -> bool:  # once the watch delivered the deletion (not before)
            gauge = 'kubemtls_certificate_expiry_timestamp_seconds{name="p",namespace="default"}'
            return gauge not in await _metrics(operator)

        await _until(forgotten)
    elif case == "deleted-pod-uncached":  # the API server itself invalidates the bound token
        await api.delete("/api/v1/namespaces/default/pods/p")
    elif case == "recreated-pod":  # the review is cached; the index has a new pod of that name
        assert (await sign(operator, ca_pem, token, body))[0] == 200
        await api.delete("/api/v1/namespaces/default/pods/p")
        new = await api.create_pod("p")
        uid = new["metadata"]["uid"]

        async def indexed() -> bool:  # its MTLSCert is made after the index saw the new pod
            cert = await api.mtlscert("p")
            return bool(cert and cert["spec"]["podUID"] == uid)

        await _until(indexed)
    code, answer = await sign(operator, ca_pem, token, body, raw=raw)
    assert (code, answer.get("reason")) == (status, reason), answer
    assert answer["message"]
    text = await _metrics(operator)
    assert f'kubemtls_signing_refusals_total{{reason="{reason}"}}' in text


async def _metrics(handle: OperatorHandle) -> str:
    async with aiohttp.ClientSession() as s, s.get(handle.metrics_url) as r:
        return await r.text()


async def test_a_certificate_is_handed_out_only_once_its_serial_is_recorded(
    api: Api, operator: OperatorHandle
) -> None:
    # Make the MTLSCert's status write slow, as a loaded etcd would: if the signer answered
    # before the write landed, a crash in between would leave a serial nobody can revoke.
    token, ca_pem = await ready_pod(api, "slow-1", annotations={contract.ANN_INJECT: "true"})
    await api.post(
        "/_emu/latency", {"pattern": r"^(PATCH|PUT) .*/mtlscerts/slow-1/status$", "seconds": 1.0}
    )
    _, csr = make_csr()
    status, body = await sign(operator, ca_pem, token, {"csr": csr})
    assert status == 200, body
    leaf = x509.load_pem_x509_certificates(body["certificateChain"].encode())[0]
    cert = await api.mtlscert("slow-1")  # read at once: no waiting
    assert (cert.get("status") or {}).get("serial") == f"{leaf.serial_number:x}"
    # The per-certificate gauges the shipped alerts read are set too.
    text = await _metrics(operator)
    labels = '{name="slow-1",namespace="default"}'
    for metric in ("not_before", "renewal", "expiry"):
        assert f"kubemtls_certificate_{metric}_timestamp_seconds{labels}" in text
