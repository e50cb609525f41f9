"""The containers, volumes and environment the webhook adds to a pod.

Kept apart from :mod:`kubemtls_operator.injection` (which decides and assembles) so each
piece of the pod spec can be read on its own: the sidecar container, the transparent-mode
``kubemtls-init`` container, the volumes, the ``KUBEMTLS_*`` environment (COMMON.md "How
the sidecar is configured") and the probe rewrite of transparent mode. Pure: dicts in,
dicts out; never a key, never a privilege for the app containers.
"""

# No ``from __future__ import annotations``: it would shadow our module of that name.

import dataclasses
import functools
import json
from collections.abc import Iterator, Mapping
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import annotations

__all__ = [
    "APP_PROBES_FLAG",
    "PROBE_KINDS",
    "ProbeRewrite",
    "container_names",
    "grpc_probes_on_intercepted_ports",
    "init_container",
    "probe_rewrites",
    "rewrite_app_probes",
    "sidecar_container",
    "sidecar_env",
    "taken_names",
    "volumes",
]

#: The sidecar flag that carries the original probes in transparent mode (JSON by path).
APP_PROBES_FLAG = "--app-probes"
#: Probe field → the last segment of its rewritten path (as Istio names them).
PROBE_KINDS = {"livenessProbe": "livez", "readinessProbe": "readyz", "startupProbe": "startupz"}
#: kubelet runs postStart before it starts the next container: legacy layout only.
WAIT_READY = ("--wait-ready",)
TMP_SIZE = "8Mi"
_RUN_DIR = "/run"  # iptables' xtables.lock lives here (kubemtls-init only)


def container_names(pod_spec: Mapping[str, Any]) -> set[str]:
    """The names of the containers and init containers of a pod spec."""
    return {
        str(c.get("name"))
        for key in ("initContainers", "containers")
        for c in pod_spec.get(key) or ()
        if isinstance(c, Mapping)
    }


def _volume_names(spec: annotations.AnnotationSpec) -> list[str]:
    names = [contract.VOLUME_TOKEN, contract.VOLUME_TRUST, contract.VOLUME_TMP]
    return names + ([contract.VOLUME_UPSTREAM_CA] if spec.upstream_ca else [])


def taken_names(pod_spec: Mapping[str, Any], spec: annotations.AnnotationSpec) -> list[str]:
    """Names the pod already uses that the injection would add (a clash to refuse)."""
    taken = [f"a volume named {v}" for v in _volume_names(spec) if v in _pod_volumes(pod_spec)]
    if contract.INIT_CONTAINER_NAME in container_names(pod_spec):
        taken.insert(0, f"a container named {contract.INIT_CONTAINER_NAME}")
    return taken


def _pod_volumes(pod_spec: Mapping[str, Any]) -> set[str]:
    return {str(v.get("name")) for v in pod_spec.get("volumes") or ()}


def _app_containers(pod_spec: Mapping[str, Any]) -> Iterator[tuple[str, int, dict[str, Any]]]:
    """``(list key, index, container)`` of each container whose probes kubelet runs.

    Regular containers, and the pod's own native sidecars (init containers that restart).
    """
    ours = {contract.SIDECAR_CONTAINER_NAME, contract.INIT_CONTAINER_NAME}
    for i, c in enumerate(pod_spec.get("containers") or ()):
        if c.get("name") not in ours:
            yield "containers", i, c
    for i, c in enumerate(pod_spec.get("initContainers") or ()):
        if c.get("restartPolicy") == "Always" and c.get("name") not in ours:
            yield "initContainers", i, c


def _probe_port(container: Mapping[str, Any], port: object) -> int | None:
    """A probe's port as a number (a name is looked up in the container's ports)."""
    if isinstance(port, int):
        return port
    if isinstance(port, str):
        if port.isdigit():
            return int(port)
        for p in container.get("ports") or ():
            if p.get("name") == port and isinstance(p.get("containerPort"), int):
                return int(p["containerPort"])
    return None


def _intercepted(spec: annotations.AnnotationSpec) -> set[int]:
    return {e.app for e in spec.inbound} if spec.mode == "transparent" else set()


def grpc_probes_on_intercepted_ports(
    pod_spec: Mapping[str, Any], spec: annotations.AnnotationSpec
) -> list[str]:
    """``container/probe`` of every gRPC probe kubelet would send into the redirect."""
    ports = _intercepted(spec)
    found = []
    for _, _, c in _app_containers(pod_spec):
        for field in PROBE_KINDS:
            grpc = (c.get(field) or {}).get("grpc")
            if grpc and _probe_port(c, grpc.get("port")) in ports:
                found.append(f"{c.get('name')}/{field}")
    return found


@dataclasses.dataclass(frozen=True)
class ProbeRewrite:
    """One app probe that transparent mode points at the sidecar (see :func:`probe_rewrites`).

    ``pod_spec[list_key][index][field]`` loses its ``handlers`` (``httpGet``/``tcpSocket``)
    and gets ``http_get``; the sidecar replays ``original`` when kubelet asks for ``path``.
    """

    list_key: str
    index: int
    field: str
    handlers: tuple[str, ...]
    path: str
    original: dict[str, Any]

    @property
    def http_get(self) -> dict[str, Any]:
        """The probe's new handler: ``GET :15020<path>``."""
        return {"path": self.path, "port": contract.ADMIN_PORT, "scheme": "HTTP"}

    def apply(self, pod_spec: dict[str, Any]) -> None:
        """Make the change in ``pod_spec`` (the one it was computed from), in place."""
        probe = pod_spec[self.list_key][self.index][self.field]
        for handler in self.handlers:
            del probe[handler]
        probe["httpGet"] = self.http_get


def probe_rewrites(
    pod_spec: Mapping[str, Any], spec: annotations.AnnotationSpec
) -> list[ProbeRewrite]:
    """The probes of intercepted ports to point at the sidecar (the pod is not changed).

    kubelet probes the pod IP in plaintext and cannot present a certificate, so a probe of
    an intercepted port would land in the inbound redirect. Each such httpGet or tcpSocket
    probe becomes ``GET :15020/app-health/<container>/<livez|readyz|startupz>``; the
    sidecar replays the original against 127.0.0.1. A probe with ``httpGet.host`` set
    does not target the pod and is left alone.
    """
    ports = _intercepted(spec)
    if not ports:
        return []
    found = []
    for list_key, index, c in _app_containers(pod_spec):
        for field, kind in PROBE_KINDS.items():
            probe = c.get(field)
            if not isinstance(probe, Mapping):
                continue
            original = _original_probe(c, probe, ports)
            if original is None:
                continue
            handlers = tuple(h for h in ("httpGet", "tcpSocket") if h in probe)
            path = f"{contract.APP_HEALTH_PREFIX}{c.get('name')}/{kind}"
            found.append(ProbeRewrite(list_key, index, field, handlers, path, original))
    return found


def rewrite_app_probes(
    pod_spec: dict[str, Any], spec: annotations.AnnotationSpec
) -> dict[str, dict[str, Any]]:
    """Apply :func:`probe_rewrites` to ``pod_spec`` in place; return the originals by path."""
    rewrites = probe_rewrites(pod_spec, spec)
    for r in rewrites:
        r.apply(pod_spec)
    return {r.path: r.original for r in rewrites}


def _original_probe(
    container: Mapping[str, Any], probe: Mapping[str, Any], ports: set[int]
) -> dict[str, Any] | None:
    timeout = int(probe.get("timeoutSeconds") or 1)
    http = probe.get("httpGet")
    if isinstance(http, Mapping) and not http.get("host"):
        port = _probe_port(container, http.get("port"))
        if port not in ports:
            return None
        original: dict[str, Any] = {
            "port": port,
            "path": str(http.get("path") or "/"),
            "scheme": str(http.get("scheme") or "HTTP"),
        }
        if http.get("httpHeaders"):
            original["httpHeaders"] = _tree(list(http["httpHeaders"]))
        return {"httpGet": original, "timeoutSeconds": timeout}
    tcp = probe.get("tcpSocket")
    if isinstance(tcp, Mapping) and not tcp.get("host"):
        port = _probe_port(container, tcp.get("port"))
        if port in ports:
            return {"tcpSocket": {"port": port}, "timeoutSeconds": timeout}
    return None


def _tree(value: Any) -> Any:
    """A copy of a JSON tree (dicts, lists, scalars), for a fraction of ``copy.deepcopy``'s cost."""
    if type(value) is dict or isinstance(value, Mapping):
        return {k: _tree(v) for k, v in value.items()}
    if type(value) is list:
        return [_tree(v) for v in value]
    return value


#: The webhook writes the same 14 names for every pod.
_env_name = functools.cache(contract.env_name)


def _env(flag: str, value: str) -> dict[str, Any]:
    return {"name": _env_name(flag), "value": value}


def sidecar_env(
    spec: annotations.AnnotationSpec, signer_url: str, app_probes: Mapping[str, Any]
) -> list[dict[str, Any]]:
    """The sidecar's configuration, as ``KUBEMTLS_*`` variables only."""
    env = [_env("--mode", spec.mode)]
    if spec.inbound:
        env.append(_env("--inbound", ",".join(e.env for e in spec.inbound)))
    if spec.outbound:
        env.append(_env("--outbound", ",".join(r.env for r in spec.outbound)))
    env += [
        _env("--signer", signer_url),
        _env("--token-file", contract.TOKEN_FILE),
        _env("--trust-dir", contract.TRUST_DIR),
        _env("--admin-port", str(contract.ADMIN_PORT)),
    ]
    if spec.allowed_peers:
        env.append(_env("--allowed-peer", ",".join(spec.allowed_peers)))
    env += [
        _env("--protocol", spec.protocol),
        _env("--key-type", spec.key_type),
        _env("--require-bound-token", "true" if spec.require_bound_token else "false"),
    ]
    if spec.upstream_ca:
        env.append(_env("--upstream-ca", contract.UPSTREAM_CA_FILE))
    env.append(_env("--log-format", "json"))
    if app_probes:
        env.append(_env(APP_PROBES_FLAG, json.dumps(app_probes, sort_keys=True)))
    for flag, field in (("--pod-name", "metadata.name"), ("--pod-namespace", "metadata.namespace")):
        env.append(
            {
                "name": _env_name(flag),
                "valueFrom": {"fieldRef": {"apiVersion": "v1", "fieldPath": field}},
            }
        )
    return env


def _http_probe(path: str, period: int, failures: int, timeout: int = 1) -> dict[str, Any]:
    return {
        "httpGet": {"path": path, "port": contract.ADMIN_PORT, "scheme": "HTTP"},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def sidecar_container(
    spec: annotations.AnnotationSpec,
    env: list[dict[str, Any]],
    *,
    image: str,
    pull_policy: str,
    resources: Mapping[str, Any],
    native: bool,
) -> dict[str, Any]:
    """``kubemtls-sidecar``: UID 1337, read-only root, no capability, probes on 15020."""
    ports = [{"name": "kubemtls-admin", "containerPort": contract.ADMIN_PORT, "protocol": "TCP"}]
    ports += [
        {"name": f"mtls-{e.listen}", "containerPort": e.listen, "protocol": "TCP"}
        for e in spec.inbound
        if e.listen is not None
    ]
    mounts = [
        {"name": contract.VOLUME_TOKEN, "mountPath": contract.TOKEN_DIR, "readOnly": True},
        {"name": contract.VOLUME_TRUST, "mountPath": contract.TRUST_DIR, "readOnly": True},
    ]
    if spec.upstream_ca:
        mounts.append(
            {
                "name": contract.VOLUME_UPSTREAM_CA,
                "mountPath": contract.UPSTREAM_CA_DIR,
                "readOnly": True,
            }
        )
    mounts.append({"name": contract.VOLUME_TMP, "mountPath": "/tmp"})  # noqa: S108 - emptyDir
    container: dict[str, Any] = {
        "name": contract.SIDECAR_CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": list(contract.SIDECAR_COMMAND),
        "env": env,
        "ports": ports,
        # A new certificate needs the trust ConfigMap and the signing API: allow 3 minutes.
        "startupProbe": _http_probe("/readyz", period=1, failures=180),
        "readinessProbe": _http_probe("/readyz", period=5, failures=3),
        "livenessProbe": _http_probe("/healthz", period=10, failures=3, timeout=2),
        "volumeMounts": mounts,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": contract.SIDECAR_UID,
            "runAsGroup": contract.SIDECAR_GID,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources:
        container["resources"] = _tree(dict(resources))
    if native:
        container["restartPolicy"] = "Always"
    else:
        # Before native sidecars (Kubernetes < 1.29) kubelet starts containers in order and
        # waits for each postStart hook: the app starts once the sidecar is ready.
        container["lifecycle"] = {
            "postStart": {"exec": {"command": [*contract.SIDECAR_COMMAND, *WAIT_READY]}}
        }
    return container


def init_container(
    env: list[dict[str, Any]], *, image: str, pull_policy: str, resources: Mapping[str, Any]
) -> dict[str, Any]:
    """``kubemtls-init`` (transparent mode): installs the iptables redirects, then exits."""
    container: dict[str, Any] = {
        "name": contract.INIT_CONTAINER_NAME,
        "image": image,
        "imagePullPolicy": pull_policy,
        "command": list(contract.SIDECAR_COMMAND),
        "args": ["--install-redirects"],
        "env": _tree(env),
        "volumeMounts": [{"name": contract.VOLUME_TMP, "mountPath": _RUN_DIR}],
        "securityContext": {
            "runAsUser": 0,
            "runAsGroup": 0,
            "runAsNonRoot": False,
            "readOnlyRootFilesystem": True,
            "allowPrivilegeEscalation": False,
            "privileged": False,
            "capabilities": {"add": ["NET_ADMIN", "NET_RAW"], "drop": ["ALL"]},
            "seccompProfile": {"type": "RuntimeDefault"},
        },
    }
    if resources:
        container["resources"] = _tree(dict(resources))
    return container


def volumes(spec: annotations.AnnotationSpec, *, token_expiration: int) -> list[dict[str, Any]]:
    """The token, trust, tmp and (optionally) upstream-CA volumes; mounted by the sidecar only."""
    token = {
        "audience": contract.TOKEN_AUDIENCE,
        "expirationSeconds": token_expiration,
        "path": "token",
    }
    result: list[dict[str, Any]] = [
        {"name": contract.VOLUME_TOKEN, "projected": {"sources": [{"serviceAccountToken": token}]}},
        {"name": contract.VOLUME_TRUST, "configMap": {"name": contract.TRUST_CONFIGMAP}},
        {"name": contract.VOLUME_TMP, "emptyDir": {"medium": "Memory", "sizeLimit": TMP_SIZE}},
    ]
    if spec.upstream_ca:
        result.append(
            {
                "name": contract.VOLUME_UPSTREAM_CA,
                "configMap": {
                    "name": spec.upstream_ca,
                    "items": [{"key": contract.TRUST_CA_FILE, "path": contract.TRUST_CA_FILE}],
                },
            }
        )
    return result
