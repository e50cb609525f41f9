"""Helpers for the operator's tests (importable as ``operatorkit``): API client, handles.

The fixtures are in ``tests/operator/conftest.py``. The operator under test: real kopf
(KopfRunner) against the emulated API over real HTTP.

Fixtures:
- ``api`` — a small HTTP client for the emulator (``get``/``post``/``patch``/``delete``,
  ``create_pod``, ``token_for``) — plain aiohttp against ``k8s.url``.
- ``start_operator`` — a factory: ``handle = await start_operator(**settings)`` starts one
  operator configured through ``KUBEMTLS_OPERATOR_<NAME>`` (keyword names are the setting
  names, any case: ``cert_duration="1h"``); ``await handle.stop()`` stops it (also done at
  teardown). ``handle.signer_url``, ``handle.webhook_port``, ``handle.metrics_url``.
- ``operator`` — one operator with the test defaults, started and waited for.

Defaults for tests: namespace ``kubemtls``, everything on 127.0.0.1 with free ports,
CHECK_INTERVAL 0.5s, WEBHOOK_MANAGED false (the injection webhook's tests turn it on).
"""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import json
import pathlib
import ssl
import subprocess
from collections.abc import Awaitable, Callable
from typing import Any

import aiohttp
import kopf
import pytest
import yaml
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import dsa, ec, rsa
from cryptography.x509.oid import NameOID
from kopf.testing import KopfRunner
from kubemtls_operator import injection
from kubemtls_sidecar import contract
from testkit import free_port

NAMESPACE = "kubemtls"
MTLSCERTS = f"/apis/{contract.CRD_GROUP}/{contract.CRD_VERSION}"

# The webhook's golden pods (``tests/operator/data/<case>.pod.yaml``) and the settings each
# one is injected with (test_injection's golden patches, test_podpatch's properties).
GOLDEN = pathlib.Path(__file__).parent / "operator" / "data"
INJECTION = injection.InjectionSettings(
    sidecar_image="ghcr.io/kubemtls/kubemtls:0.1.0",
    sidecar_resources={"requests": {"cpu": "20m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
    signer_url="https://kubemtls.kubemtls.svc:9444",
)
INJECTION_LEGACY = dataclasses.replace(INJECTION, native_sidecar=False)
GOLDEN_CASES = {
    "deployment-explicit": INJECTION,
    "existing-init-volumes": INJECTION,
    "transparent-probes": INJECTION,
    "job": INJECTION,
    "legacy-explicit": INJECTION_LEGACY,
}


def golden_pod(case: str) -> dict[str, Any]:
    """The input pod of a golden case."""
    pod: dict[str, Any] = yaml.safe_load((GOLDEN / f"{case}.pod.yaml").read_text())
    return pod


@dataclasses.dataclass
class Api:
    """Plain HTTP against the emulated API server (what kubectl would do)."""

    url: str
    session: aiohttp.ClientSession

    async def request(self, method: str, path: str, body: Any = None, ctype: str = "") -> Any:
        headers = {"Content-Type": ctype or "application/json"} if body is not None else {}
        async with self.session.request(method, self.url + path, json=body, headers=headers) as r:
            data = await r.json(content_type=None)
            if r.status >= 400:
                raise AssertionError(f"{method} {path} -> {r.status}: {data}")
            return data

    async def get(self, path: str) -> Any:
        return await self.request("GET", path)

    async def get_or_none(self, path: str) -> Any:
        async with self.session.get(self.url + path) as r:
            return await r.json() if r.status == 200 else None

    async def post(self, path: str, body: Any) -> Any:
        return await self.request("POST", path, body)

    async def patch(self, path: str, body: Any) -> Any:
        return await self.request("PATCH", path, body, "application/merge-patch+json")

    async def delete(self, path: str) -> Any:
        return await self.request("DELETE", path)

    async def create_pod(
        self,
        name: str,
        namespace: str = "default",
        *,
        annotations: dict[str, str] | None = None,
        labels: dict[str, str] | None = None,
        sidecar: bool = True,
        service_account: str = "app",
        **spec: Any,
    ) -> dict[str, Any]:
        """A pod that opted in (unless told otherwise), with a sidecar-named container."""
        containers = [{"name": "app", "image": "app:1"}]
        if sidecar:
            containers.append({"name": contract.SIDECAR_CONTAINER_NAME, "image": "kubemtls:0"})
        anns = {contract.ANN_INJECT: "true"} if annotations is None else annotations
        body = {
            "apiVersion": "v1",
            "kind": "Pod",
            "metadata": {"name": name, "annotations": anns, "labels": labels or {}},
            "spec": {"serviceAccountName": service_account, "containers": containers, **spec},
        }
        pod: dict[str, Any] = await self.post(f"/api/v1/namespaces/{namespace}/pods", body)
        return pod

    async def token_for(
        self, pod: str, namespace: str = "default", sa: str = "app", audience: str = "kubemtls"
    ) -> str:
        """A bound, projected-style token (TokenRequest), as kubelet would mount it."""
        body = {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "spec": {
                "audiences": [audience],
                "expirationSeconds": 3600,
                "boundObjectRef": {"kind": "Pod", "apiVersion": "v1", "name": pod},
            },
        }
        rsp = await self.post(f"/api/v1/namespaces/{namespace}/serviceaccounts/{sa}/token", body)
        return str(rsp["status"]["token"])

    async def mtlscert(self, name: str, namespace: str = "default") -> Any:
        return await self.get_or_none(f"{MTLSCERTS}/namespaces/{namespace}/mtlscerts/{name}")

    async def trust(self, namespace: str = "default") -> Any:
        path = f"/api/v1/namespaces/{namespace}/configmaps/{contract.TRUST_CONFIGMAP}"
        return await self.get_or_none(path)

    async def events(self, namespace: str = "default") -> list[dict[str, Any]]:
        data = await self.get(f"/api/v1/namespaces/{namespace}/events")
        return list(data.get("items") or [])


def make_csr(
    key: Any = None, common_name: str = "whatever", dns: tuple[str, ...] = ()
) -> tuple[Any, str]:
    """A key and a PEM CSR (the sidecar's side), asking for whatever it likes."""
    key = key or ec.generate_private_key(ec.SECP256R1())
    builder = x509.CertificateSigningRequestBuilder().subject_name(
        x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    )
    if dns:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.DNSName(d) for d in dns]), critical=False
        )
    csr = builder.sign(key, hashes.SHA256())
    return key, csr.public_bytes(serialization.Encoding.PEM).decode()


def weak_csr() -> str:
    """A CSR over an RSA-1024 key (the signer refuses it: WeakKey)."""
    key = rsa.generate_private_key(public_exponent=65537, key_size=1024)  # noqa: S505
    return make_csr(key)[1]


def dsa_csr() -> str:
    """A CSR over a DSA key (the signer refuses it: WeakKey)."""
    return make_csr(dsa.generate_private_key(2048))[1]


def bad_body(case: str, good_csr: str) -> tuple[Any, bytes | None]:
    """The signing request body of a bad-request ``case`` (JSON body, or raw bytes when not
    None); cases about the token or the pod keep the good body."""
    body: Any = {"csr": good_csr}
    raw = None
    if case == "malformed-json":
        raw = b"{not json"
    elif case == "no-csr-field":
        body = {"certificate": good_csr}
    elif case == "not-pem":
        body = {"csr": "hello"}
    elif case == "bad-signature":
        body = {"csr": tampered_csr()}
    elif case == "weak-rsa":
        body = {"csr": weak_csr()}
    elif case == "dsa":
        body = {"csr": dsa_csr()}
    elif case == "oversized":
        raw = b'{"csr": "' + b"A" * (70 * 1024) + b'"}'
    return body, raw


def tampered_csr() -> str:
    """A CSR whose signature no longer verifies (BadSignature)."""
    _, pem = make_csr()
    csr = x509.load_pem_x509_csr(pem.encode())
    der = bytearray(csr.public_bytes(serialization.Encoding.DER))
    der[-5] ^= 0x01  # inside the signature
    b64 = base64.encodebytes(bytes(der)).decode()
    return f"-----BEGIN CERTIFICATE REQUEST-----\n{b64}-----END CERTIFICATE REQUEST-----\n"


@dataclasses.dataclass
class OperatorHandle:
    runner: KopfRunner
    env: dict[str, str]
    signer_port: int
    webhook_port: int
    metrics_port: int
    health_port: int
    stopped: bool = False

    @property
    def signer_url(self) -> str:
        return f"https://127.0.0.1:{self.signer_port}"

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    async def stop(self) -> None:
        """Stop kopf off this loop (the loop serves the emulator kopf talks to)."""
        if not self.stopped:
            self.stopped = True
            await asyncio.to_thread(self.runner.__exit__, None, None, None)


PORT_SETTINGS = ("SIGNER_PORT", "WEBHOOK_PORT", "METRICS_PORT", "HEALTH_PORT")


def operator_env(ports: dict[str, int] | None = None, **settings: Any) -> dict[str, str]:
    """The operator's settings for a test (names without the env prefix): the test defaults
    on ``ports`` (free ones when not given), then ``settings`` (setting names, any case)."""
    ports = ports if ports is not None else {n: free_port() for n in PORT_SETTINGS}
    env = {
        "NAMESPACE": NAMESPACE,
        "BIND_ADDRESS": "127.0.0.1",
        "WEBHOOK_MANAGED": "false",
        "CHECK_INTERVAL": "0.5s",
        "CA_ROLLOVER_GRACE": "1h",
        **{k: str(v) for k, v in ports.items()},
        "SIGNER_URL": f"https://127.0.0.1:{ports['SIGNER_PORT']}",
    }
    env.update({k.upper(): str(v) for k, v in settings.items()})
    return env


def use_emulator(k8s: Any, tmp: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Point kopf (``KUBECONFIG``) at the emulated API server ``k8s``."""
    kubeconfig = tmp / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))


def set_operator_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    """Apply ``env`` (from ``operator_env``) as ``KUBEMTLS_OPERATOR_<NAME>`` variables."""
    for name, value in env.items():
        monkeypatch.setenv(contract.OPERATOR_ENV_PREFIX + name, value)


def run_operator(env: dict[str, str]) -> OperatorHandle:
    """Start kopf in its thread (``env`` already applied); not waited for: see ``_wait_*``."""
    runner = KopfRunner(
        ["run", "-A", "--standalone", "-m", "kubemtls_operator.handlers"],
        settings=kopf.OperatorSettings(),
        timeout=30,
    )
    runner.__enter__()
    return OperatorHandle(runner, env, *(int(env[n]) for n in PORT_SETTINGS))


async def _listening(port: int) -> bool:
    try:
        _, w = await asyncio.open_connection("127.0.0.1", port)
    except OSError:
        return False
    w.close()
    return True


StartOperator = Callable[..., Awaitable[OperatorHandle]]


async def _wait_listening(handle: OperatorHandle, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await _listening(handle.signer_port):
        if not handle.runner._thread.is_alive():
            raise AssertionError("the operator exited at start")
        if loop.time() > deadline:
            raise AssertionError("the signing API did not start listening")
        await asyncio.sleep(0.05)


async def _wait_ca(handle: OperatorHandle, timeout: float = 20.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    async with aiohttp.ClientSession() as s:
        while True:
            try:
                async with s.get(f"http://127.0.0.1:{handle.health_port}/healthz") as r:
                    if (await r.json()).get("ca") == "ok":
                        return
            except aiohttp.ClientConnectionError:
                pass  # the health site starts just after the signing API
            if loop.time() > deadline:
                raise AssertionError("the operator did not load its CA")
            await asyncio.sleep(0.05)


def client_context(ca_pem: str) -> ssl.SSLContext:
    """What a sidecar trusts for the signing API: its namespace's ``ca.crt``.

    An empty ``ca_pem`` (no CA published yet) gives an unverified context.
    """
    if not ca_pem:
        ctx = ssl.create_default_context()
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
        return ctx
    return ssl.create_default_context(cadata=ca_pem)


async def sign(
    handle: OperatorHandle,
    ca_pem: str,
    token: str | None,
    body: Any,
    *,
    raw: bytes | None = None,
) -> tuple[int, Any]:
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as s,
        s.post(
            handle.signer_url + "/v1/certificates",
            data=data,
            headers={**headers, "Content-Type": "application/json"},
            ssl=client_context(ca_pem),
        ) as r,
    ):
        return r.status, await r.json(content_type=None)


async def trust(
    handle: OperatorHandle, ca_pem: str, token: str, etag: str = ""
) -> tuple[int, Any, str]:
    headers = {"Authorization": f"Bearer {token}"}
    if etag:
        headers["If-None-Match"] = etag
    async with (
        aiohttp.ClientSession() as s,
        s.get(handle.signer_url + "/v1/trust", headers=headers, ssl=client_context(ca_pem)) as r,
    ):
        body = await r.json(content_type=None) if r.status == 200 else None
        return r.status, body, r.headers.get("ETag", "")


async def ready_pod(api: Api, name: str, ns: str = "default", **kw: Any) -> tuple[str, str]:
    """An opted-in pod, its token, and the namespace's ca.crt once the operator published it."""
    await api.create_pod(name, ns, **kw)
    await _until(lambda: api.trust(ns))
    token = await api.token_for(name, ns, kw.get("service_account", "app"))
    return token, (await api.trust(ns))["data"][contract.TRUST_CA_FILE]


async def _until(fn: Any, timeout: float = 10.0) -> Any:
    import asyncio

    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        value = await fn()
        if value:
            return value
        if loop.time() > deadline:
            raise AssertionError(f"not met within {timeout}s")
        await asyncio.sleep(0.05)


def openssl_verify(
    tmp: pathlib.Path, bundle: str, chain: str, crl: str = ""
) -> subprocess.CompletedProcess[str]:
    (tmp / "ca.pem").write_text(bundle)
    leaf, *rest = x509.load_pem_x509_certificates(chain.encode())
    (tmp / "leaf.pem").write_bytes(leaf.public_bytes(serialization.Encoding.PEM))
    args = ["openssl", "verify", "-CAfile", str(tmp / "ca.pem")]
    if rest:
        (tmp / "untrusted.pem").write_bytes(
            b"".join(c.public_bytes(serialization.Encoding.PEM) for c in rest)
        )
        args += ["-untrusted", str(tmp / "untrusted.pem")]
    if crl:
        (tmp / "crl.pem").write_text(crl)
        args += ["-crl_check", "-CRLfile", str(tmp / "crl.pem")]
    return subprocess.run(
        [*args, str(tmp / "leaf.pem")], capture_output=True, text=True, check=False
    )


async def _issued(api: Api, name: str, ns: str = "default") -> Any:
    cert = await api.mtlscert(name, ns)
    if cert and (cert.get("status") or {}).get("phase") == "Issued":
        return cert
    return None
