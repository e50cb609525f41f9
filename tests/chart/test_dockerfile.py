"""The Dockerfile builds the two images DESIGN.md names, and passes hadolint.

No container engine runs here, so the file is checked statically: hadolint's rules, then
what our images promise (pinned base, non-root users matching the chart and the contract,
console-script entrypoints, no compilers in final stages, and a sidecar image that carries
exactly the third-party packages the sidecar imports, plus uvloop, the event loop its
data path is measured with).
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib

import pytest
from kubemtls_sidecar import contract
from testkit import REPO

DOCKERFILE = REPO / "Dockerfile"
SIDECAR_DEPS = {"cryptography", "h11", "prometheus_client"}
# Imported inside ``except ImportError`` (the sidecar runs without it), but shipped: the
# benchmarks measure the sidecar on uvloop, and the stdlib loop costs more CPU per request.
SIDECAR_ACCELERATORS = {"uvloop"}


def _instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    out: list[tuple[str, str]] = []
    buf = ""
    heredoc: str | None = None
    for line in DOCKERFILE.read_text().splitlines():
        if heredoc is not None:
            heredoc = None if line.strip() == heredoc else heredoc
            continue
        if not buf and (not line.strip() or line.lstrip().startswith("#")):
            continue
        if buf and line.lstrip().startswith("#"):
            continue
        buf += " " + line.strip().removesuffix("\\")
        if not line.rstrip().endswith("\\"):
            word, _, rest = buf.strip().partition(" ")
            out.append((word.upper(), rest.strip()))
            buf = ""
    return out


def _stages() -> dict[str, list[tuple[str, str]]]:
    stages: dict[str, list[tuple[str, str]]] = {}
    current: list[tuple[str, str]] = []
    for word, rest in _instructions():
        if word == "FROM":
            name = rest.split(" AS ")[-1].strip() if " AS " in rest else rest
            current = stages.setdefault(name, [])
        current.append((word, rest))
    return stages


def test_hadolint_passes() -> None:
    hadolint = str(REPO / ".venv" / "bin" / "hadolint")
    if not (REPO / ".venv" / "bin" / "hadolint").exists():
        hadolint = shutil.which("hadolint") or pytest.skip("hadolint not installed (dev extra)")
    proc = subprocess.run(
        [hadolint, str(DOCKERFILE)], capture_output=True, text=True, cwd=REPO, check=False
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_two_targets_from_a_pinned_python_311() -> None:
    stages = _stages()
    assert {"builder", "operator", "sidecar"} <= set(stages)
    bases = {rest.split(" AS ")[0] for word, rest in _instructions() if word == "FROM"}
    (base,) = bases  # one base image for every stage
    assert re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base), base


def test_final_stages_run_as_the_right_non_root_users() -> None:
    stages = _stages()
    users = {
        name: [r for w, r in stages[name] if w == "USER"][-1] for name in ("operator", "sidecar")
    }
    assert users["sidecar"] == f"{contract.SIDECAR_UID}:{contract.SIDECAR_GID}"
    operator_uid = int(users["operator"].split(":")[0])
    assert operator_uid != 0
    chart = (REPO / "charts" / "kubemtls" / "templates" / "deployment.yaml").read_text()
    assert f"runAsUser: {operator_uid}" in chart


def test_entrypoints_are_console_scripts() -> None:
    scripts = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["scripts"]
    stages = _stages()
    for name, script in (("operator", "kubemtls-operator"), ("sidecar", "kubemtls-sidecar")):
        (entry,) = [r for w, r in stages[name] if w == "ENTRYPOINT"]
        assert entry == f'["{script}"]'
        assert script in scripts
    assert contract.SIDECAR_COMMAND == ("kubemtls-sidecar",)


def test_final_stages_install_wheels_only_and_no_build_tools() -> None:
    stages = _stages()
    for name in ("operator", "sidecar"):
        runs = " ".join(r for w, r in stages[name] if w == "RUN")
        assert "--no-index" in runs  # only the builder's wheels: nothing built here
        assert not re.search(r"\b(gcc|g\+\+|build-essential|make|git)\b", runs), name
        assert not [r for w, r in stages[name] if w in {"COPY", "ADD"}], f"{name} copies files"
        if "apt-get install" in runs:
            assert "--no-install-recommends" in runs
            assert "rm -rf /var/lib/apt/lists/*" in runs
    sidecar_runs = " ".join(r for w, r in stages["sidecar"] if w == "RUN")
    assert "iptables" in sidecar_runs  # kubemtls-init runs iptables-restore
    assert "--no-deps" in sidecar_runs  # not kopf, kubernetes, aiohttp


def test_sidecar_image_carries_what_the_sidecar_imports() -> None:
    """Third-party imports of kubemtls_sidecar (outside `except ImportError`) = SIDECAR_DEPS;
    the image carries them and SIDECAR_ACCELERATORS (optional imports), nothing else."""
    required: set[str] = set()
    optional_names: set[str] = set()
    for path in (REPO / "sidecar" / "kubemtls_sidecar").rglob("*.py"):
        tree = ast.parse(path.read_text())
        optional = {
            id(node)
            for t in ast.walk(tree)
            if isinstance(t, ast.Try) and any(_catches_import_error(h) for h in t.handlers)
            for stmt in t.body
            for node in ast.walk(stmt)
        }
        for node in ast.walk(tree):
            if id(node) in optional:
                if isinstance(node, ast.Import):
                    optional_names |= {a.name.split(".")[0] for a in node.names}
                continue
            if isinstance(node, ast.Import):
                required |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
                required.add(node.module.split(".")[0])
    third_party = {m for m in required if m not in sys.stdlib_module_names} - {"kubemtls_sidecar"}
    assert third_party == SIDECAR_DEPS
    builder = " ".join(r for w, r in _stages()["builder"] if w == "RUN")
    assert optional_names >= SIDECAR_ACCELERATORS
    shipped = SIDECAR_DEPS | SIDECAR_ACCELERATORS
    for dep in shipped:
        assert f"'{dep}-*.whl'" in builder, dep
    assert f"-eq {len(shipped)}" in builder


def _catches_import_error(handler: ast.ExceptHandler) -> bool:
    names = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return any(
        isinstance(n, ast.Name) and n.id in {"ImportError", "ModuleNotFoundError"} for n in names
    )


def test_build_context_keeps_what_the_wheel_needs() -> None:
    ignore = (REPO / ".dockerignore").read_text().splitlines()
    assert ignore[ignore.index("*") + 1 :][:5] == [
        "!pyproject.toml",
        "!README.md",
        "!operator/",
        "!sidecar/",
        "!charts/kubemtls/crds/mtlscerts.yaml",
    ]
    include = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["hatch"]["build"][
        "targets"
    ]["wheel"]["force-include"]
    assert set(include) == {"charts/kubemtls/crds/mtlscerts.yaml"}
