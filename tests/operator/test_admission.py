"""The mutating webhook end to end: real kopf, real HTTPS, AdmissionReview v1 as the API
server sends it, and pods created through the emulated API server (which calls the webhook).
"""

from __future__ import annotations

import asyncio
import base64
import copy
import json
import pathlib
import ssl
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import jsonpatch
import kopf
import pytest
import testkit
import yaml
from kopf.testing import KopfRunner
from kubemtls_operator import admissionserver, config, pki
from kubemtls_operator.handlers import admission

DATA = pathlib.Path(__file__).parent / "data"
WEBHOOK_CONFIG = "kubemtls-injector"
MWC = "/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations"


def review(pod: Any, op: str = "CREATE") -> dict[str, Any]:
    """An AdmissionReview as kube-apiserver sends it for a pod."""
    gvk = {"group": "", "version": "v1", "kind": "Pod"}
    gvr = {"group": "", "version": "v1", "resource": "pods"}
    meta = pod.get("metadata", {}) if isinstance(pod, dict) else {}
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": str(uuid.uuid4()),
            "kind": gvk,
            "resource": gvr,
            "requestKind": gvk,
            "requestResource": gvr,
            "name": meta.get("name", ""),
            "namespace": meta.get("namespace", "default"),
            "operation": op,
            "userInfo": {"username": "system:serviceaccount:kube-system:replicaset-controller"},
            "object": pod,
            "oldObject": None,
            "dryRun": False,
            "options": {"apiVersion": "meta.k8s.io/v1", "kind": "CreateOptions"},
        },
    }


def load(case: str) -> dict[str, Any]:
    pod: dict[str, Any] = yaml.safe_load((DATA / f"{case}.pod.yaml").read_text())
    return pod


class Webhook:
    """The running webhook as the API server sees it: its URL and CA bundle."""

    def __init__(self, client_config: dict[str, Any], api_url: str) -> None:
        self.url: str = client_config["url"]
        self.ssl = ssl.create_default_context(
            cadata=base64.b64decode(client_config["caBundle"]).decode()
        )
        self.api_url = api_url

    async def post(self, session: aiohttp.ClientSession, body: Any) -> tuple[int, Any]:
        data = body if isinstance(body, bytes) else json.dumps(body).encode()
        headers = {"Content-Type": "application/json"}
        async with session.post(self.url, data=data, ssl=self.ssl, headers=headers) as r:
            text = await r.text()
            try:
                return r.status, json.loads(text)
            except ValueError:
                return r.status, text

    async def admit(self, session: aiohttp.ClientSession, pod: Any) -> dict[str, Any]:
        body = review(pod)
        status, answer = await self.post(session, body)
        assert status == 200, answer
        assert answer["apiVersion"] == "admission.k8s.io/v1"
        assert answer["kind"] == "AdmissionReview"
        assert answer["response"]["uid"] == body["request"]["uid"]
        response: dict[str, Any] = answer["response"]
        return response


async def _registered(api: Any, name: str) -> Webhook:
    """Wait for kopf to write the webhook's clientConfig into the configuration."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + 20
    while True:
        found = await api.get_or_none(f"{MWC}/{name}")
        hooks = (found or {}).get("webhooks") or []
        if hooks and hooks[0].get("clientConfig", {}).get("caBundle"):
            return Webhook(hooks[0]["clientConfig"], api.url)
        assert loop.time() < deadline, "kopf did not register the webhook configuration"
        await asyncio.sleep(0.05)


@pytest.fixture
async def webhook(
    k8s: Any,
    api: Any,
    test_pki: testkit.TestPKI,
    tmp_path: pathlib.Path,
    monkeypatch: pytest.MonkeyPatch,
) -> AsyncIterator[Webhook]:
    """kopf running only the admission handler, on our WebhookServer, in managed mode.

    The whole operator (conftest's ``start_operator``) is exercised by the last tests; this
    one starts in about a second and isolates the webhook. Its serving certificate comes
    from the test CA, as the operator's does (kopf's self-signed one needs oscrypto, which
    cannot read OpenSSL 3's version: TESTING.md §3).
    """
    k8s.write_kubeconfig(tmp_path / "kubeconfig")
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "kubeconfig"))
    cert, key = pki.issue_serving_cert(
        test_pki.ca, dns_names=("localhost",), ip_addresses=("127.0.0.1",), now=testkit.utcnow()
    )
    (tmp_path / "tls.crt").write_bytes(pki.chain_pem(cert, test_pki.ca))
    (tmp_path / "tls.key").write_bytes(pki.key_pem(key))
    (tmp_path / "tls.key").chmod(0o600)
    cfg = config.load({})

    registry = kopf.OperatorRegistry()
    kopf.on.login(registry=registry)(kopf.login_with_kubeconfig)

    @kopf.on.startup(registry=registry)
    def _config(memo: kopf.Memo, **_: Any) -> None:
        memo.config = cfg

    for handler in kopf.get_default_registry()._webhooks.get_all_handlers():
        if handler.fn is admission.pod_inject:
            registry._webhooks.append(handler)
    settings = kopf.OperatorSettings()
    settings.admission.server = admissionserver.WebhookServer(
        addr="127.0.0.1",
        host="127.0.0.1",
        certfile=str(tmp_path / "tls.crt"),
        pkeyfile=str(tmp_path / "tls.key"),
        cadata=pki.cert_pem(test_pki.ca.anchor),
    )
    settings.admission.managed = WEBHOOK_CONFIG
    # `kopf run` makes a given registry the process's default one: put the real one back.
    default_registry = kopf.get_default_registry()
    runner = KopfRunner(
        ["run", "-A", "--standalone"], registry=registry, settings=settings, timeout=30
    )
    runner.__enter__()
    try:
        yield await _registered(api, WEBHOOK_CONFIG)
    finally:
        # Join the operator thread off this loop: it still calls the emulator (TESTING.md §1).
        await asyncio.to_thread(runner.__exit__, None, None, None)
        kopf.set_default_registry(default_registry)


async def test_managed_configuration_is_what_the_chart_promises(webhook: Webhook, api: Any) -> None:
    hook = (await api.get(f"{MWC}/{WEBHOOK_CONFIG}"))["webhooks"][0]
    assert webhook.url.startswith("https://127.0.0.1:")
    assert webhook.url.endswith("/inject")
    assert hook["sideEffects"] == "None"
    assert hook["failurePolicy"] == "Ignore"
    assert hook["rules"] == [
        {
            "apiGroups": [""],
            "apiVersions": ["v1"],
            "resources": ["pods"],
            "operations": ["CREATE"],
            "scope": "*",
        }
    ]


async def test_opted_in_pod_gets_the_golden_patch(webhook: Webhook) -> None:
    async with aiohttp.ClientSession() as s:
        for case in ("deployment-explicit", "transparent-probes", "job"):
            pod = load(case)
            rsp = await webhook.admit(s, pod)
            assert rsp["allowed"] is True
            assert rsp["patchType"] == "JSONPatch"
            ops = json.loads(base64.b64decode(rsp["patch"]))
            golden = json.loads((DATA / f"{case}.patch.json").read_text())
            # The operator under test signs at its own URL; the rest is byte for byte.
            assert _without_signer(jsonpatch.apply_patch(pod, ops)) == _without_signer(
                jsonpatch.apply_patch(pod, golden)
            )
            # Sent as podpatch built it (the golden operations), not re-diffed by kopf.
            assert [_op_without_signer(op) for op in ops] == [
                _op_without_signer(op) for op in golden
            ]


def _op_without_signer(value: Any) -> Any:
    """Any JSON value with each KUBEMTLS_SIGNER env value blanked."""
    if isinstance(value, list):
        return [_op_without_signer(v) for v in value]
    if isinstance(value, dict):
        if value.get("name") == "KUBEMTLS_SIGNER" and "value" in value:
            return {**value, "value": "<signer>"}
        return {k: _op_without_signer(v) for k, v in value.items()}
    return value


def _without_signer(pod: dict[str, Any]) -> dict[str, Any]:
    pod = copy.deepcopy(pod)
    for c in pod["spec"].get("initContainers", []) + pod["spec"]["containers"]:
        for e in c.get("env", []):
            if e["name"] == "KUBEMTLS_SIGNER":
                e["value"] = "<signer>"
    return pod


async def test_pods_not_opted_in_or_injected_get_no_patch(webhook: Webhook) -> None:
    plain = load("deployment-explicit")
    del plain["metadata"]["annotations"]["kubemtls.io/inject"]
    opted_out = load("deployment-explicit")
    opted_out["metadata"]["annotations"]["kubemtls.io/inject"] = "false"
    async with aiohttp.ClientSession() as s:
        first = await webhook.admit(s, load("job"))
        once = jsonpatch.apply_patch(load("job"), json.loads(base64.b64decode(first["patch"])))
        for pod in (plain, opted_out, once):
            rsp = await webhook.admit(s, pod)
            assert rsp["allowed"] is True
            assert "patch" not in rsp
            assert "patchType" not in rsp


async def test_bad_annotations_are_denied_with_every_problem(webhook: Webhook) -> None:
    pod = load("deployment-explicit")
    pod["metadata"]["annotations"].update(
        {"kubemtls.io/inbound": "8443:80800", "kubemtls.io/inbund": "8443:8080"}
    )
    async with aiohttp.ClientSession() as s:
        rsp = await webhook.admit(s, pod)
    assert rsp["allowed"] is False
    assert "patch" not in rsp
    assert rsp["status"]["code"] == 422
    assert rsp["status"]["message"] == (
        "kubemtls.io annotations are not valid (2 problems):\n"
        '- kubemtls.io/inbund: "8443:8080" — is not a kubemtls annotation; '
        "did you mean kubemtls.io/inbound?\n"
        '- kubemtls.io/inbound: "8443:80800" — app port 80800 is out of range (1-65535); '
        'write it as "8443:8080" (TLS listen port : app port)'
    )


async def test_likely_mistakes_come_back_as_warnings(webhook: Webhook) -> None:
    pod = load("job")
    pod["metadata"]["annotations"]["kubemtls.io/allowed-peers"] = "spiffe://other.org/ns/a/sa/b"
    async with aiohttp.ClientSession() as s:
        rsp = await webhook.admit(s, pod)
    assert rsp["allowed"] is True
    assert any('trust domain "other.org"' in w for w in rsp["warnings"])


@pytest.mark.parametrize(
    ("body", "fragment"),
    [
        (b"not json", "the body is not JSON"),
        (b"[]", "the body is a JSON list"),
        (b'"x"', "the body is a JSON str"),
        ({"kind": "Foo"}, "kind must be AdmissionReview, not 'Foo'"),
        ({**review({}), "kind": "Pod"}, "kind must be AdmissionReview, not 'Pod'"),
        ({**review({}), "apiVersion": "v1"}, "apiVersion must be admission.k8s.io/v1"),
        ({"apiVersion": "admission.k8s.io/v1", "kind": "AdmissionReview"}, "request is missing"),
        ({**review({}), "request": {**review({})["request"], "uid": ""}}, "request.uid is missing"),
        ({**review({}), "request": {**review({})["request"], "userInfo": None}}, "userInfo"),
        ({**review({}), "request": {**review({})["request"], "resource": "pods"}}, "resource"),
        ({**review({}), "request": {**review({})["request"], "operation": "GET"}}, "operation"),
        (review(None), "request.object and request.oldObject are both missing"),
        (review("a pod"), "request.object is a JSON str, not an object"),
        (review(["a", "pod"]), "request.object is a JSON list"),
    ],
)
async def test_malformed_reviews_get_400_and_the_server_keeps_serving(
    webhook: Webhook, body: Any, fragment: str
) -> None:
    async with aiohttp.ClientSession() as s:
        status, answer = await webhook.post(s, body)
        assert status == 400, answer
        assert answer["reason"] == "BadRequest"
        assert fragment in answer["message"]
        assert (await webhook.admit(s, load("job")))["allowed"] is True


async def test_a_pod_object_that_is_not_a_pod_is_denied_with_400(webhook: Webhook) -> None:
    async with aiohttp.ClientSession() as s:
        rsp = await webhook.admit(s, {"metadata": {"annotations": {"kubemtls.io/inject": "true"}}})
    assert rsp["allowed"] is False
    assert rsp["status"]["code"] == 400
    assert "does not carry a pod" in rsp["status"]["message"]


async def test_pods_created_through_the_api_server_are_injected(webhook: Webhook, api: Any) -> None:
    pod = load("deployment-explicit")
    created = await api.post("/api/v1/namespaces/billing/pods", pod)
    assert created["metadata"]["name"].startswith("billing-api-7d9c8b6f5-")
    assert [c["name"] for c in created["spec"]["initContainers"]] == ["kubemtls-sidecar"]
    assert created["metadata"]["annotations"]["kubemtls.io/injected"] == "true"
    stored = await api.get(f"/api/v1/namespaces/billing/pods/{created['metadata']['name']}")
    assert stored["spec"] == created["spec"]
    plain = {"apiVersion": "v1", "kind": "Pod", "metadata": {"name": "plain"},
             "spec": {"containers": [{"name": "a", "image": "a:1"}]}}  # fmt: skip
    stored = await api.post("/api/v1/namespaces/billing/pods", plain)
    assert stored["spec"] == plain["spec"]
    assert "kubemtls.io/injected" not in (stored["metadata"].get("annotations") or {})


async def test_pods_with_bad_annotations_are_refused_by_the_api_server(
    webhook: Webhook, api: Any
) -> None:
    pod = load("existing-init-volumes")
    pod["metadata"]["annotations"]["kubemtls.io/dns-names"] = "api.payments.svc"
    async with api.session.post(f"{api.url}/api/v1/namespaces/claims/pods", json=pod) as r:
        assert r.status == 422
        status = await r.json()
    assert status["kind"] == "Status"
    assert status["message"].startswith(
        f'admission webhook "inject.{WEBHOOK_CONFIG}" denied the request: '
        "kubemtls.io annotations are not valid:"
    )
    assert '"api.payments.svc" is a name of namespace "payments"' in status["message"]
    assert await api.get_or_none("/api/v1/namespaces/claims/pods/claims-worker") is None


def test_a_patch_offered_outside_our_server_is_refused() -> None:
    """The handler then falls back to kopf's patch.fns (test_injection checks that path)."""
    assert admissionserver.offer_json_patch([{"op": "add", "path": "/x", "value": 1}]) is False


def test_envelope_check_accepts_a_real_review() -> None:
    assert admissionserver.envelope_problem(review(load("job"))) is None
    v1beta1 = {**review(load("job")), "apiVersion": "admission.k8s.io/v1beta1"}
    assert admissionserver.envelope_problem(v1beta1) is None


async def test_the_whole_operator_injects_pods_created_through_the_api(
    start_operator: Any, api: Any
) -> None:
    """The operator process as shipped (handlers package, lifecycle, its serving cert)."""
    await start_operator(webhook_managed="true", webhook_config="kubemtls-injector-full")
    await _registered(api, "kubemtls-injector-full")
    created = await api.post("/api/v1/namespaces/reports/pods", load("job"))
    assert created["spec"]["initContainers"][0]["name"] == "kubemtls-sidecar"
    signer = {e["name"]: e.get("value") for e in created["spec"]["initContainers"][0]["env"]}
    assert signer["KUBEMTLS_SIGNER"].startswith("https://127.0.0.1:")
    pod = load("job")
    pod["metadata"]["annotations"]["kubemtls.io/mode"] = "sidecar"
    async with api.session.post(f"{api.url}/api/v1/namespaces/reports/pods", json=pod) as r:
        assert r.status == 422
        assert 'kubemtls.io/mode: "sidecar" — unknown value' in (await r.json())["message"]


async def test_the_namespace_comes_from_the_request_path(webhook: Webhook, api: Any) -> None:
    """kube-apiserver sets metadata.namespace from the URL before admission."""
    pod = load("existing-init-volumes")
    del pod["metadata"]["namespace"]
    created = await api.post("/api/v1/namespaces/claims/pods", pod)
    assert created["metadata"]["namespace"] == "claims"
    assert created["spec"]["initContainers"][0]["name"] == "kubemtls-sidecar"
