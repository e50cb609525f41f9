"""Back-pressure with the data phase on the socket (``sockio``) and on memory BIOs.

When the TLS peer does not read, ``SSLObject.write`` on the socket raises
``SSLWantWriteError``: ``SocketIO`` keeps that chunk (OpenSSL wants it again) and pauses
the app's side. When the app does not read, ``SocketIO`` stops reading the TLS socket.
Either way the sidecar holds about one chunk, and the bytes arrive intact afterwards.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import socket
import ssl
import threading

import pytest
from dataplane import Files, client_context
from kubemtls_sidecar import tlsconn
from sockpeers import (
    CPYTHON_ONLY,
    MODES,
    Args,
    app_server,
    in_thread,
    mesh,
    one_endpoint,
    outbound_to,
    upstream_context,
)
from testkit import eventually

pytestmark = CPYTHON_ONLY

BULK = 16 << 20


#: Each test runs on both loops (tests/sidecar/conftest.py): the sidecar runs on uvloop,
#: whose flow-control calls and read sizes differ from the selector loop the other
#: in-process sidecar tests use.
LOOP_FACTORIES = ("asyncio", "uvloop")


def read_exactly(sock: ssl.SSLSocket, n: int) -> bytes:
    got = bytearray()
    while len(got) < n:
        data = sock.recv(1 << 20)
        if not data:
            break
        got += data
    return bytes(got)


def client_reads_late(ctx: ssl.SSLContext, port: int, go: threading.Event) -> bytes:
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        assert go.wait(20)
        return read_exactly(s, BULK)


def upstream_reads_late(listener: socket.socket, ctx: ssl.SSLContext, go: threading.Event) -> bytes:
    conn, _ = listener.accept()
    conn.settimeout(20)
    with ctx.wrap_socket(conn, server_side=True) as s:
        assert go.wait(20)
        return read_exactly(s, BULK)


async def hold_back(ep: tlsconn.TlsEndpoint, sender: asyncio.StreamWriter, mode: str) -> None:
    """While the TLS peer does not read: what the sidecar queues, and who is paused."""
    assert ep.transport is not None
    assert ep.partner is not None
    assert ep.partner.transport is not None
    loop = asyncio.get_running_loop()
    peak, halfway = 0, None
    # A fixed second: the TLS peer reads nothing, so the sidecar's socket fills and the
    # sidecar must stop taking the app's bytes; what is checked is that nothing moves and
    # its queue stays within one chunk *over time*: "nothing more happens" is no event.
    start = loop.time()
    while (now := loop.time()) < start + 1.0:
        peak = max(peak, ep.transport.get_write_buffer_size())
        if halfway is None and now >= start + 0.5:
            halfway = sender.transport.get_write_buffer_size()
        await asyncio.sleep(0.005)
    assert not ep.partner.transport.is_reading()  # the app's side is paused
    if mode == "socket":
        assert ep.io is not None
        assert ep.io.get_write_buffer_size() > 0  # data waits for the socket (WantWrite)
        # One chunk at most: the app side's transport hands over what one read returned
        # (asyncio's selector transport reads up to 256 KiB) and is paused by the same
        # SSLWantWriteError that queued it; later chunks never reach the sidecar.
        assert 0 < peak <= 256 * 1024
    else:
        # The transport's high-water mark (64 KiB), plus one chunk's ciphertext (256 KiB
        # of plaintext, 22 bytes per 16 KiB record) written before pause_writing.
        assert 0 < peak <= 64 * 1024 + 256 * 1024 + 16 * 22
    # The rest of the app's 16 MiB waits in the app's own transport (here ~6 MiB; the
    # kernel's socket buffers on the two loopback hops hold ~10 MiB), and stopped moving.
    assert halfway == sender.transport.get_write_buffer_size() > 0


@pytest.mark.parametrize("mode", MODES)
async def test_back_pressure_inbound_holds_the_app_back(
    sidecar_args: Args, files: Files, tmp_path, mode: str
):
    """The app sends 16 MiB at once to a TLS client that does not read for a second."""
    payload = os.urandom(BULK)
    senders: list[asyncio.StreamWriter] = []

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        senders.append(w)
        w.write(payload)  # all at once: what the sidecar does not take waits here
        with contextlib.suppress(ConnectionError):
            await w.drain()
            await r.read()
        w.close()

    go = threading.Event()
    ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
    async with app_server(handle) as app_port, mesh(sidecar_args, app_port, mode) as m:
        client = in_thread(client_reads_late, ctx, m.inbound, go)
        try:
            ep = await eventually(lambda: senders and one_endpoint(server_side=True), 10)
            assert isinstance(ep, tlsconn.TlsEndpoint)
            await hold_back(ep, senders[0], mode)
        finally:
            go.set()
        assert await asyncio.wait_for(client, 30) == payload


@pytest.mark.parametrize("mode", MODES)
async def test_back_pressure_outbound_holds_the_app_back(
    sidecar_args: Args, files: Files, mode: str
):
    """The app sends 16 MiB at once to an upstream that does not read for a second."""
    payload = os.urandom(BULK)
    go = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        up_ctx = upstream_context(files, files.pki)
        up = in_thread(upstream_reads_late, listener, up_ctx, go)
        async with outbound_to(sidecar_args, listener.getsockname()[1], mode) as m:
            _, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
            try:
                writer.write(payload)
                ep = await eventually(lambda: one_endpoint(server_side=False), 10)
                assert isinstance(ep, tlsconn.TlsEndpoint)
                await hold_back(ep, writer, mode)
            finally:
                go.set()
            assert await asyncio.wait_for(up, 30) == payload
            writer.close()


def client_sends(ctx: ssl.SSLContext, port: int, payload: bytes) -> bytes:
    """Send ``payload``, half-close, return the app's answer."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=20)
    with ctx.wrap_socket(raw, server_hostname="localhost") as s:
        s.sendall(payload)
        socket.socket.shutdown(s, socket.SHUT_WR)
        return s.recv(16)


@pytest.mark.parametrize("mode", MODES)
async def test_back_pressure_app_not_reading_stops_the_tls_side(
    sidecar_args: Args, files: Files, tmp_path, mode: str
):
    """The other way round: a TLS client sends 16 MiB to an app that does not read for a
    second; the sidecar stops reading its TLS socket (SocketIO.pause_reading)."""
    payload = os.urandom(BULK)
    gate = asyncio.Event()
    got: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()

    async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await gate.wait()
        got.set_result(await r.read())  # up to the client's FIN
        w.write(b"ok")
        await w.drain()
        w.close()

    ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
    async with app_server(handle) as app_port, mesh(sidecar_args, app_port, mode) as m:
        client = in_thread(client_sends, ctx, m.inbound, payload)
        try:
            found = await eventually(lambda: one_endpoint(server_side=True), 10)
            assert isinstance(found, tlsconn.TlsEndpoint)
            ep = found
            assert ep.transport is not None
            assert ep.partner is not None
            assert ep.partner.transport is not None
            loop = asyncio.get_running_loop()
            peak = 0
            # A fixed second, as above: the app reads nothing meanwhile.
            start = loop.time()
            while loop.time() < start + 1.0:
                peak = max(peak, ep.partner.transport.get_write_buffer_size())
                await asyncio.sleep(0.005)
            assert not ep.transport.is_reading()  # the TLS side stopped reading
            assert (ep.io is not None) == (mode == "socket")
            assert not client.done()  # its sendall is held up
            # The app side's high-water mark (64 KiB) plus what one readable event
            # delivers: up to 16 records (sockio), or one 256 KiB read's plaintext and
            # the rest of a record the read before left in the BIO (memory).
            assert 0 < peak <= 64 * 1024 + 256 * 1024 + 16 * 1024
        finally:
            gate.set()
        assert await asyncio.wait_for(client, 30) == b"ok"
        assert await got == payload
