"""The operator process's memory hygiene (``kubemtls_operator.memory``).

What is kept out (the ``kubernetes`` client kopf would import), what kopf shares instead of
copying per object (the memo), and the heap trim; and that a real ``kubemtls-operator``
process with all of it still converges: pod → MTLSCert → a signed certificate → Issued.
"""

from __future__ import annotations

import asyncio
import copy
import ctypes.util
import os
import pathlib
import signal
import subprocess
import sys
from typing import Any

import aiohttp
import kopf
import operatorkit
import pytest
from kubemtls_operator import memory
from kubemtls_sidecar import contract
from operatorkit import Api, _issued, _until, make_csr, ready_pod, sign


def test_the_operator_entry_point_never_loads_the_kubernetes_client() -> None:
    code = (
        "import sys\n"
        "import kubemtls_operator.__main__, kubemtls_operator.handlers\n"
        "print(sys.modules.get('kubernetes', 'absent'), 'pydantic' in sys.modules)\n"
        "try:\n"
        "    import kubernetes\n"
        "except ImportError:\n"
        "    print('blocked')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.split()
    assert out == ["None", "False", "blocked"]


def test_a_client_imported_already_is_left_alone() -> None:
    import kubernetes  # the test process has it (kopf imported it), as any embedder may

    assert memory.prepare_process() == []
    assert sys.modules["kubernetes"] is kubernetes


def test_the_shared_memo_is_never_copied_and_kopfs_own_is() -> None:
    shared = memory.shared_memo(config="cfg")
    assert isinstance(shared, kopf.Memo)
    assert copy.copy(shared) is shared
    assert copy.deepcopy(shared) is shared
    assert shared.config == "cfg"
    plain = kopf.Memo(config="cfg")
    assert copy.copy(plain) is not plain


async def test_kopf_hands_every_object_the_one_shared_memo(
    k8s: Any, tmp_path: pathlib.Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Real kopf against the emulator: each pod's handler gets the memo itself, with what
    the startup handler put on it."""
    operatorkit.use_emulator(k8s, tmp_path, monkeypatch)
    registry = kopf.OperatorRegistry()
    seen: dict[str, tuple[int, Any]] = {}

    @kopf.on.login(registry=registry)
    def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.ConnectionInfo | None:
        return kopf.login_with_kubeconfig(settings=settings)

    @kopf.on.startup(registry=registry)
    async def startup(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
        settings.posting.enabled = False
        memo.runtime = "runtime"

    @kopf.on.event("v1", "pods", registry=registry)
    async def event(memo: kopf.Memo, name: str, **_: Any) -> None:
        seen[name] = (id(memo), memo.get("runtime"))

    base = memory.shared_memo(config="cfg")
    stop = asyncio.Event()
    task = asyncio.create_task(
        kopf.operator(
            registry=registry, memo=base, clusterwide=True, standalone=True, stop_flag=stop
        )
    )
    try:
        async with aiohttp.ClientSession() as s:
            api = Api(k8s.url, s)
            for name in ("p1", "p2", "p3"):
                await api.create_pod(name)

            async def all_seen() -> bool:
                return {"p1", "p2", "p3"} <= set(seen)

            await _until(all_seen, timeout=20)
    finally:
        stop.set()
        await asyncio.wait_for(task, 20)
    assert {seen[n] for n in ("p1", "p2", "p3")} == {(id(base), "runtime")}


#: Run in a fresh interpreter (what this test process did before, its threads and their
#: arenas, is not in it): ~25 MiB of glibc heap freed in 64 KiB holes, each pinned by the
#: 1 KiB block after it, so that only malloc_trim can give them back. Trims first: the blocks
#: would otherwise reuse resident heap freed earlier, and never show in RSS.
_HOLES = """
import asyncio, pathlib, sys
from kubemtls_operator import memory

def rss_anon_kib():
    for line in pathlib.Path("/proc/self/status").read_text().splitlines():
        if line.startswith("RssAnon:"):
            return int(line.split()[1])

def holes():
    memory.trim()
    blocks = [(bytearray(64 * 1024), bytearray(1024)) for _ in range(400)]
    for b in blocks:
        b[0][::4096] = b"\\1" * 16  # touch every page
    return [pin for _, pin in blocks]
"""


def _run(code: str) -> list[str]:
    if memory._libc() is None:
        # malloc_trim/mallopt exist only in glibc (musl, macOS); CI and the images run glibc.
        pytest.skip("not glibc")
    run = subprocess.run(
        [sys.executable, "-c", _HOLES + code], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stderr
    return run.stdout.split()


def test_trim_gives_freed_heap_back() -> None:
    released, kib = _run(
        "pins = holes()\nbefore = rss_anon_kib()\nprint(memory.trim(), before - rss_anon_kib())\n"
    )
    assert released == "True"
    assert int(kib) > 8 * 1024


def test_the_trim_task_gives_a_bursts_heap_back() -> None:
    """The task notices the grown RSS by itself and trims (no sweep, no call)."""
    (kib,) = _run(
        "async def main():\n"
        "    task = asyncio.create_task(memory.keep_trimmed(interval=0.05, growth=1 << 20))\n"
        "    await asyncio.sleep(0)  # one loop turn: the task has taken its floor\n"
        "    pins = holes()  # no await in between: it sees the heap after the burst only\n"
        "    grown = rss_anon_kib()\n"
        "    for _ in range(200):\n"
        "        await asyncio.sleep(0.05)\n"
        "        if rss_anon_kib() < grown - 8 * 1024:\n"
        "            break\n"
        "    task.cancel()\n"
        "    print(grown - rss_anon_kib())\n"
        "asyncio.run(main())\n"
    )
    assert int(kib) > 8 * 1024


def test_the_arena_limit_holds_for_threads_started_after_it() -> None:
    if memory._libc() is None:
        # malloc_trim/mallopt exist only in glibc (musl, macOS); CI and the images run glibc.
        pytest.skip("not glibc")
    code = (
        "import ctypes, sys, threading\n"
        "from kubemtls_operator import memory\n"
        "print(memory.limit_arenas() if sys.argv[1] == '1' else 'default', flush=True)\n"
        "keep, barrier = [], threading.Barrier(6)\n"
        "def work():\n"
        "    keep.append(bytearray(4096))\n"
        "    barrier.wait()\n"
        "ts = [threading.Thread(target=work) for _ in range(6)]\n"
        "[t.start() for t in ts]\n"
        "[t.join() for t in ts]\n"
        "ctypes.CDLL('libc.so.6').malloc_stats()\n"
    )

    def arenas(limit: str) -> tuple[str, int]:
        run = subprocess.run(
            [sys.executable, "-c", code, limit], capture_output=True, text=True, timeout=60
        )
        return run.stdout.strip(), run.stderr.count("Arena ")

    assert arenas("1") == ("True", memory.ARENA_MAX)
    _, n = arenas("0")
    assert n > memory.ARENA_MAX


def test_trim_is_a_no_op_without_glibc(monkeypatch: pytest.MonkeyPatch) -> None:
    memory._libc.cache_clear()
    # No C library to load under that name: as on a system without glibc's malloc_trim.
    monkeypatch.setattr(ctypes.util, "find_library", lambda _: "libkubemtls-no-such-libc.so.0")
    try:
        assert memory._libc() is None
        assert memory.trim() is False
    finally:
        memory._libc.cache_clear()


async def test_the_operator_process_converges_with_all_of_it(
    k8s: Any, tmp_path: pathlib.Path
) -> None:
    """``python -m kubemtls_operator`` (shared memo, no kubernetes client): a pod gets its
    MTLSCert, a certificate is signed and recorded, and the client stack never got mapped."""
    kubeconfig = tmp_path / "kubeconfig"
    k8s.write_kubeconfig(kubeconfig)
    ports = {n: operatorkit.free_port() for n in operatorkit.PORT_SETTINGS}
    settings = operatorkit.operator_env(ports)
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("KUBEMTLS_")},
        "KUBECONFIG": str(kubeconfig),
        **{contract.OPERATOR_ENV_PREFIX + k: v for k, v in settings.items()},
    }
    log = tmp_path / "operator.log"
    with log.open("wb") as out:
        proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "kubemtls_operator", env=env, stdout=out, stderr=out
        )
    try:
        async with aiohttp.ClientSession() as s:
            api = Api(k8s.url, s)
            health = f"http://127.0.0.1:{ports['HEALTH_PORT']}/healthz"

            async def healthy() -> bool:
                assert proc.returncode is None, log.read_text()[-2000:]
                try:
                    async with s.get(health) as r:
                        return bool((await r.json()).get("ca") == "ok")
                except aiohttp.ClientConnectionError:
                    return False

            await _until(healthy, timeout=30)
            token, ca_pem = await ready_pod(api, "app-1")
            handle = _Signer(f"https://127.0.0.1:{ports['SIGNER_PORT']}")
            status, body = await sign(handle, ca_pem, token, {"csr": make_csr()[1]})
            assert status == 200, body
            cert = await _until(lambda: _issued(api, "app-1"), timeout=20)
            assert cert["status"]["serial"]
            maps = pathlib.Path(f"/proc/{proc.pid}/maps").read_text()
            assert "pydantic_core" not in maps
    finally:
        if proc.returncode is None:
            proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(proc.wait(), 15)
            except TimeoutError:
                proc.kill()
                await proc.wait()


class _Signer:
    """What ``operatorkit.sign`` needs of an operator: its signing URL."""

    def __init__(self, url: str) -> None:
        self.signer_url = url
