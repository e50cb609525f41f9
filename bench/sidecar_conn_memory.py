#!/usr/bin/env python3
"""RSS of one sidecar per open mTLS connection: what each connection a pod keeps open costs.

One sidecar process (``--inbound`` to a plaintext echo app in this process) is measured
idle after one connection, then with N open inbound mTLS connections that have each moved
``--size`` bytes each way twice (so OpenSSL, uvloop and the kernel-facing buffers exist).
Compare trees by running it with ``--tree DIR`` (``PYTHONPATH=DIR``; e.g. ``git archive
REV sidecar | tar -x -C /tmp/ref`` then ``--tree /tmp/ref/sidecar``) and without.

    .venv/bin/python bench/sidecar_conn_memory.py --counts 100,1000 [--size 1024]

Per connection = (RSS with N open - RSS idle) / N. Each TLS connection keeps OpenSSL's
record buffers (``sslknobs.keep_record_buffers``): ~17 KiB allocated each way, of which
only the pages records touched are resident (a 1 KiB record: one or two 4 KiB pages each).
"""

from __future__ import annotations

import argparse
import asyncio
import datetime
import os
import pathlib
import socket
import ssl
import sys
import tempfile

from kubemtls_operator import pki
from kubemtls_sidecar import certs

PY = str(pathlib.Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def rss_kib(pid: int) -> int:
    for line in pathlib.Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def write_identity(ca: pki.CA, sa: str, where: pathlib.Path) -> pathlib.Path:
    now = datetime.datetime.now(datetime.UTC)
    key = pki.generate_key("ecdsa-p256")
    ident = pki.LeafIdentity(
        certs.spiffe_id("cluster.local", "bench", sa), sa, "bench", dns_names=("localhost",)
    )
    cert = pki.issue_leaf(
        ca, key.public_key(), ident, now=now, lifetime=datetime.timedelta(hours=1)
    )
    where.mkdir(parents=True)
    (where / "tls.crt").write_bytes(pki.chain_pem(cert, ca))
    (where / "tls.key").write_bytes(pki.key_pem(key))
    return where


async def measure(tree: str | None, counts: list[int], size: int, wd: pathlib.Path) -> None:
    ca = pki.bootstrap_ca(now=datetime.datetime.now(datetime.UTC))
    server, client = write_identity(ca, "server", wd / "s"), write_identity(ca, "client", wd / "c")
    (wd / "t").mkdir()
    (wd / "t" / "ca.crt").write_bytes(pki.cert_pem(ca.cert))

    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)
        w.close()

    app = await asyncio.start_server(echo, "127.0.0.1", 0)
    port = free_port()
    env = dict(os.environ, PYTHONPATH=tree) if tree else dict(os.environ)
    proc = await asyncio.create_subprocess_exec(
        PY, "-m", "kubemtls_sidecar", "--cert-dir", str(server), "--trust-dir", str(wd / "t"),
        "--inbound", f"{port}:127.0.0.1:{app.sockets[0].getsockname()[1]}",
        "--listen-address", "127.0.0.1", "--admin-port", str(free_port()),
        "--admin-address", "127.0.0.1", "--log-level", "error", env=env,
    )  # fmt: skip
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(str(wd / "t" / "ca.crt"))
    ctx.load_cert_chain(str(client / "tls.crt"), str(client / "tls.key"))
    payload = os.urandom(size)

    async def connect() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        r, w = await asyncio.open_connection(
            "127.0.0.1", port, ssl=ctx, server_hostname="localhost"
        )
        w.write(payload)
        await r.readexactly(size)
        return r, w

    try:
        for _ in range(200):
            try:
                first = await connect()
                break
            except OSError:
                await asyncio.sleep(0.05)
        else:
            raise SystemExit("the sidecar did not start")
        first[1].close()
        await asyncio.sleep(1)
        idle = rss_kib(proc.pid)
        rows = [f"idle {idle / 1024:.1f} MiB"]
        conns: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        for n in counts:
            while len(conns) < n:
                conns.append(await connect())
            for _, w in conns:
                w.write(payload)
            for r, _ in conns:
                await r.readexactly(size)
            await asyncio.sleep(1)
            now = rss_kib(proc.pid)
            rows.append(f"{n} open {now / 1024:.1f} MiB = {(now - idle) / n:.1f} KiB/conn")
        for _, w in conns:
            w.close()
        print(f"{tree or 'this tree'} ({size} B each way): " + "; ".join(rows), flush=True)
    finally:
        proc.terminate()
        await proc.wait()
        app.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--counts", default="100,1000", help="open connections (comma list)")
    ap.add_argument("--size", type=int, default=1024, help="bytes each way per round")
    ap.add_argument("--tree", help="a sidecar/ directory to measure instead of this tree")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory() as wd:
        asyncio.run(
            measure(a.tree, [int(c) for c in a.counts.split(",")], a.size, pathlib.Path(wd))
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
