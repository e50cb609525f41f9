"""The data phase on the socket (``sockio``), checked against the memory BIOs it replaces.

Every handshake runs over memory BIOs (``tlsconn``); afterwards ``--tls-io socket`` (the
default) points the connection's ``SSL`` at a duplicate of its socket's descriptor, and
OpenSSL reads and writes the socket itself; ``--tls-io memory`` keeps the BIOs. These tests
read back from OpenSSL which BIOs a live connection uses, run the behaviours both modes
must share (half-close, close_notify, a peer's reset, a refusal after a TLS 1.3 client's
handshake), count descriptors, and check when a connection stays on its BIOs.
Back-pressure is in ``test_sockio_pressure.py``.
"""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import socket
import ssl
import threading

import pytest
import testkit
from dataplane import Files, blocking_exchange, client_context, log_fields
from kubemtls_sidecar import sockio, tlsconn
from sockpeers import (
    BIO_TYPE_MEM,
    BIO_TYPE_SOCKET,
    CPYTHON_ONLY,
    KEEP,
    MODES,
    Args,
    active,
    app_server,
    bios,
    fd_count,
    in_thread,
    mesh,
    one_endpoint,
    open_endpoints,
    outbound_to,
    roundtrip,
    ssl_of,
    upstream_context,
)
from testkit import eventually

pytestmark = CPYTHON_ONLY

REFUSED = "upstream TLS handshake failed; closing the app's connection"


# --- where the data phase runs ------------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_data_phase_runs_where_tls_io_says(sidecar_args: Args, echo_port: int, mode: str):
    """Both TLS ends of a mesh round trip, read back from OpenSSL: socket BIOs on a dup of
    the transport's descriptor, or memory BIOs; the same bytes either way."""
    payload = os.urandom(256 * 1024)
    async with mesh(sidecar_args, echo_port, mode) as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
        await roundtrip(reader, writer, b"hello\n")
        await roundtrip(reader, writer, payload)
        eps = open_endpoints()
        assert sorted(e.ssl.server_side for e in eps) == [False, True]
        for e in eps:
            rtype, wtype, fd = bios(e.ssl)
            if mode == "memory":
                assert e.io is None
                assert (rtype, wtype, fd) == (BIO_TYPE_MEM, BIO_TYPE_MEM, -1)
                continue
            assert e.io is not None
            assert e.transport is e.io
            assert (rtype, wtype) == (BIO_TYPE_SOCKET, BIO_TYPE_SOCKET)
            own = e.io.get_extra_info("socket").fileno()  # the uvloop/asyncio transport's
            assert fd not in (-1, own)
            same, orig = os.fstat(fd), os.fstat(own)
            assert (same.st_dev, same.st_ino) == (orig.st_dev, orig.st_ino)  # a dup of it
            assert sockio.ssl_pointer(e.ssl, server_side=e.ssl.server_side) == ssl_of(e.ssl)
        await roundtrip(reader, writer, payload[::-1])
        writer.close()


async def test_one_exchange_keeps_the_bios_the_second_moves(sidecar_args: Args, echo_port: int):
    """A connection that carries one request and its response never pays for the move
    (tlsconn._ATTACH_AFTER chunks); the next exchange moves both ends."""
    async with mesh(sidecar_args, echo_port, "socket") as m:
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
        await roundtrip(reader, writer, b"GET / HTTP/1.1\r\n\r\n")
        eps = open_endpoints()
        assert sorted(e.ssl.server_side for e in eps) == [False, True]
        for e in eps:
            assert e.io is None
            assert bios(e.ssl)[:2] == (BIO_TYPE_MEM, BIO_TYPE_MEM)
        await roundtrip(reader, writer, b"GET /again HTTP/1.1\r\n\r\n")
        for e in eps:
            assert e.io is not None
            assert bios(e.ssl)[:2] == (BIO_TYPE_SOCKET, BIO_TYPE_SOCKET)
        await roundtrip(reader, writer, os.urandom(64 * 1024))  # and carries on, intact
        writer.close()


# --- behaviours both modes share ----------------------------------------------------------


@pytest.mark.parametrize("mode", MODES)
async def test_half_close_one_mib_each_way(
    sidecar_args: Args, echo_port: int, files: Files, tmp_path, mode: str
):
    payload = os.urandom(1 << 20)
    client = files.pki.leaf("billing", "api", name="client")
    ctx = client_context(client, files.trust_dir, tmp_path)
    async with mesh(sidecar_args, echo_port, mode) as m:
        # A TLS client's FIN without close_notify ends its direction only: the echo follows.
        echoed, _ = await asyncio.to_thread(blocking_exchange, ctx, m.inbound, payload)
        assert echoed == payload
        # An app's FIN through the pair: our close_notify + FIN upstream, then the echo.
        reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
        writer.write(payload)
        writer.write_eof()
        assert await asyncio.wait_for(reader.read(), 20) == payload  # up to the EOF
        writer.close()
        await eventually(lambda: active(m.r, "inbound") == active(m.r, "outbound") == 0, 10)


def close_notify_exchange(ctx: ssl.SSLContext, port: int, payload: bytes) -> tuple[bytes, str]:
    """Send ``payload``, then close_notify (``unwrap``; TCP stays open), then read the
    reply to its end; returns (reply, "close_notify" | "eof")."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=10)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    obj = ctx.wrap_bio(incoming, outgoing, server_hostname="localhost")

    def flush() -> None:
        if outgoing.pending:
            sock.sendall(outgoing.read())

    def fill() -> None:
        data = sock.recv(65536)
        incoming.write(data) if data else incoming.write_eof()

    with sock:
        while True:
            try:
                obj.do_handshake()
                break
            except ssl.SSLWantReadError:
                flush()
                fill()
        flush()
        obj.write(payload)
        flush()
        # The incoming BIO holds nothing here: OpenSSL's shutdown read discards nothing.
        with contextlib.suppress(ssl.SSLWantReadError):
            obj.unwrap()  # sends close_notify; would wait for the server's
        flush()
        chunks = []
        while True:
            try:
                data = obj.read(65536)
            except ssl.SSLWantReadError:
                fill()
                continue
            except ssl.SSLZeroReturnError:
                return b"".join(chunks), "close_notify"
            except ssl.SSLEOFError:
                return b"".join(chunks), "eof"
            if not data:
                return b"".join(chunks), "close_notify"
            chunks.append(data)


@pytest.mark.parametrize("mode", MODES)
async def test_client_close_notify_then_reads_the_full_reply(
    sidecar_args: Args, echo_port: int, files: Files, tmp_path, mode: str
):
    payload = os.urandom(1 << 20)
    ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
    async with mesh(sidecar_args, echo_port, mode) as m:
        reply, end = await asyncio.to_thread(close_notify_exchange, ctx, m.inbound, payload)
        assert len(reply) == len(payload)
        assert reply == payload
        assert end == "close_notify"  # the app's FIN came back as ours
        await eventually(lambda: active(m.r, "inbound") == 0, 10)


def reset_after_a_chunk(sock: ssl.SSLSocket, payload: bytes) -> None:
    """Send ``payload``, read a first chunk of the reply, then reset (SO_LINGER 0 close)."""
    with sock:
        sock.settimeout(10)
        sock.sendall(payload)
        assert sock.recv(65536)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\x00\x00\x00\x00\x00\x00\x00")


def client_resets(ctx: ssl.SSLContext, port: int, payload: bytes) -> None:
    raw = socket.create_connection(("127.0.0.1", port), timeout=10)
    reset_after_a_chunk(ctx.wrap_socket(raw, server_hostname="localhost"), payload)


def upstream_resets(listener: socket.socket, ctx: ssl.SSLContext, payload: bytes) -> None:
    conn, _ = listener.accept()
    reset_after_a_chunk(ctx.wrap_socket(conn, server_side=True), payload)


async def echo_until_end(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> str:
    """Echo until the connection ends ("reset" or "eof"); our side stays open after it."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except ConnectionError:
        return "reset"
    return "eof"


@pytest.mark.parametrize("direction", ["inbound", "outbound"])
@pytest.mark.parametrize("mode", MODES)
async def test_peer_reset_mid_stream_ends_the_app_connection(
    sidecar_args: Args, files: Files, tmp_path, mode: str, direction: str
):
    """The TLS peer resets with data in flight both ways: the sidecar closes the app's
    connection at once (the app keeps its own side open, as one still sending would).

    Whether the app reads a reset or an EOF depends on whether bytes were still unread in
    the sidecar's socket when it closed (asyncio's ``abort`` is a close without flushing);
    a FIN that only ended one direction would leave the connection (and the gauge) open.
    """
    payload = os.urandom(512 * 1024)
    loop = asyncio.get_running_loop()
    app_writers: list[asyncio.StreamWriter] = []
    try:
        if direction == "inbound":
            ended: asyncio.Future[str] = loop.create_future()

            async def handle(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
                app_writers.append(w)
                ended.set_result(await echo_until_end(r, w))

            ctx = client_context(files.pki.leaf("billing", "api"), files.trust_dir, tmp_path)
            async with app_server(handle) as app_port, mesh(sidecar_args, app_port, mode) as m:
                await asyncio.to_thread(client_resets, ctx, m.inbound, payload)
                assert await asyncio.wait_for(ended, 5) in ("reset", "eof")
                await eventually(lambda: active(m.r, "inbound") == 0, 5)
            return
        with socket.create_server(("127.0.0.1", 0)) as listener:
            listener.settimeout(10)
            up = in_thread(upstream_resets, listener, upstream_context(files, files.pki), payload)
            async with outbound_to(sidecar_args, listener.getsockname()[1], mode) as m:
                reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
                app_writers.append(writer)
                ending = loop.create_task(echo_until_end(reader, writer))
                writer.write(payload)
                await asyncio.wait_for(up, 10)
                assert await asyncio.wait_for(ending, 5) in ("reset", "eof")
                await eventually(lambda: active(m.r, "outbound") == 0, 5)
    finally:
        for w in app_writers:
            w.close()


# --- descriptors ----------------------------------------------------------------------------


async def test_no_descriptor_leak_over_fifty_connections(sidecar_args: Args, echo_port: int):
    """Each connection holds 8 descriptors while open (see below), none after; every
    closed connection's SSL points at no descriptor (a reused number is never written)."""
    async with mesh(sidecar_args, echo_port, "socket") as m:

        async def connect() -> asyncio.StreamWriter:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
            for _ in range(2):  # the second exchange moves both TLS ends onto the socket
                await roundtrip(reader, writer, os.urandom(4096))
            return writer

        def idle() -> bool:
            return active(m.r, "inbound") == active(m.r, "outbound") == 0

        (await connect()).close()  # warm-up: whatever the first connection opens for good
        await eventually(idle, 10)
        gc.collect()
        base = fd_count()
        seen: list[tlsconn.TlsEndpoint] = []
        for _ in range(5):
            writers = await asyncio.gather(*(connect() for _ in range(10)))
            fresh = [e for e in open_endpoints() if all(e is not s for s in seen)]
            assert len(fresh) == 20
            assert all(e.io is not None for e in fresh)
            # app client, outbound plain side, outbound TLS + its dup, inbound TLS + its
            # dup, inbound plain side, the echo app's socket
            await eventually(lambda: fd_count() == base + 8 * 10, 5)
            seen += fresh
            for w in writers:
                w.close()
        await eventually(idle, 10)
        await eventually(lambda: fd_count() == base, 10)
        assert all(e.closed.done() for e in seen)
        for e in seen:
            rtype, wtype, fd = bios(e.ssl)
            assert (rtype, wtype, fd) == (BIO_TYPE_SOCKET, BIO_TYPE_SOCKET, -1)


# --- when the connection stays on its BIOs --------------------------------------------------


def test_ssl_pointer_is_given_only_for_the_role_asked():
    for protocol, server_side in (
        (ssl.PROTOCOL_TLS_CLIENT, False),
        (ssl.PROTOCOL_TLS_SERVER, True),
    ):
        ctx = ssl.SSLContext(protocol)
        KEEP.append(ctx)
        obj = ctx.wrap_bio(
            ssl.MemoryBIO(),
            ssl.MemoryBIO(),
            server_side=server_side,
            server_hostname=None if server_side else "localhost",
        )
        assert sockio.ssl_pointer(obj, server_side=not server_side) is None
        assert sockio.ssl_pointer(obj, server_side=server_side) == ssl_of(obj)
        other = ssl.SSLContext(protocol)  # a connection moved to another context, as tlsconn does
        KEEP.append(other)
        obj.context = other
        assert sockio.ssl_pointer(obj, server_side=server_side) == ssl_of(obj)


async def test_attach_keeps_the_bios_while_the_transport_holds_bytes():
    """A transport with unsent bytes stays as it is; once they are out, attach moves it."""
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    KEEP.append(ctx)
    loop = asyncio.get_running_loop()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        transport, ep = await loop.create_connection(
            lambda: tlsconn.TlsEndpoint(ctx, server_side=False, server_hostname="localhost"),
            *listener.getsockname()[:2],
        )
        assert isinstance(ep, tlsconn.TlsEndpoint)
        peer, _ = listener.accept()  # already queued: returns at once
        with peer:
            transport.write(bytes(8 << 20))  # nobody reads: the kernel takes a few MiB
            assert transport.get_write_buffer_size() > 0
            assert sockio.ssl_pointer(ep.ssl, server_side=False) is not None
            assert sockio.attach(ep, ep.ssl, transport, server_side=False) is None
            assert transport.is_reading()  # untouched
            assert bios(ep.ssl)[:2] == (BIO_TYPE_MEM, BIO_TYPE_MEM)
            peer.setblocking(False)

            def drained() -> bool:
                with contextlib.suppress(BlockingIOError):
                    while peer.recv(1 << 20):
                        pass
                return transport.get_write_buffer_size() == 0

            await eventually(drained, 10, step=0.01)
            io = sockio.attach(ep, ep.ssl, transport, server_side=False)
            assert io is not None
            assert not transport.is_reading()  # SocketIO reads the dup now
            rtype, wtype, fd = bios(ep.ssl)
            assert (rtype, wtype) == (BIO_TYPE_SOCKET, BIO_TYPE_SOCKET)
            assert fd not in (-1, peer.fileno(), transport.get_extra_info("socket").fileno())
            io.abort()
            assert bios(ep.ssl) == (BIO_TYPE_SOCKET, BIO_TYPE_SOCKET, -1)
            with pytest.raises(OSError, match="Bad file descriptor"):
                os.fstat(fd)  # closed (nothing else opened it again meanwhile)
        await asyncio.wait_for(ep.wait_closed(), 5)


# --- a TLS 1.3 refusal after our handshake --------------------------------------------------


def refuse_after_handshake(
    listener: socket.socket, ctx: ssl.SSLContext, go: threading.Event
) -> str:
    """Serve one TLS 1.3 handshake over memory BIOs; hold the alert refusing the client's
    certificate until ``go``, then send it and wait for the client to close."""
    conn, _ = listener.accept()
    with conn:
        conn.settimeout(10)
        incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
        obj = ctx.wrap_bio(incoming, outgoing, server_side=True)
        while True:
            try:
                obj.do_handshake()
            except ssl.SSLWantReadError:
                conn.sendall(outgoing.read())
                data = conn.recv(65536)
                assert data, "the client closed during the handshake"
                incoming.write(data)
                continue
            except ssl.SSLCertVerificationError:
                break
            raise AssertionError("the client's certificate was accepted")
        assert obj.version() is None or obj.version() == "TLSv1.3"
        alert = outgoing.read()
        assert alert
        assert go.wait(10)
        conn.sendall(alert)
        with contextlib.suppress(ConnectionError):
            while conn.recv(65536):
                pass  # until the client closes: on the alert, not on our FIN
        return "closed"


@pytest.mark.parametrize("mode", MODES)
async def test_refusal_after_our_tls13_handshake_is_logged_and_counted(
    sidecar_args: Args, files: Files, other_pki: testkit.TestPKI, caplog, mode: str
):
    """The upstream refuses our client certificate after our side of the handshake is over
    (TLS 1.3): its alert arrives in the data phase, on the socket in socket mode."""
    ctx = upstream_context(files, other_pki)  # trusts another CA for client certificates
    ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    go = threading.Event()
    with socket.create_server(("127.0.0.1", 0)) as listener:
        listener.settimeout(10)
        up = in_thread(refuse_after_handshake, listener, ctx, go)
        async with outbound_to(sidecar_args, listener.getsockname()[1], mode) as m:
            reader, writer = await asyncio.open_connection("127.0.0.1", m.outbound)
            try:
                ep = await eventually(lambda: one_endpoint(server_side=False), 10)
                assert isinstance(ep, tlsconn.TlsEndpoint)
                assert ep.ssl.version() == "TLSv1.3"
                # The app sends a few chunks (the upstream holds them unread) until our TLS
                # side has carried enough to move onto its socket (tlsconn._ATTACH_AFTER).
                for _ in range(100 if mode == "socket" else 0):
                    if ep.io is not None:
                        break
                    writer.write(b"x" * 100)
                    await writer.drain()
                    await asyncio.sleep(0.01)  # one chunk per read on the sidecar's side
                kind = BIO_TYPE_SOCKET if mode == "socket" else BIO_TYPE_MEM
                assert (ep.io is not None) == (mode == "socket")
                assert bios(ep.ssl)[0] == kind  # where the alert will be read
            finally:
                go.set()
            with contextlib.suppress(ConnectionError):
                assert await asyncio.wait_for(reader.read(), 10) == b""
            writer.close()
            assert await asyncio.wait_for(up, 10) == "closed"
            await eventually(lambda: log_fields(caplog, REFUSED), 5)
            exposition = m.r.sidecar.metrics.exposition().decode()
    assert ep.failure is not None
    assert ep.failure.alert == "unknown_ca"
    (line,) = log_fields(caplog, REFUSED)
    assert line["alert"] == "unknown_ca"
    assert line["alert_sent_by"] == "peer"
    failures = [
        line.rsplit(" ", 1)[1]
        for line in exposition.splitlines()
        if line.startswith("kubemtls_sidecar_handshake_failures_total{")
        and 'direction="outbound"' in line
        and 'alert="unknown_ca"' in line
    ]
    assert failures == ["1.0"]
