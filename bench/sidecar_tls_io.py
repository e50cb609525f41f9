#!/usr/bin/env python3
"""What a socket-backed TLS side would save: instructions per request, memory BIOs vs socket.

The measurement that led to ``sidecar/kubemtls_sidecar/sockio.py`` (the sidecar now moves
each connection's data phase onto its socket; ``--tls-io memory`` is the BIO form). A
prototype, not the sidecar: a minimal TLS-terminating proxy side on uvloop (mTLS server
in front of a plaintext echo backend), in two forms, run under callgrind while 8 open
connections exchange 1 KiB requests/responses (as ``sidecar_instructions.py`` rr):

- ``bio``: what ``tlsconn`` does: the uvloop transport reads ciphertext into a bytes
  object, ``MemoryBIO.write``, ``SSLObject.read``; replies go ``SSLObject.write``,
  ``MemoryBIO.read`` (another bytes object), ``transport.write``;
- ``sock``: the ``SSLObject`` of an ``SSLSocket`` on the socket itself, driven by
  ``loop.add_reader``: OpenSSL reads and writes the socket, so no ciphertext bytes objects,
  no memory-BIO copies, no uvloop stream read (whose buffer and read callbacks each take
  the GIL) and no uvloop write on the TLS side.

    .venv/bin/python bench/sidecar_tls_io.py [--modes bio,sock] [--requests 1600]

Same ciphersuite and OpenSSL config as the harness; handshakes are blocking in ``sock``
(the window counts the data phase only). Without read-ahead OpenSSL reads a record's
header and body with two ``recv`` calls: kernel work callgrind does not count.
"""

from __future__ import annotations

import argparse
import asyncio
import glob
import os
import pathlib
import socket
import ssl
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

from sidecar_instructions import HARNESS, load_harness

PY = str(pathlib.Path(__file__).resolve().parent.parent / ".venv" / "bin" / "python")
WORKDIR = pathlib.Path("/tmp/kubemtls-tls-io")
OPEN: list[ssl.SSLSocket] = []  # the listener's list (kept referenced)
TASKS: set[asyncio.Task[None]] = set()


def server_context(certs: dict[str, str]) -> ssl.SSLContext:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(certs["server.crt"], certs["server.key"])
    ctx.load_verify_locations(certs["ca.crt"])
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.num_tickets = 0
    return ctx


class Backend(asyncio.Protocol):
    def __init__(self, send: Callable[[bytes], object]) -> None:
        self.send = send

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.send(data)


class BioSide(asyncio.Protocol):
    def __init__(self, ctx: ssl.SSLContext, backend_port: int) -> None:
        self.incoming, self.outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        self.ssl = ctx.wrap_bio(self.incoming, self.outgoing, server_side=True)
        self.obj: Any = self.ssl._sslobj  # type: ignore[attr-defined]
        self.backend: Backend | None = None
        self.port = backend_port

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport: Any = transport

    def data_received(self, data: bytes) -> None:
        self.incoming.write(data)
        if self.backend is None:
            try:
                self.ssl.do_handshake()
            except ssl.SSLWantReadError:
                self.transport.write(self.outgoing.read())
                return
            self.transport.write(self.outgoing.read())
            TASKS.add(asyncio.get_running_loop().create_task(self.connect()))
            return
        self.backend.transport.write(self.obj.read(16384))

    def send(self, data: bytes) -> None:
        self.obj.write(data)
        self.transport.write(self.outgoing.read())

    async def connect(self) -> None:
        loop = asyncio.get_running_loop()
        _, self.backend = await loop.create_connection(
            lambda: Backend(self.send), "127.0.0.1", self.port
        )


def serve_sockets(ctx: ssl.SSLContext, port: int, backend_port: int) -> list[ssl.SSLSocket]:
    loop = asyncio.get_running_loop()
    listener = socket.create_server(("127.0.0.1", port))
    listener.setblocking(False)
    conns: list[ssl.SSLSocket] = []

    def accept() -> None:
        raw, _ = listener.accept()
        raw.setblocking(True)
        tls = ctx.wrap_socket(raw, server_side=True)  # blocking handshake: not measured
        tls.setblocking(False)
        conns.append(tls)
        obj: Any = tls._sslobj  # type: ignore[attr-defined]

        async def connect() -> None:
            t, _ = await loop.create_connection(
                lambda: Backend(obj.write), "127.0.0.1", backend_port
            )

            def readable() -> None:
                try:
                    chunk = obj.read(16384)
                except ssl.SSLWantReadError:
                    return
                if chunk:
                    t.write(chunk)
                else:
                    loop.remove_reader(tls.fileno())

            loop.add_reader(tls.fileno(), readable)

        TASKS.add(loop.create_task(connect()))

    loop.add_reader(listener.fileno(), accept)
    return conns


async def proxy(mode: str, port: int, backend_port: int, certs: dict[str, str]) -> None:
    ctx = server_context(certs)
    if mode == "bio":
        await asyncio.get_running_loop().create_server(
            lambda: BioSide(ctx, backend_port), "127.0.0.1", port
        )
    else:
        OPEN.extend(serve_sockets(ctx, port, backend_port))
    print("READY", flush=True)
    await asyncio.Event().wait()


async def echo_backend(port: int) -> None:
    async def echo(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while data := await r.read(65536):
            w.write(data)

    await asyncio.start_server(echo, "127.0.0.1", port)
    print("READY", flush=True)
    await asyncio.Event().wait()


async def load(port: int, certs: dict[str, str], name: str, n: int, pid: int) -> None:
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.load_verify_locations(certs["ca.crt"])
    ctx.load_cert_chain(certs["client.crt"], certs["client.key"])
    req, streams = os.urandom(1024), []
    for _ in range(8):
        r, w = await asyncio.open_connection("127.0.0.1", port, ssl=ctx, server_hostname=name)
        await asyncio.sleep(0.3)  # the sock form connects its backend after the handshake
        w.write(req)
        await r.readexactly(1024)
        streams.append((r, w))
    subprocess.run(["callgrind_control", "-z", str(pid)], check=True, capture_output=True)

    async def run(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        for _ in range(n // 8):
            w.write(req)
            await r.readexactly(1024)

    await asyncio.gather(*(run(r, w) for r, w in streams))
    await asyncio.sleep(0.3)
    subprocess.run(["callgrind_control", "-d", str(pid)], check=True, capture_output=True)


def measure(mode: str, n: int, peers: Any, certs: dict[str, str], env: dict[str, str]) -> float:
    bport, port = peers.free_port(), peers.free_port()
    me = [PY, __file__]
    backend = subprocess.Popen([*me, "--backend", str(bport)], stdout=subprocess.PIPE, env=env)
    out = str(WORKDIR / f"{mode}.cg")
    for old in glob.glob(out + "*"):
        os.remove(old)
    vg = ["valgrind", "--tool=callgrind", "--dump-instr=no", f"--callgrind-out-file={out}"]
    side = subprocess.Popen(
        [*vg, *me, "--proxy", f"{mode}:{port}:{bport}"],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        env=env,
    )
    try:
        for p in (backend, side):
            assert p.stdout is not None
            assert p.stdout.readline().strip() == b"READY"
        asyncio.run(load(port, certs, peers.SERVER_NAME, n, side.pid))
        time.sleep(0.5)
        dump = max(glob.glob(out + ".*"), key=os.path.getmtime)
        lines = pathlib.Path(dump).read_text().splitlines()
        return [int(x.split()[1]) for x in lines if x.startswith(("summary:", "totals:"))][-1] / n
    finally:
        side.terminate()
        backend.terminate()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--modes", default="bio,sock")
    ap.add_argument("--requests", type=int, default=1600)
    ap.add_argument("--backend", type=int, help=argparse.SUPPRESS)
    ap.add_argument("--proxy", help=argparse.SUPPRESS)
    a = ap.parse_args()
    import uvloop

    if a.backend:
        uvloop.run(echo_backend(a.backend))
        return 0
    peers = load_harness()
    WORKDIR.mkdir(exist_ok=True)
    certs = peers.gen_certs(str(WORKDIR / "certs"))
    if a.proxy:
        mode, port, bport = a.proxy.split(":")
        uvloop.run(proxy(mode, int(port), int(bport), certs))
        return 0
    conf = WORKDIR / "openssl-tls13.cnf"
    template = pathlib.Path(peers.TEMPLATES, "openssl-tls13.cnf").read_text()
    conf.write_text(peers.render(template, {"ciphersuites": peers.DEFAULT_CIPHERSUITES}))
    env = dict(os.environ, OPENSSL_CONF=str(conf), PYTHONHASHSEED="0")
    print(f"harness {HARNESS}; server side, k instructions per 1 KiB request/response")
    for mode in a.modes.split(","):
        print(f"{mode:5s} {measure(mode, a.requests, peers, certs, env) / 1e3:6.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
