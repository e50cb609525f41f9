"""The import contracts hold, and they would catch a violation.

``lint-imports`` runs on the real tree; then on a copy of both packages with forbidden
imports planted in it (direct and indirect), to prove the configured contracts can fail.
"""

from __future__ import annotations

import os
import pathlib
import shutil
import subprocess
import sys
import tomllib
from typing import Any

import pytest
import testkit

LINT_IMPORTS = pathlib.Path(sys.executable).with_name("lint-imports")
SIDECAR_FORBIDDEN = {"kubemtls_operator", "kopf", "kubernetes", "kmock"}
IO_LIBRARIES = {"kopf", "kubernetes", "aiohttp", "kmock"}
PURE_MODULES = {
    "kubemtls_operator.pki",
    "kubemtls_operator.keys",
    "kubemtls_operator.authority",
    "kubemtls_operator.crl",
    "kubemtls_operator.annotations",
    "kubemtls_operator.injection",
    "kubemtls_sidecar.certs",
    "kubemtls_sidecar.contract",
}


def lint_imports(cwd: pathlib.Path, *pythonpath: pathlib.Path) -> subprocess.CompletedProcess[str]:
    env = dict(os.environ)
    if pythonpath:
        env["PYTHONPATH"] = os.pathsep.join(map(str, pythonpath))
    return subprocess.run(
        [str(LINT_IMPORTS), "--no-cache", "--config", str(cwd / "pyproject.toml")],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=90,
        check=False,
    )


def contracts() -> list[dict[str, Any]]:
    config = tomllib.loads((testkit.REPO / "pyproject.toml").read_text())["tool"]["importlinter"]
    assert config["include_external_packages"] is True  # else kopf & co. are invisible
    assert set(config["root_packages"]) == {"kubemtls_operator", "kubemtls_sidecar"}
    return list(config["contracts"])


def test_the_contracts_name_what_they_forbid() -> None:
    configured = contracts()
    assert all(c["type"] == "forbidden" for c in configured)
    assert not any(c.get("allow_indirect_imports") for c in configured)
    sidecar = [c for c in configured if c["source_modules"] == ["kubemtls_sidecar"]]
    assert len(sidecar) == 1
    assert set(sidecar[0]["forbidden_modules"]) >= SIDECAR_FORBIDDEN
    pure = [c for c in configured if set(c["source_modules"]) >= PURE_MODULES]
    assert len(pure) == 1, "the pure-core contract must list every pure module"
    assert set(pure[0]["forbidden_modules"]) >= IO_LIBRARIES


def test_the_tree_keeps_its_import_contracts() -> None:
    out = lint_imports(testkit.REPO)
    assert out.returncode == 0, out.stdout + out.stderr
    assert f"Contracts: {len(contracts())} kept, 0 broken." in out.stdout


@pytest.fixture(scope="module")
def violating_tree(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """Both packages copied, with forbidden imports planted in them."""
    root = tmp_path_factory.mktemp("violating")
    shutil.copy(testkit.REPO / "pyproject.toml", root / "pyproject.toml")
    ignore = shutil.ignore_patterns("__pycache__", "*.pyc")
    for folder, package in (("operator", "kubemtls_operator"), ("sidecar", "kubemtls_sidecar")):
        shutil.copytree(testkit.REPO / folder / package, root / folder / package, ignore=ignore)
    sidecar = root / "sidecar" / "kubemtls_sidecar"
    operator_pkg = root / "operator" / "kubemtls_operator"
    (sidecar / "planted_operator.py").write_text("from kubemtls_operator import pki\n")
    (sidecar / "planted_kopf.py").write_text("import kopf\n")
    (sidecar / "planted_kubernetes.py").write_text("from kubernetes import client\n")
    (sidecar / "planted_kmock.py").write_text("import kmock\n")
    with (sidecar / "certs.py").open("a") as f:
        f.write("\nimport aiohttp  # planted\n")
    with (operator_pkg / "keys.py").open("a") as f:
        f.write("\nimport kubernetes  # planted\n")
    # Indirect: a pure module imports one of ours that imports kopf.
    (operator_pkg / "planted_bridge.py").write_text("import kopf\n")
    with (operator_pkg / "crl.py").open("a") as f:
        f.write("\nfrom kubemtls_operator import planted_bridge  # planted\n")
    return root


def test_the_contracts_catch_planted_violations(violating_tree: pathlib.Path) -> None:
    out = lint_imports(violating_tree, violating_tree / "operator", violating_tree / "sidecar")
    report = out.stdout + out.stderr
    assert out.returncode != 0, report
    sidecar, pure = (
        next(c["name"] for c in contracts() if pred(c))
        for pred in (
            lambda c: c["source_modules"] == ["kubemtls_sidecar"],
            lambda c: set(c["source_modules"]) >= PURE_MODULES,
        )
    )
    assert f"{sidecar} BROKEN" in report, report
    assert f"{pure} BROKEN" in report, report
    for importer, imported in [
        ("kubemtls_sidecar.planted_operator", "kubemtls_operator"),
        ("kubemtls_sidecar.planted_kopf", "kopf"),
        ("kubemtls_sidecar.planted_kubernetes", "kubernetes"),
        ("kubemtls_sidecar.planted_kmock", "kmock"),
        ("kubemtls_sidecar.certs", "aiohttp"),
        ("kubemtls_operator.keys", "kubernetes"),
        ("kubemtls_operator.planted_bridge", "kopf"),  # the end of crl's indirect chain
    ]:
        assert f"{importer} -> {imported}" in report, (importer, imported, report)
    assert "kubemtls_operator.crl -> kubemtls_operator.planted_bridge" in report, report
