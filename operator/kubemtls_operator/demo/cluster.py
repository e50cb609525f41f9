"""The demo's control plane: the emulated API server and the real operator, as processes.

The API server is the project's emulator (``python -m kubemtls_operator.emu``) with the
chart's CRD and ``--admission``, so pod creation goes through our webhook exactly as it does
through kube-apiserver. The operator is the ``kubemtls-operator`` command, configured by
environment the way the chart configures it, plus what a laptop needs: it registers its own
webhook configuration (``WEBHOOK_MANAGED``), its serving certificate also names the host IP
that pods reach it on (``SERVING_EXTRA_SANS``), and certificates are short-lived so that a
renewal happens while you watch.
"""

from __future__ import annotations

import base64
import dataclasses
import os
import pathlib
import shutil
import ssl
import subprocess
import sys
import time
import urllib.error
import urllib.request
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import crd
from kubemtls_operator.demo import kubeapi, pods

__all__ = ["OPERATOR_NAMESPACE", "Cluster", "OperatorSettings"]

OPERATOR_NAMESPACE = "kubemtls"
CA_SECRET = "kubemtls-ca"  # noqa: S105 (a Secret's name)
WEBHOOK_CONFIG = "kubemtls-injector"


@dataclasses.dataclass(frozen=True)
class OperatorSettings:
    """What the demo decides about the operator; the rest is the chart's defaults."""

    host_ip: str  # where pods reach the signing API
    bind_address: str
    renew_fraction: float = 0.15  # a 2m leaf renews after ~18 s: inside the demo's minute
    check_interval: str = "2s"

    def env(self, ports: dict[str, int]) -> dict[str, str]:
        p = contract.OPERATOR_ENV_PREFIX
        # 127.0.0.1 first: the operator puts the first extra IP in its managed webhook's URL,
        # and the API server calls webhooks on loopback; pods reach the signer on host_ip.
        sans = ",".join(dict.fromkeys(["127.0.0.1", self.host_ip]))
        values = {
            "NAMESPACE": OPERATOR_NAMESPACE,
            "SERVICE": "kubemtls",
            "SIGNER_URL": f"https://{self.host_ip}:{ports['SIGNER_PORT']}",
            "SERVING_EXTRA_SANS": sans,
            "BIND_ADDRESS": self.bind_address,
            "WEBHOOK_CONFIG": WEBHOOK_CONFIG,
            "WEBHOOK_MANAGED": "true",
            "CA_SECRET": CA_SECRET,
            "CERT_DURATION_MIN": "1m",
            "RENEW_FRACTION": str(self.renew_fraction),
            "CHECK_INTERVAL": self.check_interval,
            "LOG_FORMAT": "text",
        }
        values.update({name: str(port) for name, port in ports.items()})
        return {p + k: v for k, v in values.items()}


class Cluster:
    """Start/stop the two control-plane processes; logs go to ``workdir/logs``."""

    def __init__(self, workdir: pathlib.Path) -> None:
        self.workdir = workdir
        self.logs = workdir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.kubeconfig = workdir / "kubeconfig"
        self.url = ""
        self.api = kubeapi.KubeAPI("http://127.0.0.1:1")
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.signer_url = ""
        self.webhook_url = ""

    def _spawn(self, name: str, argv: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        with (self.logs / f"{name}.log").open("ab") as out:
            proc = subprocess.Popen(
                argv, env=env, stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                start_new_session=True,
            )  # fmt: skip
        self.procs[name] = proc
        return proc

    def _check_alive(self, name: str) -> None:
        proc = self.procs[name]
        if proc.poll() is not None:
            tail = (self.logs / f"{name}.log").read_text(errors="replace").splitlines()[-15:]
            raise RuntimeError(f"{name} exited with {proc.returncode}:\n  " + "\n  ".join(tail))

    def start_api(self, timeout: float = 20.0) -> str:
        """Start the emulated API server; return its URL.

        Raises:
            RuntimeError: it exited or did not become ready in time.
        """
        ready = self.workdir / "api.url"
        argv = [
            sys.executable, "-m", "kubemtls_operator.emu", "--port", "0",
            "--kubeconfig", str(self.kubeconfig), "--crd", str(crd.crd_path()),
            "--ready-file", str(ready), "--admission",
        ]  # fmt: skip
        self._spawn("apiserver", argv, dict(os.environ))
        deadline = time.monotonic() + timeout
        while not (ready.exists() and ready.read_text().strip()):
            self._check_alive("apiserver")
            if time.monotonic() > deadline:
                raise RuntimeError("the emulated API server did not start in time")
            time.sleep(0.05)
        self.url = ready.read_text().strip().splitlines()[0]
        self.api = kubeapi.KubeAPI(self.url)
        return self.url

    def start_operator(self, settings: OperatorSettings) -> None:
        """Start ``kubemtls-operator`` against the API server."""
        ports = {
            name: pods.free_port(settings.bind_address)
            for name in ("WEBHOOK_PORT", "SIGNER_PORT", "METRICS_PORT", "HEALTH_PORT")
        }
        env = {k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_")}
        env.update(settings.env(ports))
        env["KUBECONFIG"] = str(self.kubeconfig)
        env["PYTHONUNBUFFERED"] = "1"
        self.signer_url = env[contract.OPERATOR_ENV_PREFIX + "SIGNER_URL"]
        script = pathlib.Path(sys.executable).parent / "kubemtls-operator"
        argv = [str(script)] if script.exists() else [sys.executable, "-m", "kubemtls_operator"]
        if shutil.which(argv[0]) is None and not pathlib.Path(argv[0]).exists():
            argv = [sys.executable, "-m", "kubemtls_operator"]
        self._spawn("operator", argv, env)

    def wait_operator(self, timeout: float = 30.0) -> None:
        """Wait until the webhook is registered and the signing API answers over TLS.

        Raises:
            RuntimeError: the operator exited or was not ready in time.
        """
        deadline = time.monotonic() + timeout
        while True:
            self._check_alive("operator")
            if self._webhook_registered() and self._signer_answers():
                return
            if time.monotonic() > deadline:
                log = self.logs / "operator.log"
                tail = log.read_text(errors="replace").splitlines()[-8:]
                raise RuntimeError(
                    "the operator did not register its webhook and serve its signing API in "
                    f"{timeout:.0f}s; the end of {log}:\n  " + "\n  ".join(tail)
                )
            time.sleep(0.2)

    def _webhook_registered(self) -> bool:
        path = (
            f"/apis/admissionregistration.k8s.io/v1/mutatingwebhookconfigurations/{WEBHOOK_CONFIG}"
        )
        cfg = self.api.get_or_none(path)
        hooks: list[dict[str, Any]] = (cfg or {}).get("webhooks") or []
        urls = [h.get("clientConfig", {}).get("url") for h in hooks]
        if urls and urls[0]:
            self.webhook_url = str(urls[0])
            return True
        return False

    def ca_pem(self) -> bytes | None:
        """The cluster CA certificates (from the operator's CA Secret), once it exists."""
        secret = self.api.get_or_none(kubeapi.secret_path(OPERATOR_NAMESPACE, CA_SECRET))
        data = (secret or {}).get("data") or {}
        raw = data.get("ca.crt") or data.get("tls.crt")
        return base64.b64decode(raw) if raw else None

    def _signer_answers(self) -> bool:
        ca = self.ca_pem()
        if ca is None:
            return False
        ctx = ssl.create_default_context(cadata=ca.decode())
        try:
            urllib.request.urlopen(self.signer_url + "/v1/trust", context=ctx, timeout=2)  # noqa: S310
        except urllib.error.HTTPError:
            return True  # 401 without a token: it answers, over TLS we trust
        except OSError:
            return False
        return True

    def stop(self) -> None:
        for name in ("operator", "apiserver"):
            proc = self.procs.get(name)
            if proc is not None:
                pods.kill_group(proc, grace=5.0)
