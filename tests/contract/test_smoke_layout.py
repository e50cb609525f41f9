"""The distribution's layout: no package shadows the standard library."""

import inspect
import operator
import subprocess
import sys

from testkit import REPO


def test_stdlib_operator_is_not_shadowed() -> None:
    assert "site-packages" not in inspect.getfile(operator)
    out = subprocess.run(
        [sys.executable, "-c", "import operator, inspect; print(inspect.getfile(operator))"],
        cwd=REPO,
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    assert out.strip().endswith("/lib/python3.11/operator.py"), out


async def test_emulator_serves_the_crd(k8s) -> None:
    import aiohttp

    async with aiohttp.ClientSession() as s, s.get(f"{k8s.url}/apis/kubemtls.io/v1alpha1") as r:
        body = await r.json()
    assert any(res["name"] == "mtlscerts" for res in body["resources"])
