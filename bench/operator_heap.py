"""Where the operator's memory goes with many MTLSCerts: tracemalloc, by line and by caller.

Debug tooling, not a production feature: this script starts the emulator and the operator
exactly as ``signing_bench.py`` does, but runs the operator through this file's ``--child``
mode, which starts ``tracemalloc`` before importing anything and writes a snapshot when it
gets SIGUSR1. It snapshots the idle operator, runs the RSS phase of ``signing_bench.py``
(``--certs`` opted-in pods → their MTLSCerts, each with a status), snapshots again, and
prints what grew: by file:line, and by the first frame outside the stdlib/asyncio (so kopf's
per-object state shows up under the kopf line that made it). RSS under tracemalloc is
higher than without it (it keeps a trace per block); the live-object figures are exact.

    .venv/bin/python bench/operator_heap.py [--certs 10000] [--frames 12] [--top 40]
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import os
import pathlib
import signal
import sys
import tempfile
import time
import tracemalloc
from typing import Any

HERE = pathlib.Path(__file__).resolve().parent
SNAPSHOT_ENV = "BENCH_HEAP_SNAPSHOT"
EXEC_ENV = "BENCH_HEAP_EXEC"


def child(frames: int) -> None:
    """The operator, traced: SIGUSR1 → a GC, then a snapshot to $BENCH_HEAP_SNAPSHOT.N.

    ``frames`` 0: not traced (RSS as in production; SIGUSR2 inspection only)."""
    if frames:
        tracemalloc.start(frames)
    target = os.environ[SNAPSHOT_ENV]
    count = [0]

    def dump(*_: Any) -> None:
        gc.collect()
        snap = tracemalloc.take_snapshot()
        path = f"{target}.{count[0]}"
        snap.dump(path + ".tmp")
        os.replace(path + ".tmp", path)
        count[0] += 1

    def run_script(*_: Any) -> None:  # SIGUSR2: exec $BENCH_HEAP_EXEC (ad-hoc inspection)
        code = pathlib.Path(os.environ[EXEC_ENV]).read_text()
        exec(compile(code, os.environ[EXEC_ENV], "exec"), {"__name__": "heap_exec"})  # noqa: S102

    signal.signal(signal.SIGUSR1, dump)
    if os.environ.get(EXEC_ENV):
        signal.signal(signal.SIGUSR2, run_script)
    from kubemtls_operator import __main__ as op

    sys.exit(op.main([]))


def _snapshot(pid: int, target: str, n: int) -> tracemalloc.Snapshot:
    os.kill(pid, signal.SIGUSR1)
    path = pathlib.Path(f"{target}.{n}")
    deadline = time.time() + 300
    while not path.exists():
        if time.time() > deadline:
            raise SystemExit("no snapshot from the operator")
        time.sleep(0.2)
    return tracemalloc.Snapshot.load(str(path))


def _outside(tb: tracemalloc.Traceback) -> str:
    """The innermost frame in kopf or our code (the allocation's real owner)."""
    for frame in reversed(tb):  # most recent call last → iterate from the innermost
        name = frame.filename
        if "/kopf/" in name or "kubemtls" in name or "aiohttp" in name:
            return f"{name.split('site-packages/')[-1].split('/main/')[-1]}:{frame.lineno}"
    f = tb[-1]
    return f"{f.filename.split('/')[-1]}:{f.lineno}"


def report(before: tracemalloc.Snapshot, after: tracemalloc.Snapshot, top: int, n: int) -> None:
    print(f"\n== growth by file:line (bytes per MTLSCert at n={n}) ==")
    for st in after.compare_to(before, "lineno")[:top]:
        f = st.traceback[0]
        name = f.filename.split("site-packages/")[-1].split("/main/")[-1]
        print(f"{st.size_diff / 1024:9.0f} KiB {st.size_diff / n:7.0f} B  {name}:{f.lineno}")
    print("\n== growth by owner (innermost kopf/aiohttp/kubemtls frame) ==")
    sizes: dict[str, int] = {}
    for st in after.compare_to(before, "traceback"):
        key = _outside(st.traceback)
        sizes[key] = sizes.get(key, 0) + st.size_diff
    for key, size in sorted(sizes.items(), key=lambda kv: -kv[1])[:top]:
        print(f"{size / 1024:9.0f} KiB {size / n:7.0f} B  {key}")
    total_b = sum(s.size for s in before.statistics("filename"))
    total_a = sum(s.size for s in after.statistics("filename"))
    print(f"\ntraced: {total_b / 2**20:.1f} → {total_a / 2**20:.1f} MiB")


async def run(args: argparse.Namespace) -> None:
    sys.path.insert(0, str(HERE))
    import aiohttp
    import signing_bench as sb

    with tempfile.TemporaryDirectory() as tmp:
        target = str((args.keep or pathlib.Path(tmp)) / "heap")
        os.environ[SNAPSHOT_ENV] = target
        os.environ["BENCH_OPERATOR_CMD"] = f"{__file__} --child --frames {args.frames}"
        cl = sb.Cluster(pathlib.Path(tmp), args.check_interval)
        cl.start()
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=128)) as s:
                await sb.wait_healthy(s, cl.health)
                await asyncio.sleep(2)
                traced = args.frames > 0
                before = _snapshot(cl.operator_pid, target, 0) if traced else None
                idle = sb.rss_mib(cl.operator_pid)
                out = await sb.rss(cl, s, args.certs)
                print(json.dumps({"traced": traced, "rss_idle_mib": round(idle, 1), **out}))
                if before is not None:
                    report(before, _snapshot(cl.operator_pid, target, 1), args.top, args.certs)
                if args.hold:
                    print(f"holding {args.hold}s: operator pid {cl.operator_pid}", flush=True)
                    await asyncio.sleep(args.hold)
        finally:
            cl.stop()


def main() -> None:
    ap = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--certs", type=int, default=10000)
    ap.add_argument("--frames", type=int, default=12, help="0: no tracemalloc")
    ap.add_argument("--top", type=int, default=40)
    ap.add_argument("--check-interval", type=float, default=10.0)
    ap.add_argument("--keep", type=pathlib.Path, help="keep the snapshots in this directory")
    ap.add_argument(
        "--hold",
        type=float,
        default=0.0,
        help="keep the cluster up this long after the last snapshot (kill -USR2 the operator "
        "to exec the file named by $BENCH_HEAP_EXEC in it)",
    )
    args = ap.parse_args()
    if args.child:
        child(args.frames)
    else:
        asyncio.run(run(args))


if __name__ == "__main__":
    main()
