#!/usr/bin/env python3
"""User-space instructions per connection and per request of a proxy pair, under callgrind.

On a shared, noisy machine CPU microseconds per operation move by ±30 % between runs;
instruction counts do not (they repeat to within ~1 %). This runs each side of a pair
(kubemtls, optionally a reference tree of it, and HAProxy) under ``valgrind
--tool=callgrind`` with the harness's certificates, backend and OpenSSL config
(``../shared/bench/peers.py``), then counts, per side:

- ``conn``: new connections one at a time (full mTLS handshake, 1 KiB each way, close);
- ``rr``: 1 KiB request/response on 8 open connections (counters zeroed after they are
  established, so handshakes are not included).

    .venv/bin/python bench/sidecar_instructions.py                      # ~4 min
    .venv/bin/python bench/sidecar_instructions.py --ref /tmp/ref/sidecar --peers ref,kubemtls
    .venv/bin/python bench/sidecar_instructions.py --peers kubemtls --workloads rr  # ~1 min
    .venv/bin/python bench/sidecar_instructions.py --cpu --ref /tmp/ref/sidecar \
        --peers ref,kubemtls,haproxy,ref,kubemtls,haproxy --workloads rr --rr-conns 32 \
        --requests 32000     # no valgrind: user/system CPU us per request of each side

(``git archive REV sidecar | tar -x -C /tmp/ref`` gives a reference tree; a peer may be
named twice to see the run-to-run spread.) The sidecars run with ``PYTHONHASHSEED=0``
(``--hashseed``): with random seeds, which names collide in CPython's type-attribute cache
changes from run to run and moves a count by up to ~1 k instructions per request; what is
left is ~±0.3 k (the periodic work of the process during the window). Kernel work
(syscalls, loopback TCP) is not counted, and instructions are not time: a Python process
runs fewer instructions per cycle than HAProxy. The callgrind files stay in --workdir for
``callgrind_annotate``. Its default view of a dump here lists only the frames that were on
the stack when the counters were zeroed (``PyObject_Vectorcall'2`` ...); ask for every
function and for inclusive costs, then read a function's callers and callees:

    callgrind_annotate --inclusive=yes --threshold=100 --auto=no W/1-kubemtls-client.cg.1
    callgrind_annotate --inclusive=yes --threshold=100 --auto=no --tree=caller W/... >tree
    grep -B12 -E '[*]  .*:(malloc|PyEval_RestoreThread|PyBytes_FromStringAndSize) ' tree

(drop ``--inclusive=yes`` for self costs; below the stack frames they are meaningful).
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import importlib.util
import os
import pathlib
import subprocess
import sys
import time
from collections.abc import Coroutine
from typing import Any

REPO = pathlib.Path(__file__).resolve().parent.parent
HARNESS = pathlib.Path(os.environ.get("HARNESS", "/work/shared/bench/peers.py"))
if not HARNESS.exists():
    HARNESS = REPO.parent / "shared" / "bench" / "peers.py"
VG = "valgrind --tool=callgrind --dump-instr=no --callgrind-out-file={out}"
PY = str(REPO / ".venv" / "bin" / "python")
SIDECAR_ARGS = "--admin-port 0 --admin-address 127.0.0.1 --log-format json --log-level warning"
LINKS = (
    "mkdir -p {workdir}/c {workdir}/t && ln -sf {%s_cert} {workdir}/c/tls.crt && "
    "ln -sf {%s_key} {workdir}/c/tls.key && ln -sf {ca} {workdir}/t/ca.crt && "
)
CLIENT = (
    LINKS % ("client", "client")
    + "{env} PYTHONHASHSEED={hashseed} OPENSSL_CONF={openssl_conf} exec "
    + VG
    + f" {PY} -m kubemtls_sidecar --cert-dir {{workdir}}/c --trust-dir {{workdir}}/t "
    "--outbound {client_port}={server_name}:{server_port} --resolve {server_name}={host} "
    f"--tls-min-version 1.3 {SIDECAR_ARGS}"
)
SERVER = (
    LINKS % ("server", "server")
    + "{env} PYTHONHASHSEED={hashseed} OPENSSL_CONF={openssl_conf} exec "
    + VG
    + f" {PY} -m kubemtls_sidecar --cert-dir {{workdir}}/c --trust-dir {{workdir}}/t "
    "--inbound {server_port}:{host}:{backend_port} --listen-address {host} "
    f"--tls-min-version 1.3 {SIDECAR_ARGS}"
)


def load_harness() -> Any:
    spec = importlib.util.spec_from_file_location("peers", HARNESS)
    assert spec is not None
    assert spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


#: --cpu: (utime, stime) clock ticks per pid at "-z", then their growth at "-d".
CPU_TICKS: dict[int, tuple[int, int]] = {}
CPU_MODE = False  # set by --cpu


def ctl(pid: int, what: str) -> None:
    """Zero (-z) or dump (-d) a side's counters: callgrind's, or its CPU ticks (--cpu)."""
    if not CPU_MODE:
        subprocess.run(["callgrind_control", what, str(pid)], check=True, capture_output=True)
        return
    stat = pathlib.Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    ticks = (int(stat[11]), int(stat[12]))
    if what == "-z":
        CPU_TICKS[pid] = ticks
    else:
        CPU_TICKS[pid] = (ticks[0] - CPU_TICKS[pid][0], ticks[1] - CPU_TICKS[pid][1])


def last_total(prefix: str) -> int:
    """Instructions in the newest callgrind dump ``prefix.N``."""
    newest = max(glob.glob(prefix + ".*"), key=os.path.getmtime)
    total = 0
    for line in pathlib.Path(newest).read_text().splitlines():
        if line.startswith(("summary:", "totals:")):
            total = int(line.split()[1])
    return total


async def one_connection(peers: Any, port: int, req: bytes) -> None:
    r, w = await asyncio.open_connection(peers.HOST, port)
    w.write(peers.HDR.pack(b"R", len(req), len(req), 0) + req)
    await r.readexactly(len(req))
    w.close()
    await w.wait_closed()


async def conn_workload(peers: Any, port: int, n: int, pids: list[int]) -> None:
    req = os.urandom(1024)
    await one_connection(peers, port, req)  # warm
    for p in pids:
        await asyncio.to_thread(ctl, p, "-z")
    for _ in range(n):
        await one_connection(peers, port, req)
    await asyncio.sleep(0.3)
    for p in pids:
        await asyncio.to_thread(ctl, p, "-d")


async def rr_workload(peers: Any, port: int, n: int, pids: list[int], conns: int = 8) -> None:
    req = os.urandom(1024)
    streams = []
    for _ in range(conns):
        r, w = await asyncio.open_connection(peers.HOST, port)
        w.write(peers.HDR.pack(b"R", 1024, 1024, 0) + req)
        await r.readexactly(1024)
        streams.append((r, w))
    await asyncio.sleep(0.3)
    for p in pids:
        await asyncio.to_thread(ctl, p, "-z")

    async def loop(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(n // conns):
            w.write(req)
            await r.readexactly(1024)

    await asyncio.gather(*(loop(r, w) for r, w in streams))
    await asyncio.sleep(0.3)
    for p in pids:
        await asyncio.to_thread(ctl, p, "-d")
    for _, w in streams:
        w.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--peers", default="kubemtls,haproxy", help="kubemtls, ref, haproxy")
    ap.add_argument("--ref", help="a sidecar/ directory to run as the 'ref' peer")
    ap.add_argument("--conns", type=int, default=20)
    ap.add_argument("--requests", type=int, default=1600)
    ap.add_argument("--workdir", default="/tmp/kubemtls-instructions")
    ap.add_argument("--workloads", default="conn,rr", help="conn, rr (comma list)")
    ap.add_argument("--rr-conns", type=int, default=8, help="open connections of 'rr'")
    ap.add_argument(
        "--hashseed",
        default="0",
        help="PYTHONHASHSEED of the sidecars: str hashes place names in the type cache, so "
        "a random seed moves counts by ~±1 k per request between runs",
    )
    ap.add_argument(
        "--cpu",
        action="store_true",
        help="no valgrind: user/system CPU microseconds per operation of each side "
        "(/proc/PID/stat; noisy on a shared machine: interleave peers, e.g. ref,kubemtls,"
        "ref,kubemtls, with --rr-conns 32 --requests 32000)",
    )
    a = ap.parse_args()
    global CPU_MODE
    CPU_MODE = a.cpu
    peers = load_harness()
    wd = pathlib.Path(a.workdir)
    wd.mkdir(parents=True, exist_ok=True)
    certs = peers.gen_certs(str(wd / "certs"))
    osslconf = wd / "openssl-tls13.cnf"
    template = pathlib.Path(peers.TEMPLATES, "openssl-tls13.cnf").read_text()
    osslconf.write_text(peers.render(template, {"ciphersuites": peers.DEFAULT_CIPHERSUITES}))
    hp = peers.BUILTIN_PEERS["haproxy"]

    def vg(command: str) -> str:
        return command.replace(VG + " ", "") if a.cpu else command

    pairs = {
        "kubemtls": peers.Peer("kubemtls", vg(CLIENT), vg(SERVER)),
        "ref": peers.Peer("ref", vg(CLIENT), vg(SERVER)),
        "haproxy": peers.Peer(
            "haproxy",
            vg(f"exec {VG} haproxy -db -f {{workdir}}/haproxy-client.cfg"),
            vg(f"exec {VG} haproxy -db -f {{workdir}}/haproxy-server.cfg"),
            hp.templates,
        ),
    }
    bport = peers.free_port()
    backend = subprocess.Popen(
        [sys.executable, str(HARNESS), "_backend", str(bport), "1"],
        stdout=subprocess.PIPE,
        stdin=subprocess.DEVNULL,
    )
    assert backend.stdout is not None
    assert backend.stdout.readline().strip() == b"READY"
    values = {
        "host": peers.HOST, "backend_port": bport, "ca": certs["ca.crt"],
        "server_cert": certs["server.crt"], "server_key": certs["server.key"],
        "server_pem": certs["server.pem"], "client_cert": certs["client.crt"],
        "client_key": certs["client.key"], "client_pem": certs["client.pem"],
        "server_name": peers.SERVER_NAME, "ciphersuites": peers.DEFAULT_CIPHERSUITES,
        "workers": 1, "openssl_conf": str(osslconf), "bench_dir": peers.HERE,
        "python": sys.executable,
    }  # fmt: skip
    unit = "us user/sys per op" if a.cpu else "kIr/op"
    print(f"peer       workload  client {unit}  server {unit}")
    try:
        for i, name in enumerate(a.peers.split(",")):
            env = f"PYTHONPATH={a.ref}" if name == "ref" else ""
            if name == "ref" and not a.ref:
                raise SystemExit("--peers ref needs --ref DIR")
            vals = dict(values, client_port=peers.free_port(), server_port=peers.free_port())
            launches, outs = {}, {}
            for role in ("server", "client"):
                outs[role] = str(wd / f"{i}-{name}-{role}.cg")
                for old in glob.glob(outs[role] + "*"):
                    os.remove(old)
                launch = peers.Launch(
                    pairs[name],
                    role,
                    dict(vals, out=outs[role], env=env, hashseed=a.hashseed),
                    str(wd / f"{name}-{role}"),
                    vals[role + "_port"],
                )
                launches[role] = launch.start()
                launch.wait_ready(timeout=180)
            try:
                pids = [launches[r].pids()[0] for r in ("client", "server")]
                port = vals["client_port"]
                wanted = a.workloads.split(",")
                runs: list[tuple[str, int, Coroutine[Any, Any, None]]] = []
                if "conn" in wanted:
                    runs.append(("conn", a.conns, conn_workload(peers, port, a.conns, pids)))
                if "rr" in wanted:
                    runs.append(
                        ("rr", a.requests, rr_workload(peers, port, a.requests, pids, a.rr_conns))
                    )
                for workload, n, run in runs:
                    asyncio.run(run)
                    time.sleep(0.5)
                    if a.cpu:
                        us = 1e6 / os.sysconf("SC_CLK_TCK") / n
                        cols = [
                            f"{CPU_TICKS[p][0] * us:8.1f}/{CPU_TICKS[p][1] * us:.1f}" for p in pids
                        ]
                        print(
                            f"{name:10s} {workload:8s} {cols[0]:>15s}  {cols[1]:>15s}", flush=True
                        )
                        continue
                    per = [last_total(outs[r]) / n / 1e3 for r in ("client", "server")]
                    print(f"{name:10s} {workload:8s} {per[0]:13.1f}  {per[1]:13.1f}", flush=True)
            finally:
                for launch in launches.values():
                    launch.stop()
    finally:
        backend.terminate()
    return 0


if __name__ == "__main__":
    sys.exit(main())
