"""The demo's kubelet: runs a pod *as the API server returned it* (after the webhook).

The point of the demo is to run what the webhook produced, so nothing here knows what the
sidecar is: each container's own ``command``, ``args`` and ``env`` (with ``valueFrom``
resolved like kubelet) become a process, native sidecars (init containers with
``restartPolicy: Always``) start first and are waited for, and every volume is a host
directory kept fresh by ``volumes``.

With network namespaces, each container runs ``ip netns exec <pod> unshare --mount`` and
bind-mounts its volumes at their ``mountPath`` inside its own mount namespace, so two pods
never share ``/var/run/secrets/kubemtls/token``. On loopback (no root), mount paths are
rewritten to the host directories and each pod port is remapped to a free loopback port
(``Remap``), which is the one documented difference from a cluster.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import os
import pathlib
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from typing import Any

from kubemtls_operator.demo import kubeapi, netns, volumes

__all__ = ["PodRunner", "Remap", "free_port", "kill_group"]

JSON = dict[str, Any]
_VAR = re.compile(r"\$\(([A-Za-z_][A-Za-z0-9_]*)\)")
_PORT = re.compile(r"(?<![\d.])(\d{2,5})(?![\d.])")


_HANDED_OUT: set[int] = set()


def free_port(host: str = "127.0.0.1") -> int:
    """A free port, never one this demo handed out before (port 0 can repeat itself)."""
    while True:
        with socket.socket() as s:
            s.bind((host, 0))
            port = int(s.getsockname()[1])
        if port not in _HANDED_OUT:
            _HANDED_OUT.add(port)
            return port


def kill_group(proc: subprocess.Popen[bytes], grace: float = 3.0) -> None:
    """SIGTERM the process group, then SIGKILL it after ``grace`` seconds."""
    if proc.poll() is not None:
        return
    for sig, wait in ((signal.SIGTERM, grace), (signal.SIGKILL, 2.0)):
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            return
        try:
            proc.wait(wait)
            return
        except subprocess.TimeoutExpired:
            continue


@dataclasses.dataclass
class Remap:
    """Loopback mode: pod ports → free host ports, ``host:port`` upstreams → local ones."""

    ports: dict[int, int] = dataclasses.field(default_factory=dict)
    upstreams: dict[str, str] = dataclasses.field(default_factory=dict)
    paths: dict[str, str] = dataclasses.field(default_factory=dict)

    def apply(self, text: str) -> str:
        for upstream, local in self.upstreams.items():
            text = text.replace(upstream, local)
        text = _PORT.sub(lambda m: str(self.ports.get(int(m.group(1)), m.group(1))), text)
        if not self.paths:
            return text
        # One pass, whole path components only: "/tmp" must not rewrite "/tmp/x" twice.
        mounts = sorted(self.paths, key=len, reverse=True)
        pattern = r"(?<![\w./-])(" + "|".join(map(re.escape, mounts)) + r")(?=/|$|[,:=\s])"
        return re.sub(pattern, lambda m: self.paths[m.group(1)], text)


@dataclasses.dataclass
class Container:
    name: str
    proc: subprocess.Popen[bytes]
    log: pathlib.Path


class PodRunner:
    """One running pod: ``start()`` → processes up and probes passing; ``stop()``."""

    def __init__(
        self,
        api: kubeapi.KubeAPI,
        pod: JSON,
        workdir: pathlib.Path,
        *,
        net: netns.PodNet | None,
        remap: Remap | None = None,
        refresh: float = 1.0,
    ) -> None:
        self.api, self.pod, self.net = api, pod, net
        self.name = str(pod["metadata"]["name"])
        self.dir = workdir / "pods" / self.name
        self.logs = workdir / "logs"  # every process's log in one place, as <pod>-<container>
        self.remap = remap or Remap()
        self.refresh = refresh
        self.containers: dict[str, Container] = {}
        self.volumes = {
            v["name"]: volumes.Volume(v["name"], self.dir / "volumes" / v["name"], v)
            for v in pod["spec"].get("volumes", [])
        }
        self.created_dirs: list[pathlib.Path] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    @property
    def ip(self) -> str:
        return self.net.ip if self.net else "127.0.0.1"

    def log_of(self, container: str) -> pathlib.Path:
        return self.logs / f"{self.name}-{container}.log"

    def start(self, timeout: float = 30.0) -> None:
        """Mount volumes, report the pod Running, start its containers in kubelet order.

        Raises:
            RuntimeError: a volume never became available, a container exited or a probe
                did not pass within ``timeout``.
        """
        deadline = time.monotonic() + timeout
        pending = dict(self.volumes)
        while pending:
            for name, vol in list(pending.items()):
                vol.refresh(self.api, self.pod)
                if (vol.host_dir / "..data").is_symlink() or "emptyDir" in vol.spec:
                    del pending[name]
            if pending and time.monotonic() > deadline:
                raise RuntimeError(f"pod {self.name}: volumes {sorted(pending)} never appeared")
            if pending:
                time.sleep(0.2)
        self.pod.setdefault("status", {}).update(podIP=self.ip, hostIP="127.0.0.1")
        self._thread = threading.Thread(target=self._refresh_loop, daemon=True, name=self.name)
        self._thread.start()
        spec = self.pod["spec"]
        for c in spec.get("initContainers", []):
            if c.get("restartPolicy") == "Always":
                self._launch(c)
                self._wait_probe(c, ("startupProbe", "readinessProbe"), deadline)
            else:
                self._launch(c)
                self._wait_exit(c["name"], deadline)
        for c in spec.get("containers", []):
            self._launch(c)
        self._report_running()

    def stop(self) -> None:
        self._stop.set()
        for container in reversed(list(self.containers.values())):
            kill_group(container.proc)
        if self._thread is not None:
            self._thread.join(timeout=5)
        for d in reversed(self.created_dirs):
            with contextlib.suppress(OSError):  # not empty: not ours to remove
                d.rmdir()

    def alive(self) -> dict[str, bool]:
        return {n: c.proc.poll() is None for n, c in self.containers.items()}

    # --- containers -------------------------------------------------------------------------

    def env_of(self, container: JSON) -> dict[str, str]:
        """The container's environment, resolved as kubelet does (``$(VAR)`` included)."""
        env: dict[str, str] = {}
        for item in container.get("env", []):
            if "value" in item:
                value = _VAR.sub(lambda m: env.get(m.group(1), m.group(0)), str(item["value"]))
            elif "fieldRef" in item.get("valueFrom", {}):
                value = volumes.field_ref(self.pod, item["valueFrom"]["fieldRef"]["fieldPath"])
            else:
                raise ValueError(f"the demo kubelet does not support env {item}")
            env[item["name"]] = value
        return env

    def _launch(self, c: JSON) -> None:
        env = {k: self.remap.apply(v) for k, v in self.env_of(c).items()}
        argv = [*c.get("command", []), *c.get("args", [])]
        if not argv:
            raise RuntimeError(f"pod {self.name}: container {c['name']} has no command")
        argv = [_VAR.sub(lambda m: env.get(m.group(1), m.group(0)), a) for a in argv]
        argv = [self.remap.apply(a) for a in argv]
        bindir = str(pathlib.Path(sys.executable).parent)
        env.setdefault("PATH", bindir + os.pathsep + os.environ.get("PATH", "/usr/bin:/bin"))
        env.setdefault("PYTHONUNBUFFERED", "1")
        env.setdefault("HOME", "/tmp")  # noqa: S108 (a container's default HOME)
        env.setdefault("LANG", "C.UTF-8")
        if self.net is not None:
            argv = self._in_namespaces(c, argv)
        log = self.log_of(c["name"])
        log.parent.mkdir(parents=True, exist_ok=True)
        with log.open("ab") as out:
            proc = subprocess.Popen(
                argv,
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
                cwd=c.get("workingDir") or "/",
            )
        self.containers[c["name"]] = Container(c["name"], proc, log)

    def _in_namespaces(self, c: JSON, argv: list[str]) -> list[str]:
        """Wrap argv: the pod's network namespace, a private mount namespace, its mounts."""
        assert self.net is not None
        script = []
        targets = [pathlib.Path(m["mountPath"]) for m in c.get("volumeMounts", [])]
        hidden = _hidden_install(targets)
        if hidden is not None:  # e.g. a checkout under /tmp, and the sidecar's /tmp volume
            script.append(f"mount --rbind {shlex.quote(str(hidden))} {_STASH}")
        for mount in c.get("volumeMounts", []):
            target = pathlib.Path(mount["mountPath"])
            self._make_mount_point(target)
            source = self.volumes[mount["name"]].host_dir
            script.append(f"mount --bind {shlex.quote(str(source))} {shlex.quote(str(target))}")
            if mount.get("readOnly"):
                script.append(f"mount -o remount,bind,ro {shlex.quote(str(target))}")
        if hidden is not None:
            quoted = shlex.quote(str(hidden))
            script.append(f"mkdir -p {quoted} && mount --rbind {_STASH} {quoted}")
        script.append('exec "$@"')
        return [
            *self.net.exec_prefix(), "unshare", "--mount", "--propagation", "private",
            "sh", "-ec", " && ".join(script), "sh", *self._as_user(c), *argv,
        ]  # fmt: skip

    def _as_user(self, c: JSON) -> list[str]:
        """``runAsUser``/``runAsGroup`` (container, else pod) via setpriv, as kubelet would."""
        pod_ctx = self.pod["spec"].get("securityContext") or {}
        ctx = {**pod_ctx, **(c.get("securityContext") or {})}
        uid, gid = ctx.get("runAsUser"), ctx.get("runAsGroup", ctx.get("runAsUser"))
        if uid is None or shutil.which("setpriv") is None:
            return []
        argv = ["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups"]
        if ctx.get("allowPrivilegeEscalation") is False:
            argv.append("--no-new-privs")
        return argv

    def _make_mount_point(self, target: pathlib.Path) -> None:
        missing = []
        for p in [target, *target.parents]:
            if p.exists():
                break
            missing.append(p)
        for p in reversed(missing):
            p.mkdir()
            self.created_dirs.append(p)

    def _wait_exit(self, name: str, deadline: float) -> None:
        proc = self.containers[name].proc
        rc = proc.wait(max(0.1, deadline - time.monotonic()))
        if rc != 0:
            raise RuntimeError(f"pod {self.name}: init container {name} exited {rc}")

    def _wait_probe(self, c: JSON, kinds: tuple[str, ...], deadline: float) -> None:
        probe = next((c[k] for k in kinds if k in c), None)
        if probe is None or "httpGet" not in probe:
            return
        get = probe["httpGet"]
        port = int(get["port"]) if str(get["port"]).isdigit() else 0
        port = self.remap.ports.get(port, port)
        url = f"http://{self.ip}:{port}{get.get('path', '/')}"
        while time.monotonic() < deadline:
            if self.containers[c["name"]].proc.poll() is not None:
                raise RuntimeError(
                    f"pod {self.name}: {c['name']} exited; see {self.log_of(c['name'])}"
                )
            try:
                with urllib.request.urlopen(url, timeout=1) as rsp:
                    if rsp.status < 400:
                        return
            except OSError:
                pass
            time.sleep(0.2)
        raise RuntimeError(f"pod {self.name}: {c['name']} not ready at {url}")

    # --- kubelet duties -----------------------------------------------------------------------

    def _report_running(self) -> None:
        now = datetime.datetime.now(datetime.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

        def statuses(key: str) -> list[JSON]:
            return [
                {"name": c["name"], "image": c.get("image", ""), "ready": True,
                 "started": True, "restartCount": 0, "state": {"running": {"startedAt": now}}}
                for c in self.pod["spec"].get(key, [])
                if c["name"] in self.containers
            ]  # fmt: skip

        status = {
            "phase": "Running",
            "podIP": self.ip,
            "podIPs": [{"ip": self.ip}],
            "hostIP": "127.0.0.1",
            "startTime": now,
            "conditions": [{"type": t, "status": "True"} for t in ("Ready", "ContainersReady")],
            "initContainerStatuses": statuses("initContainers"),
            "containerStatuses": statuses("containers"),
        }
        meta = self.pod["metadata"]
        path = kubeapi.pod_path(meta["namespace"], meta["name"]) + "/status"
        try:
            self.pod = self.api.merge_patch(path, {"status": status})
        except kubeapi.APIError:
            self.pod.setdefault("status", {}).update(status)

    def _refresh_loop(self) -> None:
        while not self._stop.wait(self.refresh):
            for vol in self.volumes.values():
                with contextlib.suppress(kubeapi.APIError, OSError):  # kubelet retries; so do we
                    vol.refresh(self.api, self.pod)


#: Where a hidden installation is parked while the pod's volumes are mounted (in the
#: pod's private mount namespace only; /mnt exists on Debian and no volume targets it).
_STASH = "/mnt"


def _hidden_install(targets: list[pathlib.Path]) -> pathlib.Path | None:
    """The directory holding this Python installation and kubemtls, if a mount would hide it.

    The demo runs containers from this machine's installation (the venv and, in an
    editable install, the checkout). A volume mounted over one of its parents — the
    sidecar's in-memory ``/tmp`` over a checkout in ``/tmp`` — would hide it; the caller
    then binds it aside and back in place inside the pod's mount namespace.
    """
    import kubemtls_sidecar

    import kubemtls_operator

    roots = [
        pathlib.Path(sys.prefix).resolve(),
        pathlib.Path(kubemtls_operator.__file__).resolve().parent.parent,
        pathlib.Path(kubemtls_sidecar.__file__).resolve().parent.parent,
    ]
    common = pathlib.Path(os.path.commonpath([str(r) for r in roots]))
    for target in targets:
        if common == target or target in common.parents:
            return common
    return None
