"""The demo's file-based identity: batch-export's certificate in ``tls.crt`` / ``tls.key``.

Some clients cannot run a sidecar that re-keys — a VM, a legacy job — and hold a certificate
in files instead. The demo makes one the way an administrator would: it asks the signing API
once with the batch-export pod's own bound token (so the operator records the serial in that
pod's MTLSCert and can revoke it), writes the files, and then uses them twice: as a mesh
client of peer-api (``mesh_get``) and behind ``kubemtls-sidecar --cert-dir`` towards the EHR
(``start_sidecar``). The key lives in a file here because that is what a file-based identity
is; the pods' own keys never leave their sidecars.
"""

from __future__ import annotations

import dataclasses
import http.client
import json
import pathlib
import re
import ssl
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Callable
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.x509.oid import NameOID
from kubemtls_sidecar import certs, contract

from kubemtls_operator import pki
from kubemtls_operator.demo import kubeapi, pods, stage

__all__ = ["FileIdentity", "alert_name", "issue", "mesh_get", "start_sidecar"]

POD = "batch-export"
JSON = dict[str, Any]


@dataclasses.dataclass(frozen=True)
class FileIdentity:
    directory: pathlib.Path
    serial: str
    spiffe_id: str

    @property
    def cert_dir(self) -> pathlib.Path:
        return self.directory / "certs"

    @property
    def trust_dir(self) -> pathlib.Path:
        return self.directory / "trust"


def issue(st: stage.Stage) -> FileIdentity:
    """batch-export's certificate from the signing API, written to files (once per run)."""
    cached = st.notes.get("file-identity")
    if isinstance(cached, FileIdentity):
        return cached
    pod = st.api.get(kubeapi.pod_path(stage.NAMESPACE, POD))
    ref = {"apiVersion": "v1", "kind": "Pod", "name": POD, "uid": pod["metadata"]["uid"]}
    body = {"spec": {"audiences": [contract.TOKEN_AUDIENCE], "expirationSeconds": 600,
                     "boundObjectRef": ref}}  # fmt: skip
    sa_path = f"/api/v1/namespaces/{stage.NAMESPACE}/serviceaccounts/{POD}/token"
    token = st.api.create(sa_path, body)["status"]["token"]
    key = pki.generate_key("ecdsa-p256")
    csr = (
        x509.CertificateSigningRequestBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, POD)]))
        .sign(key, hashes.SHA256())
    )
    req = urllib.request.Request(  # noqa: S310 (the operator's signing API)
        st.cluster.signer_url + "/v1/certificates", method="POST",
        data=json.dumps({"csr": csr.public_bytes(serialization.Encoding.PEM).decode()}).encode(),
        headers={"Authorization": f"Bearer {token}", "Content-Type": "application/json"},
    )  # fmt: skip
    ctx = ssl.create_default_context(cadata=(st.cluster.ca_pem() or b"").decode())
    with urllib.request.urlopen(req, context=ctx, timeout=10) as rsp:  # noqa: S310
        issued = json.loads(rsp.read())
    d = st.workdir / POD
    (d / "certs").mkdir(parents=True, exist_ok=True)
    (d / "trust").mkdir(exist_ok=True)
    (d / "certs" / "tls.crt").write_text(issued["certificateChain"])
    (d / "certs" / "tls.key").touch(0o600)
    (d / "certs" / "tls.key").write_bytes(pki.key_pem(key))
    (d / "trust" / "ca.crt").write_text(issued["trustBundle"])
    (d / "trust" / "crl.pem").write_text(issued.get("crl", ""))
    facts = certs.facts(certs.load_pem_certificates(issued["certificateChain"].encode())[0])
    ident = FileIdentity(d, facts.serial, facts.spiffe_id or "")
    st.notes["file-identity"] = ident
    return ident


def mesh_get(st: stage.Stage, ident: FileIdentity | None, url: str) -> JSON:
    """One HTTPS GET to a pod's inbound port as a mesh client (or with no certificate).

    The server is checked the way the mesh does it: its chain to the cluster CA, and its
    SPIFFE ID (returned as ``server``; pods have no DNS name to check a hostname against).
    """
    ctx = ssl.create_default_context(cafile=str(_trust_file(st)))
    ctx.check_hostname = False  # the caller checks the SPIFFE ID instead
    if ident is not None:
        ctx.load_cert_chain(ident.cert_dir / "tls.crt", ident.cert_dir / "tls.key")
    parts = urllib.parse.urlsplit(url)
    conn = http.client.HTTPSConnection(parts.hostname or "", parts.port, context=ctx, timeout=10)
    try:
        conn.connect()
        assert isinstance(conn.sock, ssl.SSLSocket)
        sans: Any = (conn.sock.getpeercert() or {}).get("subjectAltName", ())
        server = next((str(v) for k, v in sans if k == "URI"), "")
        conn.request("GET", parts.path or "/")
        rsp = conn.getresponse()
        return {"ok": True, "status": rsp.status, "server": server, "body": json.loads(rsp.read())}
    except (ssl.SSLError, OSError, ValueError) as e:
        return {"ok": False, "error": str(e), "alert": alert_name(str(e))}
    finally:
        conn.close()


def alert_name(error: str) -> str:
    """``... TLSV13_ALERT_CERTIFICATE_REQUIRED ...`` → ``certificate_required``."""
    match = re.search(r"ALERT_([A-Z_]+)", error)
    return match.group(1).lower() if match else ""


def _trust_file(st: stage.Stage) -> pathlib.Path:
    path = st.workdir / "cluster-ca.crt"
    path.write_bytes(st.cluster.ca_pem() or b"")
    return path


def start_sidecar(st: stage.Stage, ident: FileIdentity) -> tuple[str, Callable[[], JSON]]:
    """Run ``kubemtls-sidecar --cert-dir`` towards the EHR; return (serial, one GET through it).

    In its own network namespace when the demo has them (like a VM outside the cluster).
    """
    assert st.ehr is not None
    net = st.net.add_pod(POD) if st.net else None
    local = 15001 if net else pods.free_port()
    admin = contract.ADMIN_PORT if net else pods.free_port()
    upstream = f"{stage.EHR_HOST}:443" if net else f"127.0.0.1:{st.ehr.port}"
    bindir = pathlib.Path(sys.executable).parent
    argv = [str(bindir / "kubemtls-sidecar"), "--cert-dir", str(ident.cert_dir),
            "--trust-dir", str(ident.trust_dir), "--outbound", f"{local}={upstream}",
            "--admin-port", str(admin), "--upstream-ca", str(st.workdir / "ehr" / "partner-ca.crt"),
            "--reload-interval", "1", "--log-format", "text"]  # fmt: skip
    env = {"PATH": f"{bindir}:/usr/bin:/bin", "HOME": "/tmp", "PYTHONUNBUFFERED": "1"}  # noqa: S108
    st.spawn(f"{POD}-sidecar", argv, env, POD if net else None)
    readyz = f"http://{net.ip if net else '127.0.0.1'}:{admin}/readyz"
    deadline = time.monotonic() + 15
    while not _http_ok(readyz):
        if time.monotonic() > deadline:
            raise RuntimeError("the file-based sidecar did not become ready; see "
                               f"{st.workdir / 'logs' / f'{POD}-sidecar.log'}")  # fmt: skip
        time.sleep(0.2)
    url = f"http://127.0.0.1:{local}/fhir/Patient/123"
    cmd = [sys.executable, "-m", "kubemtls_operator.demo.apps", "get", url]
    return ident.serial, lambda: st.in_pod(POD if net else None, cmd)


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=1) as rsp:  # noqa: S310
            return bool(rsp.status < 400)
    except OSError:
        return False
