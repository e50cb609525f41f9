"""`helm install`, `helm upgrade` and `helm uninstall` against the emulated API server.

The real helm binary applies the chart over HTTP to the emulator (no cluster is available
here), the operator's own client patches the webhook's caBundle the way it does at start,
and an upgrade must keep that caBundle: the emulator replaces lists on merge, so without
the chart's lookup of the live webhook configuration the upgrade would blank it.
"""

from __future__ import annotations

import base64
import json
import pathlib
from typing import Any

import kopf
import yaml
from chart import chartkit
from kubemtls_operator import kube

HOOK = "kubemtls-injector"


def _get(kubeconfig: pathlib.Path, *args: str) -> dict[str, Any]:
    out = chartkit.run_tool(kubeconfig, chartkit.kubectl_binary(), "get", *args, "-o", "json")
    obj: dict[str, Any] = json.loads(out)
    return obj


def _exists(kubeconfig: pathlib.Path, *args: str) -> bool:
    out = chartkit.run_tool(
        kubeconfig, chartkit.kubectl_binary(), "get", *args, "--ignore-not-found", "-o", "name"
    )
    return bool(out.strip())


async def test_install_upgrade_uninstall_keeps_the_ca_bundle(tmp_path: pathlib.Path) -> None:
    helm = chartkit.helm_binary()
    assert helm is not None, "helm not installed: run scripts/bootstrap.sh"
    with chartkit.emulated_api(tmp_path) as kc:
        chart, ns = str(chartkit.CHART), chartkit.NAMESPACE
        chartkit.run_tool(kc, helm, "install", "kubemtls", chart, "-n", ns, "--create-namespace")

        dep = _get(kc, "deployment", "kubemtls", "-n", ns)
        assert dep["spec"]["replicas"] == 2
        assert _exists(kc, "clusterkopfpeering", "kubemtls")
        assert _exists(kc, "role", "kubemtls", "-n", ns)
        assert _exists(kc, "crd", "clusterkopfpeerings.kopf.dev")
        (hook,) = _get(kc, "mutatingwebhookconfiguration", HOOK)["webhooks"]
        assert "caBundle" not in hook["clientConfig"]

        # What the operator does at start, with its own client.
        server = yaml.safe_load(kc.read_text())["clusters"][0]["cluster"]["server"]
        client = kube.Client(kopf.ConnectionInfo(server=server, token="operator"))
        bundle = base64.b64encode(b"-----BEGIN CERTIFICATE-----\n...").decode()
        try:
            await client.patch_webhook_ca_bundle(HOOK, bundle)
        finally:
            await client.close()

        args = ("upgrade", "kubemtls", chart, "-n", ns, "--reuse-values")
        chartkit.run_tool(kc, helm, *args, "--set", "replicaCount=3")
        assert _get(kc, "deployment", "kubemtls", "-n", ns)["spec"]["replicas"] == 3
        (hook,) = _get(kc, "mutatingwebhookconfiguration", HOOK)["webhooks"]
        assert hook["clientConfig"]["caBundle"] == bundle
        assert hook["clientConfig"]["service"]["path"] == "/inject"

        chartkit.run_tool(kc, helm, "uninstall", "kubemtls", "-n", ns)
        assert not _exists(kc, "mutatingwebhookconfiguration", HOOK)
        assert not _exists(kc, "deployment", "kubemtls", "-n", ns)
        assert not _exists(kc, "clusterrole", "kubemtls")
        assert _exists(kc, "crd", "mtlscerts.kubemtls.io")  # crds/ outlive the release
