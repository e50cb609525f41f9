"""Operator fixtures: ``api``, ``start_operator`` (factory) and ``operator``.

See ``tests/operatorkit.py`` for what they return. ``start_operator(**settings)`` is meant
for other areas' tests too (the injection webhook's): keyword names are operator setting
names (``webhook_managed=True``, ``cert_duration="1h"``), applied as
``KUBEMTLS_OPERATOR_<NAME>``; handles stop at teardown.
"""

from __future__ import annotations

import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import kopf
import pytest
from kopf.testing import KopfRunner
from kubemtls_sidecar import contract
from operatorkit import (
    NAMESPACE,
    Api,
    OperatorHandle,
    StartOperator,
    _wait_ca,
    _wait_listening,
)
from testkit import free_port


@pytest.fixture
async def api(k8s: Any) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as s:
        yield Api(k8s.url, s)


@pytest.fixture
async def start_operator(
    k8s: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartOperator]:
    handles: list[OperatorHandle] = []
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))

    async def start(*, wait_ca: bool = True, **settings: Any) -> OperatorHandle:
        ports = {
            n: free_port() for n in ("SIGNER_PORT", "WEBHOOK_PORT", "METRICS_PORT", "HEALTH_PORT")
        }
        env = {
            "NAMESPACE": NAMESPACE,
            "BIND_ADDRESS": "127.0.0.1",
            "WEBHOOK_MANAGED": "false",
            "CHECK_INTERVAL": "0.5s",
            "CA_ROLLOVER_GRACE": "1h",
            **{k: str(v) for k, v in ports.items()},
            "SIGNER_URL": f"https://127.0.0.1:{ports['SIGNER_PORT']}",
        }
        env.update({k.upper(): str(v) for k, v in settings.items()})
        for name in list(env):
            monkeypatch.setenv(contract.OPERATOR_ENV_PREFIX + name, env[name])
        runner = KopfRunner(
            ["run", "-A", "--standalone", "-m", "kubemtls_operator.handlers"],
            settings=kopf.OperatorSettings(),
            timeout=30,
        )
        runner.__enter__()
        handle = OperatorHandle(
            runner,
            env,
            ports["SIGNER_PORT"],
            ports["WEBHOOK_PORT"],
            ports["METRICS_PORT"],
            ports["HEALTH_PORT"],
        )
        handles.append(handle)
        await _wait_listening(handle)
        if wait_ca:
            await _wait_ca(handle)
        return handle

    yield start
    for h in reversed(handles):
        await h.stop()


@pytest.fixture
async def operator(start_operator: StartOperator) -> OperatorHandle:
    return await start_operator()
