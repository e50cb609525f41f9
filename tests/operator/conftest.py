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
import operatorkit
import pytest
from operatorkit import Api, OperatorHandle, StartOperator, _wait_ca, _wait_listening


@pytest.fixture
async def api(k8s: Any) -> AsyncIterator[Api]:
    async with aiohttp.ClientSession() as s:
        yield Api(k8s.url, s)


@pytest.fixture
async def start_operator(
    k8s: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[StartOperator]:
    handles: list[OperatorHandle] = []
    operatorkit.use_emulator(k8s, tmp_path, monkeypatch)

    async def start(*, wait_ca: bool = True, **settings: Any) -> OperatorHandle:
        env = operatorkit.operator_env(**settings)
        operatorkit.set_operator_env(monkeypatch, env)
        handle = operatorkit.run_operator(env)
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
