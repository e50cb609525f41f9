"""Helpers for the chart tests: `helm template` as a function, manifests as dicts.

Imported as ``from chart import chartkit`` (tests/ is on pythonpath; tests/chart is a
namespace package, never given an ``__init__.py``). helm comes from scripts/bootstrap.sh
(`.tools/bin/helm`) or PATH; its cache, config and data go to a temporary directory, so
the tests never touch $HOME. Renders are cached per set of values: they are pure.
"""

from __future__ import annotations

import functools
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Any

import pytest
import yaml
from testkit import REPO

CHART = REPO / "charts" / "kubemtls"
RELEASE = "kubemtls"
NAMESPACE = "kubemtls"

Manifest = dict[str, Any]


def helm_binary() -> str | None:
    local = REPO / ".tools" / "bin" / "helm"
    if local.is_file() and os.access(local, os.X_OK):
        return str(local)
    return shutil.which("helm")


@functools.cache
def _helm_env() -> dict[str, str]:
    home = pathlib.Path(tempfile.mkdtemp(prefix="kubemtls-helm-"))
    env = dict(os.environ)
    for var in ("HELM_CACHE_HOME", "HELM_CONFIG_HOME", "HELM_DATA_HOME"):
        env[var] = str(home / var.lower())
    return env


def run_helm(*args: str) -> subprocess.CompletedProcess[str]:
    """Run helm with a throwaway home; never raises on a non-zero exit."""
    helm = helm_binary()
    if helm is None:
        pytest.skip("helm not installed: run scripts/bootstrap.sh")
    return subprocess.run(
        [helm, *args], capture_output=True, text=True, env=_helm_env(), timeout=60, check=False
    )


@functools.cache
def _render_cached(sets: tuple[str, ...], kube_version: str) -> tuple[Manifest, ...]:
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--include-crds"]
    args += ["--kube-version", kube_version]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(*args)
    assert proc.returncode == 0, proc.stderr
    return tuple(d for d in yaml.safe_load_all(proc.stdout) if d)


def render(*sets: str, kube_version: str = "1.29.0") -> list[Manifest]:
    """`helm template` with these `--set` values; every manifest as a dict."""
    return list(_render_cached(tuple(sets), kube_version))


def render_error(*sets: str, kube_version: str = "1.29.0") -> str:
    """`helm template` that must fail; returns its error output."""
    args = ["template", RELEASE, str(CHART), "-n", NAMESPACE, "--kube-version", kube_version]
    for s in sets:
        args += ["--set", s]
    proc = run_helm(*args)
    assert proc.returncode != 0, f"helm template {sets} should have failed"
    return proc.stderr


def find(manifests: list[Manifest], kind: str, name: str | None = None) -> Manifest:
    """The one manifest of this kind (and name)."""
    hits = [
        m
        for m in manifests
        if m["kind"] == kind and (name is None or m["metadata"]["name"] == name)
    ]
    assert len(hits) == 1, f"{kind} {name or ''}: {len(hits)} found"
    return hits[0]


def kinds(manifests: list[Manifest]) -> list[str]:
    return sorted(m["kind"] for m in manifests)
