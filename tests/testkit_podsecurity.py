"""A Pod Security Standards check for tests: the "baseline" and "restricted" profiles.

Written from the published rules (https://kubernetes.io/docs/concepts/security/pod-security-standards/,
policy version "latest" as of Kubernetes 1.33), for the fields a pod spec carries. Import it
as ``testkit_podsecurity``. ``violations(pod)`` returns one line per broken rule, naming
the container; an empty list means the pod would be admitted by a namespace labelled
``pod-security.kubernetes.io/enforce: restricted``.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

__all__ = ["baseline_violations", "violations"]

_BASELINE_CAPS = {
    "AUDIT_WRITE", "CHOWN", "DAC_OVERRIDE", "FOWNER", "FSETID", "KILL", "MKNOD",
    "NET_BIND_SERVICE", "SETFCAP", "SETGID", "SETPCAP", "SETUID", "SYS_CHROOT",
}  # fmt: skip
_SAFE_SYSCTLS = {
    "kernel.shm_rmid_forced", "net.ipv4.ip_local_port_range", "net.ipv4.ip_unprivileged_port_start",
    "net.ipv4.tcp_syncookies", "net.ipv4.ping_group_range", "net.ipv4.ip_local_reserved_ports",
    "net.ipv4.tcp_keepalive_time", "net.ipv4.tcp_fin_timeout", "net.ipv4.tcp_keepalive_intvl",
    "net.ipv4.tcp_keepalive_probes",
}  # fmt: skip
_SELINUX_TYPES = {"", "container_t", "container_init_t", "container_kvm_t", "container_engine_t"}
_RESTRICTED_VOLUMES = {
    "configMap", "csi", "downwardAPI", "emptyDir", "ephemeral", "image",
    "persistentVolumeClaim", "projected", "secret",
}  # fmt: skip
_APPARMOR_OK = {"RuntimeDefault", "Localhost"}


def _containers(spec: Mapping[str, Any]) -> Iterator[tuple[str, Mapping[str, Any]]]:
    for key in ("initContainers", "containers", "ephemeralContainers"):
        for c in spec.get(key) or ():
            yield f"{key[:-1]} {c.get('name')}", c


def baseline_violations(pod: Mapping[str, Any]) -> list[str]:
    """Rules of the "baseline" profile."""
    spec: Mapping[str, Any] = pod.get("spec") or {}
    meta: Mapping[str, Any] = pod.get("metadata") or {}
    psc: Mapping[str, Any] = spec.get("securityContext") or {}
    out: list[str] = []
    for field in ("hostNetwork", "hostPID", "hostIPC"):
        if spec.get(field):
            out.append(f"pod: {field} must not be true")
    if (psc.get("windowsOptions") or {}).get("hostProcess"):
        out.append("pod: windowsOptions.hostProcess must not be true")
    for v in spec.get("volumes") or ():
        if "hostPath" in v:
            out.append(f"volume {v.get('name')}: hostPath volumes are forbidden")
    for s in psc.get("sysctls") or ():
        if s.get("name") not in _SAFE_SYSCTLS:
            out.append(f"pod: sysctl {s.get('name')} is not in the safe set")
    out += _selinux("pod", psc.get("seLinuxOptions"))
    out += _seccomp_not_unconfined("pod", psc.get("seccompProfile"))
    out += _apparmor("pod", psc.get("appArmorProfile"))
    for key, value in (meta.get("annotations") or {}).items():
        if key.startswith("container.apparmor.security.beta.kubernetes.io/") and not (
            value == "runtime/default" or value.startswith("localhost/")
        ):
            out.append(f"annotation {key}: AppArmor must be runtime/default or localhost/*")
    for where, c in _containers(spec):
        sc: Mapping[str, Any] = c.get("securityContext") or {}
        if sc.get("privileged"):
            out.append(f"{where}: privileged must not be true")
        if (sc.get("windowsOptions") or {}).get("hostProcess"):
            out.append(f"{where}: windowsOptions.hostProcess must not be true")
        extra = set((sc.get("capabilities") or {}).get("add") or ()) - _BASELINE_CAPS
        if extra:
            out.append(f"{where}: capabilities {sorted(extra)} may not be added")
        for p in c.get("ports") or ():
            if p.get("hostPort"):
                out.append(f"{where}: hostPort {p['hostPort']} is forbidden")
        if sc.get("procMount") not in (None, "Default"):
            out.append(f"{where}: procMount must be Default")
        out += _selinux(where, sc.get("seLinuxOptions"))
        out += _seccomp_not_unconfined(where, sc.get("seccompProfile"))
        out += _apparmor(where, sc.get("appArmorProfile"))
    return out


def _selinux(where: str, opts: Mapping[str, Any] | None) -> list[str]:
    if not opts:
        return []
    out = []
    if opts.get("type", "") not in _SELINUX_TYPES:
        out.append(f"{where}: seLinuxOptions.type {opts.get('type')} is not allowed")
    if opts.get("user") or opts.get("role"):
        out.append(f"{where}: seLinuxOptions.user/role must not be set")
    return out


def _seccomp_not_unconfined(where: str, profile: Mapping[str, Any] | None) -> list[str]:
    if profile and profile.get("type") == "Unconfined":
        return [f"{where}: seccompProfile Unconfined is forbidden"]
    return []


def _apparmor(where: str, profile: Mapping[str, Any] | None) -> list[str]:
    if profile and profile.get("type") not in _APPARMOR_OK:
        return [f"{where}: appArmorProfile {profile.get('type')} is forbidden"]
    return []


def violations(pod: Mapping[str, Any]) -> list[str]:
    """Rules of the "restricted" profile (which includes "baseline")."""
    spec: Mapping[str, Any] = pod.get("spec") or {}
    psc: Mapping[str, Any] = spec.get("securityContext") or {}
    out = baseline_violations(pod)
    for v in spec.get("volumes") or ():
        kinds = set(v) - {"name"}
        if not kinds <= _RESTRICTED_VOLUMES:
            out.append(f"volume {v.get('name')}: type {sorted(kinds)} is not allowed")
    if psc.get("runAsUser") == 0:
        out.append("pod: runAsUser must not be 0")
    pod_nonroot = psc.get("runAsNonRoot")
    pod_seccomp = (psc.get("seccompProfile") or {}).get("type")
    for where, c in _containers(spec):
        sc: Mapping[str, Any] = c.get("securityContext") or {}
        if sc.get("allowPrivilegeEscalation") is not False:
            out.append(f"{where}: allowPrivilegeEscalation must be false")
        nonroot = sc.get("runAsNonRoot", pod_nonroot)
        if nonroot is not True:
            out.append(f"{where}: runAsNonRoot must be true (pod or container)")
        if sc.get("runAsUser") == 0:
            out.append(f"{where}: runAsUser must not be 0")
        seccomp = (sc.get("seccompProfile") or {}).get("type", pod_seccomp)
        if seccomp not in ("RuntimeDefault", "Localhost"):
            out.append(f"{where}: seccompProfile must be RuntimeDefault or Localhost")
        caps: Mapping[str, Any] = sc.get("capabilities") or {}
        if "ALL" not in (caps.get("drop") or ()):
            out.append(f"{where}: capabilities must drop ALL")
        extra = set(caps.get("add") or ()) - {"NET_BIND_SERVICE"}
        if extra:
            out.append(f"{where}: only NET_BIND_SERVICE may be added, not {sorted(extra)}")
    return out
