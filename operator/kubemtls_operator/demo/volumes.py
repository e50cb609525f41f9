"""The kubelet's volume work for the demo's pods: projected tokens and ConfigMaps on disk.

Each volume of a pod is a host directory that the pod sees at its ``mountPath``. Contents
are written the way kubelet's AtomicWriter does (a timestamped directory, a ``..data``
symlink swapped with one rename, and ``<file> -> ..data/<file>`` links), so the sidecar
reloads exactly as it will in a cluster. Service-account tokens come from the API server's
TokenRequest (bound to the pod, with the audience and expirationSeconds the volume asks for)
and are renewed at 80% of their life, as kubelet does; ConfigMaps are re-read every
``refresh`` seconds (kubelet takes up to a minute; the demo is impatient).
"""

from __future__ import annotations

import base64
import dataclasses
import datetime
import os
import pathlib
import shutil
import time
from typing import Any

from kubemtls_operator.demo import kubeapi

__all__ = ["Volume", "atomic_write", "field_ref", "render"]

JSON = dict[str, Any]


def atomic_write(directory: pathlib.Path, files: dict[str, bytes]) -> bool:
    """Publish ``files`` in ``directory`` with a ``..data`` swap; False if nothing changed."""
    directory.mkdir(parents=True, exist_ok=True)
    current = directory / "..data"
    if current.is_symlink():
        old = directory / os.readlink(current)
        existing = {p.name: p.read_bytes() for p in old.iterdir()} if old.is_dir() else {}
        if existing == files:
            return False
    else:
        old = None
    stamp = datetime.datetime.now(datetime.UTC).strftime("..%Y_%m_%d_%H_%M_%S.%f")
    fresh = directory / stamp
    fresh.mkdir()
    for name, data in files.items():
        (fresh / name).write_bytes(data)
        (fresh / name).chmod(0o644)
    tmp = directory / "..data_tmp"
    if tmp.is_symlink():
        tmp.unlink()
    tmp.symlink_to(stamp)
    tmp.rename(current)
    for name in files:
        link = directory / name
        if not link.is_symlink():
            link.symlink_to(f"..data/{name}")
    if old is not None and old.is_dir():
        shutil.rmtree(old, ignore_errors=True)
    return True


@dataclasses.dataclass
class Volume:
    """One pod volume: where it lives on the host, and what fills it."""

    name: str
    host_dir: pathlib.Path
    spec: JSON
    token_renew_at: float = 0.0  # monotonic time of the next token renewal

    def refresh(self, api: kubeapi.KubeAPI, pod: JSON) -> bool:
        """Re-render the volume; write it if it changed. Returns whether it changed."""
        if "emptyDir" in self.spec:
            self.host_dir.mkdir(parents=True, exist_ok=True)
            self.host_dir.chmod(0o1777)  # writable whatever runAsUser the container has
            return False
        files, renew_at = render(api, pod, self.spec, token_due=self._token_due())
        if files is None:
            return False
        if renew_at:
            self.token_renew_at = renew_at
        return atomic_write(self.host_dir, files)

    def _token_due(self) -> bool:
        return time.monotonic() >= self.token_renew_at


def render(
    api: kubeapi.KubeAPI, pod: JSON, spec: JSON, *, token_due: bool = True
) -> tuple[dict[str, bytes] | None, float]:
    """The files of a configMap / secret / projected volume, and when its token renews.

    Returns ``(None, 0)`` when a token is not due and nothing else is in the volume, so the
    caller keeps the current files. A missing optional source renders as nothing.
    """
    if "configMap" in spec:
        return _configmap(api, pod, spec["configMap"]), 0.0
    if "secret" in spec:
        return _secret(api, pod, spec["secret"]), 0.0
    if "projected" not in spec:
        raise ValueError(f"the demo kubelet does not support volume {sorted(spec)}")
    files: dict[str, bytes] = {}
    renew_at = 0.0
    for source in spec["projected"].get("sources", []):
        if "serviceAccountToken" in source:
            if not token_due:
                return None, 0.0
            tsrc = source["serviceAccountToken"]
            token, life = _token(api, pod, tsrc)
            files[tsrc["path"]] = token.encode()
            renew_at = time.monotonic() + 0.8 * life
        elif "configMap" in source:
            files.update(_configmap(api, pod, source["configMap"]) or {})
        elif "secret" in source:
            files.update(_secret(api, pod, source["secret"]) or {})
        elif "downwardAPI" in source:
            for item in source["downwardAPI"].get("items", []):
                files[item["path"]] = field_ref(pod, item["fieldRef"]["fieldPath"]).encode()
    return files, renew_at


def _token(api: kubeapi.KubeAPI, pod: JSON, source: JSON) -> tuple[str, float]:
    meta = pod["metadata"]
    seconds = int(source.get("expirationSeconds", 3600))
    body = {
        "apiVersion": "authentication.k8s.io/v1",
        "kind": "TokenRequest",
        "spec": {
            "audiences": [source["audience"]] if source.get("audience") else [],
            "expirationSeconds": seconds,
            "boundObjectRef": {
                "apiVersion": "v1",
                "kind": "Pod",
                "name": meta["name"],
                "uid": meta["uid"],
            },
        },
    }
    sa = pod["spec"].get("serviceAccountName") or "default"
    answer = api.create(f"/api/v1/namespaces/{meta['namespace']}/serviceaccounts/{sa}/token", body)
    return str(answer["status"]["token"]), float(seconds)


def _items(data: dict[str, bytes], source: JSON) -> dict[str, bytes]:
    items = source.get("items")
    if not items:
        return data
    return {i["path"]: data[i["key"]] for i in items if i["key"] in data}


def _configmap(api: kubeapi.KubeAPI, pod: JSON, source: JSON) -> dict[str, bytes] | None:
    cm = api.get_or_none(kubeapi.configmap_path(pod["metadata"]["namespace"], source["name"]))
    if cm is None:
        if source.get("optional"):
            return {}
        return None  # kubelet waits for it (the pod stays ContainerCreating)
    data = {k: str(v).encode() for k, v in (cm.get("data") or {}).items()}
    data.update({k: base64.b64decode(v) for k, v in (cm.get("binaryData") or {}).items()})
    return _items(data, source)


def _secret(api: kubeapi.KubeAPI, pod: JSON, source: JSON) -> dict[str, bytes] | None:
    name = source.get("secretName") or source.get("name")
    secret = api.get_or_none(kubeapi.secret_path(pod["metadata"]["namespace"], str(name)))
    if secret is None:
        return {} if source.get("optional") else None
    data = {k: base64.b64decode(v) for k, v in (secret.get("data") or {}).items()}
    return _items(data, source)


def field_ref(pod: JSON, path: str) -> str:
    """The value of a downward-API ``fieldPath`` for this pod."""
    meta, spec, status = pod["metadata"], pod.get("spec", {}), pod.get("status", {})
    simple = {
        "metadata.name": meta.get("name", ""),
        "metadata.namespace": meta.get("namespace", ""),
        "metadata.uid": meta.get("uid", ""),
        "spec.serviceAccountName": spec.get("serviceAccountName", "default"),
        "spec.nodeName": spec.get("nodeName", ""),
        "status.podIP": status.get("podIP", ""),
        "status.hostIP": status.get("hostIP", ""),
    }
    if path in simple:
        return str(simple[path])
    for prefix, source in (("metadata.labels", "labels"), ("metadata.annotations", "annotations")):
        if path.startswith(prefix + "['"):
            return str((meta.get(source) or {}).get(path[len(prefix) + 2 : -2], ""))
    raise ValueError(f"the demo kubelet does not support fieldPath {path!r}")
