"""The distribution: what the wheel holds, and that nothing shadows the standard library.

The wheel is built once per session, offline, with the hatchling already in the venv
(``pip wheel --no-build-isolation``), and installed with ``pip install --target`` into a
temporary directory: a real non-editable install, without a slow fresh venv.
"""

from __future__ import annotations

import ast
import configparser
import inspect
import operator
import os
import pathlib
import subprocess
import sys
import sysconfig
import zipfile

import aiohttp
import pytest
import testkit

PACKAGES = ("kubemtls_operator", "kubemtls_sidecar")
SCRIPTS = {
    "kubemtls": "kubemtls_operator.cli:main",
    "kubemtls-operator": "kubemtls_operator.__main__:main",
    "kubemtls-sidecar": "kubemtls_sidecar.__main__:main",
}
STDLIB = pathlib.Path(sysconfig.get_paths()["stdlib"]).resolve()


def pip(*args: str, cwd: pathlib.Path = testkit.REPO) -> None:
    subprocess.run(
        [sys.executable, "-m", "pip", "--disable-pip-version-check", "-q", *args],
        cwd=cwd,
        check=True,
        timeout=120,
        capture_output=True,
    )


@pytest.fixture(scope="session")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    out = tmp_path_factory.mktemp("wheel")
    pip("wheel", "--no-deps", "--no-build-isolation", "--no-index", ".", "-w", str(out))
    (built,) = out.glob("kubemtls-*.whl")
    return built


@pytest.fixture(scope="session")
def names(wheel: pathlib.Path) -> list[str]:
    with zipfile.ZipFile(wheel) as z:
        return z.namelist()


@pytest.fixture(scope="session")
def installed(wheel: pathlib.Path, tmp_path_factory: pytest.TempPathFactory) -> pathlib.Path:
    """The wheel installed (no dependencies: the venv has them) into a target directory."""
    target = tmp_path_factory.mktemp("site")
    pip("install", "--no-deps", "--no-index", "--target", str(target), str(wheel))
    return target


def test_wheel_holds_exactly_our_two_packages(names: list[str]) -> None:
    tops = {n.split("/", 1)[0] for n in names}
    assert tops == {*PACKAGES, "kubemtls-0.1.0.dist-info"}, tops
    assert "operator" not in tops  # the folder is stripped; a package would shadow the stdlib
    assert "tests" not in tops
    assert "sidecar" not in tops
    for package in PACKAGES:
        assert f"{package}/__init__.py" in names
        assert f"{package}/py.typed" in names
    assert not [n for n in names if "__pycache__" in n or n.endswith(".pyc")]


def test_wheel_carries_the_crd_identical_to_the_charts(wheel: pathlib.Path) -> None:
    chart_crd = (testkit.REPO / "charts/kubemtls/crds/mtlscerts.yaml").read_bytes()
    with zipfile.ZipFile(wheel) as z:
        assert z.read("kubemtls_operator/data/mtlscerts.yaml") == chart_crd


def test_wheel_declares_the_console_scripts(wheel: pathlib.Path, names: list[str]) -> None:
    with zipfile.ZipFile(wheel) as z:
        entry_points = configparser.ConfigParser()
        entry_points.read_string(z.read("kubemtls-0.1.0.dist-info/entry_points.txt").decode())
        metadata = z.read("kubemtls-0.1.0.dist-info/METADATA").decode()
        sources = {n: z.read(n).decode() for n in names if n.endswith(".py")}
    assert dict(entry_points["console_scripts"]) == SCRIPTS
    assert "Requires-Python: >=3.11" in metadata
    for target in SCRIPTS.values():
        module, func = target.split(":")
        path = module.replace(".", "/") + ".py"
        assert path in sources, f"{target}: {path} is not in the wheel"
        tree = ast.parse(sources[path])
        defined = {n.name for n in tree.body if isinstance(n, ast.FunctionDef)}
        assert func in defined, f"{target}: no function {func} in {path}"


def test_installed_wheel_imports_and_finds_its_crd(installed: pathlib.Path) -> None:
    """From the repo root (where ``operator/`` is a folder), with the wheel on the path."""
    code = (
        "import inspect, operator, kubemtls_operator, kubemtls_sidecar\n"
        "from kubemtls_operator import crd, pki\n"
        "print(inspect.getfile(operator))\n"
        "print(kubemtls_operator.__file__)\n"
        "print(crd.crd_path())\n"
        "print(crd.load_crd()['metadata']['name'])\n"
    )
    env = {**os.environ, "PYTHONPATH": str(installed)}
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=testkit.REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    ).stdout.splitlines()
    stdlib_operator, package_file, crd_file, crd_name = out
    assert pathlib.Path(stdlib_operator).resolve() == STDLIB / "operator.py"
    assert pathlib.Path(package_file).is_relative_to(installed)
    assert pathlib.Path(crd_file).is_relative_to(installed)  # package data, not the repo
    assert crd_name == "mtlscerts.kubemtls.io"


def test_stdlib_operator_is_not_shadowed_from_the_repo_root() -> None:
    assert pathlib.Path(inspect.getfile(operator)).resolve() == STDLIB / "operator.py"
    out = subprocess.run(
        [sys.executable, "-c", "import inspect, operator; print(inspect.getfile(operator))"],
        cwd=testkit.REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert pathlib.Path(out.strip()).resolve() == STDLIB / "operator.py"


def test_the_layout_rules_hold() -> None:
    """Nothing but the package in operator/ and sidecar/; no __init__.py under tests/."""
    for folder, package in (("operator", "kubemtls_operator"), ("sidecar", "kubemtls_sidecar")):
        extra = {p.name for p in (testkit.REPO / folder).iterdir()} - {package, "README.md"}
        assert not extra, (
            f"{folder}/ must hold only {package}/ (editable installs add it to sys.path): {extra}"
        )
        assert not (testkit.REPO / folder / "__init__.py").exists()
    assert not list((testkit.REPO / "tests").rglob("__init__.py"))


async def test_the_emulator_serves_our_crd(k8s: object) -> None:
    url = f"{k8s.url}/apis/kubemtls.io/v1alpha1"  # type: ignore[attr-defined]
    async with aiohttp.ClientSession() as s, s.get(url) as r:
        body = await r.json()
    assert any(res["name"] == "mtlscerts" for res in body["resources"])
