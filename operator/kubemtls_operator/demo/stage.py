"""The demo's stage: everything the scenes run on, brought up in order and torn down always.

``Stage`` owns every resource the demo creates — temp directory, network namespaces and
their ``/etc/netns`` entries, the bridge, the API server and operator processes, the EHR's
threads, the pods' processes, mount points — and ``close()`` removes all of it, also after a
failure half-way or a Ctrl-C, and reports anything it could not remove.
"""

from __future__ import annotations

import datetime
import json
import logging
import os
import pathlib
import secrets
import shutil
import subprocess
import tempfile
from importlib import resources
from typing import Any

import yaml
from kubemtls_sidecar import contract

from kubemtls_operator import pki
from kubemtls_operator.demo import cluster, ehr, kubeapi, netns, pods

__all__ = ["EHR_HOST", "NAMESPACE", "Stage", "live_processes", "manifest"]

EHR_HOST = "fhir.ehr.example.org"
NAMESPACE = "clinic"
PARTNER_CA_CONFIGMAP = "ehr-partner-ca"
#: How often the EHR fetches the cluster's CRL by itself. Relying parties cache CRLs (often
#: for hours); a sidecar learns of its own revocation from the operator within 30 s.
EHR_CRL_REFRESH = 60.0
JSON = dict[str, Any]


def manifest(name: str) -> list[JSON]:
    """The YAML documents of a shipped manifest (``demo/manifests/<name>.yaml``)."""
    text = (resources.files("kubemtls_operator.demo") / "manifests" / f"{name}.yaml").read_text()
    return [d for d in yaml.safe_load_all(text) if d]


def live_processes(groups: list[int]) -> list[int]:
    """PIDs of processes still alive in any of these process groups."""
    alive = []
    for entry in pathlib.Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                if os.getpgid(int(entry.name)) in groups:
                    alive.append(int(entry.name))
            except ProcessLookupError:
                continue
    return alive


_COLLECTIONS = {
    "Namespace": "/api/v1/namespaces",
    "ServiceAccount": "/api/v1/namespaces/{ns}/serviceaccounts",
    "ConfigMap": "/api/v1/namespaces/{ns}/configmaps",
    "Pod": "/api/v1/namespaces/{ns}/pods",
}


class Stage:
    """Bring the parts up one by one (each method is one demo step); ``close()`` always."""

    def __init__(self, *, use_netns: bool, workdir: pathlib.Path | None) -> None:
        self.run_id = secrets.token_hex(2)
        self.own_workdir = workdir is None
        self.workdir = workdir or pathlib.Path(tempfile.mkdtemp(prefix="kubemtls-demo-"))
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.use_netns = use_netns
        self.net: netns.Network | None = None
        self.host_ip = "127.0.0.1"
        self.cluster = cluster.Cluster(self.workdir)
        self.ehr: ehr.MockEHR | None = None
        self.partner_ca: pki.CA | None = None
        self.pods: dict[str, pods.PodRunner] = {}
        self.applied: dict[str, JSON] = {}  # pod name -> the pod as the API stored it
        self.notes: dict[str, Any] = {}  # what scenes share (e.g. the file-based identity)
        self.extra: dict[str, subprocess.Popen[bytes]] = {}
        self._log_handler: logging.Handler | None = None

    @property
    def api(self) -> kubeapi.KubeAPI:
        return self.cluster.api

    # --- bring-up ---------------------------------------------------------------------------

    def up_network(self) -> None:
        if self.use_netns:
            self.net = netns.Network(self.run_id, hosts={EHR_HOST: ""})
            self.net.create()
            self.host_ip = self.net.host_ip

    def up_control_plane(self) -> None:
        self.cluster.start_api()
        for name in (cluster.OPERATOR_NAMESPACE,):
            self.apply_object({"apiVersion": "v1", "kind": "Namespace", "metadata": {"name": name}})
        bind = "0.0.0.0" if self.net else "127.0.0.1"  # noqa: S104 (pods reach the bridge IP)
        self.cluster.start_operator(
            cluster.OperatorSettings(host_ip=self.host_ip, bind_address=bind)
        )
        self.cluster.wait_operator()

    def up_ehr(self) -> None:
        """Start the EHR with a serving cert from its own partner CA (not the cluster's)."""
        now = datetime.datetime.now(datetime.UTC)
        self.partner_ca = pki.bootstrap_ca(now=now, common_name="EHR partner CA (demo)")
        cert, key = pki.issue_serving_cert(
            self.partner_ca, dns_names=(EHR_HOST,), ip_addresses=(self.host_ip,), now=now
        )
        d = self.workdir / "ehr"
        d.mkdir(exist_ok=True)
        (d / "tls.crt").write_bytes(pki.cert_pem(cert))
        (d / "tls.key").touch(0o600)
        (d / "tls.key").write_bytes(pki.key_pem(key))
        (d / "partner-ca.crt").write_bytes(pki.cert_pem(self.partner_ca.cert))
        handler = logging.FileHandler(self.workdir / "logs" / "ehr.log")
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s"))
        ehr.logger.addHandler(handler)
        ehr.logger.setLevel(logging.INFO)
        self._log_handler = handler
        port = 443 if self.net else pods.free_port()
        self.ehr = ehr.MockEHR(
            host=self.host_ip, port=port, cert_file=d / "tls.crt", key_file=d / "tls.key",
            trust=self.trust_pem, crl_refresh=EHR_CRL_REFRESH,
        )  # fmt: skip
        self.ehr.start()

    def trust_pem(self) -> tuple[bytes, bytes] | None:
        """The clinic namespace's trust ConfigMap (ca.crt, crl.pem), once published."""
        cm = self.api.get_or_none(kubeapi.configmap_path(NAMESPACE, contract.TRUST_CONFIGMAP))
        data = (cm or {}).get("data") or {}
        if not data.get(contract.TRUST_CA_FILE):
            return None
        ca = str(data[contract.TRUST_CA_FILE]).encode()
        return ca, str(data.get(contract.TRUST_CRL_FILE, "")).encode()

    def apply_object(self, obj: JSON) -> JSON:
        """``kubectl apply`` of a new object: POST it (409 → read the existing one)."""
        ns = obj.get("metadata", {}).get("namespace", "")
        path = _COLLECTIONS[obj["kind"]].format(ns=ns)
        try:
            return self.api.create(path, obj)
        except kubeapi.APIError as e:
            if e.status != 409:
                raise
            return self.api.get(f"{path}/{obj['metadata']['name']}")

    def apply(self, name: str) -> list[JSON]:
        return [self.apply_object(doc) for doc in manifest(name)]

    def apply_partner_ca(self) -> None:
        assert self.partner_ca is not None
        self.apply_object({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": PARTNER_CA_CONFIGMAP, "namespace": NAMESPACE},
            "data": {"ca.crt": pki.cert_pem(self.partner_ca.cert).decode()},
        })  # fmt: skip

    def run_pod(self, pod: JSON) -> pods.PodRunner:
        """Run the pod as stored (webhook-patched), in its own namespace when possible."""
        name = str(pod["metadata"]["name"])
        net = self.net.add_pod(name) if self.net else None
        remap = None if net else self.loopback_remap(pod)
        runner = pods.PodRunner(self.api, pod, self.workdir, net=net, remap=remap)
        self.pods[name] = runner
        runner.start()
        return runner

    def loopback_remap(self, pod: JSON) -> pods.Remap:
        """Without namespaces: pod ports → free loopback ports, the EHR → its local port."""
        remap = pods.Remap()
        ports = {contract.ADMIN_PORT, contract.OUTBOUND_CAPTURE_PORT, contract.INBOUND_CAPTURE_PORT}
        containers = [*pod["spec"].get("initContainers", []), *pod["spec"]["containers"]]
        for c in containers:
            for item in c.get("env", []):
                if item["name"] in (
                    contract.env_name("--inbound"),
                    contract.env_name("--outbound"),
                ):
                    for entry in str(item.get("value", "")).split(","):
                        local = entry.split("=", 1)[0] if "=" in entry else entry
                        ports.update(int(p) for p in local.split(":") if p.isdigit())
            for mount in c.get("volumeMounts", []):
                host_dir = self.workdir / "pods" / pod["metadata"]["name"] / "volumes"
                remap.paths[mount["mountPath"]] = str(host_dir / mount["name"])
        remap.ports = {p: pods.free_port() for p in sorted(ports)}
        assert self.ehr is not None
        remap.upstreams = {f"{EHR_HOST}:443": f"127.0.0.1:{self.ehr.port}"}
        return remap

    def in_pod(self, pod: str | None, argv: list[str], timeout: float = 20.0) -> JSON:
        """Run a one-shot command in a pod's network namespace; its last JSON line."""
        prefix = self.net.pods[pod].exec_prefix() if (self.net and pod) else []
        proc = subprocess.run(
            [*prefix, *argv], capture_output=True, text=True, timeout=timeout, check=False
        )
        for line in reversed(proc.stdout.splitlines()):
            if line.startswith("{"):
                return dict(json.loads(line))
        return {"ok": False, "error": (proc.stderr or proc.stdout).strip()[-300:]}

    def spawn(self, name: str, argv: list[str], env: dict[str, str], pod: str | None) -> None:
        """Start a helper process (e.g. the file-based sidecar) that close() will stop."""
        prefix = self.net.pods[pod].exec_prefix() if (self.net and pod) else []
        log = self.workdir / "logs" / f"{name}.log"
        with log.open("ab") as out:
            self.extra[name] = subprocess.Popen(
                [*prefix, *argv], env=env, stdout=out, stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL, start_new_session=True,
            )  # fmt: skip

    def pids(self) -> list[int]:
        """Every process this stage started (each leads its own process group)."""
        procs = [*self.cluster.procs.values(), *self.extra.values()]
        procs += [c.proc for r in self.pods.values() for c in r.containers.values()]
        return [p.pid for p in procs]

    # --- teardown ---------------------------------------------------------------------------

    def save_logs(self) -> pathlib.Path | None:
        """Copy ``logs/`` (no keys live there) out of a workdir that close() will remove.

        For a failed run in a temporary workdir (the end-to-end test): the sidecars' logs
        are what explains a failed request.
        """
        try:
            kept = pathlib.Path(tempfile.mkdtemp(prefix=f"kubemtls-demo-logs-{self.run_id}-"))
            shutil.copytree(self.workdir / "logs", kept, dirs_exist_ok=True)
        except OSError:
            return None
        return kept

    def close(self, keep_workdir: bool = False) -> list[str]:
        """Stop and remove everything; return what could not be removed."""
        problems: list[str] = []
        for proc in self.extra.values():
            pods.kill_group(proc)
        for runner in reversed(list(self.pods.values())):
            try:
                runner.stop()
            except Exception as e:
                problems.append(f"pod {runner.name}: {e}")
        if self.ehr is not None:
            self.ehr.stop()
        if self._log_handler is not None:
            ehr.logger.removeHandler(self._log_handler)
            self._log_handler.close()
        self.cluster.stop()
        if self.net is not None:
            problems += self.net.destroy()
        if self.own_workdir and not keep_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return problems
