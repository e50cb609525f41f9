"""Two operator replicas with kopf peering (DESIGN.md: "Two or more operator replicas").

Two real ``kubemtls-operator`` processes, started at the same moment against one emulated
API server that serves kopf's peering resources (the chart's CRD file): both answer the
signing API and the webhook; the CA is bootstrapped once; an opted-in pod gets one
MTLSCert; a revocation lands once in the CRL; and when the replica running the handlers
stops, the other one takes over.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import pathlib
import re
import signal
import ssl
import sys
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import operatorkit
import pytest
from cryptography import x509
from kubemtls_sidecar import certs, contract
from operatorkit import MTLSCERTS, NAMESPACE, Api, _until, make_csr, sign
from testkit import CRD_FILE, REPO, free_port

PEERINGS = REPO / "charts" / "kubemtls" / "crds" / "kopfpeerings.yaml"
PEERING = "kubemtls"
EVENTS = f"/api/v1/namespaces/{NAMESPACE}/events"


class Replica:
    """One ``kubemtls-operator`` process with its own ports and log file."""

    def __init__(self, name: str, kubeconfig: pathlib.Path, log: pathlib.Path) -> None:
        self.name = name
        self.log = log
        self.ports = {n: free_port() for n in operatorkit.PORT_SETTINGS}
        settings = operatorkit.operator_env(self.ports, peering=PEERING)
        self.env = {
            **{k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_")},
            "KUBECONFIG": str(kubeconfig),
            **{contract.OPERATOR_ENV_PREFIX + k: v for k, v in settings.items()},
        }
        self.proc: asyncio.subprocess.Process | None = None

    @property
    def signer(self) -> Any:
        return _Handle(f"https://127.0.0.1:{self.ports['SIGNER_PORT']}")

    async def start(self) -> None:
        with self.log.open("wb") as out:
            self.proc = await asyncio.create_subprocess_exec(
                sys.executable,
                "-m",
                "kubemtls_operator",
                env=self.env,
                stdout=out,
                stderr=asyncio.subprocess.STDOUT,
            )

    async def ready(self, session: aiohttp.ClientSession) -> bool:
        assert self.proc is not None
        if self.proc.returncode is not None:
            raise AssertionError(f"{self.name} exited: {self.log.read_text()[-2000:]}")
        try:
            url = f"http://127.0.0.1:{self.ports['HEALTH_PORT']}/healthz"
            async with session.get(url) as r:
                return bool((await r.json()).get("ca") == "ok")
        except aiohttp.ClientConnectionError:
            return False

    async def stop(self) -> None:
        if self.proc is not None and self.proc.returncode is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self.proc.wait(), 15)
            except TimeoutError:
                self.proc.kill()
                await self.proc.wait()

    def priority(self) -> int | None:
        """The kopf peering priority this replica logged at start."""
        found = re.search(
            r"peering '[^']+' with priority (\d+)", self.log.read_text(errors="replace")
        )
        return int(found.group(1)) if found else None


class _Handle:
    """What ``operatorkit.sign`` needs of an operator: its signing URL."""

    def __init__(self, url: str) -> None:
        self.signer_url = url


@pytest.fixture
async def cluster(tmp_path: pathlib.Path) -> AsyncIterator[tuple[Api, list[Replica]]]:
    from kubemtls_operator.emu import runtime

    async with (
        runtime.serve(crd_files=[str(CRD_FILE), str(PEERINGS)]) as k8s,
        aiohttp.ClientSession() as session,
    ):
        kubeconfig = tmp_path / "kubeconfig"
        k8s.write_kubeconfig(kubeconfig)
        api = Api(k8s.url, session)
        peering = {
            "apiVersion": "kopf.dev/v1",
            "kind": "ClusterKopfPeering",
            "metadata": {"name": PEERING},
        }
        await api.post("/apis/kopf.dev/v1/clusterkopfpeerings", peering)
        replicas = [Replica(n, kubeconfig, tmp_path / f"{n}.log") for n in ("a", "b")]
        try:
            await asyncio.gather(*(r.start() for r in replicas))  # at the same moment
            yield api, replicas
        finally:
            await asyncio.gather(*(r.stop() for r in replicas))


def _review(pod: dict[str, Any]) -> dict[str, Any]:
    return {
        "apiVersion": "admission.k8s.io/v1",
        "kind": "AdmissionReview",
        "request": {
            "uid": "0b5e-review",
            "kind": {"group": "", "version": "v1", "kind": "Pod"},
            "resource": {"group": "", "version": "v1", "resource": "pods"},
            "operation": "CREATE",
            "namespace": "default",
            "object": pod,
            "userInfo": {"username": "tester"},
        },
    }


async def _admit(replica: Replica, bundle: str, pod: dict[str, Any]) -> dict[str, Any]:
    ctx = ssl.create_default_context(cadata=bundle)
    url = f"https://127.0.0.1:{replica.ports['WEBHOOK_PORT']}/{contract.WEBHOOK_HANDLER_ID}"
    async with aiohttp.ClientSession() as s, s.post(url, json=_review(pod), ssl=ctx) as r:
        assert r.status == 200, await r.text()
        return dict((await r.json())["response"])


def _issuer_key(chain: str) -> bytes:
    leaf = x509.load_pem_x509_certificates(chain.encode())[0]
    aki = leaf.extensions.get_extension_for_class(x509.AuthorityKeyIdentifier).value
    assert aki.key_identifier is not None
    return aki.key_identifier


async def test_two_replicas_share_one_ca_and_one_set_of_handlers(
    cluster: tuple[Api, list[Replica]],
) -> None:
    api, (a, b) = cluster
    for r in (a, b):
        await _until(lambda r=r: r.ready(api.session), timeout=30)
    # One CA: bootstrapped once, the same in both replicas.
    events = (await api.get(EVENTS))["items"]
    assert [e["reason"] for e in events].count("CABootstrapped") == 1
    secret = await api.get(f"/api/v1/namespaces/{NAMESPACE}/secrets/kubemtls-ca")
    ca_cert = x509.load_pem_x509_certificates(base64.b64decode(secret["data"]["tls.crt"]))[0]

    # An opted-in pod: exactly one MTLSCert, whichever replica runs the handlers.
    await api.create_pod("app-0")
    bundle = (await _until(lambda: api.trust(), timeout=15))["data"]["ca.crt"]
    assert {
        certs.fingerprint_sha256(c) for c in x509.load_pem_x509_certificates(bundle.encode())
    } == {certs.fingerprint_sha256(ca_cert)}
    await _until(lambda: api.mtlscert("app-0"), timeout=15)
    items = (await api.get(f"{MTLSCERTS}/namespaces/default/mtlscerts"))["items"]
    assert [i["metadata"]["name"] for i in items] == ["app-0"]

    # Both answer the signing API (same CA) and the webhook.
    token = await api.token_for("app-0")
    chains = []
    for r in (a, b):
        code, body = await sign(r.signer, bundle, token, {"csr": make_csr()[1]})
        assert code == 200, body
        chains.append(body["certificateChain"])
        pod = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": "web", "annotations": {contract.ANN_INJECT: "true"}},
            "spec": {"containers": [{"name": "app", "image": "app:1"}]},
        }
        answer = await _admit(r, bundle, pod)
        assert answer["allowed"] is True
        assert contract.SIDECAR_CONTAINER_NAME in base64.b64decode(answer["patch"]).decode()
    assert {_issuer_key(c) for c in chains} == {
        ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier).value.digest
    }

    # A revocation is applied once: one entry in the state, one in the CRL.
    async def recorded(serial: str) -> Any:
        cert = await api.mtlscert("app-0")
        return cert if (cert.get("status") or {}).get("serial") == serial else None

    serial = f"{x509.load_pem_x509_certificates(chains[1].encode())[0].serial_number:x}"
    await _until(lambda: recorded(serial))
    path = f"{MTLSCERTS}/namespaces/default/mtlscerts/app-0"
    await api.patch(path, {"metadata": {"annotations": {contract.ANN_REVOKE: "keyCompromise"}}})

    async def revoked() -> Any:
        crl_pem = (await api.trust())["data"]["crl.pem"]
        crl = x509.load_pem_x509_crl(crl_pem.encode())
        return crl if crl.get_revoked_certificate_by_serial_number(int(serial, 16)) else None

    crl = await _until(revoked, timeout=15)
    assert len(list(crl)) == 1
    state_cm = f"/api/v1/namespaces/{NAMESPACE}/configmaps/{contract.STATE_CONFIGMAP}"
    state = json.loads((await api.get(state_cm))["data"]["state.json"])
    assert [r["serial"] for r in state["revocations"]] == [serial]

    async def in_status() -> Any:
        st = (await api.mtlscert("app-0"))["status"]
        return st if st.get("phase") == "Revoked" else None

    status = await _until(in_status)
    assert [r["serial"] for r in status["revocations"]] == [serial]

    # The replica running the handlers stops: the other takes over.
    # (kopf runs handlers on the replica with the highest priority; the other is paused.)
    priorities = {a.priority(): a, b.priority(): b}
    assert None not in priorities
    assert len(priorities) == 2
    active = priorities[max(p for p in priorities if p is not None)]
    await active.stop()
    await api.create_pod("app-1")
    await _until(lambda: api.mtlscert("app-1"), timeout=20)
