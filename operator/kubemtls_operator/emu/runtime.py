"""Run the emulated API server inside an existing event loop (tests, the demo).

``async with serve(crds=[...]) as api:`` gives ``api.url``, ``api.emulator`` (to read
``api.emulator.store`` or seed tokens) and ``api.write_kubeconfig(path)``.
"""

from __future__ import annotations

import contextlib
import copy
import dataclasses
import pathlib
from collections.abc import AsyncIterator
from typing import Any

import aiohttp.web

from kubemtls_operator.emu import server


@dataclasses.dataclass
class RunningAPI:
    url: str
    emulator: Any

    def write_kubeconfig(self, path: str | pathlib.Path, namespace: str = "default") -> None:
        server.write_kubeconfig(str(path), self.url, "emulator-token", namespace, None)


@contextlib.asynccontextmanager
async def serve(
    *,
    crd_files: list[str] | None = None,
    admission: bool = False,
    tokens: dict[str, Any] | None = None,
    check_pods: bool = False,
    port: int = 0,
    verbose: bool = False,
) -> AsyncIterator[RunningAPI]:
    emu = server.Emulator()
    emu.resources.load_bundled()
    emu.api_audiences = ["https://kubernetes.default.svc.cluster.local"]
    emu.server_version = "1.36.0"
    emu.check_pods = check_pods
    emu.admission = admission
    emu.verbose = verbose
    if tokens:
        emu.tokens, emu.initial_tokens = copy.deepcopy(tokens), copy.deepcopy(tokens)
    emu.seed(server.load_crds(crd_files or []))
    async with emu:
        runner = aiohttp.web.ServerRunner(
            aiohttp.web.Server(emu, handler_cancellation=True),
            handle_signals=False,
            shutdown_timeout=1.0,
        )
        await runner.setup()
        site = aiohttp.web.TCPSite(runner, "127.0.0.1", port, shutdown_timeout=1.0)
        await site.start()
        bound = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            yield RunningAPI(url=f"http://127.0.0.1:{bound}", emulator=emu)
        finally:
            emu.close_watches()
            await runner.cleanup()
